//! One recording driven from the host: FIFO readers first, then the control session.
//!
//! Order matters. The per-CPU readers open their FIFOs before the agent is asked to record,
//! so the guest never writes into a FIFO nobody reads (it would stall). The control session
//! then handshakes, sends the request, and waits for `Started`. Stopping sends `Stop`,
//! collects the metadata, and gives each reader the byte count from `Stopped`; the data is
//! complete when every reader has reached its count.
//!
//! Everything the agent sends passes through [`super::guest_input`] before it is used, and
//! every wait is bounded: by the caller's `Watch` (Ctrl-C, the domain stopping), by the
//! agent's silence (no message and no data for [`SILENCE_LIMIT`], while the domain is not
//! paused), and by an overall deadline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::{random_u64, ControlChannel, ControlError};
use crate::proto::limits::DRAIN_SLACK;
use crate::proto::{ErrorCode, Message, Ping, RecordRequest, SyncProbe};
use crate::tracedat::sanitize::FormatSet;
use crate::tsync::probe::Sample;

use super::guest_input::{
    clean_text, GuestError, GuestHello, GuestProblems, GuestStarted, GuestStopped, MetadataInbox,
};
use super::output::CommandOutputLog;
use super::stream::{ByteBudget, CpuStream, StreamOutcome};

/// How long the agent may stay silent (no message, no stream data) while the domain runs
/// before the host concludes it died or the guest locked up. The agent answers a `Ping` in
/// 20–120 ms under TCG; one is sent every [`PING_EVERY`], and stream data counts as a sign of
/// life while stopping.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(10);
/// How often the host pings the agent while recording.
/// Every ping wakes the guest's agent (a few ms of CPU under TCG): three in the ten seconds
/// of [`SILENCE_LIMIT`] are enough.
const PING_EVERY: Duration = Duration::from_secs(3);
/// Slice of every wait loop: bounds how late Ctrl-C or a dead domain is noticed.
const SLICE: Duration = Duration::from_millis(100);

/// What a recording needs.
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// The agent's control socket (`<dir>/<domain>/agent-ctl-path.sock`).
    pub socket: PathBuf,
    /// The per-domain folder holding `trace-path-cpuN.out`.
    pub fifo_dir: PathBuf,
    /// Where per-CPU data files are written (`cpuN.data`).
    pub data_dir: PathBuf,
    pub events: Vec<String>,
    pub buffer_kb: Option<u32>,
    pub clock: Option<String>,
    pub command: Vec<String>,
    /// How long to wait for the agent to answer the handshake.
    pub connect_timeout: Duration,
    /// How long to wait for `Started`, and for `Stopped` after `Stop`.
    pub reply_timeout: Duration,
    /// `--max-size`: what is left of the bytes of trace data to keep, shared by every CPU
    /// (and, in a run of several, by every domain and the host).
    pub budget: Option<Arc<ByteBudget>>,
    /// Hand the control channel back in [`Collected::channel`] after a finished recording
    /// (`tvctl serve` keeps its session) instead of closing it.
    pub keep_channel: bool,
}

/// Errors that end a recording before it started.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot open the data FIFO {path}: {source}")]
    Fifo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no trace-path-cpuN.out FIFOs in {0}: run `tvctl setup` for this domain")]
    NoFifos(PathBuf),
    #[error(transparent)]
    Guest(#[from] GuestError),
}

/// A recording that did not start, and the channel if it is still in session.
pub type StartFailed = Box<(RecordError, Option<ControlChannel>)>;

/// What the caller's watch says, asked every [`SLICE`] in every wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// Nothing happened: keep waiting.
    Go,
    /// The domain is paused (`virsh suspend`): the agent's silence is excused.
    Paused,
    /// Stop waiting and keep what arrived (a second Ctrl-C).
    Abandon,
    /// The domain stopped.
    DomainGone,
}

/// How the stop phase ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopEnd {
    /// `Stopped` arrived; the streams were read to their counts (or to the drain bound).
    Finished,
    /// The caller's watch said so.
    Watched(Watch),
    /// The agent stopped answering, or closed the channel.
    AgentLost(String),
    /// The control channel failed (an I/O or framing error).
    Failed(String),
    /// The guest broke so many rules that the host stopped listening.
    GuestMisbehaved,
}

