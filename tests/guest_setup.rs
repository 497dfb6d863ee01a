//! Guest tier: `tvctl setup` on the built-in guest, then the guest boots through libvirt and,
//! seen from inside, has every port tvctl named; while it runs, QEMU owns the FIFOs. Also the
//! running-domain cases: `--live` hot-plugs (and teardown unplugs), without `--live` the
//! change waits for the next boot, and a hot-plug that fails half-way undoes everything.
//! Needs root, a running libvirtd and the guest image (scripts/build-guest.sh); fails loudly
//! without them.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{expect_code, json, with_devices, TestVm, URI};
use tvctl::domxml;
use tvctl::exitcode::ExitCode;

fn run(root: &Path, args: &[&str]) -> Output {
    assert_cmd::Command::new(env!("CARGO_BIN_EXE_tvctl"))
        .arg("-c")
        .arg(URI)
        .arg("--dir")
        .arg(root)
        .args(args)
        .output()
        .expect("run tvctl")
}

fn root_of(vm: &TestVm) -> PathBuf {
    vm.dir.join("t")
}

fn folder_of(vm: &TestVm) -> PathBuf {
    root_of(vm).join(&vm.name)
}

fn fifos(vm: &TestVm, vcpus: u32) -> Vec<PathBuf> {
    let folder = folder_of(vm);
    (0..vcpus)
        .flat_map(|cpu| ["in", "out"].map(|end| folder.join(format!("trace-path-cpu{cpu}.{end}"))))
        .collect()
}

fn owner(path: &Path) -> (u32, u32) {
    let meta = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.uid(), meta.gid())
}

fn live_names(vm: &TestVm) -> Vec<String> {
    let xml = vm.dom.live_xml().expect("live XML");
    domxml::our_channels(&xml)
        .unwrap()
        .into_iter()
        .map(|ch| ch.target_name)
        .collect()
}

