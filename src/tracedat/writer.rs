//! Writes a version-6 trace.dat: the header from a [`TraceMeta`], then every CPU's raw pages,
//! copied file to file inside the kernel.
//!
//! The header is produced twice by the same code: once into a byte counter, to learn where the
//! page-aligned CPU data will start (the flyrecord table in the header holds those offsets), and
//! once into the file. That keeps the layout in one place without buffering megabytes of
//! kallsyms a second time.

use super::page::PageLayout;
use super::{option_id, CpuExtent, SyncOptionError, TraceDatError, TraceMeta, MAGIC, MAX_CPUS};
use nix::errno::Errno;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

/// The raw pages of one CPU: the first `len` bytes of `file`, read from offset 0 (the file's
/// cursor is not used or moved). `len` must be a multiple of the page size; 0 means the CPU
/// recorded nothing.
#[derive(Debug, Clone, Copy)]
pub struct CpuData<'a> {
    pub file: &'a File,
    pub len: u64,
}

/// Where things went in a written file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSummary {
    /// One per CPU, as written in the flyrecord table.
    pub cpus: Vec<CpuExtent>,
    /// Offset of the first CPU's pages (the header length rounded up to a page).
    pub data_offset: u64,
    /// Length of the whole file.
    pub file_len: u64,
    /// Page bytes copied by `copy_file_range` inside the kernel.
    pub copied_in_kernel: u64,
    /// Page bytes copied through a user-space buffer, where the file systems refused
    /// `copy_file_range` (e.g. across file system types).
    pub copied_in_user: u64,
}

