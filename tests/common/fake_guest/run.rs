//! The real `tvctl` under test: started through `sh` and reaped with `wait4`, so its exit,
//! time and peak RSS are its own; output shown with escape sequences neutralised.

use std::fmt;
use std::io::{self, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

// ---------------------------------------------------------------------------------------------
// The real tvctl binary, with a deadline and its peak RSS.

/// A running `tvctl`; reaped with `wait4` so its resource usage is known.
pub struct TvctlRun {
    pid: Pid,
    args: Vec<String>,
    started: Instant,
    /// Threads reading stdout and stderr.
    output: Mutex<Option<OutputReaders>>,
    reaped: Mutex<Option<Reaped>>,
}

/// The threads that read a run's stdout and stderr to their end.
type OutputReaders = (JoinHandle<Vec<u8>>, JoinHandle<Vec<u8>>);

#[derive(Debug, Clone, Copy)]
struct Reaped {
    status: libc::c_int,
    at: Instant,
    maxrss_kib: u64,
}

/// How a `tvctl` run ended.
pub struct TvctlOutput {
    pub args: Vec<String>,
    /// Exit code; None when a signal ended it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// From spawn to exit.
    pub elapsed: Duration,
    pub exited_at: Instant,
    /// Peak resident set size (`ru_maxrss`), KiB.
    pub maxrss_kib: u64,
    /// The test killed it at its deadline.
    pub killed: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl TvctlRun {
    /// Starts the real tvctl with `--dir root` and `args`.
    ///
    /// tvctl is started by `sh`, not by this process, so that its `ru_maxrss` is its own: exec
    /// records the peak RSS of the address space it replaces, and a child of this process
    /// (std spawns with vfork) replaces this test process's, 100 MiB and more, so every run
    /// would seem to peak there. `sh` forks tvctl from its own small address space (through
    /// `env`, which undoes the SIGINT/SIGQUIT ignoring a shell gives background commands) and
    /// exits; tvctl, orphaned, is reparented to this process, a child subreaper, which reaps
    /// it with `wait4`.
    pub fn spawn(root: &Path, args: &[&str]) -> TvctlRun {
        become_subreaper();
        let mut all = vec!["--dir".to_string(), root.display().to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        let pid_file = tempfile::NamedTempFile::new().expect("a temporary file");
        let mut sh = Command::new("sh")
            .arg("-c")
            .arg(r#"f=$1; shift; env --default-signal=INT,QUIT "$@" & echo $! >"$f""#)
            .arg("sh")
            .arg(pid_file.path())
            .arg(env!("CARGO_BIN_EXE_tvctl"))
            .args(&all)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run sh");
        let started = Instant::now();
        fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = r.read_to_end(&mut v);
                v
            })
        }
        let stdout = drain(sh.stdout.take().expect("piped stdout"));
        let stderr = drain(sh.stderr.take().expect("piped stderr"));
        let status = sh.wait().expect("wait for sh");
        assert!(status.success(), "sh could not start tvctl: {status}");
        let pid = std::fs::read_to_string(pid_file.path())
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .expect("sh wrote tvctl's pid");
        TvctlRun {
            pid: Pid::from_raw(pid),
            args: all,
            started,
            output: Mutex::new(Some((stdout, stderr))),
            reaped: Mutex::new(None),
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    fn reap(&self, block: bool) -> Option<Reaped> {
        let mut guard = self.reaped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = *guard {
            return Some(r);
        }
        let mut status: libc::c_int = 0;
        // SAFETY: rusage is plain old data; all zeroes is a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let flags = if block { 0 } else { libc::WNOHANG };
        loop {
            // SAFETY: waits for our own child; both pointers are valid for the call.
            let r = unsafe { libc::wait4(self.pid.as_raw(), &mut status, flags, &mut usage) };
            if r == self.pid.as_raw() {
                let reaped = Reaped {
                    status,
                    at: Instant::now(),
                    maxrss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
                };
                *guard = Some(reaped);
                return Some(reaped);
            }
            if r == -1 && Errno::last() == Errno::EINTR {
                continue;
            }
            return None;
        }
    }

    /// True once the process has ended (it is reaped then).
    pub fn has_exited(&self) -> bool {
        self.reap(false).is_some()
    }

    /// Sends `sig` unless the process has already ended.
    pub fn signal(&self, sig: Signal) {
        if !self.has_exited() {
            let _ = nix::sys::signal::kill(self.pid, sig);
        }
    }

    /// Waits until `timeout` after the start for the end, then kills it.
    pub fn wait(&self, timeout: Duration) -> TvctlOutput {
        let deadline = self.started + timeout;
        let mut killed = false;
        let reaped = loop {
            if let Some(r) = self.reap(false) {
                break r;
            }
            if Instant::now() >= deadline {
                let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
                killed = true;
                break self.reap(true).expect("reap the killed tvctl");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let handles = self.output.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (stdout, stderr) = handles
            .map(|(o, e)| (o.join().unwrap_or_default(), e.join().unwrap_or_default()))
            .unwrap_or_default();
        let status = reaped.status;
        TvctlOutput {
            args: self.args.clone(),
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            elapsed: reaped.at - self.started,
            exited_at: reaped.at,
            maxrss_kib: reaped.maxrss_kib,
            killed,
            stdout,
            stderr,
        }
    }
}

/// Makes this process the reaper of its orphaned descendants (tvctl, once `sh` has exited).
fn become_subreaper() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl with integer arguments only; it changes no memory.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(
            r,
            0,
            "prctl(PR_SET_CHILD_SUBREAPER): {}",
            io::Error::last_os_error()
        );
    });
}

impl Drop for TvctlRun {
    fn drop(&mut self) {
        // A test that panicked before waiting must not leave tvctl running.
        if self.reap(false).is_none() {
            let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
            let _ = self.reap(true);
        }
    }
}

impl TvctlOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// stdout and stderr together, for "the message says ..." checks.
    pub fn all_text(&self) -> String {
        format!("{}\n{}", self.stdout_text(), self.stderr_text())
    }

    /// stdout as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.stdout).ok()
    }

    /// A panic message on stderr, or Rust's panic exit code.
    pub fn panicked(&self) -> bool {
        self.stderr_text().contains("panicked") || self.code == Some(101)
    }

    pub fn maxrss_mib(&self) -> f64 {
        self.maxrss_kib as f64 / 1024.0
    }

    /// How it ended, in words.
    pub fn ending(&self) -> String {
        let how = match (self.code, self.signal) {
            _ if self.killed => "still running: killed by the test".to_string(),
            (Some(c), _) => format!("exit {c}"),
            (_, Some(s)) => format!("killed by signal {s}"),
            _ => "ended somehow".to_string(),
        };
        format!(
            "{how} after {:.1} s, peak RSS {:.1} MiB",
            self.elapsed.as_secs_f64(),
            self.maxrss_mib()
        )
    }
}

impl fmt::Display for TvctlOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tvctl {}\n{}\n--- stdout ---\n{}\n--- stderr ---\n{}--- end ---",
            self.args.join(" "),
            self.ending(),
            shown(&self.stdout),
            shown(&self.stderr)
        )
    }
}

/// Bytes as text with control characters other than newline and tab escaped, so a failure
/// message never sends a guest's escape sequences to the terminal running the tests.
pub fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.push_str(&c.escape_default().to_string());
        } else {
            out.push(c);
        }
    }
    out
}
