//! Guest tier: `tvctl setup` then `tvctl trace` on the built-in guest, judged by the real
//! `trace-cmd report`. One 2-vCPU guest is shared by most tests (the first trace boots it);
//! the 4-vCPU test boots its own guest because it ends by destroying it mid-trace.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::TestVm;

/// A defined (not started) built-in guest, set up with the real `tvctl setup`.
struct TracedVm {
    vm: TestVm,
    /// tvctl's `--dir` for this guest.
    root: PathBuf,
}

impl TracedVm {
    fn new(tag: &str, vcpus: u32) -> TracedVm {
        TracedVm::with_cmdline(tag, vcpus, "")
    }

    /// A guest whose kernel command line gets `extra` (e.g. `tvctl.copy=1`).
    fn with_cmdline(tag: &str, vcpus: u32, extra: &str) -> TracedVm {
        let vm = TestVm::define(tag, vcpus, |xml, _| {
            // Every occurrence: the template's header comment names the placeholders too.
            xml.replace("panic=-1 quiet", &format!("panic=-1 quiet {extra}"))
        });
        let root = common::lab_root().join(format!("{}-root", vm.name));
        let t = TracedVm { vm, root };
        let out = t.tvctl(&["setup", &t.vm.name]);
        assert!(out.status.success(), "setup failed: {}", text(&out));
        t
    }

    /// Runs the real tvctl binary with `--dir` set.
    fn tvctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tvctl"))
            .arg("--dir")
            .arg(&self.root)
            .args(args)
            .output()
            .expect("run tvctl")
    }

    /// Starts `tvctl trace --json ...` in the background and returns once the guest says the
    /// recording is under way and the host has pages of it (its scratch folder next to `out`
    /// holds a non-empty `cpuN.data`), plus 1 s, for tests that interrupt it.
    fn spawn_trace_and_wait_for_recording(&self, out: &Path, args: &[&str]) -> std::process::Child {
        let recordings = self.vm.console_count(RECORDING);
        let child = Command::new(env!("CARGO_BIN_EXE_tvctl"))
            .arg("--dir")
            .arg(&self.root)
            .args(["--json", "trace", &self.vm.name, "-o"])
            .arg(out)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn tvctl");
        self.vm
            .wait_console_count(RECORDING, recordings, common::boot_timeout());
        let folder = out.parent().expect("out has a folder");
        let has_pages = || {
            std::fs::read_dir(folder)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    e.file_name().to_string_lossy().starts_with(".tvctl-trace-")
                        && std::fs::read_dir(e.path())
                            .into_iter()
                            .flatten()
                            .flatten()
                            .any(|f| {
                                f.file_name().to_string_lossy().ends_with(".data")
                                    && f.metadata().is_ok_and(|m| m.len() > 0)
                            })
                })
        };
        let start = std::time::Instant::now();
        while !has_pages() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the host got no page within 60 s of the guest's start\n{}",
                self.vm.console_report()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(1));
        child
    }

    /// `tvctl trace --json ...`; returns (exit code, summary JSON, output text).
    fn trace(&self, out: &Path, args: &[&str]) -> (i32, serde_json::Value, String) {
        let mut all = vec!["--json", "trace", &self.vm.name];
        let out_s = out.to_str().expect("utf-8 path");
        all.extend_from_slice(&["-o", out_s]);
        all.extend_from_slice(args);
        let res = self.tvctl(&all);
        let code = res.status.code().unwrap_or(-1);
        let json = serde_json::from_slice(&res.stdout).unwrap_or(serde_json::Value::Null);
        (code, json, text(&res))
    }
}

