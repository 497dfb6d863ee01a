//! Host tier against the real libvirtd: `tvctl setup`, `teardown` and `status` on domains
//! defined from the built-in guest's XML but never started. Each test has its own domain
//! (unique name) and its own `--dir` under /var/lib/tvctl-lab/<domain>/, both removed by
//! `TestVm`'s drop, also on panic. The CLI is run as the real binary for exit codes and
//! messages; the library and libvirt's own XML are used for finer checks. Needs root and a
//! running libvirtd, and fails loudly without them.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{expect_code, json, with_devices, TestVm, URI};
use tvctl::domxml::{self, ChannelKind};
use tvctl::exitcode::ExitCode;

/// The real `tvctl` binary, pointed at the system libvirtd and at `root` as `--dir`.
fn tvctl(root: &Path) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::new(env!("CARGO_BIN_EXE_tvctl"));
    cmd.arg("-c").arg(URI).arg("--dir").arg(root);
    cmd
}

fn run(root: &Path, args: &[&str]) -> Output {
    tvctl(root).args(args).output().expect("run tvctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A test domain plus the `--dir` its test uses.
struct Lab {
    vm: TestVm,
    root: PathBuf,
}

impl Lab {
    /// `tag` stays short (10 bytes at most): the control socket's path, which holds the
    /// domain name twice, must fit the 107 bytes of a Unix socket address.
    fn new(tag: &str, vcpus: u32) -> Lab {
        Lab::with_xml(tag, vcpus, |xml, _| xml.to_owned())
    }

    fn with_xml(tag: &str, vcpus: u32, edit: impl FnOnce(&str, &Path) -> String) -> Lab {
        let vm = TestVm::define(tag, vcpus, edit);
        let root = vm.dir.join("t");
        Lab { vm, root }
    }

    fn name(&self) -> &str {
        &self.vm.name
    }

    fn folder(&self) -> PathBuf {
        self.root.join(&self.vm.name)
    }

    fn folder_str(&self) -> String {
        self.folder().to_str().expect("UTF-8 lab path").to_owned()
    }

    fn xml(&self) -> String {
        self.vm.dom.inactive_xml().expect("read inactive XML")
    }

    /// Redefines the domain with its XML changed by `edit`.
    fn redefine(&self, edit: impl FnOnce(&str) -> String) {
        let xml = edit(&self.xml());
        self.vm.hv.define(&xml).expect("redefine test domain");
    }

    /// Everything a change could touch: libvirt's XML and every path under the lab folder
    /// with type, mode, owner, inode and (for non-folders) modification time.
    fn snapshot(&self) -> (String, Vec<String>) {
        let mut files = Vec::new();
        let mut stack = vec![self.vm.dir.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                let mtime = if meta.is_dir() {
                    stack.push(path.clone());
                    0
                } else {
                    meta.mtime_nsec() + meta.mtime() * 1_000_000_000
                };
                files.push(format!(
                    "{} {:o} {}:{} ino={} mtime={mtime}",
                    path.display(),
                    meta.mode(),
                    meta.uid(),
                    meta.gid(),
                    meta.ino()
                ));
            }
        }
        files.sort();
        (self.xml(), files)
    }
}

fn qemu_label() -> (u32, u32) {
    common::hypervisor()
        .qemu_dac_label()
        .expect("read capabilities")
        .expect("libvirt reports a DAC label for QEMU")
}

fn mode_owner(path: &Path) -> (u32, u32, u32) {
    let meta = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.mode() & 0o7777, meta.uid(), meta.gid())
}

