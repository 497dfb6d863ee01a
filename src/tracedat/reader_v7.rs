//! Reads version-7 trace.dat files (sections, optionally zstd-compressed): the files tvctl
//! writes by default and `trace-cmd record` writes (docs/trace-format.md, "Version 7").
//!
//! The file start names the first options section; options sections chain through their DONE
//! option, and point at the metadata sections and, through the BUFFER option, at the CPU data.
//! Every offset, length and count is checked against the file and a cap before anything is
//! read or allocated, the chain of options sections is bounded and may not loop, and a
//! compressed payload is decompressed into at most the size its header claims (itself capped).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::os::unix::fs::FileExt;

use super::reader::{
    checked_layout, meta_option, Chunk, Input, Parsed, MAX_CMDLINES, MAX_HEADER_TEXT, MAX_KALLSYMS,
    MAX_OPTIONS, MAX_PRINTK_FORMATS,
};
use super::{option_id, CpuExtent, TraceDatError, TraceMeta, MAX_CPUS, MAX_OPTION_SIZE};

const OPTIONS: u16 = 0;
const BUFFER: u16 = 3;
const CPUCOUNT: u16 = 8;
const HEADER_INFO: u16 = 16;
const FTRACE_EVENTS: u16 = 17;
const EVENT_FORMATS: u16 = 18;
const KALLSYMS: u16 = 19;
const PRINTK: u16 = 20;
const CMDLINES: u16 = 21;
const COMPRESSED: u16 = 1;
/// Most options sections in one file (trace-cmd writes two or three).
const MAX_OPTION_SECTIONS: usize = 64;
/// Most bytes of all event formats of a file (the metadata cap of the protocol).
const MAX_ALL_FORMATS: u64 = crate::proto::limits::MAX_METADATA_TOTAL;
/// Most pages in one compressed chunk of CPU data (trace-cmd and tvctl write 10).
const MAX_CHUNK_PAGES: u64 = 64;
/// Most bytes of one CPU's pages that the in-memory readers (`read_cpu_data`, `pages`)
/// decompress.
const MAX_IN_MEMORY: u64 = 1 << 30;

