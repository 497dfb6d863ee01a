//! Guest tier: the built-in guest boots through the libvirt API and, seen from inside, has
//! tracefs mounted and every virtio-serial port that its domain XML names.

mod common;

use common::{with_devices, TestVm};

#[test]
fn built_in_guest_sees_tracefs_and_every_named_port() {
    // Arrange: two pipe channels and a bind-mode unix channel, named as tvctl names them.
    let vm = TestVm::define("boot", 2, |xml, dir| {
        for cpu in 0..2 {
            for end in ["in", "out"] {
                let p = dir.join(format!("trace-path-cpu{cpu}.{end}"));
                nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o666))
                    .expect("mkfifo");
            }
        }
        let d = dir.display();
        with_devices(
            xml,
            &format!(
                "    <channel type='unix'><source mode='bind' path='{d}/agent-ctl-path.sock'/><target type='virtio' name='agent-ctl-path'/></channel>\n\
                 <channel type='pipe'><source path='{d}/trace-path-cpu0'/><target type='virtio' name='trace-path-cpu0'/></channel>\n\
                 <channel type='pipe'><source path='{d}/trace-path-cpu1'/><target type='virtio' name='trace-path-cpu1'/></channel>"
            ),
        )
    });

    // Act
    vm.start();
    let report = vm.wait_report();

    // Assert
    assert_eq!(
        report["tracefs"],
        "/sys/kernel/tracing",
        "{}",
        vm.console_report()
    );
    assert_eq!(report["cpus"], 2);
    vm.assert_ports(
        &report,
        &["agent-ctl-path", "trace-path-cpu0", "trace-path-cpu1"],
    );
}

#[test]
fn the_agent_in_the_guest_image_is_a_static_executable() {
    // scripts/build-guest.sh builds it here and packs it into the guest's initramfs.
    let agent = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/x86_64-unknown-linux-gnu/release/tvctl-agent"
    );
    assert!(
        std::path::Path::new(agent).exists(),
        "{agent} missing: run scripts/build-guest.sh"
    );
    let out = std::process::Command::new("ldd")
        .arg(agent)
        .env("LC_ALL", "C")
        .output()
        .expect("ldd");
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("not a dynamic executable"),
        "ldd says: {said}"
    );
}
