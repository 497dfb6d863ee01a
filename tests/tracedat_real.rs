//! Tier "needs host": records with the host's real tracefs and lets the real `trace-cmd report`
//! judge the trace.dat we write. Needs root, tracefs and trace-cmd 3.x; when any is missing the
//! tests fail with a message saying what to install or mount, they never pass silently.
//!
//! One capture is shared by the tests of this file; tracefs is touched under a lock and always
//! in a private instance (`instances/tvctl-test-<pid>-<n>`) that is removed again, also when a
//! test panics.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use tvctl::tracedat::{
    write_trace_dat_v7, Compression, CpuData, EventCounts, EventNames, PageLayout, TraceDatFile,
    TraceMeta, WriteSummary,
};

const TRACEFS: &str = "/sys/kernel/tracing";
/// Events we enable: two systems, one with two events.
const EVENTS: [(&str, &str); 3] = [
    ("sched", "sched_switch"),
    ("sched", "sched_process_exec"),
    ("timer", "hrtimer_start"),
];
const TRACE_ID: u64 = 0x7476_6374_6c5f_7465;

static TRACEFS_LOCK: Mutex<()> = Mutex::new(());
static INSTANCE_SEQ: AtomicU32 = AtomicU32::new(0);

/// What we read from tracefs: the metadata and each CPU's raw pages.
struct Capture {
    meta: TraceMeta,
    cpu_data: Vec<Vec<u8>>,
}

/// The tracefs root, mounted if needed; panics with what to do when that is impossible.
fn tracefs_root() -> PathBuf {
    let root = PathBuf::from(TRACEFS);
    if !root.join("events").is_dir() {
        let status = Command::new("mount")
            .args(["-t", "tracefs", "nodev", TRACEFS])
            .status();
        assert!(
            root.join("events").is_dir(),
            "tracefs is not mounted at {TRACEFS} and mounting it failed ({status:?}): \
             run the tests as root on a kernel with CONFIG_TRACING, or mount it with \
             `mount -t tracefs nodev {TRACEFS}`"
        );
    }
    root
}

fn trace_cmd(args: &[&str]) -> std::process::Output {
    let output = Command::new("trace-cmd")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run trace-cmd ({e}): install it (`apt-get install trace-cmd`); \
             these tests use it to judge our trace.dat files"
            )
        });
    output
}

use common::read_tracefs;

/// A tracefs instance that is removed when dropped.
struct Instance {
    dir: PathBuf,
}

impl Instance {
    fn create(root: &Path) -> Instance {
        let name = format!(
            "tvctl-test-{}-{}",
            std::process::id(),
            INSTANCE_SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let dir = root.join("instances").join(name);
        fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot create tracefs instance {}: {e}: these tests need root",
                dir.display()
            )
        });
        Instance { dir }
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.dir.join(file);
        fs::write(&path, value)
            .unwrap_or_else(|e| panic!("cannot write {value:?} to {}: {e}", path.display()));
    }

    fn read(&self, file: &str) -> Vec<u8> {
        read_tracefs(&self.dir.join(file))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("tracing_on"), "0");
        // rmdir fails with EBUSY while a file of the instance is still open; retry briefly.
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("could not remove tracefs instance {}", self.dir.display());
    }
}

fn cpu_count(instance: &Instance) -> usize {
    let mut cpus = 0;
    for entry in fs::read_dir(instance.dir.join("per_cpu")).unwrap() {
        let name = entry.unwrap().file_name();
        if let Some(n) = name.to_str().and_then(|n| n.strip_prefix("cpu")) {
            cpus = cpus.max(n.parse::<usize>().unwrap() + 1);
        }
    }
    cpus
}

