//! Debian guest tier: a real Debian 12 (systemd, udev, the cloud kernel, qemu-guest-agent; no
//! tvctl inside) reached only through qemu-ga, as tvctl's `agent install` will reach it.
//! The image comes from scripts/build-debian-guest.sh; each test's guest boots on an overlay
//! of its own (tests/common/debian.rs).

mod common;

use common::debian::DebianVm;
use serde_json::json;

#[test]
fn debian_guest_answers_qemu_ga_and_exposes_tracefs_through_guest_exec() {
    // Arrange
    let vm = DebianVm::define("debian", 2, |xml, _| xml.to_string());
    vm.start();

    // Act
    let waited = vm.wait_qga(common::boot_timeout());
    eprintln!("{}: qemu-ga answered {waited:?} after start", vm.name);
    let info = vm.qga_ok(&json!({"execute": "guest-info"}));
    let clock = vm.qga_exec(&["/bin/cat", "/sys/kernel/tracing/trace_clock"]);
    let every_byte: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let echoed = vm.qga_exec_input(&["/bin/cat"], &every_byte);

    // Assert: what `tvctl agent install` will use is there and enabled.
    let commands = info["supported_commands"]
        .as_array()
        .unwrap_or_else(|| panic!("guest-info lists no commands: {info}"));
    for needed in [
        "guest-file-open",
        "guest-file-write",
        "guest-file-read",
        "guest-file-close",
        "guest-exec",
        "guest-exec-status",
    ] {
        let entry = commands.iter().find(|c| c["name"] == needed);
        assert!(
            entry.is_some_and(|c| c["enabled"] == true),
            "qemu-ga {} lacks or disables {needed}: {entry:?}",
            info["version"]
        );
    }
    // tracefs is mounted (by systemd's sys-kernel-tracing.mount) and names one clock in use.
    assert_eq!(
        clock.code,
        Some(0),
        "cat trace_clock: {}",
        clock.stderr_text()
    );
    let text = clock.stdout_text();
    let chosen: Vec<&str> = text
        .split_whitespace()
        .filter(|w| w.starts_with('[') && w.ends_with(']') && w.len() > 2)
        .collect();
    assert_eq!(
        chosen.len(),
        1,
        "trace_clock should mark one clock: {text:?}"
    );
    eprintln!("{}: trace_clock {}", vm.name, text.trim());
    // guest-exec carries bytes whole both ways (base64 in the JSON).
    assert_eq!(echoed.code, Some(0), "cat: {}", echoed.stderr_text());
    assert_eq!(echoed.stdout, every_byte);
}

/// Runs the real tvctl with `--dir root`.
fn tvctl(root: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tvctl"))
        .arg("--dir")
        .arg(root)
        .args(args)
        .output()
        .expect("run tvctl")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The static agent scripts/build-guest.sh builds (the guest tier runs after it).
fn static_agent() -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/x86_64-unknown-linux-gnu/release/tvctl-agent");
    assert!(
        p.exists(),
        "{} is missing: run scripts/build-guest.sh (it builds the static agent)",
        p.display()
    );
    p
}

