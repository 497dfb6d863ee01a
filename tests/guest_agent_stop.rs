//! Guest tier, issue 8: stopping a recording while the agent's pumps are busy. One guest is
//! booted for this file; a minimal host written against `tvctl::proto` alone (a control
//! socket, and one thread per data FIFO that reads and counts) drives the real agent, so
//! these tests see exactly what the agent does and nothing of the host's own stop logic.
//!
//! Each test checks that every stop is answered within a bound, that the agent then answers
//! a Ping at once, that the byte counts in `Stopped` are exactly what reached the FIFOs, that
//! no instance of ours is left in the guest, and that the guest's console shows no lockup.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tvctl::proto::{
    FrameDecoder, Hello, Message, Ping, RecordRequest, Started, StopReason, Stopped,
    PROTOCOL_VERSION,
};

const VCPUS: u32 = 2;
/// Bytes of the start marker the agent writes before each stream (docs/protocol.md §7).
const MARKER_LEN: u64 = 32;
/// Events that keep the pumps busy: a fork loop makes hundreds of thousands of syscalls.
const BUSY_EVENTS: [&str; 3] = ["sched", "irq", "raw_syscalls"];
/// The load of every busy recording, on both vCPUs: `dd` floods the instance's trace_marker
/// with 4000-byte writes (megabytes per second for the pumps), a shell loop spins, and a fork
/// loop makes syscalls and scheduler events. Ends on SIGTERM (the agent's stop) with status 0.
const BUSY_UNTIL_STOPPED: &str = "m=$(echo /sys/kernel/tracing/instances/tvctl-*/trace_marker); \
    dd if=/dev/zero of=$m bs=4000 2>/dev/null & d=$!; while :; do :; done & b=$!; \
    trap \"kill $d $b; exit 0\" TERM; while :; do /bin/true; done";
/// The same load, ending by itself after 150 forks: the agent stops on "command exited".
const BUSY_THEN_EXIT: &str = "m=$(echo /sys/kernel/tracing/instances/tvctl-*/trace_marker); \
    dd if=/dev/zero of=$m bs=4000 2>/dev/null & d=$!; while :; do :; done & b=$!; \
    i=0; while [ $i -lt 150 ]; do /bin/true; i=$((i+1)); done; kill $d $b; exit 0";
/// How long a stop may take when the host reads: tracing off, the command killed, a few MiB
/// drained, the instance removed, all under TCG on a loaded 2-core host.
const STOP_BOUND: Duration = Duration::from_secs(10);
/// How long a stop may take when the host reads nothing: the pumps' stall limit (5 s) plus
/// the rest of the stop.
const STALLED_STOP_BOUND: Duration = Duration::from_secs(20);
/// Kernel messages that mean a CPU got stuck (the symptoms of issue 8, and their relatives).
const LOCKUP_SIGNS: [&str; 7] = [
    "soft lockup",
    "detected stall",
    "rcu: INFO",
    "didn't happen",
    "blocked for more than",
    "BUG:",
    "Call Trace",
];

/// Readers of the data FIFOs, for the whole life of the shared guest: they count what arrives
/// and drop it, and can be paused to play a host that stopped reading.
struct Fifos {
    reading: Arc<AtomicBool>,
    received: Vec<Arc<AtomicU64>>,
}