/// Reads a CPU's `trace_pipe_raw` until it has nothing more, one page per read.
fn drain_cpu(instance: &Instance, cpu: usize, page_size: usize) -> Vec<u8> {
    let path = instance
        .dir
        .join(format!("per_cpu/cpu{cpu}/trace_pipe_raw"));
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut data = Vec::new();
    let mut page = vec![0; page_size];
    loop {
        match file.read(&mut page) {
            Ok(0) => break,
            Ok(n) => {
                assert_eq!(n, page_size, "{} returned a partial page", path.display());
                data.extend_from_slice(&page);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("cannot read {}: {e}", path.display()),
        }
    }
    data
}

fn uname() -> String {
    let u = nix::sys::utsname::uname().expect("uname");
    [u.sysname(), u.nodename(), u.release(), u.machine()]
        .map(|s| s.to_string_lossy().into_owned())
        .join(" ")
}

/// How to record: the per-CPU buffer size and how much activity to make.
struct Recipe {
    buffer_kb: u32,
    processes: u32,
}

/// Enough buffer for everything: no events lost.
const ROOMY: Recipe = Recipe {
    buffer_kb: 1024,
    processes: 20,
};
/// A buffer of a few pages and much activity: the kernel overwrites old pages (overwrite mode is
/// the default), so the first page read on a CPU carries RB_MISSED_EVENTS.
const OVERFLOWING: Recipe = Recipe {
    buffer_kb: 8,
    processes: 200,
};

/// Records scheduler and timer activity in a private instance.
fn record(recipe: &Recipe) -> Capture {
    let _guard = TRACEFS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = tracefs_root();
    let instance = Instance::create(&root);
    instance.write("tracing_on", "0");
    instance.write("buffer_size_kb", &recipe.buffer_kb.to_string());
    for (system, event) in EVENTS {
        instance.write(&format!("events/{system}/{event}/enable"), "1");
    }
    let page_size = match fs::read_to_string(instance.dir.join("buffer_subbuf_size_kb")) {
        Ok(kb) => kb.trim().parse::<usize>().unwrap() * 1024,
        Err(_) => usize::try_from(
            nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
                .unwrap()
                .unwrap(),
        )
        .unwrap(),
    };

    instance.write("tracing_on", "1");
    for i in 0..recipe.processes {
        let status = Command::new("sh")
            .args(["-c", &format!("sleep 0.00{}", i % 3)])
            .status()
            .expect("cannot run sh to make scheduler activity");
        assert!(status.success());
    }
    instance.write("tracing_on", "0");

    let cpus = cpu_count(&instance);
    let cpu_data: Vec<_> = (0..cpus)
        .map(|cpu| drain_cpu(&instance, cpu, page_size))
        .collect();

    let mut ftrace_formats = Vec::new();
    let mut ftrace_dirs: Vec<_> = fs::read_dir(instance.dir.join("events/ftrace"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("format").exists())
        .collect();
    ftrace_dirs.sort();
    for dir in ftrace_dirs {
        ftrace_formats.push(read_tracefs(&dir.join("format")));
    }
    let mut event_systems: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    for (system, event) in EVENTS {
        let format = instance.read(&format!("events/{system}/{event}/format"));
        match event_systems.iter_mut().find(|(s, _)| s == system) {
            Some((_, formats)) => formats.push(format),
            None => event_systems.push((system.to_owned(), vec![format])),
        }
    }
    let text = |path: PathBuf| String::from_utf8(read_tracefs(&path)).unwrap();
    let meta = TraceMeta {
        page_size: u32::try_from(page_size).unwrap(),
        header_page: instance.read("events/header_page"),
        header_event: instance.read("events/header_event"),
        ftrace_formats,
        event_systems,
        kallsyms: read_tracefs(Path::new("/proc/kallsyms")),
        printk_formats: read_tracefs(&root.join("printk_formats")),
        saved_cmdlines: read_tracefs(&root.join("saved_cmdlines")),
        uname: Some(uname()),
        trace_clock: Some(text(instance.dir.join("trace_clock"))),
        trace_id: Some(TRACE_ID),
        cpu_stats: (0..cpus)
            .map(|cpu| text(instance.dir.join(format!("per_cpu/cpu{cpu}/stats"))))
            .collect(),
        ..TraceMeta::default()
    };
    Capture { meta, cpu_data }
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| record(&ROOMY))
}

fn overflowing_capture() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| record(&OVERFLOWING))
}

/// Writes a capture as trace.dat, each CPU's pages coming from its own file as in tvctl.
fn write_capture(capture: &Capture, dir: &Path) -> (PathBuf, WriteSummary) {
    let (path, summary) = common::write_trace_file(dir, &capture.meta, &capture.cpu_data);
    if let Ok(keep) = std::env::var("TVCTL_KEEP_TRACE_DAT") {
        fs::copy(&path, keep).unwrap();
    }
    (path, summary)
}

fn counts_per_cpu(capture: &Capture) -> Vec<EventCounts> {
    let layout = PageLayout::from_meta(&capture.meta).unwrap();
    capture
        .cpu_data
        .iter()
        .map(|data| layout.count_events(data).unwrap())
        .collect()
}

fn report(path: &Path, extra: &[&str]) -> String {
    let path = path.to_str().unwrap();
    let mut args = vec!["report"];
    args.extend_from_slice(extra);
    args.push(path);
    let output = trace_cmd(&args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "trace-cmd {args:?} failed with {}:\n{stderr}\n{stdout}",
        output.status
    );
    stdout
}

