//! What a well-behaved fake sends: this host's real headers, formats and recorded pages, and
//! the real `trace-cmd report` as the judge of the file tvctl writes.

use std::fmt;
use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tvctl::tracedat::PageLayout;

use super::*;

// ---------------------------------------------------------------------------------------------
// Real formats and pages from this host's tracefs.

const TRACEFS: &str = "/sys/kernel/tracing";

/// What a real agent would send about a `sched:sched_switch` recording: this host's formats and
/// headers, and ring-buffer pages recorded in a tracefs instance of our own.
pub struct GuestFiles {
    pub page_size: u32,
    pub kernel_release: String,
    pub header_page: Vec<u8>,
    pub header_event: Vec<u8>,
    pub sched_switch_format: Vec<u8>,
    ftrace_formats: Vec<(String, Vec<u8>)>,
    printk_formats: Vec<u8>,
    uname: Vec<u8>,
    trace_clock: Vec<u8>,
    /// Recorded pages, per host CPU that recorded any.
    pages: Vec<Vec<Vec<u8>>>,
    /// Added to the timestamps of each further round through the recorded pages, so that
    /// repeated pages still go forward in time.
    round_ns: u64,
}

/// This host's files, recorded once per test process.
pub fn guest_files() -> &'static GuestFiles {
    static FILES: OnceLock<GuestFiles> = OnceLock::new();
    FILES.get_or_init(record_guest_files)
}

impl GuestFiles {
    /// The static batch, as the agent sends it after Started.
    pub fn static_metadata(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = vec![
            ("events/header_page".to_string(), self.header_page.clone()),
            ("events/header_event".to_string(), self.header_event.clone()),
            (
                "events/sched/sched_switch/format".to_string(),
                self.sched_switch_format.clone(),
            ),
        ];
        out.extend(self.ftrace_formats.iter().cloned());
        out.push(("printk_formats".into(), self.printk_formats.clone()));
        out.push(("trace_clock".into(), self.trace_clock.clone()));
        out.push(("uname".into(), self.uname.clone()));
        out
    }

    /// The batch sent before Stopped.
    pub fn final_metadata(&self) -> Vec<(String, Vec<u8>)> {
        vec![
            (
                "saved_cmdlines".into(),
                b"1 systemd\n42 fake-task\n".to_vec(),
            ),
            ("saved_tgids".into(), b"1 1\n42 42\n".to_vec()),
        ]
    }

    pub fn layout(&self) -> PageLayout {
        PageLayout::parse(&self.header_page, &self.header_event, self.page_size)
            .expect("this host's header_page parses")
    }

    /// Page `index` of CPU `cpu`'s endless stream: the recorded pages over and over, each round
    /// later in time than the one before.
    pub fn page(&self, cpu: u32, index: usize) -> Vec<u8> {
        let recorded = &self.pages[usize::try_from(cpu).unwrap_or(0) % self.pages.len()];
        let mut page = recorded[index % recorded.len()].clone();
        let round = u64::try_from(index / recorded.len()).unwrap_or(0);
        let ts = u64::from_le_bytes(page[..8].try_into().expect("8 bytes"));
        page[..8].copy_from_slice(&(ts + round * self.round_ns).to_le_bytes());
        page
    }

    /// `n` pages of CPU `cpu`'s stream, from the first.
    pub fn pages(&self, cpu: u32, n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| self.page(cpu, i)).collect()
    }

    /// Events in `data` (whole pages), counted with tvctl's page parser.
    pub fn count_events(&self, data: &[u8]) -> u64 {
        self.layout()
            .count_events(data)
            .expect("the fake's good pages parse")
            .events
    }
}

use crate::common::read_tracefs;

