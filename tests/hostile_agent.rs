//! Integration tier: the real `tvctl trace` against a hostile guest agent (issue 8).
//!
//! Each test starts a domain of the built-in guest whose vCPUs halt at once (real libvirtd,
//! real QEMU, no guest code running) and plays its agent itself (`common::fake_guest`): it
//! answers on the control socket and writes the data FIFOs, and breaks one rule of the
//! protocol per test. The guest is not trusted; these tests say what tvctl must do then: exit
//! 13 when the guest broke the protocol or a limit (keeping what arrived intact), 14 when the
//! recording is incomplete (a stream short of its count, or an agent that stopped answering),
//! 15 when another tvctl holds the domain, 130 promptly on Ctrl-C while waiting for the agent;
//! never a panic, never unbounded memory or time, never a guest's escape sequence on the
//! terminal.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::fake_guest::{
    cpu_stopped, guest_files, kill_after, trace_cmd_report, FakeGuest, Played, TvctlOutput,
    REPLY_TIMEOUT,
};
use nix::sys::signal::Signal;
use tvctl::exitcode::ExitCode;
use tvctl::proto::limits::{DRAIN_SLACK, MAX_METADATA_TOTAL};
use tvctl::proto::{ErrorCode, HelloReply, StopReason};

/// The status a process that ends with `code` shows.
fn exit(code: ExitCode) -> Option<i32> {
    Some(i32::from(code.code()))
}

/// Every domain of this file: `tvctl-test-ha-<pid>-<n>` (short: the socket path must fit).
const TAG: &str = "ha";
const VCPUS: u32 = 2;

/// `pages` real pages on each of the guest's CPUs, and the events in them.
fn pages_on_every_cpu(pages: usize) -> (Vec<(u32, Vec<u8>)>, u64) {
    let files = guest_files();
    let data: Vec<(u32, Vec<u8>)> = (0..VCPUS)
        .map(|cpu| (cpu, files.pages(cpu, pages)))
        .collect();
    let events = data.iter().map(|(_, d)| files.count_events(d)).sum();
    (data, events)
}

/// Failure context: tvctl's output and what the fake did.
fn context(res: &TvctlOutput, played: &Played) -> String {
    format!("{res}\n{played}")
}

/// tvctl never panics, whatever the guest sends.
fn assert_no_panic(res: &TvctlOutput, played: &Played) {
    assert!(!res.panicked(), "tvctl panicked\n{}", context(res, played));
}

/// The file exists and `trace-cmd report` reads `events` events from it.
/// No panic, and the exit code `code`; the failure shows the run and what the fake did.
fn expect_exit(res: &TvctlOutput, played: &Played, code: ExitCode) {
    assert_no_panic(res, played);
    assert_eq!(res.code, exit(code), "{}", context(res, played));
}

fn assert_file_reads(out: &Path, events: u64, res: &TvctlOutput, played: &Played) {
    assert!(
        out.exists(),
        "no output file {}\n{}",
        out.display(),
        context(res, played)
    );
    let report = trace_cmd_report(out);
    assert!(
        report.status.success() && report.events == events,
        "trace-cmd report should read {events} events\n{report}\n{}",
        context(res, played)
    );
}

/// Exit code 0 or 13: for guest input the spec does not call a broken rule either way.
fn ok_or_misbehaved(res: &TvctlOutput) -> bool {
    res.code == exit(ExitCode::Ok) || res.code == exit(ExitCode::GuestMisbehaved)
}

/// Bytes of each CPU's data in a trace.dat, read back with tvctl's reader.
fn data_bytes_per_cpu(out: &Path) -> Vec<u64> {
    let file = tvctl::tracedat::TraceDatFile::open(out)
        .unwrap_or_else(|e| panic!("read back {}: {e}", out.display()));
    file.cpus().iter().map(|c| c.size).collect()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

// --- A well-behaved fake: the harness itself works ----------------------------------------------

#[test]
fn well_behaved_fake_agent_gives_a_complete_file_that_trace_cmd_report_reads() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("good.dat");
    let (data, events) = pages_on_every_cpu(3);

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
    let (res, played) = guest.play(&run, kill_after(secs(30)), |a| a.well_behaved(&data));

    eprintln!("well-behaved fake: tvctl {}", res.ending());
    expect_exit(&res, &played, ExitCode::Ok);
    let summary = res.json().expect("JSON summary");
    assert_eq!(summary["complete"], true, "{summary}");
    assert_eq!(summary["stop_cause"], "duration", "{summary}");
    assert_eq!(summary["total_events"], events, "{summary}");
    assert_file_reads(&out, events, &res, &played);
}

// --- 1. Memory ------------------------------------------------------------------------------------

