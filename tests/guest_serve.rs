//! Guest tier: `tvctl serve` and recordings started inside the guest (`tvctl-agent record`).
//!
//! The test plays the guest's user through a root shell on a virtio-serial port of the guest
//! (`tvctl.shell=1`, tests/common/serve.rs) and runs the real `tvctl serve` as a child process,
//! reading its JSON log. The real `trace-cmd report` judges every file. One scenario, in
//! steps, shares two booted guests and the serve (boots cost a minute under TCG).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::serve::{shell_port, GuestShell, ServeProcess};
use common::TestVm;

const SHELL_TIMEOUT: Duration = Duration::from_secs(60);
const EVENT_TIMEOUT: Duration = Duration::from_secs(90);

/// A built-in guest with a shell, set up with the real `tvctl setup` under `root`.
struct ServedVm {
    vm: TestVm,
    root: PathBuf,
    shell: Option<GuestShell>,
}

impl ServedVm {
    fn new(tag: &str, vcpus: u32, root: &Path) -> ServedVm {
        let vm = TestVm::define(tag, vcpus, |xml, dir| {
            let xml = xml.replace("panic=-1 quiet", "panic=-1 quiet tvctl.shell=1");
            common::with_devices(&xml, &shell_port(&dir.join("shell.sock")))
        });
        let out = tvctl(root, &["setup", &vm.name]);
        assert!(out.status.success(), "setup failed: {}", text(&out));
        ServedVm {
            vm,
            root: root.to_path_buf(),
            shell: None,
        }
    }

    fn name(&self) -> &str {
        &self.vm.name
    }

    fn start(&mut self) {
        self.vm.start();
        self.attach_shell();
    }

    fn attach_shell(&mut self) {
        self.vm
            .wait_console_line("tvctl-agent: ready", common::boot_timeout());
        self.shell = Some(GuestShell::connect(
            &self.vm.dir.join("shell.sock"),
            common::boot_timeout(),
        ));
    }

    /// Runs a command in the guest; returns (status, output).
    fn sh(&mut self, cmd: &str) -> (i32, String) {
        let shell = self.shell.as_mut().expect("the guest runs");
        shell.run(cmd, SHELL_TIMEOUT)
    }

    fn recordings(&self) -> PathBuf {
        self.root.join(self.name()).join("recordings")
    }