#[test]
fn setup_adds_our_channels_and_fifos_owned_by_qemus_group() {
    // Arrange
    let lab = Lab::new("setup", 2);
    let before = lab.xml();
    let (_, qemu_gid) = qemu_label();

    // Act
    let out = expect_code(
        &run(&lab.root, &["--json", "setup", lab.name()]),
        ExitCode::Ok,
    );

    // Assert: the XML libvirt returns holds exactly our channels, with our paths.
    let report = json(&out);
    let after = lab.xml();
    let dir = lab.folder_str();
    let ours = domxml::our_channels(&after).unwrap();
    let kinds: Vec<ChannelKind> = ours.iter().map(|ch| ch.kind).collect();
    assert_eq!(
        kinds,
        [
            ChannelKind::Control,
            ChannelKind::Cpu(0),
            ChannelKind::Cpu(1)
        ]
    );
    for ch in &ours {
        assert_eq!(ch.path.as_deref(), Some(ch.kind.source_path(&dir).as_str()));
        assert_eq!(ch.target_type.as_deref(), Some("virtio"));
    }
    assert_eq!(ours[0].channel_type.as_deref(), Some("unix"));
    assert_eq!(ours[0].source_mode.as_deref(), Some("bind"));
    assert_eq!(ours[1].channel_type.as_deref(), Some("pipe"));
    // libvirt added a virtio-serial controller for them, and nothing else changed.
    assert_eq!(domxml::virtio_serial_controllers(&after).unwrap(), [0]);
    let stripped = domxml::remove_ours(&after, &dir).unwrap().xml;
    let (stripped, _) = domxml::remove_virtio_serial_controllers(&stripped, &[0]).unwrap();
    assert_eq!(stripped, before);
    // The files, with their modes and QEMU's group.
    let folder = lab.folder();
    assert_eq!(mode_owner(&folder), (0o710, 0, qemu_gid));
    for cpu in 0..2 {
        for end in ["in", "out"] {
            let fifo = folder.join(format!("trace-path-cpu{cpu}.{end}"));
            assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
            assert_eq!(
                mode_owner(&fifo),
                (0o660, 0, qemu_gid),
                "{}",
                fifo.display()
            );
        }
    }
    // The report says so.
    assert_eq!(report["command"], "setup");
    assert_eq!(report["changed"], true);
    assert_eq!(report["vcpus"], 2);
    assert_eq!(report["group"]["gid"], qemu_gid);
    assert_eq!(report["controllers"], serde_json::json!([0]));
    assert_eq!(report["restart_needed"], false);
    assert_eq!(
        report["channels"]["added"],
        serde_json::json!(["agent-ctl-path", "trace-path-cpu0", "trace-path-cpu1"])
    );
}

#[test]
fn setup_twice_changes_nothing() {
    // Arrange
    let lab = Lab::new("twice", 2);
    expect_code(&run(&lab.root, &["setup", lab.name()]), ExitCode::Ok);
    let before = lab.snapshot();

    // Act
    let out = expect_code(&run(&lab.root, &["setup", lab.name()]), ExitCode::Ok);
    let json_out = expect_code(
        &run(&lab.root, &["--json", "setup", lab.name()]),
        ExitCode::Ok,
    );

    // Assert
    assert!(out.contains("nothing changed"), "{out}");
    assert_eq!(json(&json_out)["changed"], false);
    assert_eq!(lab.snapshot(), before);
}

#[test]
fn teardown_restores_the_xml_byte_for_byte_and_removes_the_files() {
    // Arrange
    let lab = Lab::new("teardown", 2);
    let before = lab.xml();
    expect_code(&run(&lab.root, &["setup", lab.name()]), ExitCode::Ok);

    // Act
    let out = expect_code(
        &run(&lab.root, &["--json", "teardown", lab.name()]),
        ExitCode::Ok,
    );

    // Assert
    assert_eq!(lab.xml(), before);
    assert!(!lab.folder().exists());
    let report = json(&out);
    assert_eq!(report["controllers"], serde_json::json!([0]));
    assert_eq!(report["files"]["removed"].as_array().unwrap().len(), 6);
}

#[test]
fn teardown_keeps_a_controller_and_channels_the_domain_had_before() {
    // Arrange: a domain with its own virtio-serial controller and qemu-ga channel.
    let lab = Lab::with_xml("own-ctl", 2, |xml, _| {
        with_devices(
            xml,
            "    <controller type='virtio-serial' index='0'/>\n    \
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
        )
    });
    let before = lab.xml();

    // Act
    let setup = expect_code(
        &run(&lab.root, &["--json", "setup", lab.name()]),
        ExitCode::Ok,
    );
    expect_code(&run(&lab.root, &["teardown", lab.name()]), ExitCode::Ok);

    // Assert
    assert_eq!(json(&setup)["controllers"], serde_json::json!([]));
    assert_eq!(lab.xml(), before);
}

#[test]
fn dry_run_prints_the_diff_and_the_files_and_changes_nothing() {
    // Arrange
    let lab = Lab::new("dry-run", 2);
    let before = lab.snapshot();

    // Act
    let out = expect_code(
        &run(&lab.root, &["setup", "--dry-run", lab.name()]),
        ExitCode::Ok,
    );

    // Assert
    assert!(out.contains("+++ b/domain.xml"), "{out}");
    assert!(
        out.contains("+    <channel type='pipe'><source path='"),
        "{out}"
    );
    for cpu in 0..2 {
        let fifo = lab.folder().join(format!("trace-path-cpu{cpu}.out"));
        assert!(
            out.contains(&format!("would create {}", fifo.display())),
            "{out}"
        );
    }
    assert!(out.contains("nothing changed"), "{out}");
    assert_eq!(lab.snapshot(), before);
    assert!(!lab.root.exists());
}

