//! Checks what a guest sends before it goes into a trace.dat, so that `trace-cmd report`
//! (Debian 12's 3.1.6, with libtraceevent 1.7.1) cannot crash or hang on the file, whatever the
//! guest sent. The host calls it once per item: each event `format` text ([`FormatSet::admit`]),
//! the two header texts ([`check_headers`]), the `printk_formats` text
//! ([`sanitize_printk_formats`]) and each CPU's ring-buffer pages ([`scan_cpu_file`]). A bad item
//! is refused with a [`FormatProblem`] or [`PageProblem`] to note; the rest of the run goes on.
//!
//! The checks were found by feeding hostile files to the real `trace-cmd report`
//! (`tests/tracedat_hostile.rs` keeps them): libtraceevent parses print formats recursively
//! (deep nesting or long operator chains overflow its stack), divides by zero, follows lengths,
//! `*` widths, string offsets and array indices taken from records or formats without checking
//! them, and its plugins trust field sizes. So a format must be plain ASCII in the kernel's
//! line layout, with fields inside [`MAX_FIELD_END`] and a print fmt within the limits below;
//! and a page must walk cleanly and every record on it must fit its format (fields inside the
//! record, strings terminated inside the page, evaluated lengths inside the record).
//!
//! Every real format of a Linux 6.18 host passes (tested); the limits are far above what real
//! formats use. The bounds are the `pub const`s below.

mod pages;
mod print_fmt;
#[cfg(test)]
mod tests;

pub use pages::{check_page, check_page_records, scan_cpu_data, scan_cpu_file, PageInfo};
pub use pages::{PageProblem, PageScan, MAX_NOTED_PAGE_PROBLEMS};

use super::page::PageLayout;
use std::collections::{BTreeMap, BTreeSet};

/// Largest event `format` text. The largest on a Linux 6.18 host (`dma:dma_alloc_sgt`) has
/// 5.5 KiB; the guest protocol caps a format file at the same 64 KiB, and the trace.dat reader
/// at 1 MiB.
pub const MAX_FORMAT_TEXT: usize = 64 << 10;
/// Largest `header_page` or `header_event` text (real ones have about 200 bytes).
pub const MAX_HEADER_TEXT: usize = 4 << 10;
/// Longest event or system name; tracefs names are C identifiers far shorter than this.
pub const MAX_NAME: usize = 128;
/// Most `field:` lines in one format (real formats have at most 24).
pub const MAX_FIELDS: usize = 256;
/// Longest field declaration (`unsigned long args[6]`); libtraceevent joins its words with a
/// quadratic `strcat`, so a 200,000-word declaration takes seconds.
pub const MAX_FIELD_DECL: usize = 256;
/// Every field's `offset + size` stays below this (real: 168). Larger values made trace-cmd
/// read past the record (SIGSEGV/SIGBUS); records themselves are checked per page.
pub const MAX_FIELD_END: u32 = 1 << 16;
/// Longest `print fmt:` text (real: 4.8 KiB).
pub const MAX_PRINT_FMT: usize = 32 << 10;
/// Deepest nesting of `(`, `[` and `{` in a print fmt (real: 14). 37,000 nested parentheses
/// overflow libtraceevent's 8 MiB stack.
pub const MAX_PRINT_FMT_NESTING: usize = 64;
/// Bound on libtraceevent's recursion while it parses, evaluates and frees a print fmt: per
/// bracket level, the tokens since its last comma, summed along the nesting (real: 46).
/// Chains of 25,000 to 52,000 operators (`!!!!x`, `a+a+...`, `a?a?...`, casts) overflow an
/// 8 MiB stack at ~300 bytes per level; 1024 levels use at most about 350 KiB.
pub const MAX_PRINT_FMT_EXPR_DEPTH: usize = 1024;
/// Largest width or precision a conversion may get, written (`%999999999d` hangs trace-cmd
/// printing a gigabyte) or taken from a record through `*`.
pub const MAX_PRINT_WIDTH: u32 = 4096;
/// Bytes the plugin print function `scsi_trace_parse_cdb` may read at its CDB pointer.
pub const PLUGIN_POINTER_READ: usize = 32;
/// Longest instruction the kvm plugin copies into its 15-byte buffer for `kvm_emulate_insn`
/// (a longer `len` smashed its stack).
pub const MAX_KVM_INSN_LEN: u64 = 15;

