//! `tvctl trace`: boot the domain if needed, drive the agent, collect every CPU's stream,
//! write a trace.dat that `trace-cmd report` and KernelShark open, and summarise honestly.
//!
//! The flow, and what makes it safe:
//! 1. Check the domain is set up (channels in its XML, FIFOs on disk; missing FIFOs are
//!    recreated) and that the output's folder is writable, before anything starts.
//! 2. Open every CPU's FIFO for reading, then boot the domain (unless it runs), then connect to
//!    the agent with a bounded wait: the guest never writes into a FIFO that nobody reads.
//! 3. Record until `--duration`, Ctrl-C (or SIGTERM), the guest command's end, the domain
//!    stopping, `--max-size`, or the agent falling silent (pinged every second).
//! 4. Stop: the agent drains its buffers and reports exact byte counts; each stream is read to
//!    its count. A second Ctrl-C, a dead domain or a silent agent keeps what arrived instead.
//!    Every wait is bounded, and everything the guest sends is checked on the way in
//!    (`collect::guest_input`): what breaks a rule is dropped and noted, never trusted.
//! 5. Write the file (temporary name, then rename), read it back to count events and lost
//!    events, and report.

pub mod output; // metadata → trace.dat headers; write; read back and count
pub mod summary; // the summary, for people and as JSON (docs/json.md)
pub mod timeline; // several domains and the host: one clock-corrected timeline

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::collect::guest_input::{clean_text, GuestError, GuestStarted};
use crate::collect::progress::{LossScanner, Progress};
use crate::collect::recorder::{
    Collected, RecordError, Recorder, RecorderConfig, StopEnd, Watch, SILENCE_LIMIT,
};
use crate::collect::stream::ByteBudget;
use crate::control::ControlError;
use crate::exitcode::ExitCode;
use crate::libvirt::{Dom, LibvirtError};
use crate::proto::OutputStream;
use crate::proto::{ErrorCode, StopReason};
use crate::tracedat::sanitize::check_headers;
use crate::tracedat::{PageLayout, TraceDatError};

use summary::{CommandSummary, CpuSummary, StopCause, TraceSummary};

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// The per-domain folder (`<dir>/<domain name>`).
    pub domain_dir: PathBuf,
    pub output: PathBuf,
    pub events: Vec<String>,
    pub duration: Option<Duration>,
    pub buffer_kb: Option<u32>,
    pub clock: Option<String>,
    pub command: Vec<String>,
    pub boot: bool,
    /// How long to wait for the agent after boot (or on a running domain).
    pub agent_timeout: Duration,
    /// Show the live display (on a terminal).
    pub progress: bool,
    /// Relay the guest command's stdout to ours (its stderr always goes to ours); off with
    /// `--json`, whose stdout is the summary.
    pub relay_stdout: bool,
    /// `--max-size`: most bytes of trace data to keep; reaching it stops the recording.
    pub max_size: Option<u64>,
    /// `--file-version`: 7 (sections, zstd; the default, as trace-cmd 3.x writes) or 6.
    pub file_version: FileVersion,
}

/// The trace.dat layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileVersion {
    /// Version 6: no compression, for readers older than trace-cmd 3.0.
    V6,
    /// Version 7 with zstd compression.
    #[default]
    V7,
}

