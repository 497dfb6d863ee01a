//! The text edits behind setup and teardown: render our channels from the templates, splice
//! them into `<devices>` (creating or reopening it when needed) and cut them out again, so
//! that each cut undoes its insertion byte for byte. The layout rules are in the parent
//! module's documentation.

use std::ops::Range;

use super::layout::{first_indent, indent_at, line_break, line_start, removal_range};
use super::scan::{self, Scan};
use super::{ChannelKind, DomXmlError, OurChannel};

const CONTROL_TEMPLATE: &str = include_str!("../../xml-templates/channel-control.xml");
const CPU_TEMPLATE: &str = include_str!("../../xml-templates/channel-cpu.xml");
const PATH_PLACEHOLDER: &str = "@PATH@";
const NAME_PLACEHOLDER: &str = "@NAME@";

/// Cuts `channels` out of `text`, returning their target names in plan order.
pub(super) fn remove_channels(text: &mut String, mut channels: Vec<OurChannel>) -> Vec<String> {
    // From the end backwards, so the spans still to cut keep their offsets.
    channels.sort_by_key(|ch| std::cmp::Reverse(ch.span.start));
    for channel in &channels {
        let range = removal_range(text, channel.span.clone());
        text.replace_range(range, "");
    }
    channels.sort_by_key(|ch| ch.kind);
    channels.into_iter().map(|ch| ch.target_name).collect()
}

/// The channel element for `kind`, from its template.
pub(super) fn render(kind: ChannelKind, dir: &str) -> String {
    let path = kind.source_path(dir);
    // The name goes in first: an escaped path may contain anything, even "@NAME@".
    let template = match kind {
        ChannelKind::Control => CONTROL_TEMPLATE,
        ChannelKind::Cpu(_) => CPU_TEMPLATE,
    };
    template
        .trim_end()
        .replace(NAME_PLACEHOLDER, &kind.target_name())
        .replace(PATH_PLACEHOLDER, &quick_xml::escape::escape(path.as_str()))
}

/// Adds the `missing` channels to `text`, whose scan is `scan`, creating `<devices>` if needed.
pub(super) fn insert_channels(
    text: &str,
    scan: &Scan,
    missing: &[ChannelKind],
    dir: &str,
) -> Result<String, DomXmlError> {
    let newline = line_break(text);
    let channels: Vec<String> = missing.iter().map(|&kind| render(kind, dir)).collect();
    let domain_indent = indent_at(text, scan.domain.start_tag.start).unwrap_or("");
    let child_indent = first_indent(text, &scan.domain_children)
        .map_or_else(|| format!("{domain_indent}  "), str::to_owned);
    let unit = child_indent
        .strip_prefix(domain_indent)
        .filter(|unit| !unit.is_empty())
        .unwrap_or("  ");

    let Some(devices) = &scan.devices else {
        // No <devices>: create it as the last child of <domain>.
        let Some(domain_end) = &scan.domain.end_tag else {
            return Err(DomXmlError::Malformed {
                line: 1 + text[..scan.domain.start_tag.start].matches('\n').count(),
                message: "<domain/> is empty, so libvirt would reject it".to_owned(),
            });
        };
        let inner = format!("{child_indent}{unit}");
        let mut block = format!("{child_indent}<devices>");
        for channel in &channels {
            block.push_str(&format!("{newline}{inner}{channel}"));
        }
        block.push_str(&format!("{newline}{child_indent}</devices>"));
        let (at, insert) = if indent_at(text, domain_end.start).is_some() {
            (
                line_start(text, domain_end.start),
                format!("{block}{newline}"),
            )
        } else {
            (domain_end.start, format!("{newline}{block}"))
        };
        return Ok(splice(text, at..at, &insert));
    };

    let devices_indent =
        indent_at(text, devices.tags.start_tag.start).unwrap_or(child_indent.as_str());
    let inner = first_indent(text, &devices.children)
        .map_or_else(|| format!("{devices_indent}{unit}"), str::to_owned);
    let glued = |channels: &[String]| -> String {
        channels
            .iter()
            .map(|ch| format!("{newline}{inner}{ch}"))
            .collect()
    };
    match &devices.tags.end_tag {
        Some(end_tag) if indent_at(text, end_tag.start).is_some() => {
            let at = line_start(text, end_tag.start);
            let lines: String = channels
                .iter()
                .map(|ch| format!("{inner}{ch}{newline}"))
                .collect();
            Ok(splice(text, at..at, &lines))
        }
        Some(end_tag) => Ok(splice(
            text,
            end_tag.start..end_tag.start,
            &glued(&channels),
        )),
        None => {
            // <devices/> (or <devices />): reopen it in place; teardown closes it again.
            let tag = &text[devices.tags.start_tag.clone()];
            let open = tag.strip_suffix("/>").unwrap_or(tag);
            let expanded = format!("{open}>{}</devices>", glued(&channels));
            Ok(splice(text, devices.tags.start_tag.clone(), &expanded))
        }
    }
}

/// After teardown: undo the `<devices>` creation or expansion that setup did, if it did.
pub(super) fn tidy_emptied_devices(text: String) -> Result<String, DomXmlError> {
    let scan = scan::scan(&text)?;
    let Some(devices) = &scan.devices else {
        return Ok(text);
    };
    let Some(end_tag) = &devices.tags.end_tag else {
        return Ok(text);
    };
    let start_tag = devices.tags.start_tag.clone();
    let content = &text[start_tag.end..end_tag.start];
    if content.is_empty() {
        let open = &text[start_tag.start..start_tag.end - 1];
        let collapsed = format!("{open}/>");
        return Ok(splice(&text, devices.tags.span(), &collapsed));
    }
    let created_shape = content.trim().is_empty()
        && content.contains('\n')
        && indent_at(&text, start_tag.start).is_some()
        && indent_at(&text, end_tag.start).is_some()
        && scan.domain_children.last() == Some(&start_tag.start);
    if created_shape {
        let range = removal_range(&text, devices.tags.span());
        return Ok(splice(&text, range, ""));
    }
    Ok(text)
}

fn splice(text: &str, range: Range<usize>, insert: &str) -> String {
    let mut out = String::with_capacity(text.len() + insert.len());
    out.push_str(&text[..range.start]);
    out.push_str(insert);
    out.push_str(&text[range.end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_hold_each_placeholder_once() {
        for template in [CONTROL_TEMPLATE, CPU_TEMPLATE] {
            assert_eq!(template.matches(PATH_PLACEHOLDER).count(), 1, "{template}");
            assert_eq!(template.matches(NAME_PLACEHOLDER).count(), 1, "{template}");
            assert_eq!(template.trim_end().lines().count(), 1, "{template}");
        }
    }
}
