//! `tvctl trace` of several domains, and of the host (`--host`): one timeline in files that
//! `trace-cmd report -i host.dat -i guest1.dat …` merges in corrected time order.
//!
//! Every side records with one clock (`x86-tsc` unless `-C` names another user space can
//! read). Each guest's clock is related to the host's by probes over its control channel
//! (docs/clock-sync.md): a burst at the start, one every 250 ms while recording, a burst at
//! the stop. Each probe is a causal chain in the traces themselves: the host marks its trace
//! (`tvctl-sync <nonce>`), the agent marks the guest's between two clock readings, the host
//! marks again. With `--sync kvm` the offsets come from KVM's debugfs instead (exact). The
//! guest files get TIME_SHIFT (and TSC2NSEC on `x86-tsc`), the host file one GUEST option per
//! guest with the host thread of each vCPU, so trace-cmd and KernelShark line them up.
//!
//! The steps, each a function: boot → start the host, then every guest → sync burst → record
//! (per guest: ping, poll, its own stop causes) → sync burst → stop every guest, then the host
//! → estimate the offsets → write the files → summarise.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::collect::host::HostRecorder;
use crate::collect::progress::Progress;
use crate::collect::recorder::{Collected, Recorder, Watch};
use crate::collect::stream::ByteBudget;
use crate::collect::tsc::TscToNs;
use crate::exitcode::ExitCode;
use crate::libvirt::Dom;
use crate::tracedat::{GuestOption, TimeSample, TimeShift, Tsc2Nsec};
use crate::tsync::probe::{estimate, Estimate, RoundTripFilter, Sample};

use super::summary::{StopCause, TraceSummary};
use super::{
    boot_if_off, install_signal_counter, scratch_next_to, start_recording, stop_and_drain,
    summarise, write_and_count, DomainWatch, FileLinks, Recording, TraceError, TraceOptions,
    SILENCE_LIMIT,
};

/// Clocks both ends can read from user space, so probes can relate them.
pub const SYNCABLE_CLOCKS: [&str; 4] = ["x86-tsc", "mono", "mono_raw", "boot"];
/// Host events recorded by `--host` without `-H`, those the host has.
pub const DEFAULT_HOST_EVENTS: [&str; 4] = [
    "sched:sched_switch",
    "sched:sched_wakeup",
    "kvm:kvm_entry",
    "kvm:kvm_exit",
];
/// Probes at the start and at the stop of a recording, per guest.
const BURST: usize = 100;
/// How often a guest is probed while recording.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// How long one probe may wait for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How a guest's clock is related to the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMethod {
    /// KVM's debugfs `tsc-offset` where the domain runs under KVM, else probes.
    Auto,
    Kvm,
    Probe,
    /// No correction (for comparison).
    None,
}

/// A run of several files.
pub struct TimelineOptions<'a> {
    /// The domains with their set-up folders.
    pub domains: Vec<(&'a Dom, PathBuf)>,
    /// Events, duration, buffer, boot, agent timeout, `--max-size`; `output` is the host
    /// file (`PREFIX.dat`); guests get `PREFIX-<domain>.dat`.
    pub base: TraceOptions,
    /// `--host`: the host's events (already defaulted).
    pub host_events: Option<Vec<String>>,
    pub sync: SyncMethod,
    /// Root of debugfs for the kvm method (`/sys/kernel/debug`; tests point it elsewhere).
    pub debugfs: PathBuf,
}

/// The clock-sync result of one guest, for the summary (docs/json.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyncSummary {
    pub method: SyncMethod,
    /// Probes answered, and of those not used (too slow or inconsistent).
    pub samples: usize,
    pub dropped: usize,
    /// Stretches of constant offset (a `virsh suspend`/`resume` starts a new one).
    pub segments: Vec<SyncSegment>,
    /// The largest error bound over the segments, ns: the true offset is within this of the
    /// one written. 0 for kvm (exact); null for none.
    pub bound_ns: Option<u64>,
    /// Median probe round trip, ns.
    pub round_trip_ns: Option<u64>,
}

/// One stretch of constant offset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyncSegment {
    /// `host = guest + offset`, in the clock's raw units (TSC cycles for `x86-tsc`).
    pub offset: i64,
    pub bound_ns: u64,
    pub samples: usize,
}