#[test]
fn setup_follows_a_changed_vcpu_count_exactly() {
    // Arrange
    let lab = Lab::new("vcpus", 2);
    expect_code(&run(&lab.root, &["setup", lab.name()]), ExitCode::Ok);

    // Act 1: grow to 3 possible vCPUs, 1 online (the others hot-pluggable).
    lab.redefine(|xml| {
        xml.replace(
            "<vcpu placement='static'>2</vcpu>",
            "<vcpu placement='static' current='1'>3</vcpu>",
        )
    });
    let grow = json(&expect_code(
        &run(&lab.root, &["--json", "setup", lab.name()]),
        ExitCode::Ok,
    ));
    // Act 2: shrink to 1.
    lab.redefine(|xml| xml.replace("current='1'>3</vcpu>", ">1</vcpu>"));
    let shrink = json(&expect_code(
        &run(&lab.root, &["--json", "setup", lab.name()]),
        ExitCode::Ok,
    ));

    // Assert
    let folder = lab.folder();
    let fifo = |cpu: u32, end: &str| {
        serde_json::Value::from(
            folder
                .join(format!("trace-path-cpu{cpu}.{end}"))
                .display()
                .to_string(),
        )
    };
    assert_eq!(grow["vcpus"], 3);
    assert_eq!(
        grow["channels"]["added"],
        serde_json::json!(["trace-path-cpu2"])
    );
    assert_eq!(
        grow["files"]["created"],
        serde_json::json!([fifo(2, "in"), fifo(2, "out")])
    );
    assert_eq!(
        shrink["channels"]["removed"],
        serde_json::json!(["trace-path-cpu1", "trace-path-cpu2"])
    );
    assert_eq!(
        shrink["files"]["removed"],
        serde_json::json!([fifo(1, "in"), fifo(1, "out"), fifo(2, "in"), fifo(2, "out")])
    );
    let kinds: Vec<ChannelKind> = domxml::our_channels(&lab.xml())
        .unwrap()
        .iter()
        .map(|ch| ch.kind)
        .collect();
    assert_eq!(kinds, [ChannelKind::Control, ChannelKind::Cpu(0)]);
}

#[test]
fn status_tells_set_up_from_not_and_names_wrong_modes() {
    // Arrange
    let lab = Lab::new("status", 2);
    let uuid = lab.vm.dom.uuid();

    // Act + Assert: not set up yet.
    let before = json(&expect_code(
        &run(&lab.root, &["--json", "status", lab.name()]),
        ExitCode::NotSetUp,
    ));
    assert_eq!(before["domains"][0]["set_up"], false);

    // Act + Assert: set up, found by UUID and in the list of all set-up domains.
    expect_code(&run(&lab.root, &["setup", lab.name()]), ExitCode::Ok);
    let after = json(&expect_code(
        &run(&lab.root, &["--json", "status", &uuid]),
        ExitCode::Ok,
    ));
    let entry = &after["domains"][0];
    assert_eq!(entry["domain"], lab.name());
    assert_eq!(entry["ok"], true, "{entry}");
    assert_eq!(entry["state"], "shut_off");
    assert_eq!(entry["vcpus"], 2);
    assert_eq!(entry["channels"]["cpus"], 2);
    assert_eq!(entry["files"]["fifos_ok"], 4);
    assert_eq!(entry["control_socket"], false);
    assert_eq!(entry["live_channels"], serde_json::Value::Null);
    let all = run(&lab.root, &["--json", "status"]);
    let all = json(&text(&all.stdout));
    let names: Vec<&str> = all["domains"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["domain"].as_str())
        .collect();
    assert!(names.contains(&lab.name()), "{names:?}");

    // Act + Assert: a FIFO with wider modes is a host file problem.
    let fifo = lab.folder().join("trace-path-cpu1.in");
    fs::set_permissions(&fifo, fs::Permissions::from_mode(0o666)).unwrap();
    let broken = run(&lab.root, &["status", lab.name()]);
    let out = expect_code(&broken, ExitCode::HostFileConflict);
    assert!(out.contains("mode 0666"), "{out}");
}

