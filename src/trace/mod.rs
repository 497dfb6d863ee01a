//! `tvctl trace`: boot the domain if needed, drive the agent, collect every CPU's stream,
//! write a trace.dat that `trace-cmd report` and KernelShark open, and summarise honestly.
//!
//! The flow, and what makes it safe:
//! 1. Check the domain is set up (channels in its XML, FIFOs on disk; missing FIFOs are
//!    recreated) and that the output's folder is writable, before anything starts.
//! 2. Open every CPU's FIFO for reading, then boot the domain (unless it runs), then connect to
//!    the agent with a bounded wait: the guest never writes into a FIFO that nobody reads.
//! 3. Record until `--duration`, Ctrl-C, the guest command's end, or the domain stopping.
//! 4. Stop: the agent drains its buffers and reports exact byte counts; each stream is read to
//!    its count. A second Ctrl-C, or a dead domain, keeps what arrived instead.
//! 5. Write the file (temporary name, then rename), read it back to count events and lost
//!    events, and report.

pub mod output; // metadata → trace.dat headers; write; read back and count
pub mod summary; // the summary, for people and as JSON (docs/json.md)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::collect::progress::{LossScanner, Progress};
use crate::collect::recorder::{
    MetadataFiles, RecordError, Recorder, RecorderConfig, StopOutcome, StreamResults,
};
use crate::control::ControlError;
use crate::exitcode::ExitCode;
use crate::libvirt::{Dom, LibvirtError};
use crate::proto::{ErrorCode, StopReason};
use crate::tracedat::{PageLayout, TraceDatError};

use summary::{CommandSummary, StopCause, TraceSummary};

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
}

/// Why a trace failed. Partial results (a file with what arrived) are not errors: see
/// [`TraceOutcome`].
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("the guest agent did not answer within {0:?}. Is tvctl-agent installed and started in the guest? Read the guest's console log; the domain was left running")]
    AgentTimeout(Duration),
    #[error("the guest agent refused the request: {text}")]
    Refused { code: ErrorCode, text: String },
    #[error("domain '{0}' is not running and --no-boot was given: start it (virsh start {0}) or drop --no-boot")]
    NotRunning(String),
    #[error("the domain stopped before the agent answered; read the guest's console log")]
    DomainStoppedEarly,
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
    #[error("recording failed: {0}")]
    Record(#[source] RecordError),
    #[error(
        "domain '{domain}' is not set up for tracing: run `tvctl setup {domain}` (or pass --setup)"
    )]
    NotSetUp { domain: String },
    #[error("domain '{domain}' runs without tvctl's channels (setup takes effect at its next boot): restart it (virsh shutdown {domain}; tvctl trace boots it)")]
    NeedsRestart { domain: String },
    #[error(transparent)]
    Setup(#[from] crate::setup::SetupError),
}

impl TraceError {
    /// The exit code `tvctl trace` ends with for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            TraceError::Libvirt(e) => crate::setup::libvirt_exit_code(e),
            TraceError::AgentTimeout(_) => ExitCode::AgentTimeout,
            TraceError::Refused { .. } => ExitCode::AgentRefused,
            TraceError::NotRunning(_)
            | TraceError::NotSetUp { .. }
            | TraceError::NeedsRestart { .. } => ExitCode::NotSetUp,
            TraceError::DomainStoppedEarly => ExitCode::DomainStopped,
            TraceError::Output { .. } | TraceError::Write { .. } => ExitCode::OutputNotWritable,
            TraceError::Record(RecordError::Fifo { .. }) => ExitCode::HostFileConflict,
            TraceError::Record(RecordError::NoFifos(_)) => ExitCode::NotSetUp,
            TraceError::Record(_) => ExitCode::Internal,
            TraceError::Setup(e) => e.exit_code(),
        }
    }
}