/// The run's summary: the host's and every guest's, and the files to merge.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineSummary {
    pub schema: u32,
    pub clock: String,
    /// `trace-cmd report` arguments that merge the files, host first.
    pub report_command: String,
    pub host: Option<TraceSummary>,
    pub guests: Vec<TraceSummary>,
}

impl TimelineSummary {
    /// The gravest exit code of its parts.
    pub fn exit_code(&self) -> ExitCode {
        let codes = self
            .host
            .iter()
            .chain(&self.guests)
            .map(super::summary_exit_code);
        codes.max_by_key(|c| severity(*c)).unwrap_or(ExitCode::Ok)
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for part in self.host.iter().chain(&self.guests) {
            s.push_str(&part.to_text());
            if let Some(sync) = &part.sync {
                s.push_str(&format!(
                    "  clock sync: {:?}, {} samples ({} dropped), {} segment(s), bound {}\n",
                    sync.method,
                    sync.samples,
                    sync.dropped,
                    sync.segments.len(),
                    sync.bound_ns
                        .map_or_else(|| "none".to_string(), |b| format!("{b} ns"))
                ));
            }
        }
        s.push_str(&format!("merge: {}\n", self.report_command));
        s
    }
}

/// Orders exit codes from harmless to grave.
fn severity(code: ExitCode) -> u8 {
    match code {
        ExitCode::Ok => 0,
        ExitCode::Incomplete => 1,
        ExitCode::GuestMisbehaved => 2,
        ExitCode::DomainStopped => 3,
        ExitCode::Interrupted => 4,
        _ => 5,
    }
}

/// The guest file of `domain` next to the host file `output` (`PREFIX.dat` →
/// `PREFIX-<domain>.dat`, the names `trace-cmd record -A` uses).
pub fn guest_file(output: &Path, domain: &str) -> PathBuf {
    let stem = output
        .file_stem()
        .map_or_else(|| "trace".into(), |s| s.to_string_lossy().into_owned());
    output.with_file_name(format!("{stem}-{domain}.dat"))
}

/// One guest of the run while it records.
struct Guest<'a> {
    dom: &'a Dom,
    opts: TraceOptions,
    booted: bool,
    rec: Option<Recorder>,
    recording: Recording,
    watch: DomainWatch<'a>,
    /// Its own reason to stop, once it has one.
    cause: Option<StopCause>,
    samples: Vec<Sample>,
    /// Clocks the agent read that were not the run's (an old agent): probes unusable.
    wrong_clock: Option<String>,
    /// KVM's vCPU clocks read at the start (kvm method), to see whether they moved.
    kvm_at_start: Option<crate::tsync::kvm::KvmClocks>,
    next_probe: Instant,
}

/// Runs a trace of several domains and/or the host.
pub fn run(t: &TimelineOptions) -> Result<TimelineSummary, TraceError> {
    install_signal_counter();
    let clock = t.base.clock.clone().unwrap_or_else(|| "x86-tsc".into());
    if !SYNCABLE_CLOCKS.contains(&clock.as_str()) {
        return Err(TraceError::ClockNotSyncable { clock });
    }
    let mut progress = Progress::new(t.base.progress);
    if !t.base.command.is_empty() {
        progress.relay_command_output(t.base.relay_stdout);
    }
    let scratch = scratch_next_to(&t.base.output)?;
    let budget = t.base.max_size.map(|b| Arc::new(ByteBudget::new(b)));
    let mut base = t.base.clone();
    base.clock = Some(clock.clone());
    base.max_size = None; // shared through `budget` instead

    let mut booted = Vec::new();
    for (dom, _) in &t.domains {
        booted.push(boot_if_off(dom, &base, &mut progress)?);
    }
    let host = match &t.host_events {
        Some(events) => Some(start_host(
            events,
            &clock,
            &base,
            scratch.path(),
            budget.clone(),
        )?),
        None => None,
    };
    let mut guests = start_guests(
        t,
        &base,
        &booted,
        scratch.path(),
        budget.clone(),
        &mut progress,
    )?;
    progress.finish();
    let mark = |nonce: u64| host_mark(host.as_ref(), &clock, nonce);

    let start = Instant::now();
    for g in &mut guests {
        if matches!(t.sync, SyncMethod::Kvm | SyncMethod::Auto) && clock == "x86-tsc" {
            g.kvm_at_start = read_kvm(g, t).ok();
        }
        probe_burst(g, &clock, &mark);
    }
    let cause = record(
        &mut guests,
        &clock,
        &mark,
        t.base.duration,
        budget.as_deref(),
        &mut progress,
    );
    for g in guests.iter_mut().filter(|g| g.cause.is_none()) {
        probe_burst(g, &clock, &mark);
    }
    let elapsed = start.elapsed();

    let host_id = crate::control::random_u64();
    let tsc2nsec = (clock == "x86-tsc").then(TscToNs::host);
    let links_tsc = tsc2nsec.and_then(|c| Tsc2Nsec::new(c.mult, c.shift).ok());
    let mut summaries = Vec::new();
    let mut guest_options = Vec::new();
    for (g, booted) in guests.into_iter().zip(booted) {
        let (summary, option) = finish_guest(
            g, booted, cause, elapsed, host_id, &clock, tsc2nsec, links_tsc, t,
        )?;
        summaries.push(summary);
        guest_options.extend(option);
    }
    let host_summary = match host {
        Some(h) => Some(finish_host(
            h,
            &base,
            cause,
            elapsed,
            host_id,
            guest_options,
            links_tsc,
        )?),
        None => None,
    };
    let files: Vec<String> = host_summary
        .iter()
        .chain(&summaries)
        .map(|s| format!("-i {}", s.output))
        .collect();
    Ok(TimelineSummary {
        schema: super::summary::SCHEMA,
        clock,
        report_command: format!("trace-cmd report {}", files.join(" ")),
        host: host_summary,
        guests: summaries,
    })
}