impl Fifos {
    fn of(vm: &common::TestVm) -> &'static Fifos {
        static FIFOS: OnceLock<Fifos> = OnceLock::new();
        FIFOS.get_or_init(|| {
            let reading = Arc::new(AtomicBool::new(true));
            let received = (0..VCPUS)
                .map(|cpu| {
                    let count = Arc::new(AtomicU64::new(0));
                    let path = vm.dir.join(format!("trace-path-cpu{cpu}.out"));
                    let (count2, reading2) = (Arc::clone(&count), Arc::clone(&reading));
                    std::thread::spawn(move || read_fifo(&path, &count2, &reading2));
                    count
                })
                .collect();
            Fifos { reading, received }
        })
    }

    fn totals(&self) -> Vec<u64> {
        self.received
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .collect()
    }

    /// Waits until each FIFO delivered `want[cpu]` bytes more than `before[cpu]`; returns what
    /// arrived (all of it, or what there was after `timeout`).
    fn wait_for(&self, before: &[u64], want: &[u64], timeout: Duration) -> Vec<u64> {
        let start = Instant::now();
        loop {
            let got: Vec<u64> = self
                .totals()
                .iter()
                .zip(before)
                .map(|(now, was)| now - was)
                .collect();
            if got.iter().zip(want).all(|(g, w)| g >= w) || start.elapsed() > timeout {
                // Anything beyond the counts would show up here too.
                std::thread::sleep(Duration::from_millis(300));
                return self
                    .totals()
                    .iter()
                    .zip(before)
                    .map(|(now, was)| now - was)
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn read_fifo(path: &std::path::Path, count: &AtomicU64, reading: &AtomicBool) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut fifo = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if !reading.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match fifo.read(&mut buf) {
            Ok(0) => std::thread::sleep(Duration::from_millis(20)),
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("read {}: {e}", path.display()),
        }
    }
}

/// A host's end of the control channel, on the wire format alone.
struct Host {
    sock: UnixStream,
    decoder: FrameDecoder,
    version: u16,
}

impl Host {
    /// Connects and handshakes (the agent looks for hosts every 100 ms; a Hello sent between
    /// its sessions may be lost, so it is resent).
    fn connect(vm: &common::TestVm) -> Host {
        let deadline = Instant::now() + Duration::from_secs(60);
        let sock = loop {
            match UnixStream::connect(vm.control_socket()) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    panic!("connect control socket: {e}\n{}", vm.console_report())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let mut host = Host {
            sock,
            decoder: FrameDecoder::new(),
            version: PROTOCOL_VERSION,
        };
        let nonce = 0x1550_e008_u64 ^ u64::from(std::process::id());
        let hello = Message::Hello(Hello {
            min_version: 1,
            max_version: PROTOCOL_VERSION,
            software: "guest_agent_stop".into(),
            nonce,
        });
        loop {
            assert!(
                Instant::now() < deadline,
                "no HelloReply\n{}",
                vm.console_report()
            );
            host.send(&hello);
            let until = Instant::now() + Duration::from_secs(2);
            while let Some(msg) = host.recv(until) {
                if let Message::HelloReply(r) = msg {
                    if r.nonce == nonce {
                        host.version = r.version;
                        return host;
                    }
                }
            }
        }
    }

    fn send(&mut self, msg: &Message) {
        let frame = msg.encode_frame(self.version).expect("encode");
        self.sock.write_all(&frame).expect("write control socket");
    }

    /// The next message, or None at `until`.
    fn recv(&mut self, until: Instant) -> Option<Message> {
        let mut buf = [0u8; 65536];
        loop {
            if let Some((_, msg)) = self.decoder.next_message().expect("well-formed frames") {
                return Some(msg);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.sock.set_read_timeout(Some(left)).expect("timeout");
            match self.sock.read(&mut buf) {
                Ok(0) => panic!("the agent's control port closed"),
                Ok(n) => {
                    let taken = self.decoder.push(&buf[..n]);
                    assert_eq!(taken, n, "decoder overflow");
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("read control socket: {e}"),
            }
        }
    }
}

/// What one recording told the host.
struct Ended {
    started: Started,
    stopped: Stopped,
    /// Texts of `Error` messages that came before `Stopped`.
    errors: Vec<String>,
    /// From `Stop` (or from `Started`, when the command ends by itself) to `Stopped`.
    stop_took: Duration,
}

/// Starts a recording of `events` running `script`; waits for `Started`.
fn start(host: &mut Host, vm: &common::TestVm, events: &[&str], script: &str) -> Started {
    static NONCE: AtomicU64 = AtomicU64::new(0x5709_0000);
    host.send(&Message::RecordRequest(RecordRequest {
        events: events.iter().map(|s| s.to_string()).collect(),
        buffer_kb: Some(4096),
        clock: None,
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        stream_nonce: NONCE.fetch_add(1, Ordering::SeqCst),
    }));
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        match host.recv(until) {
            Some(Message::Started(s)) => return s,
            Some(Message::Error(e)) => panic!("refused: {e:?}\n{}", vm.console_report()),
            Some(_) => {}
            None => panic!("no Started within 60 s\n{}", vm.console_report()),
        }
    }
}

/// Waits for `Stopped` (skipping Metadata and Pong), sending `Stop` first if `stop` is set.
fn finish(
    host: &mut Host,
    vm: &common::TestVm,
    started: Started,
    stop: bool,
    bound: Duration,
) -> Ended {
    let t0 = Instant::now();
    if stop {
        host.send(&Message::Stop);
    }
    let until = t0 + bound;
    let mut errors = Vec::new();
    loop {
        match host.recv(until) {
            Some(Message::Stopped(stopped)) => {
                return Ended {
                    started,
                    stopped,
                    errors,
                    stop_took: t0.elapsed(),
                }
            }
            Some(Message::Error(e)) => errors.push(e.text),
            Some(_) => {}
            None => panic!(
                "no Stopped within {bound:?} (stop sent: {stop})\n{}",
                vm.console_report()
            ),
        }
    }
}

/// Asserts the agent answers a Ping within 3 s: its control loop is not stuck.
fn assert_answers_promptly(host: &mut Host, vm: &common::TestVm) {
    let nonce = 0x9e9e;
    host.send(&Message::Ping(Ping { nonce }));
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(3);
    loop {
        match host.recv(until) {
            Some(Message::Pong(p)) if p.nonce == nonce => return,
            Some(_) => {}
            None => panic!("no Pong within 3 s after a stop\n{}", vm.console_report()),
        }
    }
}

/// Adds a recording's stream lengths (marker included) to `want`.
fn add_streams(want: &mut [u64], ended: &Ended) {
    for c in &ended.stopped.cpus {
        want[usize::try_from(c.cpu).expect("cpu")] += MARKER_LEN + c.bytes;
    }
}

/// Runs `ls instances` in the guest inside a short recording of its own; asserts that only
/// that recording's instance exists. Adds its streams to `want`.
fn assert_only_own_instance(host: &mut Host, vm: &common::TestVm, tag: &str, want: &mut [u64]) {
    // To the console: this test's host reads no CommandOutput (protocol 4 relays the
    // command's own stdout to the host instead of the agent's log).
    let script =
        format!("echo {tag} $(ls /sys/kernel/tracing/instances | tr '\\n' ,) > /dev/console");
    let started = start(host, vm, &["sched:sched_switch"], &script);
    let ended = finish(host, vm, started, false, Duration::from_secs(60));
    assert_eq!(ended.stopped.reason, StopReason::CommandExited);
    add_streams(want, &ended);
    let line = vm.wait_console_line(&format!("{tag} "), Duration::from_secs(10));
    let listed = line.split_once(&format!("{tag} ")).unwrap().1.trim();
    assert_eq!(
        listed.trim_end_matches(','),
        ended.started.instance,
        "instances left behind: {listed}\n{}",
        vm.console_report()
    );
}

fn assert_console_clean(vm: &common::TestVm) {
    let console = vm.console();
    for sign in LOCKUP_SIGNS {
        assert!(
            !console.contains(sign),
            "the guest reported {sign:?}\n{}",
            vm.console_report()
        );
    }
}

#[test]
fn issue_8_stopping_busy_pumps_again_and_again_answers_promptly_and_leaves_the_guest_clean() {
    let vm = common::shared_vm("agentstop", VCPUS);
    let fifos = Fifos::of(&vm);
    fifos.reading.store(true, Ordering::SeqCst);
    let before = fifos.totals();
    let mut want = vec![0u64; VCPUS as usize];
    let mut host = Host::connect(&vm);
    let t_all = Instant::now();

    // Act: recordings under a busy workload, stopped alternately by the host (Stop) and by
    // the command's own exit (the path of issue 8: "command exited with 0; stopping").
    let mut took = Vec::new();
    for round in 0..6 {
        let by_host = round % 2 == 0;
        let script = if by_host {
            BUSY_UNTIL_STOPPED
        } else {
            BUSY_THEN_EXIT
        };
        let started = start(&mut host, &vm, &BUSY_EVENTS, script);
        assert_eq!(started.cpus, (0..VCPUS).collect::<Vec<_>>());
        if by_host {
            std::thread::sleep(Duration::from_millis(1500));
        }
        let bound = if by_host {
            STOP_BOUND
        } else {
            Duration::from_secs(60)
        };
        let ended = finish(&mut host, &vm, started, by_host, bound);

        // Assert, every round: the right ending, nothing cut short, and a prompt agent.
        let want_reason = if by_host {
            StopReason::HostRequest
        } else {
            StopReason::CommandExited
        };
        assert_eq!(
            ended.stopped.reason,
            want_reason,
            "round {round}: {:?}\n{}",
            ended.errors,
            vm.console_report()
        );
        assert_eq!(ended.stopped.command_status, Some(0), "round {round}");
        assert!(ended.errors.is_empty(), "round {round}: {:?}", ended.errors);
        assert_eq!(ended.stopped.cpus.len(), VCPUS as usize);
        assert!(
            ended.stopped.cpus.iter().map(|c| c.bytes).sum::<u64>() > 0,
            "round {round}: no data"
        );
        add_streams(&mut want, &ended);
        assert_answers_promptly(&mut host, &vm);
        took.push(ended.stop_took);
    }
    eprintln!(
        "stop→Stopped (host stops) / start→Stopped (command exits): {took:?}; all rounds {:?}",
        t_all.elapsed()
    );

    // Assert: no instance left, the counts exact, the console clean.
    assert_only_own_instance(&mut host, &vm, "INSTANCES-AFTER-BUSY-STOPS", &mut want);
    let got = fifos.wait_for(&before, &want, Duration::from_secs(30));
    assert_eq!(got, want, "bytes per FIFO differ from the agent's counts");
    assert_console_clean(&vm);
}

#[test]
fn stop_is_answered_within_its_bound_when_the_host_reads_no_data() {
    let vm = common::shared_vm("agentstop", VCPUS);
    let fifos = Fifos::of(&vm);
    let before = fifos.totals();
    let mut want = vec![0u64; VCPUS as usize];
    let mut host = Host::connect(&vm);

    // Arrange: a busy recording whose host stops reading the data FIFOs, long enough for the
    // FIFOs and the ports' queues to fill so that the pumps wait for room.
    fifos.reading.store(false, Ordering::SeqCst);
    let started = start(&mut host, &vm, &BUSY_EVENTS, BUSY_UNTIL_STOPPED);
    std::thread::sleep(Duration::from_secs(6));

    // Act
    let ended = finish(&mut host, &vm, started, true, STALLED_STOP_BOUND);
    fifos.reading.store(true, Ordering::SeqCst);

    // Assert: answered in time (the pumps' stall limit, not for ever), and the stream cut
    // short is said so: an Error naming it, then Stopped{AgentError} (docs/protocol.md §4.8).
    eprintln!(
        "stop with a host reading nothing answered in {:?}; bytes {:?}; errors {:?}",
        ended.stop_took,
        ended
            .stopped
            .cpus
            .iter()
            .map(|c| c.bytes)
            .collect::<Vec<_>>(),
        ended.errors
    );
    assert_eq!(
        ended.stopped.reason,
        StopReason::AgentError,
        "the ports never filled: {:?}",
        ended.errors
    );
    assert!(
        ended.errors.iter().any(|e| e.contains("took nothing")),
        "{:?}",
        ended.errors
    );
    add_streams(&mut want, &ended);
    assert_answers_promptly(&mut host, &vm);

    // And once the host reads again: the ports are free for the next recording, no instance
    // is left, every counted byte arrives, and the console is clean.
    assert_only_own_instance(&mut host, &vm, "INSTANCES-AFTER-STALL", &mut want);
    let got = fifos.wait_for(&before, &want, Duration::from_secs(30));
    assert_eq!(got, want, "bytes per FIFO differ from the agent's counts");
    assert_console_clean(&vm);
}
