//! Integration tier: the real `tvctl serve` against a hostile guest agent (issue 10 on top of
//! issue 8's harness, `common::fake_guest`).
//!
//! A guest that starts recordings decides their names, their events and how often it asks;
//! serve must keep every path its own, every guest string out of its log unescaped, and its
//! log short whatever the guest does.

mod common;

use std::time::Duration;

use common::fake_guest::{guest_files, kill_after, trace_cmd_report, FakeError, FakeGuest};
use nix::sys::signal::Signal;
use tvctl::proto::{Message, RecordOffer, StopReason};

const TAG: &str = "hs";
const VCPUS: u32 = 2;

fn offer(id: u64, name: &str) -> RecordOffer {
    RecordOffer {
        offer_id: id,
        name: name.into(),
        events: vec!["sched:sched_switch".into()],
        buffer_kb: None,
        clock: None,
    }
}

/// Reads messages until one that `pick` takes (Pings are answered by the fake).
fn wait_for<T>(
    a: &mut common::fake_guest::FakeAgent,
    what: &str,
    mut pick: impl FnMut(Message) -> Option<T>,
) -> Result<T, FakeError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(FakeError::Timeout(what.into()));
        }
        if let Some(v) = pick(a.recv(left)?) {
            return Ok(v);
        }
    }
}

fn sigterm(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
}

#[test]
fn a_guest_chosen_name_never_leaves_recordings_and_the_file_is_whole() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let files = guest_files();
    let data: Vec<(u32, Vec<u8>)> = (0..VCPUS).map(|c| (c, files.pages(c, 3))).collect();
    let events: u64 = data.iter().map(|(_, d)| files.count_events(d)).sum();
    let run = guest.tvctl(&["--json", "serve"]);
    let pid = run.pid();
    let evil = "../../\u{1b}[31mevil\nname/..";
    let (res, played) = guest.play(&run, kill_after(Duration::from_secs(60)), |a| {
        a.handshake()?;
        wait_for(a, "ServeReady", |m| {
            matches!(m, Message::ServeReady(_)).then_some(())
        })?;
        a.send(offer(9, evil))?;
        let answer = wait_for(a, "OfferAnswer", |m| match m {
            Message::OfferAnswer(x) => Some(x),
            _ => None,
        })?;
        a.note(format!("answer: {answer:?}"));
        if !answer.accepted || answer.offer_id != 9 {
            return Err(FakeError::Unexpected(format!("{answer:?}")));
        }
        a.record(&data, |_| {})?;
        // The guest ends its own recording, as `tvctl-agent record` does.
        a.send_final_metadata()?;
        let mut stopped = a.stopped();
        stopped.reason = StopReason::GuestRequest;
        a.send(stopped)?;
        let done = wait_for(a, "RecordDone", |m| match m {
            Message::RecordDone(d) => Some(d),
            _ => None,
        })?;
        a.note(format!("done: {done:?}"));
        if done.events != events || !done.complete || done.file != answer.file {
            return Err(FakeError::Unexpected(format!("{done:?}")));
        }
        sigterm(pid);
        a.expect_close(Duration::from_secs(30))
    });
    assert!(played.result.is_ok(), "{res}\n{played}");
    assert_eq!(
        res.code,
        Some(0),
        "serve exits 0 on SIGTERM\n{res}\n{played}"
    );
    let recordings = guest.dir.join("recordings");
    let kept: Vec<_> = std::fs::read_dir(&recordings)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].ends_with("-31mevilname...dat"), "{kept:?}");
    let report = trace_cmd_report(&recordings.join(&kept[0]));
    assert!(
        report.status.success() && report.events == events,
        "{report}"
    );
    // The log is JSON lines; the guest's bytes appear only escaped.
    let stdout = res.stdout_text();
    assert!(
        !res.stdout.contains(&0x1b),
        "raw ESC in serve's log:\n{stdout}"
    );
    for line in stdout.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    assert!(stdout.contains("\"recording-finished\""), "{stdout}");
}

#[test]
fn a_guest_that_floods_offers_over_the_limit_is_refused_each_time_and_logged_once() {
    let guest = FakeGuest::start(TAG, VCPUS);
    let recordings = guest.dir.join("recordings");
    std::fs::create_dir_all(&recordings).unwrap();
    std::fs::write(recordings.join("old.dat"), vec![0u8; 8192]).unwrap();
    let run = guest.tvctl(&["--json", "serve", "--max-bytes", "4096"]);
    let pid = run.pid();
    const OFFERS: u64 = 300;
    let (res, played) = guest.play(&run, kill_after(Duration::from_secs(60)), |a| {
        a.handshake()?;
        wait_for(a, "ServeReady", |m| {
            matches!(m, Message::ServeReady(_)).then_some(())
        })?;
        for id in 1..=OFFERS {
            a.send(offer(id, "flood"))?;
            let answer = wait_for(a, "OfferAnswer", |m| match m {
                Message::OfferAnswer(x) => Some(x),
                _ => None,
            })?;
            if answer.accepted || answer.offer_id != id || !answer.text.contains("--max-bytes") {
                return Err(FakeError::Unexpected(format!("{answer:?}")));
            }
        }
        sigterm(pid);
        a.expect_close(Duration::from_secs(30))
    });
    assert!(played.result.is_ok(), "{res}\n{played}");
    assert_eq!(res.code, Some(0), "{res}");
    let stdout = res.stdout_text();
    let refused = stdout.matches("\"recording-refused\"").count();
    assert!(
        (1..=3).contains(&refused),
        "{OFFERS} refusals should log a line or two, not {refused}:\n{stdout}"
    );
    let kept: Vec<_> = std::fs::read_dir(&recordings).unwrap().flatten().collect();
    assert_eq!(kept.len(), 1, "nothing written when refused");
}