/// Starts the host's recording (its events, those it has of the defaults).
fn start_host(
    events: &[String],
    clock: &str,
    base: &TraceOptions,
    scratch: &Path,
    budget: Option<Arc<ByteBudget>>,
) -> Result<HostRecorder, TraceError> {
    let data = scratch.join("host");
    let fifos = scratch.join("fifos");
    for d in [&data, &fifos] {
        std::fs::create_dir_all(d).map_err(|source| TraceError::Output {
            path: d.clone(),
            source,
        })?;
    }
    HostRecorder::start(events, Some(clock), base.buffer_kb, &data, &fifos, budget)
        .map_err(TraceError::Host)
}

/// Starts every guest's recording, one after the other (they boot meanwhile).
fn start_guests<'a>(
    t: &TimelineOptions<'a>,
    base: &TraceOptions,
    booted: &[bool],
    scratch: &Path,
    budget: Option<Arc<ByteBudget>>,
    progress: &mut Progress,
) -> Result<Vec<Guest<'a>>, TraceError> {
    let mut guests: Vec<Guest<'a>> = Vec::new();
    for ((dom, dir), &was_booted) in t.domains.iter().zip(booted) {
        let mut opts = base.clone();
        opts.domain_dir = dir.clone();
        opts.output = guest_file(&base.output, &dom.name());
        let data = scratch.join(format!("guest-{}", guests.len()));
        std::fs::create_dir_all(&data).map_err(|source| TraceError::Output {
            path: data.clone(),
            source,
        })?;
        let rec = match start_recording(dom, &opts, &data, progress, budget.clone()) {
            Ok(r) => r,
            Err(e) => {
                for g in guests {
                    if let Some(r) = g.rec {
                        let _ =
                            r.abandon(crate::collect::recorder::StopEnd::Watched(Watch::Abandon));
                    }
                }
                return Err(e);
            }
        };
        let recording = Recording {
            page_size: rec.page_size(),
            started: rec.started.clone(),
        };
        guests.push(Guest {
            dom,
            opts,
            booted: was_booted,
            rec: Some(rec),
            recording,
            watch: DomainWatch::new(dom),
            cause: None,
            samples: Vec::new(),
            wrong_clock: None,
            kvm_at_start: None,
            next_probe: Instant::now(),
        });
    }
    Ok(guests)
}

/// Marks the host's trace (when it is recorded) between two readings of its clock.
fn host_mark(host: Option<&HostRecorder>, clock: &str, nonce: u64) -> (u64, u64) {
    match host {
        Some(h) => {
            let r = h.mark(nonce);
            (r.before, r.after)
        }
        None => {
            let (_, ts) = crate::agent::session::read_clock(clock);
            (ts, ts)
        }
    }
}

