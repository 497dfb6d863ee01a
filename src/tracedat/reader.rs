//! Reads the version-6 trace.dat files the writer produces (and trace-cmd's own v6 files, as far
//! as they use the same sections) back into a [`TraceMeta`] and per-CPU page extents.
//!
//! Every length and count read from the file is checked against the bytes that remain in the
//! file and against a fixed cap before anything is allocated, so a corrupt or hostile file
//! yields [`TraceDatError::Corrupt`], never a huge allocation or a panic.

use super::count::EventCounts;
use super::page::PageLayout;
use super::{
    option_id, CpuExtent, GuestOption, SyncOptionError, TimeShift, TraceDatError, TraceMeta,
    Tsc2Nsec, MAGIC, MAX_CPUS, MAX_OPTION_SIZE, MAX_PAGE_SIZE, MIN_PAGE_SIZE,
};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Caps on what one section may claim, far above anything a real guest produces.
// The same caps as the protocol's (src/proto/limits.rs): a file tvctl wrote is always one it
// can read back.
pub(super) const MAX_HEADER_TEXT: u64 = crate::proto::limits::MAX_EVENT_FORMAT;
const MAX_FORMAT_TEXT: u64 = crate::proto::limits::MAX_EVENT_FORMAT;
const MAX_FORMATS: u32 = 1 << 16;
const MAX_SYSTEM_NAME: usize = 256;
pub(super) const MAX_KALLSYMS: u64 = crate::proto::limits::MAX_SYMBOL_METADATA;
pub(super) const MAX_PRINTK_FORMATS: u64 = crate::proto::limits::MAX_SYMBOL_METADATA;
pub(super) const MAX_CMDLINES: u64 = crate::proto::limits::MAX_SYMBOL_METADATA;
pub(super) const MAX_OPTIONS: usize = 1 << 16;
const MAX_TRACE_CLOCK: u64 = 1 << 16;

/// An open trace.dat: its metadata, and where each CPU's pages are.
#[derive(Debug)]
pub struct TraceDatFile {
    file: File,
    meta: TraceMeta,
    layout: PageLayout,
    cpus: Vec<CpuExtent>,
    other_options: Vec<(u16, Vec<u8>)>,
    chunks: Option<Vec<Vec<Chunk>>>,
}