/// Everything a recording produced, whole or not.
#[derive(Debug)]
pub struct Collected {
    pub metadata: BTreeMap<String, Vec<u8>>,
    /// The event formats admitted (checked): pages are checked against them.
    pub formats: FormatSet,
    pub stopped: Option<GuestStopped>,
    pub streams: Vec<(StreamOutcome, PathBuf)>,
    pub end: StopEnd,
    /// What the guest did wrong (its rules broken), for the summary and exit code 13.
    pub problems: GuestProblems,
    /// `Error` messages the agent sent while recording (cleaned).
    pub agent_errors: Vec<String>,
    /// The control channel, still in session, when the config asked to keep it and the
    /// recording finished normally.
    pub channel: Option<ControlChannel>,
    /// The guest command's output (protocol 4): what is still to print, and the tails.
    pub output: CommandOutputLog,
    /// The session's protocol version.
    pub protocol: u16,
}

/// A recording in progress.
pub struct Recorder {
    chan: ControlChannel,
    streams: Vec<CpuStream>,
    pub hello: GuestHello,
    pub started: GuestStarted,
    pub stream_nonce: u64,
    cfg: RecorderConfig,
    /// A `Stopped` that arrived on its own (the guest command ended).
    early_stop: Option<crate::proto::Stopped>,
    inbox: MetadataInbox,
    problems: GuestProblems,
    agent_errors: Vec<String>,
    budget: Option<Arc<ByteBudget>>,
    last_heard: Instant,
    next_ping: Instant,
    output: CommandOutputLog,
}

/// CPU numbers N with a `trace-path-cpuN.out` FIFO in `dir` (names as `tvctl setup` makes
/// them: the same parser as setup's).
pub fn fifo_cpus(dir: &Path) -> Vec<u32> {
    let mut cpus: Vec<u32> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".out")?;
            crate::channels::cpu_of_fifo_name(&name)
        })
        .collect();
    cpus.sort_unstable();
    cpus
}

impl Recorder {
    /// Opens the FIFOs, handshakes, asks the agent to record, waits for `Started`. `watch` is
    /// asked every 100 ms; anything but `Go`/`Paused` ends the wait with
    /// [`ControlError::Interrupted`].
    pub fn start(
        cfg: RecorderConfig,
        watch: &mut dyn FnMut() -> Watch,
    ) -> Result<Recorder, RecordError> {
        Self::start_with(cfg, None, watch).map_err(|failed| failed.0)
    }

    /// As [`Recorder::start`], on a channel already in session (`tvctl serve`'s). When the
    /// recording cannot start, the channel comes back with the error if it is still usable
    /// (the agent refused the request, say).
    pub fn start_on(
        chan: ControlChannel,
        cfg: RecorderConfig,
        watch: &mut dyn FnMut() -> Watch,
    ) -> Result<Recorder, StartFailed> {
        Self::start_with(cfg, Some(chan), watch)
    }

    fn start_with(
        cfg: RecorderConfig,
        chan: Option<ControlChannel>,
        watch: &mut dyn FnMut() -> Watch,
    ) -> Result<Recorder, StartFailed> {
        let cpus = fifo_cpus(&cfg.fifo_dir);
        if cpus.is_empty() {
            return Err(Box::new((RecordError::NoFifos(cfg.fifo_dir.clone()), chan)));
        }
        let stream_nonce = random_u64();
        let budget = cfg.budget.clone();
        let mut streams = Vec::new();
        for &cpu in &cpus {
            let fifo = cfg.fifo_dir.join(format!("trace-path-cpu{cpu}.out"));
            let data = cfg.data_dir.join(format!("cpu{cpu}.data"));
            match CpuStream::start(cpu, &fifo, &data, stream_nonce, budget.clone()) {
                Ok(s) => streams.push(s),
                Err(source) => {
                    cancel_all(&streams);
                    return Err(Box::new((RecordError::Fifo { path: fifo, source }, chan)));
                }
            }
        }
        let mut interrupted = || !matches!(watch(), Watch::Go | Watch::Paused);
        let mut chan = match chan {
            Some(c) => c,
            None => match ControlChannel::connect(
                &cfg.socket,
                &crate::control::host_software("trace"),
                cfg.connect_timeout,
                &mut interrupted,
            ) {
                Ok(c) => c,
                Err(e) => {
                    cancel_all(&streams);
                    return Err(Box::new((e.into(), None)));
                }
            },
        };
        let started = (|| {
            let hello = GuestHello::check(&chan.hello)?;
            let request = Message::RecordRequest(RecordRequest {
                events: cfg.events.clone(),
                buffer_kb: cfg.buffer_kb,
                clock: cfg.clock.clone(),
                command: cfg.command.clone(),
                stream_nonce,
            });
            match chan.request(&request, cfg.reply_timeout, &mut interrupted)? {
                Message::Started(s) => Ok((hello, s)),
                other => Err(RecordError::Control(ControlError::Unexpected(
                    format!("{:?}", other.kind()),
                    "Started",
                ))),
            }
        })();
        let (hello, started) = match started {
            Ok(v) => v,
            Err(e) => {
                cancel_all(&streams);
                for s in streams {
                    s.join();
                }
                // A refusal leaves the session as it was; anything else may have broken it.
                let usable = matches!(e, RecordError::Control(ControlError::Refused(..)));
                return Err(Box::new((e, usable.then_some(chan))));
            }
        };
        let mut problems = GuestProblems::default();
        let started = GuestStarted::check(&started, &cpus, &mut problems);
        // Streams of CPUs the agent does not record will never see a marker.
        for s in &streams {
            if !started.cpus.contains(&s.cpu) {
                s.shared.cancel.store(true, Ordering::SeqCst);
            }
        }
        let now = Instant::now();
        Ok(Recorder {
            chan,
            streams,
            hello,
            started,
            stream_nonce,
            cfg,
            early_stop: None,
            inbox: MetadataInbox::new(),
            problems,
            agent_errors: Vec::new(),
            budget,
            last_heard: now,
            next_ping: now,
            output: CommandOutputLog::default(),
        })
    }