impl Drop for TracedVm {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// One event line of `trace-cmd report -N`.
#[derive(Debug)]
struct ReportLine {
    cpu: u32,
    ts_ns: u64,
    event: String,
    fields: String,
}

/// Runs the real `trace-cmd report -N` (no plugins: every field printed as name=value).
fn report(file: &Path) -> Vec<ReportLine> {
    let out = Command::new("trace-cmd")
        .arg("report")
        .arg("-N")
        .arg(file)
        .output()
        .expect("trace-cmd must be installed (scripts/install-deps.sh)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "trace-cmd report failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("[UNKNOWN EVENT]"),
        "unknown events in report"
    );
    stdout.lines().filter_map(parse_report_line).collect()
}

fn parse_report_line(line: &str) -> Option<ReportLine> {
    let open = line.find(" [")?;
    let close = open + line[open..].find(']')?;
    let cpu = line[open + 2..close].trim().parse().ok()?;
    let rest = line[close + 1..].trim_start();
    let (ts, rest) = rest.split_once(": ")?;
    let (secs, frac) = ts.trim().split_once('.')?;
    let frac = format!("{frac:0<9}");
    let ts_ns = secs.parse::<u64>().ok()? * 1_000_000_000 + frac[..9].parse::<u64>().ok()?;
    let rest = rest.trim_start();
    let (event, fields) = rest.split_once(':')?;
    Some(ReportLine {
        cpu,
        ts_ns,
        event: event.trim().to_string(),
        fields: fields.trim().to_string(),
    })
}

/// The checks every successful trace must pass: report reads it, its event count equals our
/// JSON count, every recorded CPU has events, and time never goes backwards within a CPU.
fn check_file_against_summary(
    file: &Path,
    summary: &serde_json::Value,
    vcpus: u32,
) -> Vec<ReportLine> {
    let lines = report(file);
    assert_eq!(
        lines.len() as u64,
        summary["total_events"].as_u64().expect("total_events"),
        "trace-cmd report and tvctl disagree on the event count"
    );
    let mut per_cpu: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for l in &lines {
        per_cpu.entry(l.cpu).or_default().push(l.ts_ns);
    }
    for cpu in 0..vcpus {
        let ts = per_cpu
            .get(&cpu)
            .unwrap_or_else(|| panic!("no events from cpu{cpu}"));
        assert!(
            ts.windows(2).all(|w| w[0] <= w[1]),
            "time went backwards on cpu{cpu}"
        );
    }
    let cpus = summary["cpus"].as_array().expect("cpus");
    assert_eq!(cpus.len(), vcpus as usize);
    for c in cpus {
        assert_eq!(c["complete"], true, "{c}");
        assert_eq!(c["bytes"], c["bytes_sent"], "{c}");
    }
    lines
}

/// What the agent prints on the console when a recording starts.
const RECORDING: &str = "tvctl-agent: recording ";

fn shared() -> std::sync::MutexGuard<'static, TracedVm> {
    use std::sync::{Mutex, OnceLock};
    static VM: OnceLock<Mutex<TracedVm>> = OnceLock::new();
    let m = VM.get_or_init(|| {
        extern "C" fn cleanup() {
            if let Some(m) = VM.get() {
                let t = match m.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                t.vm.remove();
                let _ = std::fs::remove_dir_all(&t.root);
            }
        }
        // SAFETY: registering a plain extern "C" function with no arguments.
        unsafe { libc::atexit(cleanup) };
        Mutex::new(TracedVm::new("trace2", 2))
    });
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[test]
fn two_vcpus_sched_switch_report_matches_the_json_summary() {
    let t = shared();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.dat");

    let (code, summary, log) = t.trace(&out, &["-e", "sched:sched_switch", "--duration", "5"]);

    assert_eq!(code, 0, "{log}\n{}", t.vm.console_report());
    assert_eq!(summary["events"], serde_json::json!(["sched:sched_switch"]));
    assert_eq!(summary["stop_cause"], "duration");
    let lines = check_file_against_summary(&out, &summary, 2);
    let sw = lines
        .iter()
        .find(|l| l.event == "sched_switch")
        .expect("a sched_switch");
    for field in [
        "prev_comm=",
        "prev_pid=",
        "prev_state=",
        "next_comm=",
        "next_pid=",
    ] {
        assert!(
            sw.fields.contains(field),
            "field {field} missing: {}",
            sw.fields
        );
    }
}

#[test]
fn event_forms_glob_system_and_irq_glob_are_resolved_like_trace_cmd() {
    let t = shared();
    let dir = tempfile::tempdir().unwrap();
    for (form, must_include) in [
        ("sched*", "sched:sched_switch"),
        ("sched", "sched:sched_wakeup"),
        ("irq:*", "irq:softirq_entry"),
    ] {
        let out = dir.path().join("forms.dat");
        let (code, summary, log) = t.trace(&out, &["-e", form, "--duration", "2"]);
        assert_eq!(code, 0, "-e {form}: {log}\n{}", t.vm.console_report());
        let events: Vec<&str> = summary["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(
            events.contains(&must_include),
            "-e {form} resolved to {events:?}"
        );
        let lines = report(&out);
        assert_eq!(
            lines.len() as u64,
            summary["total_events"].as_u64().unwrap(),
            "-e {form}"
        );
        let system = must_include.split(':').next().unwrap();
        let known: Vec<String> = events
            .iter()
            .map(|e| e.split(':').nth(1).unwrap().to_string())
            .collect();
        assert!(
            lines.iter().all(|l| known.contains(&l.event)),
            "-e {form}: report shows events of other systems than {system}"
        );
    }
}

#[test]
fn guest_command_output_is_relayed_escaped_and_kept_in_the_summary() {
    let t = shared();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.dat");
    let script = "echo out; echo err >&2; printf 'esc\\033]52;c;eA==\\007\\n'; exit 3";

    // Without --json: the command's stdout on ours, its stderr on ours, escaped.
    let res = t.tvctl(&[
        "trace",
        &t.vm.name,
        "-o",
        out.to_str().unwrap(),
        "-e",
        "sched:sched_switch",
        "--",
        "sh",
        "-c",
        script,
    ]);
    let log = text(&res);
    assert_eq!(
        res.status.code(),
        Some(0),
        "{log}\n{}",
        t.vm.console_report()
    );
    let stdout = String::from_utf8_lossy(&res.stdout);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stdout.starts_with("out\nesc\\x1b]52;c;eA==\\x07\n"),
        "{log}"
    );
    assert!(stderr.contains("err\n"), "{log}");
    assert!(
        !stdout.contains('\x1b') && !stderr.contains('\x1b'),
        "{log}"
    );
    assert!(stdout.contains("exited with 3"), "{log}");

