//! Turning what a recording collected into a trace.dat: the guest's metadata files become the
//! file's headers, and each CPU's data file is copied in by the kernel (copy_file_range).
//! The written file is then read back to count events and lost events per CPU, so the summary
//! describes exactly the file on disk.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::collect::guest_input::CpuCounts;
use crate::tracedat::{write_trace_dat, CpuData, TraceDatError, TraceDatFile, TraceMeta};

use super::summary::CpuSummary;

/// Builds the file's metadata from the guest's (checked) files, names as in
/// docs/protocol.md. `counts` are the agent's final per-CPU numbers, if it sent them.
pub fn trace_meta(
    files: &BTreeMap<String, Vec<u8>>,
    page_size: u32,
    counts: Option<&BTreeMap<u32, CpuCounts>>,
    trace_id: u64,
) -> TraceMeta {
    let text = |name: &str| files.get(name).cloned().unwrap_or_default();
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
            ftrace.push(data.clone());
        } else {
            systems
                .entry(system.to_string())
                .or_default()
                .push(data.clone());
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
        header_page: text("events/header_page"),
        header_event: text("events/header_event"),
        ftrace_formats: ftrace,
        event_systems: systems.into_iter().collect(),
        kallsyms: text("kallsyms"),
        printk_formats: text("printk_formats"),
        saved_cmdlines: text("saved_cmdlines"),
        uname: files
            .get("uname")
            .map(|u| String::from_utf8_lossy(u).trim().to_string()),
        trace_clock: files
            .get("trace_clock")
            .map(|t| String::from_utf8_lossy(t).into_owned()),
        trace_id: Some(trace_id),
        cpu_stats: if all_stats {
            stats.iter().map(|s| s.stats_text.clone()).collect()
        } else {
            Vec::new()
        },
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
/// that ends in a partial page (a stream cut short) is trimmed to whole pages.
pub fn write_file(
    output: &Path,
    meta: &TraceMeta,
    collected: &[CollectedCpu],
) -> Result<Vec<u64>, TraceDatError> {
    let ncpus = collected.iter().map(|c| c.cpu + 1).max().unwrap_or(0);
    let page = u64::from(meta.page_size);
    let mut files: Vec<Option<(File, u64)>> = Vec::new();
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
                Some((f, len - len % page))
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
    let dir = output.parent().filter(|p| !p.as_os_str().is_empty());
    let mut tmp = tempfile::Builder::new()
        .prefix(".tvctl-")
        .suffix(".dat.partial")
        .tempfile_in(dir.unwrap_or(Path::new(".")))
        .map_err(|e| TraceDatError::io(format!("create a file next to {}", output.display()), e))?;
    write_trace_dat(tmp.as_file_mut(), meta, &cpus)?;
    let write_err = |e| TraceDatError::io(format!("write {}", output.display()), e);
    tmp.as_file().sync_all().map_err(write_err)?;
    let mut perms = tmp.as_file().metadata().map_err(write_err)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    tmp.as_file().set_permissions(perms).map_err(write_err)?;
    tmp.persist(output).map_err(|e| write_err(e.error))?;
    Ok(files
        .iter()
        .map(|f| f.as_ref().map_or(0, |(_, len)| *len))
        .collect())
}

/// Reads `output` back and counts, per CPU, pages, events and lost events.
pub fn count_cpus(
    output: &Path,
    recorded: &[u32],
    counts: Option<&BTreeMap<u32, CpuCounts>>,
    complete: &BTreeMap<u32, bool>,
) -> Result<Vec<CpuSummary>, TraceDatError> {
    let file = TraceDatFile::open(output)?;
    let mut out = Vec::new();
    for &cpu in recorded {
        let idx = usize::try_from(cpu).unwrap_or(usize::MAX);
        let found = file.count_events(idx)?;
        let extent = file.cpus().get(idx).copied();
        let st = counts.and_then(|c| c.get(&cpu));
        let lost = st.map_or(found.missed_events, CpuCounts::lost);
        out.push(CpuSummary {
            cpu,
            bytes: extent.map_or(0, |e| e.size),
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
        });
    }
    Ok(out)
}
