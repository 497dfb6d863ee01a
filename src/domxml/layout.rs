//! Line-aware text surgery: where a line starts, how it is indented, and what to cut so a
//! removed element leaves its surroundings exactly as they were before it was inserted.

use std::ops::Range;

/// The line break the document already uses; libvirt writes `\n`, hand-edited files may not.
pub(super) fn line_break(xml: &str) -> &'static str {
    if xml.contains("\r\n") {
        "\r\n"
    } else {
        "\n"
    }
}

/// Offset of the first byte of the line holding `pos`.
pub(super) fn line_start(xml: &str, pos: usize) -> usize {
    xml[..pos].rfind('\n').map_or(0, |newline| newline + 1)
}

/// The spaces and tabs before `pos` on its line, if nothing else precedes it there.
pub(super) fn indent_at(xml: &str, pos: usize) -> Option<&str> {
    let indent = &xml[line_start(xml, pos)..pos];
    indent.bytes().all(is_blank).then_some(indent)
}

/// The indentation of the first of `starts` that begins its own line.
pub(super) fn first_indent<'a>(xml: &'a str, starts: &[usize]) -> Option<&'a str> {
    starts.iter().find_map(|&start| indent_at(xml, start))
}

/// What to delete to remove the element at `span` together with the layout it brought.
///
/// - Alone on its line: the whole line, line break included.
/// - First on its line but followed by more markup (`<x/></devices>`): the line break
///   before it, its indentation and the element, which undoes an insertion of
///   `"\n" + indent + element` made in front of that markup.
/// - Otherwise: just the element.
pub(super) fn removal_range(xml: &str, span: Range<usize>) -> Range<usize> {
    let bytes = xml.as_bytes();
    let start = line_start(xml, span.start);
    let first_on_line = bytes[start..span.start].iter().copied().all(is_blank);
    let mut after = span.end;
    while after < bytes.len() && is_blank(bytes[after]) {
        after += 1;
    }
    let rest = &bytes[after..];
    let line_end = if rest.starts_with(b"\r\n") {
        Some(after + 2)
    } else if rest.starts_with(b"\n") || rest.is_empty() {
        Some(after + usize::from(!rest.is_empty()))
    } else {
        None
    };
    match (first_on_line, line_end) {
        (true, Some(end)) => start..end,
        (true, None) if start > 0 => {
            let mut newline = start - 1;
            if newline > 0 && bytes[newline - 1] == b'\r' {
                newline -= 1;
            }
            newline..span.end
        }
        _ => span,
    }
}

fn is_blank(byte: u8) -> bool {
    byte == b' ' || byte == b'\t'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(xml: &str, needle: &str) -> String {
        let start = xml.find(needle).expect("needle in xml");
        let range = removal_range(xml, start..start + needle.len());
        format!("{}{}", &xml[..range.start], &xml[range.end..])
    }

    #[test]
    fn element_alone_on_its_line_takes_the_line() {
        assert_eq!(
            cut("<a>\n  <b/>\n  <c/>\n</a>", "<b/>"),
            "<a>\n  <c/>\n</a>"
        );
    }

    #[test]
    fn element_before_markup_takes_the_preceding_line_break() {
        assert_eq!(cut("<a>\n  <c/>\n  <b/></a>", "<b/>"), "<a>\n  <c/></a>");
    }

    #[test]
    fn crlf_line_breaks_go_with_their_element() {
        assert_eq!(cut("<a>\r\n  <b/>\r\n</a>", "<b/>"), "<a>\r\n</a>");
        assert_eq!(cut("<a>\r\n  <b/></a>", "<b/>"), "<a></a>");
    }

    #[test]
    fn element_sharing_its_line_takes_only_itself() {
        assert_eq!(cut("<a><c/><b/>\n</a>", "<b/>"), "<a><c/>\n</a>");
    }

    #[test]
    fn indent_only_counts_when_the_element_starts_the_line() {
        let xml = "<a>\n\t <b/><c/>\n</a>";
        assert_eq!(indent_at(xml, xml.find("<b/>").unwrap()), Some("\t "));
        assert_eq!(indent_at(xml, xml.find("<c/>").unwrap()), None);
    }
}
