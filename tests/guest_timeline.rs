//! Guest tier: one timeline of the host and several guests (`tvctl trace DOM… --host`),
//! judged by the real `trace-cmd report -i host -i guest…`.
//!
//! The judge of the clock sync is causality in the merged output: every probe is a chain
//! written into the traces themselves (host marker `tvctl-sync N`, then the guest's, then the
//! host's again, each after the previous one really happened), so in a correctly merged
//! timeline every chain reads host, guest, host. `--sync none` breaks them, which shows the
//! check can fail. Two guests (2 and 3 vCPUs) are shared by all tests, which take turns.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::TestVm;

/// Two built-in guests set up under one `--dir`.
struct Lab {
    vms: Vec<TestVm>,
    root: PathBuf,
}

impl Lab {
    fn new() -> Lab {
        let a = TestVm::define("tl2", 2, |xml, _| xml.to_string());
        let root = common::lab_root().join(format!("{}-root", a.name));
        let b = TestVm::define("tl3", 3, |xml, _| xml.to_string());
        let lab = Lab {
            vms: vec![a, b],
            root,
        };
        for vm in &lab.vms {
            let out = lab.tvctl(&["setup", &vm.name]);
            assert!(out.status.success(), "setup: {}", text(&out));
        }
        lab
    }

    fn tvctl(&self, args: &[&str]) -> Output {
        self.tvctl_env(args, &[])
    }