/// Why a format or header text is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatProblem {
    #[error("{len} bytes, more than the {max} allowed")]
    TooLong { len: usize, max: usize },
    #[error("byte {offset} is {byte:#04x}: only printable ASCII, tab and newline are allowed")]
    NotText { offset: usize, byte: u8 },
    #[error("line {line}: {what}")]
    Line { line: usize, what: String },
    #[error("print fmt: {0}")]
    PrintFmt(String),
    #[error("id {id} is already taken by {other}")]
    DuplicateId { id: u16, other: String },
    #[error("{0} was already admitted")]
    DuplicateName(String),
    #[error("its common fields differ from those of the formats admitted before")]
    CommonFields,
    #[error("{0}")]
    Header(String),
    #[error("system name is not an identifier of at most {MAX_NAME} characters")]
    SystemName,
}

/// One `field:` line as libtraceevent sees it, as far as the checks need it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    name: String,
    offset: u32,
    size: u32,
    signed: bool,
    /// libtraceevent's TEP_FIELD_IS_ARRAY, _STRING and _DYNAMIC (`__data_loc`/`__rel_loc`).
    array: bool,
    string: bool,
    dynamic: bool,
    /// `__rel_loc`: the offset counts from the end of the field.
    relative: bool,
}

impl Field {
    /// First byte after the field; for a size-0 field ("the rest of the record") its offset.
    fn end(&self) -> u64 {
        u64::from(self.offset) + u64::from(self.size)
    }
}

/// An event format that passed [`check_event_format`]: its name and id, and what each of its
/// records must satisfy (checked by [`check_page_records`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedFormat {
    /// Event name without its system, e.g. `sched_switch`.
    pub name: String,
    /// The id in every record's `common_type`.
    pub id: u16,
    /// Common fields first, then the event's own.
    fields: Vec<Field>,
    n_common: usize,
    /// The largest `offset + size` of all fields.
    fixed_end: u64,
    /// Indices of the `__data_loc`/`__rel_loc` fields.
    dynamic_fields: Vec<usize>,
    /// Fields printed as strings: string arrays (by their raw printing, `false`) and
    /// `__get_str` arguments (`true`: their start is always read as a dynamic offset).
    string_fields: Vec<(usize, bool)>,
    rules: print_fmt::Rules,
    /// `kvm_emulate_insn`: the fields `len` and `insn` the kvm plugin copies.
    kvm_insn: Option<(usize, usize)>,
    /// `bprint`: the field `buf` whose arguments libtraceevent reads by a printk format.
    bprint_buf: Option<usize>,
}

impl CheckedFormat {
    /// Names of all fields, the `common_*` ones first, in file order.
    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|f| f.name.as_str())
    }
}