#[test]
fn unknown_domain_exits_5_and_says_how_to_list_domains() {
    let lab_root = common::lab_root().join("no-such-domain");

    let out = run(&lab_root, &["setup", "tvctl-test-no-such-domain"]);

    expect_code(&out, ExitCode::DomainNotFound);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("virsh list --all"), "{stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line, no libvirt noise: {stderr}"
    );
    assert!(!lab_root.exists());
}

#[test]
fn unreachable_libvirtd_exits_3_and_says_how_to_start_it() {
    let lab_root = common::lab_root().join("unreachable");

    let out = assert_cmd::Command::new(env!("CARGO_BIN_EXE_tvctl"))
        .args(["-c", "qemu:///system?socket=/nonexistent/libvirt-sock"])
        .arg("--dir")
        .arg(&lab_root)
        .args(["setup", "anything"])
        .output()
        .unwrap();

    expect_code(&out, ExitCode::LibvirtUnreachable);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("libvirtd -d"), "{stderr}");
    assert!(!lab_root.exists());
}

#[test]
fn not_root_exits_4_and_changes_nothing() {
    // Arrange
    let lab = Lab::new("not-root", 1);
    let before = lab.snapshot();

    for command in ["setup", "teardown"] {
        // Act: as nobody.
        let mut std_cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tvctl"));
        std::os::unix::process::CommandExt::uid(&mut std_cmd, 65534);
        std::os::unix::process::CommandExt::gid(&mut std_cmd, 65534);
        std_cmd
            .args(["-c", URI, "--dir"])
            .arg(&lab.root)
            .args([command, lab.name()]);
        let out = assert_cmd::Command::from_std(std_cmd).output().unwrap();

        // Assert
        expect_code(&out, ExitCode::PermissionDenied);
        let stderr = text(&out.stderr);
        assert!(stderr.contains("run it as root (sudo tvctl"), "{stderr}");
    }
    assert_eq!(lab.snapshot(), before);
}

#[test]
fn our_channel_with_a_conflicting_path_exits_6_and_changes_nothing() {
    // Arrange: the control channel points into another folder.
    let lab = Lab::with_xml("conflict", 1, |xml, dir| {
        with_devices(
            xml,
            &format!(
                "    <channel type='unix'><source mode='bind' path='{}/elsewhere/agent-ctl-path.sock'/><target type='virtio' name='agent-ctl-path'/></channel>",
                dir.display()
            ),
        )
    });
    let before = lab.snapshot();

    // Act
    let out = run(&lab.root, &["setup", lab.name()]);

    // Assert
    expect_code(&out, ExitCode::DomainXmlConflict);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("channel 'agent-ctl-path' has source path"),
        "{stderr}"
    );
    assert!(stderr.contains("run teardown with that folder"), "{stderr}");
    assert_eq!(lab.snapshot(), before);
}

#[test]
fn foreign_channel_with_our_target_name_exits_6_and_changes_nothing() {
    // Arrange: somebody else's pty channel is called trace-path-cpu0.
    let lab = Lab::with_xml("foreign", 1, |xml, _| {
        with_devices(
            xml,
            "    <channel type='pty'><target type='virtio' name='trace-path-cpu0'/></channel>",
        )
    });
    let before = lab.snapshot();

    // Act
    let out = run(&lab.root, &["setup", lab.name()]);

    // Assert
    expect_code(&out, ExitCode::DomainXmlConflict);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("uses the target name 'trace-path-cpu0'"),
        "{stderr}"
    );
    assert_eq!(lab.snapshot(), before);
}

#[test]
fn regular_file_at_a_fifo_path_exits_7_and_changes_nothing() {
    // Arrange: a correct folder, but a regular file where a FIFO belongs.
    let lab = Lab::new("regfile", 2);
    let (_, qemu_gid) = qemu_label();
    let folder = lab.folder();
    fs::create_dir_all(&folder).unwrap();
    std::os::unix::fs::chown(&folder, Some(0), Some(qemu_gid)).unwrap();
    fs::set_permissions(&folder, fs::Permissions::from_mode(0o710)).unwrap();
    fs::set_permissions(&lab.root, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(folder.join("trace-path-cpu1.out"), b"precious").unwrap();
    let before = lab.snapshot();

    // Act
    let out = run(&lab.root, &["setup", lab.name()]);

    // Assert
    expect_code(&out, ExitCode::HostFileConflict);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("trace-path-cpu1.out is a regular file, not a FIFO"),
        "{stderr}"
    );
    assert_eq!(lab.snapshot(), before);
    assert_eq!(
        fs::read(folder.join("trace-path-cpu1.out")).unwrap(),
        b"precious"
    );
}

