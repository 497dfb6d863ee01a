//! The host's one boundary with the untrusted guest: everything the agent sends is checked and
//! cleaned here, once, and turned into plain data that the code behind it may trust.
//!
//! The frame layer (`proto`) already bounds every length. This layer checks meaning: a page
//! size the page walker can use, CPU lists that are unique and name CPUs the domain has,
//! counters that cannot overflow a sum, strings that cannot drive a terminal, metadata that is
//! one of the documented files, each at most once, within its own size cap, and event formats
//! that `trace-cmd` can parse. What breaks a rule is dropped with a [`GuestProblems`] note
//! (the run's exit code then says the guest misbehaved) instead of ending the recording, so
//! whatever good data arrived is still written. Only a page size the host cannot work with at
//! all is fatal ([`GuestError`]).

use std::collections::{BTreeMap, BTreeSet};

use crate::proto::limits::{
    MAX_BUFFER_KB, MAX_EVENT_FORMAT, MAX_GUEST_PROBLEMS, MAX_METADATA_FILES, MAX_METADATA_TOTAL,
    MAX_SMALL_METADATA, MAX_SYMBOL_METADATA,
};
use crate::proto::{CpuStopped, HelloReply, Metadata, MetadataAssembler, Started, Stopped};
use crate::proto::{MetadataError, StopReason};
use crate::tracedat::sanitize::{check_header_text, sanitize_printk_formats, FormatSet};
use crate::tracedat::{MAX_PAGE_SIZE, MIN_PAGE_SIZE};

/// A guest answer the host cannot work with at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestError {
    #[error("the guest agent reported a page size of {0} bytes: it must be a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}; the guest is not a genuine tvctl-agent or is broken (reinstall tvctl-agent)")]
    BadPageSize(u32),
    #[error("the guest's ring-buffer headers are unusable ({0}), so none of its pages can be read safely; nothing was written. Check the guest kernel, or reinstall tvctl-agent")]
    BadHeaders(String),
}

