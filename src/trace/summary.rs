//! The summary of one `tvctl trace` run: printed for people, and with `--json` as one JSON
//! object on stdout whose schema is documented in docs/json.md ("trace"). Field names are
//! stable; new fields may be added, none renamed or removed without a schema bump.

use serde::Serialize;

/// Version of the JSON schema below.
pub const SCHEMA: u32 = 1;

/// Why the recording stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopCause {
    /// `--duration` elapsed.
    Duration,
    /// Ctrl-C (SIGINT) or SIGTERM once: graceful stop, complete data.
    Interrupt,
    /// The guest command given after `--` ended.
    Command,
    /// The domain shut down or crashed: data up to that point.
    DomainStopped,
    /// Ctrl-C twice: stopped waiting, data that had arrived.
    Abandoned,
    /// The agent stopped on its own (an error in the guest).
    AgentError,
    /// The agent stopped answering (it died, or the guest locked up).
    AgentLost,
    /// `--max-size` worth of data was kept.
    MaxSize,
    /// The guest broke so many rules that tvctl stopped listening.
    GuestMisbehaved,
    /// `tvctl serve`: the user in the guest ended the recording they started
    /// (`tvctl-agent record`: its command ended, `--duration`, or Ctrl-C).
    Guest,
}

impl StopCause {
    /// A few words for people.
    pub fn describe(self) -> &'static str {
        match self {
            StopCause::Duration => "duration reached",
            StopCause::Interrupt => "interrupted",
            StopCause::Command => "command ended",
            StopCause::DomainStopped => "domain stopped",
            StopCause::Abandoned => "abandoned",
            StopCause::AgentError => "agent error",
            StopCause::AgentLost => "agent stopped answering",
            StopCause::MaxSize => "--max-size reached",
            StopCause::GuestMisbehaved => "the guest misbehaved",
            StopCause::Guest => "stopped in the guest",
        }
    }
}

/// One CPU's numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CpuSummary {
    pub cpu: u32,
    /// Bytes of raw pages received (and written to the file).
    pub bytes: u64,
    pub pages: u64,
    /// Events in those pages, counted with the guest's header_page/header_event.
    pub events: u64,
    /// Events lost: the ring buffer's overrun + commit overrun + dropped events when the
    /// agent reported them, else the counts stored in pages flagged with missed events.
    pub lost_events: u64,
    /// Pages flagged "events were lost before this page".
    pub pages_with_lost_events: u64,
    /// The agent's byte count for this CPU, when it reported one.
    pub bytes_sent: Option<u64>,
    /// All bytes the agent sent arrived.
    pub complete: bool,
    /// The ring buffer's statistics from the guest, when reported.
    pub overrun: Option<u64>,
    pub commit_overrun: Option<u64>,
    pub dropped_events: Option<u64>,
    /// Events that went backwards in time within this CPU (should be 0).
    pub timestamps_backwards: u64,
}

/// The guest command's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandSummary {
    pub argv: Vec<String>,
    /// Exit status (128 + signal number when killed by a signal); null if not known.
    pub exit_status: Option<i32>,
    /// The agent relayed the command's output (protocol 4); false with an older agent, whose
    /// command writes to the agent's own log.
    pub output_relayed: bool,
    /// The last 64 KiB of each stream, control characters escaped (lines kept).
    pub stdout: String,
    pub stderr: String,
    /// Bytes each stream carried in all.
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// A stream was longer than what `stdout`/`stderr` keep.
    pub output_truncated: bool,
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceSummary {
    pub schema: u32,
    pub domain: String,
    pub output: String,
    /// Events as asked (`-e`), and as the guest resolved them (`system:event`).
    pub events_requested: Vec<String>,
    pub events: Vec<String>,
    pub clock: String,
    /// Who chose `clock`: `"option"` (-C, or x86-tsc for several files) or `"guest-default"`
    /// (the guest kernel's top-level `trace_clock`, which it may have switched to `global`).
    pub clock_source: &'static str,
    pub buffer_kb: u32,
    /// True if the guest moved pages with splice (false: read/write fallback).
    pub splice: bool,
    pub booted: bool,
    pub stop_cause: StopCause,
    pub duration_s: f64,
    pub command: Option<CommandSummary>,
    pub cpus: Vec<CpuSummary>,
    pub total_bytes: u64,
    pub total_events: u64,
    pub total_lost_events: u64,
    /// Every CPU's stream arrived whole.
    pub complete: bool,
    /// `--max-size`, if given.
    pub max_size: Option<u64>,
    /// What the guest sent that broke a rule and was dropped (exit code 13 when not empty).
    pub guest_problems: Vec<String>,
    /// How this guest's clock was related to the host's (runs of several files only).
    pub sync: Option<super::timeline::SyncSummary>,
    /// Notes worth a look (splice fallback, stale data discarded, streams cut short).
    pub notes: Vec<String>,
    /// What `--setup` changed before the recording, as `tvctl setup --json` reports it;
    /// `null` when it changed nothing or did not run.
    pub setup: Option<crate::setup::ChangeReport>,
}

impl TraceSummary {
    /// The human summary, a few lines.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{}: {} events on {} CPUs, {} lost, {} in {:.1} s ({}) -> {}\n",
            self.domain,
            self.total_events,
            self.cpus.len(),
            self.total_lost_events,
            crate::collect::progress::human_bytes(self.total_bytes as f64),
            self.duration_s,
            self.stop_cause.describe(),
            self.output
        );
        s.push_str(&format!(
            "  clock {}{}\n",
            self.clock,
            if self.clock_source == "guest-default" {
                " (the guest kernel's default)"
            } else {
                ""
            }
        ));
        for c in &self.cpus {
            s.push_str(&format!(
                "  cpu{:<3} {:>10} {:>6} pages {:>9} events {:>7} lost{}\n",
                c.cpu,
                crate::collect::progress::human_bytes(c.bytes as f64),
                c.pages,
                c.events,
                c.lost_events,
                if c.complete { "" } else { "  (incomplete)" }
            ));
        }
        if let Some(cmd) = &self.command {
            s.push_str(&format!(
                "  command {:?} exited with {}\n",
                cmd.argv.join(" "),
                cmd.exit_status
                    .map_or_else(|| "unknown status".to_string(), |c| c.to_string())
            ));
        }
        for n in &self.guest_problems {
            s.push_str(&format!("  guest problem: {n}\n"));
        }
        for n in &self.notes {
            s.push_str(&format!("  note: {n}\n"));
        }
        s
    }
}