/// Checks an event `format` text (`events/<system>/<event>/format`, ftrace's included).
pub fn check_event_format(text: &[u8]) -> Result<CheckedFormat, FormatProblem> {
    let text = check_text(text, MAX_FORMAT_TEXT)?;
    let bad = |line: usize, what: String| FormatProblem::Line { line, what };
    let mut lines = Lines {
        text,
        pos: 0,
        number: 0,
    };
    let (n, name) = lines.expect("name:")?;
    if !is_name(name) {
        return Err(bad(
            n,
            format!("the name is not an identifier of at most {MAX_NAME} characters"),
        ));
    }
    let (n, id) = lines.expect("ID:")?;
    let id = plain_number(id)
        .and_then(|v| u16::try_from(v).ok())
        .ok_or_else(|| bad(n, "the ID is not a decimal number below 65536".into()))?;
    let (n, rest) = lines.expect("format:")?;
    if !rest.is_empty() {
        return Err(bad(n, "text after `format:`".into()));
    }
    // The kernel writes the common fields, a blank line, the event's fields, a blank line, and
    // the print fmt; libtraceevent reads exactly that.
    #[derive(PartialEq)]
    enum Part {
        Common,
        Event,
        AfterEvent,
    }
    let mut part = Part::Common;
    let mut fields = Vec::new();
    let mut n_common = 0;
    let mut print_fmt = None;
    while let Some((n, start, line)) = lines.next() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            match part {
                Part::Common => {
                    n_common = fields.len();
                    part = Part::Event;
                }
                Part::Event | Part::AfterEvent => part = Part::AfterEvent,
            }
        } else if let Some(at) = line
            .find("print fmt:")
            .filter(|_| trimmed.starts_with("print fmt:"))
        {
            if part != Part::AfterEvent {
                return Err(bad(n, "print fmt without blank lines before it".into()));
            }
            print_fmt = Some(&text[start + at + "print fmt:".len()..]);
            break;
        } else if part == Part::AfterEvent {
            return Err(bad(n, "text between the fields and the print fmt".into()));
        } else if fields.len() == MAX_FIELDS {
            return Err(bad(n, format!("more than {MAX_FIELDS} fields")));
        } else {
            fields.push(parse_field_line(trimmed).map_err(|what| bad(n, what))?);
        }
    }
    if part == Part::Common {
        return Err(bad(
            lines.number,
            "no blank line after the common fields".into(),
        ));
    }
    check_common_fields(&fields[..n_common]).map_err(|what| bad(4, what))?;
    let rules = match print_fmt {
        Some(print_fmt) => {
            print_fmt::check(print_fmt, &fields, n_common).map_err(FormatProblem::PrintFmt)?
        }
        None => print_fmt::Rules::default(), // libtraceevent prints the raw fields
    };
    let kvm_insn = (name == "kvm_emulate_insn")
        .then(|| {
            let find = |want: &str| fields.iter().position(|f| f.name == want);
            find("len").zip(find("insn"))
        })
        .flatten();
    let bprint_buf = (name == "bprint")
        .then(|| fields.iter().position(|f| f.name == "buf"))
        .flatten();
    let fixed_end = fields.iter().map(Field::end).max().unwrap_or(0);
    let dynamic_fields = (0..fields.len()).filter(|&i| fields[i].dynamic).collect();
    let string_fields = (0..fields.len())
        .filter(|&i| fields[i].string)
        .map(|i| (i, false))
        .chain(rules.string_fields.iter().map(|&i| (i, true)))
        .collect();
    Ok(CheckedFormat {
        name: name.to_owned(),
        id,
        fields,
        n_common,
        fixed_end,
        dynamic_fields,
        string_fields,
        rules,
        kvm_insn,
        bprint_buf,
    })
}

/// The lines of a text with their numbers (from 1) and byte offsets.
struct Lines<'a> {
    text: &'a str,
    pos: usize,
    number: usize,
}

impl<'a> Lines<'a> {
    fn next(&mut self) -> Option<(usize, usize, &'a str)> {
        if self.pos > self.text.len() || (self.pos == self.text.len() && self.number > 0) {
            return None;
        }
        let start = self.pos;
        let end = self.text[start..]
            .find('\n')
            .map_or(self.text.len(), |i| start + i);
        self.pos = end + 1;
        self.number += 1;
        Some((self.number, start, &self.text[start..end]))
    }

    /// The next line, which must start with `key`: its number and what follows the key.
    fn expect(&mut self, key: &str) -> Result<(usize, &'a str), FormatProblem> {
        let (n, _, line) = self.next().unwrap_or((self.number + 1, 0, ""));
        line.trim()
            .strip_prefix(key)
            .map(|rest| (n, rest.trim()))
            .ok_or_else(|| FormatProblem::Line {
                line: n,
                what: format!("expected `{key}`"),
            })
    }
}

/// libtraceevent finds every record's event by the `common_type` of the format with the lowest
/// id and its process by `common_pid`: they must be where the kernel puts them.
fn check_common_fields(common: &[Field]) -> Result<(), String> {
    let find = |name: &str| common.iter().find(|f| f.name == name);
    if !find("common_type").is_some_and(|f| f.offset == 0 && f.size == 2) {
        return Err("no common_type field at offset 0 with size 2".into());
    }
    if !find("common_pid").is_some_and(|f| f.size == 4 && !f.array) {
        return Err("no 4-byte common_pid field".into());
    }
    if let Some(f) = common.iter().find(|f| !f.name.starts_with("common_")) {
        return Err(format!("common field {:?} is not named common_*", f.name));
    }
    Ok(())
}

