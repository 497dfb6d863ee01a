//! One recording in the guest: a private tracefs instance, one pump per CPU, and optionally a
//! command whose end stops the recording.
//!
//! `Recording::start` validates the request completely before touching tracefs (events are
//! resolved against `available_events`, the clock against `trace_clock`, sizes bounded), so a
//! bad request changes nothing. `Recording::finish` turns tracing off, drains every CPU, collects
//! the metadata trace-cmd needs, and removes the instance: the guest is left as it was. The
//! stop's order is safe for the kernel and every wait in it is bounded (`shutdown` says why,
//! step by step; [`stop`] holds the bounded waits).

mod command;
mod stop;

use std::collections::BTreeSet;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

pub use command::GuestCommand;
pub use stop::Leftover;

use crate::proto::limits::{MAX_BUFFER_KB, MAX_COMMAND_ARGS, MAX_EVENTS_PER_REQUEST, MAX_TEXT};
use crate::proto::{
    CommandOutput, CpuStopped, ErrorCode, RecordRequest, Started, StopReason, Stopped,
    StreamMarker, SyncReply,
};

use super::ports::PortMap;
use super::pump::{self, PumpConfig, PumpOutcome, PumpShared, Waker};
use super::tracefs::{EventName, Instance, Tracefs, TracefsError};

/// Instances of ours are named `tvctl-<nonce>`; stale ones are removed at agent start.
pub const INSTANCE_PREFIX: &str = "tvctl-";

/// A request the agent refuses, with the code the host gets.
#[derive(Debug)]
pub struct Refusal {
    pub code: ErrorCode,
    pub text: String,
}

impl Refusal {
    fn new(code: ErrorCode, text: impl Into<String>) -> Refusal {
        Refusal {
            code,
            text: text.into(),
        }
    }
}

impl From<TracefsError> for Refusal {
    fn from(e: TracefsError) -> Refusal {
        let code = match e {
            TracefsError::UnknownEvent { .. } => ErrorCode::UnknownEvent,
            TracefsError::BadEventSpec(_) => ErrorCode::BadRequest,
            TracefsError::UnknownClock(_) => ErrorCode::UnknownClock,
            TracefsError::Mount(_) | TracefsError::Io { .. } => ErrorCode::Tracefs,
        };
        Refusal::new(code, e.to_string())
    }
}

struct CpuPump {
    cpu: u32,
    shared: Arc<PumpShared>,
    handle: JoinHandle<PumpOutcome>,
}

/// A running recording.
pub struct Recording {
    instance: Option<Instance>,
    tracefs: Tracefs,
    events: Vec<EventName>,
    pumps: Vec<CpuPump>,
    /// Rung once, at stop, so pumps asleep in poll(2) start draining at once.
    waker: Arc<Waker>,
    command: Option<GuestCommand>,
    command_status: Option<i32>,
    /// The instance's trace clock, as `Started` reported it.
    clock: String,
    /// Where the start's time went, for the agent's log.
    pub startup: String,
}

/// What a stopped recording hands back: the files that grew while tracing, and the counts.
pub struct Finished {
    pub metadata: Vec<(String, Vec<u8>)>,
    pub stopped: Stopped,
    /// CPUs whose stream ended before their buffer was drained, and why; the host hears of
    /// them in an `Error` (and `stopped.reason` is then `AgentError`).
    pub cut_short: Vec<String>,
    /// What the stop could not finish within its bounds; the control loop finishes it.
    pub leftover: Option<Leftover>,
    /// The command's last output, read after it ended (relayed before `Stopped`).
    pub output: Vec<CommandOutput>,
}

