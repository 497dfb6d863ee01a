//! The `tvctl trace --json` summary: its exact shape (a golden file) and that every field is
//! documented in docs/json.md.

mod common;

use common::key_paths;
use tvctl::trace::summary::{CommandSummary, CpuSummary, StopCause, TraceSummary, SCHEMA};
use tvctl::trace::timeline::{SyncMethod, SyncSegment, SyncSummary};

fn example() -> TraceSummary {
    let cpu = |cpu, bytes, events| CpuSummary {
        cpu,
        bytes,
        pages: bytes / 4096,
        events,
        lost_events: 0,
        pages_with_lost_events: 0,
        bytes_sent: Some(bytes),
        complete: true,
        overrun: Some(0),
        commit_overrun: Some(0),
        dropped_events: Some(0),
        timestamps_backwards: 0,
    };
    TraceSummary {
        setup: None,
        schema: SCHEMA,
        domain: "web1".into(),
        output: "/tmp/trace-web1.dat".into(),
        events_requested: vec!["sched*".into()],
        events: vec!["sched:sched_switch".into(), "sched:sched_wakeup".into()],
        clock: "local".into(),
        clock_source: "guest-default",
        buffer_kb: 1410,
        splice: true,
        booted: false,
        stop_cause: StopCause::Command,
        duration_s: 5.1,
        command: Some(CommandSummary {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo out; echo err >&2; exit 3".into(),
            ],
            exit_status: Some(3),
            output_relayed: true,
            stdout: "out\n".into(),
            stderr: "err\n".into(),
            stdout_bytes: 4,
            stderr_bytes: 4,
            output_truncated: false,
        }),
        cpus: vec![cpu(0, 8192, 120), cpu(1, 4096, 60)],
        total_bytes: 12288,
        total_events: 180,
        total_lost_events: 0,
        complete: true,
        max_size: Some(1 << 30),
        guest_problems: vec!["guest metadata \"junk\" dropped: not a documented file name".into()],
        sync: Some(SyncSummary {
            method: SyncMethod::Probe,
            samples: 200,
            dropped: 3,
            segments: vec![SyncSegment {
                offset: 10_807_591_670_366,
                bound_ns: 91_179,
                samples: 197,
            }],
            bound_ns: Some(91_179),
            round_trip_ns: Some(451_533),
        }),
        notes: vec![],
    }
}

#[test]
fn trace_summary_json_matches_the_golden_file() {
    let json = serde_json::to_string_pretty(&example()).unwrap() + "\n";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/trace/summary.json");
    if std::env::var_os("TVCTL_BLESS").is_some() {
        std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
        std::fs::write(path, &json).unwrap();
    }
    let golden = std::fs::read_to_string(path).expect("golden file (TVCTL_BLESS=1 writes it)");
    assert_eq!(json, golden);
}

#[test]
fn every_trace_summary_field_is_documented() {
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/json.md")).unwrap();
    let mut paths = Vec::new();
    key_paths(&serde_json::to_value(example()).unwrap(), "", &mut paths);
    let missing: Vec<_> = paths
        .iter()
        .filter(|p| !docs.contains(&format!("| `{p}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/json.md lacks rows for {missing:?}"
    );
}

#[test]
fn stop_causes_have_their_documented_names() {
    for (cause, name) in [
        (StopCause::Duration, "duration"),
        (StopCause::Interrupt, "interrupt"),
        (StopCause::Command, "command"),
        (StopCause::DomainStopped, "domain-stopped"),
        (StopCause::Abandoned, "abandoned"),
        (StopCause::AgentError, "agent-error"),
        (StopCause::AgentLost, "agent-lost"),
        (StopCause::MaxSize, "max-size"),
        (StopCause::GuestMisbehaved, "guest-misbehaved"),
    ] {
        assert_eq!(serde_json::to_value(cause).unwrap(), name);
    }
}