#[test]
fn empty_metadata_flood_is_refused_and_memory_stays_bounded() {
    const FILES: usize = 1_500_000;
    // 64 MiB for tvctl itself + the metadata cap (64 MiB).
    const RSS_BOUND: u64 = (64 << 20) + MAX_METADATA_TOTAL;
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("flood.dat");
    let (data, _) = pages_on_every_cpu(2);

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "20"]);
    let mut sent = 0;
    let mut flood_time = Duration::ZERO;
    let (res, played) = guest.play(&run, kill_after(secs(60)), |a| {
        a.start_recording(&data)?;
        let began = Instant::now();
        // Names of the one unbounded family (event formats), each file empty: the metadata
        // byte cap never sees them.
        let flood =
            a.flood_empty_metadata(FILES, |i| format!("events/flood/e{i:07}/format"), secs(10));
        flood_time = began.elapsed();
        sent = flood?;
        a.serve_until_stop(secs(60))?;
        a.finish()
    });

    eprintln!(
        "metadata flood: {sent} empty files in {:.1} s; tvctl {}",
        flood_time.as_secs_f64(),
        res.ending()
    );
    assert_no_panic(&res, &played);
    assert!(
        res.code == exit(ExitCode::GuestMisbehaved)
            && res.elapsed < secs(15)
            && res.maxrss_kib * 1024 < RSS_BOUND,
        "a flood of {sent} empty metadata files must end the trace with exit 13 within 15 s \
         and a peak RSS under {} MiB\n{}",
        RSS_BOUND >> 20,
        context(&res, &played)
    );
}

#[test]
fn an_endless_metadata_flood_ends_the_trace_within_seconds() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("endless.dat");
    let (data, events) = pages_on_every_cpu(2);

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "60"]);
    let (res, played) = guest.play(&run, kill_after(secs(60)), |a| {
        a.start_recording(&data)?;
        // Far more than tvctl listens to: it must give up, not wait for the flood to end.
        let _ = a.flood_empty_metadata(usize::MAX, |i| format!("junk/{i}"), secs(50));
        Ok(())
    });

    assert_no_panic(&res, &played);
    assert!(
        res.code == exit(ExitCode::GuestMisbehaved) && res.elapsed < secs(10),
        "an endless flood must end the trace with exit 13 within 10 s\n{}",
        context(&res, &played)
    );
    assert_eq!(res.json().unwrap()["stop_cause"], "guest-misbehaved");
    assert_file_reads(&out, events, &res, &played);
}

#[test]
fn unknown_metadata_name_is_noted_exit_13_and_the_file_is_written() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("unknown.dat");
    let (data, events) = pages_on_every_cpu(2);

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
    let (res, played) = guest.play(&run, kill_after(secs(30)), |a| {
        a.static_files.push((
            "guest/unknown_file".into(),
            b"nobody asked for this\n".to_vec(),
        ));
        a.well_behaved(&data)
    });

    expect_exit(&res, &played, ExitCode::GuestMisbehaved);
    assert!(
        res.all_text().contains("guest/unknown_file"),
        "the note should name the unknown file\n{}",
        context(&res, &played)
    );
    assert_file_reads(&out, events, &res, &played);
}

#[test]
fn duplicate_metadata_name_is_noted_exit_13_and_the_file_is_written() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("duplicate.dat");
    let (data, events) = pages_on_every_cpu(2);

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
    let (res, played) = guest.play(&run, kill_after(secs(30)), |a| {
        let header_page = guest_files().header_page.clone();
        a.static_files
            .push(("events/header_page".into(), header_page));
        a.well_behaved(&data)
    });

    expect_exit(&res, &played, ExitCode::GuestMisbehaved);
    assert!(
        res.all_text().contains("events/header_page"),
        "the note should name the file sent twice\n{}",
        context(&res, &played)
    );
    assert_file_reads(&out, events, &res, &played);
}

// --- 2. A hostile event format ------------------------------------------------------------------