/// The path for a new user: a fresh Debian guest with qemu-ga and no tvctl-agent →
/// `tvctl agent install` → traces; the agent comes back after a reboot; the default clock is
/// the guest kernel's; a guest command's output reaches the host.
#[test]
fn agent_install_through_qemu_ga_then_trace_reboot_clock_and_command_output() {
    // Arrange: set up while off (libvirt 9.0 cannot hot-plug the channels), then boot.
    let vm = DebianVm::define("deb-install", 2, |xml, _| xml.to_string());
    let root = common::lab_root().join(format!("{}-root", vm.name));
    let _cleanup = RemoveOnDrop(root.clone());
    let setup = tvctl(&root, &["setup", &vm.name]);
    assert!(setup.status.success(), "setup: {}", text(&setup));
    vm.start();
    vm.wait_qga(common::boot_timeout());
    let before = vm.qga_exec(&["/bin/sh", "-c", "command -v tvctl-agent || echo none"]);
    assert_eq!(
        before.stdout_text().trim(),
        "none",
        "the image must not hold the agent"
    );
    let agent_port = || {
        let st = tvctl(&root, &["--json", "status", &vm.name]);
        let v: serde_json::Value = serde_json::from_slice(&st.stdout)
            .unwrap_or_else(|e| panic!("status: {e}: {}", text(&st)));
        v["domains"][0]["agent_port"].clone()
    };
    assert_eq!(agent_port(), "disconnected", "no agent yet");

    // A binary for another architecture is refused before anything is written (exit 17).
    let foreign = tempfile::tempdir().unwrap();
    let fake = foreign.path().join("tvctl-agent-aarch64");
    let mut elf = vec![0u8; 64];
    elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
    elf[16] = 2; // ET_EXEC
    elf[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64, no program headers
    std::fs::write(&fake, &elf).unwrap();
    let refused = tvctl(
        &root,
        &[
            "agent",
            "install",
            &vm.name,
            "--agent-binary",
            fake.to_str().unwrap(),
        ],
    );
    assert_eq!(refused.status.code(), Some(17), "{}", text(&refused));
    assert!(
        text(&refused).contains("the guest is x86_64, but"),
        "{}",
        text(&refused)
    );

    // `tvctl --json agent install DOMAIN FROM FILE`, which must succeed; its report.
    let install = |from: &str, file: &std::path::Path| {
        let out = tvctl(
            &root,
            &[
                "--json",
                "agent",
                "install",
                &vm.name,
                from,
                file.to_str().unwrap(),
                "--agent-timeout",
                "60",
            ],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}\n{}",
            text(&out),
            vm.console_report()
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };

    // Act 1: install.
    let report = install("--agent-binary", &static_agent());
    assert_eq!(report["init"], "systemd", "{report}");
    assert_eq!(report["answered"], true, "{report}");
    assert_eq!(report["guest_arch"], "x86_64");
    assert_eq!(agent_port(), "connected", "the agent has the port open");
    assert!(
        report["agent_version"]
            .as_str()
            .unwrap()
            .contains(env!("CARGO_PKG_VERSION")),
        "{report}"
    );

    // Act 2: a trace, as the issue says.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("deb.dat");
    let trace = |args: &[&str]| {
        let mut all = vec!["trace", vm.name.as_str(), "-o", out.to_str().unwrap()];
        all.extend_from_slice(args);
        tvctl(&root, &all)
    };
    let t = trace(&["--json", "-e", "sched", "--duration", "3"]);
    assert_eq!(
        t.status.code(),
        Some(0),
        "{}\n{}",
        text(&t),
        vm.console_report()
    );
    let summary: serde_json::Value = serde_json::from_slice(&t.stdout).unwrap();
    assert!(summary["total_events"].as_u64().unwrap() > 0, "{summary}");

    // The default clock is the one the guest kernel chose at the top level.
    let top = vm.qga_exec(&["/bin/cat", "/sys/kernel/tracing/trace_clock"]);
    let top = top.stdout_text();
    let chosen = top
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .unwrap_or_else(|| panic!("no [clock] in {top:?}"));
    assert_eq!(summary["clock"], chosen, "{summary}");
    assert_eq!(summary["clock_source"], "guest-default");

    // A command's output comes to the host; its status is in the summary.
    let t = trace(&[
        "-e",
        "sched:sched_switch",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    let log = text(&t);
    assert_eq!(t.status.code(), Some(0), "{log}");
    let stdout = String::from_utf8_lossy(&t.stdout);
    assert!(stdout.starts_with("out\n"), "{log}");
    assert!(
        String::from_utf8_lossy(&t.stderr).contains("err\n"),
        "{log}"
    );
    assert!(stdout.contains("exited with 3"), "{log}");

    // Act 3: status, then a reboot: the enabled unit brings the agent back.
    let status = tvctl(&root, &["--json", "agent", "status", &vm.name]);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(st["running"], true, "{st}");
    assert_eq!(st["service"], "active", "{st}");
    assert_eq!(st["enabled"], "enabled", "{st}");
    assert!(
        st["last_session"]["host"]
            .as_str()
            .unwrap()
            .contains("trace"),
        "{st}"
    );

    let boots = vm.console().matches("Welcome to Debian").count();
    let reboot = std::process::Command::new("virsh")
        .args(["-c", common::URI, "reboot", &vm.name])
        .output()
        .unwrap();
    assert!(reboot.status.success(), "virsh reboot: {}", text(&reboot));
    let start = std::time::Instant::now();
    while vm.console().matches("Welcome to Debian").count() == boots {
        assert!(
            start.elapsed() < common::boot_timeout(),
            "the guest did not reboot\n{}",
            vm.console_report()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let t = trace(&["--json", "-e", "sched:sched_switch", "--duration", "2"]);
    assert_eq!(
        t.status.code(),
        Some(0),
        "after reboot: {}\n{}",
        text(&t),
        vm.console_report()
    );

    // Act 4: the tvctl-agent package replaces the binary install (dpkg -i in the guest).
    let report = install("--package", &agent_deb());
    assert_eq!(report["installed_from"], "package", "{report}");
    assert_eq!(report["path"], "/usr/sbin/tvctl-agent", "{report}");
    assert_eq!(report["answered"], true, "{report}");
    let dpkg = vm.qga_exec(&[
        "/bin/sh",
        "-c",
        "dpkg-query -W -f '${Status}' tvctl-agent; echo; systemctl is-enabled tvctl-agent; \
         test -e /usr/local/bin/tvctl-agent && echo stale || echo retired",
    ]);
    assert_eq!(
        dpkg.stdout_text(),
        "install ok installed\nenabled\nretired\n",
        "{}",
        dpkg.stderr_text()
    );
    let t = trace(&["--json", "-e", "sched:sched_switch", "--duration", "2"]);
    assert_eq!(t.status.code(), Some(0), "with the package: {}", text(&t));
    let status = tvctl(&root, &["--json", "agent", "status", &vm.name]);
    let st: serde_json::Value = serde_json::from_slice(&status.stdout)
        .unwrap_or_else(|e| panic!("agent status: {e}: {}", text(&status)));
    assert_eq!(st["path"], "/usr/sbin/tvctl-agent", "{st}");
    assert_eq!(st["running"], true, "{st}");
}

/// The tvctl-agent package, as scripts/build-deb.sh builds it (quick when it is current).
fn agent_deb() -> std::path::PathBuf {
    let top = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(top.join("scripts/build-deb.sh"))
        .current_dir(top)
        .output()
        .expect("run scripts/build-deb.sh");
    assert!(out.status.success(), "scripts/build-deb.sh: {}", text(&out));
    let deb = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| top.join("target"), std::path::PathBuf::from)
        .join(format!(
            "debian/tvctl-agent_{}_amd64.deb",
            env!("CARGO_PKG_VERSION")
        ));
    assert!(deb.is_file(), "no {}", deb.display());
    deb
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