    // With --json: stdout is the summary alone; the output is in it.
    let (code, summary, log) = t.trace(
        &out,
        &["-e", "sched:sched_switch", "--", "sh", "-c", script],
    );
    assert_eq!(code, 0, "{log}");
    let cmd = &summary["command"];
    assert_eq!(cmd["exit_status"], 3, "{log}");
    assert_eq!(cmd["output_relayed"], true);
    assert_eq!(cmd["stdout"], "out\nesc\\x1b]52;c;eA==\\x07\n");
    assert_eq!(cmd["stderr"], "err\n");
    assert_eq!(cmd["stdout_bytes"], 20);
    assert_eq!(cmd["stderr_bytes"], 4);
}

#[test]
fn without_c_the_trace_uses_the_clock_the_guest_kernel_chose() {
    let t = shared();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clock.dat");
    let (code, summary, log) = t.trace(
        &out,
        &[
            "-e",
            "sched:sched_switch",
            "--",
            "cat",
            "/sys/kernel/tracing/trace_clock",
        ],
    );
    assert_eq!(code, 0, "{log}");
    // The top level's bracketed clock is the kernel's choice (`global` when it found the
    // TSC unstable); the instance must use it, not the `local` new instances start with.
    let top = summary["command"]["stdout"].as_str().unwrap().to_string();
    let chosen = top
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .unwrap_or_else(|| panic!("no [clock] in {top:?}"));
    assert_eq!(summary["clock"], chosen, "{log}");
    assert_eq!(summary["clock_source"], "guest-default");
    let (code, summary, log) = t.trace(
        &out,
        &["-e", "sched:sched_switch", "-C", "mono", "--duration", "1"],
    );
    assert_eq!(code, 0, "{log}");
    assert_eq!(summary["clock"], "mono");
    assert_eq!(summary["clock_source"], "option");
}

#[test]
fn agent_install_on_a_guest_without_qemu_ga_says_what_is_missing_and_exits_16() {
    let t = shared();
    let dir = tempfile::tempdir().unwrap();
    // Boots the shared guest if it is off: install needs a running one.
    let (code, _, log) = t.trace(
        &dir.path().join("boot.dat"),
        &["-e", "sched:sched_switch", "--duration", "1"],
    );
    assert_eq!(code, 0, "{log}");
    let agent = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/x86_64-unknown-linux-gnu/release/tvctl-agent");
    let res = t.tvctl(&[
        "agent",
        "install",
        &t.vm.name,
        "--agent-binary",
        agent.to_str().unwrap(),
    ]);
    let log = text(&res);
    assert_eq!(res.status.code(), Some(16), "{log}");
    assert!(log.contains("has no qemu-guest-agent channel"), "{log}");
    assert!(log.contains("org.qemu.guest_agent.0"), "{log}");
}