/// One event line of `trace-cmd report -t`: `comm-pid [cpu] secs.nanos: name: fields`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReportLine {
    cpu: usize,
    ts: u64,
    name: String,
}

fn parse_event_line(line: &str) -> Option<ReportLine> {
    let open = line.find(" [")?;
    let close = open + line[open..].find(']')?;
    let cpu = line[open + 2..close].trim().parse().ok()?;
    let (ts, rest) = line[close + 1..].trim_start().split_once(": ")?;
    let (secs, nanos) = ts.split_once('.')?;
    if nanos.len() != 9 {
        return None;
    }
    let ts = secs.parse::<u64>().ok()? * 1_000_000_000 + nanos.parse::<u64>().ok()?;
    let name = rest.split(':').next()?.trim().to_owned();
    Some(ReportLine { cpu, ts, name })
}

/// `CPU:n [N EVENTS DROPPED]` → (n, Some(N)); `CPU:n [EVENTS DROPPED]` → (n, None).
fn parse_dropped_line(line: &str) -> Option<(usize, Option<u64>)> {
    let rest = line.trim().strip_prefix("CPU:")?;
    let (cpu, rest) = rest.split_once(" [")?;
    let rest = rest.strip_suffix("EVENTS DROPPED]")?.trim();
    let count = if rest.is_empty() {
        None
    } else {
        Some(rest.parse().ok()?)
    };
    Some((cpu.parse().ok()?, count))
}

/// Our view of a CPU's events, named like the report names them.
fn our_events(capture: &Capture, cpu: usize) -> Vec<ReportLine> {
    let layout = PageLayout::from_meta(&capture.meta).unwrap();
    let names = EventNames::from_meta(&capture.meta).unwrap();
    let mut events = Vec::new();
    for page in capture.cpu_data[cpu].chunks_exact(layout.page_size()) {
        for event in layout.page(page).unwrap().events() {
            let event = event.unwrap();
            let full = names.name(event.common_type).expect("event without format");
            events.push(ReportLine {
                cpu,
                ts: event.ts,
                name: full.split_once(':').unwrap().1.to_owned(),
            });
        }
    }
    events
}

fn total(counts: &[EventCounts]) -> EventCounts {
    let mut total = EventCounts::default();
    counts.iter().for_each(|c| total.merge(c));
    total
}

