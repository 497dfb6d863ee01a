//! Guest tier: a host-side client (the same `proto` and `collect` code `tvctl trace` uses)
//! drives the real tvctl-agent in the built-in guest over virtio-serial. One guest is booted
//! for all tests of this file; each test holds it for its whole conversation.

mod common;

use std::io::Write;
use std::time::Duration;

use tvctl::collect::guest_input::GuestStopped;
use tvctl::collect::recorder::{Collected, Recorder, RecorderConfig, StopEnd, Watch};
use tvctl::control::{ControlChannel, ControlError};
use tvctl::proto::{ErrorCode, Message, MessageKind, Ping, StopReason};

const VCPUS: u32 = 2;

fn config(
    vm: &common::TestVm,
    events: &[&str],
    command: &[&str],
) -> (RecorderConfig, tempfile::TempDir) {
    let data = tempfile::tempdir().expect("tempdir");
    let cfg = RecorderConfig {
        socket: vm.control_socket(),
        fifo_dir: vm.dir.clone(),
        data_dir: data.path().to_path_buf(),
        events: events.iter().map(|s| s.to_string()).collect(),
        buffer_kb: None,
        clock: None,
        command: command.iter().map(|s| s.to_string()).collect(),
        connect_timeout: Duration::from_secs(30),
        reply_timeout: Duration::from_secs(60),
        budget: None,
        keep_channel: false,
    };
    (cfg, data)
}

/// Starts a recording; nothing interrupts it.
fn start(vm: &common::TestVm, cfg: RecorderConfig) -> Recorder {
    Recorder::start(cfg, &mut || Watch::Go)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console_report()))
}

/// Stops a recording and insists it ended whole, with the agent's final counts.
fn stop(vm: &common::TestVm, rec: Recorder) -> (Collected, GuestStopped) {
    let mut done = rec.stop(Duration::from_secs(30), &mut || Watch::Go);
    assert_eq!(done.end, StopEnd::Finished, "{}", vm.console_report());
    assert!(done.problems.is_empty(), "{:?}", done.problems.to_notes());
    let stopped = done.stopped.take().expect("Stopped");
    (done, stopped)
}

/// Runs a shell command in the guest inside a short recording; returns what the command
/// printed after `tag`, as the agent relayed it (`CommandOutput`, protocol 4).
fn guest_shell(vm: &common::TestVm, tag: &str, script: &str) -> (String, String) {
    let full = format!("echo {tag} $({script})");
    let (cfg, _data) = config(vm, &["sched:sched_switch"], &["/bin/sh", "-c", &full]);
    let mut rec = start(vm, cfg);
    let instance = rec.started.instance.clone();
    assert!(
        rec.poll_stopped(Duration::from_secs(60))
            .expect("wait for command"),
        "command did not end\n{}",
        vm.console_report()
    );
    let (done, stopped) = stop(vm, rec);
    assert_eq!(stopped.reason, StopReason::CommandExited);
    assert_eq!(stopped.command_status, Some(0));
    let line = done.output.tail_text(tvctl::proto::OutputStream::Stdout);
    assert!(
        line.contains(&format!("{tag} ")),
        "the command's output {line:?} lacks {tag}\n{}",
        vm.console_report()
    );
    let out = line
        .split_once(&format!("{tag} "))
        .unwrap()
        .1
        .trim()
        .to_string();
    (out, instance)
}

const TOP_STATE: &str = "cd /sys/kernel/tracing && echo on=$(cat tracing_on) clock=$(cat trace_clock | tr ' ' _) kb=$(cat buffer_size_kb | tr ' ' _) events=$(cat set_event | wc -l) tracer=$(cat current_tracer) instances=$(ls instances | tr '\\n' ,)";

