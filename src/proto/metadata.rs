//! Guest files sent as `Metadata` chunks: splitting on the agent, reassembly on
//! the host.
//!
//! `trace.dat` needs guest files (event formats, `kallsyms`, `saved_cmdlines`…)
//! that can be megabytes, while frames stay ≤ `METADATA_CHUNK` of data so pings
//! are not stuck behind them. The agent cuts each file with [`split_metadata`];
//! the host feeds chunks to [`MetadataAssembler`], which enforces the rules of
//! `docs/protocol.md` §4.5 (contiguous offsets, size caps, name syntax) and keeps
//! completed files by name. Names are lookup keys, never host paths; they are
//! validated anyway so no caller is ever tempted to join one to a path.

use std::collections::BTreeMap;

use super::limits::{MAX_METADATA_FILE, MAX_METADATA_TOTAL, MAX_NAME, METADATA_CHUNK};
use super::message::Metadata;

/// Why a metadata chunk or file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata name {name:?} is not a valid key (1..=256 bytes of [A-Za-z0-9_./:-], relative, no empty, '.' or '..' component)")]
    BadName { name: String },

    #[error("metadata file {name:?} is {len} bytes, over the {MAX_METADATA_FILE}-byte limit")]
    FileTooLarge { name: String, len: u64 },

    #[error("metadata files would total {total} bytes, over the {MAX_METADATA_TOTAL}-byte limit")]
    TotalTooLarge { total: u64 },

    #[error("metadata chunk of {name:?} starts at offset {got}, expected {expected}: the agent must send chunks in order")]
    NotContiguous {
        name: String,
        expected: u64,
        got: u64,
    },

    #[error(
        "metadata chunk of {name:?} says the file is {got} bytes, an earlier chunk said {expected}"
    )]
    LengthChanged {
        name: String,
        expected: u64,
        got: u64,
    },

    #[error("metadata chunk of {name:?} ends past the file's {total_len} bytes")]
    PastEnd { name: String, total_len: u64 },

    #[error("metadata chunk of {name:?} is empty but the file is not complete")]
    EmptyChunk { name: String },

    #[error(
        "metadata chunk of {name:?} holds {len} bytes, over the {METADATA_CHUNK}-byte chunk limit"
    )]
    ChunkTooLarge { name: String, len: usize },

    #[error("metadata file {name:?} was already received")]
    Duplicate { name: String },

    #[error("metadata file {name:?} is incomplete: {have} of {total_len} bytes arrived")]
    Incomplete {
        name: String,
        have: u64,
        total_len: u64,
    },
}

/// Checks the name rule: 1..=`MAX_NAME` bytes of `[A-Za-z0-9_./:-]`, not
/// absolute, and no empty, `.` or `..` component.
pub fn validate_name(name: &str) -> Result<(), MetadataError> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_./:-".contains(&b);
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(allowed)
        && name
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if ok {
        Ok(())
    } else {
        Err(MetadataError::BadName {
            name: name.to_owned(),
        })
    }
}

fn len_u64(n: usize) -> u64 {
    u64::try_from(n).expect("usize fits in u64 on supported targets")
}

/// Cuts one file into `Metadata` chunks of at most `METADATA_CHUNK` bytes.
/// An empty file yields one empty chunk, so the receiver still learns of it.
pub fn split_metadata<'a>(
    name: &'a str,
    data: &'a [u8],
) -> Result<MetadataChunks<'a>, MetadataError> {
    validate_name(name)?;
    let total_len = len_u64(data.len());
    if total_len > MAX_METADATA_FILE {
        return Err(MetadataError::FileTooLarge {
            name: name.to_owned(),
            len: total_len,
        });
    }
    Ok(MetadataChunks {
        name,
        data,
        offset: 0,
        done: false,
    })
}

/// Iterator returned by [`split_metadata`].
#[derive(Debug, Clone)]
pub struct MetadataChunks<'a> {
    name: &'a str,
    data: &'a [u8],
    offset: usize,
    done: bool,
}