    /// The guest's page size, from its (checked) HelloReply.
    pub fn page_size(&self) -> u32 {
        self.hello.page_size
    }

    /// Per-CPU readers (for progress).
    pub fn streams(&self) -> &[CpuStream] {
        &self.streams
    }

    /// Metadata files accepted so far (the static batch arrives right after `Started`).
    pub fn metadata_so_far(&self) -> &BTreeMap<String, Vec<u8>> {
        self.inbox.files()
    }

    /// True once `--max-size` worth of data has been kept.
    pub fn size_cap_reached(&self) -> bool {
        self.budget.as_ref().is_some_and(|b| b.exhausted())
    }

    /// True once the guest broke so many rules that the host should stop listening.
    pub fn guest_gave_up_on(&self) -> bool {
        self.problems.too_many()
    }

    /// How long the agent has said nothing.
    pub fn silent_for(&self) -> Duration {
        self.last_heard.elapsed()
    }

    /// Excuses the agent's silence so far (the domain is paused).
    pub fn excuse_silence(&mut self) {
        self.last_heard = Instant::now();
    }

    /// The guest command's output that arrived since the last call, to print.
    pub fn take_output(&mut self) -> Vec<crate::proto::CommandOutput> {
        self.output.take_pending()
    }

    /// Sends a `Ping` when one is due; the `Pong` (any message) proves the agent lives.
    pub fn keep_alive(&mut self) -> Result<(), RecordError> {
        let now = Instant::now();
        if now >= self.next_ping {
            self.next_ping = now + PING_EVERY;
            self.chan.send(&Message::Ping(Ping {
                nonce: random_u64(),
            }))?;
        }
        Ok(())
    }