    fn tvctl_env(&self, args: &[&str], env: &[(&str, &Path)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tvctl"));
        cmd.arg("--dir").arg(&self.root).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run tvctl")
    }

    /// `tvctl --json trace DOMS… -o OUT ARGS…`; (exit code, JSON, all output).
    fn trace(&self, doms: &[usize], out: &Path, args: &[&str]) -> (i32, serde_json::Value, String) {
        self.trace_env(doms, out, args, &[])
    }

    fn trace_env(
        &self,
        doms: &[usize],
        out: &Path,
        args: &[&str],
        env: &[(&str, &Path)],
    ) -> (i32, serde_json::Value, String) {
        let mut all = vec!["--json", "trace"];
        for &d in doms {
            all.push(&self.vms[d].name);
        }
        let out_s = out.to_str().unwrap();
        all.extend_from_slice(&["-o", out_s]);
        all.extend_from_slice(args);
        let res = self.tvctl_env(&all, env);
        let json = serde_json::from_slice(&res.stdout).unwrap_or(serde_json::Value::Null);
        (res.status.code().unwrap_or(-1), json, text(&res))
    }

    fn consoles(&self) -> String {
        self.vms.iter().map(TestVm::console_report).collect()
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

fn lab() -> std::sync::MutexGuard<'static, Lab> {
    use std::sync::{Mutex, OnceLock};
    static LAB: OnceLock<Mutex<Lab>> = OnceLock::new();
    let m = LAB.get_or_init(|| {
        extern "C" fn cleanup() {
            if let Some(m) = LAB.get() {
                let lab = match m.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                for vm in &lab.vms {
                    vm.remove();
                }
                let _ = std::fs::remove_dir_all(&lab.root);
            }
        }
        // SAFETY: registering a plain extern "C" function with no arguments.
        unsafe { libc::atexit(cleanup) };
        Mutex::new(Lab::new())
    });
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// `trace-cmd report -i …` of `files` (host first).
fn report(files: &[PathBuf]) -> String {
    let mut cmd = Command::new("trace-cmd");
    cmd.arg("report");
    for f in files {
        cmd.arg("-i").arg(f);
    }
    let out = cmd
        .output()
        .expect("trace-cmd must be installed (scripts/install-deps.sh)");
    assert!(out.status.success(), "trace-cmd report: {}", text(&out));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Per chain nonce, the files its markers came from, in merged order.
fn chains(merged: &str) -> BTreeMap<String, Vec<String>> {
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in merged.lines() {
        let Some((_, rest)) = line.split_once("tvctl-sync ") else {
            continue;
        };
        let nonce = rest.trim().to_string();
        let file = line.split(':').next().unwrap().trim().to_string();
        chains.entry(nonce).or_default().push(file);
    }
    chains
}

/// Chains whose markers read host, guest, host, and those that do not (with their files). A
/// probe that timed out (a `virsh suspend` outlasted it) has no third marker: its chain is
/// judged on the two it has.
fn causal_order(merged: &str, host: &Path) -> (usize, Vec<Vec<String>>) {
    let host = host.file_name().unwrap().to_string_lossy().into_owned();
    let mut good = 0;
    let mut bad = Vec::new();
    for files in chains(merged).into_values() {
        let ok = match files.len() {
            3 => files[0] == host && files[2] == host && files[1] != host,
            2 => files[0] == host && files[1] != host,
            _ => false,
        };
        if ok {
            good += 1;
        } else {
            bad.push(files);
        }
    }
    (good, bad)
}

fn files_of(summary: &serde_json::Value) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(h) = summary["host"].as_object() {
        files.push(PathBuf::from(h["output"].as_str().unwrap()));
    }
    for g in summary["guests"].as_array().unwrap() {
        files.push(PathBuf::from(g["output"].as_str().unwrap()));
    }
    files
}

#[test]
fn host_and_guest_chains_are_all_in_causal_order_and_sync_none_breaks_them() {
    let lab = lab();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace.dat");

    let (code, summary, log) = lab.trace(&[0], &out, &["--host", "-e", "sched", "--duration", "3"]);

    assert_eq!(code, 0, "{log}\n{}", lab.consoles());
    let files = files_of(&summary);
    assert_eq!(
        files,
        [
            out.clone(),
            dir.path()
                .join("trace-".to_string() + &lab.vms[0].name + ".dat")
        ]
    );
    let merged = report(&files);
    let (good, bad) = causal_order(&merged, &out);
    assert!(good >= 200, "only {good} chains\n{log}");
    assert!(bad.is_empty(), "chains out of causal order: {bad:?}\n{log}");
    let sync = &summary["guests"][0]["sync"];
    assert_eq!(sync["method"], "probe", "{log}");
    let bound = sync["bound_ns"].as_u64().unwrap();
    assert!(bound < 5_000_000, "bound {bound} ns\n{log}");
    assert!(summary["host"]["total_events"].as_u64().unwrap() > 0);
    assert!(merged
        .lines()
        .any(|l| l.contains("sched_switch") && l.starts_with("trace-")));

    // Without correction the guest's TSC (host TSC plus QEMU's offset) is out of place.
    let none = dir.path().join("none.dat");
    let (code, summary, log) = lab.trace(
        &[0],
        &none,
        &[
            "--host",
            "-e",
            "sched",
            "--duration",
            "2",
            "--sync",
            "none",
            "--",
            "sh",
            "-c",
            "echo timeline-out; echo timeline-err >&2; sleep 5",
        ],
    );
    assert_eq!(code, 0, "{log}");
    // The guest command's output, in a run with the host too: stderr relayed as it came,
    // stdout (tvctl's stdout is the JSON) in the guest's summary.
    assert!(log.contains("timeline-err\n"), "{log}");
    assert_eq!(summary["guests"][0]["command"]["stdout"], "timeline-out\n");
    let (good, bad) = causal_order(&report(&files_of(&summary)), &none);
    assert!(
        !bad.is_empty(),
        "--sync none kept all {good} chains in order: the check cannot fail"
    );
}

#[test]
fn two_guests_and_the_host_give_three_files_that_trace_cmd_merges() {
    let lab = lab();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run.dat");

    let (code, summary, log) = lab.trace(
        &[0, 1],
        &out,
        &["--host", "-e", "sched:sched_switch", "--duration", "3"],
    );

    assert_eq!(code, 0, "{log}\n{}", lab.consoles());
    let files = files_of(&summary);
    assert_eq!(files.len(), 3, "{log}");
    for f in &files {
        assert!(f.exists(), "{} missing", f.display());
    }
    let guests = summary["guests"].as_array().unwrap();
    assert_eq!(guests[0]["cpus"].as_array().unwrap().len(), 2);
    assert_eq!(guests[1]["cpus"].as_array().unwrap().len(), 3);
    let merged = report(&files);
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            merged
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{name}:"))
                    && l.contains("sched_switch")),
            "no events of {name} in the merged report"
        );
    }
    let (good, bad) = causal_order(&merged, &out);
    assert!(good >= 400, "{good} chains for two guests\n{log}");
    assert!(bad.is_empty(), "chains out of causal order: {bad:?}\n{log}");
    let command = summary["report_command"].as_str().unwrap();
    assert!(command.starts_with(&format!("trace-cmd report -i {}", out.display())));
}

