//! A fake guest for the hostile-agent tests: a real, running libvirt domain whose guest end (the
//! agent on the control socket, the writers of the data FIFOs) is played by the test.
//!
//! [`FakeGuest`] defines the built-in guest with a boot sector that halts its vCPUs instead of
//! its kernel, runs the real `tvctl setup` on it and starts it: libvirt and QEMU create the
//! chardevs (QEMU binds `agent-ctl-path.sock` and opens every `trace-path-cpuN` FIFO) but no
//! guest code runs. The fixture then takes the control socket over (unlinks QEMU's and binds its
//! own listener at the same path) and holds a writer on every `trace-path-cpuN.out`, as QEMU
//! does. To `tvctl trace` this is a running, set-up domain whose agent answers on the control
//! socket. [`FakeAgent`] is one accepted connection: an agent that speaks the real wire
//! protocol through `tvctl::proto` and that a test scripts step by step, including every way of
//! breaking the protocol. [`TvctlRun`] runs the real `tvctl` binary with a deadline and reports
//! its exit, its time and its peak RSS (`wait4`). [`GuestFiles`] holds real formats and
//! ring-buffer pages from this host's tracefs, so a well-behaved fake yields a file
//! `trace-cmd report` reads.
//!
//! A tvctl that hangs is killed at the test's deadline; `TVCTL_HOSTILE_KILL_AFTER=SECS` leaves it
//! running longer, to watch where it would have ended.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tvctl::proto::{
    split_metadata, CpuStopped, ErrorCode, ErrorMessage, FrameDecoder, Hello, HelloReply, Message,
    Metadata, Pong, RecordRequest, Started, StopReason, Stopped, StreamMarker,
};
use tvctl::tracedat::PageLayout;

use super::TestVm;

/// How long a fake waits for tvctl to connect (a debug tvctl on a busy machine is slow to start).
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fake waits for an ordinary message from tvctl.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long to let tvctl run past `bound` (the time a test allows) before killing it.
pub fn kill_after(bound: Duration) -> Duration {
    let extra = std::env::var("TVCTL_HOSTILE_KILL_AFTER")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or_default();
    (bound + Duration::from_secs(5)).max(extra)
}

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

// ---------------------------------------------------------------------------------------------
// The domain whose guest end the test plays.

/// A running built-in guest with halted vCPUs, set up with the real `tvctl setup`, whose
/// control socket and data FIFOs belong to the test. Destroyed and undefined on drop.
pub struct FakeGuest {
    pub vm: TestVm,
    /// tvctl's `--dir`.
    pub root: PathBuf,
    /// The domain's folder: `root/<name>`.
    pub dir: PathBuf,
    pub vcpus: u32,
    listener: Option<UnixListener>,
    /// Writers on every `trace-path-cpuN.out`, held for the domain's life as QEMU holds them.
    fifos: BTreeMap<u32, File>,
}