    /// Handles what the agent sends for up to `timeout`. True once the agent has stopped on
    /// its own (its command ended); then [`Recorder::stop`] only collects.
    pub fn poll_stopped(&mut self, timeout: Duration) -> Result<bool, RecordError> {
        if self.early_stop.is_some() {
            return Ok(true);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chan.recv(left) {
                Ok(msg) => {
                    if let Some(stopped) = self.take(msg) {
                        self.early_stop = Some(stopped);
                        return Ok(true);
                    }
                }
                Err(ControlError::Timeout(_)) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One clock-sync exchange (docs/clock-sync.md): `host_mark(nonce)` marks the host's side
    /// (writes `tvctl-sync <nonce>` into the host's trace, if it is recorded) and returns its
    /// clock readings just before and just after; it is called before the probe is sent and
    /// again when the answer arrives. Returns the sample and the clock the guest read, or
    /// `None` when no answer came within `timeout` (or the agent stopped on its own meanwhile).
    /// A version-1 agent answers a `Ping` instead: one reading, no marker.
    pub fn sync_exchange(
        &mut self,
        host_mark: &mut dyn FnMut(u64) -> (u64, u64),
        timeout: Duration,
    ) -> Result<Option<(Sample, String)>, RecordError> {
        if self.early_stop.is_some() {
            return Ok(None);
        }
        let nonce = random_u64();
        let (_, sent_at) = host_mark(nonce);
        let probe = if self.chan.version() >= 2 {
            Message::SyncProbe(SyncProbe { nonce })
        } else {
            Message::Ping(Ping { nonce })
        };
        self.chan.send(&probe)?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (clock, guest_before, guest_after) = match self.chan.recv(left) {
                Ok(Message::SyncReply(r)) if r.nonce == nonce => (r.clock, r.before, r.after),
                Ok(Message::Pong(p)) if p.nonce == nonce => (p.clock, p.ts, p.ts),
                Ok(msg) => {
                    if let Some(stopped) = self.take(msg) {
                        self.early_stop = Some(stopped);
                        return Ok(None);
                    }
                    continue;
                }
                Err(ControlError::Timeout(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let (received_at, _) = host_mark(nonce);
            self.last_heard = Instant::now();
            let sample = Sample {
                host_before: sent_at,
                guest_before,
                guest_after,
                host_after: received_at,
            };
            return Ok(Some((sample, clean_text(&clock))));
        }
    }

    /// Files one message from the agent; returns a `Stopped`.
    fn take(&mut self, msg: Message) -> Option<crate::proto::Stopped> {
        self.last_heard = Instant::now();
        match msg {
            Message::Metadata(m) => self.inbox.push(m, &mut self.problems),
            Message::Stopped(s) => return Some(s),
            Message::CommandOutput(o) => self.output.push(o),
            // Late answers to pings and probes that timed out.
            Message::Pong(_) | Message::SyncReply(_) => {}
            // Our Stop crossed a Stopped (the command ended at that moment): nothing to do.
            Message::Error(e) if e.code == ErrorCode::NotRecording => {}
            Message::Error(e) => {
                if self.agent_errors.len() < 16 {
                    self.agent_errors
                        .push(format!("the agent reported: {}", clean_text(&e.text)));
                }
            }
            other => self.problems.note(format!(
                "the agent sent {:?} during the recording; ignored",
                other.kind()
            )),
        }
        None
    }

    /// Stops (unless the agent already did), collects metadata and reads every stream to the
    /// agent's byte count. Gives up, keeping what arrived, when `watch` says so, when the
    /// agent is silent for [`SILENCE_LIMIT`] (while the domain is not paused), or after the
    /// reply timeout (for `Stopped`) plus `drain_timeout` (for the data).
    pub fn stop(mut self, drain_timeout: Duration, watch: &mut dyn FnMut() -> Watch) -> Collected {
        let stopped = match self.early_stop.take() {
            Some(s) => {
                // The agent stopped by itself: from here on only its last pages may come.
                self.limit_streams();
                s
            }
            None => match self.await_stopped(watch) {
                Ok(s) => s,
                Err(end) => return self.into_collected(None, end),
            },
        };
        let stopped = GuestStopped::check(&stopped, &self.started.cpus, &mut self.problems);
        for s in &self.streams {
            match stopped.cpus.get(&s.cpu) {
                Some(c) => {
                    let limit = s.shared.limit();
                    if c.bytes > limit {
                        self.problems.note(format!(
                            "cpu{}: the agent claims {} bytes, more than it can have sent; cut at {limit}",
                            s.cpu, c.bytes
                        ));
                    }
                    s.shared.set_target(c.bytes.min(limit));
                }
                None => s.shared.cancel.store(true, Ordering::SeqCst),
            }
        }
        let end = self.drain(drain_timeout, watch);
        self.into_collected(Some(stopped), end)
    }

    /// Most bytes a CPU may still send after `Stop`: its ring buffer, plus what is in flight.
    fn drain_allowance(&self) -> u64 {
        u64::from(self.started.buffer_kb)
            .saturating_mul(1024)
            .saturating_add(DRAIN_SLACK)
    }

    /// Once the recording stops, a CPU may only deliver what its ring buffer and the queues
    /// held: more is not stored (a bound on what a guest can make the host write).
    fn limit_streams(&self) {
        let allowance = self.drain_allowance();
        for s in &self.streams {
            s.shared
                .set_limit(s.shared.consumed().saturating_add(allowance));
        }
    }

    /// Sends `Stop` and waits for `Stopped`, filing metadata meanwhile.
    fn await_stopped(
        &mut self,
        watch: &mut dyn FnMut() -> Watch,
    ) -> Result<crate::proto::Stopped, StopEnd> {
        // Limits first: whatever arrives from here on counts against what the guest may
        // still send (set after Stop, a fast guest's extra bytes would slip in before them).
        self.limit_streams();
        if let Err(e) = self.chan.send(&Message::Stop) {
            return Err(StopEnd::Failed(e.to_string()));
        }
        let deadline = Instant::now() + self.cfg.reply_timeout;
        let mut progress = self.progress_mark();
        loop {
            match watch() {
                Watch::Go => {}
                Watch::Paused => self.excuse_silence(),
                w => return Err(StopEnd::Watched(w)),
            }
            let now_progress = self.progress_mark();
            if now_progress != progress {
                progress = now_progress;
                self.last_heard = Instant::now();
            }
            if self.problems.too_many() {
                return Err(StopEnd::GuestMisbehaved);
            }
            if self.silent_for() >= SILENCE_LIMIT {
                return Err(StopEnd::AgentLost(format!(
                    "the agent sent nothing for {} s after Stop",
                    SILENCE_LIMIT.as_secs()
                )));
            }
            if Instant::now() >= deadline {
                return Err(StopEnd::AgentLost(format!(
                    "no Stopped within {} s of Stop",
                    self.cfg.reply_timeout.as_secs()
                )));
            }
            match self.chan.recv(SLICE) {
                Ok(msg) => {
                    if let Some(s) = self.take(msg) {
                        return Ok(s);
                    }
                }
                Err(ControlError::Timeout(_)) => {}
                Err(ControlError::Closed) => {
                    return Err(StopEnd::AgentLost(
                        "the agent closed the control channel".into(),
                    ))
                }
                Err(e) => return Err(StopEnd::Failed(e.to_string())),
            }
        }
    }

    /// Waits for every stream to reach its count.
    fn drain(&mut self, drain_timeout: Duration, watch: &mut dyn FnMut() -> Watch) -> StopEnd {
        let deadline = Instant::now() + drain_timeout;
        let mut progress = self.progress_mark();
        let mut last_progress = Instant::now();
        while self.streams.iter().any(|s| !s.is_finished()) {
            match watch() {
                Watch::Go => {}
                Watch::Paused => last_progress = Instant::now(),
                w => return StopEnd::Watched(w),
            }
            let now_progress = self.progress_mark();
            if now_progress != progress {
                progress = now_progress;
                last_progress = Instant::now();
            }
            if last_progress.elapsed() >= SILENCE_LIMIT {
                return StopEnd::AgentLost(format!(
                    "no data arrived for {} s while streams were short of the agent's counts",
                    SILENCE_LIMIT.as_secs()
                ));
            }
            if Instant::now() >= deadline {
                return StopEnd::AgentLost(format!(
                    "the streams did not reach the agent's counts within {} s",
                    drain_timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        StopEnd::Finished
    }

    /// Bytes taken from all FIFOs so far: changes whenever data arrives.
    fn progress_mark(&self) -> u64 {
        self.streams
            .iter()
            .map(|s| s.shared.consumed() + s.shared.discarded.load(Ordering::Relaxed))
            .fold(0u64, u64::saturating_add)
    }

    /// Gives up on the agent (the domain died, the user insisted, the agent is gone): keeps
    /// what arrived.
    pub fn abandon(self, end: StopEnd) -> Collected {
        self.into_collected(None, end)
    }

    fn into_collected(mut self, stopped: Option<GuestStopped>, end: StopEnd) -> Collected {
        cancel_all(&self.streams);
        let streams = std::mem::take(&mut self.streams)
            .into_iter()
            .map(|s| {
                let path = s.data_path.clone();
                (s.join(), path)
            })
            .collect::<Vec<_>>();
        for (outcome, _) in &streams {
            if outcome.excess > 0 {
                self.problems.note(format!(
                    "cpu{}: the guest sent {} bytes beyond what it may send; not kept",
                    outcome.cpu, outcome.excess
                ));
            }
        }
        let (metadata, formats) = self.inbox.finish(&mut self.problems);
        let protocol = self.chan.version();
        // Unless finished, the socket just closes: the agent sees the host gone and cleans up.
        let finished = end == StopEnd::Finished;
        let channel = if finished && self.cfg.keep_channel {
            Some(self.chan)
        } else {
            if finished {
                self.chan.close();
            }
            None
        };
        Collected {
            metadata,
            formats,
            stopped,
            streams,
            end,
            problems: self.problems,
            agent_errors: self.agent_errors,
            channel,
            output: self.output,
            protocol,
        }
    }
}

fn cancel_all(streams: &[CpuStream]) {
    for s in streams {
        s.shared.cancel.store(true, Ordering::SeqCst);
    }
}