#[test]
fn record_on_every_vcpu_gives_exact_whole_pages_and_leaves_the_guest_clean() {
    let vm = common::shared_vm("agent", VCPUS);

    // Arrange: the top buffer's settings before any recording of ours.
    let (before, _) = guest_shell(&vm, "TOPSTATE-A", TOP_STATE);

    // Act: record sched_switch for a few seconds on every vCPU, then stop.
    let (cfg, _data) = config(&vm, &["sched:sched_switch"], &[]);
    let rec = start(&vm, cfg);
    assert_eq!(rec.started.cpus, (0..VCPUS).collect::<Vec<_>>());
    assert_eq!(rec.started.events, ["sched:sched_switch"]);
    std::thread::sleep(Duration::from_secs(3));
    let (done, stopped) = stop(&vm, rec);

    // Assert: bytes per CPU equal the agent's counts and are whole pages.
    assert_eq!(stopped.reason, StopReason::HostRequest);
    assert_eq!(stopped.cpus.len(), VCPUS as usize);
    let mut total = 0;
    for (outcome, path) in &done.streams {
        let cpu = stopped.cpus.get(&outcome.cpu).expect("cpu in Stopped");
        let on_disk = std::fs::metadata(path).expect("data file").len();
        assert!(
            outcome.complete,
            "cpu{} incomplete: {outcome:?}",
            outcome.cpu
        );
        assert_eq!(outcome.received, cpu.bytes, "cpu{}", outcome.cpu);
        assert_eq!(on_disk, cpu.bytes, "cpu{}", outcome.cpu);
        assert_eq!(cpu.bytes % 4096, 0, "cpu{} not whole pages", outcome.cpu);
        assert!(cpu.stats_text.contains("entries:"), "{}", cpu.stats_text);
        total += cpu.bytes;
    }
    assert!(total > 0, "no data at all\n{}", vm.console_report());
    for name in [
        "events/header_page",
        "events/header_event",
        "events/sched/sched_switch/format",
        "kallsyms",
        "printk_formats",
        "saved_cmdlines",
        "trace_clock",
        "uname",
    ] {
        assert!(
            done.metadata.contains_key(name),
            "metadata lacks {name}: {:?}",
            done.metadata.keys().collect::<Vec<_>>()
        );
    }
    let header_page = String::from_utf8_lossy(&done.metadata["events/header_page"]);
    assert!(
        header_page.contains("field: char data"),
        "header_page cut short: {header_page}"
    );
    let format = String::from_utf8_lossy(&done.metadata["events/sched/sched_switch/format"]);
    assert!(format.contains("field:char prev_comm[16]"), "{format}");

    // And a later session on the same agent sees the top buffer as before, and only its own
    // instance (ours of the first two sessions are gone).
    let (after, instance) = guest_shell(&vm, "TOPSTATE-C", TOP_STATE);
    let strip_instances = |s: &str| s.split(" instances=").next().unwrap().to_string();
    assert_eq!(strip_instances(&before), strip_instances(&after));
    let instances_after = after.split(" instances=").nth(1).unwrap_or("");
    assert_eq!(
        instances_after.trim_end_matches(','),
        instance,
        "stale instances: {after}"
    );
}