impl Iterator for MetadataChunks<'_> {
    type Item = Metadata;

    fn next(&mut self) -> Option<Metadata> {
        if self.done {
            return None;
        }
        let end = self.data.len().min(self.offset + METADATA_CHUNK);
        let chunk = Metadata {
            name: self.name.to_owned(),
            total_len: len_u64(self.data.len()),
            offset: len_u64(self.offset),
            data: self.data[self.offset..end].to_vec(),
        };
        self.offset = end;
        self.done = end == self.data.len();
        Some(chunk)
    }
}

/// A file still arriving.
#[derive(Debug)]
struct Partial {
    total_len: u64,
    data: Vec<u8>,
}

/// Reassembles `Metadata` chunks into whole files, enforcing the limits.
#[derive(Debug, Default)]
pub struct MetadataAssembler {
    complete: BTreeMap<String, Vec<u8>>,
    partial: BTreeMap<String, Partial>,
    /// Sum of `total_len` over complete and partial files, reserved when a file
    /// starts, so the total cap holds before any data arrives.
    total: u64,
}

impl MetadataAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one chunk. Returns `true` if it completed its file.
    pub fn push(&mut self, chunk: Metadata) -> Result<bool, MetadataError> {
        let Metadata {
            name,
            total_len,
            offset,
            data,
        } = chunk;
        if data.len() > METADATA_CHUNK {
            return Err(MetadataError::ChunkTooLarge {
                name,
                len: data.len(),
            });
        }
        if self.complete.contains_key(&name) {
            return Err(MetadataError::Duplicate { name });
        }
        let have = match self.partial.get(&name) {
            Some(p) if p.total_len != total_len => {
                return Err(MetadataError::LengthChanged {
                    name,
                    expected: p.total_len,
                    got: total_len,
                })
            }
            Some(p) => len_u64(p.data.len()),
            None => 0,
        };
        if offset != have {
            return Err(MetadataError::NotContiguous {
                name,
                expected: have,
                got: offset,
            });
        }
        let end = offset.checked_add(len_u64(data.len()));
        if end.is_none_or(|end| end > total_len) {
            return Err(MetadataError::PastEnd { name, total_len });
        }
        if data.is_empty() && total_len != 0 {
            return Err(MetadataError::EmptyChunk { name });
        }
        if offset == 0 {
            self.start_file(&name, total_len)?;
        }

        let partial = self
            .partial
            .get_mut(&name)
            .expect("started above or earlier");
        partial.data.extend_from_slice(&data);
        if len_u64(partial.data.len()) < total_len {
            return Ok(false);
        }
        let done = self.partial.remove(&name).expect("present").data;
        self.complete.insert(name, done);
        Ok(true)
    }

    /// Checks name and caps for a new file and reserves its size in the total.
    fn start_file(&mut self, name: &str, total_len: u64) -> Result<(), MetadataError> {
        validate_name(name)?;
        if total_len > MAX_METADATA_FILE {
            return Err(MetadataError::FileTooLarge {
                name: name.to_owned(),
                len: total_len,
            });
        }
        let total = self.total + total_len;
        if total > MAX_METADATA_TOTAL {
            return Err(MetadataError::TotalTooLarge { total });
        }
        self.total = total;
        // Grow with the data rather than trusting total_len for a reservation.
        self.partial.insert(
            name.to_owned(),
            Partial {
                total_len,
                data: Vec::new(),
            },
        );
        Ok(())
    }

    /// True while `name` is half-received.
    pub fn is_partial(&self, name: &str) -> bool {
        self.partial.contains_key(name)
    }

    /// Removes and returns a completed file (its bytes stay counted against the total, and
    /// the name can no longer start a new file of that name: `Duplicate` is not detected
    /// after this, so callers that take files track names themselves).
    pub fn take(&mut self, name: &str) -> Option<Vec<u8>> {
        self.complete.remove(name)
    }

    /// Drops a half-received file and releases its reservation.
    pub fn discard(&mut self, name: &str) {
        if let Some(p) = self.partial.remove(name) {
            self.total = self.total.saturating_sub(p.total_len);
        }
    }

    /// Bytes reserved so far (the sum of `total_len` of every file started and not discarded).
    pub fn reserved(&self) -> u64 {
        self.total
    }

    /// Names of the files still half-received.
    pub fn partial_names(&self) -> Vec<String> {
        self.partial.keys().cloned().collect()
    }

    /// Files completed so far.
    pub fn files(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.complete
    }

    /// True if no file is half-received.
    pub fn is_idle(&self) -> bool {
        self.partial.is_empty()
    }

    /// All files, or `Incomplete` naming the first file still missing bytes.
    pub fn finish(self) -> Result<BTreeMap<String, Vec<u8>>, MetadataError> {
        if let Some((name, p)) = self.partial.into_iter().next() {
            return Err(MetadataError::Incomplete {
                name,
                have: len_u64(p.data.len()),
                total_len: p.total_len,
            });
        }
        Ok(self.complete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(name: &str, total_len: u64, offset: u64, data: &[u8]) -> Metadata {
        Metadata {
            name: name.to_owned(),
            total_len,
            offset,
            data: data.to_vec(),
        }
    }

    #[test]
    fn multi_chunk_file_is_reassembled() {
        let file: Vec<u8> = (0..METADATA_CHUNK * 2 + 10)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let chunks: Vec<_> = split_metadata("kallsyms", &file).unwrap().collect();
        assert_eq!(chunks.len(), 3);

        let mut asm = MetadataAssembler::new();
        let done: Vec<bool> = chunks.into_iter().map(|c| asm.push(c).unwrap()).collect();

        assert_eq!(done, [false, false, true]);
        assert_eq!(asm.finish().unwrap()["kallsyms"], file);
    }

    #[test]
    fn interleaved_files_and_an_empty_file_are_reassembled() {
        let mut asm = MetadataAssembler::new();
        asm.push(chunk("uname", 6, 0, b"Lin")).unwrap();
        asm.push(chunk("events/header_page", 2, 0, b"hp")).unwrap();
        asm.push(chunk("saved_tgids", 0, 0, b"")).unwrap();
        asm.push(chunk("uname", 6, 3, b"ux\n")).unwrap();

        let files = asm.finish().unwrap();
        assert_eq!(files["uname"], b"Linux\n");
        assert_eq!(files["events/header_page"], b"hp");
        assert_eq!(files["saved_tgids"], b"");
    }

    #[test]
    fn split_of_empty_file_is_one_empty_chunk() {
        let chunks: Vec<_> = split_metadata("saved_tgids", b"").unwrap().collect();
        assert_eq!(chunks, [chunk("saved_tgids", 0, 0, b"")]);
    }

    #[test]
    fn out_of_order_offset_is_refused() {
        let mut asm = MetadataAssembler::new();
        asm.push(chunk("kallsyms", 10, 0, b"abc")).unwrap();
        let err = asm.push(chunk("kallsyms", 10, 5, b"fgh")).unwrap_err();
        assert_eq!(
            err,
            MetadataError::NotContiguous {
                name: "kallsyms".into(),
                expected: 3,
                got: 5
            }
        );
    }

    #[test]
    fn first_chunk_must_start_at_zero() {
        let mut asm = MetadataAssembler::new();
        let err = asm.push(chunk("kallsyms", 10, 3, b"abc")).unwrap_err();
        assert!(matches!(
            err,
            MetadataError::NotContiguous {
                expected: 0,
                got: 3,
                ..
            }
        ));
    }

    #[test]
    fn changed_total_len_is_refused() {
        let mut asm = MetadataAssembler::new();
        asm.push(chunk("kallsyms", 10, 0, b"abc")).unwrap();
        let err = asm.push(chunk("kallsyms", 11, 3, b"d")).unwrap_err();
        assert!(matches!(
            err,
            MetadataError::LengthChanged {
                expected: 10,
                got: 11,
                ..
            }
        ));
    }

    #[test]
    fn chunk_past_the_end_is_refused() {
        let mut asm = MetadataAssembler::new();
        let err = asm.push(chunk("uname", 2, 0, b"abc")).unwrap_err();
        assert!(matches!(err, MetadataError::PastEnd { total_len: 2, .. }));
    }

    #[test]
    fn empty_chunk_of_nonempty_file_is_refused() {
        let mut asm = MetadataAssembler::new();
        let err = asm.push(chunk("uname", 2, 0, b"")).unwrap_err();
        assert!(matches!(err, MetadataError::EmptyChunk { .. }));
    }

    #[test]
    fn oversized_file_is_refused_before_data_arrives() {
        let mut asm = MetadataAssembler::new();
        let err = asm
            .push(chunk("kallsyms", MAX_METADATA_FILE + 1, 0, b"a"))
            .unwrap_err();
        assert!(matches!(err, MetadataError::FileTooLarge { .. }));
    }

    #[test]
    fn total_over_the_cap_is_refused() {
        let mut asm = MetadataAssembler::new();
        let files = MAX_METADATA_TOTAL / MAX_METADATA_FILE;
        for i in 0..files {
            asm.push(chunk(&format!("f{i}"), MAX_METADATA_FILE, 0, b"a"))
                .unwrap();
        }
        let err = asm.push(chunk("one_more", 1, 0, b"a")).unwrap_err();
        assert_eq!(
            err,
            MetadataError::TotalTooLarge {
                total: MAX_METADATA_TOTAL + 1
            }
        );
    }

    #[test]
    fn duplicate_file_is_refused() {
        let mut asm = MetadataAssembler::new();
        asm.push(chunk("uname", 1, 0, b"L")).unwrap();
        let err = asm.push(chunk("uname", 1, 0, b"L")).unwrap_err();
        assert!(matches!(err, MetadataError::Duplicate { .. }));
    }

    #[test]
    fn incomplete_file_fails_finish() {
        let mut asm = MetadataAssembler::new();
        asm.push(chunk("uname", 4, 0, b"Li")).unwrap();
        assert!(!asm.is_idle());
        let err = asm.finish().unwrap_err();
        assert!(matches!(
            err,
            MetadataError::Incomplete {
                have: 2,
                total_len: 4,
                ..
            }
        ));
    }

    #[test]
    fn bad_names_are_refused() {
        let long = "a".repeat(MAX_NAME + 1);
        let bad = [
            "",
            "/etc/passwd",
            "../x",
            "events/../../x",
            "events/./x",
            "events//x",
            "events/",
            "a b",
            "a\\b",
            "ümlaut",
            "nul\0",
            long.as_str(),
        ];
        for name in bad {
            let mut asm = MetadataAssembler::new();
            let err = asm.push(chunk(name, 1, 0, b"x")).unwrap_err();
            assert!(matches!(err, MetadataError::BadName { .. }), "{name:?}");
            assert!(split_metadata(name, b"x").is_err(), "{name:?}");
        }
    }

    #[test]
    fn documented_names_are_accepted() {
        let names = [
            "events/header_page",
            "events/header_event",
            "events/sched/sched_switch/format",
            "events/ftrace/print/format",
            "kallsyms",
            "printk_formats",
            "saved_cmdlines",
            "saved_tgids",
            "uname",
            "trace_clock",
            "events/a-b:c.d/x",
        ];
        for name in names {
            validate_name(name).unwrap_or_else(|e| panic!("{e}"));
        }
        validate_name(&"a".repeat(MAX_NAME)).unwrap();
    }
}