/// Text of at most `max` bytes of printable ASCII, tabs and newlines.
fn check_text(text: &[u8], max: usize) -> Result<&str, FormatProblem> {
    if text.len() > max {
        return Err(FormatProblem::TooLong {
            len: text.len(),
            max,
        });
    }
    if let Some(offset) = text
        .iter()
        .position(|&b| !(b == b'\n' || b == b'\t' || (b' '..=b'~').contains(&b)))
    {
        return Err(FormatProblem::NotText {
            offset,
            byte: text[offset],
        });
    }
    // Only ASCII is left.
    std::str::from_utf8(text).map_err(|_| FormatProblem::NotText { offset: 0, byte: 0 })
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A decimal number as the kernel writes it: no sign, no leading zero (libtraceevent reads
/// numbers with `strtoul(s, NULL, 0)`, so `010` would be 8 to it and 10 to us).
fn plain_number(text: &str) -> Option<u32> {
    let ok = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    ok.then(|| text.parse().ok()).flatten()
}

/// Checks a system name (the `<system>` of `events/<system>/<event>/format`).
pub fn check_system_name(name: &str) -> Result<(), FormatProblem> {
    if is_name(name) {
        Ok(())
    } else {
        Err(FormatProblem::SystemName)
    }
}

/// Parses `field:DECL; offset:N; size:N; signed:N;` (signed may be missing, as in old kernels).
fn parse_field_line(line: &str) -> Result<Field, String> {
    let rest = line
        .strip_prefix("field:")
        .ok_or("a line that is not a `field:` line")?;
    let parts: Vec<&str> = rest.split(';').map(str::trim).collect();
    let (decl, numbers) = match parts.as_slice() {
        [decl, numbers @ .., ""] => (*decl, numbers),
        _ => return Err("the field line does not end in `;`".into()),
    };
    let mut values = [None; 3];
    for (slot, key) in ["offset:", "size:", "signed:"].iter().enumerate() {
        if let Some(part) = numbers.get(slot) {
            let raw = part
                .strip_prefix(key)
                .ok_or_else(|| format!("expected `{key}` in the field line"))?;
            values[slot] = Some(
                plain_number(raw.trim())
                    .ok_or_else(|| format!("`{key}` is not a plain decimal number"))?,
            );
        }
    }
    if numbers.len() > 3 {
        return Err("extra parts in the field line".into());
    }
    let (Some(offset), Some(size)) = (values[0], values[1]) else {
        return Err("the field line lacks its offset or size".into());
    };
    if u64::from(offset) + u64::from(size) > u64::from(MAX_FIELD_END) {
        return Err(format!("the field ends past {MAX_FIELD_END}"));
    }
    let decl = parse_decl(decl)?;
    let dynamic =
        decl.type_text.starts_with("__data_loc") || decl.type_text.starts_with("__rel_loc");
    if dynamic && size != 2 && size != 4 {
        return Err("a __data_loc field whose size is not 2 or 4".into());
    }
    let has = |s: &str| decl.type_text.contains(s);
    let array = decl.array || (dynamic && size == 2);
    Ok(Field {
        name: decl.name,
        offset,
        size,
        signed: values[2].is_some_and(|v| v != 0),
        array,
        string: (decl.array && (has("char") || has("u8") || has("s8"))) || (dynamic && size == 2),
        dynamic,
        relative: decl.type_text.starts_with("__rel_loc"),
    })
}

struct Decl {
    name: String,
    /// The declaration without its name, as libtraceevent's `field->type` holds it.
    type_text: String,
    array: bool,
}

/// A C declaration as the kernel writes it: type words and `*`, the name, and at most one
/// `[...]` either after the name or before it (`__data_loc char[] name`); an
/// `__attribute__((...))` is kept in the type.
fn parse_decl(decl: &str) -> Result<Decl, String> {
    if decl.len() > MAX_FIELD_DECL {
        return Err(format!("a declaration longer than {MAX_FIELD_DECL} bytes"));
    }
    let mut words: Vec<&str> = Vec::new();
    let mut bracket: Option<(usize, &str)> = None; // (words before it, its content)
    let bytes = decl.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b' ' || c == b'\t' {
            i += 1;
        } else if c.is_ascii_alphanumeric() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let word = &decl[start..i];
            if word == "__attribute__" {
                let end = attribute_end(decl, i).ok_or("a malformed __attribute__")?;
                words.push(&decl[start..end]);
                i = end;
            } else {
                words.push(word);
            }
        } else if c == b'*' {
            words.push("*");
            i += 1;
        } else if c == b'[' {
            let close = decl[i..].find(']').ok_or("an unclosed `[`")? + i;
            let content = &decl[i + 1..close];
            if bracket.is_some()
                || !content
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b' ')
            {
                return Err("an array suffix other than one `[N]`".into());
            }
            bracket = Some((words.len(), content));
            i = close + 1;
        } else {
            return Err(format!("character {:?} in a declaration", char::from(c)));
        }
    }
    let name_at = match bracket {
        Some((before, _)) if words.len() == before + 1 => before, // `type[] name`
        Some((before, _)) if words.len() == before => before.wrapping_sub(1),
        Some(_) => return Err("more than one word after `[...]`".into()),
        None => words.len().wrapping_sub(1),
    };
    let name = match words.get(name_at) {
        Some(w) if name_at >= 1 && w.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => *w,
        _ => return Err("a declaration without a type and a name".into()),
    };
    let mut type_words: Vec<&str> = words.clone();
    type_words.remove(name_at);
    let mut type_text = type_words.join(" ");
    if let Some((_, content)) = bracket {
        type_text.push('[');
        type_text.push_str(content);
        type_text.push(']');
    }
    Ok(Decl {
        name: name.to_owned(),
        type_text,
        array: bracket.is_some(),
    })
}