/// This host's sched_switch format with a print fmt of 200 000 nested parentheses (≈ 400 KB),
/// which recursive-descent parsers (libtraceevent's among them) follow one stack frame each.
fn deeply_nested_sched_switch_format() -> Vec<u8> {
    const DEPTH: usize = 200_000;
    let real = String::from_utf8_lossy(&guest_files().sched_switch_format).into_owned();
    let print_fmt = format!(
        "print fmt: \"%d\", {}REC->prev_pid{}",
        "(".repeat(DEPTH),
        ")".repeat(DEPTH)
    );
    let mut text: String = real
        .lines()
        .map(|l| {
            if l.starts_with("print fmt:") {
                print_fmt.clone()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    text.push('\n');
    text.into_bytes()
}

#[test]
fn deeply_nested_event_format_is_left_out_with_exit_13_and_trace_cmd_report_survives_the_file() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("format.dat");
    let (data, _) = pages_on_every_cpu(2);
    let hostile = deeply_nested_sched_switch_format();

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
    let (res, played) = guest.play(&run, kill_after(secs(30)), |a| {
        for (name, file) in a.static_files.iter_mut() {
            if name == "events/sched/sched_switch/format" {
                *file = hostile.clone();
            }
        }
        a.well_behaved(&data)
    });

    // The judge first, so that every failure below says what trace-cmd made of the file.
    let report = out.exists().then(|| trace_cmd_report(&out));
    let judged = match &report {
        Some(r) => r.to_string(),
        None => "no file to judge".to_string(),
    };
    assert_no_panic(&res, &played);
    assert_eq!(
        res.code,
        exit(ExitCode::GuestMisbehaved),
        "{}\n{judged}",
        context(&res, &played)
    );
    let written = std::fs::read(&out)
        .unwrap_or_else(|e| panic!("no file written ({e})\n{}", context(&res, &played)));
    let nest = "(".repeat(100);
    assert!(
        !written.windows(nest.len()).any(|w| w == nest.as_bytes()),
        "the hostile format is in the file\n{judged}\n{}",
        context(&res, &played)
    );
    assert!(
        report.is_some_and(|r| r.exited_normally()),
        "trace-cmd report was killed by a signal on tvctl's file\n{judged}\n{}",
        context(&res, &played)
    );
}

// --- 3. Panics ------------------------------------------------------------------------------------

#[test]
fn hello_reply_page_size_zero_or_not_a_power_of_two_is_refused_with_exit_13_and_no_panic() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let (data, _) = pages_on_every_cpu(2);
    let mut failures = Vec::new();

    for page_size in [0u32, 1, 3] {
        let out = tmp.path().join(format!("page{page_size}.dat"));
        let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
        let (res, played) = guest.play(&run, kill_after(secs(20)), |a| {
            a.expect_hello(REPLY_TIMEOUT)?;
            let reply = HelloReply {
                page_size,
                ..a.hello_reply()
            };
            a.reply_hello(reply)?;
            // If tvctl goes on, the guest goes on too (its markers say the same page size).
            a.record(&data, |_| {})?;
            a.serve_until_stop(secs(30))?;
            a.finish()
        });

        eprintln!("HelloReply.page_size {page_size}: tvctl {}", res.ending());
        let clear = res.all_text().to_lowercase().contains("page size");
        if res.panicked() || res.code != exit(ExitCode::GuestMisbehaved) || !clear {
            failures.push(format!(
                "page size {page_size}: want exit 13 and an error naming the page size, no \
                 panic\n{}",
                context(&res, &played)
            ));
        }
    }

    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn stopped_counters_near_u64_max_saturate_instead_of_panicking() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("counters.dat");
    let (data, _) = pages_on_every_cpu(2);

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
    let (res, played) = guest.play(&run, kill_after(secs(30)), |a| {
        a.start_recording(&data)?;
        a.serve_until_stop(secs(30))?;
        let mut stopped = a.stopped();
        for c in &mut stopped.cpus {
            c.entries = u64::MAX;
            c.overrun = u64::MAX - 1;
            c.commit_overrun = u64::MAX / 2;
            c.dropped_events = u64::MAX / 2;
            c.read_events = u64::MAX;
        }
        a.finish_with(stopped)
    });

    assert_no_panic(&res, &played);
    assert!(ok_or_misbehaved(&res), "{}", context(&res, &played));
    let summary = res.json().expect("a JSON summary");
    for cpu in summary["cpus"].as_array().expect("cpus") {
        assert_eq!(cpu["lost_events"], u64::MAX, "not saturated: {cpu}");
    }
    assert_eq!(summary["total_lost_events"], u64::MAX, "{summary}");
}

// --- 4. False errors --------------------------------------------------------------------------------

#[test]
fn nul_and_escape_bytes_in_stats_text_are_no_output_error() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("stats.dat");
    let (data, events) = pages_on_every_cpu(2);

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
    let (res, played) = guest.play(&run, kill_after(secs(30)), |a| {
        a.start_recording(&data)?;
        a.serve_until_stop(secs(30))?;
        let mut stopped = a.stopped();
        for c in &mut stopped.cpus {
            c.stats_text = "entries: 3\0\x1b[2J\x1b]0;owned\x07\noverrun: 0\n".into();
        }
        a.finish_with(stopped)
    });

    assert_no_panic(&res, &played);
    assert_ne!(
        res.code,
        exit(ExitCode::OutputNotWritable),
        "{}",
        context(&res, &played)
    );
    assert!(ok_or_misbehaved(&res), "{}", context(&res, &played));
    assert_file_reads(&out, events, &res, &played);
}

