//! Host tier against the real libvirtd: `tvctl::libvirt::events::DomainEvents` delivers the
//! lifecycle events of domains the test starts, suspends and destroys, and reports a libvirtd
//! restart as `ConnectionLost`. The domains boot a one-sector disk that halts its vCPUs, so no
//! guest code runs and a start costs about a second. Needs root and a running libvirtd, and
//! fails loudly without them.
//!
//! The tests of this file run one at a time (`SERIAL`): one of them kills libvirtd, which would
//! break the connections of the others. It restarts libvirtd even when it fails (`Restarter`).
//! Event latencies are printed (`--nocapture` shows them) for docs/serve-design.md.

mod common;

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{TestVm, URI};
use tvctl::libvirt::events::{
    CloseReason, DomainEvent, DomainEventKind, DomainEvents, Event, KeepAlive,
};

/// How long an event may take to arrive (it takes milliseconds; the margin is for a busy host).
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A subscription to the system libvirtd, or a loud failure saying how to start it.
fn subscribe() -> DomainEvents {
    DomainEvents::open(URI).unwrap_or_else(|e| {
        panic!("this test needs a running libvirtd: {e}\n(scripts/install-deps.sh installs and starts it)")
    })
}

/// Waits until `name` has an event of kind `want`; returns that domain's events up to and
/// including it, and when the last arrived. Other tests' domains raise events too; those are
/// kept in `others` for the failure message.
fn events_until(
    events: &DomainEvents,
    name: &str,
    want: DomainEventKind,
    others: &mut Vec<Event>,
) -> (Vec<DomainEvent>, Instant) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let mut mine = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(Event::Lifecycle(ev)) if ev.name == name => {
                let done = ev.kind == want;
                mine.push(ev);
                if done {
                    return (mine, Instant::now());
                }
            }
            Ok(other) => others.push(other),
            Err(e) => panic!(
                "no {want:?} event for {name} within {EVENT_TIMEOUT:?} ({e}); its events: {mine:?}; others: {others:?}"
            ),
        }
    }
}

/// Runs `act`, waits for `vm`'s event of kind `want` and prints the latency. Returns `vm`'s
/// events up to it, as (kind, detail).
fn act_and_expect(
    events: &DomainEvents,
    vm: &TestVm,
    what: &str,
    act: impl FnOnce(),
    want: DomainEventKind,
) -> Vec<(DomainEventKind, i32)> {
    let mut others = Vec::new();
    let before = Instant::now();
    act();
    let returned = Instant::now();
    let (mine, at) = events_until(events, &vm.name, want, &mut others);
    let last = mine.last().expect("events_until returns the wanted event");
    eprintln!(
        "event latency: {what}: {:?} detail {} {:?} after the call, {:?} after it returned; \
         events: {:?}",
        last.kind,
        last.detail,
        at - before,
        at.saturating_duration_since(returned),
        mine.iter().map(|e| (e.kind, e.detail)).collect::<Vec<_>>()
    );
    assert!(
        mine.iter().all(|e| e.uuid == vm.dom.uuid()),
        "events carry the domain's UUID: {mine:?}"
    );
    mine.iter().map(|e| (e.kind, e.detail)).collect()
}

fn virsh(args: &[&str]) {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .expect("run virsh");
    assert!(
        out.status.success(),
        "virsh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn start_then_destroy_delivers_started_then_stopped() {
    let _serial = serial();
    let events = subscribe();
    let vm = TestVm::define("events-start", 1, common::boot_a_halting_disk);

    let started = act_and_expect(
        &events,
        &vm,
        "start",
        || vm.start(),
        DomainEventKind::Started,
    );
    let stopped = act_and_expect(
        &events,
        &vm,
        "destroy",
        || vm.dom.destroy().expect("destroy"),
        DomainEventKind::Stopped,
    );

    // libvirt starts QEMU with its vCPUs paused and resumes them before it reports the start:
    // defined (added), resumed (unpaused), started (booted). Destroy sends QEMU SIGTERM, which
    // QEMU reports as a host-initiated shutdown before libvirt reports the stop (destroyed).
    use DomainEventKind::{Other, Resumed, Started, Stopped};
    assert_eq!(started, [(Other(0), 0), (Resumed, 0), (Started, 0)]);
    assert_eq!(stopped, [(Other(6), 2), (Stopped, 1)]);
}

#[test]
fn suspend_then_resume_delivers_suspended_then_resumed() {
    let _serial = serial();
    let vm = TestVm::define("events-pause", 1, common::boot_a_halting_disk);
    vm.start();
    let events = subscribe();

    let suspended = act_and_expect(
        &events,
        &vm,
        "suspend",
        || virsh(&["suspend", &vm.name]),
        DomainEventKind::Suspended,
    );
    let resumed = act_and_expect(
        &events,
        &vm,
        "resume",
        || virsh(&["resume", &vm.name]),
        DomainEventKind::Resumed,
    );

    // Details: VIR_DOMAIN_EVENT_SUSPENDED_PAUSED, VIR_DOMAIN_EVENT_RESUMED_UNPAUSED.
    assert_eq!(suspended, [(DomainEventKind::Suspended, 0)]);
    assert_eq!(resumed, [(DomainEventKind::Resumed, 0)]);
}

#[test]
fn dropping_one_subscription_leaves_the_others_working() {
    let _serial = serial();
    let events = subscribe();
    let first = subscribe();

    drop(first);

    // The survivor still works after another subscription's callbacks were freed.
    let vm = TestVm::define("events-drop", 1, common::boot_a_halting_disk);
    act_and_expect(
        &events,
        &vm,
        "start",
        || vm.start(),
        DomainEventKind::Started,
    );
}

/// Makes sure libvirtd runs again when the restart test ends, also when it panics.
struct Restarter;

impl Restarter {
    fn start_daemons(&self) {
        common::start_libvirt_daemons();
    }
}

impl Drop for Restarter {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Never panic twice; just try.
            let _ = std::panic::catch_unwind(|| self.start_daemons());
        } else {
            self.start_daemons();
        }
    }
}

