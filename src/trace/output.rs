//! Turning what a recording collected into a trace.dat: the guest's metadata files become the
//! file's headers, and each CPU's data is compressed in (version 7, the default) or copied in
//! by the kernel (version 6, copy_file_range).
//! Events and lost events are counted per CPU in the same pass that checks every page
//! (`tracedat::sanitize`), over exactly the pages the file keeps: the summary describes the
//! file on disk without reading it back.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::collect::guest_input::CpuCounts;
use crate::tracedat::sanitize::{scan_cpu_file, FormatSet, PageScan};
use crate::tracedat::{
    write_trace_dat, write_trace_dat_v7, Compression, CpuData, PageLayout, TraceDatError, TraceMeta,
};

use super::summary::CpuSummary;

/// Builds the file's metadata from the guest's (checked) files, names as in
/// docs/protocol.md, moving them (they may be tens of MiB: never held twice). `counts` are
/// the agent's final per-CPU numbers, if it sent them.
pub fn trace_meta(
    mut files: BTreeMap<String, Vec<u8>>,
    page_size: u32,
    counts: Option<&BTreeMap<u32, CpuCounts>>,
    trace_id: u64,
) -> TraceMeta {
    let mut take = |name: &str| files.remove(name).unwrap_or_default();
    let header_page = take("events/header_page");
    let header_event = take("events/header_event");
    let kallsyms = take("kallsyms");
    let printk_formats = take("printk_formats");
    let saved_cmdlines = take("saved_cmdlines");
    let uname = files
        .remove("uname")
        .map(|u| String::from_utf8_lossy(&u).trim().to_string());
    let trace_clock = files
        .remove("trace_clock")
        .map(|t| String::from_utf8_lossy(&t).into_owned());
    let mut ftrace = Vec::new();
    let mut systems: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for (name, data) in files {
        let Some(rest) = name.strip_prefix("events/") else {
            continue;
        };
        let Some(rest) = rest.strip_suffix("/format") else {
            continue;
        };
        let Some((system, _event)) = rest.split_once('/') else {
            continue;
        };
        if system == "ftrace" {
            ftrace.push(data);
        } else {
            systems.entry(system.to_string()).or_default().push(data);
        }
    }
    // CPUSTAT options are positional (one per CPU from 0): only when every CPU has one.
    let ncpus = counts
        .and_then(|c| c.keys().next_back())
        .map_or(0, |&max| max + 1);
    let stats: Vec<&CpuCounts> = (0..ncpus)
        .filter_map(|cpu| counts.and_then(|c| c.get(&cpu)))
        .collect();
    let all_stats = u32::try_from(stats.len()).is_ok_and(|n| n == ncpus);
    TraceMeta {
        page_size,
        header_page,
        header_event,
        ftrace_formats: ftrace,
        event_systems: systems.into_iter().collect(),
        kallsyms,
        printk_formats,
        saved_cmdlines,
        uname,
        trace_clock,
        trace_id: Some(trace_id),
        cpu_stats: if all_stats {
            stats.iter().map(|s| s.stats_text.clone()).collect()
        } else {
            Vec::new()
        },
        ..TraceMeta::default()
    }
}

/// One CPU's data as collected: its file and how many bytes in it count.
#[derive(Debug, Clone)]
pub struct CollectedCpu {
    pub cpu: u32,
    pub data: Option<PathBuf>,
    pub bytes: u64,
}

/// Writes `output` (via a temporary file renamed into place, so a failed write never leaves
/// a half file under the final name). CPUs are numbered 0..=max; gaps get empty blocks. Data
/// that ends in a partial page (a stream cut short) is trimmed to whole pages, and pages that
/// `tracedat::sanitize` refuses (they do not walk cleanly with `layout`, the guest's checked
/// headers, or a record would make trace-cmd read out of bounds with `formats`) are left
/// out. Returns, per CPU with data, its scan: the pages kept and their counts, the pages left
/// out with the first problems found.
pub fn write_file(
    output: &Path,
    meta: &TraceMeta,
    collected: &[CollectedCpu],
    layout: &PageLayout,
    formats: &FormatSet,
    version: super::FileVersion,
) -> Result<BTreeMap<u32, PageScan>, TraceDatError> {
    let dir = output.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let ncpus = collected.iter().map(|c| c.cpu + 1).max().unwrap_or(0);
    let page = u64::from(meta.page_size);
    let mut files: Vec<Option<(File, u64)>> = Vec::new();
    let mut scans = BTreeMap::new();
    for cpu in 0..ncpus {
        let entry = collected.iter().find(|c| c.cpu == cpu);
        let opened = match entry.and_then(|c| c.data.as_ref().map(|p| (p, c.bytes))) {
            Some((path, bytes)) => {
                let f = File::open(path)
                    .map_err(|e| TraceDatError::io(format!("open {}", path.display()), e))?;
                let len = f
                    .metadata()
                    .map_err(|e| TraceDatError::io(format!("stat {}", path.display()), e))?
                    .len()
                    .min(bytes);
                let whole = len - len % page;
                let check = |e| TraceDatError::io(format!("check {}", path.display()), e);
                let scan = scan_cpu_file(layout, &f, whole, Some(formats)).map_err(check)?;
                let kept = if scan.dropped_pages == 0 {
                    (f, whole)
                } else {
                    good_pages_only(&f, &scan, dir).map_err(check)?
                };
                scans.insert(cpu, scan);
                Some(kept)
            }
            None => None,
        };
        files.push(opened);
    }
    let empty =
        tempfile::tempfile().map_err(|e| TraceDatError::io("create a temporary file", e))?;
    let cpus: Vec<CpuData> = files
        .iter()
        .map(|f| match f {
            Some((file, len)) => CpuData { file, len: *len },
            None => CpuData {
                file: &empty,
                len: 0,
            },
        })
        .collect();
    let mut tmp = tempfile::Builder::new()
        .prefix(".tvctl-")
        .suffix(".dat.partial")
        .tempfile_in(dir)
        .map_err(|e| TraceDatError::io(format!("create a file next to {}", output.display()), e))?;
    match version {
        super::FileVersion::V6 => write_trace_dat(tmp.as_file_mut(), meta, &cpus)?,
        super::FileVersion::V7 => {
            write_trace_dat_v7(tmp.as_file_mut(), meta, &cpus, Compression::Zstd)?
        }
    };
    let write_err = |e| TraceDatError::io(format!("write {}", output.display()), e);
    tmp.as_file().sync_all().map_err(write_err)?;
    let mut perms = tmp.as_file().metadata().map_err(write_err)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    tmp.as_file().set_permissions(perms).map_err(write_err)?;
    tmp.persist(output).map_err(|e| write_err(e.error))?;
    Ok(scans)
}