/// Why a trace failed. Partial results (a file with what arrived) are not errors: see
/// [`TraceOutcome`].
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("the guest agent did not answer within {0:?}. Is tvctl-agent installed and started in the guest? Read the guest's console log; the domain was left running")]
    AgentTimeout(Duration),
    #[error("tvctl-agent in {domain} did not answer within {waited:.0} s: {cause}. The guest's console log{console}; the domain was left running")]
    NoAgent {
        domain: String,
        waited: f64,
        /// The likely cause, from the control port's state in the live XML.
        cause: String,
        /// " (PATH); its last lines: …", or " is not in a file (give the domain a <serial type='file'>)".
        console: String,
    },
    #[error("the guest agent refused the request: {text}")]
    Refused { code: ErrorCode, text: String },
    #[error("domain '{0}' is not running and --no-boot was given: start it (virsh start {0}) or drop --no-boot")]
    NotRunning(String),
    #[error("the domain stopped before the agent answered; read the guest's console log")]
    DomainStoppedEarly,
    #[error("interrupted before the recording started; nothing was written")]
    Interrupted,
    #[error("cannot write {path}: {source}. Choose another -o, or free space")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the trace file {path}: {source}. Choose another -o, or free space")]
    Write {
        path: PathBuf,
        #[source]
        source: TraceDatError,
    },
    #[error("the guest misbehaved: {0}")]
    Guest(#[from] GuestError),
    #[error("-C {clock}: several files can be merged only on a clock both host and guests read from user space ({}); drop -C for x86-tsc", timeline::SYNCABLE_CLOCKS.join(", "))]
    ClockNotSyncable { clock: String },
    #[error("cannot record the host: {0}")]
    Host(#[source] crate::collect::host::HostError),
    #[error("recording failed: {0}")]
    Record(#[source] RecordError),
    #[error(
        "domain '{domain}' is not set up for tracing: run `tvctl setup {domain}` (or pass --setup)"
    )]
    NotSetUp { domain: String },
    #[error("domain '{domain}' runs without tvctl's channels (setup takes effect at its next boot): restart it (virsh shutdown {domain}; tvctl trace boots it)")]
    NeedsRestart { domain: String },
    #[error("{what} while domain '{domain}' runs: QEMU still holds the old file, so that CPU's data would be lost. Restart the domain (virsh shutdown {domain}; tvctl trace boots it)")]
    FifoReplaced { domain: String, what: String },
    #[error(transparent)]
    Setup(#[from] crate::setup::SetupError),
}

impl TraceError {
    /// The exit code `tvctl trace` ends with for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            TraceError::Libvirt(e) => crate::setup::libvirt_exit_code(e),
            TraceError::AgentTimeout(_) | TraceError::NoAgent { .. } => ExitCode::AgentTimeout,
            TraceError::Refused { .. } => ExitCode::AgentRefused,
            TraceError::NotRunning(_)
            | TraceError::NotSetUp { .. }
            | TraceError::NeedsRestart { .. }
            | TraceError::FifoReplaced { .. } => ExitCode::NotSetUp,
            TraceError::DomainStoppedEarly => ExitCode::DomainStopped,
            TraceError::Interrupted => ExitCode::Interrupted,
            TraceError::Output { .. } | TraceError::Write { .. } => ExitCode::OutputNotWritable,
            TraceError::Guest(_) => ExitCode::GuestMisbehaved,
            TraceError::ClockNotSyncable { .. } => ExitCode::Usage,
            TraceError::Host(crate::collect::host::HostError::Refused(_)) => ExitCode::AgentRefused,
            TraceError::Host(_) => ExitCode::PermissionDenied,
            TraceError::Record(RecordError::Fifo { .. }) => ExitCode::HostFileConflict,
            TraceError::Record(RecordError::NoFifos(_)) => ExitCode::NotSetUp,
            TraceError::Record(RecordError::Control(ControlError::Protocol(_))) => {
                ExitCode::GuestMisbehaved
            }
            TraceError::Record(_) => ExitCode::Internal,
            TraceError::Setup(e) => e.exit_code(),
        }
    }
}

impl TraceOutcome {
    /// The gravest of what happened: see [`summary_exit_code`].
    pub fn exit_code(&self) -> ExitCode {
        summary_exit_code(&self.summary)
    }
}

/// 130 abandoned, 10 domain stopped, 13 the guest broke a rule, 14 incomplete (a stream short,
/// the agent lost), else 0.
pub fn summary_exit_code(s: &TraceSummary) -> ExitCode {
    match s.stop_cause {
        StopCause::Abandoned => ExitCode::Interrupted,
        StopCause::DomainStopped => ExitCode::DomainStopped,
        _ if !s.guest_problems.is_empty() => ExitCode::GuestMisbehaved,
        StopCause::AgentLost | StopCause::AgentError => ExitCode::Incomplete,
        _ if !s.complete => ExitCode::Incomplete,
        _ => ExitCode::Ok,
    }
}

/// A domain ready to trace.
#[derive(Debug)]
pub struct Prepared {
    /// The domain's folder.
    pub folder: PathBuf,
    /// What `--setup` (or the repair of missing files) changed; `None` when nothing changed.
    /// The persistent XML may have changed even if the trace then fails: say it at once.
    pub setup: Option<crate::setup::ChangeReport>,
}

