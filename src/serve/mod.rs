//! `tvctl serve`: a daemon that serves every set-up domain, so that users inside guests can
//! record (`tvctl-agent record`) with no host command per recording.
//!
//! - libvirt's domain events (not polling) say when domains start and stop; after a libvirtd
//!   restart serve reconnects with a backoff, subscribes, then lists the running domains and
//!   reconciles (docs/serve-design.md).
//! - One session thread per running set-up domain ([`session`]): it holds the domain's lock
//!   and its control channel, keeps the agent alive with pings, reconnects after an agent
//!   restart or a guest reboot, and runs the recordings the guest offers with the same code
//!   as `tvctl trace` (`collect::recorder`, `trace::{record_until_stop, stop_and_drain,
//!   write_and_count}`).
//! - Its socket ([`socket`]) answers `tvctl status`, and lends a domain to `tvctl trace`,
//!   `setup` or `teardown`, taking it back when they are done.
//! - One log line per event on stdout (`--json`: JSON lines, docs/json.md). SIGTERM or Ctrl-C:
//!   running recordings are stopped and their files written, then serve exits 0.

pub mod files; // recording paths (host-chosen), guest names sanitised, bytes used
pub mod session; // one domain: lock, channel, keep-alive, reconnect, recordings
pub mod socket; // serve's socket: status and lending

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use crate::exitcode::ExitCode;
use crate::libvirt::events::{DomainEventKind, DomainEvents, Event};
use crate::libvirt::Hypervisor;

use session::{Cmd, DomainFlags, Session, SessionCtx};

/// What `tvctl serve` was asked.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub uri: String,
    /// Root of the per-domain folders: only domains set up under it are served.
    pub dir: PathBuf,
    /// Most bytes of recordings kept per domain (`recordings/`).
    pub max_bytes: Option<u64>,
    pub json: bool,
}

/// Why serve could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("another tvctl serve runs for {dir} ({socket}): stop it first, or give another --dir")]
    AlreadyRunning { dir: String, socket: String },
    #[error("cannot listen on {socket}: {source}")]
    Socket {
        socket: String,
        #[source]
        source: std::io::Error,
    },
}

impl ServeError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            ServeError::AlreadyRunning { .. } => ExitCode::Busy,
            ServeError::Socket { .. } => ExitCode::HostFileConflict,
        }
    }
}

/// Serve's log: one line per event, for people or as JSON lines.
#[derive(Debug, Clone)]
pub struct Log {
    json: bool,
    out: Arc<Mutex<()>>,
}

impl Log {
    pub fn new(json: bool) -> Log {
        Log {
            json,
            out: Arc::new(Mutex::new(())),
        }
    }

    /// Logs `event` (`connected`, `gone`, `recording-started`, …) of `domain` with `fields`;
    /// `text` is the line for people.
    pub fn event(&self, event: &str, domain: Option<&str>, fields: Value, text: &str) {
        let time = files::rfc3339(SystemTime::now());
        let line = if self.json {
            let mut obj = json!({ "time": time, "event": event });
            if let Some(d) = domain {
                obj["domain"] = json!(d);
            }
            if let Value::Object(extra) = fields {
                for (k, v) in extra {
                    obj[k] = v;
                }
            }
            obj.to_string()
        } else {
            match domain {
                Some(d) => format!("{time} {d}: {text}"),
                None => format!("{time} {text}"),
            }
        };
        let _guard = self.out.lock();
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    }
}

/// Runs serve until SIGTERM/SIGINT; 0 when it ended cleanly.
pub fn run(opts: &ServeOptions) -> Result<ExitCode, ServeError> {
    crate::trace::install_signal_counter();
    let log = Log::new(opts.json);
    let sock_path = socket::socket_path(&opts.dir);
    let listener = socket::bind(&sock_path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            ServeError::AlreadyRunning {
                dir: opts.dir.display().to_string(),
                socket: sock_path.display().to_string(),
            }
        } else {
            ServeError::Socket {
                socket: sock_path.display().to_string(),
                source,
            }
        }
    })?;
    let shutdown = Arc::new(AtomicBool::new(false));
    let table: Table = Arc::new(Mutex::new(BTreeMap::new()));
    log.event(
        "serve-started",
        None,
        json!({ "pid": std::process::id(), "dir": opts.dir, "socket": sock_path, "max_bytes": opts.max_bytes }),
        &format!(
            "tvctl serve (pid {}) serves domains set up under {} (socket {})",
            std::process::id(),
            opts.dir.display(),
            sock_path.display()
        ),
    );
    {
        let table = table.clone();
        let shutdown = shutdown.clone();
        std::thread::Builder::new()
            .name("serve-socket".into())
            .spawn(move || accept_loop(listener, table, shutdown))
            .ok();
    }
    let mut daemon = Daemon {
        opts: opts.clone(),
        log: log.clone(),
        shutdown: shutdown.clone(),
        table: table.clone(),
        events: None,
        hv: None,
        next_attempt: Instant::now(),
        backoff: Duration::from_millis(500),
    };
    daemon.main_loop();
    // Shutting down: every session stops its recording, writes the file, and ends.
    shutdown.store(true, Ordering::SeqCst);
    let sessions: Vec<Session> = std::mem::take(&mut *lock(&table)).into_values().collect();
    for s in sessions {
        s.join();
    }
    let _ = std::fs::remove_file(&sock_path);
    log.event("serve-stopped", None, json!({}), "tvctl serve stopped");
    Ok(ExitCode::Ok)
}