#[test]
fn a_cpu_started_without_data_and_stopped_at_0_bytes_is_no_output_error() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nodata.dat");
    let cpu0 = guest_files().pages(0, 3);
    let events = guest_files().count_events(&cpu0);

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
    let (res, played) = guest.play(&run, kill_after(secs(20)), |a| {
        // cpu1 is in Started, but its marker is never written and Stopped says 0 bytes.
        a.start_recording_with(&[(0, cpu0.clone())], |s| s.cpus = vec![0, 1])?;
        a.serve_until_stop(secs(30))?;
        let mut stopped = a.stopped();
        stopped.cpus.push(cpu_stopped(1, 0));
        a.finish_with(stopped)
    });

    assert_no_panic(&res, &played);
    assert_ne!(
        res.code,
        exit(ExitCode::OutputNotWritable),
        "{}",
        context(&res, &played)
    );
    assert!(ok_or_misbehaved(&res), "{}", context(&res, &played));
    let after_stop = played.stop_at.map(|t| res.exited_at - t);
    assert!(
        after_stop.is_some_and(|d| d < secs(15)),
        "nothing to wait for after Stopped (0 bytes), yet tvctl took {after_stop:?}\n{}",
        context(&res, &played)
    );
    assert_file_reads(&out, events, &res, &played);
}

#[test]
fn a_cpu_listed_twice_in_started_is_refused_with_exit_13_and_the_file_keeps_the_data() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("twice.dat");
    let (data, events) = pages_on_every_cpu(2);

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
    let (res, played) = guest.play(&run, kill_after(secs(30)), |a| {
        a.start_recording_with(&data, |s| s.cpus = vec![0, 0, 1])?;
        a.serve_until_stop(secs(30))?;
        a.finish()
    });

    expect_exit(&res, &played, ExitCode::GuestMisbehaved);
    assert_file_reads(&out, events, &res, &played);
}

#[test]
fn a_cpu_beyond_the_domains_vcpus_is_refused_with_exit_13_and_the_file_keeps_the_data() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("beyond.dat");
    let (data, events) = pages_on_every_cpu(2);

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
    let (res, played) = guest.play(&run, kill_after(secs(30)), |a| {
        a.start_recording_with(&data, |s| s.cpus = vec![0, 1, 7])?;
        a.serve_until_stop(secs(30))?;
        let mut stopped = a.stopped();
        stopped.cpus.push(cpu_stopped(7, 0));
        a.finish_with(stopped)
    });

    expect_exit(&res, &played, ExitCode::GuestMisbehaved);
    assert_file_reads(&out, events, &res, &played);
}

#[test]
fn one_corrupt_page_among_good_ones_is_refused_with_exit_13_and_the_good_pages_are_kept() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("corrupt.dat");
    let files = guest_files();
    // cpu0: good, good, corrupt (its commit says 64 KiB of events in a 4 KiB page), good.
    let mut corrupt = files.page(0, 2);
    corrupt[8..16].copy_from_slice(&(64u64 * 1024).to_le_bytes());
    let good: Vec<Vec<u8>> = [0, 1, 3].iter().map(|&i| files.page(0, i)).collect();
    let cpu0: Vec<u8> = [&good[0], &good[1], &corrupt, &good[2]]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    let cpu1 = files.pages(1, 2);
    let events =
        good.iter().map(|p| files.count_events(p)).sum::<u64>() + files.count_events(&cpu1);

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
    let (res, played) = guest.play(&run, kill_after(secs(30)), |a| {
        a.well_behaved(&[(0, cpu0.clone()), (1, cpu1.clone())])
    });

    assert_no_panic(&res, &played);
    assert_ne!(
        res.code,
        exit(ExitCode::OutputNotWritable),
        "{}",
        context(&res, &played)
    );
    assert_eq!(
        res.code,
        exit(ExitCode::GuestMisbehaved),
        "{}",
        context(&res, &played)
    );
    assert_file_reads(&out, events, &res, &played);
}

// --- 5. Terminal injection ------------------------------------------------------------------------

/// OSC 52 (set the clipboard) and a line that pretends tvctl finished well.
const INJECTION: &str = "\x1b]52;c;dHZjdGwgd2FzIGhlcmU=\x07\ntrace finished OK\n";