/// Parses the rest of a version-7 file after its page size.
pub(super) fn parse(
    input: &mut Input<BufReader<&File>>,
    file: &File,
    long_size: u8,
    page_size: u32,
) -> Result<Parsed, TraceDatError> {
    let compression = input.c_string(64, "compression name")?;
    let _version = input.c_string(64, "compression version")?;
    let zstd = match compression.as_slice() {
        b"none" => false,
        b"zstd" => true,
        other => {
            return Err(TraceDatError::Unsupported(format!(
                "compression {:?}: tvctl reads none and zstd",
                String::from_utf8_lossy(other)
            )))
        }
    };
    let file_len = input.len;
    let reader = SectionReader { file, file_len };
    let mut meta = TraceMeta {
        page_size,
        ..TraceMeta::default()
    };
    let mut sections: BTreeMap<u16, u64> = BTreeMap::new();
    let mut buffers: Vec<Vec<u8>> = Vec::new();
    let mut other_options = Vec::new();
    let mut cpu_count = None;

    let mut next = input.u64()?;
    let mut seen = Vec::new();
    while next != 0 {
        if seen.contains(&next) || seen.len() == MAX_OPTION_SECTIONS {
            return Err(corrupt(next, "the options sections loop or are too many"));
        }
        seen.push(next);
        let (id, payload) = reader.section(next, MAX_OPTION_SIZE * 4, zstd)?;
        if id != OPTIONS {
            return Err(corrupt(
                next,
                format!("section {id} where options were expected"),
            ));
        }
        let mut opts = bytes_input(&payload);
        next = 0;
        loop {
            if opts.pos == opts.len {
                return Err(corrupt(next, "an options section without DONE"));
            }
            let id = opts.u16()?;
            let size = u64::from(opts.u32()?);
            let data = opts.bytes(size, MAX_OPTION_SIZE, "option")?;
            if id == option_id::DONE {
                let bytes: [u8; 8] = data
                    .as_slice()
                    .try_into()
                    .map_err(|_| corrupt(0, "a DONE option that is not 8 bytes"))?;
                next = u64::from_le_bytes(bytes);
                break;
            }
            if other_options.len() + meta.cpu_stats.len() + buffers.len() >= MAX_OPTIONS {
                return Err(corrupt(0, format!("more than {MAX_OPTIONS} options")));
            }
            let twice = |name: &str| corrupt(0, format!("a second {name} option"));
            match id {
                HEADER_INFO | FTRACE_EVENTS | EVENT_FORMATS | KALLSYMS | PRINTK | CMDLINES => {
                    let bytes: [u8; 8] = data
                        .as_slice()
                        .try_into()
                        .map_err(|_| corrupt(0, format!("section option {id} is not 8 bytes")))?;
                    if sections.insert(id, u64::from_le_bytes(bytes)).is_some() {
                        return Err(twice("section"));
                    }
                }
                BUFFER => buffers.push(data),
                CPUCOUNT => {
                    let bytes: [u8; 4] = data
                        .as_slice()
                        .try_into()
                        .map_err(|_| corrupt(0, "CPUCOUNT is not 4 bytes"))?;
                    cpu_count = Some(u32::from_le_bytes(bytes));
                }
                _ => {
                    if let Some(data) = meta_option(&mut meta, id, data, 0)? {
                        other_options.push((id, data));
                    }
                }
            }
        }
    }

    // The metadata sections.
    let read = |id: u16, cap: u64| -> Result<Option<Vec<u8>>, TraceDatError> {
        match sections.get(&id) {
            None => Ok(None),
            Some(&at) => {
                let (found, payload) = reader.section(at, cap, zstd)?;
                if found != id {
                    return Err(corrupt(
                        at,
                        format!("section {found} where {id} was expected"),
                    ));
                }
                Ok(Some(payload))
            }
        }
    };
    let header = read(HEADER_INFO, 2 * MAX_HEADER_TEXT + 64)?
        .ok_or_else(|| corrupt(0, "no HEADER_INFO section: trace-cmd reads no events then"))?;
    let mut h = bytes_input(&header);
    h.expect(b"header_page\0")?;
    meta.header_page = h.text_u64(MAX_HEADER_TEXT, "header_page")?;
    h.expect(b"header_event\0")?;
    meta.header_event = h.text_u64(MAX_HEADER_TEXT, "header_event")?;
    if let Some(payload) = read(FTRACE_EVENTS, MAX_ALL_FORMATS)? {
        meta.ftrace_formats = bytes_input(&payload).ftrace_formats()?;
    }
    if let Some(payload) = read(EVENT_FORMATS, MAX_ALL_FORMATS)? {
        meta.event_systems = bytes_input(&payload).event_formats()?;
    }
    if let Some(payload) = read(KALLSYMS, MAX_KALLSYMS + 4)? {
        meta.kallsyms = bytes_input(&payload).text_u32(MAX_KALLSYMS, "kallsyms")?;
    }
    if let Some(payload) = read(PRINTK, MAX_PRINTK_FORMATS + 4)? {
        meta.printk_formats = bytes_input(&payload).text_u32(MAX_PRINTK_FORMATS, "printk")?;
    }
    if let Some(payload) = read(CMDLINES, MAX_CMDLINES + 8)? {
        meta.saved_cmdlines = bytes_input(&payload).text_u64(MAX_CMDLINES, "cmdlines")?;
    }

    // The top instance's CPU data.
    let mut top = None;
    for data in buffers {
        let mut b = bytes_input(&data);
        let section_at = b.u64()?;
        let name = b.c_string(256, "buffer name")?;
        if !name.is_empty() {
            other_options.push((BUFFER, data));
            continue;
        }
        if top.is_some() {
            return Err(corrupt(
                section_at,
                "two BUFFER options for the top instance",
            ));
        }
        let _clock = b.c_string(256, "buffer clock")?;
        let buffer_page = b.u32()?;
        if buffer_page != page_size {
            return Err(corrupt(
                section_at,
                format!("BUFFER page size {buffer_page}, file {page_size}"),
            ));
        }
        let n = b.count(u32::try_from(MAX_CPUS).unwrap_or(u32::MAX), "buffer CPUs")?;
        let mut entries = Vec::new();
        for _ in 0..n {
            entries.push((b.u32()?, b.u64()?, b.u64()?));
        }
        let (id, flags, _) = reader.header(section_at)?;
        if id != BUFFER {
            return Err(corrupt(
                section_at,
                format!("section {id} where BUFFER was expected"),
            ));
        }
        top = Some((flags & COMPRESSED != 0, entries));
    }
    let (compressed, entries) =
        top.ok_or_else(|| corrupt(0, "no BUFFER option: the file has no CPU data"))?;
    // CPU ids come from the file: u32::MAX + 1 must not overflow (a fuzzer finding).
    let max_cpu = entries
        .iter()
        .map(|e| e.0)
        .max()
        .map_or(0, |m| m.saturating_add(1));
    let ncpus = cpu_count.unwrap_or(0).max(max_cpu);
    let ncpus = usize::try_from(ncpus)
        .ok()
        .filter(|n| (1..=MAX_CPUS).contains(n))
        .ok_or_else(|| corrupt(0, format!("{ncpus} CPUs")))?;
    let page = u64::from(page_size);
    let mut cpus = vec![CpuExtent { offset: 0, size: 0 }; ncpus];
    let mut chunks: Vec<Vec<Chunk>> = vec![Vec::new(); ncpus];
    let mut listed = vec![false; ncpus];
    for (cpu, offset, size) in entries {
        let idx = usize::try_from(cpu).unwrap_or(usize::MAX);
        if std::mem::replace(&mut listed[idx], true) {
            return Err(corrupt(offset, format!("CPU {cpu} listed twice")));
        }
        if offset.checked_add(size).is_none_or(|end| end > file_len) {
            return Err(corrupt(
                offset,
                format!("CPU {cpu}'s {size} bytes lie beyond the file"),
            ));
        }
        if compressed {
            let (list, total) = reader.chunks(offset, size, page)?;
            cpus[idx] = CpuExtent {
                offset,
                size: total,
            };
            chunks[idx] = list;
        } else {
            if size % page != 0 || offset % page != 0 {
                return Err(corrupt(
                    offset,
                    format!("CPU {cpu}'s data is not whole aligned pages"),
                ));
            }
            cpus[idx] = CpuExtent { offset, size };
        }
    }
    let layout = checked_layout(&meta, ncpus, long_size)?;
    Ok(Parsed {
        meta,
        layout,
        cpus,
        other_options,
        chunks: compressed.then_some(chunks),
    })
}

