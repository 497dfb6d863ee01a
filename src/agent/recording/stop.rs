//! The bounded waits of a recording's stop: the command's end, the pumps' drain, and whatever
//! could not be finished in time (a [`Leftover`], finished later from the control loop).
//!
//! The order of the stop itself is [`super::Recording`]'s `shutdown`; this module makes sure
//! no step of it can wait for ever. Every wait here is a poll of a non-blocking check with a
//! short sleep, under a deadline: the control loop must answer the host, and a stop that hangs
//! leaves the host waiting and the instance in the guest.

use std::process::{Child, ExitStatus};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::super::pump::PumpOutcome;
use super::super::tracefs::Instance;
use super::{exit_code, log, CpuPump};

/// How long the pumps may drain after tracing stopped before they are told to give up. A
/// buffer holds at most `buffer_size_kb` per CPU; the host reads it at tens of MB/s even
/// under TCG, so this is only reached by a host that reads very slowly. (A host that reads
/// nothing is cut off sooner, by each pump's own stall limit.)
pub(super) const DRAIN_LIMIT: Duration = Duration::from_secs(20);
/// How long pumps told to give up get to end: they look at the flag at least every 100 ms.
const ABORT_GRACE: Duration = Duration::from_secs(2);
/// How long the command gets to end after SIGTERM, and again after SIGKILL.
const COMMAND_GRACE: Duration = Duration::from_secs(2);
/// How long a leftover is retried before the agent gives up on it (its next start removes
/// stale instances).
const LEFTOVER_RETRY: Duration = Duration::from_secs(60);
/// How often a leftover is looked at.
const LEFTOVER_EVERY: Duration = Duration::from_secs(1);
/// Sleep between two looks of a bounded wait.
const LOOK_EVERY: Duration = Duration::from_millis(10);

/// Ends a command that is still running: SIGTERM, then SIGKILL, each with a bounded wait.
/// Returns its exit status, or None if it did not end (a process stuck in the kernel): then it
/// is reported and left, never waited for.
pub(super) fn end_command(child: &mut Child) -> Option<i32> {
    use nix::sys::signal::{kill, killpg, Signal};
    let Ok(raw) = i32::try_from(child.id()) else {
        return None;
    };
    let pid = nix::unistd::Pid::from_raw(raw);
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        // The command leads its own session and process group: the signal goes to all of
        // it (a shell's children too). A command that already exited (not yet reaped)
        // ignores it; try_wait reaps it.
        if killpg(pid, signal).is_err() {
            let _ = kill(pid, signal);
        }
        if let Some(status) = wait_child(child, COMMAND_GRACE) {
            return Some(exit_code(status));
        }
    }
    log(&format!(
        "command (pid {raw}) did not end after SIGKILL; not waiting for it"
    ));
    None
}

fn wait_child(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(LOOK_EVERY);
    }
}

/// How the pumps ended.
pub(super) struct PumpsEnded {
    /// One per pump, in the pumps' order; for a pump still running, what it had sent.
    pub outcomes: Vec<PumpOutcome>,
    /// Pumps whose threads did not end within the bounds: their files into the instance are
    /// still open, so the instance cannot be removed yet.
    pub running: Vec<CpuPump>,
}

/// Waits for every pump thread (their `stop` is set and they were woken): until `deadline`,
/// then tells those still draining to give up and waits [`ABORT_GRACE`] more. Never blocks
/// past that: `join` is called only on threads that have ended.
pub(super) fn finish_pumps(pumps: Vec<CpuPump>, deadline: Instant) -> PumpsEnded {
    let all_ended = |pumps: &[CpuPump]| pumps.iter().all(|p| p.handle.is_finished());
    wait_until(deadline, || all_ended(&pumps));
    if !all_ended(&pumps) {
        for p in pumps.iter().filter(|p| !p.handle.is_finished()) {
            log(&format!(
                "pump of cpu{} still draining after {} s; telling it to give up",
                p.cpu,
                DRAIN_LIMIT.as_secs()
            ));
            p.shared.abort.store(true, Ordering::SeqCst);
        }
        wait_until(Instant::now() + ABORT_GRACE, || all_ended(&pumps));
    }
    let mut ended = PumpsEnded {
        outcomes: Vec::with_capacity(pumps.len()),
        running: Vec::new(),
    };
    for p in pumps {
        let sent = p.shared.bytes.load(Ordering::SeqCst);
        if !p.handle.is_finished() {
            ended.outcomes.push(PumpOutcome {
                cpu: p.cpu,
                bytes: sent,
                spliced: false,
                note: Some(format!(
                    "cpu{}: pump did not end within the stop's bounds; {sent} bytes sent; \
                     its instance is removed once it ends",
                    p.cpu
                )),
                error: None,
                drained: false,
            });
            ended.running.push(p);
            continue;
        }
        let cpu = p.cpu;
        ended
            .outcomes
            .push(p.handle.join().unwrap_or_else(|_| PumpOutcome {
                cpu,
                bytes: sent,
                spliced: false,
                note: Some(format!("cpu{cpu}: pump thread panicked")),
                error: None,
                drained: false,
            }));
    }
    ended
}

fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) {
    while !done() && Instant::now() < deadline {
        std::thread::sleep(LOOK_EVERY);
    }
}

