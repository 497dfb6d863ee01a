//! Event `format` texts: just enough parsing to map a record's `common_type` to its event name
//! and to read the page header layout, which uses the same `field:` line syntax.

use super::{TraceDatError, TraceMeta};
use std::collections::BTreeMap;

/// One `field:` line of a format text, e.g.
/// `field:char prev_comm[16]; offset:8; size:16; signed:0;`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldFormat {
    /// The C declaration as written: `char prev_comm[16]`.
    pub decl: String,
    /// The field name without array suffix: `prev_comm`.
    pub name: String,
    pub offset: u32,
    pub size: u32,
    pub signed: bool,
}

/// What we use of an event's `format` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFormat {
    /// Event name without its system, e.g. `sched_switch`.
    pub name: String,
    /// The id stored in every record's `common_type`.
    pub id: u16,
    /// All fields, the `common_*` ones included, in file order.
    pub fields: Vec<FieldFormat>,
    /// The text after `print fmt: `, if present.
    pub print_fmt: Option<String>,
}

/// Parses an event `format` text (`name:`, `ID:`, `field:` lines, `print fmt:`).
pub fn parse_event_format(text: &[u8]) -> Result<EventFormat, TraceDatError> {
    let text = std::str::from_utf8(text)
        .map_err(|e| TraceDatError::EventFormat(format!("not UTF-8: {e}")))?;
    let mut name = None;
    let mut id = None;
    let mut fields = Vec::new();
    let mut print_fmt = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("name:") {
            name = Some(rest.trim().to_owned());
        } else if let Some(rest) = trimmed.strip_prefix("ID:") {
            let raw = rest.trim();
            let value: u16 = raw.parse().map_err(|_| {
                TraceDatError::EventFormat(format!("ID {raw:?} is not a number below 65536"))
            })?;
            id = Some(value);
        } else if trimmed.starts_with("field:") {
            fields.push(parse_field_line(trimmed).map_err(TraceDatError::EventFormat)?);
        } else if let Some(rest) = trimmed.strip_prefix("print fmt:") {
            print_fmt = Some(rest.trim().to_owned());
        }
    }
    let name = name.ok_or_else(|| TraceDatError::EventFormat("no `name:` line".into()))?;
    let id = id.ok_or_else(|| TraceDatError::EventFormat(format!("{name}: no `ID:` line")))?;
    Ok(EventFormat {
        name,
        id,
        fields,
        print_fmt,
    })
}

/// Parses `field:DECL; offset:N; size:N; signed:N;` (whitespace around parts is free;
/// `signed` may be missing, as in old kernels).
pub(crate) fn parse_field_line(line: &str) -> Result<FieldFormat, String> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    let mut signed = false;
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some(rest) = part.strip_prefix("field:") {
            decl = Some(rest.trim().to_owned());
        } else if let Some(rest) = part.strip_prefix("offset:") {
            offset = Some(parse_number(rest, "offset", line)?);
        } else if let Some(rest) = part.strip_prefix("size:") {
            size = Some(parse_number(rest, "size", line)?);
        } else if let Some(rest) = part.strip_prefix("signed:") {
            signed = parse_number(rest, "signed", line)? != 0;
        }
    }
    let decl = decl.ok_or_else(|| format!("no declaration in {line:?}"))?;
    let name = field_name(&decl).ok_or_else(|| format!("no field name in {line:?}"))?;
    Ok(FieldFormat {
        name,
        decl,
        offset: offset.ok_or_else(|| format!("no offset in {line:?}"))?,
        size: size.ok_or_else(|| format!("no size in {line:?}"))?,
        signed,
    })
}

fn parse_number(raw: &str, what: &str, line: &str) -> Result<u32, String> {
    raw.trim()
        .parse()
        .map_err(|_| format!("{what} {:?} is not a number in {line:?}", raw.trim()))
}