impl TraceOutcome {
    /// 0 for a whole recording; 10 when the domain stopped; 130 when abandoned (Ctrl-C twice).
    pub fn exit_code(&self) -> ExitCode {
        match self.summary.stop_cause {
            StopCause::DomainStopped => ExitCode::DomainStopped,
            StopCause::Abandoned => ExitCode::Interrupted,
            StopCause::AgentError => ExitCode::Internal,
            StopCause::Duration | StopCause::Interrupt | StopCause::Command => ExitCode::Ok,
        }
    }
}

/// Makes sure `dom` is ready to trace: set up (running `tvctl setup` when asked, or when only
/// files are missing, such as FIFOs deleted since), and, if it runs, running with our
/// channels. Returns the domain's folder.
pub fn prepare(
    hv: &crate::libvirt::Hypervisor,
    root: &Path,
    dom: &Dom,
    run_setup: bool,
) -> Result<PathBuf, TraceError> {
    let name = dom.name();
    let status = crate::setup::status(hv, root, Some(&dom.uuid()))?;
    let Some(st) = status.domains.first() else {
        return Err(TraceError::NotSetUp { domain: name });
    };
    if !st.set_up && !run_setup {
        return Err(TraceError::NotSetUp { domain: name });
    }
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
        crate::setup::setup(hv, root, &dom.uuid(), &options)?;
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
    Ok(folder.path().to_path_buf())
}

impl From<RecordError> for TraceError {
    fn from(e: RecordError) -> TraceError {
        match e {
            RecordError::Control(ControlError::Timeout(d)) => TraceError::AgentTimeout(d),
            RecordError::Control(ControlError::Refused(code, text)) => {
                TraceError::Refused { code, text }
            }
            other => TraceError::Record(other),
        }
    }
}

/// A finished trace: the file was written; `summary.stop_cause` says whether it is whole.
#[derive(Debug)]
pub struct TraceOutcome {
    pub summary: TraceSummary,
}

static SIGNALS: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Counts SIGINT/SIGTERM instead of dying, for the life of the process.
fn install_signal_counter() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only does an atomic add, which is async-signal-safe.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

fn signals() -> u32 {
    SIGNALS.load(Ordering::SeqCst)
}