/// Escapes everything in `text` that could act on a terminal or fake a line of output: C0 and
/// C1 control characters (ESC, BEL, CR, LF…), DEL, and the Unicode bidirectional overrides.
/// The result is printable, one line, and still readable (`\x1b`, `\n`, `\u{202e}`).
pub fn clean_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() || bidi => {
                let code = u32::from(c);
                if code < 0x100 {
                    out.push_str(&format!("\\x{code:02x}"));
                } else {
                    out.push_str(&format!("\\u{{{code:x}}}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Like [`clean_text`] for multi-line texts that go into files (`per_cpu/cpuN/stats`): lines
/// stay lines, every other control character is escaped.
pub fn clean_lines(text: &str) -> String {
    text.split('\n')
        .map(clean_text)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Notes on what the guest did wrong, in arrival order; bounded in number and size.
#[derive(Debug, Default, Clone)]
pub struct GuestProblems {
    notes: Vec<String>,
    count: u64,
}

impl GuestProblems {
    /// Records one problem (`text` is ours, any guest text in it already cleaned).
    pub fn note(&mut self, text: String) {
        self.count = self.count.saturating_add(1);
        if self.notes.len() < MAX_GUEST_PROBLEMS {
            self.notes.push(text);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The notes kept, plus one line for those that were not.
    pub fn to_notes(&self) -> Vec<String> {
        let mut notes = self.notes.clone();
        let kept = u64::try_from(self.notes.len()).unwrap_or(u64::MAX);
        if self.count > kept {
            notes.push(format!(
                "... and {} more problems with what the guest sent",
                self.count - kept
            ));
        }
        notes
    }

    /// True once the guest has broken so many rules that listening further is pointless.
    pub fn too_many(&self) -> bool {
        self.count >= GIVE_UP_AFTER
    }
}

/// After this many problems the host stops the recording and keeps what it has.
pub const GIVE_UP_AFTER: u64 = 1000;

/// `HelloReply`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestHello {
    pub page_size: u32,
    pub cpus: u32,
    pub agent_version: String,
    pub kernel_release: String,
    pub trace_clocks: Vec<String>,
}

impl GuestHello {
    pub fn check(reply: &HelloReply) -> Result<GuestHello, GuestError> {
        let ps = reply.page_size;
        if !ps.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&ps) {
            return Err(GuestError::BadPageSize(ps));
        }
        Ok(GuestHello {
            page_size: ps,
            cpus: reply.cpus,
            agent_version: clean_text(&reply.agent_version),
            kernel_release: clean_text(&reply.kernel_release),
            trace_clocks: reply.trace_clocks.iter().map(|c| clean_text(c)).collect(),
        })
    }
}

/// `Started`, checked: the CPUs are unique, sorted and each has a data FIFO on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestStarted {
    pub instance: String,
    pub events: Vec<String>,
    pub cpus: Vec<u32>,
    pub buffer_kb: u32,
    pub clock: String,
    pub splice: bool,
    pub note: String,
}

impl GuestStarted {
    /// `fifo_cpus` are the CPUs the host has FIFOs for (the domain's vCPUs).
    pub fn check(s: &Started, fifo_cpus: &[u32], problems: &mut GuestProblems) -> GuestStarted {
        let mut cpus = BTreeSet::new();
        for &cpu in &s.cpus {
            if !fifo_cpus.contains(&cpu) {
                problems.note(format!(
                    "the agent said it records CPU {cpu}, which the domain has no channel for; ignored"
                ));
            } else if !cpus.insert(cpu) {
                problems.note(format!(
                    "the agent listed CPU {cpu} twice in Started; counted once"
                ));
            }
        }
        if s.buffer_kb > MAX_BUFFER_KB {
            problems.note(format!(
                "the agent reported a buffer of {} KiB, over the {MAX_BUFFER_KB} KiB limit",
                s.buffer_kb
            ));
        }
        GuestStarted {
            instance: clean_text(&s.instance),
            events: s.events.iter().map(|e| clean_text(e)).collect(),
            cpus: cpus.into_iter().collect(),
            buffer_kb: s.buffer_kb.min(MAX_BUFFER_KB),
            clock: clean_text(&s.clock),
            splice: s.splice,
            note: clean_text(&s.note),
        }
    }
}

/// One CPU's final numbers, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuCounts {
    pub cpu: u32,
    pub bytes: u64,
    pub entries: u64,
    pub overrun: u64,
    pub commit_overrun: u64,
    pub dropped_events: u64,
    pub read_events: u64,
    /// `per_cpu/cpuN/stats`, control characters escaped (lines kept).
    pub stats_text: String,
}

impl CpuCounts {
    /// Events the ring buffer lost, as the kernel counts them; saturates, never wraps.
    pub fn lost(&self) -> u64 {
        self.overrun
            .saturating_add(self.commit_overrun)
            .saturating_add(self.dropped_events)
    }

    fn from_wire(c: &CpuStopped) -> CpuCounts {
        CpuCounts {
            cpu: c.cpu,
            bytes: c.bytes,
            entries: c.entries,
            overrun: c.overrun,
            commit_overrun: c.commit_overrun,
            dropped_events: c.dropped_events,
            read_events: c.read_events,
            stats_text: clean_lines(&c.stats_text),
        }
    }
}

/// `Stopped`, checked: one entry per recorded CPU at most, only CPUs of `Started`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestStopped {
    pub reason: StopReason,
    pub command_status: Option<i32>,
    pub cpus: BTreeMap<u32, CpuCounts>,
}

impl GuestStopped {
    pub fn check(s: &Stopped, started: &[u32], problems: &mut GuestProblems) -> GuestStopped {
        let mut cpus = BTreeMap::new();
        for c in &s.cpus {
            if !started.contains(&c.cpu) {
                problems.note(format!(
                    "the agent sent final counts for CPU {}, which it did not record; ignored",
                    c.cpu
                ));
            } else if let std::collections::btree_map::Entry::Vacant(slot) = cpus.entry(c.cpu) {
                slot.insert(CpuCounts::from_wire(c));
            } else {
                problems.note(format!(
                    "the agent sent final counts for CPU {} twice; the first kept",
                    c.cpu
                ));
            }
        }
        for cpu in started {
            if !cpus.contains_key(cpu) {
                problems.note(format!(
                    "the agent sent no final count for CPU {cpu}: its stream cannot be checked"
                ));
            }
        }
        let command_status = match s.command_status {
            Some(st) if !(-255..=255).contains(&st) => {
                problems.note(format!("the agent reported command status {st}; ignored"));
                None
            }
            other => other,
        };
        GuestStopped {
            reason: s.reason,
            command_status,
            cpus,
        }
    }
}

/// What kind of file a metadata name is, which sets its size cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetadataKind {
    /// `events/header_page`, `events/header_event`, `events/SYS/EVENT/format`.
    Format,
    /// `kallsyms`, `printk_formats`, `saved_cmdlines`, `saved_tgids`.
    Symbols,
    /// `uname`, `trace_clock`.
    Small,
}

/// The documented metadata names (docs/protocol.md §4.5), and their kind.
fn metadata_kind(name: &str) -> Option<MetadataKind> {
    match name {
        "events/header_page" | "events/header_event" => return Some(MetadataKind::Format),
        "kallsyms" | "printk_formats" | "saved_cmdlines" | "saved_tgids" => {
            return Some(MetadataKind::Symbols)
        }
        "uname" | "trace_clock" => return Some(MetadataKind::Small),
        _ => {}
    }
    let ident = |s: &str| {
        !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    let rest = name.strip_prefix("events/")?.strip_suffix("/format")?;
    let (system, event) = rest.split_once('/')?;
    (ident(system) && ident(event)).then_some(MetadataKind::Format)
}

fn cap_of(kind: MetadataKind) -> u64 {
    match kind {
        MetadataKind::Format => MAX_EVENT_FORMAT,
        MetadataKind::Symbols => MAX_SYMBOL_METADATA,
        MetadataKind::Small => MAX_SMALL_METADATA,
    }
}

/// Receives `Metadata` chunks: only documented names, each file once, within its cap and the
/// totals (`MAX_METADATA_FILES` files, `MAX_METADATA_TOTAL` bytes reserved at a file's first
/// chunk). A file that breaks a rule is dropped with a note; the others are kept. Completed
/// event formats, headers and `printk_formats` pass [`crate::tracedat::sanitize`] before they
/// are accepted: nothing reaches a trace.dat that could crash or hang trace-cmd.
#[derive(Debug, Default)]
pub struct MetadataInbox {
    /// The formats admitted so far (ids and names unique, common fields alike): the pages are
    /// checked against them before they are written.
    formats: FormatSet,
    assembler: MetadataAssembler,
    /// Names seen (complete, partial or dropped): a name counts once, whatever became of it.
    seen: BTreeSet<String>,
    /// Names dropped: their later chunks are ignored quietly.
    dropped: BTreeSet<String>,
    files: BTreeMap<String, Vec<u8>>,
}

impl MetadataInbox {
    pub fn new() -> MetadataInbox {
        MetadataInbox::default()
    }

    /// Takes one chunk.
    pub fn push(&mut self, chunk: Metadata, problems: &mut GuestProblems) {
        let name = chunk.name.clone();
        if self.dropped.contains(&name) {
            return;
        }
        let first = chunk.offset == 0 && !self.assembler.is_partial(&name);
        if first {
            if let Err(why) = self.admit(&chunk) {
                problems.note(why);
                // Remember a documented name, so that its later chunks are dropped quietly,
                // only while the table has room: a flood of names must cost nothing.
                if metadata_kind(&name).is_some()
                    && !self.seen.contains(&name)
                    && self.seen.len() < MAX_METADATA_FILES
                {
                    self.seen.insert(name.clone());
                    self.dropped.insert(name);
                }
                return;
            }
            self.seen.insert(name.clone());
        }
        match self.assembler.push(chunk) {
            Ok(false) => {}
            Ok(true) => {
                let data = self.assembler.take(&name).unwrap_or_default();
                self.accept(name, data, problems);
            }
            Err(e) => {
                problems.note(format!(
                    "guest metadata dropped: {}",
                    clean_text(&e.to_string())
                ));
                if let MetadataError::Duplicate { .. } = e {
                    return;
                }
                self.assembler.discard(&name);
                if metadata_kind(&name).is_some() {
                    self.dropped.insert(name);
                }
            }
        }
    }

    /// Checks a file's first chunk against the name rules and caps.
    fn admit(&self, chunk: &Metadata) -> Result<(), String> {
        let shown = clean_text(&chunk.name);
        let Some(kind) = metadata_kind(&chunk.name) else {
            return Err(format!(
                "guest metadata {shown:?} dropped: not a documented file name"
            ));
        };
        if self.seen.contains(&chunk.name) {
            return Err(format!(
                "guest metadata {shown:?} sent twice; the first kept"
            ));
        }
        if self.seen.len() >= MAX_METADATA_FILES {
            return Err(format!(
                "guest metadata {shown:?} dropped: more than {MAX_METADATA_FILES} files"
            ));
        }
        let cap = cap_of(kind);
        if chunk.total_len > cap {
            return Err(format!(
                "guest metadata {shown:?} dropped: {} bytes, over its {cap}-byte limit",
                chunk.total_len
            ));
        }
        if self.assembler.reserved().saturating_add(chunk.total_len) > MAX_METADATA_TOTAL {
            return Err(format!(
                "guest metadata {shown:?} dropped: the files would exceed {MAX_METADATA_TOTAL} bytes in all"
            ));
        }
        Ok(())
    }

    /// A complete file: formats, headers and printk formats must pass the sanitizer first.
    fn accept(&mut self, name: String, data: Vec<u8>, problems: &mut GuestProblems) {
        let checked = match (name.as_str(), metadata_kind(&name)) {
            ("events/header_page" | "events/header_event", _) => check_header_text(&data)
                .map(|()| data)
                .map_err(|e| e.to_string()),
            ("printk_formats", _) => {
                let kept = sanitize_printk_formats(&data);
                if kept.dropped_lines > 0 {
                    problems.note(format!(
                        "guest printk_formats: {} lines dropped (not the kernel's form, or a width that hangs trace-cmd)",
                        kept.dropped_lines
                    ));
                }
                Ok(kept.text)
            }
            (n, Some(MetadataKind::Format)) => {
                let system = n
                    .strip_prefix("events/")
                    .and_then(|r| r.split_once('/'))
                    .map_or("", |(system, _)| system);
                self.formats
                    .admit(system, &data)
                    .map(|_| ())
                    .map(|()| data)
                    .map_err(|e| e.to_string())
            }
            _ => Ok(data),
        };
        match checked {
            Ok(data) => {
                self.files.insert(name, data);
            }
            Err(why) => problems.note(format!(
                "guest metadata {:?} dropped: {}",
                clean_text(&name),
                clean_text(&why)
            )),
        }
    }

    /// The files accepted so far.
    pub fn files(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.files
    }

    /// The accepted files and formats; a file still half-received is noted and left out.
    pub fn finish(self, problems: &mut GuestProblems) -> (BTreeMap<String, Vec<u8>>, FormatSet) {
        for name in self.assembler.partial_names() {
            problems.note(format!(
                "guest metadata {:?} incomplete; left out",
                clean_text(&name)
            ));
        }
        (self.files, self.formats)
    }
}

#[cfg(test)]
mod tests;