/// The last identifier of a declaration: `char prev_comm[16]` → `prev_comm`.
fn field_name(decl: &str) -> Option<String> {
    // `char comm[16]` ends in its array suffix; `__data_loc char[] name` has it mid-way.
    let decl = decl.trim_end();
    let without_array = match decl.rfind('[') {
        Some(at) if decl.ends_with(']') => &decl[..at],
        _ => decl,
    };
    let name = without_array.split_whitespace().last()?;
    let name = name.trim_start_matches('*');
    (!name.is_empty()).then(|| name.to_owned())
}

/// Maps event ids to `"system:name"`, from the formats of a [`TraceMeta`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventNames {
    by_id: BTreeMap<u16, String>,
}

impl EventNames {
    /// Parses every format of `meta`; ftrace's own events are named `ftrace:<name>`.
    /// Two formats with the same id are an error: the records could not be told apart.
    pub fn from_meta(meta: &TraceMeta) -> Result<Self, TraceDatError> {
        let mut names = EventNames::default();
        for text in &meta.ftrace_formats {
            names.insert("ftrace", text)?;
        }
        for (system, formats) in &meta.event_systems {
            for text in formats {
                names.insert(system, text)?;
            }
        }
        Ok(names)
    }

    fn insert(&mut self, system: &str, text: &[u8]) -> Result<(), TraceDatError> {
        let format = parse_event_format(text)?;
        let full = format!("{system}:{}", format.name);
        if let Some(other) = self.by_id.get(&format.id) {
            return Err(TraceDatError::EventFormat(format!(
                "id {} belongs to both {other} and {full}",
                format.id
            )));
        }
        self.by_id.insert(format.id, full);
        Ok(())
    }

    /// `"system:name"` of an event id.
    pub fn name(&self, id: u16) -> Option<&str> {
        self.by_id.get(&id).map(String::as_str)
    }

    /// Number of known events.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True if no format was given.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHED_SWITCH: &str = "name: sched_switch\nID: 372\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
\tfield:__data_loc char[] name;\toffset:24;\tsize:4;\tsigned:0;\n\n\
print fmt: \"prev_comm=%s\", REC->prev_comm\n";

    #[test]
    fn sched_switch_format_gives_name_id_and_fields() {
        let format = parse_event_format(SCHED_SWITCH.as_bytes()).unwrap();

        assert_eq!(format.name, "sched_switch");
        assert_eq!(format.id, 372);
        let names: Vec<_> = format.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["common_type", "common_pid", "prev_comm", "name"]);
        assert_eq!(format.fields[2].decl, "char prev_comm[16]");
        assert_eq!((format.fields[2].offset, format.fields[2].size), (8, 16));
        assert!(format.fields[1].signed);
        assert_eq!(
            format.print_fmt.as_deref(),
            Some("\"prev_comm=%s\", REC->prev_comm")
        );
    }

    #[test]
    fn format_without_id_is_an_error() {
        let err = parse_event_format(b"name: x\nformat:\n").unwrap_err();

        assert!(err.to_string().contains("no `ID:` line"), "{err}");
    }

    #[test]
    fn id_above_u16_is_an_error() {
        assert!(parse_event_format(b"name: x\nID: 70000\n").is_err());
    }

    #[test]
    fn event_names_map_ids_to_system_and_name() {
        let meta = TraceMeta {
            ftrace_formats: vec![b"name: function\nID: 1\n".to_vec()],
            event_systems: vec![("sched".into(), vec![SCHED_SWITCH.as_bytes().to_vec()])],
            ..TraceMeta::default()
        };

        let names = EventNames::from_meta(&meta).unwrap();

        assert_eq!(names.name(1), Some("ftrace:function"));
        assert_eq!(names.name(372), Some("sched:sched_switch"));
        assert_eq!(names.name(2), None);
    }

    #[test]
    fn duplicate_ids_are_an_error() {
        let meta = TraceMeta {
            event_systems: vec![(
                "a".into(),
                vec![b"name: x\nID: 7\n".to_vec(), b"name: y\nID: 7\n".to_vec()],
            )],
            ..TraceMeta::default()
        };

        assert!(EventNames::from_meta(&meta).is_err());
    }
}
