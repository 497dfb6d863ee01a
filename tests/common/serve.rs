//! What the serve tests need: a shell inside the built-in guest (the test plays the guest's
//! user), and `tvctl serve` run as a child process whose JSON log lines the test reads.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Device XML for a virtio-serial port named `tvctl.test.shell` on a unix socket; the guest's
/// init runs a root shell there when the kernel command line has `tvctl.shell=1`.
pub fn shell_port(socket: &Path) -> String {
    format!(
        "<channel type='unix'><source mode='bind' path='{}'/><target type='virtio' name='tvctl.test.shell'/></channel>",
        socket.display()
    )
}

/// A root shell in the guest, over a virtio-serial port.
pub struct GuestShell {
    stream: UnixStream,
    pending: String,
    n: u32,
    /// The socket, for messages.
    path: PathBuf,
}

impl GuestShell {
    /// Connects to the shell's socket and waits until the shell answers.
    pub fn connect(socket: &Path, timeout: Duration) -> GuestShell {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > timeout => {
                    panic!(
                        "cannot connect to the guest shell {}: {e}",
                        socket.display()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        let mut sh = GuestShell {
            stream,
            pending: String::new(),
            n: 0,
            path: socket.to_path_buf(),
        };
        // The shell may not run yet (or may have missed bytes while it started): ask until
        // it answers.
        loop {
            if sh.try_run("echo ready", Duration::from_secs(3)).is_some() {
                return sh;
            }
            if start.elapsed() > timeout {
                panic!("the guest shell on {} did not answer", socket.display());
            }
        }
    }

    /// Runs `cmd` in the guest shell; returns its exit status and output.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> (i32, String) {
        self.try_run(cmd, timeout).unwrap_or_else(|| {
            panic!(
                "guest command {cmd:?} did not finish within {timeout:?} (shell {}); output so far: {:?}",
                self.path.display(),
                self.pending
            )
        })
    }

    fn try_run(&mut self, cmd: &str, timeout: Duration) -> Option<(i32, String)> {
        self.n += 1;
        let marker = format!("__TVCTL_END_{}__", self.n);
        // The marker is split in the command, so an echo of the command cannot match it.
        let line = format!("{cmd}\necho \"__TVCTL_END_\"\"{}__ $?\"\n", self.n);
        self.stream.write_all(line.as_bytes()).ok()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.pending.find(&marker) {
                let out = self.pending[..at].to_string();
                let rest = &self.pending[at + marker.len()..];
                let end = rest.find('\n')?;
                let rc = rest[..end].trim().parse().unwrap_or(-1);
                self.pending = rest[end + 1..].to_string();
                return Some((rc, out));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let _ = self
                .stream
                .set_read_timeout(Some(left.min(Duration::from_millis(200))));
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.pending.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(_) => {}
            }
        }
    }
}

/// `tvctl serve --json` as a child process.
pub struct ServeProcess {
    pub child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    stderr: PathBuf,
}

impl ServeProcess {
    /// Starts `tvctl --dir root --json serve extra…` and waits for its `libvirt-connected`.
    pub fn start(root: &Path, extra: &[&str]) -> ServeProcess {
        let stderr = root.join(format!("serve-stderr-{}.log", std::process::id()));
        let child = Command::new(env!("CARGO_BIN_EXE_tvctl"))
            .arg("--dir")
            .arg(root)
            .args(["--json", "serve"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("serve stderr file"))
            .spawn()
            .expect("start tvctl serve");
        let mut child = child;
        let out = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("serve printed a line that is not JSON ({e}): {line}")
                });
                sink.lock().unwrap().push(v);
            }
        });
        let s = ServeProcess {
            child,
            lines,
            stderr,
        };
        s.wait_event("libvirt-connected", None, 0, Duration::from_secs(30));
        s
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    fn matching(&self, event: &str, domain: Option<&str>) -> Vec<Value> {
        self.log()
            .into_iter()
            .filter(|v| v["event"] == event)
            .filter(|v| domain.is_none_or(|d| v["domain"] == d))
            .collect()
    }

    /// How many `event` lines (of `domain`) were logged.
    pub fn count(&self, event: &str, domain: Option<&str>) -> usize {
        self.matching(event, domain).len()
    }

    /// Waits for the `(before + 1)`-th `event` line (of `domain`) and returns it.
    pub fn wait_event(
        &self,
        event: &str,
        domain: Option<&str>,
        before: usize,
        timeout: Duration,
    ) -> Value {
        let start = Instant::now();
        loop {
            if let Some(v) = self.matching(event, domain).into_iter().nth(before) {
                return v;
            }
            if start.elapsed() > timeout {
                panic!(
                    "tvctl serve logged no new {event:?} for {domain:?} within {timeout:?}\n{}",
                    self.report()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The log and stderr, for failure messages.
    pub fn report(&self) -> String {
        let log: Vec<String> = self.log().iter().map(Value::to_string).collect();
        format!(
            "--- serve log ---\n{}\n--- serve stderr ---\n{}",
            log.join("\n"),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// SIGTERM, then waits for the exit (at most `timeout`); returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> i32 {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("wait for serve") {
                return st.code().unwrap_or(-1);
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!(
                    "tvctl serve did not exit within {timeout:?} of SIGTERM\n{}",
                    self.report()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.report());
        }
    }
}