    /// `.dat` files in recordings/.
    fn files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.recordings())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "dat"))
            .collect();
        v.sort();
        v
    }

    /// `tvctl-agent record ARGS` in the guest, waited for.
    fn record(&mut self, args: &str) -> Recorded {
        let (rc, out) = self.sh(&format!("tvctl-agent record {args} 2>&1"));
        Recorded::parse(rc, out)
    }

    /// Starts `tvctl-agent record ARGS` in the background (output in /tmp/TAG.*).
    fn record_in_background(&mut self, tag: &str, args: &str) {
        let (rc, out) = self.sh(&format!(
            "(tvctl-agent record {args} >/tmp/{tag}.out 2>&1 & echo $! >/tmp/{tag}.pid; \
             wait $!; echo $? >/tmp/{tag}.rc) &"
        ));
        assert_eq!(rc, 0, "{out}");
    }

    /// Waits for a background recording and returns what it printed.
    fn wait_background(&mut self, tag: &str, timeout: Duration) -> Recorded {
        let start = std::time::Instant::now();
        loop {
            let (rc, out) = self.sh(&format!("cat /tmp/{tag}.rc"));
            if rc == 0 {
                let status: i32 = out.trim().parse().expect("a status");
                let (_, printed) = self.sh(&format!("cat /tmp/{tag}.out"));
                return Recorded::parse(status, printed);
            }
            assert!(
                start.elapsed() < timeout,
                "{tag} did not finish in {timeout:?}\n{}",
                self.vm.console_report()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// What `tvctl-agent record` printed.
#[derive(Debug)]
struct Recorded {
    status: i32,
    output: String,
    events: Option<u64>,
    file: Option<PathBuf>,
}

impl Recorded {
    fn parse(status: i32, output: String) -> Recorded {
        let summary = output.lines().find_map(|l| {
            l.strip_prefix("tvctl-agent record: ")
                .filter(|r| r.contains(" events, "))
        });
        let events = summary.and_then(|s| s.split(' ').next()?.parse().ok());
        let file = summary
            .and_then(|s| s.split_once("file on the host: "))
            .map(|(_, f)| PathBuf::from(f.trim()));
        Recorded {
            status,
            output,
            events,
            file,
        }
    }

    /// Asserts a whole recording: exit 0, a file in `vm`'s recordings/ whose event count as
    /// `trace-cmd report` reads it equals what the guest printed. Returns the file.
    fn assert_whole(&self, vm: &ServedVm) -> PathBuf {
        assert_eq!(
            self.status,
            0,
            "record failed:\n{}\n{}",
            self.output,
            vm.vm.console_report()
        );
        let file = self
            .file
            .clone()
            .unwrap_or_else(|| panic!("no file in:\n{}", self.output));
        assert_eq!(
            file.parent(),
            Some(vm.recordings().as_path()),
            "{}",
            self.output
        );
        let events = self.events.expect("an event count");
        assert!(events > 0, "{}", self.output);
        assert_eq!(
            report_events(&file),
            events,
            "trace-cmd report vs the guest's count"
        );
        file
    }
}

fn tvctl(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tvctl"))
        .arg("--dir")
        .arg(root)
        .args(args)
        .output()
        .expect("run tvctl")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Events in `file` as the real `trace-cmd report` prints them.
fn report_events(file: &Path) -> u64 {
    let out = Command::new("trace-cmd")
        .args(["report", "-N"])
        .arg(file)
        .output()
        .expect("trace-cmd must be installed (scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "trace-cmd report {} failed: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("[UNKNOWN EVENT]"), "unknown events");
    stdout
        .lines()
        .filter(|l| l.contains(" [") && l.contains("]") && l.contains(": "))
        .filter(|l| !l.starts_with("CPU") && !l.starts_with("cpus="))
        .count() as u64
}

/// Removes the test's root folder at the end.
struct RootGuard(PathBuf);

impl Drop for RootGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn guests_record_through_serve_which_survives_restarts_lends_to_trace_and_finishes_on_sigterm() {
    let root = common::lab_root().join(format!("serve-{}-root", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    common::set_mode(&root, 0o755);
    let _root_guard = RootGuard(root.clone());

    let mut a = ServedVm::new("serve-a", 2, &root);
    let mut b = ServedVm::new("serve-b", 1, &root);

    // No serve yet: the guest is told so, and nothing is written.
    a.start();
    b.start();
    let none = a.record("-e sched --duration 1 -o early");
    assert_eq!(none.status, 4, "exit 4 without serve:\n{}", none.output);
    assert!(none.output.contains("tvctl serve"), "{}", none.output);
    // No agent listening (here: another socket path): exit 3, saying so.
    let (rc, out) = a.sh("TVCTL_AGENT_SOCKET=/run/none.sock tvctl-agent record -e sched 2>&1");
    assert_eq!(rc, 3, "exit 3 without an agent:\n{out}");
    assert!(out.contains("tvctl-agent is not running"), "{out}");

    let mut serve = ServeProcess::start(&root, &[]);
    serve.wait_event("connected", Some(a.name()), 0, EVENT_TIMEOUT);
    serve.wait_event("connected", Some(b.name()), 0, EVENT_TIMEOUT);

    // 1. The seed's flow: one command in the guest, a file on the host.
    let smoke = a.record("-e sched --duration 3 -o smoke");
    let file = smoke.assert_whole(&a);
    assert!(
        file.file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with("-smoke.dat"),
        "{file:?}"
    );
    let finished = serve.wait_event("recording-finished", Some(a.name()), 0, EVENT_TIMEOUT);
    assert_eq!(finished["events"], smoke.events.unwrap(), "{finished}");
    assert_eq!(finished["complete"], true, "{finished}");
    let status = tvctl(&root, &["--json", "status", a.name()]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        json["domains"][0]["serve"]["state"],
        "connected",
        "{}",
        text(&status)
    );

    // 2. Two guests at the same time; a name with path tricks stays a plain name.
    a.record_in_background("ra", "-e sched --duration 4 -o ../../two");
    b.record_in_background("rb", "-e sched --duration 4 -o two");
    let ra = a.wait_background("ra", EVENT_TIMEOUT);
    let rb = b.wait_background("rb", EVENT_TIMEOUT);
    let fa = ra.assert_whole(&a);
    let fb = rb.assert_whole(&b);
    assert!(fa.to_string_lossy().ends_with("-two.dat"), "{fa:?}");
    assert!(fb.to_string_lossy().ends_with("-two.dat"), "{fb:?}");

    // A command run while recording: its end stops the recording. Ctrl-C stops one too.
    let cmd = a.record("-e sched -o cmd -- sh -c 'echo from-the-command; sleep 2'");
    cmd.assert_whole(&a);
    assert!(cmd.output.contains("from-the-command"), "{}", cmd.output);
    let started = serve.count("recording-started", Some(b.name()));
    b.record_in_background("ctrlc", "-e sched -o ctrlc");
    serve.wait_event("recording-started", Some(b.name()), started, EVENT_TIMEOUT);
    let (rc, out) = b.sh("sleep 1; kill -INT $(cat /tmp/ctrlc.pid)");
    assert_eq!(rc, 0, "{out}");
    b.wait_background("ctrlc", EVENT_TIMEOUT).assert_whole(&b);

    // 3. tvctl trace while serve runs: serve lends the domain, a guest record meanwhile is
    //    refused naming the holder, and serve takes the domain back after.
    let trace_out = root.join("trace-a.dat");
    let lent_before = serve.count("lent", Some(a.name()));
    let trace = Command::new(env!("CARGO_BIN_EXE_tvctl"))
        .arg("--dir")
        .arg(&root)
        .args([
            "--json",
            "trace",
            a.name(),
            "-e",
            "sched",
            "--duration",
            "8",
            "-o",
        ])
        .arg(&trace_out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    serve.wait_event("lent", Some(a.name()), lent_before, EVENT_TIMEOUT);
    a.vm.wait_console_count("session with tvctl", 0, EVENT_TIMEOUT);
    std::thread::sleep(Duration::from_secs(2));
    let during = a.record("-e sched --duration 1 -o during");
    assert_eq!(
        during.status, 5,
        "refused while tvctl trace records:\n{}",
        during.output
    );
    assert!(
        during.output.contains("trace (pid"),
        "names the holder:\n{}",
        during.output
    );
    let trace = trace.wait_with_output().unwrap();
    assert!(
        trace.status.success(),
        "trace while serve runs: {}",
        text(&trace)
    );
    assert!(report_events(&trace_out) > 0);
    serve.wait_event("taken-back", Some(a.name()), 0, EVENT_TIMEOUT);

    // ... and the reverse: tvctl trace during a guest recording is refused naming it (exit 15).
    // Serve connects again once the domain is back: its second `connected`.
    serve.wait_event("connected", Some(a.name()), 1, EVENT_TIMEOUT);
    let started = serve.count("recording-started", Some(a.name()));
    a.record_in_background("long", "-e sched --duration 6 -o long");
    serve.wait_event("recording-started", Some(a.name()), started, EVENT_TIMEOUT);
    let refused = tvctl(
        &root,
        &[
            "trace",
            a.name(),
            "-e",
            "sched",
            "--duration",
            "1",
            "-o",
            "/tmp/x.dat",
        ],
    );
    assert_eq!(refused.status.code(), Some(15), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("for a user in the guest"),
        "{}",
        text(&refused)
    );
    a.wait_background("long", EVENT_TIMEOUT).assert_whole(&a);

    // 4. The agent killed and restarted in the guest: serve connects again.
    let connected = serve.count("connected", Some(b.name()));
    let (rc, out) = b.sh("killall tvctl-agent");
    assert_eq!(rc, 0, "{out}");
    serve.wait_event("connected", Some(b.name()), connected, EVENT_TIMEOUT);
    b.record("-e sched --duration 2 -o after-agent-restart")
        .assert_whole(&b);

    // 5. The domain destroyed and started again.
    let connected = serve.count("connected", Some(b.name()));
    b.vm.dom.destroy().unwrap();
    serve.wait_event("gone", Some(b.name()), 0, EVENT_TIMEOUT);
    b.shell = None;
    let _ = std::fs::remove_file(&b.vm.console_log);
    b.start();
    serve.wait_event("connected", Some(b.name()), connected, EVENT_TIMEOUT);
    b.record("-e sched --duration 2 -o after-domain-restart")
        .assert_whole(&b);

    // 6. libvirtd restarted: serve subscribes again and still sees domains stop and start.
    let lost = serve.count("libvirt-lost", None);
    let reconnected = serve.count("libvirt-connected", None);
    restart_libvirtd();
    // The test's own handles died with the old daemon: take new ones, or the domains would
    // outlive the test.
    for vm in [&mut a, &mut b] {
        vm.vm.hv = common::hypervisor();
        vm.vm.dom = vm
            .vm
            .hv
            .lookup(&vm.vm.name)
            .expect("the domain after the restart");
    }
    serve.wait_event("libvirt-lost", None, lost, EVENT_TIMEOUT);
    serve.wait_event("libvirt-connected", None, reconnected, EVENT_TIMEOUT);
    b.record("-e sched --duration 2 -o after-libvirtd-restart")
        .assert_whole(&b);

    // 7. SIGTERM during a guest recording: the file is finished, serve exits 0.
    let started = serve.count("recording-started", Some(a.name()));
    a.record_in_background("term", "-e sched --duration 30 -o term");
    serve.wait_event("recording-started", Some(a.name()), started, EVENT_TIMEOUT);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        serve.terminate(Duration::from_secs(120)),
        0,
        "{}",
        serve.report()
    );
    let term = a.wait_background("term", EVENT_TIMEOUT);
    let term_file = term.assert_whole(&a);
    let last = serve
        .log()
        .into_iter()
        .rev()
        .find(|v| v["event"] == "recording-finished")
        .unwrap();
    assert_eq!(last["file"], term_file.to_string_lossy().as_ref(), "{last}");
    assert_eq!(last["stop_cause"], "interrupt", "{last}");
    drop(serve);

    // An old host (protocol 2, no serve) connected: the new agent refuses `record` itself,
    // naming the host's version, and never sends it a version-3 message.
    let old_host = OldHost::connect(&a.root.join(a.name()).join("agent-ctl-path.sock"));
    let old = a.record("-e sched --duration 1 -o old-host");
    assert_eq!(
        old.status, 4,
        "no serve behind an old host:\n{}",
        old.output
    );
    assert!(old.output.contains("protocol 2"), "{}", old.output);
    old_host.assert_no_new_kinds();

    // 8. --max-bytes: a running recording stops at the limit with a complete file, and the
    //    next request is refused in the guest with nothing written.
    let used: u64 = a.files().iter().map(|f| f.metadata().unwrap().len()).sum();
    let limit = used + 256 * 1024;
    let serve = ServeProcess::start(&root, &["--max-bytes", &limit.to_string()]);
    serve.wait_event("connected", Some(a.name()), 0, EVENT_TIMEOUT);
    let capped = a.record("-e 'sched:*' -e 'irq:*' -e 'timer:*' --duration 120 -o capped");
    capped.assert_whole(&a);
    assert!(
        capped.output.contains("limit"),
        "says why it stopped:\n{}",
        capped.output
    );
    let before = a.files();
    let over = a.record("-e sched --duration 1 -o over");
    assert_eq!(over.status, 5, "refused over --max-bytes:\n{}", over.output);
    assert!(over.output.contains("--max-bytes"), "{}", over.output);
    assert_eq!(a.files(), before, "nothing written when refused");
}

/// A host of protocol version 2 (an older tvctl), handshaken with the agent.
struct OldHost {
    sock: std::os::unix::net::UnixStream,
    dec: tvctl::proto::FrameDecoder,
}

impl OldHost {
    fn connect(socket: &Path) -> OldHost {
        use std::io::Write;
        use tvctl::proto::{Hello, Message};
        let mut sock = std::os::unix::net::UnixStream::connect(socket).expect("control socket");
        let hello = Message::Hello(Hello {
            min_version: 1,
            max_version: 2,
            software: "tvctl 0.0.9 trace (pid 1)".into(),
            nonce: 77,
        });
        sock.write_all(&hello.encode_frame(2).unwrap()).unwrap();
        let mut host = OldHost {
            sock,
            dec: tvctl::proto::FrameDecoder::new(),
        };
        match host.next(Duration::from_secs(20)) {
            Some(Message::HelloReply(r)) => assert_eq!(r.version, 2, "{r:?}"),
            other => panic!("no HelloReply from the agent: {other:?}"),
        }
        host
    }

    fn next(&mut self, timeout: Duration) -> Option<tvctl::proto::Message> {
        use std::io::Read;
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(Some((_, m))) = self.dec.next_message() {
                return Some(m);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            match self.sock.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    self.dec.push(&buf[..n]);
                }
            }
        }
    }

    /// Nothing arrived, or only kinds of version 2 and older.
    fn assert_no_new_kinds(mut self) {
        while let Some(m) = self.next(Duration::from_millis(500)) {
            assert!(
                m.kind().since() <= 2,
                "the agent sent {:?} to a version-2 host",
                m.kind()
            );
        }
    }
}

fn restart_libvirtd() {
    let killed = Command::new("pkill").args(["-x", "libvirtd"]).status();
    assert!(
        killed.is_ok_and(|s| s.success()),
        "pkill -x libvirtd found no libvirtd"
    );
    std::thread::sleep(Duration::from_millis(500));
    common::start_libvirt_daemons();
}