fn stop(vm: &TestVm) {
    vm.dom.destroy().expect("destroy the guest");
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.dom.is_active().unwrap_or(false) {
        assert!(Instant::now() < deadline, "{} did not stop", vm.name);
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn guest_sees_every_channel_after_setup_and_qemu_owns_the_fifos_while_running() {
    // Arrange
    let vm = TestVm::define("boot", 2, |xml, _| xml.to_owned());
    let root = root_of(&vm);
    let before = vm.dom.inactive_xml().unwrap();
    let (qemu_uid, qemu_gid) = vm.hv.qemu_dac_label().unwrap().expect("DAC label");
    expect_code(&run(&root, &["setup", &vm.name]), ExitCode::Ok);

    // Act
    vm.start();
    let report = vm.wait_report();

    // Assert: the guest sees every port by name.
    vm.assert_ports(
        &report,
        &["agent-ctl-path", "trace-path-cpu0", "trace-path-cpu1"],
    );
    // While it runs, QEMU owns the FIFOs and libvirt made the control socket.
    for fifo in fifos(&vm, 2) {
        assert_eq!(owner(&fifo), (qemu_uid, qemu_gid), "{}", fifo.display());
    }
    let socket = folder_of(&vm).join("agent-ctl-path.sock");
    assert!(fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_socket());
    let status = json(&expect_code(
        &run(&root, &["--json", "status", &vm.name]),
        ExitCode::Ok,
    ));
    let entry = &status["domains"][0];
    assert_eq!(entry["state"], "running");
    assert_eq!(entry["live_channels"], 3);
    assert_eq!(entry["control_socket"], true);
    assert_eq!(entry["files"]["fifos_ok"], 4, "{entry}");
    // A second setup while it runs changes nothing, QEMU's ownership included.
    let again = json(&expect_code(
        &run(&root, &["--json", "setup", &vm.name]),
        ExitCode::Ok,
    ));
    assert_eq!(again["changed"], false);

    // Assert: after shutdown libvirt hands the FIFOs back, and teardown restores the XML.
    stop(&vm);
    for fifo in fifos(&vm, 2) {
        assert_eq!(owner(&fifo), (0, qemu_gid), "{}", fifo.display());
    }
    expect_code(&run(&root, &["teardown", &vm.name]), ExitCode::Ok);
    assert_eq!(vm.dom.inactive_xml().unwrap(), before);
    assert!(!folder_of(&vm).exists());
}

#[test]
fn teardown_of_a_running_domain_unplugs_our_channels() {
    // Arrange: a guest booted with our channels.
    let vm = TestVm::define("td-live", 2, |xml, _| xml.to_owned());
    let root = root_of(&vm);
    let before = vm.dom.inactive_xml().unwrap();
    expect_code(&run(&root, &["setup", &vm.name]), ExitCode::Ok);
    vm.start();
    vm.wait_report();
    let names = ["agent-ctl-path", "trace-path-cpu0", "trace-path-cpu1"];
    assert_eq!(live_names(&vm), names);

    // Act
    let teardown = json(&expect_code(
        &run(&root, &["--json", "teardown", &vm.name]),
        ExitCode::Ok,
    ));

    // Assert
    assert_eq!(teardown["live"]["detached"], serde_json::json!(names));
    assert_eq!(live_names(&vm), Vec::<String>::new());
    assert_eq!(vm.dom.inactive_xml().unwrap(), before);
    assert!(!folder_of(&vm).exists());
}

#[test]
fn setup_live_hot_plugs_into_a_running_domain_or_refuses_without_change() {
    // Arrange: a running guest with a virtio-serial controller (libvirt cannot hot-plug one).
    let vm = TestVm::define("live", 2, |xml, _| {
        with_devices(xml, "    <controller type='virtio-serial' index='0'/>")
    });
    let root = root_of(&vm);
    let before = vm.dom.inactive_xml().unwrap();
    vm.start();
    vm.wait_report();

    // Act
    let out = run(&root, &["--json", "setup", "--live", &vm.name]);

    // Assert: libvirt 9.0 cannot hot-plug pipe chardevs; newer ones may.
    let names = ["agent-ctl-path", "trace-path-cpu0", "trace-path-cpu1"];
    if out.status.code() == Some(i32::from(ExitCode::DomainXmlConflict.code())) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("this libvirt cannot hot-plug pipe channels: {stderr}");
        assert!(stderr.contains("run setup without --live"), "{stderr}");
        assert!(stderr.contains("every change was undone"), "{stderr}");
        assert_eq!(vm.dom.inactive_xml().unwrap(), before);
        assert_eq!(live_names(&vm), Vec::<String>::new());
        assert!(!folder_of(&vm).exists());
        return;
    }
    let setup = json(&expect_code(&out, ExitCode::Ok));
    assert_eq!(setup["live"]["attached"], serde_json::json!(names));
    assert_eq!(setup["restart_needed"], false);
    assert_eq!(live_names(&vm), names);
}

#[test]
fn running_domain_without_live_gets_the_channels_at_its_next_boot() {
    // Arrange
    let vm = TestVm::define("next-boot", 1, |xml, _| xml.to_owned());
    let root = root_of(&vm);
    vm.start();

    // Act
    let out = expect_code(&run(&root, &["setup", &vm.name]), ExitCode::Ok);

    // Assert: configuration changed, the running domain did not, and status says so.
    assert!(out.contains("take effect at its next boot"), "{out}");
    assert_eq!(live_names(&vm), Vec::<String>::new());
    let inactive = vm.dom.inactive_xml().unwrap();
    assert_eq!(domxml::our_channels(&inactive).unwrap().len(), 2);
    let status = run(&root, &["status", &vm.name]);
    let text = expect_code(&status, ExitCode::NotSetUp);
    assert!(text.contains("restart it"), "{text}");
    let again = expect_code(&run(&root, &["setup", &vm.name]), ExitCode::Ok);
    assert!(again.contains("nothing changed"), "{again}");
    assert!(again.contains("take effect at its next boot"), "{again}");
}

#[test]
fn live_setup_without_a_virtio_serial_controller_exits_6_and_changes_nothing() {
    // Arrange: the built-in guest has no virtio-serial controller.
    let vm = TestVm::define("no-ctl", 1, |xml, _| xml.to_owned());
    let root = root_of(&vm);
    let before = vm.dom.inactive_xml().unwrap();
    vm.start();

    // Act
    let out = run(&root, &["setup", "--live", &vm.name]);

    // Assert
    expect_code(&out, ExitCode::DomainXmlConflict);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot hot-plug one"), "{stderr}");
    assert_eq!(vm.dom.inactive_xml().unwrap(), before);
    assert!(!root.exists());
}

#[test]
fn hot_plug_failing_half_way_undoes_every_change() {
    // Arrange: the running domain's controller has one free port, so at most the control
    // channel goes in before a vCPU channel fails (for want of a port, or because libvirt
    // cannot hot-plug pipes at all).
    let vm = TestVm::define("rollback", 2, |xml, _| {
        with_devices(
            xml,
            "    <controller type='virtio-serial' index='0' ports='2'/>",
        )
    });
    let root = root_of(&vm);
    let before = vm.dom.inactive_xml().unwrap();
    vm.start();
    vm.wait_report();

    // Act
    let out = run(&root, &["setup", "--live", &vm.name]);

    // Assert: it failed after defining the XML and plugging the control channel in, and the
    // XML, the running domain and the files (the socket libvirt made included) are as before.
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("hot-plugging channels into the running domain failed"),
        "{stderr}"
    );
    assert!(stderr.contains("every change was undone"), "{stderr}");
    assert_eq!(vm.dom.inactive_xml().unwrap(), before);
    assert_eq!(live_names(&vm), Vec::<String>::new());
    assert!(!folder_of(&vm).exists(), "{stderr}");
}

