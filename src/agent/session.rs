//! The agent's control loop: wait for a host on `agent-ctl-path`, serve its requests, repeat.
//!
//! The control port is a virtio-serial port whose host side is a unix socket that QEMU binds.
//! While no host is connected, reads return end-of-file at once and poll(2) reports a hang-up,
//! so the loop sleeps between looks instead of spinning: the guest's CPU belongs to its user.
//! A host that goes away ends its session (a recording in progress is stopped and cleaned up)
//! and the agent waits for the next one. Every frame is decoded with the bounded decoder of
//! [`crate::proto`]; a broken frame closes the session, an unknown one gets an Error reply.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::proto::{
    negotiate, split_metadata, ErrorCode, ErrorMessage, FrameDecoder, Hello, HelloReply, Message,
    Pong, RecordOffer, StopReason, SyncReply, PROTOCOL_VERSION,
};

use super::local::{Client, ClientInput, LocalSocket, OFFER_ANSWER_TIMEOUT, REQUEST_TIMEOUT};
use super::ports::PortMap;
use super::recording::{Finished, Leftover, Recording, INSTANCE_PREFIX};
use super::report::online_cpus;
use super::tracefs::{current_clock, Tracefs};

/// How often the agent looks for a host while none is connected.
const IDLE_LOOK: Duration = Duration::from_millis(100);
/// How long one control message may wait for the host to take it before the session is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent waits for its control port before it says so (udev may still be
/// loading virtio_console at boot).
const PORT_QUIET_WAIT: Duration = Duration::from_secs(30);
/// How often a session looks at its pumps, leftovers and deadlines when nothing wakes it.
/// Messages from the host, a local client, the command's output and its end (a pidfd) wake
/// it at once; a tick costs a few ms of CPU under TCG, so it is rare.
const TICK: Duration = Duration::from_secs(1);
/// The tick while a command runs whose end cannot wake the loop (a kernel without pidfd).
const FAST_TICK: Duration = Duration::from_millis(250);

/// How the pumps move data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DataMode {
    /// splice(2) from `trace_pipe_raw` to the port (read/write where splice fails).
    #[default]
    Splice,
    /// read/write only (`--copy`: exercises the fallback).
    Copy,
    /// Benchmark only (`--synthetic`): empty pages as fast as the port takes them.
    Synthetic,
}

/// Settings of the agent process.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Use read/write instead of splice (to exercise the fallback).
    pub mode: DataMode,
}