fn corrupt(offset: u64, what: impl Into<String>) -> TraceDatError {
    TraceDatError::Corrupt {
        offset,
        what: what.into(),
    }
}

fn bytes_input(bytes: &[u8]) -> Input<&[u8]> {
    Input {
        r: bytes,
        pos: 0,
        len: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
    }
}

/// Reads sections at given offsets, bounded by the file.
struct SectionReader<'f> {
    file: &'f File,
    file_len: u64,
}

impl SectionReader<'_> {
    fn read_at(&self, at: u64, len: u64, what: &str) -> Result<Vec<u8>, TraceDatError> {
        if at.checked_add(len).is_none_or(|end| end > self.file_len) {
            return Err(corrupt(at, format!("{what}: {len} bytes beyond the file")));
        }
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| corrupt(at, "too large"))?];
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|e| TraceDatError::io(format!("read {what} at byte {at}"), e))?;
        Ok(buf)
    }

    /// `(id, flags, size)` of the section header at `at`.
    fn header(&self, at: u64) -> Result<(u16, u16, u64), TraceDatError> {
        let h = self.read_at(at, 16, "a section header")?;
        let id = u16::from_le_bytes([h[0], h[1]]);
        let flags = u16::from_le_bytes([h[2], h[3]]);
        let mut size = [0u8; 8];
        size.copy_from_slice(&h[8..16]);
        Ok((id, flags, u64::from_le_bytes(size)))
    }

    /// The section at `at`: its id and payload (decompressed), at most `cap` bytes.
    fn section(&self, at: u64, cap: u64, zstd: bool) -> Result<(u16, Vec<u8>), TraceDatError> {
        let (id, flags, size) = self.header(at)?;
        let body = at + 16;
        if flags & COMPRESSED == 0 {
            if size > cap {
                return Err(corrupt(
                    at,
                    format!("section {id} of {size} bytes, over {cap}"),
                ));
            }
            return Ok((id, self.read_at(body, size, "a section")?));
        }
        if !zstd {
            return Err(corrupt(
                at,
                "a compressed section in a file without compression",
            ));
        }
        let sizes = self.read_at(body, 8, "a compressed section's sizes")?;
        let csize = u64::from(u32::from_le_bytes([sizes[0], sizes[1], sizes[2], sizes[3]]));
        let usize_ = u64::from(u32::from_le_bytes([sizes[4], sizes[5], sizes[6], sizes[7]]));
        if usize_ > cap {
            return Err(corrupt(
                at,
                format!("section {id} of {usize_} bytes, over {cap}"),
            ));
        }
        let frame = self.read_at(body + 8, csize, "a compressed section")?;
        Ok((id, decompress(&frame, usize_, at)?))
    }

    /// The chunk table of a compressed CPU block: `u32 n, {u32 csize, u32 usize, frame}…`,
    /// within `size` bytes (or the 4 more that trace-cmd 3.1.6 leaves out of it).
    fn chunks(&self, at: u64, size: u64, page: u64) -> Result<(Vec<Chunk>, u64), TraceDatError> {
        let end = at.saturating_add(size).saturating_add(4).min(self.file_len);
        let n = self.read_at(at, 4, "a chunk count")?;
        let n = u64::from(u32::from_le_bytes([n[0], n[1], n[2], n[3]]));
        if n.saturating_mul(8) > end - at {
            return Err(corrupt(at, format!("{n} chunks cannot fit")));
        }
        let mut list = Vec::new();
        let mut pos = at + 4;
        let mut total = 0u64;
        for _ in 0..n {
            let h = self.read_at(pos, 8, "a chunk header")?;
            let csize = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
            let usize_ = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            let pages = u64::from(usize_) / page;
            if u64::from(usize_) % page != 0 || !(1..=MAX_CHUNK_PAGES).contains(&pages) {
                return Err(corrupt(
                    pos,
                    format!("a chunk of {usize_} bytes is not 1 to {MAX_CHUNK_PAGES} whole pages"),
                ));
            }
            let frame_end = pos + 8 + u64::from(csize);
            if frame_end > end {
                return Err(corrupt(pos, "a chunk runs past its CPU's data"));
            }
            list.push(Chunk {
                offset: pos + 8,
                csize,
                usize: usize_,
            });
            total += u64::from(usize_);
            pos = frame_end;
        }
        Ok((list, total))
    }
}