impl TraceDatFile {
    /// Opens and parses everything but the pages.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, TraceDatError> {
        let path = path.as_ref();
        let file = File::open(path)
            .map_err(|e| TraceDatError::io(format!("open {}", path.display()), e))?;
        Self::from_file(file)
    }

    /// Parses an already open file, reading it from offset 0.
    pub fn from_file(file: File) -> Result<Self, TraceDatError> {
        let file_len = file
            .metadata()
            .map_err(|e| TraceDatError::io("read the trace.dat's size", e))?
            .len();
        (&file)
            .seek(SeekFrom::Start(0))
            .map_err(|e| TraceDatError::io("seek to the start of the trace.dat", e))?;
        let mut input = Input {
            r: BufReader::with_capacity(1 << 16, &file),
            pos: 0,
            len: file_len,
        };
        let parsed = parse(&mut input, &file)?;
        drop(input);
        Ok(TraceDatFile {
            file,
            meta: parsed.meta,
            layout: parsed.layout,
            cpus: parsed.cpus,
            other_options: parsed.other_options,
            chunks: parsed.chunks,
        })
    }

    pub fn meta(&self) -> &TraceMeta {
        &self.meta
    }

    /// The page layout from the file's `header_page`, to walk its pages.
    pub fn layout(&self) -> &PageLayout {
        &self.layout
    }

    /// True when the CPU data is compressed (version 7 with zstd): then a [`CpuExtent`]'s
    /// `offset` is where the CPU's chunks start and its `size` the bytes of pages they hold
    /// once decompressed.
    pub fn compressed(&self) -> bool {
        self.chunks.is_some()
    }

    /// One entry per CPU, in CPU order.
    pub fn cpus(&self) -> &[CpuExtent] {
        &self.cpus
    }

    /// Options other than those in [`TraceMeta`], as `(id, data)` in file order.
    pub fn other_options(&self) -> &[(u16, Vec<u8>)] {
        &self.other_options
    }

    /// The pages of one CPU, read one at a time (compressed data is decompressed first).
    pub fn pages(&self, cpu: usize) -> Result<CpuPages<'_>, TraceDatError> {
        let extent = self.extent(cpu)?;
        let memory = match self.cpu_chunks(cpu) {
            Some(_) => Some(self.read_cpu_data(cpu)?),
            None => None,
        };
        let (next, end) = match &memory {
            Some(data) => (0, u64::try_from(data.len()).unwrap_or(u64::MAX)),
            None => (extent.offset, extent.offset + extent.size),
        };
        Ok(CpuPages {
            file: &self.file,
            memory,
            next,
            end,
            page_size: self.layout.page_size(),
        })
    }

    fn cpu_chunks(&self, cpu: usize) -> Option<&[Chunk]> {
        self.chunks
            .as_ref()
            .and_then(|c| c.get(cpu))
            .map(Vec::as_slice)
    }

    /// All pages of one CPU in one buffer (as large as the CPU's data, which the file holds).
    pub fn read_cpu_data(&self, cpu: usize) -> Result<Vec<u8>, TraceDatError> {
        let extent = self.extent(cpu)?;
        if let Some(chunks) = self.cpu_chunks(cpu) {
            return super::reader_v7::decompress_chunks(&self.file, chunks, extent.size, cpu);
        }
        let len = usize::try_from(extent.size).map_err(|_| {
            TraceDatError::Unsupported(format!("CPU {cpu} has more data than fits in memory"))
        })?;
        let mut data = vec![0; len];
        self.file
            .read_exact_at(&mut data, extent.offset)
            .map_err(|e| TraceDatError::io(format!("read CPU {cpu}'s pages"), e))?;
        Ok(data)
    }

    /// Counts the events of one CPU, a page at a time.
    pub fn count_events(&self, cpu: usize) -> Result<EventCounts, TraceDatError> {
        let mut counts = EventCounts::default();
        for page in self.pages(cpu)? {
            counts.add_page(&self.layout, &page?)?;
        }
        Ok(counts)
    }

    fn extent(&self, cpu: usize) -> Result<CpuExtent, TraceDatError> {
        self.cpus.get(cpu).copied().ok_or_else(|| {
            TraceDatError::Unsupported(format!(
                "CPU {cpu} asked for, the file has {} CPUs",
                self.cpus.len()
            ))
        })
    }
}

/// Iterator over one CPU's pages, each `page_size` bytes.
#[derive(Debug)]
pub struct CpuPages<'f> {
    file: &'f File,
    /// Decompressed data of a compressed CPU (then `next`/`end` index it).
    memory: Option<Vec<u8>>,
    next: u64,
    end: u64,
    page_size: usize,
}

impl Iterator for CpuPages<'_> {
    type Item = Result<Vec<u8>, TraceDatError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        if let Some(data) = &self.memory {
            let at = usize::try_from(self.next).ok()?;
            let page = data.get(at..at.checked_add(self.page_size)?)?.to_vec();
            self.next += u64::try_from(self.page_size).ok()?;
            return Some(Ok(page));
        }
        let mut page = vec![0; self.page_size];
        let at = self.next;
        // The reader checked that extents are whole pages inside the file.
        self.next = self
            .end
            .min(at.saturating_add(u64::try_from(self.page_size).ok()?));
        Some(
            self.file
                .read_exact_at(&mut page, at)
                .map(|()| page)
                .map_err(|e| TraceDatError::io(format!("read the page at byte {at}"), e)),
        )
    }
}

pub(super) struct Parsed {
    pub(super) meta: TraceMeta,
    pub(super) layout: PageLayout,
    pub(super) cpus: Vec<CpuExtent>,
    pub(super) other_options: Vec<(u16, Vec<u8>)>,
    /// Version 7 with compressed CPU data: each CPU's chunks (empty for a CPU without data).
    pub(super) chunks: Option<Vec<Vec<Chunk>>>,
}

/// One compressed chunk of a CPU's pages (version 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Chunk {
    /// Where its zstd frame starts.
    pub(super) offset: u64,
    pub(super) csize: u32,
    /// Whole pages once decompressed.
    pub(super) usize: u32,
}