/// Writes `meta` and the pages of `cpus` (CPU 0 first) as a version-6 trace.dat into `out`,
/// replacing whatever `out` held. The file has `cpus.len()` CPUs. On return `out`'s cursor is at
/// the end of the file.
pub fn write_trace_dat(
    out: &mut File,
    meta: &TraceMeta,
    cpus: &[CpuData<'_>],
) -> Result<WriteSummary, TraceDatError> {
    let layout = validate(meta, cpus)?;
    let long_size = u8::try_from(layout.long_size()).unwrap_or(8);
    let page_size = u64::from(meta.page_size);

    let no_extents = vec![CpuExtent { offset: 0, size: 0 }; cpus.len()];
    let mut counter = ByteCounter(0);
    write_header(&mut counter, meta, long_size, &no_extents)?;
    let header_len = counter.0;
    let data_offset = header_len.next_multiple_of(page_size);
    let mut extents = Vec::with_capacity(cpus.len());
    let mut next = data_offset;
    for cpu in cpus {
        extents.push(CpuExtent {
            offset: next,
            size: cpu.len,
        });
        next = next.checked_add(cpu.len).ok_or_else(|| {
            TraceDatError::InvalidMeta("the CPU data adds up to more than 2^64 bytes".into())
        })?;
    }
    let file_len = next;

    let io_err = |source| TraceDatError::io("write the trace.dat header", source);
    out.set_len(0).map_err(io_err)?;
    out.seek(SeekFrom::Start(0)).map_err(io_err)?;
    {
        let mut w = BufWriter::with_capacity(1 << 16, &*out);
        write_header(&mut w, meta, long_size, &extents)?;
        let padding = data_offset - header_len;
        io::copy(&mut io::repeat(0).take(padding), &mut w).map_err(io_err)?;
        w.flush().map_err(io_err)?;
    }

    let mut copied = Copied::default();
    for (cpu, (data, extent)) in cpus.iter().zip(&extents).enumerate() {
        copy_pages(cpu, data, out, extent.offset, &mut copied)?;
    }
    out.seek(SeekFrom::Start(file_len)).map_err(io_err)?;
    Ok(WriteSummary {
        cpus: extents,
        data_offset,
        file_len,
        copied_in_kernel: copied.in_kernel,
        copied_in_user: copied.in_user,
    })
}

pub(super) fn validate(
    meta: &TraceMeta,
    cpus: &[CpuData<'_>],
) -> Result<PageLayout, TraceDatError> {
    let invalid = |what: String| Err(TraceDatError::InvalidMeta(what));
    let layout = PageLayout::from_meta(meta)?;
    if cpus.is_empty() {
        return invalid("no CPUs: pass one data block per guest CPU, empty ones included".into());
    }
    if cpus.len() > MAX_CPUS {
        return invalid(format!(
            "{} CPUs, at most {MAX_CPUS} are supported",
            cpus.len()
        ));
    }
    for (cpu, data) in cpus.iter().enumerate() {
        if data.len % u64::from(meta.page_size) != 0 {
            return Err(TraceDatError::PartialPage {
                cpu,
                len: data.len,
                page_size: meta.page_size,
            });
        }
    }
    if !meta.cpu_stats.is_empty() && meta.cpu_stats.len() != cpus.len() {
        return invalid(format!(
            "{} cpu_stats for {} CPUs: give one per CPU or none",
            meta.cpu_stats.len(),
            cpus.len()
        ));
    }
    for (system, _) in &meta.event_systems {
        if system.is_empty() || system.contains('\0') {
            return invalid(format!(
                "event system name {system:?} is empty or holds a NUL"
            ));
        }
    }
    let texts = meta
        .uname
        .iter()
        .chain(&meta.trace_clock)
        .chain(&meta.cpu_stats);
    if let Some(bad) = texts.into_iter().find(|t| t.contains('\0')) {
        return invalid(format!("option text {bad:?} holds a NUL byte"));
    }
    validate_sync_options(meta, cpus.len())?;
    Ok(layout)
}

/// What the option types cannot check on their own: how they fit this file and each other.
fn validate_sync_options(meta: &TraceMeta, ncpus: usize) -> Result<(), SyncOptionError> {
    if let Some(shift) = &meta.time_shift {
        if shift.cpus().len() != ncpus {
            return Err(SyncOptionError::TimeShiftCpuCount {
                option: shift.cpus().len(),
                file: ncpus,
            });
        }
    }
    let mut ids = std::collections::HashSet::new();
    for guest in &meta.guests {
        let trace_id = guest.trace_id();
        if meta.trace_id == Some(trace_id) {
            let name = guest.name().to_owned();
            return Err(SyncOptionError::GuestTraceIdIsHost { name, trace_id });
        }
        if !ids.insert(trace_id) {
            return Err(SyncOptionError::GuestTraceIdTwice { trace_id });
        }
    }
    Ok(())
}

/// Counts bytes instead of writing them.
struct ByteCounter(u64);

impl Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += u64::try_from(buf.len()).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes everything before the CPU data, in the order of `docs/trace-format.md`.
fn write_header<W: Write>(
    w: &mut W,
    meta: &TraceMeta,
    long_size: u8,
    extents: &[CpuExtent],
) -> Result<(), TraceDatError> {
    let mut h = HeaderWriter { w };
    h.bytes(MAGIC)?;
    h.bytes(b"6\0")?;
    h.bytes(&[0, long_size])?; // little endian, sizeof(long)
    h.u32(meta.page_size)?;

    h.bytes(b"header_page\0")?;
    h.text_u64(&meta.header_page)?;
    h.bytes(b"header_event\0")?;
    h.text_u64(&meta.header_event)?;

    write_ftrace_formats(&mut h, meta)?;
    write_event_formats(&mut h, meta)?;

    h.text_u32(&meta.kallsyms, "kallsyms")?;
    h.text_u32(&meta.printk_formats, "printk_formats")?;
    h.text_u64(&meta.saved_cmdlines)?;
    h.u32(count_u32(extents.len(), "CPUs")?)?;

    h.bytes(b"options  \0")?;
    write_meta_options(&mut h, meta)?;
    h.u16(option_id::DONE)?;

    h.bytes(b"flyrecord\0")?;
    for extent in extents {
        h.u64(extent.offset)?;
        h.u64(extent.size)?;
    }
    if let Some(clock) = &meta.trace_clock {
        // trace-cmd reads the clock a second time here whenever option 4 exists.
        h.text_u64(clock.as_bytes())?;
    }
    Ok(())
}

/// `u32 count, {u64 length, format}…` of the ftrace formats (both versions).
pub(super) fn write_ftrace_formats<W: Write>(
    h: &mut HeaderWriter<'_, W>,
    meta: &TraceMeta,
) -> Result<(), TraceDatError> {
    h.u32(count_u32(meta.ftrace_formats.len(), "ftrace formats")?)?;
    for format in &meta.ftrace_formats {
        h.text_u64(format)?;
    }
    Ok(())
}

/// `u32 systems, {name\0, u32 count, {u64 length, format}…}…` (both versions).
pub(super) fn write_event_formats<W: Write>(
    h: &mut HeaderWriter<'_, W>,
    meta: &TraceMeta,
) -> Result<(), TraceDatError> {
    h.u32(count_u32(meta.event_systems.len(), "event systems")?)?;
    for (system, formats) in &meta.event_systems {
        h.bytes(system.as_bytes())?;
        h.bytes(b"\0")?;
        h.u32(count_u32(formats.len(), "event formats of one system")?)?;
        for format in formats {
            h.text_u64(format)?;
        }
    }
    Ok(())
}

/// The options both versions carry, from `meta`, in `trace-cmd record`'s order.
pub(super) fn write_meta_options<W: Write>(
    h: &mut HeaderWriter<'_, W>,
    meta: &TraceMeta,
) -> Result<(), TraceDatError> {
    if let Some(uname) = &meta.uname {
        h.string_option(option_id::UNAME, uname)?;
    }
    if let Some(clock) = &meta.trace_clock {
        h.string_option(option_id::TRACECLOCK, clock)?;
    }
    if let Some(id) = meta.trace_id {
        h.option(option_id::TRACEID, &id.to_le_bytes())?;
    }
    for stats in &meta.cpu_stats {
        h.string_option(option_id::CPUSTAT, stats)?;
    }
    // The host/guest options in `trace-cmd record`'s order; the reader accepts any order.
    for guest in &meta.guests {
        h.option(option_id::GUEST, &guest.encode())?;
    }
    if let Some(tsc2nsec) = &meta.tsc2nsec {
        h.option(option_id::TSC2NSEC, &tsc2nsec.encode())?;
    }
    if let Some(shift) = &meta.time_shift {
        h.option(option_id::TIME_SHIFT, &shift.encode())?;
    }
    Ok(())
}

pub(super) fn count_u32(n: usize, what: &str) -> Result<u32, TraceDatError> {
    u32::try_from(n)
        .map_err(|_| TraceDatError::InvalidMeta(format!("{n} {what} do not fit a u32 count")))
}

pub(super) struct HeaderWriter<'w, W> {
    pub(super) w: &'w mut W,
}

impl<W: Write> HeaderWriter<'_, W> {
    pub(super) fn bytes(&mut self, bytes: &[u8]) -> Result<(), TraceDatError> {
        self.w
            .write_all(bytes)
            .map_err(|e| TraceDatError::io("write the trace.dat header", e))
    }

    pub(super) fn u16(&mut self, v: u16) -> Result<(), TraceDatError> {
        self.bytes(&v.to_le_bytes())
    }

    pub(super) fn u32(&mut self, v: u32) -> Result<(), TraceDatError> {
        self.bytes(&v.to_le_bytes())
    }

    pub(super) fn u64(&mut self, v: u64) -> Result<(), TraceDatError> {
        self.bytes(&v.to_le_bytes())
    }

    pub(super) fn text_u64(&mut self, text: &[u8]) -> Result<(), TraceDatError> {
        let len = u64::try_from(text.len()).map_err(|_| {
            TraceDatError::InvalidMeta(format!("a text of {} bytes is too long", text.len()))
        })?;
        self.u64(len)?;
        self.bytes(text)
    }

    pub(super) fn text_u32(&mut self, text: &[u8], what: &str) -> Result<(), TraceDatError> {
        let len = u32::try_from(text.len()).map_err(|_| {
            TraceDatError::InvalidMeta(format!(
                "{what} has {} bytes; trace.dat stores its length in 32 bits",
                text.len()
            ))
        })?;
        self.u32(len)?;
        self.bytes(text)
    }

    pub(super) fn option(&mut self, id: u16, data: &[u8]) -> Result<(), TraceDatError> {
        let size = u32::try_from(data.len()).map_err(|_| {
            TraceDatError::InvalidMeta(format!("option {id} of {} bytes is too long", data.len()))
        })?;
        self.u16(id)?;
        self.u32(size)?;
        self.bytes(data)
    }

    /// A text option with its terminating NUL: trace-cmd runs C string functions on it.
    pub(super) fn string_option(&mut self, id: u16, text: &str) -> Result<(), TraceDatError> {
        let mut data = Vec::with_capacity(text.len() + 1);
        data.extend_from_slice(text.as_bytes());
        data.push(0);
        self.option(id, &data)
    }
}