/// What a stop could not finish in time: pump threads still running, or an instance the
/// kernel would not remove yet (`EBUSY`: a file of it is open, ours or someone else's). The
/// control loop calls [`Leftover::try_finish`] on every tick; it never blocks.
pub struct Leftover {
    instance: Instance,
    pumps: Vec<CpuPump>,
    since: Instant,
    next_look: Instant,
}

impl Leftover {
    /// Removes `instance` now if no pump is running and the kernel agrees; else keeps both
    /// for later.
    pub(super) fn remove_now_or_later(
        mut instance: Instance,
        pumps: Vec<CpuPump>,
    ) -> Option<Leftover> {
        if pumps.is_empty() {
            match instance.try_remove() {
                Ok(()) => return None,
                Err(e) => log(&format!(
                    "could not remove instance {} yet ({e}); trying again",
                    instance.name()
                )),
            }
        }
        let now = Instant::now();
        Some(Leftover {
            instance,
            pumps,
            since: now,
            next_look: now + LEFTOVER_EVERY,
        })
    }

    /// One look: true once nothing is left (removed, or given up after [`LEFTOVER_RETRY`]).
    pub fn try_finish(&mut self) -> bool {
        let now = Instant::now();
        if now < self.next_look {
            return false;
        }
        self.next_look = now + LEFTOVER_EVERY;
        // Ended threads have closed their files; their handles can go.
        self.pumps.retain(|p| !p.handle.is_finished());
        let give_up = now.duration_since(self.since) > LEFTOVER_RETRY;
        if !self.pumps.is_empty() {
            if give_up {
                let cpus: Vec<u32> = self.pumps.iter().map(|p| p.cpu).collect();
                log(&format!(
                    "pumps of cpus {cpus:?} never ended; leaving instance {} (removed at the agent's next start)",
                    self.instance.name()
                ));
            }
            return give_up;
        }
        match self.instance.try_remove() {
            Ok(()) => {
                log(&format!("removed instance {} late", self.instance.name()));
                true
            }
            Err(e) => {
                if give_up {
                    log(&format!("giving up on removing instance: {e}"));
                }
                give_up
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use super::super::super::pump::PumpShared;

    /// A stand-in pump thread: ends when `release` is set, or (if it obeys) when told to abort.
    fn fake_pump(cpu: u32, obeys_abort: bool, release: &Arc<AtomicBool>) -> CpuPump {
        let shared = Arc::new(PumpShared::default());
        let (inner, release) = (Arc::clone(&shared), Arc::clone(release));
        let handle = std::thread::spawn(move || {
            let aborted = || obeys_abort && inner.abort.load(Ordering::SeqCst);
            while !aborted() && !release.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            PumpOutcome {
                cpu,
                bytes: 0,
                spliced: true,
                note: None,
                error: None,
                drained: !aborted(),
            }
        });
        CpuPump {
            cpu,
            shared,
            handle,
        }
    }

    #[test]
    fn pumps_that_end_in_time_are_joined_without_waiting_for_the_deadline() {
        // Arrange
        let release = Arc::new(AtomicBool::new(true));
        let pumps = vec![fake_pump(0, true, &release), fake_pump(1, true, &release)];

        // Act
        let start = Instant::now();
        let ended = finish_pumps(pumps, Instant::now() + Duration::from_secs(20));

        // Assert
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(ended.running.is_empty());
        assert!(ended.outcomes.iter().all(|o| o.drained));
    }

    #[test]
    fn pumps_past_the_deadline_are_told_to_give_up_and_one_that_does_not_is_left_running() {
        // Arrange: one pump that obeys `abort`, one that never ends on its own.
        let release = Arc::new(AtomicBool::new(false));
        let pumps = vec![fake_pump(0, true, &release), fake_pump(1, false, &release)];
        let deadline = Instant::now() + Duration::from_millis(100);

        // Act
        let start = Instant::now();
        let ended = finish_pumps(pumps, deadline);
        let took = start.elapsed();
        release.store(true, Ordering::SeqCst);

        // Assert: bounded by the deadline plus the grace, whatever the pumps do.
        assert!(
            took < Duration::from_millis(100) + ABORT_GRACE + Duration::from_secs(1),
            "{took:?}"
        );
        assert_eq!(ended.outcomes.len(), 2);
        assert!(!ended.outcomes[0].drained, "cpu0 gave up, not drained");
        assert_eq!(ended.running.len(), 1);
        assert_eq!(ended.running[0].cpu, 1);
        assert!(!ended.outcomes[1].drained);
        let note = ended.outcomes[1].note.as_deref().unwrap_or_default();
        assert!(note.contains("did not end"), "{note}");
    }

    #[test]
    fn a_command_that_ignores_sigterm_is_killed_within_the_bounds() {
        // Arrange: a shell that ignores SIGTERM and waits on a pipe that never speaks (a
        // builtin: no child process outlives the test).
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; echo ready; read never"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let mut ready = [0u8; 6];
        std::io::Read::read_exact(child.stdout.as_mut().expect("stdout"), &mut ready)
            .expect("the trap is set");

        // Act
        let start = Instant::now();
        let status = end_command(&mut child);

        // Assert: SIGTERM ignored, SIGKILL after the grace, reaped, all within the bounds.
        assert_eq!(status, Some(128 + 9));
        let took = start.elapsed();
        assert!(took >= COMMAND_GRACE, "{took:?}");
        assert!(
            took < COMMAND_GRACE * 2 + Duration::from_secs(1),
            "{took:?}"
        );
    }
}