/// The sessions, by domain name.
pub(crate) type Table = Arc<Mutex<BTreeMap<String, Session>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Daemon {
    opts: ServeOptions,
    log: Log,
    shutdown: Arc<AtomicBool>,
    table: Table,
    events: Option<DomainEvents>,
    hv: Option<Hypervisor>,
    next_attempt: Instant,
    backoff: Duration,
}

impl Daemon {
    fn main_loop(&mut self) {
        let signals_at_start = crate::trace::signals();
        loop {
            if crate::trace::signals() > signals_at_start {
                self.log.event(
                    "stopping",
                    None,
                    json!({}),
                    "stopping: finishing running recordings",
                );
                return;
            }
            self.reap_finished();
            if self.events.is_none() {
                if Instant::now() >= self.next_attempt {
                    self.connect_libvirt();
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let got = self
                .events
                .as_ref()
                .map(|e| e.recv_timeout(Duration::from_millis(200)));
            match got {
                Some(Ok(Event::Lifecycle(ev))) => match ev.kind {
                    DomainEventKind::Started => self.domain_started(&ev.name),
                    DomainEventKind::Stopped => self.domain_stopped(&ev.name),
                    DomainEventKind::Suspended => self.set_paused(&ev.name, true),
                    DomainEventKind::Resumed => self.set_paused(&ev.name, false),
                    DomainEventKind::Other(_) => {}
                },
                Some(Ok(Event::ConnectionLost(reason))) => {
                    self.log.event(
                        "libvirt-lost",
                        None,
                        json!({ "reason": format!("{reason:?}") }),
                        &format!("lost libvirtd ({reason:?}); reconnecting (recordings go on)"),
                    );
                    self.events = None;
                    self.hv = None;
                    self.backoff = Duration::from_millis(500);
                    self.next_attempt = Instant::now() + self.backoff;
                }
                Some(Ok(_)) | Some(Err(mpsc::RecvTimeoutError::Timeout)) | None => {}
                Some(Err(mpsc::RecvTimeoutError::Disconnected)) => {
                    self.events = None;
                    self.hv = None;
                }
            }
        }
    }

    /// Subscribes first, then lists the running domains, so no start falls in between.
    fn connect_libvirt(&mut self) {
        let opened = DomainEvents::open(&self.opts.uri)
            .and_then(|ev| Hypervisor::connect(&self.opts.uri).map(|hv| (ev, hv)));
        match opened {
            Ok((events, hv)) => {
                self.log.event(
                    "libvirt-connected",
                    None,
                    json!({ "uri": self.opts.uri }),
                    &format!("connected to libvirt at {}", self.opts.uri),
                );
                self.events = Some(events);
                self.hv = Some(hv);
                self.reconcile();
            }
            Err(e) => {
                if self.backoff <= Duration::from_millis(500) {
                    self.log.event(
                        "libvirt-unreachable",
                        None,
                        json!({ "error": e.to_string() }),
                        &format!("cannot reach libvirt ({e}); retrying"),
                    );
                }
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(Duration::from_secs(10));
            }
        }
    }

    /// Starts sessions for running set-up domains that lack one; ends those of domains that
    /// no longer run.
    fn reconcile(&mut self) {
        let Some(hv) = &self.hv else {
            return;
        };
        let running: Vec<String> = hv
            .domain_names()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| hv.lookup(n).and_then(|d| d.is_active()).unwrap_or(false))
            .collect();
        let served: Vec<String> = lock(&self.table).keys().cloned().collect();
        for name in served {
            if !running.contains(&name) {
                self.domain_stopped(&name);
            }
        }
        for name in running {
            self.domain_started(&name);
        }
    }

    /// A domain started (or runs): serve it if it is set up under our folder.
    fn domain_started(&mut self, name: &str) {
        if lock(&self.table).contains_key(name) {
            return;
        }
        let Some(hv) = &self.hv else {
            return;
        };
        let Some(folder) = set_up_folder(hv, &self.opts.dir, name) else {
            return;
        };
        let ctx = SessionCtx {
            domain: name.to_string(),
            root: self.opts.dir.clone(),
            folder,
            max_bytes: self.opts.max_bytes,
            log: self.log.clone(),
            shutdown: self.shutdown.clone(),
            flags: Arc::new(DomainFlags::default()),
        };
        let session = Session::spawn(ctx);
        lock(&self.table).insert(name.to_string(), session);
    }

    fn domain_stopped(&mut self, name: &str) {
        if let Some(s) = lock(&self.table).get(name) {
            s.flags.gone.store(true, Ordering::SeqCst);
        }
    }

    fn set_paused(&mut self, name: &str, paused: bool) {
        if let Some(s) = lock(&self.table).get(name) {
            s.flags.paused.store(paused, Ordering::SeqCst);
        }
    }

    /// Joins sessions whose thread ended (their domain stopped).
    fn reap_finished(&mut self) {
        let done: Vec<String> = lock(&self.table)
            .iter()
            .filter(|(_, s)| s.is_finished())
            .map(|(n, _)| n.clone())
            .collect();
        for name in done {
            let session = lock(&self.table).remove(&name);
            if let Some(s) = session {
                s.join();
            }
            // A domain destroyed and started again quickly: its Started may have come while
            // the old session was ending.
            if let Some(hv) = &self.hv {
                if hv
                    .lookup(&name)
                    .and_then(|d| d.is_active())
                    .unwrap_or(false)
                {
                    self.domain_started(&name);
                }
            }
        }
    }
}

/// The domain's folder when it is set up under `root` and runs with our control channel:
/// its live XML's `agent-ctl-path` socket is `<root>/<name>/agent-ctl-path.sock`.
fn set_up_folder(hv: &Hypervisor, root: &std::path::Path, name: &str) -> Option<PathBuf> {
    let xml = hv.lookup(name).ok()?.live_xml().ok()?;
    let channels = crate::domxml::our_channels(&xml).ok()?;
    let control = channels
        .iter()
        .find(|c| c.kind == crate::domxml::ChannelKind::Control)?;
    let path = PathBuf::from(control.path.as_ref()?);
    let folder = root.join(name);
    (path.parent() == Some(folder.as_path()) && folder.is_dir()).then_some(folder)
}

/// Serves the socket: each connection on its own thread.
fn accept_loop(
    listener: std::os::unix::net::UnixListener,
    table: Table,
    shutdown: Arc<AtomicBool>,
) {
    for stream in listener.incoming() {
        if shutdown.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else {
            continue;
        };
        if !socket::peer_is_root(&stream) {
            continue;
        }
        let table = table.clone();
        std::thread::Builder::new()
            .name("serve-client".into())
            .spawn(move || serve_client(stream, &table))
            .ok();
    }
}

fn serve_client(mut stream: UnixStream, table: &Table) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let Some(req) = socket::read_request(&mut reader) else {
        return;
    };
    match req {
        socket::Request::Status => {
            let domains = lock(table).values().map(|s| s.state()).collect::<Vec<_>>();
            let _ = socket::write_answer(
                &mut stream,
                &socket::Answer {
                    ok: true,
                    pid: Some(std::process::id()),
                    domains,
                    ..socket::Answer::default()
                },
            );
        }
        socket::Request::Lend { domain, pid, what } => {
            let cmds = lock(table).get(&domain).map(|s| s.cmds.clone());
            let Some(cmds) = cmds else {
                // Not served: nothing to release.
                let _ = socket::write_answer(&mut stream, &ok_answer());
                return;
            };
            let (reply_tx, reply_rx) = mpsc::channel();
            let borrower = format!("tvctl {what} (pid {pid})");
            if cmds
                .send(Cmd::Lend {
                    borrower,
                    reply: reply_tx,
                })
                .is_err()
            {
                let _ = socket::write_answer(&mut stream, &ok_answer());
                return;
            }
            let answer = match reply_rx.recv_timeout(Duration::from_secs(15)) {
                Ok(Ok(())) => ok_answer(),
                Ok(Err(text)) => socket::Answer {
                    ok: false,
                    error: Some(text),
                    ..socket::Answer::default()
                },
                Err(_) => socket::Answer {
                    ok: false,
                    error: Some("tvctl serve did not release the domain in time".into()),
                    ..socket::Answer::default()
                },
            };
            let lent = answer.ok;
            let _ = socket::write_answer(&mut stream, &answer);
            if lent {
                // Held until the borrower closes its end (or dies).
                let mut sink = [0u8; 256];
                while matches!(std::io::Read::read(&mut reader, &mut sink), Ok(n) if n > 0) {}
                let _ = cmds.send(Cmd::TakeBack);
            }
        }
    }
}

fn ok_answer() -> socket::Answer {
    socket::Answer {
        ok: true,
        ..socket::Answer::default()
    }
}