#[test]
fn bad_requests_get_errors_and_the_agent_keeps_serving() {
    let vm = common::shared_vm("agent", VCPUS);
    let mut chan = ControlChannel::connect(
        &vm.control_socket(),
        "test",
        Duration::from_secs(30),
        &mut || false,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.console_report()));
    let record = |events: &[&str], buffer_kb: Option<u32>, clock: Option<&str>| {
        Message::RecordRequest(tvctl::proto::RecordRequest {
            events: events.iter().map(|s| s.to_string()).collect(),
            buffer_kb,
            clock: clock.map(str::to_string),
            command: vec![],
            stream_nonce: 1,
        })
    };
    let expect_refusal = |chan: &mut ControlChannel, msg: &Message, want: ErrorCode| match chan
        .request(msg, Duration::from_secs(30), &mut || false)
    {
        Err(ControlError::Refused(code, text)) => assert_eq!(code, want, "{text}"),
        other => panic!("expected {want:?}, got {other:?}\n{}", vm.console_report()),
    };
    expect_refusal(
        &mut chan,
        &record(&["no_such_event"], None, None),
        ErrorCode::UnknownEvent,
    );
    expect_refusal(
        &mut chan,
        &record(&["sched:sched_switch"], None, Some("sundial")),
        ErrorCode::UnknownClock,
    );
    expect_refusal(
        &mut chan,
        &record(&["sched:sched_switch"], Some(0), None),
        ErrorCode::BadBufferSize,
    );
    expect_refusal(
        &mut chan,
        &record(&["sched:sched_switch"], Some(4 * 1024 * 1024), None),
        ErrorCode::BadBufferSize,
    );
    expect_refusal(&mut chan, &Message::Stop, ErrorCode::NotRecording);

    // An unknown kind in a well-formed frame: an Error reply, and the session goes on.
    let mut frame = Message::Ping(Ping { nonce: 5 })
        .encode_frame(chan.version())
        .unwrap();
    frame[6..8].copy_from_slice(&999u16.to_le_bytes());
    chan.socket().write_all(&frame).unwrap();
    match chan.recv(Duration::from_secs(30)).expect("reply") {
        Message::Error(e) => assert_eq!(e.code, ErrorCode::UnknownKind),
        other => panic!("expected Error, got {other:?}"),
    }
    match chan
        .request(
            &Message::Ping(Ping { nonce: 9 }),
            Duration::from_secs(30),
            &mut || false,
        )
        .expect("pong")
    {
        Message::Pong(p) => assert_eq!(p.nonce, 9),
        other => panic!("expected Pong, got {other:?}"),
    }
    assert_eq!(MessageKind::Pong as u16, 10);

    // Garbage bytes: the session is closed cleanly (Error BadFrame), the agent keeps serving.
    chan.socket()
        .write_all(b"this is not a frame at all, not even close\n")
        .unwrap();
    match chan.recv(Duration::from_secs(30)) {
        Ok(Message::Error(e)) => assert_eq!(e.code, ErrorCode::BadFrame),
        other => panic!("expected Error BadFrame, got {other:?}"),
    }
    chan.close();
    let mut again = ControlChannel::connect(
        &vm.control_socket(),
        "test",
        Duration::from_secs(30),
        &mut || false,
    )
    .unwrap_or_else(|e| {
        panic!(
            "agent stopped serving after garbage: {e}\n{}",
            vm.console_report()
        )
    });
    match again
        .request(
            &Message::Ping(Ping { nonce: 11 }),
            Duration::from_secs(30),
            &mut || false,
        )
        .expect("pong")
    {
        Message::Pong(p) => assert_eq!(p.nonce, 11),
        other => panic!("expected Pong, got {other:?}"),
    }
    again.close();
}

#[test]
fn host_that_vanishes_mid_recording_leaves_the_agent_ready_and_clean() {
    let vm = common::shared_vm("agent", VCPUS);

    // Arrange: a recording under way, then the host disappears without Stop or Close.
    let (cfg, _data) = config(&vm, &["sched:sched_switch", "irq:*"], &[]);
    let rec = start(&vm, cfg);
    std::thread::sleep(Duration::from_secs(2));
    // Gives up without Stop or Close: the control socket just closes.
    let _ = rec.abandon(StopEnd::AgentLost("test".into()));

    // Act: a new host; its readers drain what the old recording left in the FIFOs.
    let (instances, instance) = guest_shell(
        &vm,
        "INSTANCES-AFTER-VANISH",
        "ls /sys/kernel/tracing/instances | tr '\\n' ,",
    );

    // Assert: the agent noticed, cleaned up, and only the new session's instance exists.
    assert!(
        vm.console().contains("recording abandoned (HostGone)"),
        "{}",
        vm.console_report()
    );
    assert_eq!(
        instances.trim_end_matches(','),
        instance,
        "stale instances left"
    );
}