/// No raw ESC or BEL on either stream, the guest's text shown (escaped), and its newline not
/// starting a line of its own.
fn assert_shown_only_escaped(res: &TvctlOutput, played: &Played) {
    for (stream, bytes) in [("stdout", &res.stdout), ("stderr", &res.stderr)] {
        assert!(
            !bytes.contains(&0x1b) && !bytes.contains(&0x07),
            "raw ESC or BEL from the guest on tvctl's {stream}\n{}",
            context(res, played)
        );
    }
    let text = res.all_text();
    assert!(
        text.contains("52;c;"),
        "the guest's text should be shown, escaped\n{}",
        context(res, played)
    );
    assert!(
        !text
            .lines()
            .any(|l| l.trim_start().starts_with("trace finished OK")),
        "a newline from the guest started a line of tvctl's output\n{}",
        context(res, played)
    );
}

#[test]
fn escape_sequences_in_an_agent_error_reach_the_terminal_only_escaped() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();

    for json in [false, true] {
        let out = tmp.path().join(format!("error-{json}.dat"));
        let run = guest.trace_as(json, &out, &["-e", "sched:sched_switch", "--duration", "1"]);
        let (res, played) = guest.play(&run, kill_after(secs(20)), |a| {
            a.handshake()?;
            a.expect_record_request(REPLY_TIMEOUT)?;
            a.send_error(ErrorCode::UnknownEvent, INJECTION)?;
            a.expect_close(secs(20))
        });

        assert_no_panic(&res, &played);
        assert!(
            res.code == exit(ExitCode::AgentRefused) || res.code == exit(ExitCode::GuestMisbehaved),
            "--json {json}\n{}",
            context(&res, &played)
        );
        assert_shown_only_escaped(&res, &played);
        if json && !res.stdout.iter().all(u8::is_ascii_whitespace) {
            assert!(
                res.json().is_some(),
                "stdout is not JSON\n{}",
                context(&res, &played)
            );
        }
    }
}

#[test]
fn escape_sequences_in_started_note_reach_the_terminal_only_escaped() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let (data, _) = pages_on_every_cpu(2);

    for json in [false, true] {
        let out = tmp.path().join(format!("note-{json}.dat"));
        let run = guest.trace_as(json, &out, &["-e", "sched:sched_switch", "--duration", "1"]);
        let (res, played) = guest.play(&run, kill_after(secs(20)), |a| {
            // splice false: tvctl shows the note as the reason for the fallback.
            a.start_recording_with(&data, |s| {
                s.splice = false;
                s.note = INJECTION.into();
            })?;
            a.serve_until_stop(secs(30))?;
            a.finish()
        });

        assert_no_panic(&res, &played);
        assert!(
            ok_or_misbehaved(&res),
            "--json {json}\n{}",
            context(&res, &played)
        );
        assert_shown_only_escaped(&res, &played);
        if json {
            assert!(
                res.json().is_some(),
                "stdout is not JSON\n{}",
                context(&res, &played)
            );
        }
    }
}

// --- 6. Two traces of one domain ------------------------------------------------------------------

#[test]
fn a_second_trace_of_a_busy_domain_exits_15_at_once_and_leaves_the_first_ones_streams_alone() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let (out_a, out_b) = (tmp.path().join("first.dat"), tmp.path().join("second.dat"));
    let files = guest_files();
    let all: Vec<(u32, Vec<u8>)> = (0..VCPUS).map(|cpu| (cpu, files.pages(cpu, 6))).collect();
    let events: u64 = all.iter().map(|(_, d)| files.count_events(d)).sum();
    let half = 3 * usize::try_from(files.page_size).unwrap();
    let first_halves: Vec<(u32, Vec<u8>)> = all
        .iter()
        .map(|(cpu, d)| (*cpu, d[..half].to_vec()))
        .collect();

    let run_a = guest.trace(&out_a, &["-e", "sched:sched_switch", "--duration", "7"]);
    let mut second = None;
    let (res_a, played) = guest.play(&run_a, kill_after(secs(20)), |a| {
        a.start_recording(&first_halves)?;
        // While the first records: a second tvctl on the same domain.
        let run_b = guest.trace(
            &out_b,
            &[
                "-e",
                "sched:sched_switch",
                "--duration",
                "1",
                "--agent-timeout",
                "3",
            ],
        );
        a.serve_pings_for(Duration::from_millis(1500))?;
        // The rest of the first trace's data, while the second tvctl runs: it must not
        // read any of it.
        for (cpu, d) in &all {
            a.write_data(*cpu, &d[half..])?;
        }
        a.serve_pings_while(|| !run_b.has_exited(), secs(20))?;
        second = Some(run_b.wait(kill_after(secs(10))));
        a.serve_until_stop(secs(30))?;
        a.finish()
    });
    let res_b = second.expect("the second tvctl ran");

    let busy = format!(
        "another tvctl (pid {}) is tracing {}",
        run_a.pid(),
        guest.name()
    );
    assert!(
        res_b.code == exit(ExitCode::Busy)
            && res_b.elapsed < secs(3)
            && res_b.all_text().contains(&busy),
        "the second tvctl should exit 15 at once saying {busy:?}\n{res_b}\n--- first ---\n{}",
        context(&res_a, &played)
    );
    assert!(!out_b.exists(), "the second tvctl wrote a file");
    assert_no_panic(&res_a, &played);
    assert_eq!(
        res_a.code,
        exit(ExitCode::Ok),
        "first: {}\n--- second ---\n{res_b}",
        context(&res_a, &played)
    );
    let summary = res_a.json().expect("JSON summary");
    assert_eq!(summary["complete"], true, "{summary}");
    assert_file_reads(&out_a, events, &res_a, &played);
}