impl FakeGuest {
    /// Defines the built-in guest with a halting boot sector instead of its kernel, sets it up
    /// (real `tvctl setup`), starts it, and takes over its control socket. Takes about a
    /// second.
    pub fn start(tag: &str, vcpus: u32) -> FakeGuest {
        let vm = TestVm::define(tag, vcpus, boot_a_halting_disk);
        let root = super::lab_root().join(format!("{}-root", vm.name));
        let dir = root.join(&vm.name);
        let mut guest = FakeGuest {
            vm,
            root,
            dir,
            vcpus,
            listener: None,
            fifos: BTreeMap::new(),
        };
        let name = guest.name().to_string();
        let setup = guest.tvctl(&["setup", &name]).wait(Duration::from_secs(60));
        assert_eq!(setup.code, Some(0), "tvctl setup failed:\n{setup}");
        guest.vm.start();
        let socket = guest.socket_path();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "QEMU did not create {} for the domain {name}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for cpu in 0..vcpus {
            let path = guest.fifo_path(cpu);
            let fifo = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
            guest.fifos.insert(cpu, fifo);
        }
        std::fs::remove_file(&socket).expect("unlink QEMU's control socket");
        let listener = UnixListener::bind(&socket)
            .unwrap_or_else(|e| panic!("bind {}: {e}", socket.display()));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        guest.listener = Some(listener);
        guest
    }

    pub fn name(&self) -> &str {
        &self.vm.name
    }

    /// The control socket (QEMU's path, our listener).
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("agent-ctl-path.sock")
    }

    /// `trace-path-cpuN.out`: guest → host data of CPU `cpu`.
    pub fn fifo_path(&self, cpu: u32) -> PathBuf {
        self.dir.join(format!("trace-path-cpu{cpu}.out"))
    }

    /// Closes the listener: connections to the socket are refused from now on, as when
    /// nothing in the guest ever answers.
    pub fn stop_listening(&mut self) {
        self.listener = None;
    }

    /// Runs the real tvctl with `--dir` set to this guest's root.
    pub fn tvctl(&self, args: &[&str]) -> TvctlRun {
        TvctlRun::spawn(&self.root, args)
    }

    /// `tvctl --json trace <domain> -o <out> <args>`.
    pub fn trace(&self, out: &Path, args: &[&str]) -> TvctlRun {
        self.trace_as(true, out, args)
    }

    /// `tvctl [--json] trace <domain> -o <out> <args>`.
    pub fn trace_as(&self, json: bool, out: &Path, args: &[&str]) -> TvctlRun {
        let out = out.to_str().expect("UTF-8 output path");
        let mut all = Vec::new();
        if json {
            all.push("--json");
        }
        all.extend_from_slice(&["trace", self.name(), "-o", out]);
        all.extend_from_slice(args);
        self.tvctl(&all)
    }

    /// Plays `script` as the agent on tvctl's connection while waiting for `run` to end (it
    /// is killed `kill_after` after its start). The script runs in a thread of its own, so a
    /// tvctl that hangs is killed on time whatever the script waits for, and its end (the
    /// socket closing) ends the script's waits. The connection closes when the script returns.
    pub fn play(
        &self,
        run: &TvctlRun,
        kill_after: Duration,
        script: impl FnOnce(&mut FakeAgent) -> Result<(), FakeError> + Send,
    ) -> (TvctlOutput, Played) {
        let fifos = self
            .fifos
            .iter()
            .map(|(&cpu, f)| (cpu, f.try_clone().expect("dup a FIFO writer")))
            .collect();
        let listener = self.listener.as_ref();
        let vcpus = self.vcpus;
        std::thread::scope(|scope| {
            let fake = scope.spawn(move || match accept(listener, run, ACCEPT_TIMEOUT) {
                Ok(sock) => {
                    let mut agent = FakeAgent::new(sock, vcpus, fifos);
                    let result = script(&mut agent);
                    let pings = (agent.pings_answered, agent.pings_ignored);
                    agent.note(format!("pings: {} answered, {} ignored", pings.0, pings.1));
                    Played {
                        result,
                        stop_at: agent.stop_at,
                        written: agent.written.clone(),
                        log: std::mem::take(&mut agent.log),
                    }
                }
                Err(e) => Played {
                    result: Err(e),
                    stop_at: None,
                    written: BTreeMap::new(),
                    log: Vec::new(),
                },
            });
            let res = run.wait(kill_after);
            let played = fake
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (res, played)
        })
    }
}

