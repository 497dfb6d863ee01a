//! Writes a version-7 trace.dat (sections, optionally zstd-compressed), the layout trace-cmd
//! 3.1.6 writes and reads by default (docs/trace-format.md, "Version 7").
//!
//! Everything but the CPU data is built in memory first (the metadata sections, compressed,
//! are a few MiB at most), so every offset is known before the first byte is written and
//! nothing is patched afterwards. CPU data is compressed in chunks of 10 whole pages, as
//! trace-cmd does, every CPU on a thread of its own; uncompressed data is copied in by the
//! kernel as in version 6.

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use super::writer::{
    copy_pages, count_u32, validate, write_event_formats, write_ftrace_formats, write_meta_options,
    Copied, HeaderWriter,
};
use super::{option_id, CpuData, CpuExtent, TraceDatError, TraceMeta, WriteSummary, MAGIC};

/// Section ids (the option that points at a section has the same id).
pub mod section {
    pub const OPTIONS: u16 = 0;
    pub const BUFFER: u16 = 3;
    pub const HEADER_INFO: u16 = 16;
    pub const FTRACE_EVENTS: u16 = 17;
    pub const EVENT_FORMATS: u16 = 18;
    pub const KALLSYMS: u16 = 19;
    pub const PRINTK: u16 = 20;
    pub const CMDLINES: u16 = 21;
}

/// The CPUCOUNT option (version 7 has no CPU count in its header).
pub const CPUCOUNT: u16 = 8;
/// The BUFFER option: where a buffer's CPU data is.
pub const BUFFER: u16 = 3;
/// Bit 0 of a section's flags: its payload is compressed.
pub const COMPRESSED: u16 = 1;
/// Pages per compressed chunk of CPU data (trace-cmd's `PAGES_IN_CHUNK`).
pub const PAGES_PER_CHUNK: usize = 10;
/// zstd level (trace-cmd's default).
const ZSTD_LEVEL: i32 = 3;

/// How a version-7 file stores its sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
}

