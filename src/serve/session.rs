//! One served domain: its lock, its control channel, and the recordings its guest asks for.
//!
//! The session thread loops: take the domain's lock (waiting while another tvctl holds it),
//! connect and handshake, say `ServeReady`, then keep the agent alive with a `Ping` every
//! second. An agent that stays silent for [`SILENCE`] (it restarted, or the guest rebooted:
//! a new agent ignores everything until a `Hello`) is handshaken again; a channel QEMU closes
//! ends the session once libvirt says the domain stopped. A `RecordOffer` runs one recording
//! with `tvctl trace`'s code and answers `RecordDone`. A lend request (from `tvctl trace`,
//! `setup`, `teardown`) closes the session and releases the lock until the borrower is done.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::collect::guest_input::clean_text;
use crate::collect::progress::Progress;
use crate::collect::recorder::{Recorder, RecorderConfig, Watch};
use crate::collect::stream::ByteBudget;
use crate::control::{random_u64, ControlChannel, ControlError};
use crate::lock::{DomainLock, LockError};
use crate::proto::{Message, OfferAnswer, Ping, RecordDone, RecordOffer, ServeReady};
use crate::trace::summary::StopCause;
use crate::trace::{
    record_until_stop, scratch_next_to, stop_and_drain, summarise, summary_exit_code,
    write_and_count, FileLinks, Recording, TraceOptions, Watcher,
};

use super::files;
use super::socket::DomainState;
use super::Log;

/// How long an idle agent may say nothing before serve handshakes again.
pub const SILENCE: Duration = Duration::from_secs(5);
/// How often an idle agent is pinged.
const PING_EVERY: Duration = Duration::from_secs(1);
/// One handshake attempt; the session retries for as long as the domain runs.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(5);

/// What libvirt's events say about the domain (set by the main thread).
#[derive(Debug, Default)]
pub struct DomainFlags {
    pub gone: AtomicBool,
    pub paused: AtomicBool,
}

/// Requests to a session from serve's socket.
pub enum Cmd {
    /// Release the domain for `borrower`; answer `Err(text naming the holder)` to refuse.
    Lend {
        borrower: String,
        reply: Sender<Result<(), String>>,
    },
    /// The borrower is done.
    TakeBack,
}

/// What a session thread needs.
pub struct SessionCtx {
    pub domain: String,
    pub root: PathBuf,
    /// `<root>/<domain>`.
    pub folder: PathBuf,
    pub max_bytes: Option<u64>,
    pub log: Log,
    pub shutdown: Arc<AtomicBool>,
    pub flags: Arc<DomainFlags>,
}

/// A running session, as the main thread sees it.
pub struct Session {
    thread: JoinHandle<()>,
    pub cmds: Sender<Cmd>,
    pub flags: Arc<DomainFlags>,
    info: Arc<Mutex<DomainState>>,
}