/// Waits for tvctl to connect (at most `timeout`, or until `run` ended).
fn accept(
    listener: Option<&UnixListener>,
    run: &TvctlRun,
    timeout: Duration,
) -> Result<UnixStream, FakeError> {
    let listener =
        listener.ok_or_else(|| FakeError::Unexpected("the fake is not listening".into()))?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((sock, _)) => {
                sock.set_nonblocking(false)?;
                return Ok(sock);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if run.has_exited() {
                    return Err(FakeError::HostExited);
                }
                if Instant::now() >= deadline {
                    return Err(FakeError::Timeout("tvctl to connect".into()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The built-in guest's XML with its kernel replaced by a 512-byte disk whose boot sector
/// halts the vCPU for good (`cli; hlt`): QEMU and its chardevs are real and the domain is
/// running, but no guest code of ours runs and the vCPUs cost nothing. (A paused domain would
/// not do: tvctl rightly excuses the silence of a paused guest's agent.)
fn boot_a_halting_disk(xml: &str, dir: &Path) -> String {
    let mut sector = vec![0u8; 512];
    sector[..4].copy_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp back to hlt
    sector[510..].copy_from_slice(&[0x55, 0xaa]);
    let disk = dir.join("halt.img");
    std::fs::write(&disk, &sector).expect("write the boot sector");
    let (Some(from), Some(to)) = (xml.find("<kernel>"), xml.find("</cmdline>")) else {
        panic!("the built-in guest's XML boots no kernel:\n{xml}");
    };
    let xml = format!(
        "{}<boot dev='hd'/>{}",
        &xml[..from],
        &xml[to + "</cmdline>".len()..]
    );
    super::with_devices(
        &xml,
        &format!(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
             <source file='{}'/><target dev='hda' bus='ide'/></disk>",
            disk.display()
        ),
    )
}

impl Drop for FakeGuest {
    fn drop(&mut self) {
        self.listener = None;
        self.fifos.clear();
        if std::env::var_os("TVCTL_KEEP_VM").is_some() {
            return;
        }
        // Destroy before removing the folder, so libvirt finds the files it restores.
        if self.vm.dom.is_active().unwrap_or(false) {
            let _ = self.vm.dom.destroy();
        }
        let _ = std::fs::remove_dir_all(&self.root);
        // TestVm's drop undefines the domain and removes its folder.
    }
}

/// What a fake's script did, for failure messages.
pub struct Played {
    pub result: Result<(), FakeError>,
    /// When tvctl's Stop arrived.
    pub stop_at: Option<Instant>,
    /// Bytes written after each CPU's marker.
    pub written: BTreeMap<u32, u64>,
    pub log: Vec<String>,
}

impl fmt::Display for Played {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "--- fake agent: {:?} ---", self.result)?;
        for line in &self.log {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// Why a fake's step did not happen. Scripts stop at the first one; the test then judges tvctl.
#[derive(Debug)]
pub enum FakeError {
    /// tvctl closed the connection (or it broke).
    HostClosed,
    /// tvctl exited before connecting.
    HostExited,
    Timeout(String),
    Unexpected(String),
    Io(io::Error),
}

impl From<io::Error> for FakeError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => {
                FakeError::HostClosed
            }
            _ => FakeError::Io(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's side of one connection.

/// One connection from tvctl, played by the test. Pings are answered while `answer_pings` is
/// set; every other message is returned to the script.
pub struct FakeAgent {
    sock: UnixStream,
    decoder: FrameDecoder,
    /// Messages read while only Pings were wanted, returned by the next `recv`.
    backlog: std::collections::VecDeque<Message>,
    version: u16,
    vcpus: u32,
    fifos: BTreeMap<u32, File>,
    /// The reply sent to the first Hello, sent again to a repeated Hello (as the agent does).
    reply: Option<HelloReply>,
    pub hello: Option<Hello>,
    pub request: Option<RecordRequest>,
    /// The page size the fake announced (HelloReply) and writes in its markers.
    pub page_size: u32,
    pub answer_pings: bool,
    pub pings_answered: u32,
    pub pings_ignored: u32,
    /// CPUs whose stream was started (marker written), in order.
    pub streamed: Vec<u32>,
    /// Bytes written after the marker, per CPU.
    pub written: BTreeMap<u32, u64>,
    /// Metadata sent right after Started, and before Stopped; scripts may edit them first.
    pub static_files: Vec<(String, Vec<u8>)>,
    pub final_files: Vec<(String, Vec<u8>)>,
    /// When Stop arrived.
    pub stop_at: Option<Instant>,
    pub log: Vec<String>,
}

impl FakeAgent {
    fn new(sock: UnixStream, vcpus: u32, fifos: BTreeMap<u32, File>) -> FakeAgent {
        let files = guest_files();
        FakeAgent {
            sock,
            decoder: FrameDecoder::new(),
            backlog: std::collections::VecDeque::new(),
            version: tvctl::proto::PROTOCOL_VERSION,
            vcpus,
            fifos,
            reply: None,
            hello: None,
            request: None,
            page_size: files.page_size,
            answer_pings: true,
            pings_answered: 0,
            pings_ignored: 0,
            streamed: Vec::new(),
            written: BTreeMap::new(),
            static_files: files.static_metadata(),
            final_files: files.final_metadata(),
            stop_at: None,
            log: vec!["accepted tvctl's connection".into()],
        }
    }

    pub fn note(&mut self, line: impl Into<String>) {
        if self.log.len() < 200 {
            self.log.push(line.into());
        }
    }

    // --- receiving ---

    /// The next message from tvctl other than a Ping (Pings are answered or ignored here).
    pub fn recv(&mut self, timeout: Duration) -> Result<Message, FakeError> {
        match self.backlog.pop_front() {
            Some(msg) => Ok(msg),
            None => self.recv_from_socket(timeout),
        }
    }

    /// [`recv`](Self::recv) from the socket only, not the backlog.
    fn recv_from_socket(&mut self, timeout: Duration) -> Result<Message, FakeError> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.decoder.next_message() {
                Ok(Some((_, Message::Ping(p)))) => {
                    if self.answer_pings {
                        self.pings_answered += 1;
                        let pong = Pong {
                            nonce: p.nonce,
                            clock: "local".into(),
                            ts: monotonic_ns(),
                        };
                        self.send(pong)?;
                    } else {
                        self.pings_ignored += 1;
                    }
                    continue;
                }
                Ok(Some((_, msg))) => {
                    self.note(format!("tvctl sent {:?}", msg.kind()));
                    if matches!(msg, Message::Stop) && self.stop_at.is_none() {
                        self.stop_at = Some(Instant::now());
                    }
                    return Ok(msg);
                }
                Ok(None) => {}
                Err(e) if e.is_fatal() => {
                    return Err(FakeError::Unexpected(format!(
                        "tvctl sent a broken frame: {e}"
                    )))
                }
                Err(e) => {
                    self.note(format!("tvctl sent a frame the fake cannot use: {e}"));
                    continue;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FakeError::Timeout("a message from tvctl".into()));
            }
            self.sock.set_read_timeout(Some(left))?;
            let want = buf.len().min(self.decoder.space().max(1));
            match self.sock.read(&mut buf[..want]) {
                Ok(0) => return Err(FakeError::HostClosed),
                Ok(n) => {
                    self.decoder.push(&buf[..n]);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(FakeError::Timeout("a message from tvctl".into()))
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Answers the Pings that have arrived, without waiting; keeps other messages for `recv`.
    pub fn answer_pending_pings(&mut self) -> Result<(), FakeError> {
        loop {
            match self.recv_from_socket(Duration::from_millis(1)) {
                Ok(msg) => self.backlog.push_back(msg),
                Err(FakeError::Timeout(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for tvctl's Hello.
    pub fn expect_hello(&mut self, timeout: Duration) -> Result<Hello, FakeError> {
        match self.recv(timeout)? {
            Message::Hello(h) => {
                self.hello = Some(h.clone());
                Ok(h)
            }
            other => Err(FakeError::Unexpected(format!(
                "{:?} where Hello was expected",
                other.kind()
            ))),
        }
    }

    /// The reply a real agent would give to the Hello received.
    pub fn hello_reply(&self) -> HelloReply {
        let hello = self.hello.as_ref().expect("expect_hello first");
        HelloReply {
            version: hello.max_version.min(tvctl::proto::PROTOCOL_VERSION),
            nonce: hello.nonce,
            agent_version: "fake-agent (tests/common/fake_guest.rs)".into(),
            kernel_release: guest_files().kernel_release.clone(),
            cpus: self.vcpus,
            page_size: guest_files().page_size,
            trace_clocks: ["local", "global", "mono", "x86-tsc"]
                .map(String::from)
                .to_vec(),
            data_ports: (0..self.vcpus).collect(),
        }
    }

    pub fn reply_hello(&mut self, reply: HelloReply) -> Result<(), FakeError> {
        self.version = reply.version;
        self.page_size = reply.page_size;
        self.reply = Some(reply.clone());
        self.send(reply)
    }

    /// Hello, and the reply a real agent would give.
    pub fn handshake(&mut self) -> Result<(), FakeError> {
        self.expect_hello(REPLY_TIMEOUT)?;
        let reply = self.hello_reply();
        self.reply_hello(reply)
    }

    /// Waits for the RecordRequest (answering repeated Hellos meanwhile, as the agent does).
    pub fn expect_record_request(&mut self, timeout: Duration) -> Result<RecordRequest, FakeError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Message::RecordRequest(r) => {
                    self.request = Some(r.clone());
                    return Ok(r);
                }
                Message::Hello(h) => {
                    if let Some(mut reply) = self.reply.clone() {
                        reply.nonce = h.nonce;
                        self.send(reply)?;
                    }
                }
                other => {
                    return Err(FakeError::Unexpected(format!(
                        "{:?} where RecordRequest was expected",
                        other.kind()
                    )))
                }
            }
        }
    }

    /// Answers Pings until Stop arrives (other messages are noted and ignored).
    pub fn serve_until_stop(&mut self, timeout: Duration) -> Result<(), FakeError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Message::Stop = self.recv(left)? {
                return Ok(());
            }
        }
    }

    /// Answers Pings for `how_long` (Stop or Close end it early: Err(Unexpected)).
    pub fn serve_pings_for(&mut self, how_long: Duration) -> Result<(), FakeError> {
        let deadline = Instant::now() + how_long;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            match self.recv(left) {
                Ok(Message::Stop) | Ok(Message::Close) => {
                    return Err(FakeError::Unexpected(
                        "tvctl stopped while the fake was answering pings".into(),
                    ))
                }
                Ok(_) => {}
                Err(FakeError::Timeout(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Answers Pings while `go_on()` says so, at most `max` (Stop or Close: Err(Unexpected)).
    pub fn serve_pings_while(
        &mut self,
        mut go_on: impl FnMut() -> bool,
        max: Duration,
    ) -> Result<(), FakeError> {
        let deadline = Instant::now() + max;
        while go_on() && Instant::now() < deadline {
            self.serve_pings_for(Duration::from_millis(100))?;
        }
        Ok(())
    }

    /// Answers nothing more (keeps reading, so tvctl's writes never block) until tvctl closes
    /// the connection, at most `max`.
    pub fn go_silent_until_closed(&mut self, max: Duration) -> Result<(), FakeError> {
        self.answer_pings = false;
        self.note("going silent");
        let deadline = Instant::now() + max;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Ok(_) => {}
                Err(FakeError::HostClosed) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for Close (or the end of the connection).
    pub fn expect_close(&mut self, timeout: Duration) -> Result<(), FakeError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Ok(Message::Close) | Err(FakeError::HostClosed) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    }

    // --- sending ---

    pub fn send(&mut self, msg: impl Into<Message>) -> Result<(), FakeError> {
        let msg = msg.into();
        let frame = msg
            .encode_frame(self.version)
            .map_err(|e| FakeError::Unexpected(format!("encode {:?}: {e}", msg.kind())))?;
        self.send_raw(&frame)
    }

    /// Bytes as they are, on the control socket.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), FakeError> {
        self.sock.set_write_timeout(Some(REPLY_TIMEOUT))?;
        self.sock.write_all(bytes).map_err(FakeError::from)
    }

    /// One file as Metadata chunks.
    pub fn send_metadata(&mut self, name: &str, data: &[u8]) -> Result<(), FakeError> {
        let chunks = split_metadata(name, data)
            .map_err(|e| FakeError::Unexpected(format!("split {name}: {e}")))?;
        for chunk in chunks {
            self.send(chunk)?;
        }
        Ok(())
    }

    pub fn send_error(&mut self, code: ErrorCode, text: &str) -> Result<(), FakeError> {
        self.send(ErrorMessage {
            code,
            text: text.into(),
        })
    }

    /// `Started` as a real agent sends it for the streamed CPUs.
    pub fn started(&self) -> Started {
        let request = self.request.as_ref();
        Started {
            instance: "tvctl-fake".into(),
            events: vec!["sched:sched_switch".into()],
            cpus: self.streamed.clone(),
            buffer_kb: request.and_then(|r| r.buffer_kb).unwrap_or(1408),
            clock: request
                .and_then(|r| r.clock.clone())
                .unwrap_or_else(|| "local".into()),
            splice: true,
            note: String::new(),
        }
    }

    /// `Stopped` with the byte counts written and a plausible stats text per streamed CPU.
    pub fn stopped(&self) -> Stopped {
        Stopped {
            reason: StopReason::HostRequest,
            command_status: None,
            cpus: self
                .streamed
                .iter()
                .map(|&cpu| cpu_stopped(cpu, self.written.get(&cpu).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// Floods Metadata with empty files named by `name(i)`, as fast as tvctl takes them, until
    /// `count` were sent, `max` passed, or tvctl hung up. Returns how many were sent.
    pub fn flood_empty_metadata(
        &mut self,
        count: usize,
        name: impl Fn(usize) -> String,
        max: Duration,
    ) -> Result<usize, FakeError> {
        const BATCH: usize = 4096;
        let deadline = Instant::now() + max;
        let mut sent = 0;
        let mut batch = Vec::with_capacity(BATCH * 64);
        // A batch is always written whole: a frame cut in two would desynchronise the stream.
        self.sock.set_write_timeout(Some(Duration::from_secs(30)))?;
        while sent < count && Instant::now() < deadline {
            batch.clear();
            let end = (sent + BATCH).min(count);
            for i in sent..end {
                let frame = Message::Metadata(Metadata {
                    name: name(i),
                    total_len: 0,
                    offset: 0,
                    data: Vec::new(),
                })
                .encode_frame(self.version)
                .map_err(|e| FakeError::Unexpected(format!("encode: {e}")))?;
                batch.extend_from_slice(&frame);
            }
            match self.sock.write_all(&batch) {
                // Between batches the agent still answers Pings: only the flood is wrong.
                Ok(()) => {
                    sent = end;
                    match self.answer_pending_pings() {
                        Ok(()) => {}
                        Err(FakeError::HostClosed) => return Ok(sent),
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => {
                    self.note(format!("flood ended after {sent} files: {e}"));
                    return match FakeError::from(e) {
                        FakeError::HostClosed => Ok(sent),
                        other => Err(other),
                    };
                }
            }
        }
        self.note(format!("flooded {sent} empty metadata files"));
        Ok(sent)
    }

    // --- data streams ---

    /// The nonce of the RecordRequest received.
    fn stream_nonce(&self) -> u64 {
        self.request
            .as_ref()
            .expect("expect_record_request first")
            .stream_nonce
    }

    /// Writes the start marker of this recording to CPU `cpu`'s FIFO.
    pub fn write_marker(&mut self, cpu: u32) -> Result<(), FakeError> {
        let marker = StreamMarker {
            stream_nonce: self.stream_nonce(),
            cpu,
            page_size: self.page_size,
        };
        let fifo = self.fifo(cpu)?;
        let n = write_fifo(&fifo, &marker.to_bytes(), Instant::now() + REPLY_TIMEOUT)?;
        if n != StreamMarker::LEN {
            return Err(FakeError::Timeout(format!("tvctl to read cpu{cpu}'s FIFO")));
        }
        if !self.streamed.contains(&cpu) {
            self.streamed.push(cpu);
        }
        self.written.entry(cpu).or_insert(0);
        Ok(())
    }

    /// Writes `data` after the marker (counted in `written`).
    pub fn write_data(&mut self, cpu: u32, data: &[u8]) -> Result<(), FakeError> {
        let fifo = self.fifo(cpu)?;
        let n = write_fifo(&fifo, data, Instant::now() + REPLY_TIMEOUT)?;
        *self.written.entry(cpu).or_insert(0) += u64::try_from(n).expect("usize fits in u64");
        if n != data.len() {
            return Err(FakeError::Timeout(format!(
                "tvctl to read cpu{cpu}'s FIFO ({n} of {} bytes written)",
                data.len()
            )));
        }
        Ok(())
    }

    /// Marker, then `data`.
    pub fn write_stream(&mut self, cpu: u32, data: &[u8]) -> Result<(), FakeError> {
        self.write_marker(cpu)?;
        self.write_data(cpu, data)
    }

    /// A writer of this CPU's FIFO (a new descriptor of the one the fixture holds).
    pub fn fifo(&self, cpu: u32) -> Result<File, FakeError> {
        let fifo = self
            .fifos
            .get(&cpu)
            .ok_or_else(|| FakeError::Unexpected(format!("no FIFO for cpu{cpu}")))?;
        Ok(fifo.try_clone()?)
    }

    /// Streams real pages to CPU `cpu` in the background (after its marker), from page index
    /// `first` on, until stopped, `max_bytes` written, or `max_time` passed.
    pub fn stream_pages(
        &self,
        cpu: u32,
        first: usize,
        max_bytes: u64,
        max_time: Duration,
    ) -> Result<Streamer, FakeError> {
        let fifo = self.fifo(cpu)?;
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (t_stop, t_written) = (Arc::clone(&stop), Arc::clone(&written));
        let handle = std::thread::spawn(move || {
            let files = guest_files();
            let deadline = Instant::now() + max_time;
            let mut index = first;
            while !t_stop.load(Ordering::SeqCst)
                && t_written.load(Ordering::SeqCst) < max_bytes
                && Instant::now() < deadline
            {
                let page = files.page(cpu, index);
                // One page is PIPE_BUF: a non-blocking write takes all of it or nothing.
                match nix::unistd::write(fifo.as_fd(), &page) {
                    Ok(n) => {
                        t_written.fetch_add(u64::try_from(n).unwrap_or(0), Ordering::SeqCst);
                        if n == page.len() {
                            index += 1;
                        } else {
                            return; // a partial page would make the count meaningless
                        }
                    }
                    Err(Errno::EAGAIN) | Err(Errno::EINTR) => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(Streamer {
            cpu,
            stop,
            written,
            handle: Some(handle),
        })
    }

    /// Stops a background streamer and counts what it wrote.
    pub fn stop_streamer(&mut self, streamer: Streamer) -> u64 {
        let cpu = streamer.cpu;
        let n = streamer.stop();
        *self.written.entry(cpu).or_insert(0) += n;
        n
    }

    // --- whole phases ---

    /// The start of every recording: handshake, then [`record`](Self::record).
    pub fn start_recording_with(
        &mut self,
        data: &[(u32, Vec<u8>)],
        edit: impl FnOnce(&mut Started),
    ) -> Result<(), FakeError> {
        self.handshake()?;
        self.record(data, edit)
    }

    /// After the handshake: RecordRequest, marker and `data` on each CPU listed, Started (as
    /// `edit` leaves it), and the static metadata.
    pub fn record(
        &mut self,
        data: &[(u32, Vec<u8>)],
        edit: impl FnOnce(&mut Started),
    ) -> Result<(), FakeError> {
        self.expect_record_request(REPLY_TIMEOUT)?;
        for (cpu, bytes) in data {
            self.write_stream(*cpu, bytes)?;
        }
        let mut started = self.started();
        edit(&mut started);
        self.send(started)?;
        for (name, file) in std::mem::take(&mut self.static_files) {
            self.send_metadata(&name, &file)?;
        }
        Ok(())
    }

    pub fn start_recording(&mut self, data: &[(u32, Vec<u8>)]) -> Result<(), FakeError> {
        self.start_recording_with(data, |_| {})
    }

    /// The metadata sent after tracing stopped (saved_cmdlines, saved_tgids).
    pub fn send_final_metadata(&mut self) -> Result<(), FakeError> {
        for (name, file) in std::mem::take(&mut self.final_files) {
            self.send_metadata(&name, &file)?;
        }
        Ok(())
    }

    /// The end of a recording: the final metadata, `stopped`, then tvctl's Close.
    pub fn finish_with(&mut self, stopped: Stopped) -> Result<(), FakeError> {
        self.send_final_metadata()?;
        self.send(stopped)?;
        self.expect_close(Duration::from_secs(60))
    }

    /// [`finish_with`](Self::finish_with) the byte counts written.
    pub fn finish(&mut self) -> Result<(), FakeError> {
        let stopped = self.stopped();
        self.finish_with(stopped)
    }

    /// A well-behaved recording of `data`: start, answer Pings until Stop, finish.
    pub fn well_behaved(&mut self, data: &[(u32, Vec<u8>)]) -> Result<(), FakeError> {
        self.start_recording(data)?;
        self.serve_until_stop(Duration::from_secs(60))?;
        self.finish()
    }
}

/// Writes as much of `data` as tvctl reads before `deadline`; returns how much that was.
fn write_fifo(fifo: &File, data: &[u8], deadline: Instant) -> Result<usize, FakeError> {
    let mut done = 0;
    while done < data.len() {
        match nix::unistd::write(fifo.as_fd(), &data[done..]) {
            Ok(n) => done += n,
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {
                if Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io::Error::from(e).into()),
        }
    }
    Ok(done)
}

/// Pages written by a background thread; see [`FakeAgent::stream_pages`].
pub struct Streamer {
    cpu: u32,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Streamer {
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// The thread ended by itself (limit reached, or its FIFO failed).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Stops the thread; returns the bytes it wrote.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.written()
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0)
}

/// One CPU's entry of `Stopped`: `bytes` sent, nothing lost.
pub fn cpu_stopped(cpu: u32, bytes: u64) -> CpuStopped {
    CpuStopped {
        cpu,
        bytes,
        entries: 0,
        overrun: 0,
        commit_overrun: 0,
        dropped_events: 0,
        read_events: 0,
        stats_text: stats_text(bytes),
    }
}

/// A `per_cpu/cpuN/stats` text as the kernel writes it.
pub fn stats_text(bytes: u64) -> String {
    format!(
        "entries: 0\noverrun: 0\ncommit overrun: 0\nbytes: {bytes}\noldest event ts:     0.000000\n\
         now ts:     1.000000\ndropped events: 0\nread events: 0\n"
    )
}

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

/// Reads a tracefs file with 64 KiB reads (some report size 0, so `fs::read` gets nothing).
fn read_tracefs(path: &Path) -> Vec<u8> {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut data = Vec::new();
    let mut chunk = vec![0; 1 << 16];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => return data,
            Ok(n) => data.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("read {}: {e}", path.display()),
        }
    }
}

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