/// Writes `meta` and the pages of `cpus` (CPU 0 first) as a version-7 trace.dat into `out`,
/// replacing whatever it held. On return `out`'s cursor is at the end of the file.
pub fn write_trace_dat_v7(
    out: &mut File,
    meta: &TraceMeta,
    cpus: &[CpuData<'_>],
    compression: Compression,
) -> Result<WriteSummary, TraceDatError> {
    let layout = validate(meta, cpus)?;
    let long_size = u8::try_from(layout.long_size()).unwrap_or(8);
    let page = u64::from(meta.page_size);
    let zstd = compression == Compression::Zstd;

    // 1. The file start.
    let mut start = Vec::new();
    start.extend_from_slice(MAGIC);
    start.extend_from_slice(b"7\0");
    start.extend_from_slice(&[0, long_size]);
    start.extend_from_slice(&meta.page_size.to_le_bytes());
    if zstd {
        start.extend_from_slice(b"zstd\0");
        start.extend_from_slice(zstd::zstd_safe::version_string().as_bytes());
        start.push(0);
    } else {
        start.extend_from_slice(b"none\0\0");
    }
    let options_offset_at = start.len();
    start.extend_from_slice(&0u64.to_le_bytes());

    // 2. The metadata sections, in memory.
    let mut sections: Vec<(u16, Vec<u8>)> = Vec::new();
    let mut body = Vec::new();
    {
        let mut h = HeaderWriter { w: &mut body };
        h.bytes(b"header_page\0")?;
        h.text_u64(&meta.header_page)?;
        h.bytes(b"header_event\0")?;
        h.text_u64(&meta.header_event)?;
    }
    sections.push((section::HEADER_INFO, std::mem::take(&mut body)));
    write_ftrace_formats(&mut HeaderWriter { w: &mut body }, meta)?;
    sections.push((section::FTRACE_EVENTS, std::mem::take(&mut body)));
    write_event_formats(&mut HeaderWriter { w: &mut body }, meta)?;
    sections.push((section::EVENT_FORMATS, std::mem::take(&mut body)));
    HeaderWriter { w: &mut body }.text_u32(&meta.kallsyms, "kallsyms")?;
    sections.push((section::KALLSYMS, std::mem::take(&mut body)));
    HeaderWriter { w: &mut body }.text_u32(&meta.printk_formats, "printk_formats")?;
    sections.push((section::PRINTK, std::mem::take(&mut body)));
    HeaderWriter { w: &mut body }.text_u64(&meta.saved_cmdlines)?;
    sections.push((section::CMDLINES, std::mem::take(&mut body)));

    let mut head = start;
    let mut section_offsets = Vec::new();
    for (id, payload) in &sections {
        section_offsets.push((*id, len64(head.len())));
        let stored = if zstd {
            compressed_block(payload)?
        } else {
            payload.clone()
        };
        push_section_header(&mut head, *id, zstd, len64(stored.len()));
        head.extend_from_slice(&stored);
    }
    drop(sections);

    // 3. The first options section: where the metadata is, and the file's options.
    let mut options = Vec::new();
    {
        let mut h = HeaderWriter { w: &mut options };
        for (id, offset) in &section_offsets {
            h.option(*id, &offset.to_le_bytes())?;
        }
        write_meta_options(&mut h, meta)?;
        h.option(CPUCOUNT, &count_u32(cpus.len(), "CPUs")?.to_le_bytes())?;
    }
    let options1 = len64(head.len());
    head[options_offset_at..options_offset_at + 8].copy_from_slice(&options1.to_le_bytes());
    let done_len = 2 + 4 + 8;
    push_section_header(
        &mut head,
        section::OPTIONS,
        false,
        len64(options.len() + done_len),
    );
    head.extend_from_slice(&options);
    let done_next_at = head.len() + 6;
    head.extend_from_slice(&option_id::DONE.to_le_bytes());
    head.extend_from_slice(&8u32.to_le_bytes());
    head.extend_from_slice(&0u64.to_le_bytes()); // the next options section, set below

    // 4. The CPU data: compressed blocks in memory (in parallel), raw blocks copied in.
    let blocks: Vec<Option<Vec<u8>>> = if zstd {
        compress_cpus(cpus, meta.page_size)?
    } else {
        vec![None; cpus.len()]
    };
    let buffer_at = len64(head.len());
    let mut next = buffer_at + 16;
    let mut extents = Vec::with_capacity(cpus.len());
    for (data, block) in cpus.iter().zip(&blocks) {
        let stored = block.as_ref().map_or(data.len, |b| len64(b.len()));
        if data.len == 0 {
            extents.push(CpuExtent {
                offset: next.next_multiple_of(page),
                size: 0,
            });
            continue;
        }
        let offset = next.next_multiple_of(page);
        extents.push(CpuExtent {
            offset,
            size: stored,
        });
        next = offset.checked_add(stored).ok_or_else(|| {
            TraceDatError::InvalidMeta("the CPU data adds up to more than 2^64 bytes".into())
        })?;
    }
    let buffer_end = next;
    push_section_header(
        &mut head,
        section::BUFFER,
        zstd,
        buffer_end - (buffer_at + 16),
    );
    let options2 = buffer_end;
    head[done_next_at..done_next_at + 8].copy_from_slice(&options2.to_le_bytes());

    // 5. The second options section: the BUFFER option, and the end of the chain.
    let mut buffer_option = Vec::new();
    buffer_option.extend_from_slice(&buffer_at.to_le_bytes());
    buffer_option.push(0); // the top instance: ""
    buffer_option.extend_from_slice(clock_name(meta).as_bytes());
    buffer_option.push(0);
    buffer_option.extend_from_slice(&meta.page_size.to_le_bytes());
    let with_data: Vec<(usize, &CpuExtent)> = extents
        .iter()
        .enumerate()
        .filter(|(_, e)| e.size > 0)
        .collect();
    buffer_option.extend_from_slice(&count_u32(with_data.len(), "CPUs")?.to_le_bytes());
    for (cpu, extent) in &with_data {
        buffer_option.extend_from_slice(&count_u32(*cpu, "CPU number")?.to_le_bytes());
        buffer_option.extend_from_slice(&extent.offset.to_le_bytes());
        buffer_option.extend_from_slice(&extent.size.to_le_bytes());
    }
    let mut tail = Vec::new();
    {
        let mut h = HeaderWriter { w: &mut tail };
        h.option(BUFFER, &buffer_option)?;
        h.u16(option_id::DONE)?;
        h.u32(8)?;
        h.u64(0)?;
    }
    let mut options2_bytes = Vec::new();
    push_section_header(
        &mut options2_bytes,
        section::OPTIONS,
        false,
        len64(tail.len()),
    );
    options2_bytes.extend_from_slice(&tail);
    let file_len = options2 + len64(options2_bytes.len());

    // Write it all.
    let io_err = |source| TraceDatError::io("write the trace.dat", source);
    out.set_len(0).map_err(io_err)?;
    out.seek(SeekFrom::Start(0)).map_err(io_err)?;
    {
        let mut w = BufWriter::with_capacity(1 << 16, &*out);
        w.write_all(&head).map_err(io_err)?;
        w.flush().map_err(io_err)?;
    }
    let mut copied = Copied::default();
    for (cpu, ((data, block), extent)) in cpus.iter().zip(&blocks).zip(&extents).enumerate() {
        if data.len == 0 {
            continue;
        }
        match block {
            Some(bytes) => {
                out.write_all_at(bytes, extent.offset).map_err(io_err)?;
                copied.in_user += data.len;
            }
            None => copy_pages(cpu, data, out, extent.offset, &mut copied)?,
        }
    }
    out.write_all_at(&options2_bytes, options2)
        .map_err(io_err)?;
    out.seek(SeekFrom::Start(file_len)).map_err(io_err)?;
    Ok(WriteSummary {
        data_offset: extents.first().map_or(buffer_at, |e| e.offset),
        cpus: extents,
        file_len,
        copied_in_kernel: copied.in_kernel,
        copied_in_user: copied.in_user,
    })
}

fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// `u16 id, u16 flags, s32 description (-1: none), u64 size`.
fn push_section_header(out: &mut Vec<u8>, id: u16, compressed: bool, size: u64) {
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(if compressed { COMPRESSED } else { 0 }).to_le_bytes());
    out.extend_from_slice(&(-1i32).to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
}

/// `u32 compressed size, u32 size, one zstd frame`.
fn compressed_block(payload: &[u8]) -> Result<Vec<u8>, TraceDatError> {
    let usize32 = u32::try_from(payload.len()).map_err(|_| {
        TraceDatError::InvalidMeta(format!(
            "a section of {} bytes: compressed sections hold at most 4 GiB",
            payload.len()
        ))
    })?;
    let frame = zstd::bulk::compress(payload, ZSTD_LEVEL)
        .map_err(|e| TraceDatError::io("compress a trace.dat section", e))?;
    let csize = u32::try_from(frame.len())
        .map_err(|_| TraceDatError::InvalidMeta("a compressed section over 4 GiB".into()))?;
    let mut out = Vec::with_capacity(frame.len() + 8);
    out.extend_from_slice(&csize.to_le_bytes());
    out.extend_from_slice(&usize32.to_le_bytes());
    out.extend_from_slice(&frame);
    Ok(out)
}

/// Every CPU's data as `u32 nchunks, {u32 csize, u32 usize, frame}…`, CPUs in parallel.
fn compress_cpus(
    cpus: &[CpuData<'_>],
    page_size: u32,
) -> Result<Vec<Option<Vec<u8>>>, TraceDatError> {
    let chunk = usize::try_from(page_size).unwrap_or(4096) * PAGES_PER_CHUNK;
    std::thread::scope(|scope| {
        let handles: Vec<_> = cpus
            .iter()
            .enumerate()
            .map(|(cpu, data)| scope.spawn(move || compress_cpu(cpu, data, chunk)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| {
                        Err(TraceDatError::io(
                            "compress",
                            io::Error::other("a compressing thread panicked"),
                        ))
                    })
                    .map(Some)
            })
            .collect()
    })
}

fn compress_cpu(cpu: usize, data: &CpuData<'_>, chunk: usize) -> Result<Vec<u8>, TraceDatError> {
    let io_err = |source| TraceDatError::io(format!("read CPU {cpu}'s pages to compress"), source);
    let chunks = data.len.div_ceil(len64(chunk));
    let mut out = Vec::new();
    out.extend_from_slice(
        &count_u32(usize::try_from(chunks).unwrap_or(usize::MAX), "chunks")?.to_le_bytes(),
    );
    let mut compressor =
        zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|e| TraceDatError::io("start zstd", e))?;
    let mut buf = vec![0u8; chunk];
    let mut at = 0u64;
    while at < data.len {
        let n = usize::try_from((data.len - at).min(len64(chunk))).unwrap_or(chunk);
        data.file.read_exact_at(&mut buf[..n], at).map_err(io_err)?;
        let frame = compressor
            .compress(&buf[..n])
            .map_err(|e| TraceDatError::io("compress CPU data", e))?;
        out.extend_from_slice(&count_u32(frame.len(), "compressed chunk bytes")?.to_le_bytes());
        out.extend_from_slice(&count_u32(n, "chunk bytes")?.to_le_bytes());
        out.extend_from_slice(&frame);
        at += len64(n);
    }
    Ok(out)
}

/// The selected clock in `trace_clock` (`[local] global …` → `local`), for the BUFFER option.
fn clock_name(meta: &TraceMeta) -> String {
    meta.trace_clock
        .as_deref()
        .and_then(|t| {
            let open = t.find('[')?;
            let close = open + t[open..].find(']')?;
            Some(t[open + 1..close].to_string())
        })
        .unwrap_or_else(|| "local".to_string())
}