/// Runs one trace of `dom`. `prepared` is true once the caller checked the domain is set up.
pub fn run(dom: &Dom, opts: &TraceOptions) -> Result<TraceOutcome, TraceError> {
    install_signal_counter();
    let name = dom.name();
    let mut progress = Progress::new(opts.progress);

    // Scratch space next to the output: proves the folder is writable before anything
    // starts, and lets copy_file_range stay within one file system.
    let out_dir = match opts.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let scratch = tempfile::Builder::new()
        .prefix(".tvctl-trace-")
        .tempdir_in(&out_dir)
        .map_err(|source| TraceError::Output {
            path: out_dir.clone(),
            source,
        })?;

    let socket = opts.domain_dir.join("agent-ctl-path.sock");
    let mut booted = false;
    let cfg = RecorderConfig {
        socket: socket.clone(),
        fifo_dir: opts.domain_dir.clone(),
        data_dir: scratch.path().to_path_buf(),
        events: opts.events.clone(),
        buffer_kb: opts.buffer_kb,
        clock: opts.clock.clone(),
        command: opts.command.clone(),
        connect_timeout: opts.agent_timeout,
        reply_timeout: Duration::from_secs(60),
    };

    if !dom.is_active()? {
        if !opts.boot {
            return Err(TraceError::NotRunning(name));
        }
        progress.wait(&format!("booting {name}"));
        dom.start()?;
        booted = true;
    }
    progress.wait(&format!("waiting for tvctl-agent in {name}"));
    let mut rec = match Recorder::start(cfg) {
        Ok(r) => r,
        Err(e) => {
            progress.finish();
            if !dom.is_active().unwrap_or(false) {
                return Err(TraceError::DomainStoppedEarly);
            }
            return Err(e.into());
        }
    };
    let cpus = rec.started.cpus.clone();
    progress.recording(&cpus);

    // Record until something says stop.
    let start = Instant::now();
    let cause = match record_until_stop(&mut rec, dom, opts.duration, &mut progress) {
        Ok(c) => c,
        Err(e) => {
            progress.finish();
            return Err(e.into());
        }
    };
    let elapsed_recording = start.elapsed();

    // Stop and drain. While draining, a second Ctrl-C (or a dead domain) abandons the wait.
    let page_size = rec.started_page_size();
    let started = rec.started.clone();
    let signals_at_stop = signals();
    let mut stop_error = None;
    let (files, stopped, streams, cause) = match cause {
        StopCause::DomainStopped => {
            let (files, streams) = rec.abandon_with_metadata();
            (files, None, streams, cause)
        }
        _ => {
            progress.println(&format!(
                "stopping after {:.1} s (Ctrl-C again to stop waiting)",
                elapsed_recording.as_secs_f64()
            ));
            match stop_watching(rec, dom, signals_at_stop) {
                StopResult::Done(f) => {
                    let cause = match (cause, f.stopped.reason) {
                        (StopCause::Command, StopReason::AgentError) => StopCause::AgentError,
                        (c, _) => c,
                    };
                    (f.metadata, Some(f.stopped), f.streams, cause)
                }
                StopResult::Abandoned(files, streams, why, error) => {
                    if let Some(e) = error {
                        progress.println(&format!("stopping failed: {e}"));
                        stop_error = Some(e);
                    }
                    (files, None, streams, why)
                }
            }
        }
    };
    progress.finish();

    // Write the file and count.
    let mut notes: Vec<String> = stop_error.into_iter().collect();
    if !started.splice {
        notes.push(format!(
            "the guest used read/write instead of splice: {}",
            started.note
        ));
    }
    let mut collected = Vec::new();
    let mut complete = BTreeMap::new();
    for (outcome, path) in &streams {
        if let Some(e) = &outcome.error {
            notes.push(format!("cpu{}: {e}", outcome.cpu));
        }
        if !outcome.complete {
            notes.push(format!(
                "cpu{}: stream incomplete ({} bytes arrived{})",
                outcome.cpu,
                outcome.received,
                stopped
                    .as_ref()
                    .and_then(|s| s.cpus.iter().find(|c| c.cpu == outcome.cpu))
                    .map(|c| format!(" of {}", c.bytes))
                    .unwrap_or_default()
            ));
        }
        complete.insert(outcome.cpu, outcome.complete && outcome.error.is_none());
        if cpus.contains(&outcome.cpu) {
            collected.push(output::CollectedCpu {
                cpu: outcome.cpu,
                data: Some(path.clone()),
                bytes: outcome.received,
            });
        }
    }
    let stats: Vec<Option<&crate::proto::CpuStopped>> =
        (0..collected.iter().map(|c| c.cpu + 1).max().unwrap_or(0))
            .map(|cpu| {
                stopped
                    .as_ref()
                    .and_then(|s| s.cpus.iter().find(|c| c.cpu == cpu))
            })
            .collect();
    let trace_id = crate::control::random_u64();
    let meta = output::trace_meta(&files, page_size, &stats, trace_id);
    output::write_file(&opts.output, &meta, &collected).map_err(|source| TraceError::Write {
        path: opts.output.clone(),
        source,
    })?;
    let stopped_cpus = stopped.as_ref().map(|s| s.cpus.clone()).unwrap_or_default();
    let cpu_summaries =
        output::count_cpus(&opts.output, &cpus, &stopped_cpus, &complete).map_err(|source| {
            TraceError::Write {
                path: opts.output.clone(),
                source,
            }
        })?;
    let all_complete = cpu_summaries.iter().all(|c| c.complete);
    let summary = TraceSummary {
        schema: summary::SCHEMA,
        domain: name,
        output: opts.output.display().to_string(),
        events_requested: opts.events.clone(),
        events: started.events.clone(),
        clock: started.clock.clone(),
        buffer_kb: started.buffer_kb,
        splice: started.splice,
        booted,
        stop_cause: cause,
        duration_s: (elapsed_recording.as_secs_f64() * 10.0).round() / 10.0,
        command: (!opts.command.is_empty()).then(|| CommandSummary {
            argv: opts.command.clone(),
            exit_status: stopped.as_ref().and_then(|s| s.command_status),
        }),
        total_bytes: cpu_summaries.iter().map(|c| c.bytes).sum(),
        total_events: cpu_summaries.iter().map(|c| c.events).sum(),
        total_lost_events: cpu_summaries.iter().map(|c| c.lost_events).sum(),
        cpus: cpu_summaries,
        complete: all_complete,
        notes,
    };
    Ok(TraceOutcome { summary })
}