// --- 7. Ctrl-C while waiting for the agent --------------------------------------------------------

/// Sends `sig` 1 s after tvctl is waiting for an agent that accepted but never answers Hello.
fn signal_while_the_agent_never_answers(sig: Signal) {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("interrupted.dat");

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "5"]);
    let mut signalled = None;
    let (res, played) = guest.play(&run, kill_after(secs(5)), |a| {
        a.expect_hello(REPLY_TIMEOUT)?;
        std::thread::sleep(secs(1));
        run.signal(sig);
        signalled = Some(Instant::now());
        a.go_silent_until_closed(secs(60))
    });

    let signalled =
        signalled.unwrap_or_else(|| panic!("no Hello came\n{}", context(&res, &played)));
    let took = res.exited_at.saturating_duration_since(signalled);
    assert_no_panic(&res, &played);
    assert!(
        res.code == exit(ExitCode::Interrupted) && took < secs(3),
        "{sig} while waiting for the agent: want exit 130 within 3 s, got it {:.1} s after the \
         signal\n{}",
        took.as_secs_f64(),
        context(&res, &played)
    );
    assert!(!out.exists(), "an output file after {sig}");
}

#[test]
fn sigint_while_the_agent_never_answers_hello_exits_130_within_3_s() {
    signal_while_the_agent_never_answers(Signal::SIGINT);
}

#[test]
fn sigterm_while_the_agent_never_answers_hello_exits_130_within_3_s() {
    signal_while_the_agent_never_answers(Signal::SIGTERM);
}

#[test]
fn sigint_while_nothing_accepts_the_connection_exits_130_within_3_s() {
    let mut guest = FakeGuest::start(TAG, VCPUS);
    guest.stop_listening();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("interrupted.dat");

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "5"]);
    std::thread::sleep(secs(1));
    run.signal(Signal::SIGINT);
    let signalled = Instant::now();
    let res = run.wait(kill_after(secs(5)));

    let took = res.exited_at.saturating_duration_since(signalled);
    assert!(!res.panicked(), "{res}");
    assert!(
        res.code == exit(ExitCode::Interrupted) && took < secs(3),
        "SIGINT while nothing accepts: want exit 130 within 3 s, got it {:.1} s after the \
         signal\n{res}",
        took.as_secs_f64()
    );
    assert!(!out.exists(), "an output file after SIGINT");
}

// --- 8. A FIFO deleted while the domain runs ------------------------------------------------------

#[test]
fn a_fifo_deleted_while_the_domain_runs_is_refused_with_exit_8_saying_restart() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("deleted.dat");
    let (data, _) = pages_on_every_cpu(2);
    // QEMU (and the fake) keep writing into the FIFO they opened; a new one at the path would
    // never see those bytes.
    std::fs::remove_file(guest.fifo_path(0)).unwrap();

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
    let (res, played) = guest.play(&run, kill_after(secs(10)), |a| a.well_behaved(&data));

    assert_no_panic(&res, &played);
    assert!(
        res.code == exit(ExitCode::NotSetUp) && res.all_text().to_lowercase().contains("restart"),
        "want exit 8 and a message saying to restart the domain\n{}",
        context(&res, &played)
    );
}

// --- 9, 10. An agent that stops answering ---------------------------------------------------------

/// The message must send the user to the guest's console log.
fn assert_names_console_log(guest: &FakeGuest, res: &TvctlOutput, played: &Played) {
    let log = guest.vm.console_log.display().to_string();
    assert!(
        res.all_text().contains(&log),
        "the message should name the guest's console log {log}\n{}",
        context(res, played)
    );
}