/// Runs the agent for ever.
pub fn run(opts: &AgentOptions) -> io::Result<()> {
    let tracefs = Tracefs::find_or_mount().map_err(|e| io::Error::other(e.to_string()))?;
    for stale in tracefs.instances_with_prefix(INSTANCE_PREFIX) {
        match tracefs.remove_instance(&stale) {
            Ok(()) => log(&format!("removed stale instance {stale}")),
            Err(e) => log(&format!("cannot remove stale instance {stale}: {e}")),
        }
    }
    // Recordings started in the guest (`tvctl-agent record`) come through this socket.
    let local = match LocalSocket::bind(&super::local::socket_path()) {
        Ok(l) => Some(l),
        Err(e) => {
            log(&format!(
                "no local socket, so no `tvctl-agent record` in this guest: {e}"
            ));
            None
        }
    };
    let mut local = local;
    let mut waited = Duration::ZERO;
    loop {
        let ports = PortMap::system();
        let Some(ctl) = ports.control().map(PathBuf::from) else {
            // At boot the agent often starts before udev has loaded virtio_console and
            // named the ports: that is normal, so it waits quietly for a while first.
            if waited == PORT_QUIET_WAIT {
                log(&format!(
                    "no agent-ctl-path port after {} s; waiting. If this guest's domain is not \
                     set up, run `tvctl setup DOMAIN` on the host and restart the domain \
                     (/dev/virtio-ports/ lists the ports the guest has)",
                    PORT_QUIET_WAIT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_secs(1));
            waited += Duration::from_secs(1);
            continue;
        };
        let port = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&ctl)?;
        log(&format!(
            "ready: control {} data ports {:?}",
            ctl.display(),
            ports.cpu_ports()
        ));
        let mut agent = Agent {
            tracefs: tracefs.clone(),
            ports,
            port,
            opts: opts.clone(),
            decoder: FrameDecoder::new(),
            version: None,
            recording: None,
            leftovers: Vec::new(),
            host_software: String::new(),
            serve: None,
            local: local.take(),
            pending_client: None,
            offer: None,
            next_offer_id: 1,
        };
        let result = agent.serve();
        local = agent.local.take();
        result?;
    }
}

fn log(msg: &str) {
    eprintln!("tvctl-agent: {msg}");
}

struct Agent {
    tracefs: Tracefs,
    ports: PortMap,
    port: File,
    opts: AgentOptions,
    decoder: FrameDecoder,
    /// The session's protocol version; None while no session is open.
    version: Option<u16>,
    recording: Option<Recording>,
    /// What earlier stops could not finish in time (a pump still running, an instance the
    /// kernel would not remove yet); looked at on every tick, never waited for.
    leftovers: Vec<Leftover>,
    /// The connected host's `Hello.software`, for messages naming it.
    host_software: String,
    /// Set by `ServeReady`: the host takes recordings the guest starts.
    serve: Option<String>,
    local: Option<LocalSocket>,
    /// A local client that connected but has not sent its offer yet.
    pending_client: Option<Client>,
    /// The recording a local client asked for, from offer to `RecordDone`.
    offer: Option<Offer>,
    next_offer_id: u64,
}

/// A guest-started recording in progress (docs/protocol.md §4.12).
struct Offer {
    id: u64,
    phase: OfferPhase,
    /// None once the client went away: the recording is then stopped, the file still written.
    client: Option<Client>,
    /// When the host must have answered (Offered) or sent its request (Accepted).
    deadline: Instant,
    /// The client asked to stop before the recording started.
    stop_wanted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OfferPhase {
    /// Sent to the host; waiting for `OfferAnswer`.
    Offered,
    /// Accepted; waiting for the host's `RecordRequest`.
    Accepted,
    /// The recording runs.
    Recording,
    /// Stopped; waiting for `RecordDone`.
    Finishing,
}

enum Input {
    Bytes,
    Nothing,
    HostGone,
}

impl Agent {
    fn serve(&mut self) -> io::Result<()> {
        let mut host_here = false;
        loop {
            self.leftovers.retain_mut(|l| !l.try_finish());
            self.tend_local();
            match self.read_input()? {
                Input::HostGone => {
                    if host_here {
                        log("host went away");
                        self.end_session(StopReason::HostGone);
                        host_here = false;
                    }
                    std::thread::sleep(IDLE_LOOK);
                    continue;
                }
                Input::Bytes => {
                    host_here = true;
                    self.handle_frames();
                }
                Input::Nothing => host_here = true,
            }
            self.relay_output();
            self.check_recording();
        }
    }

    /// Waits up to one tick for bytes on the control port.
    fn read_input(&mut self) -> io::Result<Input> {
        let mut fds = vec![PollFd::new(self.port.as_fd(), PollFlags::POLLIN)];
        let local = self.local.as_ref().map(LocalSocket::fd);
        let clients = self
            .pending_client
            .iter()
            .chain(self.offer.iter().filter_map(|o| o.client.as_ref()))
            .map(Client::fd);
        let output = self
            .recording
            .as_ref()
            .map_or_else(Vec::new, Recording::wake_fds);
        for fd in local.into_iter().chain(clients).chain(output) {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        let tick = if self
            .recording
            .as_ref()
            .is_some_and(Recording::needs_fast_tick)
        {
            FAST_TICK
        } else {
            TICK
        };
        let ms = u16::try_from(tick.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return Ok(Input::Nothing),
            Ok(_) => {}
            Err(Errno::EINTR) => return Ok(Input::Nothing),
            Err(e) => return Err(e.into()),
        }
        let port_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        drop(fds);
        if !port_ready {
            // A local client or the command's output woke us: the loop tends them.
            return Ok(Input::Nothing);
        }
        let mut buf = [0u8; 65536];
        let want = buf.len().min(self.decoder.space().max(1));
        match nix::unistd::read(self.port.as_fd(), &mut buf[..want]) {
            Ok(0) => Ok(Input::HostGone),
            Ok(n) => {
                let taken = self.decoder.push(&buf[..n]);
                if taken < n {
                    // The decoder is full of a frame it cannot finish: treat as broken.
                    self.frame_broken("control buffer overflow");
                }
                Ok(Input::Bytes)
            }
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => Ok(Input::Nothing),
            Err(e) => Err(e.into()),
        }
    }

    fn handle_frames(&mut self) {
        let mut batch = Vec::new();
        loop {
            match self.decoder.next_message() {
                Ok(Some((_, msg))) => batch.push(msg),
                Ok(None) => return self.handle_batch(batch),
                Err(e) if e.is_fatal() => {
                    self.handle_batch(std::mem::take(&mut batch));
                    self.frame_broken(&e.to_string());
                    if !self.decoder.resync() {
                        return;
                    }
                }
                Err(e) => {
                    self.handle_batch(std::mem::take(&mut batch));
                    let code = e.reply_code().unwrap_or(ErrorCode::BadFrame);
                    self.send_error(code, &e.to_string());
                }
            }
        }
    }

    /// Handles messages read together. Of several `Hello`s only the last is answered: the
    /// earlier ones waited in the channel while the guest booted (the host re-sends until
    /// one is answered), and each answer would start a session only to end it.
    fn handle_batch(&mut self, batch: Vec<Message>) {
        let last_hello = batch.iter().rposition(|m| matches!(m, Message::Hello(_)));
        let mut skipped = 0;
        for (i, msg) in batch.into_iter().enumerate() {
            if matches!(msg, Message::Hello(_)) && Some(i) != last_hello {
                skipped += 1;
                continue;
            }
            self.handle(msg);
        }
        if skipped > 0 {
            log(&format!("{skipped} stale Hello(s) drained"));
        }
    }

    /// A frame that cannot be delimited: the session is over; wait for a new Hello.
    fn frame_broken(&mut self, why: &str) {
        log(&format!("broken frame ({why}); closing the session"));
        if self.version.is_some() {
            self.send_error(ErrorCode::BadFrame, &format!("broken frame: {why}"));
        }
        self.end_session(StopReason::AgentError);
    }

    fn handle(&mut self, msg: Message) {
        if let Message::Hello(h) = msg {
            self.hello(&h);
            return;
        }
        if self.version.is_none() {
            // Before Hello, nothing else is accepted (and stale bytes are ignored quietly).
            return;
        }
        match msg {
            Message::RecordRequest(req) => {
                if self.recording.is_some() {
                    self.send_error(
                        ErrorCode::Busy,
                        "a recording is already running; send Stop first",
                    );
                    return;
                }
                let ports = PortMap::system();
                if !ports.cpu_ports().is_empty() {
                    self.ports = ports;
                }
                match Recording::start(
                    &req,
                    &self.tracefs,
                    &self.ports,
                    online_cpus(),
                    page_size(),
                    self.opts.mode,
                    self.version.is_some_and(|v| v >= 4),
                ) {
                    Ok((rec, started)) => {
                        log(&format!(
                            "recording {} on cpus {:?} in {}; {}",
                            started.events.join(","),
                            started.cpus,
                            started.instance,
                            rec.startup
                        ));
                        let files = rec.static_metadata();
                        self.recording = Some(rec);
                        let copy = started.clone();
                        if self.send(&Message::Started(started)) {
                            self.send_metadata(&files);
                        }
                        self.offer_started(copy);
                    }
                    Err(refusal) => {
                        log(&format!("refused: {}", refusal.text));
                        self.send_error(refusal.code, &refusal.text);
                        // The guest's own request (an unknown event, say): its user is told.
                        if let Some(mut offer) = self.offer.take() {
                            if let Some(c) = offer.client.as_mut() {
                                c.send_error(refusal.code, &refusal.text);
                            }
                        }
                    }
                }
            }
            Message::Stop => {
                if self.recording.is_none() {
                    self.send_error(ErrorCode::NotRecording, "no recording to stop");
                } else {
                    self.stop_and_report(StopReason::HostRequest);
                }
            }
            Message::ServeReady(r) => {
                log(&format!(
                    "the host takes recordings started here ({})",
                    r.host
                ));
                self.serve = Some(r.host);
            }
            Message::OfferAnswer(a) => {
                let Some(offer) = self.offer.as_mut().filter(|o| o.id == a.offer_id) else {
                    return; // an offer that ended already
                };
                if offer.phase != OfferPhase::Offered {
                    return;
                }
                if let Some(c) = offer.client.as_mut() {
                    c.send(&Message::OfferAnswer(a.clone()));
                }
                if a.accepted {
                    offer.phase = OfferPhase::Accepted;
                    offer.deadline = Instant::now() + REQUEST_TIMEOUT;
                } else {
                    log(&format!(
                        "the host refused recording offer {}: {}",
                        a.offer_id, a.text
                    ));
                    self.offer = None;
                }
            }
            Message::RecordDone(d) => {
                if let Some(mut offer) = self.offer.take() {
                    if offer.id != d.offer_id {
                        self.offer = Some(offer);
                        return;
                    }
                    log(&format!(
                        "recording offer {} written to {}",
                        d.offer_id, d.file
                    ));
                    if let Some(c) = offer.client.as_mut() {
                        c.send(&Message::RecordDone(d));
                    }
                }
            }
            Message::SyncProbe(p) => {
                let reply = match &self.recording {
                    Some(rec) => rec.sync_probe(p.nonce),
                    None => {
                        let (clock, ts) = self.clock_reading();
                        SyncReply {
                            nonce: p.nonce,
                            clock,
                            before: ts,
                            after: ts,
                            marked: false,
                        }
                    }
                };
                self.send(&Message::SyncReply(reply));
            }
            Message::Ping(p) => {
                let (clock, ts) = self.clock_reading();
                self.send(&Message::Pong(Pong {
                    nonce: p.nonce,
                    clock,
                    ts,
                }));
            }
            Message::Close => {
                log("host closed the session");
                self.end_session(StopReason::HostRequest);
            }
            other => self.send_error(
                ErrorCode::BadRequest,
                &format!("{:?} is not a request the agent serves", other.kind()),
            ),
        }
    }

    fn hello(&mut self, h: &Hello) {
        if self.recording.is_some() {
            // A new host while a recording runs: the old host is gone. Clean up first.
            self.end_session(StopReason::HostGone);
        }
        let Some(version) = negotiate(h.min_version, h.max_version) else {
            self.version = None;
            let text = format!(
                "host speaks protocol {}..={}, agent speaks {}..={}",
                h.min_version,
                h.max_version,
                crate::proto::MIN_PROTOCOL_VERSION,
                PROTOCOL_VERSION
            );
            let frame = Message::Error(ErrorMessage::new(ErrorCode::UnsupportedVersion, text));
            self.send_at(PROTOCOL_VERSION, &frame);
            return;
        };
        self.version = Some(version);
        self.host_software = h.software.clone();
        self.serve = None;
        let ports = PortMap::system();
        self.ports = ports;
        let reply = HelloReply {
            version,
            nonce: h.nonce,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            cpus: online_cpus(),
            page_size: page_size(),
            trace_clocks: self.tracefs.clocks().unwrap_or_default(),
            data_ports: self.ports.cpu_ports(),
        };
        log(&format!("session with {} (protocol {version})", h.software));
        remember_session(&h.software, version);
        self.send(&Message::HelloReply(reply));
    }

    /// Watches the running recording: its command's end, or a pump's failure, stops it.
    fn check_recording(&mut self) {
        let Some(rec) = self.recording.as_mut() else {
            return;
        };
        if let Some(status) = rec.command_exited() {
            log(&format!("command exited with {status}; stopping"));
            self.stop_and_report(StopReason::CommandExited);
        } else if let Some(cpu) = rec.failed_pump() {
            log(&format!("pump of cpu{cpu} failed; stopping"));
            self.send_error(
                ErrorCode::Internal,
                &format!("data pump of cpu{cpu} failed"),
            );
            self.stop_and_report(StopReason::AgentError);
        }
    }

    /// Sends what the command wrote since the last look (protocol 4; with an older host the
    /// command's output is not piped at all).
    fn relay_output(&mut self) {
        let Some(rec) = self.recording.as_mut() else {
            return;
        };
        for chunk in rec.read_output() {
            if !self.send(&Message::CommandOutput(chunk)) {
                return;
            }
        }
    }

    fn stop_and_report(&mut self, reason: StopReason) {
        let Some(rec) = self.recording.take() else {
            return;
        };
        if let Some(offer) = self.offer.as_mut() {
            if offer.phase == OfferPhase::Recording {
                offer.phase = OfferPhase::Finishing;
            }
        }
        let finished = self.finish(rec, reason);
        for chunk in &finished.output {
            if !self.send(&Message::CommandOutput(chunk.clone())) {
                return;
            }
        }
        if !self.send_metadata(&finished.metadata) {
            return;
        }
        if !finished.cut_short.is_empty() {
            // docs/protocol.md §4.8: an Error reports the failure, Stopped{AgentError} ends it.
            let text = format!(
                "data streams ended before their buffers were drained: {}",
                finished.cut_short.join("; ")
            );
            self.send_error(ErrorCode::Internal, &text);
        }
        let bytes: Vec<u64> = finished.stopped.cpus.iter().map(|c| c.bytes).collect();
        log(&format!(
            "stopped ({:?}); bytes per cpu {bytes:?}",
            finished.stopped.reason
        ));
        self.send(&Message::Stopped(finished.stopped));
    }

    /// Stops `rec` and keeps what its stop could not finish for later ticks.
    fn finish(&mut self, rec: Recording, reason: StopReason) -> Finished {
        let mut finished = rec.finish(reason);
        if let Some(leftover) = finished.leftover.take() {
            self.leftovers.push(leftover);
        }
        finished
    }

    /// Sends files as Metadata chunks; false if the host stopped listening.
    fn send_metadata(&mut self, files: &[(String, Vec<u8>)]) -> bool {
        for (name, data) in files {
            match split_metadata(name, data) {
                Ok(chunks) => {
                    for chunk in chunks {
                        if !self.send(&Message::Metadata(chunk)) {
                            return false;
                        }
                    }
                }
                Err(e) => log(&format!("metadata {name} not sent: {e}")),
            }
        }
        true
    }

    /// Ends the session; a running recording is stopped and cleaned up, unreported (nobody to
    /// tell).
    fn end_session(&mut self, reason: StopReason) {
        if let Some(rec) = self.recording.take() {
            let finished = self.finish(rec, reason);
            let bytes: Vec<u64> = finished.stopped.cpus.iter().map(|c| c.bytes).collect();
            log(&format!(
                "recording abandoned ({reason:?}); bytes per cpu {bytes:?}"
            ));
        }
        self.version = None;
        self.serve = None;
        self.decoder = FrameDecoder::new();
        if let Some(mut offer) = self.offer.take() {
            if let Some(c) = offer.client.as_mut() {
                c.send_error(
                    ErrorCode::NoServe,
                    "the host went away before writing the recording (tvctl serve stopped, or the \
                     domain's channel was handed to another tvctl); nothing was saved",
                );
            }
        }
    }

    fn send_error(&mut self, code: ErrorCode, text: &str) {
        let v = self.version.unwrap_or(PROTOCOL_VERSION);
        self.send_at(v, &Message::Error(ErrorMessage::new(code, text)));
    }

    fn send(&mut self, msg: &Message) -> bool {
        let v = self.version.unwrap_or(PROTOCOL_VERSION);
        self.send_at(v, msg)
    }

    /// Sends one frame; a host that does not take it within SEND_TIMEOUT ends the session.
    fn send_at(&mut self, version: u16, msg: &Message) -> bool {
        let frame = match msg.encode_frame(version) {
            Ok(f) => f,
            Err(e) => {
                log(&format!("cannot encode {:?}: {e}", msg.kind()));
                return false;
            }
        };
        let deadline = Instant::now() + SEND_TIMEOUT;
        let mut rest = &frame[..];
        while !rest.is_empty() {
            match nix::unistd::write(self.port.as_fd(), rest) {
                Ok(n) => rest = &rest[n..],
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    if Instant::now() > deadline {
                        log("host does not read the control port; dropping the session");
                        self.version = None;
                        return false;
                    }
                    let mut fds = [PollFd::new(self.port.as_fd(), PollFlags::POLLOUT)];
                    let _ = poll(&mut fds, PollTimeout::from(100u16));
                }
                Err(e) => {
                    log(&format!("control port write failed: {e}"));
                    self.version = None;
                    return false;
                }
            }
        }
        true
    }

    /// A reading of the guest's clock for Pong. The recording's clock where user space can
    /// read the same clock (mono, mono_raw, boot, x86-tsc), else CLOCK_MONOTONIC, named so.
    fn clock_reading(&self) -> (String, u64) {
        if let Some(rec) = &self.recording {
            return read_clock(rec.clock());
        }
        let clock = self
            .tracefs
            .read("trace_clock")
            .ok()
            .and_then(|t| current_clock(&String::from_utf8_lossy(&t)))
            .unwrap_or_default();
        read_clock(&clock)
    }
}

impl Agent {
    /// One tick of the local socket: new clients, their requests, and offer deadlines.
    fn tend_local(&mut self) {
        if let Some(client) = self.local.as_ref().and_then(LocalSocket::accept) {
            if self.pending_client.is_some() || self.offer.is_some() {
                let mut client = client;
                let holder = self
                    .offer
                    .as_ref()
                    .and_then(|o| o.client.as_ref())
                    .or(self.pending_client.as_ref())
                    .and_then(|c| c.pid)
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default();
                client.send_error(
                    ErrorCode::Busy,
                    &format!("another tvctl-agent record{holder} is running in this guest; wait for it to end"),
                );
            } else {
                self.pending_client = Some(client);
            }
        }
        if let Some(mut client) = self.pending_client.take() {
            match client.read() {
                ClientInput::Nothing if Instant::now() < client.offer_deadline => {
                    self.pending_client = Some(client);
                }
                ClientInput::Nothing | ClientInput::Gone => {}
                ClientInput::Message(Message::RecordOffer(offer)) => self.offer(client, offer),
                ClientInput::Message(other) => {
                    client.send_error(
                        ErrorCode::BadRequest,
                        &format!("expected RecordOffer, got {:?}", other.kind()),
                    );
                }
            }
        }
        self.tend_offer();
    }

    /// A client's offer: refused here when no host can take it, else forwarded.
    fn offer(&mut self, mut client: Client, mut offer: RecordOffer) {
        let refusal = match (&self.version, &self.serve) {
            (None, _) => Some((
                ErrorCode::NoServe,
                "no host is connected to this guest's control channel: run `tvctl serve` on the \
                 host (and `tvctl setup` for this domain, once)"
                    .to_string(),
            )),
            (Some(_), None) if self.recording.is_some() => Some((
                ErrorCode::Busy,
                format!(
                    "the host's {} is recording this guest; try again when it ends",
                    self.host_software
                ),
            )),
            (Some(v), None) if *v < 3 => Some((
                ErrorCode::NoServe,
                format!(
                    "the host's {} speaks protocol {v}, which cannot take recordings started in \
                     the guest: update tvctl on the host and run `tvctl serve`",
                    self.host_software
                ),
            )),
            (Some(_), None) => Some((
                ErrorCode::NoServe,
                format!(
                    "the host is connected with {}, which does not take recordings started in the \
                     guest: run `tvctl serve` on the host",
                    self.host_software
                ),
            )),
            (Some(_), Some(_)) if self.recording.is_some() => Some((
                ErrorCode::Busy,
                "a recording is already running in this guest; try again when it ends".to_string(),
            )),
            (Some(_), Some(_)) => None,
        };
        if let Some((code, text)) = refusal {
            log(&format!("refused a local recording: {text}"));
            client.send_error(code, &text);
            return;
        }
        offer.offer_id = self.next_offer_id;
        self.next_offer_id += 1;
        log(&format!(
            "offering recording {} ('{}', {}) to the host",
            offer.offer_id,
            offer.name,
            offer.events.join(",")
        ));
        let id = offer.offer_id;
        if !self.send(&Message::RecordOffer(offer)) {
            client.send_error(ErrorCode::NoServe, "the host stopped reading its channel");
            return;
        }
        self.offer = Some(Offer {
            id,
            phase: OfferPhase::Offered,
            client: Some(client),
            deadline: Instant::now() + OFFER_ANSWER_TIMEOUT,
            stop_wanted: false,
        });
    }

    /// The offer's client and deadlines.
    fn tend_offer(&mut self) {
        let Some(offer) = self.offer.as_mut() else {
            return;
        };
        let mut stop = false;
        if let Some(client) = offer.client.as_mut() {
            match client.read() {
                ClientInput::Nothing => {}
                ClientInput::Message(Message::Stop) => {
                    offer.stop_wanted = true;
                    stop = offer.phase == OfferPhase::Recording;
                }
                ClientInput::Message(other) => {
                    client.send_error(
                        ErrorCode::BadRequest,
                        &format!("expected Stop, got {:?}", other.kind()),
                    );
                }
                ClientInput::Gone => {
                    log(&format!(
                        "the client of recording offer {} went away",
                        offer.id
                    ));
                    offer.client = None;
                    offer.stop_wanted = true;
                    stop = offer.phase == OfferPhase::Recording;
                }
            }
        }
        let waiting = matches!(offer.phase, OfferPhase::Offered | OfferPhase::Accepted);
        if waiting && Instant::now() > offer.deadline {
            let what = if offer.phase == OfferPhase::Offered {
                "did not answer the recording offer"
            } else {
                "accepted the recording offer but did not start it"
            };
            let text = format!("the host ({}) {what} in time", self.host_software);
            log(&text);
            if let Some(c) = offer.client.as_mut() {
                c.send_error(ErrorCode::Internal, &text);
            }
            self.offer = None;
            return;
        }
        if stop && self.recording.is_some() {
            log("stopping the recording the guest asked for");
            self.stop_and_report(StopReason::GuestRequest);
        }
    }

    /// A recording started: if it is the accepted offer's, tell the client (or stop at once
    /// when the client is gone or already asked to stop).
    fn offer_started(&mut self, started: crate::proto::Started) {
        let Some(offer) = self.offer.as_mut() else {
            return;
        };
        if offer.phase != OfferPhase::Accepted {
            return;
        }
        offer.phase = OfferPhase::Recording;
        let delivered = offer
            .client
            .as_mut()
            .is_some_and(|c| c.send(&Message::Started(started)));
        if !delivered || offer.stop_wanted {
            self.stop_and_report(StopReason::GuestRequest);
        }
    }
}

/// Reads `clock` if user space can, else CLOCK_MONOTONIC; returns the name of what was read.
pub fn read_clock(clock: &str) -> (String, u64) {
    use nix::time::{clock_gettime, ClockId};
    let id = match clock {
        "mono" => ClockId::CLOCK_MONOTONIC,
        "mono_raw" => ClockId::CLOCK_MONOTONIC_RAW,
        "boot" => ClockId::CLOCK_BOOTTIME,
        #[cfg(target_arch = "x86_64")]
        "x86-tsc" => {
            // SAFETY: rdtsc has no memory effects; every x86-64 CPU has it.
            let tsc = unsafe { core::arch::x86_64::_rdtsc() };
            return ("x86-tsc".into(), tsc);
        }
        _ => ClockId::CLOCK_MONOTONIC,
    };
    let name = match id {
        ClockId::CLOCK_MONOTONIC_RAW => "mono_raw",
        ClockId::CLOCK_BOOTTIME => "boot",
        _ => "mono",
    };
    let ts = clock_gettime(id)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0);
    (name.into(), ts)
}

fn page_size() -> u32 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(4096)
}

/// Where the agent notes its last session, for `tvctl agent status` (read through qemu-ga).
pub const LAST_SESSION_FILE: &str = "/run/tvctl-agent.last-session";

/// Notes the session just opened: `<unix seconds> protocol <v> <host software>`. Best effort:
/// a read-only /run costs nothing but the note.
fn remember_session(host: &str, version: u16) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let line: String = host.chars().filter(|c| !c.is_control()).take(256).collect();
    let _ = std::fs::write(
        LAST_SESSION_FILE,
        format!("{now} protocol {version} {line}\n"),
    );
}