/// A new file in `dir` holding only the good page ranges of `file`, in order, and its length.
fn good_pages_only(file: &File, scan: &PageScan, dir: &Path) -> std::io::Result<(File, u64)> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let mut out = tempfile::tempfile_in(dir)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    for range in &scan.good {
        let mut at = range.start;
        while at < range.end {
            let n = usize::try_from(range.end - at).map_or(buf.len(), |left| left.min(buf.len()));
            file.read_exact_at(&mut buf[..n], at)?;
            out.write_all(&buf[..n])?;
            at += n as u64;
            written += n as u64;
        }
    }
    Ok((out, written))
}

/// Per CPU recorded: bytes, pages, events and lost events of what the file holds (from the
/// write's scans), with the agent's numbers beside them.
pub fn cpu_summaries(
    scans: &BTreeMap<u32, PageScan>,
    recorded: &[u32],
    counts: Option<&BTreeMap<u32, CpuCounts>>,
    complete: &BTreeMap<u32, bool>,
) -> Vec<CpuSummary> {
    let none = PageScan::default();
    recorded
        .iter()
        .map(|&cpu| {
            let scan = scans.get(&cpu).unwrap_or(&none);
            let found = &scan.counts;
            let st = counts.and_then(|c| c.get(&cpu));
            let lost = st.map_or(found.missed_events, CpuCounts::lost);
            CpuSummary {
                cpu,
                bytes: scan.good_bytes(),
                pages: found.pages,
                events: found.events,
                lost_events: lost.max(found.missed_events),
                pages_with_lost_events: found.missed_pages,
                bytes_sent: st.map(|s| s.bytes),
                complete: complete.get(&cpu).copied().unwrap_or(false),
                overrun: st.map(|s| s.overrun),
                commit_overrun: st.map(|s| s.commit_overrun),
                dropped_events: st.map(|s| s.dropped_events),
                timestamps_backwards: found.ts_backwards,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const HEADER_PAGE: &[u8] = include_bytes!("../../tests/data/tracedat/header_page_64.txt");
    const HEADER_EVENT: &[u8] = include_bytes!("../../tests/data/tracedat/header_event.txt");

    /// A page with one 8-byte event of type `id` (type_len 2), committed.
    fn good_page(ts: u64, id: u16) -> Vec<u8> {
        let mut page = vec![0u8; 4096];
        page[..8].copy_from_slice(&ts.to_le_bytes());
        page[8..16].copy_from_slice(&12u64.to_le_bytes());
        page[16..20].copy_from_slice(&2u32.to_le_bytes()); // type_len 2, delta 0
        page[20..22].copy_from_slice(&id.to_le_bytes());
        page
    }

    /// A page whose commit says its one event runs past the data.
    fn bad_page() -> Vec<u8> {
        let mut page = good_page(5, 1);
        page[16..20].copy_from_slice(&27u32.to_le_bytes()); // type_len 27: 108 bytes
        page
    }

    fn data_file(pages: &[Vec<u8>]) -> (tempfile::TempDir, File, u64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cpu0.data");
        let mut f = File::create(&path).unwrap();
        for p in pages {
            f.write_all(p).unwrap();
        }
        let len = pages.len() as u64 * 4096;
        (dir, File::open(&path).unwrap(), len)
    }

    fn layout() -> PageLayout {
        PageLayout::parse(HEADER_PAGE, HEADER_EVENT, 4096).unwrap()
    }

    fn scan(f: &File, len: u64) -> PageScan {
        scan_cpu_file(&layout(), f, len, None).unwrap()
    }

    #[test]
    fn good_data_has_nothing_to_leave_out() {
        let (_dir, f, len) = data_file(&[good_page(1, 1), good_page(2, 1)]);

        assert_eq!(scan(&f, len).dropped_pages, 0);
    }

    #[test]
    fn corrupt_pages_are_left_out_and_the_others_kept_in_order() {
        let pages = [
            good_page(1, 7),
            bad_page(),
            good_page(3, 8),
            bad_page(),
            good_page(4, 9),
        ];
        let (dir, f, len) = data_file(&pages);
        let scan = scan(&f, len);

        let (mut file, kept_len) = good_pages_only(&f, &scan, dir.path()).unwrap();

        assert_eq!(scan.dropped_pages, 2);
        assert_eq!(kept_len, 3 * 4096);
        let mut bytes = Vec::new();
        std::io::Seek::rewind(&mut file).unwrap();
        std::io::Read::read_to_end(&mut file, &mut bytes).unwrap();
        assert_eq!(bytes, [&pages[0][..], &pages[2], &pages[4]].concat());
    }
}