/// One probe of a guest; keeps the sample if the agent read the run's clock.
fn probe(g: &mut Guest, clock: &str, mark: &dyn Fn(u64) -> (u64, u64)) -> bool {
    let Some(rec) = g.rec.as_mut() else {
        return false;
    };
    let mut host = |nonce| mark(nonce);
    match rec.sync_exchange(&mut host, PROBE_TIMEOUT) {
        Ok(Some((sample, read))) if read == clock => {
            g.samples.push(sample);
            true
        }
        Ok(Some((_, read))) => {
            g.wrong_clock = Some(read);
            false
        }
        Ok(None) | Err(_) => false,
    }
}

fn probe_burst(g: &mut Guest, clock: &str, mark: &dyn Fn(u64) -> (u64, u64)) {
    for _ in 0..BURST {
        if !probe(g, clock, mark) {
            break;
        }
    }
}

/// Records until a stop cause for the whole run: duration, Ctrl-C, `--max-size`, or every
/// guest having its own cause (its domain stopped, its agent fell silent or misbehaved, its
/// command ended). Each guest is probed every 250 ms, which also proves its agent lives.
fn record(
    guests: &mut [Guest],
    clock: &str,
    mark: &dyn Fn(u64) -> (u64, u64),
    duration: Option<Duration>,
    budget: Option<&ByteBudget>,
    progress: &mut Progress,
) -> StopCause {
    let start = Instant::now();
    let signals_at_start = super::signals();
    loop {
        if super::signals() > signals_at_start {
            return StopCause::Interrupt;
        }
        if duration.is_some_and(|d| start.elapsed() >= d) {
            return StopCause::Duration;
        }
        if budget.is_some_and(ByteBudget::exhausted) {
            return StopCause::MaxSize;
        }
        if !guests.is_empty() && guests.iter().all(|g| g.cause.is_some()) {
            return StopCause::Command;
        }
        if guests.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
        for g in guests.iter_mut().filter(|g| g.cause.is_none()) {
            g.cause = guest_cause(g, clock, mark);
            // A command runs in one guest only (the CLI refuses more): its output as it comes.
            if let Some(r) = g.rec.as_mut() {
                progress.command_output(r.take_output());
            }
        }
    }
}

/// What one guest's state says: its own stop cause, if it has one now.
fn guest_cause(g: &mut Guest, clock: &str, mark: &dyn Fn(u64) -> (u64, u64)) -> Option<StopCause> {
    match g.watch.check() {
        Watch::DomainGone => return Some(StopCause::DomainStopped),
        Watch::Paused => {
            if let Some(r) = g.rec.as_mut() {
                r.excuse_silence();
            }
        }
        _ => {}
    }
    if Instant::now() >= g.next_probe {
        g.next_probe = Instant::now() + PROBE_EVERY;
        probe(g, clock, mark);
    }
    let rec = g.rec.as_mut()?;
    if rec.guest_gave_up_on() {
        return Some(StopCause::GuestMisbehaved);
    }
    if rec.silent_for() >= SILENCE_LIMIT {
        return Some(StopCause::AgentLost);
    }
    match rec.poll_stopped(Duration::from_millis(20)) {
        Ok(true) => Some(StopCause::Command),
        Ok(false) => None,
        Err(_) => Some(StopCause::AgentLost),
    }
}

/// Stops one guest, estimates its clock offset, writes its file; returns its summary and the
/// host file's GUEST option for it.
#[allow(clippy::too_many_arguments)]
fn finish_guest(
    mut g: Guest,
    booted: bool,
    run_cause: StopCause,
    elapsed: Duration,
    host_id: u64,
    clock: &str,
    tsc: Option<TscToNs>,
    tsc2nsec: Option<Tsc2Nsec>,
    t: &TimelineOptions,
) -> Result<(TraceSummary, Option<GuestOption>), TraceError> {
    let cause = g.cause.unwrap_or(run_cause);
    let rec = g.rec.take().expect("a started guest has its recorder");
    let mut progress = Progress::new(false);
    if !g.opts.command.is_empty() {
        progress.relay_command_output(g.opts.relay_stdout);
    }
    let mut watch = DomainWatch::new(g.dom);
    let (mut collected, cause) = stop_and_drain(rec, &mut watch, cause, elapsed, &mut progress);
    progress.command_output(collected.output.take_pending());
    progress.finish_command_output();
    let guest_id = crate::control::random_u64();
    let ncpus = collected
        .streams
        .iter()
        .map(|(o, _)| o.cpu + 1)
        .max()
        .unwrap_or(1);
    let (shift, sync, notes) = clock_correction(&g, ncpus, host_id, clock, tsc, t);
    let links = FileLinks {
        trace_id: guest_id,
        guests: Vec::new(),
        time_shift: shift,
        tsc2nsec,
    };
    let (cpus, page_problems) = write_and_count(&g.opts, &g.recording, &mut collected, links)?;
    let mut summary = summarise(
        Some(g.dom),
        &g.opts,
        booted || g.booted,
        &g.recording,
        collected,
        cause,
        elapsed,
        cpus,
    );
    summary.guest_problems.extend(page_problems);
    summary.notes.extend(notes);
    summary.sync = Some(sync);
    let option = GuestOption::new(g.dom.name(), guest_id, vcpu_threads(g.dom, ncpus)).ok();
    Ok((summary, option))
}