#[test]
fn an_agent_that_stops_answering_mid_trace_ends_it_with_exit_14_within_15_s() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dead.dat");
    let (data, events) = pages_on_every_cpu(3);

    // Without --json: the message is for people.
    let run = guest.trace_as(
        false,
        &out,
        &["-e", "sched:sched_switch", "--duration", "60"],
    );
    let mut silent_from = None;
    let (res, played) = guest.play(&run, kill_after(secs(17)), |a| {
        a.start_recording(&data)?;
        a.serve_pings_for(secs(3))?;
        // The guest died or locked up: the socket stays open (QEMU holds it), nothing answers.
        silent_from = Some(Instant::now());
        a.go_silent_until_closed(secs(120))
    });

    assert_no_panic(&res, &played);
    let took = silent_from.map(|t| res.exited_at.saturating_duration_since(t));
    assert!(
        res.code == exit(ExitCode::Incomplete) && took.is_some_and(|t| t < secs(15)),
        "want exit 14 within 15 s of the agent's silence, got it after {took:?}\n{}",
        context(&res, &played)
    );
    assert!(
        res.all_text().contains("stopped answering"),
        "the message should say the agent stopped answering\n{}",
        context(&res, &played)
    );
    assert_names_console_log(&guest, &res, &played);
    assert_file_reads(&out, events, &res, &played);
}

#[test]
fn an_agent_that_locks_up_at_stop_ends_the_trace_with_exit_14_within_15_s() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lockup.dat");
    let (data, _) = pages_on_every_cpu(3);

    // Without --json: the message is for people.
    let run = guest.trace_as(
        false,
        &out,
        &["-e", "sched:sched_switch", "--duration", "2"],
    );
    let (res, played) = guest.play(&run, kill_after(secs(15)), |a| {
        a.start_recording(&data)?;
        a.serve_until_stop(secs(30))?;
        a.go_silent_until_closed(secs(120))
    });

    assert_no_panic(&res, &played);
    let took = played
        .stop_at
        .map(|t| res.exited_at.saturating_duration_since(t));
    assert!(
        res.code == exit(ExitCode::Incomplete) && took.is_some_and(|t| t < secs(15)),
        "want exit 14 within 15 s of the Stop the agent never answered, got it after \
         {took:?}\n{}",
        context(&res, &played)
    );
    assert_names_console_log(&guest, &res, &played);
}

// --- 11. Exit status ------------------------------------------------------------------------------

#[test]
fn a_stream_short_of_the_agents_count_ends_with_exit_14_not_0() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("short.dat");
    let (data, events) = pages_on_every_cpu(3);
    let page = u64::from(guest_files().page_size);

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
    let (res, played) = guest.play(&run, kill_after(secs(25)), |a| {
        a.start_recording(&data)?;
        a.serve_until_stop(secs(30))?;
        let mut stopped = a.stopped();
        // Two pages more than ever arrive.
        stopped.cpus[0].bytes += 2 * page;
        a.finish_with(stopped)
    });

    expect_exit(&res, &played, ExitCode::Incomplete);
    assert_file_reads(&out, events, &res, &played);
}

#[test]
fn bytes_beyond_the_agents_count_are_cut_and_the_file_holds_exactly_the_count() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("beyond-count.dat");
    let files = guest_files();
    let page = u64::from(files.page_size);
    // cpu0 writes 4 pages and reports 2; after Stopped both CPUs go on writing for 5 s.
    let data = [(0, files.pages(0, 4)), (1, files.pages(1, 2))];
    let events = files.count_events(&files.pages(0, 2)) + files.count_events(&files.pages(1, 2));

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
    let (res, played) = guest.play(&run, kill_after(secs(30)), |a| {
        a.start_recording(&data)?;
        a.serve_until_stop(secs(30))?;
        let mut stopped = a.stopped();
        stopped.cpus[0].bytes = 2 * page;
        a.send_final_metadata()?;
        a.send(stopped)?;
        let streamers = [
            a.stream_pages(0, 4, u64::MAX, secs(5))?,
            a.stream_pages(1, 2, u64::MAX, secs(5))?,
        ];
        let closed = a.expect_close(secs(30));
        for s in streamers {
            a.stop_streamer(s);
        }
        closed
    });

    assert_no_panic(&res, &played);
    assert!(ok_or_misbehaved(&res), "{}", context(&res, &played));
    let took = played
        .stop_at
        .map(|t| res.exited_at.saturating_duration_since(t));
    assert!(
        took.is_some_and(|t| t < secs(15)),
        "a guest that keeps writing kept tvctl for {took:?} after Stop\n{}",
        context(&res, &played)
    );
    assert_eq!(
        data_bytes_per_cpu(&out),
        vec![2 * page, 2 * page],
        "the file must hold exactly the agent's counts\n{}",
        context(&res, &played)
    );
    assert_file_reads(&out, events, &res, &played);
}