fn parse(input: &mut Input<BufReader<&File>>, file: &File) -> Result<Parsed, TraceDatError> {
    if input.len < 10 || input.bytes(10, 10, "magic")? != MAGIC {
        return Err(input.corrupt_at(0, "no trace.dat magic: this is not a trace.dat file"));
    }
    let version = input.c_string(16, "version")?;
    let v7 = match version.as_slice() {
        b"6" => false,
        b"7" => true,
        other => {
            return Err(TraceDatError::Unsupported(format!(
                "version {:?}",
                String::from_utf8_lossy(other)
            )))
        }
    };
    if input.u8()? != 0 {
        return Err(TraceDatError::Unsupported("big-endian file".into()));
    }
    let long_size = input.u8()?;
    if long_size != 4 && long_size != 8 {
        return Err(input.corrupt(format!("sizeof(long) is {long_size}, not 4 or 8")));
    }
    let page_size = input.u32()?;
    if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(input.corrupt(format!("page size {page_size} is impossible")));
    }
    if v7 {
        return super::reader_v7::parse(input, file, long_size, page_size);
    }

    let mut meta = TraceMeta {
        page_size,
        ..TraceMeta::default()
    };
    input.expect(b"header_page\0")?;
    meta.header_page = input.text_u64(MAX_HEADER_TEXT, "header_page")?;
    input.expect(b"header_event\0")?;
    meta.header_event = input.text_u64(MAX_HEADER_TEXT, "header_event")?;

    meta.ftrace_formats = input.ftrace_formats()?;
    meta.event_systems = input.event_formats()?;
    meta.kallsyms = input.text_u32(MAX_KALLSYMS, "kallsyms")?;
    meta.printk_formats = input.text_u32(MAX_PRINTK_FORMATS, "printk_formats")?;
    meta.saved_cmdlines = input.text_u64(MAX_CMDLINES, "saved_cmdlines")?;
    let ncpus = input.u32()?;
    let ncpus = usize::try_from(ncpus)
        .ok()
        .filter(|n| (1..=MAX_CPUS).contains(n))
        .ok_or_else(|| input.corrupt(format!("{ncpus} CPUs")))?;

    let mut other_options = Vec::new();
    let mut has_clock_option = false;
    let mut tag = input.bytes(10, 10, "section tag")?;
    if tag == b"options  \0" {
        loop {
            let id = input.u16()?;
            if id == option_id::DONE {
                break;
            }
            if other_options.len() + meta.cpu_stats.len() + meta.guests.len() >= MAX_OPTIONS {
                return Err(input.corrupt(format!("more than {MAX_OPTIONS} options")));
            }
            let size = u64::from(input.u32()?);
            let data_at = input.pos;
            let data = input.bytes(size, MAX_OPTION_SIZE, "option")?;
            has_clock_option |= id == option_id::TRACECLOCK;
            if let Some(data) = meta_option(&mut meta, id, data, data_at)? {
                other_options.push((id, data));
            }
        }
        tag = input.bytes(10, 10, "section tag")?;
    }
    if tag != b"flyrecord\0" {
        return Err(TraceDatError::Unsupported(format!(
            "data section {:?}: only flyrecord files are read",
            String::from_utf8_lossy(&tag)
        )));
    }

    let mut cpus = Vec::new();
    for cpu in 0..ncpus {
        let offset = input.u64()?;
        let size = input.u64()?;
        let fits = offset.checked_add(size).is_some_and(|end| end <= input.len);
        if !fits {
            return Err(input.corrupt(format!(
                "CPU {cpu}'s {size} bytes at {offset} lie beyond the file's {} bytes",
                input.len
            )));
        }
        if size % u64::from(page_size) != 0 || (size > 0 && offset % u64::from(page_size) != 0) {
            return Err(input.corrupt(format!(
                "CPU {cpu}'s {size} bytes at {offset} are not whole aligned pages"
            )));
        }
        cpus.push(CpuExtent { offset, size });
    }
    if has_clock_option {
        let text = input.text_u64(MAX_TRACE_CLOCK, "trace_clock")?;
        meta.trace_clock = Some(input.utf8(text, "trace_clock")?);
    }
    let header_end = input.pos;
    if let Some((cpu, extent)) = cpus
        .iter()
        .enumerate()
        .find(|(_, e)| e.size > 0 && e.offset < header_end)
    {
        return Err(input.corrupt(format!(
            "CPU {cpu}'s data at {} overlaps the header ending at {header_end}",
            extent.offset
        )));
    }

    let layout = checked_layout(&meta, ncpus, long_size)?;
    Ok(Parsed {
        meta,
        layout,
        cpus,
        other_options,
        chunks: None,
    })
}