#[test]
fn guest_command_runs_while_tracing_and_its_end_stops_the_trace() {
    let t = shared();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmd.dat");

    let (code, summary, log) = t.trace(
        &out,
        &[
            "-e",
            "sched:sched_process_exec",
            "-e",
            "sched:sched_switch",
            "--",
            "/bin/sh",
            "-c",
            "sleep 1; /bin/tvctl-agent --version >/dev/null; exit 3",
        ],
    );

    assert_eq!(code, 0, "{log}\n{}", t.vm.console_report());
    assert_eq!(summary["stop_cause"], "command");
    assert_eq!(summary["command"]["exit_status"], 3);
    let lines = report(&out);
    assert!(
        lines
            .iter()
            .any(|l| l.event == "sched_process_exec"
                && l.fields.contains("filename=/bin/tvctl-agent")),
        "the command's exec of /bin/tvctl-agent is not in the trace; execs seen: {:?}",
        lines
            .iter()
            .filter(|l| l.event == "sched_process_exec")
            .map(|l| &l.fields)
            .collect::<Vec<_>>()
    );
}

#[test]
fn sigint_stops_gracefully_and_the_file_is_complete() {
    let t = shared();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("int.dat");
    // Make sure the guest runs, so the timing below is about the recording only.
    let (code, _, log) = t.trace(&out, &["-e", "sched:sched_switch", "--duration", "1"]);
    assert_eq!(code, 0, "{log}");
    std::fs::remove_file(&out).unwrap();

    // Interrupt a recording that is under way, not a connection attempt.
    let child = t.spawn_trace_and_wait_for_recording(&out, &["-e", "sched:sched_switch"]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let res = child.wait_with_output().unwrap();

    assert_eq!(res.status.code(), Some(0), "{}", text(&res));
    let summary: serde_json::Value = serde_json::from_slice(&res.stdout).expect("json");
    assert_eq!(summary["stop_cause"], "interrupt");
    check_file_against_summary(&out, &summary, 2);
}

#[test]
fn a_command_the_guest_cannot_run_is_refused_with_exit_code_12_and_no_file() {
    let t = shared();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nocmd.dat");
    let (code, _, log) = t.trace(
        &out,
        &[
            "-e",
            "sched:sched_switch",
            "--",
            "no-such-program-in-the-guest",
        ],
    );
    assert_eq!(code, 12, "{log}");
    assert!(
        log.contains("cannot run 'no-such-program-in-the-guest' in the guest: not found in PATH"),
        "{log}"
    );
    assert!(!out.exists());
}

#[test]
fn unknown_event_is_refused_with_exit_code_12_and_no_file() {
    let t = shared();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("none.dat");
    let (code, _, log) = t.trace(&out, &["-e", "no_such_event_anywhere", "--duration", "1"]);
    assert_eq!(code, 12, "{log}");
    assert!(log.contains("no_such_event_anywhere"), "{log}");
    assert!(!out.exists());
}

#[test]
fn four_vcpus_agent_timeout_full_trace_ctrl_c_twice_and_destroy_mid_trace() {
    let t = TracedVm::new("trace4", 4);
    let dir = tempfile::tempdir().unwrap();

    // The guest cannot boot and start its agent in 1 s: exit 9, domain left running.
    let out = dir.path().join("timeout.dat");
    let (code, _, log) = t.trace(
        &out,
        &[
            "-e",
            "sched:sched_switch",
            "--duration",
            "1",
            "--agent-timeout",
            "1",
        ],
    );
    assert_eq!(code, 9, "{log}");
    assert!(log.contains("did not answer within 1 s"), "{log}");
    // The message names the console log and the likely cause (nothing opened the port yet).
    assert!(
        log.contains(t.vm.console_log.to_str().unwrap()),
        "the console log path is not in the message: {log}"
    );
    assert!(log.contains("no program in the guest opened"), "{log}");
    assert!(log.contains("tvctl agent install"), "{log}");
    assert!(!out.exists());

    // Then a full trace on all four vCPUs.
    let out = dir.path().join("four.dat");
    let (code, summary, log) = t.trace(&out, &["-e", "sched:sched_switch", "--duration", "5"]);
    assert_eq!(code, 0, "{log}\n{}", t.vm.console_report());
    check_file_against_summary(&out, &summary, 4);

    // Ctrl-C twice while the guest cannot answer (paused): tvctl stops waiting and writes
    // what had arrived (exit 130); the file is readable. The guest is kept busy, so whole
    // pages leave its buffers before the pause (an idle guest with a quiet agent may not fill
    // a page per CPU in the 3 s the helper waits).
    let out = dir.path().join("abandoned.dat");
    let child = t.spawn_trace_and_wait_for_recording(
        &out,
        &["-e", "sched:sched_switch", "--", "sh", "-c", BUSY],
    );
    let virsh = |verb: &str| {
        let o = Command::new("virsh")
            .args(["-c", common::URI, verb, &t.vm.name])
            .output()
            .expect("virsh");
        assert!(o.status.success(), "virsh {verb}: {}", text(&o));
    };
    virsh("suspend");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let res = child.wait_with_output().unwrap();
    virsh("resume");
    assert_eq!(res.status.code(), Some(130), "{}", text(&res));
    let summary: serde_json::Value = serde_json::from_slice(&res.stdout).expect("json");
    assert_eq!(summary["stop_cause"], "abandoned");
    assert_eq!(summary["complete"], false);
    let lines = report(&out);
    assert_eq!(
        lines.len() as u64,
        summary["total_events"].as_u64().unwrap()
    );
    assert!(!lines.is_empty(), "nothing kept of what had arrived");

    // Destroy the domain mid-trace: exit 10, and report still reads the file.
    let out = dir.path().join("destroyed.dat");
    let child = t.spawn_trace_and_wait_for_recording(
        &out,
        &[
            "-e",
            "sched:sched_switch",
            "--duration",
            "120",
            "--",
            "sh",
            "-c",
            BUSY,
        ],
    );
    let virsh = Command::new("virsh")
        .args(["-c", common::URI, "destroy", &t.vm.name])
        .output()
        .expect("virsh");
    assert!(virsh.status.success(), "{}", text(&virsh));
    let res = child.wait_with_output().unwrap();
    assert_eq!(res.status.code(), Some(10), "{}", text(&res));
    let summary: serde_json::Value = serde_json::from_slice(&res.stdout).expect("json");
    assert_eq!(summary["stop_cause"], "domain-stopped");
    let lines = report(&out);
    assert_eq!(
        lines.len() as u64,
        summary["total_events"].as_u64().unwrap()
    );
    assert!(!lines.is_empty(), "nothing kept from before the destroy");
}

/// A guest command that keeps the scheduler busy (20 fork+exec a second, hundreds of
/// sched_switch events) until it is ended, without taking a whole vCPU under TCG.
const BUSY: &str = "while true; do /bin/true; sleep 0.05; done";

#[test]
fn read_write_fallback_is_reported_and_gives_the_same_kind_of_file() {
    // The agent runs with --copy (tvctl.copy=1 on the guest's kernel command line).
    let t = TracedVm::with_cmdline("copy", 2, "tvctl.copy=1");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy.dat");

    let (code, summary, log) = t.trace(&out, &["-e", "sched:sched_switch", "--duration", "3"]);

    assert_eq!(code, 0, "{log}\n{}", t.vm.console_report());
    assert_eq!(summary["splice"], false, "{summary}");
    let notes = summary["notes"].to_string();
    assert!(
        notes.contains("read/write"),
        "the fallback is not explained: {notes}"
    );
    check_file_against_summary(&out, &summary, 2);
}

#[test]
fn output_folder_that_does_not_exist_fails_with_exit_11_before_booting() {
    let t = shared();
    let (code, summary, log) = t.trace(
        Path::new("/nonexistent-tvctl-dir/x.dat"),
        &["-e", "sched:sched_switch", "--duration", "1"],
    );
    assert_eq!(code, 11, "{log}");
    assert!(summary.is_null(), "no summary on an error");
    assert!(log.contains("/nonexistent-tvctl-dir"), "{log}");
}

#[test]
fn full_disk_fails_with_exit_11_and_leaves_the_agent_ready_for_the_next_trace() {
    let t = shared();
    // A 64 KiB tmpfs: the first pages fill it.
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &small,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64k"),
    )
    .expect("mount a small tmpfs (root needed)");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount(&self.0);
        }
    }
    let _guard = Unmount(small.clone());

    let (code, _, log) = t.trace(
        &small.join("full.dat"),
        &["-e", "sched*", "-e", "irq:*", "--duration", "4"],
    );

    assert_eq!(code, 11, "{log}\n{}", t.vm.console_report());
    assert!(
        log.contains("No space left") || log.contains("space"),
        "{log}"
    );
    // The guest is not left recording: the next trace works.
    let out = dir.path().join("after.dat");
    let (code, summary, log) = t.trace(&out, &["-e", "sched:sched_switch", "--duration", "2"]);
    assert_eq!(code, 0, "{log}\n{}", t.vm.console_report());
    check_file_against_summary(&out, &summary, 2);
}