#[test]
fn suspend_and_resume_mid_trace_start_a_new_segment_and_keep_every_chain_in_order() {
    let lab = lab();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("susp.dat");
    let name = lab.vms[0].name.clone();
    // Booted by the trace if it is off; the suspend comes once the recording runs.
    let virsh = |verb: &str| {
        let o = Command::new("virsh")
            .args(["-c", common::URI, verb, &name])
            .output()
            .expect("virsh");
        assert!(o.status.success(), "virsh {verb}: {}", text(&o));
    };
    let before = lab.vms[0].console_count("tvctl-agent: recording ");
    let root = lab.root.clone();
    let out_s = out.clone();
    let name_s = name.clone();
    let child = std::thread::spawn(move || {
        Command::new(env!("CARGO_BIN_EXE_tvctl"))
            .arg("--dir")
            .arg(&root)
            .args([
                "--json",
                "trace",
                &name_s,
                "--host",
                "-e",
                "sched",
                "--duration",
                "8",
                "-o",
            ])
            .arg(&out_s)
            .output()
            .expect("run tvctl")
    });
    lab.vms[0].wait_console_count("tvctl-agent: recording ", before, common::boot_timeout());
    std::thread::sleep(Duration::from_secs(2));
    virsh("suspend");
    std::thread::sleep(Duration::from_secs(2));
    virsh("resume");
    let res = child.join().unwrap();

    let log = text(&res);
    assert_eq!(res.status.code(), Some(0), "{log}\n{}", lab.consoles());
    let summary: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    let segments = summary["guests"][0]["sync"]["segments"].as_array().unwrap();
    assert_eq!(
        segments.len(),
        2,
        "the resume must start a second segment\n{log}"
    );
    let (good, bad) = causal_order(&report(&files_of(&summary)), &out);
    assert!(good >= 200, "{log}");
    assert!(
        bad.is_empty(),
        "chains out of causal order: {bad:?}
{log}"
    );
}

/// Boots `vm` if it is off and makes what KVM would show for it under `dir/debugfs`:
/// `kvm/<qemu pid>-<vm fd>/vcpuN/tsc-offset` (guest = host + offset), one per `offsets`.
/// Returns the debugfs root and the vCPU directories.
fn synthetic_kvm_debugfs(vm: &TestVm, dir: &Path, offsets: &[i64]) -> (PathBuf, Vec<PathBuf>) {
    if !vm.dom.is_active().unwrap() {
        vm.start();
        vm.wait_console_line("tvctl-agent: ready", common::boot_timeout());
    }
    let pid = vm.dom.qemu_pid().expect("QEMU pid of a running domain");
    let debugfs = dir.join("debugfs");
    let mut vcpus = Vec::new();
    for (n, off) in offsets.iter().enumerate() {
        let vcpu = debugfs.join(format!("kvm/{pid}-11/vcpu{n}"));
        std::fs::create_dir_all(&vcpu).unwrap();
        std::fs::write(vcpu.join("tsc-offset"), format!("{off}\n")).unwrap();
        vcpus.push(vcpu);
    }
    (debugfs, vcpus)
}