/// Records `sched_switch` in a private tracefs instance and reads this host's formats.
fn record_guest_files() -> GuestFiles {
    let root = PathBuf::from(TRACEFS);
    if !root.join("events").is_dir() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", TRACEFS])
            .status();
        assert!(
            root.join("events").is_dir(),
            "tracefs is not mounted at {TRACEFS} and mounting it failed: run the tests as root \
             (the fake guest sends this host's real formats and pages)"
        );
    }
    let instance = root
        .join("instances")
        .join(format!("tvctl-fake-{}", std::process::id()));
    std::fs::create_dir(&instance).unwrap_or_else(|e| {
        panic!(
            "create tracefs instance {}: {e} (root needed)",
            instance.display()
        )
    });
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0.join("tracing_on"), "0");
            for _ in 0..50 {
                if std::fs::remove_dir(&self.0).is_ok() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let _remove = Remove(instance.clone());
    let write = |file: &str, value: &str| {
        std::fs::write(instance.join(file), value)
            .unwrap_or_else(|e| panic!("write {value:?} to {file} of the instance: {e}"))
    };
    write("tracing_on", "0");
    write("buffer_size_kb", "1024");
    write("events/sched/sched_switch/enable", "1");
    let page_size = match std::fs::read_to_string(instance.join("buffer_subbuf_size_kb")) {
        Ok(kb) => kb.trim().parse::<u32>().expect("subbuf size") * 1024,
        Err(_) => 4096,
    };
    let cpus = std::fs::read_dir(instance.join("per_cpu"))
        .expect("per_cpu")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("cpu")?.parse::<usize>().ok()
        })
        .max()
        .map_or(1, |m| m + 1);

    let began = Instant::now();
    write("tracing_on", "1");
    for i in 0..30 {
        let _ = Command::new("sh")
            .args(["-c", &format!("sleep 0.00{}", i % 3)])
            .status();
    }
    write("tracing_on", "0");
    let span = began.elapsed();

    let mut pages = Vec::new();
    for cpu in 0..cpus {
        let path = instance.join(format!("per_cpu/cpu{cpu}/trace_pipe_raw"));
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let mut cpu_pages = Vec::new();
        let mut page = vec![0u8; usize::try_from(page_size).expect("page size")];
        loop {
            match nix::unistd::read(file.as_fd(), &mut page) {
                Ok(n) if n == page.len() => cpu_pages.push(page.clone()),
                Ok(_) | Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                Err(e) => panic!("read {}: {e}", path.display()),
            }
        }
        if !cpu_pages.is_empty() {
            pages.push(cpu_pages);
        }
    }
    assert!(
        !pages.is_empty(),
        "recording sched_switch on this host gave no pages"
    );
    let mut ftrace_formats = Vec::new();
    for name in ["print", "bprint", "function"] {
        let path = instance.join(format!("events/ftrace/{name}/format"));
        if path.exists() {
            ftrace_formats.push((format!("events/ftrace/{name}/format"), read_tracefs(&path)));
        }
    }
    let u = nix::sys::utsname::uname().expect("uname");
    let uname = format!(
        "{} {} {} {} {}",
        u.sysname().to_string_lossy(),
        u.nodename().to_string_lossy(),
        u.release().to_string_lossy(),
        u.version().to_string_lossy(),
        u.machine().to_string_lossy()
    );
    GuestFiles {
        page_size,
        kernel_release: u.release().to_string_lossy().into_owned(),
        header_page: read_tracefs(&instance.join("events/header_page")),
        header_event: read_tracefs(&instance.join("events/header_event")),
        sched_switch_format: read_tracefs(&instance.join("events/sched/sched_switch/format")),
        ftrace_formats,
        printk_formats: read_tracefs(&root.join("printk_formats")),
        uname: uname.into_bytes(),
        trace_clock: read_tracefs(&instance.join("trace_clock")),
        pages,
        round_ns: u64::try_from((span + Duration::from_secs(1)).as_nanos()).unwrap_or(u64::MAX),
    }
}

// ---------------------------------------------------------------------------------------------
// The judge.

/// What `trace-cmd report -N` made of a file.
pub struct Report {
    pub status: std::process::ExitStatus,
    /// Event lines (`comm-pid [cpu] ts: event: fields`).
    pub events: u64,
    pub stdout: String,
    pub stderr: String,
}

impl Report {
    /// Exited by itself (not by a signal such as a stack overflow's SIGSEGV).
    pub fn exited_normally(&self) -> bool {
        self.status.code().is_some()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head: String = self.stdout.lines().take(20).collect::<Vec<_>>().join("\n");
        write!(
            f,
            "trace-cmd report: {}, {} event lines\n--- stderr ---\n{}\n--- first lines ---\n{}",
            self.status,
            self.events,
            shown(self.stderr.as_bytes()),
            shown(head.as_bytes())
        )
    }
}

/// Runs `trace-cmd report -N` on `file` (killed after 60 s).
pub fn trace_cmd_report(file: &Path) -> Report {
    let child = Command::new("trace-cmd")
        .arg("report")
        .arg("-N")
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("trace-cmd must be installed (scripts/install-deps.sh)");
    let pid = child.id();
    let watchdog_done = Arc::new(AtomicBool::new(false));
    let done = Arc::clone(&watchdog_done);
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if done.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    });
    let out = child.wait_with_output().expect("wait for trace-cmd");
    watchdog_done.store(true, Ordering::SeqCst);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let events = stdout.lines().filter(|l| is_event_line(l)).count();
    Report {
        status: out.status,
        events: u64::try_from(events).unwrap_or(u64::MAX),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn is_event_line(line: &str) -> bool {
    let Some(open) = line.find(" [") else {
        return false;
    };
    let Some(close) = line[open..].find(']').map(|c| open + c) else {
        return false;
    };
    line[open + 2..close].trim().parse::<u32>().is_ok() && line[close..].contains(": ")
}