/// Sum of `name: N` lines over the per-CPU stats texts.
fn stats_sum(capture: &Capture, name: &str) -> u64 {
    capture
        .meta
        .cpu_stats
        .iter()
        .flat_map(|text| text.lines())
        .filter_map(|line| line.strip_prefix(name))
        .map(|n| n.trim().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn real_capture_is_reported_by_trace_cmd_event_for_event() {
    let capture = capture();
    let counts = counts_per_cpu(capture);
    let total = total(&counts);
    let dir = tempfile::tempdir().unwrap();
    let (path, summary) = write_capture(capture, dir.path());

    let out = report(&path, &["-t"]);

    eprintln!(
        "captured {} events on {} pages ({} missed pages, {} missed events) over {} CPUs \
         (events per CPU {:?}); {} bytes copied in kernel, {} in user space",
        total.events,
        total.pages,
        total.missed_pages,
        total.missed_events,
        counts.len(),
        counts.iter().map(|c| c.events).collect::<Vec<_>>(),
        summary.copied_in_kernel,
        summary.copied_in_user
    );
    assert!(total.events > 0, "the recording caught no events");
    assert_eq!(total.missed_pages, 0, "the roomy buffer lost events");
    assert_eq!(total.ts_backwards, 0);
    assert_eq!(
        stats_sum(capture, "read events:"),
        total.events,
        "kernel's count"
    );
    assert!(
        !out.contains("UNKNOWN"),
        "report shows unknown events:\n{out}"
    );
    assert!(!out.contains("ug! no event found"), "{out}");
    let lines: Vec<_> = out.lines().filter_map(parse_event_line).collect();
    assert_eq!(
        u64::try_from(lines.len()).unwrap(),
        total.events,
        "report printed a different number of events than we counted"
    );
    for (cpu, cpu_counts) in counts.iter().enumerate() {
        let theirs: Vec<_> = lines.iter().filter(|l| l.cpu == cpu).cloned().collect();
        assert_eq!(theirs, our_events(capture, cpu), "events of CPU {cpu}");
        assert_eq!(theirs.first().map(|l| l.ts), cpu_counts.first_ts);
        assert_eq!(theirs.last().map(|l| l.ts), cpu_counts.last_ts);
    }
    let names = EventNames::from_meta(&capture.meta).unwrap();
    for (id, n) in &total.per_type {
        let name = names.name(*id).unwrap().split_once(':').unwrap().1;
        let reported = lines.iter().filter(|l| l.name == name).count();
        assert_eq!(u64::try_from(reported).unwrap(), *n, "count of {name}");
    }
    let reported_cpus: BTreeSet<usize> = lines.iter().map(|l| l.cpu).collect();
    let our_cpus: BTreeSet<usize> = (0..counts.len())
        .filter(|&c| counts[c].events > 0)
        .collect();
    assert_eq!(reported_cpus, our_cpus, "CPUs with events");
}

#[test]
fn real_capture_shows_sched_switch_fields_without_plugins() {
    let capture = capture();
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_capture(capture, dir.path());

    // -N: no plugins, so the event's own print fmt is used (the sched_switch plugin prints
    // `comm:pid [prio] S ==> ...` instead).
    let out = report(&path, &["-N"]);

    let switches: Vec<_> = out
        .lines()
        .filter(|l| l.contains(" sched_switch:"))
        .collect();
    assert!(!switches.is_empty(), "{out}");
    for line in &switches {
        assert!(
            line.contains("prev_comm=") && line.contains("next_pid="),
            "sched_switch line without fields: {line}"
        );
    }
    assert!(out.lines().any(|l| l.contains(" hrtimer_start:")), "{out}");
}

#[test]
fn real_capture_options_are_shown_by_trace_cmd() {
    let capture = capture();
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_capture(capture, dir.path());

    let uname = report(&path, &["--uname"]);
    let stat = report(&path, &["--stat"]);
    let valid = trace_cmd(&["dump", "-v", "-i", path.to_str().unwrap()]);
    let options = trace_cmd(&["dump", "--options", "-i", path.to_str().unwrap()]);

    assert!(
        uname.contains(capture.meta.uname.as_deref().unwrap()),
        "{uname}"
    );
    for text in &capture.meta.cpu_stats {
        assert!(
            stat.contains(text.trim_end()),
            "--stat lacks {text:?}:\n{stat}"
        );
    }
    assert!(valid.status.success(), "trace-cmd dump -v: {valid:?}");
    let options = String::from_utf8_lossy(&options.stdout);
    assert!(
        options.contains(&format!("{TRACE_ID:#X}").replace("0X", "0x")),
        "{options}"
    );
}

#[test]
fn real_capture_reads_back_exactly() {
    let capture = capture();
    let dir = tempfile::tempdir().unwrap();
    let (path, summary) = write_capture(capture, dir.path());

    let file = TraceDatFile::open(&path).unwrap();

    assert_eq!(file.meta(), &capture.meta);
    assert_eq!(file.cpus(), summary.cpus.as_slice());
    let counts = counts_per_cpu(capture);
    for (cpu, data) in capture.cpu_data.iter().enumerate() {
        assert_eq!(&file.read_cpu_data(cpu).unwrap(), data, "CPU {cpu}");
        assert_eq!(file.count_events(cpu).unwrap(), counts[cpu], "CPU {cpu}");
    }
    let page_bytes: usize = capture.cpu_data.iter().map(Vec::len).sum();
    assert_eq!(summary.copied_in_kernel, u64::try_from(page_bytes).unwrap());
}

/// `name: N` of one CPU's stats text.
fn cpu_stat(capture: &Capture, cpu: usize, name: &str) -> u64 {
    capture.meta.cpu_stats[cpu]
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .map(|n| n.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no {name:?} in the stats of CPU {cpu}"))
}

#[test]
fn overflowing_capture_reports_the_events_the_kernel_lost() {
    let capture = overflowing_capture();
    let counts = counts_per_cpu(capture);
    let total = total(&counts);
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_capture(capture, dir.path());

    let out = report(&path, &["-t"]);

    let dropped: Vec<_> = out.lines().filter_map(parse_dropped_line).collect();
    eprintln!(
        "overflowing capture: {} events on {} pages, {} missed pages ({} without count), \
         {} missed events; kernel overrun {}; report dropped lines {dropped:?}",
        total.events,
        total.pages,
        total.missed_pages,
        total.missed_uncounted_pages,
        total.missed_events,
        stats_sum(capture, "overrun:")
    );
    assert!(
        total.missed_pages > 0,
        "the small buffer lost nothing: make more activity"
    );
    let lines = out.lines().filter_map(parse_event_line).count();
    assert_eq!(u64::try_from(lines).unwrap(), total.events);
    for (cpu, cpu_counts) in counts.iter().enumerate() {
        let overrun = cpu_stat(capture, cpu, "overrun:");
        if cpu_counts.missed_uncounted_pages == 0 {
            assert_eq!(
                cpu_counts.missed_events, overrun,
                "CPU {cpu}: kernel's overrun"
            );
        } else {
            assert!(
                cpu_counts.missed_events < overrun,
                "CPU {cpu}: kernel's overrun"
            );
        }
        let reported: Vec<_> = dropped.iter().filter(|(c, _)| *c == cpu).collect();
        let reported_sum: u64 = reported.iter().filter_map(|(_, n)| *n).sum();
        let reported_uncounted = reported.iter().filter(|(_, n)| n.is_none()).count();
        assert_eq!(
            reported_sum, cpu_counts.missed_events,
            "CPU {cpu}: dropped in report"
        );
        assert_eq!(
            u64::try_from(reported_uncounted).unwrap(),
            cpu_counts.missed_uncounted_pages,
            "CPU {cpu}: [EVENTS DROPPED] lines in report"
        );
    }
}

/// Writes a capture as a version-7 trace.dat with `compression`.
fn write_capture_v7(capture: &Capture, dir: &Path, compression: Compression) -> PathBuf {
    let mut files = Vec::new();
    for (cpu, data) in capture.cpu_data.iter().enumerate() {
        let path = dir.join(format!("v7-cpu{cpu}.raw"));
        fs::write(&path, data).unwrap();
        files.push(fs::File::open(&path).unwrap());
    }
    let cpus: Vec<CpuData> = files
        .iter()
        .zip(&capture.cpu_data)
        .map(|(file, data)| CpuData {
            file,
            len: u64::try_from(data.len()).unwrap(),
        })
        .collect();
    let path = dir.join(format!("trace-v7-{compression:?}.dat"));
    let mut out = fs::File::create(&path).unwrap();
    write_trace_dat_v7(&mut out, &capture.meta, &cpus, compression).unwrap();
    path
}

#[test]
fn version_7_files_report_exactly_what_version_6_reports_and_zstd_is_smaller() {
    let capture = capture();
    let dir = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let (v6, _) = write_capture(capture, dir.path());
    let v6_took = t.elapsed();
    let t = std::time::Instant::now();
    let zstd = write_capture_v7(capture, dir.path(), Compression::Zstd);
    let zstd_took = t.elapsed();
    let none = write_capture_v7(capture, dir.path(), Compression::None);
    let pages: usize = capture.cpu_data.iter().map(Vec::len).sum();
    // For docs/BENCHMARKS.md (run with --release -- --nocapture); not asserted.
    eprintln!(
        "v7 write: {:.1} MB of pages; v6 {:?}, {} bytes; v7 zstd {:?}, {} bytes",
        pages as f64 / 1e6,
        v6_took,
        fs::metadata(&v6).unwrap().len(),
        zstd_took,
        fs::metadata(&zstd).unwrap().len()
    );

    let want = report(&v6, &[]);
    assert!(want.lines().count() > 10, "{want}");
    for v7 in [&zstd, &none] {
        assert_eq!(report(v7, &[]), want, "{}", v7.display());
        let dump = trace_cmd(&["dump", "-v", v7.to_str().unwrap()]);
        assert!(
            dump.status.success(),
            "trace-cmd dump -v {}: {}",
            v7.display(),
            String::from_utf8_lossy(&dump.stderr)
        );
        let summary = trace_cmd(&["dump", "--summary", v7.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&summary.stdout);
        assert!(text.contains("version"), "{text}");
    }
    // tvctl reads its version-7 files back exactly.
    let counts = counts_per_cpu(capture);
    for v7 in [&zstd, &none] {
        let file = TraceDatFile::open(v7).unwrap();
        assert_eq!(file.meta(), &capture.meta, "{}", v7.display());
        for (cpu, data) in capture.cpu_data.iter().enumerate() {
            assert_eq!(&file.read_cpu_data(cpu).unwrap(), data, "CPU {cpu}");
            assert_eq!(file.count_events(cpu).unwrap(), counts[cpu], "CPU {cpu}");
        }
    }
    let size = |p: &Path| fs::metadata(p).unwrap().len();
    assert!(
        size(&zstd) * 3 < size(&v6),
        "zstd {} vs v6 {}",
        size(&zstd),
        size(&v6)
    );
}