#[test]
fn trace_setup_says_what_it_changed_even_when_the_trace_cannot_start() {
    // Arrange: a running domain without our channels; setup can only change its configuration.
    let vm = TestVm::define("ts-run", 1, |xml, _| xml.to_owned());
    let root = root_of(&vm);
    vm.start();

    // Act
    let out = run(
        &root,
        &[
            "trace",
            &vm.name,
            "--setup",
            "-e",
            "sched",
            "--duration",
            "1",
        ],
    );

    // Assert: the trace stops (restart needed), but stderr tells what setup changed.
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(i32::from(ExitCode::NotSetUp.code())),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("setup {} (", vm.name)), "{stderr}");
    assert!(
        stderr.contains("added channels agent-ctl-path, trace-path-cpu0"),
        "{stderr}"
    );
    assert!(stderr.contains("restart it"), "{stderr}");
    let inactive = vm.dom.inactive_xml().unwrap();
    assert_eq!(domxml::our_channels(&inactive).unwrap().len(), 2);
}

#[test]
fn trace_setup_puts_the_change_in_the_json_summary() {
    // Arrange: a domain that is off and not set up.
    let vm = TestVm::define("ts-json", 1, |xml, _| xml.to_owned());
    let root = root_of(&vm);
    let out_file = vm.dir.join("setup.dat");

    let trace_with_setup = || {
        run(
            &root,
            &[
                "--json",
                "trace",
                &vm.name,
                "--setup",
                "-e",
                "sched:sched_switch",
                "--duration",
                "1",
                "-o",
                out_file.to_str().unwrap(),
            ],
        )
    };

    // Act: --setup, then the trace boots the domain.
    let out = trace_with_setup();

    // Assert
    let summary = json(&expect_code(&out, ExitCode::Ok));
    assert_eq!(summary["setup"]["command"], "setup");
    assert_eq!(
        summary["setup"]["channels"]["added"],
        serde_json::json!(["agent-ctl-path", "trace-path-cpu0"])
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("added channels"),
        "{out:?}"
    );
    // A second run has nothing to set up: null.
    let again = trace_with_setup();
    let summary = json(&expect_code(&again, ExitCode::Ok));
    assert_eq!(summary["setup"], serde_json::Value::Null);
}