impl Session {
    pub fn spawn(ctx: SessionCtx) -> Session {
        let (tx, rx) = mpsc::channel();
        let info = Arc::new(Mutex::new(DomainState {
            domain: ctx.domain.clone(),
            state: "waiting".into(),
            detail: "starting".into(),
        }));
        let flags = ctx.flags.clone();
        let worker = Worker {
            ctx,
            cmds: rx,
            info: info.clone(),
            said_waiting: false,
            refusals: Throttle::default(),
        };
        let thread = std::thread::Builder::new()
            .name("serve-session".into())
            .spawn(move || worker.run())
            .expect("spawn a session thread");
        Session {
            thread,
            cmds: tx,
            flags,
            info,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    pub fn join(self) {
        let _ = self.thread.join();
    }

    pub fn state(&self) -> DomainState {
        self.info
            .lock()
            .map(|i| i.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

struct Worker {
    ctx: SessionCtx,
    cmds: Receiver<Cmd>,
    info: Arc<Mutex<DomainState>>,
    said_waiting: bool,
    /// The guest decides how often its requests are refused: at most one log line per
    /// [`LOG_EVERY`], the rest counted.
    refusals: Throttle,
}

/// Shortest interval between two log lines of one kind that the guest can cause at will.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// One log line per [`LOG_EVERY`]; what falls in between is counted.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(n)`: log now, `n` lines having been suppressed since the last one.
    fn admit(&mut self) -> Option<u64> {
        if self.last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// How an idle session ended.
enum Idle {
    /// Handshake again (agent silent or restarted, channel broken).
    Reconnect,
    /// Lent out: drop the lock, then tell the borrower (this sender), then wait for it.
    Lent(Sender<Result<(), String>>),
    /// The domain stopped, or serve shuts down.
    End,
}

impl Worker {
    fn run(mut self) {
        while !self.should_end() {
            if !self.ctx.folder.is_dir() {
                // Torn down (by a borrower): nothing to serve until it is set up again.
                self.ctx.log.event(
                    "not-set-up",
                    Some(&self.ctx.domain),
                    json!({ "folder": self.ctx.folder }),
                    "no longer set up (its folder is gone); not served",
                );
                return;
            }
            let lock = match DomainLock::acquire(&self.ctx.root, &self.ctx.domain) {
                Ok(l) => l,
                Err(LockError::Held { pid, what, .. }) => {
                    let holder = format!(
                        "another tvctl{} is {what} it",
                        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
                    );
                    self.wait_state(&holder);
                    self.nap(Duration::from_secs(1));
                    continue;
                }
                Err(e) => {
                    self.wait_state(&e.to_string());
                    self.nap(Duration::from_secs(5));
                    continue;
                }
            };
            match self.connect() {
                Ok(chan) => match self.idle(chan) {
                    Idle::Reconnect => {}
                    Idle::Lent(reply) => {
                        drop(lock);
                        let _ = reply.send(Ok(()));
                        self.wait_for_borrower();
                    }
                    Idle::End => break,
                },
                Err(Some(borrower_reply)) => {
                    drop(lock);
                    let _ = borrower_reply.send(Ok(()));
                    self.wait_for_borrower();
                }
                Err(None) => {
                    drop(lock);
                    self.nap(Duration::from_millis(500));
                }
            }
        }
        self.set_state("gone", "the domain stopped");
        if self.ctx.flags.gone.load(Ordering::SeqCst) {
            self.ctx
                .log
                .event("gone", Some(&self.ctx.domain), json!({}), "domain stopped");
        }
    }

    fn should_end(&self) -> bool {
        self.ctx.shutdown.load(Ordering::SeqCst) || self.ctx.flags.gone.load(Ordering::SeqCst)
    }

    fn set_state(&self, state: &str, detail: &str) {
        let mut i = self.info.lock().unwrap_or_else(|p| p.into_inner());
        i.state = state.into();
        i.detail = detail.into();
    }

    fn wait_state(&mut self, detail: &str) {
        self.set_state("waiting", detail);
        if !self.said_waiting {
            self.said_waiting = true;
            self.ctx.log.event(
                "waiting",
                Some(&self.ctx.domain),
                json!({ "detail": detail }),
                &format!("waiting: {detail}"),
            );
        }
    }

    /// Sleeps up to `d`, waking early to end. Lend requests that come meanwhile are granted
    /// at once (nothing is held while napping).
    fn nap(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end && !self.should_end() {
            if let Ok(Cmd::Lend { reply, borrower }) = self.cmds.try_recv() {
                self.lent_to(&borrower);
                let _ = reply.send(Ok(()));
                self.wait_for_borrower();
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Handshakes with the agent. `Err(Some(reply))`: a lend request came meanwhile (answer
    /// it once the lock is dropped); `Err(None)`: no agent yet, try again.
    fn connect(&mut self) -> Result<ControlChannel, Option<Sender<Result<(), String>>>> {
        let socket = self.ctx.folder.join("agent-ctl-path.sock");
        let mut lend: Option<(String, Sender<Result<(), String>>)> = None;
        let result = {
            let cmds = &self.cmds;
            let shutdown = &self.ctx.shutdown;
            let gone = &self.ctx.flags.gone;
            ControlChannel::connect(
                &socket,
                &crate::control::host_software("serve"),
                CONNECT_ATTEMPT,
                &mut || {
                    if let Ok(Cmd::Lend { borrower, reply }) = cmds.try_recv() {
                        lend = Some((borrower, reply));
                    }
                    lend.is_some() || shutdown.load(Ordering::SeqCst) || gone.load(Ordering::SeqCst)
                },
            )
        };
        if let Some((borrower, reply)) = lend {
            self.lent_to(&borrower);
            return Err(Some(reply));
        }
        match result {
            Ok(mut chan) => {
                self.said_waiting = false;
                let version = chan.version();
                let agent = clean_text(&chan.hello.agent_version);
                if version >= 3 {
                    let ready = ServeReady {
                        host: crate::control::host_software("serve"),
                    };
                    if chan.send(&Message::ServeReady(ready)).is_err() {
                        return Err(None);
                    }
                }
                self.set_state(
                    "connected",
                    &format!("tvctl-agent {agent}, protocol {version}"),
                );
                let note = if version < 3 {
                    " (this agent is too old for recordings started in the guest: update it)"
                } else {
                    ""
                };
                self.ctx.log.event(
                    "connected",
                    Some(&self.ctx.domain),
                    json!({ "agent_version": agent, "protocol": version }),
                    &format!("connected (tvctl-agent {agent}, protocol {version}){note}"),
                );
                Ok(chan)
            }
            Err(ControlError::Timeout(_)) | Err(ControlError::Interrupted) => {
                self.wait_state("waiting for tvctl-agent in the guest");
                Err(None)
            }
            Err(e) => {
                self.wait_state(&format!("cannot reach tvctl-agent: {e}"));
                self.nap(Duration::from_secs(1));
                Err(None)
            }
        }
    }

    fn lent_to(&mut self, borrower: &str) {
        self.set_state("lent", &format!("lent to {borrower}"));
        self.ctx.log.event(
            "lent",
            Some(&self.ctx.domain),
            json!({ "borrower": borrower }),
            &format!("lent to {borrower}"),
        );
    }

    /// Waits until the borrower is done (or the domain stops, or serve ends).
    fn wait_for_borrower(&mut self) {
        while !self.should_end() {
            match self.cmds.recv_timeout(Duration::from_millis(200)) {
                Ok(Cmd::TakeBack) => {
                    self.ctx.log.event(
                        "taken-back",
                        Some(&self.ctx.domain),
                        json!({}),
                        "taken back",
                    );
                    return;
                }
                // Already lent: another borrower is told who has it.
                Ok(Cmd::Lend { reply, .. }) => {
                    let detail = self
                        .info
                        .lock()
                        .map(|i| i.detail.clone())
                        .unwrap_or_default();
                    let _ = reply.send(Err(format!("domain {}: {detail}", self.ctx.domain)));
                }
                Err(_) => {}
            }
        }
    }

    /// The session between recordings.
    fn idle(&mut self, mut chan: ControlChannel) -> Idle {
        let mut last_heard = Instant::now();
        let mut next_ping = Instant::now();
        loop {
            match self.cmds.try_recv() {
                Ok(Cmd::Lend { borrower, reply }) => {
                    chan.close();
                    self.lent_to(&borrower);
                    // The caller drops the lock before the borrower hears back.
                    return Idle::Lent(reply);
                }
                Ok(Cmd::TakeBack) | Err(_) => {}
            }
            if self.ctx.shutdown.load(Ordering::SeqCst) {
                chan.close();
                return Idle::End;
            }
            if self.ctx.flags.gone.load(Ordering::SeqCst) {
                return Idle::End;
            }
            if self.ctx.flags.paused.load(Ordering::SeqCst) {
                last_heard = Instant::now();
            }
            if last_heard.elapsed() >= SILENCE {
                self.ctx.log.event(
                    "agent-silent",
                    Some(&self.ctx.domain),
                    json!({ "silent_s": SILENCE.as_secs() }),
                    &format!(
                        "tvctl-agent said nothing for {} s (restarted, or the guest rebooted); connecting again",
                        SILENCE.as_secs()
                    ),
                );
                return Idle::Reconnect;
            }
            if Instant::now() >= next_ping {
                next_ping = Instant::now() + PING_EVERY;
                if chan
                    .send(&Message::Ping(Ping {
                        nonce: random_u64(),
                    }))
                    .is_err()
                {
                    return self.channel_closed();
                }
            }
            match chan.recv(Duration::from_millis(200)) {
                Ok(Message::RecordOffer(offer)) => {
                    match self.record(chan, offer) {
                        Some(c) => chan = c,
                        None => return Idle::Reconnect,
                    }
                    last_heard = Instant::now();
                }
                Ok(_) => last_heard = Instant::now(),
                Err(ControlError::Timeout(_)) => {}
                Err(ControlError::Closed) | Err(ControlError::Io(_)) => {
                    return self.channel_closed();
                }
                Err(e) => {
                    self.ctx.log.event(
                        "agent-problem",
                        Some(&self.ctx.domain),
                        json!({ "error": clean_text(&e.to_string()) }),
                        &format!("{}; connecting again", clean_text(&e.to_string())),
                    );
                    return Idle::Reconnect;
                }
            }
        }
    }

    /// QEMU closed the channel: the domain is stopping (libvirt will say so), or QEMU
    /// dropped us. Wait a moment for the event before connecting again.
    fn channel_closed(&mut self) -> Idle {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if self.should_end() {
                return Idle::End;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Idle::Reconnect
    }

    /// One recording the guest asked for. Returns the channel if the session goes on.
    fn record(&mut self, mut chan: ControlChannel, offer: RecordOffer) -> Option<ControlChannel> {
        let d = self.ctx.domain.clone();
        let folder = self.ctx.folder.join(files::RECORDINGS);
        let refuse = |chan: &mut ControlChannel, text: String| {
            let _ = chan.send(&Message::OfferAnswer(OfferAnswer {
                offer_id: offer.offer_id,
                accepted: false,
                file: String::new(),
                text,
            }));
        };
        let made = std::fs::create_dir_all(&folder).and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            // Guest kernels' symbols and traces: for root only.
            std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o700))
        });
        if let Err(e) = made {
            let text = format!("the host cannot create {}: {e}", folder.display());
            self.refused(&text);
            refuse(&mut chan, text);
            return Some(chan);
        }
        let used = files::bytes_used(&folder);
        if let Some(max) = self.ctx.max_bytes.filter(|&m| used >= m) {
            let text = format!(
                "this domain's recordings already take {used} bytes on the host, at or over its \
                 limit of {max} (tvctl serve --max-bytes); ask the host's admin to remove old \
                 ones from {}",
                folder.display()
            );
            self.refused(&text);
            refuse(&mut chan, text);
            return Some(chan);
        }
        let name = files::sanitize_name(&offer.name);
        let path = files::new_recording_path(&folder, &files::utc_stamp(SystemTime::now()), &name);
        let events: Vec<String> = offer.events.iter().map(|e| clean_text(e)).collect();
        let opts = TraceOptions {
            domain_dir: self.ctx.folder.clone(),
            output: path.clone(),
            events: offer.events.clone(),
            duration: None,
            buffer_kb: offer.buffer_kb,
            clock: offer.clock.clone(),
            command: Vec::new(),
            boot: false,
            agent_timeout: Duration::from_secs(30),
            progress: false,
            relay_stdout: false,
            max_size: self.ctx.max_bytes.map(|m| m - used),
            file_version: crate::trace::FileVersion::V7,
        };
        let scratch = match scratch_next_to(&path) {
            Ok(s) => s,
            Err(e) => {
                let text = e.to_string();
                self.refused(&text);
                refuse(&mut chan, text);
                return Some(chan);
            }
        };
        let file = path.display().to_string();
        if chan
            .send(&Message::OfferAnswer(OfferAnswer {
                offer_id: offer.offer_id,
                accepted: true,
                file: file.clone(),
                text: String::new(),
            }))
            .is_err()
        {
            return None;
        }
        let cfg = RecorderConfig {
            socket: self.ctx.folder.join("agent-ctl-path.sock"),
            fifo_dir: self.ctx.folder.clone(),
            data_dir: scratch.path().to_path_buf(),
            events: offer.events.clone(),
            buffer_kb: offer.buffer_kb,
            clock: offer.clock.clone(),
            command: Vec::new(),
            connect_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(60),
            budget: opts.max_size.map(|b| Arc::new(ByteBudget::new(b))),
            keep_channel: true,
        };
        let holder = format!(
            "tvctl serve (pid {}) is recording '{name}' for a user in the guest into {file}; \
             try again when it ends (the guest stops it, or `kill -TERM` serve)",
            std::process::id()
        );
        let mut watch = SessionWatch::new(&self.ctx, &self.cmds, holder);
        let mut rec = match Recorder::start_on(chan, cfg, &mut || watch.check()) {
            Ok(r) => r,
            Err(failed) => {
                let (e, chan) = *failed;
                let text = clean_text(&e.to_string());
                self.ctx.log.event(
                    "recording-failed",
                    Some(&d),
                    json!({ "offer": offer.offer_id, "error": text }),
                    &format!("the guest's recording did not start: {text}"),
                );
                return chan;
            }
        };
        let recording = Recording {
            page_size: rec.hello.page_size,
            started: rec.started.clone(),
        };
        self.set_state("recording", &format!("'{name}' for the guest into {file}"));
        self.ctx.log.event(
            "recording-started",
            Some(&d),
            json!({ "offer": offer.offer_id, "name": name, "file": file, "events": events }),
            &format!(
                "recording '{name}' for the guest ({}) into {file}",
                events.join(",")
            ),
        );
        let start = Instant::now();
        let mut progress = Progress::new(false);
        let cause = record_until_stop(&mut rec, &mut watch, None, &mut progress);
        let elapsed = start.elapsed();
        let (mut collected, cause) = stop_and_drain(rec, &mut watch, cause, elapsed, &mut progress);
        let chan = collected.channel.take();
        let done = match write_and_count(&opts, &recording, &mut collected, FileLinks::default()) {
            Ok((cpus, page_problems)) => {
                let mut summary = summarise(
                    None, &opts, false, &recording, collected, cause, elapsed, cpus,
                );
                summary.domain = d.clone();
                summary.guest_problems.extend(page_problems);
                let complete = summary_exit_code(&summary) == crate::exitcode::ExitCode::Ok;
                let mut text = format!("{} after {:.1} s", cause.describe(), elapsed.as_secs_f64());
                if cause == StopCause::MaxSize {
                    text.push_str(" (the host's limit for this domain's recordings)");
                }
                for n in summary.notes.iter().chain(&summary.guest_problems).take(4) {
                    text.push_str("; ");
                    text.push_str(n);
                }
                self.ctx.log.event(
                    "recording-finished",
                    Some(&d),
                    json!({
                        "offer": offer.offer_id,
                        "file": file,
                        "events": summary.total_events,
                        "lost": summary.total_lost_events,
                        "bytes": summary.total_bytes,
                        "stop_cause": summary.stop_cause,
                        "complete": complete,
                    }),
                    &format!(
                        "recording '{name}' finished ({}): {file}, {} events, {} lost",
                        cause.describe(),
                        summary.total_events,
                        summary.total_lost_events
                    ),
                );
                RecordDone {
                    offer_id: offer.offer_id,
                    file: file.clone(),
                    events: summary.total_events,
                    lost: summary.total_lost_events,
                    bytes: summary.total_bytes,
                    complete,
                    text,
                }
            }
            Err(e) => {
                let text = clean_text(&e.to_string());
                self.ctx.log.event(
                    "recording-failed",
                    Some(&d),
                    json!({ "offer": offer.offer_id, "error": text }),
                    &format!("recording '{name}' could not be written: {text}"),
                );
                RecordDone {
                    offer_id: offer.offer_id,
                    file: String::new(),
                    events: 0,
                    lost: 0,
                    bytes: 0,
                    complete: false,
                    text,
                }
            }
        };
        let mut chan = chan?;
        if chan.send(&Message::RecordDone(done)).is_err() {
            return None;
        }
        self.set_state("connected", "idle");
        Some(chan)
    }

    fn refused(&mut self, text: &str) {
        let Some(suppressed) = self.refusals.admit() else {
            return;
        };
        let more = if suppressed > 0 {
            format!(" ({suppressed} more refusals since the last line)")
        } else {
            String::new()
        };
        self.ctx.log.event(
            "recording-refused",
            Some(&self.ctx.domain),
            json!({ "reason": text, "suppressed": suppressed }),
            &format!("refused the guest's recording: {text}{more}"),
        );
    }
}

/// The watch of a serve recording: serve shutting down stops it gracefully (a second signal
/// abandons the drain), libvirt's events say whether the domain stopped or paused.
/// Lend requests meanwhile are refused with `holder`.
struct SessionWatch<'a> {
    ctx: &'a SessionCtx,
    cmds: &'a Receiver<Cmd>,
    holder: String,
    signals_seen: u32,
    /// A stop was asked (a signal, or serve shutting down) and the recording is stopping:
    /// from now on only a further signal abandons the drain. (The signal and serve's
    /// shutdown flag arrive a moment apart; one request must not count twice.)
    stopping: bool,
}

impl<'a> SessionWatch<'a> {
    fn new(ctx: &'a SessionCtx, cmds: &'a Receiver<Cmd>, holder: String) -> SessionWatch<'a> {
        SessionWatch {
            ctx,
            cmds,
            holder,
            signals_seen: crate::trace::signals(),
            stopping: false,
        }
    }
}

impl Watcher for SessionWatch<'_> {
    fn check(&mut self) -> Watch {
        if let Ok(Cmd::Lend { reply, borrower }) = self.cmds.try_recv() {
            self.ctx.log.event(
                "lend-refused",
                Some(&self.ctx.domain),
                json!({ "borrower": borrower }),
                &format!("refused to lend the domain to {borrower}: a guest recording runs"),
            );
            let _ = reply.send(Err(self.holder.clone()));
        }
        if self.ctx.flags.gone.load(Ordering::SeqCst) {
            return Watch::DomainGone;
        }
        let new_signal = crate::trace::signals() > self.signals_seen;
        let shutdown = self.ctx.shutdown.load(Ordering::SeqCst);
        if new_signal || (shutdown && !self.stopping) {
            return Watch::Abandon;
        }
        if self.ctx.flags.paused.load(Ordering::SeqCst) {
            return Watch::Paused;
        }
        Watch::Go
    }

    fn domain_went_away(&mut self) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if self.ctx.flags.gone.load(Ordering::SeqCst) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn rebase(&mut self) {
        self.signals_seen = crate::trace::signals();
        self.stopping = true;
    }
}