#[test]
fn libvirtd_restart_delivers_connection_lost_and_a_new_subscription_works() {
    let _serial = serial();
    let restarter = Restarter;
    // A domain that runs across the restart: QEMU outlives libvirtd, which takes it back.
    let mut survivor = TestVm::define("events-survivor", 1, common::boot_a_halting_disk);
    survivor.start();
    let events = subscribe();

    let killed = Instant::now();
    let pkill = Command::new("pkill")
        .args(["-x", "libvirtd"])
        .status()
        .expect("run pkill");
    assert!(pkill.success(), "pkill -x libvirtd found no libvirtd");
    let mut seen = Vec::new();
    let lost = loop {
        match events.recv_timeout(EVENT_TIMEOUT) {
            Ok(Event::ConnectionLost(reason)) => break reason,
            Ok(other) => seen.push(other),
            Err(e) => panic!(
                "no ConnectionLost within {EVENT_TIMEOUT:?} of killing libvirtd ({e}); seen: {seen:?}"
            ),
        }
    };
    eprintln!(
        "event latency: libvirtd killed: ConnectionLost({lost:?}) {:?} after pkill",
        killed.elapsed()
    );
    drop(events);
    restarter.start_daemons();
    eprintln!("libvirtd answered again {:?} after pkill", killed.elapsed());
    // The old connections are dead; the test lab's handles must be reopened.
    survivor.hv = common::hypervisor();
    survivor.dom = survivor
        .hv
        .lookup(&survivor.name)
        .expect("look up the survivor");

    let fresh = subscribe();
    let vm = TestVm::define("events-restart", 1, common::boot_a_halting_disk);
    act_and_expect(
        &fresh,
        &vm,
        "start after restart",
        || vm.start(),
        DomainEventKind::Started,
    );
    let stopped = act_and_expect(
        &fresh,
        &survivor,
        "destroy of a domain that ran across the restart",
        || survivor.dom.destroy().expect("destroy the survivor"),
        DomainEventKind::Stopped,
    );

    assert_eq!(lost, CloseReason::Eof, "libvirtd closed the socket");
    assert_eq!(stopped.last(), Some(&(DomainEventKind::Stopped, 1)));
}

/// Sends SIGCONT to libvirtd when the keepalive test ends, also when it panics.
struct Resumer;

impl Drop for Resumer {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-CONT", "-x", "libvirtd"])
            .status();
    }
}

#[test]
fn hung_libvirtd_is_reported_by_keepalive() {
    let _serial = serial();
    let keepalive = KeepAlive {
        interval_secs: 1,
        count: 1,
    };
    let events = DomainEvents::open_with(URI, keepalive).unwrap_or_else(|e| {
        panic!("this test needs a running libvirtd: {e}\n(scripts/install-deps.sh installs and starts it)")
    });

    let resumer = Resumer;
    let stopped = Instant::now();
    let pkill = Command::new("pkill")
        .args(["-STOP", "-x", "libvirtd"])
        .status()
        .expect("run pkill");
    assert!(pkill.success(), "pkill -x libvirtd found no libvirtd");
    let got = events.recv_timeout(EVENT_TIMEOUT);
    let after = stopped.elapsed();
    drop(resumer);
    eprintln!(
        "event latency: libvirtd stopped (SIGSTOP), keepalive 1 s x 1: {got:?} after {after:?}"
    );

    assert_eq!(got, Ok(Event::ConnectionLost(CloseReason::Keepalive)));
    assert!(
        after < Duration::from_secs(5),
        "keepalive took {after:?} to notice"
    );
    // The daemon answers again once continued.
    drop(events);
    subscribe();
}