/// Makes sure `dom` is ready to trace: set up (running `tvctl setup` when asked, or when only
/// files are missing, such as FIFOs deleted since), and, if it runs, running with our
/// channels. `changed` hears at once what setup changed, before anything else can fail.
pub fn prepare(
    hv: &crate::libvirt::Hypervisor,
    root: &Path,
    dom: &Dom,
    run_setup: bool,
    changed: &mut dyn FnMut(&crate::setup::ChangeReport),
) -> Result<Prepared, TraceError> {
    let name = dom.name();
    let status = crate::setup::status(hv, root, Some(&dom.uuid()))?;
    let Some(st) = status.domains.first() else {
        return Err(TraceError::NotSetUp { domain: name });
    };
    if !st.set_up && !run_setup {
        return Err(TraceError::NotSetUp { domain: name });
    }
    let mut setup = None;
    if run_setup || !st.ok {
        // Idempotent: recreates what is missing (FIFOs), changes nothing that is right, and
        // fails with a precise error on a real conflict.
        // Not --live: libvirt 9 cannot hot-plug pipe channels; a running domain that lacks
        // them is told to restart below.
        let options = crate::setup::SetupOptions {
            dry_run: false,
            live: false,
            group: None,
        };
        let report = crate::setup::setup(hv, root, &dom.uuid(), &options)?;
        if report.changed {
            changed(&report);
            setup = Some(report);
        }
    }
    if dom.is_active()? {
        let live = dom.live_xml()?;
        let has_control = crate::domxml::our_channels(&live)
            .map(|chs| {
                chs.iter()
                    .any(|c| c.kind == crate::domxml::ChannelKind::Control)
            })
            .unwrap_or(false);
        if !has_control {
            return Err(TraceError::NeedsRestart { domain: name });
        }
    }
    let folder =
        crate::channels::DomainFolder::new(root, &name).map_err(crate::setup::SetupError::from)?;
    if dom.is_active()? {
        if let Some(pid) = dom.qemu_pid() {
            check_qemu_holds_fifos(folder.path(), pid, &name)?;
        }
    }
    Ok(Prepared {
        folder: folder.path().to_path_buf(),
        setup,
    })
}

/// A FIFO deleted (and recreated by setup) while the domain runs is not the one QEMU writes
/// to: QEMU opened its FIFOs at start and holds them. Each `.out` FIFO must be a file QEMU
/// has open, compared by device and inode through `/proc/<qemu pid>/fd`.
fn check_qemu_holds_fifos(folder: &Path, qemu_pid: u32, domain: &str) -> Result<(), TraceError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{qemu_pid}/fd")) else {
        return Ok(()); // QEMU gone or not ours to inspect: the recording will tell.
    };
    let held: std::collections::HashSet<(u64, u64)> = fds
        .flatten()
        .filter_map(|fd| std::fs::metadata(fd.path()).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    for cpu in crate::collect::recorder::fifo_cpus(folder) {
        let path = folder.join(format!("trace-path-cpu{cpu}.out"));
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !held.contains(&(meta.dev(), meta.ino())) {
            return Err(TraceError::FifoReplaced {
                domain: domain.to_string(),
                what: format!("{} was deleted or replaced", path.display()),
            });
        }
    }
    Ok(())
}

impl From<RecordError> for TraceError {
    fn from(e: RecordError) -> TraceError {
        match e {
            RecordError::Control(ControlError::Timeout(d)) => TraceError::AgentTimeout(d),
            RecordError::Control(ControlError::Refused(code, text)) => TraceError::Refused {
                code,
                text: clean_text(&text),
            },
            RecordError::Control(ControlError::Interrupted) => TraceError::Interrupted,
            RecordError::Guest(g) => TraceError::Guest(g),
            other => TraceError::Record(other),
        }
    }
}

/// A finished trace: the file was written; `summary.stop_cause` says whether it is whole.
#[derive(Debug)]
pub struct TraceOutcome {
    pub summary: TraceSummary,
}

/// Counts SIGINT/SIGTERM instead of dying, for the life of the process.
pub(crate) fn install_signal_counter() {
    crate::sigcount::install();
}

pub(crate) fn signals() -> u32 {
    crate::sigcount::count()
}

/// What every wait of a recording asks: should it go on, and, when the control channel
/// closes, is the domain going away? `tvctl trace` asks libvirt ([`DomainWatch`]); `tvctl
/// serve` asks what libvirt's events told it.
pub(crate) trait Watcher {
    /// Asked every 100 ms in every wait.
    fn check(&mut self) -> Watch;
    /// After the control channel closed: whether the domain stops (within a moment).
    fn domain_went_away(&mut self) -> bool;
    /// From now on only signals after this moment count (the stop phase: the signal that
    /// stopped the recording must not also abandon its drain).
    fn rebase(&mut self);
}