/// End of `__attribute__((...))` whose name ends at `at`: balanced parentheses around
/// identifiers, commas, spaces and string literals.
fn attribute_end(decl: &str, at: usize) -> Option<usize> {
    let bytes = decl.as_bytes();
    let mut i = at;
    while bytes.get(i) == Some(&b' ') {
        i += 1;
    }
    if bytes.get(i) != Some(&b'(') {
        return None;
    }
    let mut depth = 0usize;
    while let Some(&c) = bytes.get(i) {
        match c {
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            b'"' | b',' | b' ' | b'_' => {}
            c if c.is_ascii_alphanumeric() => {}
            _ => return None,
        }
        if depth > 4 {
            return None;
        }
        i += 1;
    }
    None
}

/// The formats admitted for one trace: each checked, ids and names unique, common fields alike
/// (libtraceevent reads every record's type and pid with the lowest id's common fields).
#[derive(Debug, Clone, Default)]
pub struct FormatSet {
    by_id: BTreeMap<u16, (String, CheckedFormat)>,
    names: BTreeSet<(String, String)>,
    common: Option<Vec<Field>>,
}

impl FormatSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks `text` as a format of `system` and keeps it if it passes and agrees with those
    /// admitted before; the first of two formats with one id or name wins.
    pub fn admit(&mut self, system: &str, text: &[u8]) -> Result<&CheckedFormat, FormatProblem> {
        check_system_name(system)?;
        let format = check_event_format(text)?;
        if let Some((other_system, other)) = self.by_id.get(&format.id) {
            return Err(FormatProblem::DuplicateId {
                id: format.id,
                other: format!("{other_system}:{}", other.name),
            });
        }
        let key = (system.to_owned(), format.name.clone());
        if self.names.contains(&key) {
            return Err(FormatProblem::DuplicateName(format!(
                "{system}:{}",
                format.name
            )));
        }
        let common = &format.fields[..format.n_common];
        match &self.common {
            Some(first) if first.as_slice() != common => return Err(FormatProblem::CommonFields),
            Some(_) => {}
            None => self.common = Some(common.to_vec()),
        }
        self.names.insert(key);
        let id = format.id;
        let entry = self.by_id.entry(id).or_insert((system.to_owned(), format));
        Ok(&entry.1)
    }

    /// The admitted format with this id.
    pub fn get(&self, id: u16) -> Option<&CheckedFormat> {
        self.by_id.get(&id).map(|(_, f)| f)
    }

    /// Number of admitted formats.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Bytes of the common fields: libtraceevent reads them in every record, even one whose id
    /// has no format.
    fn common_end(&self) -> u64 {
        self.common
            .iter()
            .flatten()
            .map(Field::end)
            .max()
            .unwrap_or(0)
    }
}