/// Files one option into `meta` (UNAME, TRACECLOCK, TRACEID, CPUSTAT, GUEST, TIME_SHIFT,
/// TSC2NSEC: the same in both versions); gives back the data of any other option. `at` is
/// where the option's data starts, for errors.
pub(super) fn meta_option(
    meta: &mut TraceMeta,
    id: u16,
    data: Vec<u8>,
    at: u64,
) -> Result<Option<Vec<u8>>, TraceDatError> {
    let corrupt = |what: String| TraceDatError::Corrupt { offset: at, what };
    let bad = |e: SyncOptionError| corrupt(e.to_string());
    let twice = |name: &str| corrupt(format!("a second {name} option"));
    let text = |data: Vec<u8>, what: &str| -> Result<String, TraceDatError> {
        let mut data = data;
        if data.last() == Some(&0) {
            data.pop();
        }
        if data.contains(&0) {
            return Err(corrupt(format!(
                "{what} option holds a NUL inside its text"
            )));
        }
        String::from_utf8(data).map_err(|_| corrupt(format!("{what} is not UTF-8")))
    };
    match id {
        option_id::UNAME => meta.uname = Some(text(data, "UNAME")?),
        option_id::TRACECLOCK => meta.trace_clock = Some(text(data, "TRACECLOCK")?),
        option_id::TRACEID => {
            let bytes: [u8; 8] = data
                .as_slice()
                .try_into()
                .map_err(|_| corrupt(format!("TRACEID of {} bytes, not 8", data.len())))?;
            meta.trace_id = Some(u64::from_le_bytes(bytes));
        }
        option_id::CPUSTAT => meta.cpu_stats.push(text(data, "CPUSTAT")?),
        option_id::GUEST => meta.guests.push(GuestOption::decode(&data).map_err(bad)?),
        option_id::TIME_SHIFT => {
            let shift = TimeShift::decode(&data).map_err(bad)?;
            if meta.time_shift.replace(shift).is_some() {
                return Err(twice("TIME_SHIFT"));
            }
        }
        option_id::TSC2NSEC => {
            let tsc2nsec = Tsc2Nsec::decode(&data).map_err(bad)?;
            if meta.tsc2nsec.replace(tsc2nsec).is_some() {
                return Err(twice("TSC2NSEC"));
            }
        }
        _ => return Ok(Some(data)),
    }
    Ok(None)
}

/// The page layout of `meta`, once it agrees with the file: a TIME_SHIFT option with one
/// sample list per CPU, and header_page's `commit` as wide as the file's sizeof(long).
pub(super) fn checked_layout(
    meta: &TraceMeta,
    ncpus: usize,
    long_size: u8,
) -> Result<PageLayout, TraceDatError> {
    if let Some(shift) = &meta.time_shift {
        if shift.cpus().len() != ncpus {
            let e = SyncOptionError::TimeShiftCpuCount {
                option: shift.cpus().len(),
                file: ncpus,
            };
            return Err(TraceDatError::Corrupt {
                offset: 0,
                what: e.to_string(),
            });
        }
    }
    let layout = PageLayout::from_meta(meta)?;
    if layout.long_size() != usize::from(long_size) {
        return Err(TraceDatError::Corrupt {
            offset: 13,
            what: format!(
                "sizeof(long) is {long_size} but header_page's commit has {} bytes",
                layout.long_size()
            ),
        });
    }
    Ok(layout)
}

/// System name and its events' formats, as [`TraceMeta::event_systems`] holds them.
type EventSystems = Vec<(String, Vec<Vec<u8>>)>;

/// A bounded cursor over the file (or over a section's payload).
pub(super) struct Input<R> {
    pub(super) r: R,
    pub(super) pos: u64,
    pub(super) len: u64,
}

impl<R: Read> Input<R> {
    pub(super) fn corrupt(&self, what: impl Into<String>) -> TraceDatError {
        self.corrupt_at(self.pos, what)
    }

    pub(super) fn corrupt_at(&self, offset: u64, what: impl Into<String>) -> TraceDatError {
        TraceDatError::Corrupt {
            offset,
            what: what.into(),
        }
    }