#[test]
fn kvm_method_writes_the_offsets_of_a_synthetic_debugfs_tree() {
    let lab = lab();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kvm.dat");
    let vm = &lab.vms[1];
    let offsets: [i64; 3] = [-1_234_567_890, -1_234_567_891, -1_234_567_892];
    let (debugfs, _) = synthetic_kvm_debugfs(vm, dir.path(), &offsets);

    let (code, summary, log) = lab.trace_env(
        &[1],
        &out,
        &[
            "--host",
            "-e",
            "sched:sched_switch",
            "--duration",
            "1",
            "--sync",
            "kvm",
        ],
        &[("TVCTL_TEST_DEBUGFS", &debugfs)],
    );

    assert_eq!(code, 0, "{log}");
    assert_eq!(summary["guests"][0]["sync"]["method"], "kvm", "{log}");
    let guest_file = PathBuf::from(summary["guests"][0]["output"].as_str().unwrap());
    let file = tvctl::tracedat::TraceDatFile::open(&guest_file).unwrap();
    let shift = file
        .meta()
        .time_shift
        .clone()
        .expect("TIME_SHIFT in the guest file");
    let written: Vec<Vec<i64>> = shift
        .cpus()
        .iter()
        .map(|samples| samples.iter().map(|s| s.offset).collect())
        .collect();
    assert_eq!(
        written,
        offsets.iter().map(|o| vec![-o]).collect::<Vec<_>>(),
        "TIME_SHIFT must hold host = guest − tsc-offset per vCPU"
    );
    let host = tvctl::tracedat::TraceDatFile::open(&out).unwrap();
    let guests = &host.meta().guests;
    assert_eq!(guests.len(), 1);
    assert_eq!(guests[0].name(), vm.name);
    assert_eq!(guests[0].vcpu_tids().len(), 3);
    assert!(
        guests[0].vcpu_tids().iter().all(|&t| t != u32::MAX),
        "every vCPU's QEMU thread found: {:?}",
        guests[0].vcpu_tids()
    );
}

#[test]
fn kvm_method_notes_an_offset_that_moved_during_the_recording() {
    let lab = lab();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("moved.dat");
    let vm = &lab.vms[1];
    let (debugfs, vcpu_dirs) = synthetic_kvm_debugfs(vm, dir.path(), &[-1000, -1000, -1000]);
    let moved = vcpu_dirs[2].join("tsc-offset");
    // Its access time in the past: tvctl's first read (at the start) moves it to now.
    let epoch = nix::sys::time::TimeSpec::new(0, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &moved,
        &epoch,
        &nix::sys::time::TimeSpec::UTIME_OMIT,
        nix::sys::stat::UtimensatFlags::FollowSymlink,
    )
    .unwrap();
    let before = vm.console_count("tvctl-agent: recording ");
    let (root, out_s, name, fs) = (
        lab.root.clone(),
        out.clone(),
        vm.name.clone(),
        debugfs.clone(),
    );
    let child = std::thread::spawn(move || {
        Command::new(env!("CARGO_BIN_EXE_tvctl"))
            .arg("--dir")
            .arg(&root)
            .args([
                "--json",
                "trace",
                &name,
                "--host",
                "-e",
                "sched:sched_switch",
            ])
            .args(["--duration", "4", "--sync", "kvm", "-o"])
            .arg(&out_s)
            .env("TVCTL_TEST_DEBUGFS", &fs)
            .output()
            .expect("run tvctl")
    });

    vm.wait_console_count("tvctl-agent: recording ", before, common::boot_timeout());
    // Change the offset once tvctl has read it at the start (however busy the machine is).
    let read_at_start = std::time::Instant::now();
    while std::fs::metadata(&moved).unwrap().accessed().unwrap() <= std::time::UNIX_EPOCH {
        assert!(
            read_at_start.elapsed() < Duration::from_secs(60),
            "tvctl never read {}",
            moved.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&moved, "-5000\n").unwrap();
    let res = child.join().unwrap();

    let log = text(&res);
    assert_eq!(res.status.code(), Some(0), "{log}");
    let summary: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    let notes = summary["guests"][0]["notes"].to_string();
    assert!(
        notes.contains("changed during the recording") && notes.contains("[2]"),
        "{log}"
    );
}

#[test]
fn a_clock_user_space_cannot_read_is_refused_for_several_files_naming_those_that_work() {
    let lab = lab();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("local.dat");

    let (code, _, log) = lab.trace(&[0, 1], &out, &["-e", "sched", "-C", "local"]);

    assert_eq!(code, 2, "{log}");
    assert!(log.contains("x86-tsc") && log.contains("mono"), "{log}");
    assert!(
        !out.exists() && !guest_file_exists(dir.path()),
        "nothing may be written"
    );
}

fn guest_file_exists(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with(".dat"))
}