/// Waits for a reason to stop (duration, Ctrl-C, the command's end, the domain stopping),
/// refreshing the live display meanwhile.
fn record_until_stop(
    rec: &mut Recorder,
    dom: &Dom,
    duration: Option<Duration>,
    progress: &mut Progress,
) -> Result<StopCause, RecordError> {
    let start = Instant::now();
    let mut scanners: BTreeMap<u32, LossScanner> = BTreeMap::new();
    let mut layout: Option<PageLayout> = None;
    let mut last_state_check = Instant::now();
    loop {
        if signals() > 0 {
            return Ok(StopCause::Interrupt);
        }
        if duration.is_some_and(|d| start.elapsed() >= d) {
            return Ok(StopCause::Duration);
        }
        match rec.poll_stopped(Duration::from_millis(200)) {
            Ok(true) => return Ok(StopCause::Command),
            Ok(false) => {}
            Err(RecordError::Control(ControlError::Closed)) => return Ok(StopCause::DomainStopped),
            Err(e) => return Err(e),
        }
        if last_state_check.elapsed() >= Duration::from_millis(500) {
            last_state_check = Instant::now();
            if !dom.is_active().unwrap_or(true) {
                return Ok(StopCause::DomainStopped);
            }
        }
        if progress.is_enabled() {
            if layout.is_none() {
                layout = page_layout(rec.metadata_so_far(), rec.started_page_size());
            }
            let mut lost = 0;
            if let Some(l) = &layout {
                for s in rec.streams() {
                    let sc = scanners
                        .entry(s.cpu)
                        .or_insert_with(|| LossScanner::new(&s.data_path));
                    sc.scan(l, s.shared.received.load(Ordering::Relaxed));
                    lost += sc.missed_events;
                }
            }
            progress.update(rec.streams(), start.elapsed(), lost);
        }
    }
}

enum StopResult {
    Done(crate::collect::recorder::Finished),
    Abandoned(MetadataFiles, StreamResults, StopCause, Option<String>),
}

/// Stops the recording, giving up (and keeping what arrived) on a second Ctrl-C or when the
/// domain dies while the agent drains.
fn stop_watching(rec: Recorder, dom: &Dom, signals_at_stop: u32) -> StopResult {
    let mut why = None;
    let mut last_check = Instant::now();
    let mut abort = || {
        if signals() > signals_at_stop {
            why = Some(StopCause::Abandoned);
        } else if last_check.elapsed() > Duration::from_millis(500) {
            last_check = Instant::now();
            if !dom.is_active().unwrap_or(true) {
                why = Some(StopCause::DomainStopped);
            }
        }
        why.is_some()
    };
    match rec.stop_or_abandon(Duration::from_secs(60), &mut abort) {
        StopOutcome::Finished(f) => StopResult::Done(f),
        StopOutcome::Abandoned {
            metadata,
            streams,
            error,
        } => {
            // Without an error the agent went away (the domain died) or we gave up.
            let cause = match (why, &error) {
                (Some(c), _) => c,
                (None, None) => StopCause::DomainStopped,
                (None, Some(_)) => StopCause::AgentError,
            };
            StopResult::Abandoned(metadata, streams, cause, error.map(|e| e.to_string()))
        }
    }
}

fn page_layout(files: &BTreeMap<String, Vec<u8>>, page_size: u32) -> Option<PageLayout> {
    PageLayout::parse(
        files.get("events/header_page")?,
        files.get("events/header_event")?,
        page_size,
    )
    .ok()
}