/// A bpf filesystem mounted for one test: it takes folders, owners and modes but refuses
/// mkfifo (EPERM), like vfat, which the test machines' kernel cannot mount (no vfat module,
/// so no loop image either). Unmounted on drop, before `TestVm` removes the lab folder
/// (declare it after the lab).
struct BpfMount(PathBuf);

impl BpfMount {
    fn at(path: PathBuf) -> BpfMount {
        fs::create_dir_all(&path).unwrap();
        nix::mount::mount(
            Some("bpf"),
            &path,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount bpffs at {} (needs root): {e}", path.display()));
        BpfMount(path)
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount(&self.0);
    }
}

#[test]
fn dir_on_a_filesystem_without_fifos_exits_7_names_it_and_changes_nothing() {
    // Arrange: --dir on bpffs, which creates folders but refuses mkfifo with EPERM.
    let lab = Lab::new("no-fifos", 1);
    let mount = BpfMount::at(lab.vm.dir.join("bpf"));
    let before = lab.snapshot();

    // Act
    let out = run(&mount.0, &["setup", lab.name()]);

    // Assert
    expect_code(&out, ExitCode::HostFileConflict);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "the bpf filesystem mounted at {} does not support FIFOs",
            mount.0.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("pass a --dir on a local filesystem"),
        "{stderr}"
    );
    assert!(stderr.contains("every change was undone"), "{stderr}");
    assert_eq!(lab.snapshot(), before);
}

#[test]
fn teardown_of_a_domain_not_set_up_exits_0_and_changes_nothing() {
    let lab = Lab::new("not-setup", 1);
    let before = lab.snapshot();

    let out = run(&lab.root, &["teardown", lab.name()]);

    let stdout = expect_code(&out, ExitCode::Ok);
    assert!(stdout.contains("nothing to remove"), "{stdout}");
    assert_eq!(lab.snapshot(), before);
}

#[test]
fn teardown_twice_exits_0_and_the_second_changes_nothing() {
    // Arrange
    let lab = Lab::new("td-twice", 1);
    expect_code(&run(&lab.root, &["setup", lab.name()]), ExitCode::Ok);
    expect_code(&run(&lab.root, &["teardown", lab.name()]), ExitCode::Ok);
    let before = lab.snapshot();

    // Act
    let out = run(&lab.root, &["--json", "teardown", lab.name()]);

    // Assert
    let report: serde_json::Value = serde_json::from_str(&expect_code(&out, ExitCode::Ok)).unwrap();
    assert_eq!(report["changed"], false);
    assert_eq!(report["channels"]["removed"], serde_json::json!([]));
    assert_eq!(lab.snapshot(), before);
}

#[test]
fn dir_too_long_for_the_control_socket_exits_7_and_changes_nothing() {
    // Arrange: a --dir so long that QEMU could not bind the socket at the next start.
    let lab = Lab::new("long-dir", 1);
    let root = lab.vm.dir.join("d".repeat(80));
    let before = lab.snapshot();

    // Act
    let out = run(&root, &["setup", lab.name()]);

    // Assert
    expect_code(&out, ExitCode::HostFileConflict);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("pass a shorter --dir"), "{stderr}");
    assert_eq!(lab.snapshot(), before);
}

#[test]
fn group_option_overrides_qemus_group() {
    // Arrange: libvirt-qemu is a member of kvm on Debian, so QEMU can still enter.
    let lab = Lab::new("group", 1);
    let kvm = nix::unistd::Group::from_name("kvm")
        .unwrap()
        .expect("group kvm exists");

    // Act
    let out = expect_code(
        &run(
            &lab.root,
            &["--json", "setup", "--group", "kvm", lab.name()],
        ),
        ExitCode::Ok,
    );

    // Assert
    assert_eq!(json(&out)["group"]["name"], "kvm");
    let gid = kvm.gid.as_raw();
    assert_eq!(mode_owner(&lab.folder()), (0o710, 0, gid));
    let fifo = lab.folder().join("trace-path-cpu0.in");
    assert_eq!(mode_owner(&fifo), (0o660, 0, gid));
}

#[test]
fn unknown_group_exits_2_and_changes_nothing() {
    let lab = Lab::new("no-group", 1);
    let before = lab.snapshot();

    let out = run(
        &lab.root,
        &["setup", "--group", "no-such-group-tvctl", lab.name()],
    );

    expect_code(&out, ExitCode::Usage);
    assert!(text(&out.stderr).contains("group 'no-such-group-tvctl' does not exist"));
    assert_eq!(lab.snapshot(), before);
}