impl Recording {
    /// Validates `req` and starts recording. Nothing is changed in the guest if this fails.
    pub fn start(
        req: &RecordRequest,
        tracefs: &Tracefs,
        ports: &PortMap,
        online_cpus: u32,
        page_size: u32,
        mode: super::session::DataMode,
        relay_output: bool,
    ) -> Result<(Recording, Started), Refusal> {
        // Where the start's time goes, for the agent's log (issue 11: start-up cost).
        let mut marks: Vec<(&str, Instant)> = vec![("", Instant::now())];
        // 1. Validate everything first.
        if req.events.is_empty() {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "no events requested: name at least one (e.g. sched:sched_switch)",
            ));
        }
        if req.events.len() > MAX_EVENTS_PER_REQUEST {
            return Err(Refusal::new(ErrorCode::BadRequest, "too many event specs"));
        }
        let events = super::tracefs::resolve_events(&req.events, &tracefs.available_events()?)?;
        if let Some(kb) = req.buffer_kb {
            check_buffer_kb(kb, online_cpus)?;
        }
        let clocks = tracefs.clocks()?;
        if let Some(clock) = &req.clock {
            if !clocks.iter().any(|c| c == clock) {
                return Err(Refusal::new(
                    ErrorCode::UnknownClock,
                    format!(
                        "trace clock '{clock}' is not offered; this kernel has: {}",
                        clocks.join(" ")
                    ),
                ));
            }
        }
        if req.command.len() > MAX_COMMAND_ARGS || req.command.first().is_some_and(|c| c.is_empty())
        {
            return Err(Refusal::new(ErrorCode::BadRequest, "malformed command"));
        }
        if let Some(prog) = req.command.first() {
            if let Err(why) = command::find_program(prog) {
                return Err(Refusal::new(
                    ErrorCode::Command,
                    format!("cannot run '{prog}' in the guest: {why}"),
                ));
            }
        }
        let cpus: Vec<u32> = ports
            .cpu_ports()
            .into_iter()
            .filter(|&c| c < online_cpus)
            .collect();
        if cpus.is_empty() {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "no trace-path-cpuN ports in this guest: run `tvctl setup` on the host and reboot the guest",
            ));
        }
        let mut port_paths = Vec::with_capacity(cpus.len());
        for &cpu in &cpus {
            match ports.cpu_port(cpu) {
                Some(p) => port_paths.push((cpu, p.to_path_buf())),
                None => return Err(Refusal::new(ErrorCode::Internal, "port vanished")),
            }
        }

        marks.push(("validate", Instant::now()));
        // 2. Build the instance. Dropping it on any error below removes it again.
        let instance =
            tracefs.create_instance(&format!("{INSTANCE_PREFIX}{:016x}", req.stream_nonce))?;
        marks.push(("instance", Instant::now()));
        instance.set_tracing_on(false)?;
        if let Some(kb) = req.buffer_kb {
            instance.set_buffer_kb(kb)?;
        }
        // Without a clock in the request, the instance takes the top level's: the kernel's own
        // choice (it switches its default to `global` when it finds the TSC unstable), which a
        // new instance does not inherit (instances start with `local`).
        let clock = req.clock.clone().or_else(|| tracefs.default_clock());
        if let Some(clock) = &clock {
            if clocks.iter().any(|c| c == clock) {
                instance.set_clock(clock)?;
            }
        }
        marks.push(("buffer+clock", Instant::now()));
        for e in &events {
            instance.enable_event(e)?;
        }
        marks.push(("events", Instant::now()));

        // 3. Pumps first, so no page is lost, then tracing on, then the command.
        let waker = Waker::new().map_err(|e| {
            Refusal::new(
                ErrorCode::Internal,
                format!("cannot make the pumps' wake-up pipe: {e}"),
            )
        })?;
        let mut rec = Recording {
            instance: Some(instance),
            tracefs: tracefs.clone(),
            events,
            pumps: Vec::new(),
            waker: Arc::new(waker),
            command: None,
            command_status: None,
            clock: String::new(),
            startup: String::new(),
        };
        for (cpu, port) in port_paths {
            let marker = StreamMarker {
                stream_nonce: req.stream_nonce,
                cpu,
                page_size,
            };
            let cfg = PumpConfig {
                cpu,
                raw_pipe: rec.instance().raw_pipe(cpu),
                port,
                page_size: usize::try_from(page_size).unwrap_or(4096),
                marker: marker.to_bytes().to_vec(),
                force_copy: mode == super::session::DataMode::Copy,
                synthetic: mode == super::session::DataMode::Synthetic,
                waker: Arc::clone(&rec.waker),
            };
            let shared = Arc::new(PumpShared::default());
            let handle = pump::spawn(cfg, Arc::clone(&shared)).map_err(|e| {
                Refusal::new(
                    ErrorCode::Internal,
                    format!("cannot start pump thread: {e}"),
                )
            })?;
            rec.pumps.push(CpuPump {
                cpu,
                shared,
                handle,
            });
        }
        marks.push(("pumps", Instant::now()));
        rec.instance().set_tracing_on(true)?;
        if let Some((prog, args)) = req.command.split_first() {
            match GuestCommand::spawn(prog, args, relay_output) {
                Ok(cmd) => rec.command = Some(cmd),
                Err(e) => {
                    let _ = rec.finish(StopReason::AgentError);
                    return Err(Refusal::new(
                        ErrorCode::Command,
                        format!("cannot run '{prog}' in the guest: {e}"),
                    ));
                }
            }
        }

        // Wait (briefly) until every pump knows whether splice works, so Started says so.
        marks.push(("on+command", Instant::now()));
        let (splice, note) = rec.transfer_mode(std::time::Duration::from_secs(2));
        marks.push(("splice check", Instant::now()));
        let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1000.0;
        let parts: Vec<String> = marks
            .windows(2)
            .map(|w| format!("{} {:.0}", w[1].0, ms(w[0].1, w[1].1)))
            .collect();
        rec.startup = format!(
            "start took {:.0} ms ({})",
            ms(marks[0].1, marks[marks.len() - 1].1),
            parts.join(", ")
        );
        let instance = rec.instance();
        let started = Started {
            instance: instance.name(),
            events: rec.events.iter().map(ToString::to_string).collect(),
            cpus: rec.pumps.iter().map(|p| p.cpu).collect(),
            buffer_kb: instance.buffer_kb()?,
            clock: super::tracefs::current_clock(&instance.trace_clock_text()?).unwrap_or_default(),
            splice,
            note,
        };
        rec.clock = started.clock.clone();
        Ok((rec, started))
    }

    /// The recording's trace clock.
    pub fn clock(&self) -> &str {
        &self.clock
    }

    /// Answers a `SyncProbe`: writes `tvctl-sync <nonce>` into the instance's `trace_marker`
    /// between two readings of the recording's clock, so the marker's trace time lies between
    /// them. Without a clock user space can read, only the readings (of CLOCK_MONOTONIC) are
    /// sent, unmarked.
    pub fn sync_probe(&self, nonce: u64) -> SyncReply {
        let (clock, before) = super::session::read_clock(&self.clock);
        if clock != self.clock {
            return SyncReply {
                nonce,
                clock,
                before,
                after: before,
                marked: false,
            };
        }
        let marked = self
            .instance()
            .write_marker(&format!("tvctl-sync {nonce}\n"))
            .is_ok();
        let (_, after) = super::session::read_clock(&self.clock);
        SyncReply {
            nonce,
            clock,
            before,
            after,
            marked,
        }
    }

    /// Whether every pump splices, and the reasons of those that do not.
    fn transfer_mode(&self, wait: std::time::Duration) -> (bool, String) {
        let deadline = std::time::Instant::now() + wait;
        while std::time::Instant::now() < deadline
            && self
                .pumps
                .iter()
                .any(|p| p.shared.mode.load(Ordering::SeqCst) == pump::MODE_UNKNOWN)
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let notes: Vec<String> = self
            .pumps
            .iter()
            .filter_map(|p| p.shared.note.lock().ok().and_then(|n| n.clone()))
            .collect();
        let splice = self
            .pumps
            .iter()
            .all(|p| p.shared.mode.load(Ordering::SeqCst) == pump::MODE_SPLICE);
        (splice, notes.join("; "))
    }

    fn instance(&self) -> &Instance {
        self.instance.as_ref().expect("instance lives until finish")
    }

    /// The command's exit status once it has ended (polled, never blocks).
    pub fn command_exited(&mut self) -> Option<i32> {
        if let Some(status) = self.command_status {
            return Some(status);
        }
        let cmd = self.command.as_mut()?;
        match cmd.child.try_wait() {
            Ok(Some(status)) => {
                let code = exit_code(status);
                self.command_status = Some(code);
                Some(code)
            }
            _ => None,
        }
    }

    /// What should wake the control loop: the command's output pipes and its pidfd.
    pub fn wake_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.command
            .as_ref()
            .map_or_else(Vec::new, GuestCommand::wake_fds)
    }

    /// A command runs whose end only a look can tell (no pidfd): the loop must tick fast.
    pub fn needs_fast_tick(&self) -> bool {
        self.command_status.is_none() && self.command.as_ref().is_some_and(|c| !c.has_pidfd())
    }

    /// What the command wrote since the last look (never blocks).
    pub fn read_output(&mut self) -> Vec<CommandOutput> {
        self.command
            .as_mut()
            .map_or_else(Vec::new, GuestCommand::read_output)
    }

    /// A pump that died with an error (a closed port, a tracefs failure).
    pub fn failed_pump(&self) -> Option<u32> {
        self.pumps
            .iter()
            .find(|p| p.handle.is_finished() && !p.shared.stop.load(Ordering::SeqCst))
            .map(|p| p.cpu)
    }

    /// Stops: tracing off, command ended, every CPU drained, metadata read, instance removed.
    pub fn finish(mut self, reason: StopReason) -> Finished {
        self.shutdown(reason)
    }

    /// The stop, in the only order that is safe for the kernel and for the data: tracing off,
    /// pumps woken to drain, command ended, every pump thread ended, counts and metadata read,
    /// and only then the instance removed. Every wait is bounded ([`stop`]): a pump or a
    /// command that does not end in time is reported, not waited for.
    fn shutdown(&mut self, reason: StopReason) -> Finished {
        let instance = self.instance.take().expect("instance lives until finish");

        // 1. Tracing off, first: the buffers stop growing, so each pump's drain has an end.
        //    It is the only write to the instance while pumps read it: buffer_size_kb and
        //    trace_clock would resize or reset the buffer under its readers, so the stop
        //    touches neither. Writing 0 also wakes the kernel's waiters on the buffer.
        if let Err(e) = instance.set_tracing_on(false) {
            // The drain is then ended by the time bound instead of by an empty buffer.
            log(&format!("could not turn tracing off: {e}"));
        }

        // 2. Then tell the pumps, and ring the waker for those asleep in poll(2). `stop` is set
        //    only after tracing is off, so a pump that sees it knows what is left is final.
        let drain_deadline = Instant::now() + stop::DRAIN_LIMIT;
        for p in &self.pumps {
            p.shared.stop.store(true, Ordering::SeqCst);
        }
        self.waker.wake();

        // 3. The command ends while the pumps drain: SIGTERM, then SIGKILL, bounded.
        let mut output = Vec::new();
        if let Some(mut cmd) = self.command.take() {
            if self.command_status.is_none() {
                self.command_status = stop::end_command(&mut cmd.child);
            }
            output = cmd.drain_output();
        }

        // 4. Every pump thread ends before anything of the instance is read or removed.
        //    Bounded: past the deadline a pump is told to give up; one that still runs is
        //    reported and left running (its files stay open, so the instance stays too).
        let ended = stop::finish_pumps(std::mem::take(&mut self.pumps), drain_deadline);
        let mut cpus = Vec::with_capacity(ended.outcomes.len());
        let mut cut_short = Vec::new();
        for outcome in &ended.outcomes {
            if let Some(e) = &outcome.error {
                log(&format!("cpu{}: {e}", outcome.cpu));
            }
            if let Some(n) = &outcome.note {
                log(n);
            }
            if !outcome.drained && outcome.error.is_none() {
                cut_short.push(
                    outcome
                        .note
                        .clone()
                        .unwrap_or_else(|| format!("cpu{}: not drained", outcome.cpu)),
                );
            }
            // 5. Final counts, while the instance exists and nobody reads it any more.
            cpus.push(cpu_stopped(&instance, outcome));
        }
        let metadata = self.final_metadata();

        // 6. Only now the instance goes: all files into it are closed (the kernel refuses
        //    rmdir with EBUSY while one is open), and no pump's pipe holds its pages. If a pump
        //    still runs, or the kernel says busy, the control loop retries later.
        let leftover = Leftover::remove_now_or_later(instance, ended.running);

        let reason = if cut_short.is_empty() || reason == StopReason::HostGone {
            reason
        } else {
            StopReason::AgentError
        };
        Finished {
            metadata,
            stopped: Stopped {
                reason,
                command_status: self.command_status,
                cpus,
            },
            cut_short,
            leftover,
            output,
        }
    }

    /// The files trace-cmd needs that do not change while tracing; sent right after
    /// `Started`, so the host can write a valid file even if the guest dies mid-recording.
    pub fn static_metadata(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        // Files that do not change within a boot come from the agent's cache after the
        // first session (docs/BENCHMARKS.md: start-up cost).
        let mut cache = super::metacache::Session::open();
        let mut push = |name: String, read: &dyn Fn() -> Result<Vec<u8>, TracefsError>| match cache
            .get(&name, read)
        {
            Ok(d) => out.push((name, d)),
            Err(e) => eprintln!("tvctl-agent: metadata {name}: {e}"),
        };
        for rel in ["events/header_page", "events/header_event"] {
            push(rel.into(), &|| self.tracefs.read(rel));
        }
        let systems: BTreeSet<&str> = self.events.iter().map(|e| e.system.as_str()).collect();
        for sys in systems {
            for e in self.events.iter().filter(|e| e.system == sys) {
                let rel = format!("events/{}/{}/format", e.system, e.event);
                push(rel.clone(), &|| self.tracefs.read(&rel));
            }
        }
        for name in self.tracefs.ftrace_format_names() {
            let rel = format!("events/ftrace/{name}/format");
            push(rel.clone(), &|| self.tracefs.read(&rel));
        }
        push("kallsyms".into(), &|| {
            super::tracefs::read_whole(std::path::Path::new("/proc/kallsyms")).map_err(|source| {
                TracefsError::Io {
                    path: "/proc/kallsyms".into(),
                    source,
                }
            })
        });
        push("printk_formats".into(), &|| {
            self.tracefs.read("printk_formats")
        });
        if let Some(instance) = &self.instance {
            if let Ok(text) = instance.trace_clock_text() {
                out.push(("trace_clock".into(), text.into_bytes()));
            }
        }
        if let Ok(u) = nix::sys::utsname::uname() {
            let uname = format!(
                "{} {} {} {} {}",
                u.sysname().to_string_lossy(),
                u.nodename().to_string_lossy(),
                u.release().to_string_lossy(),
                u.version().to_string_lossy(),
                u.machine().to_string_lossy()
            );
            out.push(("uname".into(), uname.into_bytes()));
        }
        out
    }

    /// The files that grow while tracing; read after tracing stopped.
    fn final_metadata(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for name in ["saved_cmdlines", "saved_tgids"] {
            match self.tracefs.read(name) {
                Ok(d) => out.push((name.to_string(), d)),
                Err(e) => eprintln!("tvctl-agent: metadata {name}: {e}"),
            }
        }
        out
    }
}