/// The guest's TIME_SHIFT and its sync summary, by the method asked for.
fn clock_correction(
    g: &Guest,
    ncpus: u32,
    host_id: u64,
    clock: &str,
    tsc: Option<TscToNs>,
    t: &TimelineOptions,
) -> (Option<TimeShift>, SyncSummary, Vec<String>) {
    let to_ns = |raw: u64| tsc.map_or(raw, |c| c.ns(raw));
    let mut notes = Vec::new();
    let cpus = usize::try_from(ncpus).unwrap_or(1);
    if t.sync == SyncMethod::None {
        let shift = TimeShift::fixed_offsets(host_id, &vec![0; cpus]).ok();
        return (
            shift,
            SyncSummary {
                method: SyncMethod::None,
                samples: 0,
                dropped: 0,
                segments: Vec::new(),
                bound_ns: None,
                round_trip_ns: None,
            },
            notes,
        );
    }
    if matches!(t.sync, SyncMethod::Kvm | SyncMethod::Auto) && clock == "x86-tsc" {
        let kvm = read_kvm(g, t);
        match kvm {
            Ok(clocks) => {
                if let Some(start) = &g.kvm_at_start {
                    let moved = clocks.changed_since(start);
                    if !moved.is_empty() {
                        notes.push(format!(
                            "the TSC offset of guest CPUs {moved:?} changed during the recording (the guest wrote its TSC, or was migrated): their events before the change are shifted by the difference; --sync probe would show the change as a new segment"
                        ));
                    }
                }
                let offsets: Vec<i64> = clocks.vcpus.iter().map(|v| v.offset()).collect();
                let shift = TimeShift::fixed_offsets(host_id, &offsets).ok();
                let segments = offsets
                    .iter()
                    .map(|&offset| SyncSegment {
                        offset,
                        bound_ns: 0,
                        samples: 1,
                    })
                    .collect();
                return (
                    shift,
                    SyncSummary {
                        method: SyncMethod::Kvm,
                        samples: offsets.len(),
                        dropped: 0,
                        segments,
                        bound_ns: Some(0),
                        round_trip_ns: None,
                    },
                    notes,
                );
            }
            Err(why) if t.sync == SyncMethod::Kvm => {
                notes.push(format!("--sync kvm failed: {why}; probes used instead"));
            }
            Err(_) => {}
        }
    }
    if let Some(read) = &g.wrong_clock {
        notes.push(format!(
            "the guest agent read '{read}' instead of the trace clock '{clock}' (an old agent?): its file is not corrected"
        ));
    }
    let raw_per_ms = tsc.map_or(1_000_000, |c| {
        // cycles per ms from the conversion: 1e6 ns * 2^shift / mult
        u64::try_from((1_000_000u128 << c.shift) / u128::from(c.mult.max(1))).unwrap_or(1_000_000)
    });
    let mut est: Estimate = estimate(&g.samples, &RoundTripFilter::for_clock(raw_per_ms));
    place_gap_samples(&mut est, &g.samples);
    let last = g
        .samples
        .iter()
        .map(|s| s.guest_after)
        .max()
        .unwrap_or(0)
        .saturating_add(raw_per_ms.saturating_mul(600_000)); // ten minutes past the last probe
    let shift = est
        .time_shift_samples(last)
        .ok()
        .filter(|s| !s.is_empty())
        .and_then(|samples| {
            let per_cpu: Vec<TimeSample> = samples
                .iter()
                .map(|s| TimeSample::new(s.time, s.offset))
                .collect();
            TimeShift::new(host_id, false, vec![per_cpu; cpus]).ok()
        });
    if shift.is_none() {
        notes.push("no usable clock-sync probe: the guest's file is not corrected".into());
    }
    let segments: Vec<SyncSegment> = est
        .segments
        .iter()
        .map(|s| SyncSegment {
            offset: s.offset,
            bound_ns: to_ns(s.bound),
            samples: s.samples,
        })
        .collect();
    let summary = SyncSummary {
        method: SyncMethod::Probe,
        samples: g.samples.len(),
        dropped: est.dropped,
        bound_ns: segments.iter().map(|s| s.bound_ns).max(),
        segments,
        round_trip_ns: est.median_round_trip.map(to_ns),
    };
    (shift, summary, notes)
}

