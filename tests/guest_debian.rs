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