    /// Reads `n` bytes, if `n` is within `cap` and within the rest of the file.
    pub(super) fn bytes(&mut self, n: u64, cap: u64, what: &str) -> Result<Vec<u8>, TraceDatError> {
        let remaining = self.len - self.pos;
        if n > remaining {
            return Err(self.corrupt(format!(
                "{what} needs {n} bytes, the file has {remaining} left"
            )));
        }
        if n > cap {
            return Err(self.corrupt(format!("{what} claims {n} bytes, more than {cap}")));
        }
        let len = usize::try_from(n).map_err(|_| self.corrupt(format!("{what} too large")))?;
        let mut buf = vec![0; len];
        self.r.read_exact(&mut buf).map_err(|e| {
            TraceDatError::io(
                format!("read {what} at byte {} of the trace.dat", self.pos),
                e,
            )
        })?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], TraceDatError> {
        let n = u64::try_from(N).unwrap_or(u64::MAX);
        let bytes = self.bytes(n, n, what)?;
        bytes
            .try_into()
            .map_err(|_| self.corrupt(format!("{what}: short read")))
    }

    pub(super) fn u8(&mut self) -> Result<u8, TraceDatError> {
        Ok(self.array::<1>("byte")?[0])
    }

    pub(super) fn u16(&mut self) -> Result<u16, TraceDatError> {
        Ok(u16::from_le_bytes(self.array("u16")?))
    }

    pub(super) fn u32(&mut self) -> Result<u32, TraceDatError> {
        Ok(u32::from_le_bytes(self.array("u32")?))
    }

    pub(super) fn u64(&mut self) -> Result<u64, TraceDatError> {
        Ok(u64::from_le_bytes(self.array("u64")?))
    }

    pub(super) fn count(&mut self, cap: u32, what: &str) -> Result<u32, TraceDatError> {
        let n = self.u32()?;
        if n > cap {
            return Err(self.corrupt(format!("{n} {what}, more than {cap}")));
        }
        Ok(n)
    }

    pub(super) fn expect(&mut self, tag: &[u8]) -> Result<(), TraceDatError> {
        let at = self.pos;
        let n = u64::try_from(tag.len()).unwrap_or(u64::MAX);
        let got = self.bytes(n, n, "section tag")?;
        if got != tag {
            return Err(self.corrupt_at(
                at,
                format!(
                    "expected {:?}, found {:?}",
                    String::from_utf8_lossy(tag),
                    String::from_utf8_lossy(&got)
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn text_u64(&mut self, cap: u64, what: &str) -> Result<Vec<u8>, TraceDatError> {
        let n = self.u64()?;
        self.bytes(n, cap, what)
    }

    pub(super) fn text_u32(&mut self, cap: u64, what: &str) -> Result<Vec<u8>, TraceDatError> {
        let n = u64::from(self.u32()?);
        self.bytes(n, cap, what)
    }

    /// A NUL-terminated string of at most `max` bytes before the NUL.
    pub(super) fn c_string(&mut self, max: usize, what: &str) -> Result<Vec<u8>, TraceDatError> {
        let mut s = Vec::new();
        loop {
            let byte = self.u8()?;
            if byte == 0 {
                return Ok(s);
            }
            if s.len() == max {
                return Err(self.corrupt(format!("{what} is not terminated within {max} bytes")));
            }
            s.push(byte);
        }
    }

    /// `u32 count, {u64 length, format}…`: the ftrace formats (both versions).
    pub(super) fn ftrace_formats(&mut self) -> Result<Vec<Vec<u8>>, TraceDatError> {
        let count = self.count(MAX_FORMATS, "ftrace formats")?;
        (0..count)
            .map(|_| self.text_u64(MAX_FORMAT_TEXT, "ftrace format"))
            .collect()
    }

    /// `u32 systems, {name\0, u32 count, {u64 length, format}…}…` (both versions).
    pub(super) fn event_formats(&mut self) -> Result<EventSystems, TraceDatError> {
        let systems = self.count(MAX_FORMATS, "event systems")?;
        let mut out = Vec::new();
        for _ in 0..systems {
            let name = self.c_string(MAX_SYSTEM_NAME, "event system name")?;
            let name = self.utf8(name, "event system name")?;
            let count = self.count(MAX_FORMATS, "event formats")?;
            let formats = (0..count)
                .map(|_| self.text_u64(MAX_FORMAT_TEXT, "event format"))
                .collect::<Result<_, _>>()?;
            out.push((name, formats));
        }
        Ok(out)
    }

    pub(super) fn utf8(&self, bytes: Vec<u8>, what: &str) -> Result<String, TraceDatError> {
        String::from_utf8(bytes).map_err(|_| self.corrupt(format!("{what} is not UTF-8")))
    }
}