#[derive(Default)]
pub(super) struct Copied {
    pub(super) in_kernel: u64,
    pub(super) in_user: u64,
}

/// Copies `data.len` bytes from offset 0 of `data.file` to `out` at `out_offset`, with
/// `copy_file_range` where the file systems allow it and through a buffer where they do not.
pub(super) fn copy_pages(
    cpu: usize,
    data: &CpuData<'_>,
    out: &File,
    out_offset: u64,
    copied: &mut Copied,
) -> Result<(), TraceDatError> {
    const CHUNK: u64 = 1 << 30;
    let io_err =
        |source| TraceDatError::io(format!("copy CPU {cpu}'s pages into the trace.dat"), source);
    let too_far = || io_err(io::Error::other("file offset beyond 2^63"));
    let mut done = 0u64;
    let mut in_kernel = true;
    let mut buffer = Vec::new();
    while done < data.len {
        let want = (data.len - done).min(CHUNK);
        if in_kernel {
            let mut off_in = i64::try_from(done).map_err(|_| too_far())?;
            let mut off_out = i64::try_from(out_offset + done).map_err(|_| too_far())?;
            let want = usize::try_from(want).unwrap_or(1 << 20);
            match nix::fcntl::copy_file_range(
                data.file,
                Some(&mut off_in),
                out,
                Some(&mut off_out),
                want,
            ) {
                Ok(0) => break,
                Ok(n) => {
                    let n = u64::try_from(n).map_err(io::Error::other).map_err(io_err)?;
                    done += n;
                    copied.in_kernel += n;
                }
                Err(Errno::EINTR) => {}
                // Not supported between these files (e.g. across file system types).
                Err(Errno::EXDEV | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EINVAL) => {
                    in_kernel = false;
                }
                Err(errno) => return Err(io_err(errno.into())),
            }
        } else {
            buffer.resize(1 << 16, 0);
            let take = usize::try_from(want)
                .unwrap_or(buffer.len())
                .min(buffer.len());
            let n = match data.file.read_at(&mut buffer[..take], done) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(e)),
            };
            out.write_all_at(&buffer[..n], out_offset + done)
                .map_err(io_err)?;
            let n = u64::try_from(n).map_err(io::Error::other).map_err(io_err)?;
            done += n;
            copied.in_user += n;
        }
    }
    if done < data.len {
        return Err(TraceDatError::ShortCpuData {
            cpu,
            copied: done,
            len: data.len,
        });
    }
    Ok(())
}