impl Drop for Recording {
    /// A recording abandoned half-way (a failed start) still stops its pumps and removes its
    /// instance, so the next request finds the guest clean.
    fn drop(&mut self) {
        if self.instance.is_some() {
            let finished = self.shutdown(StopReason::AgentError);
            if finished.leftover.is_some() {
                // Nobody looks at it again; dropping it tries rmdir once more, and the agent's
                // next start removes whatever is still there.
                log("a failed start could not remove its instance yet");
            }
        }
    }
}

/// One CPU's line of `Stopped`: the pump's exact byte count and the buffer's statistics.
fn cpu_stopped(instance: &Instance, outcome: &PumpOutcome) -> CpuStopped {
    let stats = instance.stats(outcome.cpu).unwrap_or_default();
    CpuStopped {
        cpu: outcome.cpu,
        bytes: outcome.bytes,
        entries: stats.entries,
        overrun: stats.overrun,
        commit_overrun: stats.commit_overrun,
        dropped_events: stats.dropped_events,
        read_events: stats.read_events,
        stats_text: truncate(&stats.text, MAX_TEXT),
    }
}

fn log(msg: &str) {
    eprintln!("tvctl-agent: {msg}");
}

/// Refuses buffer sizes of 0, over the protocol cap, or larger than the guest can hold.
fn check_buffer_kb(kb: u32, cpus: u32) -> Result<(), Refusal> {
    if kb == 0 || kb > MAX_BUFFER_KB {
        return Err(Refusal::new(
            ErrorCode::BadBufferSize,
            format!("buffer size {kb} KiB per CPU is out of range (1..={MAX_BUFFER_KB})"),
        ));
    }
    match mem_available_kb() {
        Some(avail_kb) => check_buffer_fits(kb, cpus, avail_kb),
        None => Ok(()),
    }
}