/// Moves the boundary between two segments past the probes that fell between them (dropped
/// as too slow: they spanned the pause that changed the offset). Each such probe's marker is
/// in the guest's trace, so it must get the right side's offset: the guest read its clock
/// before the pause if, with the earlier offset, that reading lies near the host's send time;
/// after it if, with the later offset, it lies near the host's receive time.
fn place_gap_samples(est: &mut Estimate, samples: &[Sample]) {
    for k in 0..est.segments.len().saturating_sub(1) {
        let (old, new) = (est.segments[k], est.segments[k + 1]);
        for s in samples {
            if s.guest_before <= old.last_guest_ts || s.guest_after >= new.first_guest_ts {
                continue;
            }
            let from_send = (i128::from(s.guest_before) + i128::from(old.offset)
                - i128::from(s.host_before))
            .abs();
            let to_receive =
                (i128::from(s.host_after) - i128::from(s.guest_after) - i128::from(new.offset))
                    .abs();
            if from_send <= to_receive {
                let seg = &mut est.segments[k];
                seg.last_guest_ts = seg.last_guest_ts.max(s.guest_after);
            } else {
                let seg = &mut est.segments[k + 1];
                seg.first_guest_ts = seg.first_guest_ts.min(s.guest_before);
            }
        }
    }
}

/// KVM's vCPU clocks of a guest, from debugfs.
fn read_kvm(g: &Guest, t: &TimelineOptions) -> Result<crate::tsync::kvm::KvmClocks, String> {
    let pid = g.dom.qemu_pid().ok_or("the QEMU pid is unknown")?;
    let cpus = g.recording.started.cpus.len();
    crate::tsync::kvm::read_clocks(&t.debugfs, pid, cpus).map_err(|e| e.to_string())
}

/// Host thread of each vCPU: QEMU names them `CPU n/TCG` or `CPU n/KVM`.
fn vcpu_threads(dom: &Dom, ncpus: u32) -> Vec<u32> {
    let mut tids = vec![GuestOption::UNKNOWN_TID; usize::try_from(ncpus).unwrap_or(0)];
    let Some(pid) = dom.qemu_pid() else {
        return tids;
    };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return tids;
    };
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let vcpu = comm
            .trim()
            .strip_prefix("CPU ")
            .and_then(|r| r.split_once('/'))
            .and_then(|(n, _)| n.parse::<usize>().ok());
        if let Some(slot) = vcpu.and_then(|v| tids.get_mut(v)) {
            *slot = tid;
        }
    }
    tids
}

/// Stops the host's recording and writes its file with the GUEST options.
fn finish_host(
    host: HostRecorder,
    base: &TraceOptions,
    cause: StopCause,
    elapsed: Duration,
    host_id: u64,
    guests: Vec<GuestOption>,
    tsc2nsec: Option<Tsc2Nsec>,
) -> Result<TraceSummary, TraceError> {
    let recording = Recording {
        page_size: host.page_size(),
        started: host.started.clone(),
    };
    let mut collected: Collected = host.stop(Duration::from_secs(60));
    let links = FileLinks {
        trace_id: host_id,
        guests,
        time_shift: None,
        tsc2nsec,
    };
    let (cpus, page_problems) = write_and_count(base, &recording, &mut collected, links)?;
    let mut summary = summarise(
        None, base, false, &recording, collected, cause, elapsed, cpus,
    );
    summary.guest_problems.extend(page_problems);
    Ok(summary)
}