/// The `printk_formats` text that may be written, and how many of its lines were dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrintkFormats {
    pub text: Vec<u8>,
    pub dropped_lines: usize,
}

/// Keeps the lines of a `printk_formats` text that are `0x<hex> : "<string>"` as the kernel
/// writes them, printable ASCII, at least 2 characters between the quotes (libtraceevent reads
/// before a shorter string), and safe as a `bprint` record's format (no `*`, no width above
/// [`MAX_PRINT_WIDTH`]: `%999999999d` or a `*` hangs trace-cmd). A `bprint` record whose format
/// was dropped prints as "NO FORMAT FOUND".
pub fn sanitize_printk_formats(text: &[u8]) -> PrintkFormats {
    let mut kept = Vec::with_capacity(text.len());
    let mut dropped_lines = 0;
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        if printk_line_is_safe(line) {
            kept.extend_from_slice(line);
            kept.push(b'\n');
        } else {
            dropped_lines += 1;
        }
    }
    PrintkFormats {
        text: kept,
        dropped_lines,
    }
}

fn printk_line_is_safe(line: &[u8]) -> bool {
    let Ok(line) = std::str::from_utf8(line) else {
        return false;
    };
    let Some((address, rest)) = line.split_once(" : \"") else {
        return false;
    };
    let hex = address.strip_prefix("0x").unwrap_or("");
    let Some(string) = rest.strip_suffix('"') else {
        return false;
    };
    !hex.is_empty()
        && hex.len() <= 16
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && string.len() >= 2
        && string.bytes().all(|b| (b' '..=b'~').contains(&b))
        && print_fmt::printk_format_is_safe(string)
}

/// Checks one header text (`events/header_page` or `events/header_event`) on arrival: size and
/// characters. [`check_headers`] checks the two together once both are there.
pub fn check_header_text(text: &[u8]) -> Result<(), FormatProblem> {
    check_text(text, MAX_HEADER_TEXT).map(|_| ())
}

/// Checks `header_page` and `header_event` and returns the page layout they describe. The page
/// header must be the kernel's (libtraceevent's page reader does not read the offsets from the
/// text: it assumes timestamp at 0, commit at 8, data after commit), so that what our page walker
/// accepts is what trace-cmd reads.
pub fn check_headers(
    header_page: &[u8],
    header_event: &[u8],
    page_size: u32,
) -> Result<PageLayout, FormatProblem> {
    let text = check_text(header_page, MAX_HEADER_TEXT)?;
    check_header_text(header_event)?;
    let bad = |what: String| FormatProblem::Header(format!("events/header_page: {what}"));
    let mut found = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let field =
            parse_field_line(line).map_err(|what| bad(format!("line {}: {what}", n + 1)))?;
        if !["timestamp", "commit", "overwrite", "data"].contains(&field.name.as_str()) {
            return Err(bad(format!("unknown field {:?}", field.name)));
        }
        if found.insert(field.name.clone(), field).is_some() {
            return Err(bad(format!("line {}: a field given twice", n + 1)));
        }
    }
    let span = |name: &str| found.get(name).map(|f| (f.offset, f.size));
    let commit_size = match span("commit") {
        Some((8, size @ (4 | 8))) => size,
        _ => return Err(bad("commit is not a 4- or 8-byte field at offset 8".into())),
    };
    if span("timestamp") != Some((0, 8)) {
        return Err(bad("timestamp is not an 8-byte field at offset 0".into()));
    }
    match span("data") {
        Some((offset, size)) if offset == 8 + commit_size && offset + size <= page_size => {}
        _ => {
            return Err(bad(
                "data does not directly follow commit inside the page".into()
            ))
        }
    }
    PageLayout::parse(header_page, header_event, page_size)
        .map_err(|e| FormatProblem::Header(e.to_string()))
}
