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
use std::io::{self, ErrorKind};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::TestVm;

mod agent;
mod files;
mod run;

pub use agent::*;
pub use files::*;
pub use run::*;

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
        let vm = TestVm::define(tag, vcpus, super::boot_a_halting_disk);
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