impl Watcher for DomainWatch<'_> {
    fn check(&mut self) -> Watch {
        DomainWatch::check(self)
    }

    fn domain_went_away(&mut self) -> bool {
        domain_went_away(self.dom)
    }

    fn rebase(&mut self) {
        self.signals_seen = signals();
    }
}

/// Watches the user and the domain for every wait: a signal beyond those already seen, the
/// domain stopping or paused (asked of libvirt at most every 500 ms).
pub(crate) struct DomainWatch<'a> {
    dom: &'a Dom,
    signals_seen: u32,
    last_check: Instant,
    state: Watch,
}

impl<'a> DomainWatch<'a> {
    pub(crate) fn new(dom: &'a Dom) -> DomainWatch<'a> {
        DomainWatch {
            dom,
            signals_seen: signals(),
            last_check: Instant::now(),
            state: Watch::Go,
        }
    }

    pub(crate) fn check(&mut self) -> Watch {
        if signals() > self.signals_seen {
            return Watch::Abandon;
        }
        if self.last_check.elapsed() >= Duration::from_millis(500) {
            self.last_check = Instant::now();
            self.state = match self.dom.state() {
                Ok(s) if !s.is_active() => Watch::DomainGone,
                Ok(crate::libvirt::DomState::Paused) => Watch::Paused,
                _ => Watch::Go,
            };
        }
        self.state
    }
}

/// Runs one trace of `dom` (the caller checked it is set up, see [`prepare`], and holds its
/// lock). The steps, each a function below:
/// boot if off → start the recording → record until a stop cause → stop and drain →
/// write the file and count → summarise.
pub fn run(dom: &Dom, opts: &TraceOptions) -> Result<TraceOutcome, TraceError> {
    install_signal_counter();
    let mut progress = Progress::new(opts.progress);
    if !opts.command.is_empty() {
        progress.relay_command_output(opts.relay_stdout);
    }
    let scratch = scratch_next_to(&opts.output)?;
    let booted = boot_if_off(dom, opts, &mut progress)?;
    let budget = opts.max_size.map(|b| Arc::new(ByteBudget::new(b)));
    let mut rec = match start_recording(dom, opts, scratch.path(), &mut progress, budget) {
        Ok(rec) => rec,
        Err(e) => {
            progress.finish();
            return Err(e);
        }
    };
    let recording = Recording {
        page_size: rec.hello.page_size,
        started: rec.started.clone(),
    };
    progress.recording(&recording.started.cpus);
    let start = Instant::now();
    let mut watch = DomainWatch::new(dom);
    let cause = record_until_stop(&mut rec, &mut watch, opts.duration, &mut progress);
    let elapsed = start.elapsed();
    let (mut collected, cause) = stop_and_drain(rec, &mut watch, cause, elapsed, &mut progress);
    progress.command_output(collected.output.take_pending());
    progress.finish_command_output();
    progress.finish();
    let (cpus, page_problems) =
        write_and_count(opts, &recording, &mut collected, FileLinks::default())?;
    let mut summary = summarise(
        Some(dom),
        opts,
        booted,
        &recording,
        collected,
        cause,
        elapsed,
        cpus,
    );
    summary.guest_problems.extend(page_problems);
    Ok(TraceOutcome { summary })
}

/// What the agent said when the recording started (checked), kept for the file and summary.
pub(crate) struct Recording {
    pub(crate) page_size: u32,
    pub(crate) started: GuestStarted,
}

/// What ties one file of a run to the others (docs/trace-format.md, "Host and guest files").
#[derive(Debug, Clone, Default)]
pub(crate) struct FileLinks {
    /// The file's TRACEID (random, non-zero) when 0 is given.
    pub(crate) trace_id: u64,
    /// Host file: one GUEST option per guest.
    pub(crate) guests: Vec<crate::tracedat::GuestOption>,
    /// Guest file: its clock correction.
    pub(crate) time_shift: Option<crate::tracedat::TimeShift>,
    /// Files on the `x86-tsc` clock: cycles to ns.
    pub(crate) tsc2nsec: Option<crate::tracedat::Tsc2Nsec>,
}

/// Scratch space next to the output: proves the folder is writable before anything starts,
/// and keeps copy_file_range within one file system.
pub(crate) fn scratch_next_to(output: &Path) -> Result<tempfile::TempDir, TraceError> {
    let out_dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    tempfile::Builder::new()
        .prefix(".tvctl-trace-")
        .tempdir_in(&out_dir)
        .map_err(|source| TraceError::Output {
            path: out_dir,
            source,
        })
}

/// Boots the domain unless it runs (or `--no-boot`); true if it was booted.
pub(crate) fn boot_if_off(
    dom: &Dom,
    opts: &TraceOptions,
    progress: &mut Progress,
) -> Result<bool, TraceError> {
    if dom.is_active()? {
        return Ok(false);
    }
    if !opts.boot {
        return Err(TraceError::NotRunning(dom.name()));
    }
    progress.wait(&format!("booting {}", dom.name()));
    dom.start()?;
    Ok(true)
}

/// Opens the FIFOs, waits for the agent (bounded, and Ctrl-C ends the wait), asks it to record.
pub(crate) fn start_recording(
    dom: &Dom,
    opts: &TraceOptions,
    data_dir: &Path,
    progress: &mut Progress,
    budget: Option<Arc<ByteBudget>>,
) -> Result<Recorder, TraceError> {
    let cfg = RecorderConfig {
        socket: opts.domain_dir.join("agent-ctl-path.sock"),
        fifo_dir: opts.domain_dir.clone(),
        data_dir: data_dir.to_path_buf(),
        events: opts.events.clone(),
        buffer_kb: opts.buffer_kb,
        clock: opts.clock.clone(),
        command: opts.command.clone(),
        connect_timeout: opts.agent_timeout,
        reply_timeout: Duration::from_secs(60),
        budget,
        keep_channel: false,
    };
    progress.wait_at_most(
        &format!("waiting for tvctl-agent in {} (Ctrl-C stops)", dom.name()),
        opts.agent_timeout,
    );
    let mut watch = DomainWatch::new(dom);
    let mut ask = || watch.check();
    Recorder::start(cfg, &mut ask).map_err(|e| {
        // QEMU closes the control socket as it exits, a little before libvirt reports the
        // domain inactive: a closed channel waits for libvirt to say so (bounded, 3 s).
        let gone = match &e {
            RecordError::Control(ControlError::Closed) => domain_went_away(dom),
            RecordError::Control(_) => !dom.is_active().unwrap_or(false),
            _ => false,
        };
        match e {
            _ if gone => TraceError::DomainStoppedEarly,
            RecordError::Control(ControlError::Timeout(d)) => no_agent(dom, d),
            e => e.into(),
        }
    })
}

/// Waits for a reason to stop (duration, Ctrl-C, the command's end, the domain stopping, the
/// size cap, the agent falling silent or misbehaving), pinging the agent and refreshing the
/// live display meanwhile.
pub(crate) fn record_until_stop(
    rec: &mut Recorder,
    watch: &mut dyn Watcher,
    duration: Option<Duration>,
    progress: &mut Progress,
) -> StopCause {
    let start = Instant::now();
    let mut live = LiveLoss::default();
    loop {
        match watch.check() {
            Watch::Abandon => return StopCause::Interrupt,
            Watch::DomainGone => return StopCause::DomainStopped,
            Watch::Paused => rec.excuse_silence(),
            Watch::Go => {}
        }
        if duration.is_some_and(|d| start.elapsed() >= d) {
            return StopCause::Duration;
        }
        if rec.size_cap_reached() {
            return StopCause::MaxSize;
        }
        if rec.guest_gave_up_on() {
            return StopCause::GuestMisbehaved;
        }
        if rec.silent_for() >= SILENCE_LIMIT {
            return StopCause::AgentLost;
        }
        if rec.keep_alive().is_err() {
            return StopCause::AgentLost;
        }
        match rec.poll_stopped(Duration::from_millis(200)) {
            Ok(true) => return StopCause::Command,
            Ok(false) => {}
            Err(RecordError::Control(ControlError::Closed)) => {
                // QEMU closes our end when the domain goes away.
                return if watch.domain_went_away() {
                    StopCause::DomainStopped
                } else {
                    StopCause::AgentLost
                };
            }
            Err(_) => return StopCause::GuestMisbehaved,
        }
        progress.command_output(rec.take_output());
        if progress.is_enabled() {
            let lost = live.scan(rec);
            progress.update(rec.streams(), start.elapsed(), lost);
        }
    }
}

/// Whether the domain stops within a moment: QEMU closes the control socket as it exits,
/// a little before libvirt reports the domain inactive.
fn domain_went_away(dom: &Dom) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        if !dom.is_active().unwrap_or(true) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Lost events counted from page headers as pages land, for the live display.
#[derive(Default)]
struct LiveLoss {
    layout: Option<PageLayout>,
    scanners: BTreeMap<u32, LossScanner>,
}

impl LiveLoss {
    fn scan(&mut self, rec: &Recorder) -> u64 {
        if self.layout.is_none() {
            self.layout = page_layout(rec.metadata_so_far(), rec.page_size());
        }
        let Some(layout) = &self.layout else {
            return 0;
        };
        let mut lost = 0u64;
        for s in rec.streams() {
            let sc = self
                .scanners
                .entry(s.cpu)
                .or_insert_with(|| LossScanner::new(&s.data_path));
            sc.scan(layout, s.shared.received.load(Ordering::Relaxed));
            lost = lost.saturating_add(sc.missed_events);
        }
        lost
    }
}

/// What the live display says when a graceful stop begins: why, and how to stop waiting for
/// the drain (a Ctrl-C now is the first one only when the stop was not a Ctrl-C itself).
fn stopping_line(cause: StopCause, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    match cause {
        StopCause::Interrupt => {
            format!("stopping after {secs:.1} s; draining the guest (Ctrl-C again to stop waiting)")
        }
        other => format!(
            "{} after {secs:.1} s; draining the guest (Ctrl-C to stop waiting)",
            other.describe()
        ),
    }
}

/// Stops the recording and reads every stream to the agent's count; a second Ctrl-C, the
/// domain dying or the agent falling silent end the wait with what arrived. Returns the
/// final stop cause.
pub(crate) fn stop_and_drain(
    rec: Recorder,
    watch: &mut dyn Watcher,
    cause: StopCause,
    elapsed: Duration,
    progress: &mut Progress,
) -> (Collected, StopCause) {
    match cause {
        // A guest that floods the host with junk would keep a graceful stop waiting.
        StopCause::GuestMisbehaved => return (rec.abandon(StopEnd::GuestMisbehaved), cause),
        StopCause::DomainStopped => {
            return (rec.abandon(StopEnd::Watched(Watch::DomainGone)), cause)
        }
        StopCause::AgentLost => {
            let why = format!(
                "the agent answered nothing for {} s while recording",
                SILENCE_LIMIT.as_secs()
            );
            return (rec.abandon(StopEnd::AgentLost(why)), cause);
        }
        _ => {}
    }
    progress.println(&stopping_line(cause, elapsed));
    watch.rebase();
    let collected = rec.stop(Duration::from_secs(60), &mut || watch.check());
    let cause = match (&collected.end, cause) {
        (StopEnd::Watched(Watch::Abandon), _) => StopCause::Abandoned,
        (StopEnd::Watched(_), _) => StopCause::DomainStopped,
        (StopEnd::AgentLost(_), _) if watch.domain_went_away() => StopCause::DomainStopped,
        (StopEnd::AgentLost(_), _) => StopCause::AgentLost,
        (StopEnd::Failed(_), _) => StopCause::AgentError,
        (StopEnd::GuestMisbehaved, _) => StopCause::GuestMisbehaved,
        (StopEnd::Finished, StopCause::Command) => match &collected.stopped {
            Some(s) if s.reason == StopReason::AgentError => StopCause::AgentError,
            Some(s) if s.reason == StopReason::GuestRequest => StopCause::Guest,
            _ => StopCause::Command,
        },
        (StopEnd::Finished, c) => c,
    };
    (collected, cause)
}

/// Writes the file (temporary name, then rename) from what was collected, leaving corrupt
/// pages out, then reads it back to count events and lost events per CPU. Also returns the
/// guest problems found in the pages.
pub(crate) fn write_and_count(
    opts: &TraceOptions,
    recording: &Recording,
    collected: &mut Collected,
    links: FileLinks,
) -> Result<(Vec<CpuSummary>, Vec<String>), TraceError> {
    let cpus = &recording.started.cpus;
    let complete: BTreeMap<u32, bool> = collected
        .streams
        .iter()
        .map(|(o, _)| (o.cpu, o.complete && o.error.is_none()))
        .collect();
    let data: Vec<output::CollectedCpu> = collected
        .streams
        .iter()
        .filter(|(o, _)| cpus.contains(&o.cpu))
        .map(|(o, path)| output::CollectedCpu {
            cpu: o.cpu,
            data: Some(path.clone()),
            bytes: o.received,
        })
        .collect();
    let counts = collected.stopped.as_ref().map(|s| &s.cpus);
    let trace_id = match links.trace_id {
        0 => crate::control::random_u64(),
        id => id,
    };
    let mut meta = output::trace_meta(
        std::mem::take(&mut collected.metadata),
        recording.page_size,
        counts,
        trace_id,
    );
    meta.guests = links.guests;
    meta.time_shift = links.time_shift;
    meta.tsc2nsec = links.tsc2nsec;
    let write_err = |source| TraceError::Write {
        path: opts.output.clone(),
        source,
    };
    let layout = check_headers(&meta.header_page, &meta.header_event, meta.page_size)
        .map_err(|e| GuestError::BadHeaders(clean_text(&e.to_string())))?;
    let scans = output::write_file(
        &opts.output,
        &meta,
        &data,
        &layout,
        &collected.formats,
        opts.file_version,
    )
    .map_err(write_err)?;
    let problems = scans
        .iter()
        .filter(|(_, scan)| scan.dropped_pages > 0)
        .map(|(cpu, scan)| {
            let first = scan
                .problems
                .first()
                .map(|(page, why)| format!("; page {page}: {}", clean_text(&why.to_string())))
                .unwrap_or_default();
            format!(
                "cpu{cpu}: {} pages left out: trace-cmd could not read them safely{first}",
                scan.dropped_pages
            )
        })
        .collect();
    let cpus = output::cpu_summaries(&scans, cpus, counts, &complete);
    Ok((cpus, problems))
}

/// The run's summary: what was asked, what the guest did, what the file holds.
#[allow(clippy::too_many_arguments)]
pub(crate) fn summarise(
    dom: Option<&Dom>,
    opts: &TraceOptions,
    booted: bool,
    recording: &Recording,
    collected: Collected,
    cause: StopCause,
    elapsed: Duration,
    cpus: Vec<CpuSummary>,
) -> TraceSummary {
    let started = &recording.started;
    let mut notes = Vec::new();
    match &collected.end {
        StopEnd::AgentLost(why) => notes.push(format!(
            "{why}: it died, or the guest locked up. The file holds what arrived. Read the last lines of the guest's console log{}",
            dom.map(console_hint).unwrap_or_default()
        )),
        StopEnd::Failed(why) => notes.push(format!("stopping failed: {}", clean_text(why))),
        _ => {}
    }
    notes.extend(collected.agent_errors.iter().cloned());
    if !started.splice {
        notes.push(format!(
            "the guest used read/write instead of splice: {}",
            started.note
        ));
    }
    for (outcome, _) in &collected.streams {
        if let Some(e) = &outcome.error {
            notes.push(format!("cpu{}: {e}", outcome.cpu));
        }
        if outcome.cut > 0 {
            notes.push(format!(
                "cpu{}: {} bytes not kept (--max-size reached)",
                outcome.cpu, outcome.cut
            ));
        }
        if !outcome.complete && started.cpus.contains(&outcome.cpu) {
            let sent = collected
                .stopped
                .as_ref()
                .and_then(|s| s.cpus.get(&outcome.cpu))
                .map(|c| format!(" of {}", c.bytes))
                .unwrap_or_default();
            notes.push(format!(
                "cpu{}: stream incomplete ({} bytes arrived{sent})",
                outcome.cpu, outcome.received
            ));
        }
    }
    let guest_problems = collected.problems.to_notes();
    TraceSummary {
        setup: None,
        schema: summary::SCHEMA,
        domain: dom.map_or_else(|| "host".to_string(), |d| d.name()),
        output: opts.output.display().to_string(),
        events_requested: opts.events.clone(),
        events: started.events.clone(),
        clock: started.clock.clone(),
        clock_source: if opts.clock.is_some() {
            "option"
        } else {
            "guest-default"
        },
        buffer_kb: started.buffer_kb,
        splice: started.splice,
        booted,
        stop_cause: cause,
        duration_s: (elapsed.as_secs_f64() * 10.0).round() / 10.0,
        command: (!opts.command.is_empty()).then(|| CommandSummary {
            argv: opts.command.clone(),
            exit_status: collected.stopped.as_ref().and_then(|s| s.command_status),
            output_relayed: collected.output.any || collected.protocol >= 4,
            stdout: collected.output.tail_text(OutputStream::Stdout),
            stderr: collected.output.tail_text(OutputStream::Stderr),
            stdout_bytes: collected.output.totals[0],
            stderr_bytes: collected.output.totals[1],
            output_truncated: collected.output.truncated(OutputStream::Stdout)
                || collected.output.truncated(OutputStream::Stderr),
        }),
        total_bytes: cpus.iter().map(|c| c.bytes).fold(0, u64::saturating_add),
        total_events: cpus.iter().map(|c| c.events).fold(0, u64::saturating_add),
        total_lost_events: cpus
            .iter()
            .map(|c| c.lost_events)
            .fold(0, u64::saturating_add),
        complete: cpus.iter().all(|c| c.complete),
        cpus,
        max_size: opts.max_size,
        guest_problems,
        sync: None,
        notes,
    }
}

/// The agent did not answer within `waited`: why that is likely, from whether a program in
/// the guest has the control port open (libvirt's `state` of the channel in the live XML),
/// and where to read the console.
fn no_agent(dom: &Dom, waited: Duration) -> TraceError {
    let state = dom.live_xml().ok().and_then(|xml| {
        crate::domxml::our_channels(&xml)
            .ok()?
            .into_iter()
            .find(|c| c.kind == crate::domxml::ChannelKind::Control)?
            .target_state
    });
    let name = dom.name();
    let cause = match state.as_deref() {
        Some("disconnected") => format!(
            "no program in the guest opened tvctl's control port, so tvctl-agent is not \
             installed, not started, or the guest is still booting: install it with \
             `tvctl agent install {name}` (needs qemu-guest-agent in the guest), or see \
             README \"Tracing your own domain\"; a slow boot needs a longer --agent-timeout"
        ),
        Some("connected") => "a program in the guest has tvctl's control port open but did \
             not answer: a tvctl-agent too old for this tvctl, or a stuck one (in the guest: \
             `journalctl -u tvctl-agent`; restart it with `systemctl restart tvctl-agent`)"
            .to_string(),
        _ => "the guest did not answer on tvctl's control port: is tvctl-agent installed \
             and started in the guest?"
            .to_string(),
    };
    let console = match console_hint(dom) {
        h if h.is_empty() => {
            format!(" is not kept in a file (QEMU's own log: /var/log/libvirt/qemu/{name}.log)")
        }
        h => h,
    };
    TraceError::NoAgent {
        domain: name,
        waited: waited.as_secs_f64(),
        cause,
        console,
    }
}

/// " (PATH); its last lines: …" for the domain's serial console log file, from its live XML,
/// if it has one. The lines come from the guest: escaped, and only the last few.
fn console_hint(dom: &Dom) -> String {
    let Some(path) = dom
        .live_xml()
        .ok()
        .and_then(|xml| crate::domxml::console_log_path(&xml))
    else {
        return String::new();
    };
    let tail = console_tail(Path::new(&path), 5);
    if tail.is_empty() {
        format!(" ({path})")
    } else {
        format!(" ({path}); its last lines: {}", tail.join(" | "))
    }
}

/// The last `n` non-empty lines of a log, read from its last 4 KiB, each escaped.
fn console_tail(path: &Path, n: usize) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(4096))).is_err()
        || f.take(4096).read_to_end(&mut buf).is_err()
    {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| clean_text(l.chars().take(200).collect::<String>().as_str()))
        .collect();
    let skip = lines.len().saturating_sub(n);
    lines.drain(..skip);
    lines
}

fn page_layout(files: &BTreeMap<String, Vec<u8>>, page_size: u32) -> Option<PageLayout> {
    PageLayout::parse(
        files.get("events/header_page")?,
        files.get("events/header_event")?,
        page_size,
    )
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_stop_does_not_speak_of_ctrl_c_again() {
        let line = stopping_line(StopCause::Duration, Duration::from_secs(10));
        assert_eq!(
            line,
            "duration reached after 10.0 s; draining the guest (Ctrl-C to stop waiting)"
        );
        let line = stopping_line(StopCause::MaxSize, Duration::from_millis(2500));
        assert!(line.starts_with("--max-size reached after 2.5 s"), "{line}");
        assert!(!line.contains("again"), "{line}");
    }

    #[test]
    fn a_ctrl_c_stop_says_a_second_one_stops_waiting() {
        let line = stopping_line(StopCause::Interrupt, Duration::from_secs(3));
        assert!(line.contains("Ctrl-C again to stop waiting"), "{line}");
    }
}