#[test]
fn garbage_on_the_control_socket_before_hello_reply_is_skipped_and_the_trace_works() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("garbage.dat");
    let (data, events) = pages_on_every_cpu(2);
    // Console noise, a partial magic, then a false magic with an impossible length.
    let mut garbage =
        b"\r\n[    3.141592] virtio_console virtio1: noise \xff\xfe\x00TVC\x01".to_vec();
    garbage.extend_from_slice(b"TVCT\x01\x00\x05\x00\xff\xff\xff\xff\x00\x00\x00\x00");
    garbage.extend_from_slice(b"more noise");

    let run = guest.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
    let (res, played) = guest.play(&run, kill_after(secs(30)), |a| {
        a.expect_hello(REPLY_TIMEOUT)?;
        a.send_raw(&garbage)?;
        // A stale frame of an earlier session, then the real reply.
        a.send(tvctl::proto::Stopped {
            reason: StopReason::HostGone,
            command_status: None,
            cpus: Vec::new(),
        })?;
        let reply = a.hello_reply();
        a.reply_hello(reply)?;
        a.record(&data, |_| {})?;
        a.serve_until_stop(secs(30))?;
        a.finish()
    });

    expect_exit(&res, &played, ExitCode::Ok);
    assert_eq!(res.json().expect("JSON")["complete"], true);
    assert_file_reads(&out, events, &res, &played);
}

// --- 12. Size limits ------------------------------------------------------------------------------

#[test]
fn max_size_stops_an_endless_stream_at_the_cap_with_stop_cause_max_size() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("capped.dat");
    let (data, _) = pages_on_every_cpu(1);
    let page = u64::from(guest_files().page_size);

    let run = guest.trace(
        &out,
        &[
            "-e",
            "sched:sched_switch",
            "--duration",
            "60",
            "--max-size",
            "1M",
        ],
    );
    let (res, played) = guest.play(&run, kill_after(secs(40)), |a| {
        a.start_recording(&data)?;
        // Endless, at up to 64 MB/s per CPU: fast enough to pass the cap at once, and a late
        // look at Stop cannot overrun the drain allowance (8 MiB + the ring buffer).
        let pace = Some(Duration::from_millis(1));
        let streamers = [
            a.stream_pages_paced(0, 1, u64::MAX, secs(40), pace)?,
            a.stream_pages_paced(1, 1, u64::MAX, secs(40), pace)?,
        ];
        let stopped = a.serve_until_stop(secs(45));
        for s in streamers {
            a.stop_streamer(s);
        }
        stopped?;
        a.finish()
    });

    expect_exit(&res, &played, ExitCode::Ok);
    let summary = res.json().expect("JSON summary");
    // docs/json.md: stop causes are kebab-case.
    assert_eq!(summary["stop_cause"], "max-size", "{summary}");
    let in_file: u64 = data_bytes_per_cpu(&out).iter().sum();
    assert!(
        in_file <= (1 << 20) + u64::from(VCPUS) * page,
        "{in_file} bytes of data in the file, over 1 MiB + a page per CPU\n{}",
        context(&res, &played)
    );
}

#[test]
fn a_guest_that_keeps_writing_after_stop_is_cut_after_its_ring_buffer_with_exit_13() {
    const BUFFER_KB: u64 = 64;
    // What may still come after Stop: the ring buffer and what is in flight (the slack).
    const ALLOWED: u64 = BUFFER_KB * 1024 + DRAIN_SLACK;
    const AFTER_STOP: u64 = 2 * ALLOWED;
    let guest = FakeGuest::start(TAG, VCPUS);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("after-stop.dat");
    let (data, _) = pages_on_every_cpu(2);

    let run = guest.trace(
        &out,
        &["-e", "sched:sched_switch", "--duration", "2", "-b", "64"],
    );
    let mut before_stop = Vec::new();
    let (res, played) = guest.play(&run, kill_after(secs(30)), |a| {
        a.start_recording(&data)?;
        a.serve_until_stop(secs(30))?;
        before_stop = a.written.values().copied().collect();
        // Twice what may come after Stop, per CPU.
        let streamers = [
            a.stream_pages(0, 2, AFTER_STOP, secs(5))?,
            a.stream_pages(1, 2, AFTER_STOP, secs(5))?,
        ];
        let streaming =
            a.serve_pings_while(|| streamers.iter().any(|s| !s.is_finished()), secs(10));
        for s in streamers {
            a.stop_streamer(s);
        }
        streaming?;
        a.finish()
    });

    expect_exit(&res, &played, ExitCode::GuestMisbehaved);
    let in_file = data_bytes_per_cpu(&out);
    for (cpu, (&kept, &before)) in in_file.iter().zip(&before_stop).enumerate() {
        assert!(
            kept <= before + ALLOWED,
            "cpu{cpu}: {kept} bytes kept, over {before} before Stop + the ring buffer + \
             {DRAIN_SLACK} bytes of slack\n{}",
            context(&res, &played)
        );
    }
}