/// The ring buffers of all CPUs may take at most half of the guest's available memory
/// (`MemAvailable`); the refusal names the rule and the largest `-b` that fits.
fn check_buffer_fits(kb: u32, cpus: u32, avail_kb: u64) -> Result<(), Refusal> {
    let cpus = u64::from(cpus.max(1));
    let want = u64::from(kb) * cpus;
    let half = avail_kb / 2;
    if want <= half {
        return Ok(());
    }
    let largest = half / cpus;
    let advice = if largest == 0 {
        "free memory in the guest or give it more".to_owned()
    } else {
        format!("use -b {largest} or less")
    };
    Err(Refusal::new(
        ErrorCode::BadBufferSize,
        format!(
            "buffer size {kb} KiB x {cpus} CPUs needs {want} KiB, but the ring buffers may take at most half of the guest's available memory ({half} of {avail_kb} KiB): {advice}"
        ),
    ))
}

fn mem_available_kb() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_absurd_buffer_sizes_are_refused() {
        assert!(check_buffer_kb(0, 1).is_err());
        assert!(check_buffer_kb(MAX_BUFFER_KB + 1, 1).is_err());
        assert!(check_buffer_kb(1024, 1).is_ok());
    }

    #[test]
    fn a_buffer_over_half_the_free_memory_is_refused_naming_the_largest_that_fits() {
        let err = check_buffer_fits(400_000, 2, 831_484).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadBufferSize);
        assert_eq!(
            err.text,
            "buffer size 400000 KiB x 2 CPUs needs 800000 KiB, but the ring buffers may take at \
             most half of the guest's available memory (415742 of 831484 KiB): use -b 207871 or less"
        );
        assert!(check_buffer_fits(207_871, 2, 831_484).is_ok());
        assert!(check_buffer_fits(207_872, 2, 831_484).is_err());
    }

    #[test]
    fn a_guest_without_free_memory_is_told_so() {
        let err = check_buffer_fits(1, 4, 6).unwrap_err();
        assert!(
            err.text
                .ends_with("free memory in the guest or give it more"),
            "{}",
            err.text
        );
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