/// Most a zstd payload may claim to expand (trace data with zero padding compresses up to a
/// few hundred times; zstd itself can go to ~32 000×): a hostile file cannot make the reader
/// allocate much more than it holds.
const MAX_RATIO: u64 = 4096;

/// One zstd frame into exactly `size` bytes (frames need not record their size). The output
/// grows with what the frame really yields, not with what the header claims.
fn decompress(frame: &[u8], size: u64, at: u64) -> Result<Vec<u8>, TraceDatError> {
    let claimed_ratio_ok = size
        <= u64::try_from(frame.len())
            .unwrap_or(0)
            .saturating_mul(MAX_RATIO);
    if !claimed_ratio_ok {
        return Err(corrupt(
            at,
            format!(
                "{} compressed bytes claim {size}, over {MAX_RATIO}×",
                frame.len()
            ),
        ));
    }
    #[cfg(feature = "tracedat-v7")]
    {
        use std::io::Read;
        let mut out = Vec::new();
        zstd::stream::read::Decoder::with_buffer(frame)
            .and_then(|d| d.take(size.saturating_add(1)).read_to_end(&mut out))
            .map_err(|e| corrupt(at, format!("zstd data does not decompress: {e}")))?;
        if u64::try_from(out.len()).ok() != Some(size) {
            return Err(corrupt(
                at,
                format!("zstd data gave {} bytes, its header says {size}", out.len()),
            ));
        }
        Ok(out)
    }
    #[cfg(not(feature = "tracedat-v7"))]
    {
        let _ = frame;
        Err(TraceDatError::Unsupported(
            "zstd-compressed trace.dat".into(),
        ))
    }
}

/// All of one CPU's compressed chunks, decompressed, in order.
pub(super) fn decompress_chunks(
    file: &File,
    chunks: &[Chunk],
    size: u64,
    cpu: usize,
) -> Result<Vec<u8>, TraceDatError> {
    if size > MAX_IN_MEMORY {
        return Err(TraceDatError::Unsupported(format!(
            "CPU {cpu} holds {size} bytes of pages, more than {MAX_IN_MEMORY} are read into memory"
        )));
    }
    let mut out = Vec::new();
    let mut frame = Vec::new();
    for c in chunks {
        frame.resize(usize::try_from(c.csize).unwrap_or(0), 0);
        file.read_exact_at(&mut frame, c.offset)
            .map_err(|e| TraceDatError::io(format!("read CPU {cpu}'s chunk"), e))?;
        out.extend(decompress(&frame, u64::from(c.usize), c.offset)?);
    }
    Ok(out)
}
