//! Synthetic debugfs trees in temporary directories, shaped as Linux writes them.

use super::*;
use crate::tsync::trace_cmd_offset_at;
use std::fs;
use tempfile::TempDir;

const PID: u32 = 4242;

/// A debugfs root holding `kvm/<pid>-<fd>` with the given vcpus `(N, tsc-offset text)`.
struct Tree {
    root: TempDir,
}

impl Tree {
    fn new() -> Tree {
        let root = TempDir::new().unwrap();
        // A mounted debugfs has more than kvm in it.
        fs::create_dir(root.path().join("tracing")).unwrap();
        Tree { root }
    }

    fn with_vm(vcpus: &[(u32, &str)]) -> Tree {
        let tree = Tree::new();
        for (n, offset) in vcpus {
            tree.file(&format!("vcpu{n}/tsc-offset"), offset);
            tree.file(&format!("vcpu{n}/lapic_timer_advance_ns"), "1000\n");
        }
        tree
    }

    fn vm_dir(&self) -> PathBuf {
        self.root.path().join(format!("kvm/{PID}-17"))
    }

    fn file(&self, relative: &str, text: &str) {
        let path = self.vm_dir().join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn read(&self, vcpu_count: usize) -> Result<KvmClocks, KvmError> {
        read_clocks(self.root.path(), PID, vcpu_count)
    }
}

#[test]
fn three_vcpus_give_exact_negated_offsets() {
    let tree = Tree::with_vm(&[(0, "-123456789\n"), (1, "-123456790\n"), (2, "5\n")]);

    let clocks = tree.read(3).unwrap();

    assert_eq!(clocks.vm_dir, tree.vm_dir());
    let offsets: Vec<i64> = clocks.vcpus.iter().map(KvmVcpu::offset).collect();
    assert_eq!(offsets, [123_456_789, 123_456_790, -5]);
    let samples = clocks.time_shift_samples();
    assert_eq!(samples.len(), 3);
    assert_eq!(
        samples[1],
        [ShiftSample {
            time: 0,
            offset: 123_456_790
        }]
    );
    assert_eq!(trace_cmd_offset_at(&samples[2], 1_000_000), Some(-5));
}

#[test]
fn gappy_vcpu_numbers_map_in_order_to_guest_cpus() {
    // Sorted numerically: vcpu10 is after vcpu4, though it sorts before it as text.
    let tree = Tree::with_vm(&[(0, "-100"), (10, "-300"), (4, "-200")]);

    let clocks = tree.read(3).unwrap();

    let map: Vec<(u32, i64)> = clocks
        .vcpus
        .iter()
        .map(|v| (v.debugfs_index, v.offset()))
        .collect();
    assert_eq!(map, [(0, 100), (4, 200), (10, 300)]);
}

#[test]
fn vcpu_count_mismatch_is_an_error_that_says_so() {
    let tree = Tree::with_vm(&[(0, "-100"), (2, "-100"), (4, "-100")]);

    let err = tree.read(4).unwrap_err();

    assert!(matches!(
        err,
        KvmError::VcpuCountMismatch {
            found: 3,
            expected: 4,
            ..
        }
    ));
    let message = err.to_string();
    assert!(
        message.contains("3 vcpu directories but the domain has 4 vCPUs"),
        "{message}"
    );
    assert!(message.contains("--sync probe"), "{message}");
}

#[test]
fn default_scaling_ratio_is_accepted() {
    let tree = Tree::with_vm(&[(0, "-100"), (1, "-100")]);
    for (vcpu, bits) in [(0, 48), (1, 32)] {
        tree.file(
            &format!("vcpu{vcpu}/tsc-scaling-ratio"),
            &format!("{}\n", 1u64 << bits),
        );
        tree.file(
            &format!("vcpu{vcpu}/tsc-scaling-ratio-frac-bits"),
            &format!("{bits}\n"),
        );
    }

    let clocks = tree.read(2).unwrap();

    assert_eq!(clocks.vcpus[0].offset(), 100);
}

#[test]
fn scaled_tsc_is_refused_with_a_pointer_to_probe() {
    let tree = Tree::with_vm(&[(0, "-100")]);
    tree.file(
        "vcpu0/tsc-scaling-ratio",
        &format!("{}\n", (1u64 << 48) + 1),
    );
    tree.file("vcpu0/tsc-scaling-ratio-frac-bits", "48\n");

    let err = tree.read(1).unwrap_err();

    assert!(
        matches!(err, KvmError::Scaled { frac_bits: 48, .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("scaled") && message.contains("--sync probe"),
        "{message}"
    );
}

#[test]
fn half_of_the_scaling_files_is_malformed() {
    let tree = Tree::with_vm(&[(0, "-100")]);
    tree.file("vcpu0/tsc-scaling-ratio", &format!("{}\n", 1u64 << 48));

    let err = tree.read(1).unwrap_err();

    assert!(matches!(err, KvmError::Malformed { .. }), "{err:?}");
}

#[test]
fn garbage_files_are_malformed() {
    let long = "1".repeat(5000);
    for text in [
        "",
        "\n",
        "abc",
        "12 34",
        "0x10",
        "--5",
        "99999999999999999999",
        long.as_str(),
    ] {
        let tree = Tree::with_vm(&[(0, text)]);

        let err = tree.read(1).unwrap_err();

        assert!(
            matches!(err, KvmError::Malformed { .. }),
            "{text:?}: {err:?}"
        );
    }
    let tree = Tree::with_vm(&[(0, "-1")]);
    tree.file("vcpu0/tsc-scaling-ratio", "281474976710656\n");
    tree.file("vcpu0/tsc-scaling-ratio-frac-bits", "64\n");
    assert!(matches!(tree.read(1), Err(KvmError::Malformed { .. })));
    let tree = Tree::with_vm(&[(0, "0")]);
    fs::write(tree.vm_dir().join("vcpu0/tsc-offset"), [0xff, 0xfe, b'\n']).unwrap();
    assert!(matches!(tree.read(1), Err(KvmError::Malformed { .. })));
}

#[test]
fn missing_tsc_offset_is_an_error() {
    let tree = Tree::with_vm(&[]);
    tree.file("vcpu0/lapic_timer_advance_ns", "1000\n");

    let err = tree.read(1).unwrap_err();

    assert!(
        matches!(err, KvmError::Io { ref path, .. } if path.ends_with("vcpu0/tsc-offset")),
        "{err:?}"
    );
}

#[test]
fn extreme_offsets_negate_mod_2_64() {
    let tree = Tree::with_vm(&[(0, "-9223372036854775808"), (1, "9223372036854775807")]);

    let clocks = tree.read(2).unwrap();

    assert_eq!(clocks.vcpus[0].offset(), i64::MIN);
    assert_eq!(clocks.vcpus[1].offset(), -i64::MAX);
}

#[test]
fn empty_or_missing_root_means_debugfs_is_not_mounted() {
    let empty = TempDir::new().unwrap();
    let missing = empty.path().join("nowhere");

    for root in [empty.path(), missing.as_path()] {
        let err = read_clocks(root, PID, 1).unwrap_err();

        assert!(matches!(err, KvmError::DebugfsNotMounted { .. }), "{err:?}");
        assert!(err.to_string().contains("mount -t debugfs none"));
    }
}

#[test]
fn no_vm_directory_for_the_pid_means_not_kvm() {
    let no_kvm = Tree::new();
    let other_pid = Tree::new();
    fs::create_dir_all(
        other_pid
            .root
            .path()
            .join(format!("kvm/{}-17/vcpu0", PID + 1)),
    )
    .unwrap();
    // A pid that only starts with ours, and a name that is not <pid>-<fd>.
    fs::create_dir_all(other_pid.root.path().join(format!("kvm/{PID}1-17"))).unwrap();
    fs::create_dir_all(other_pid.root.path().join(format!("kvm/{PID}-x"))).unwrap();

    for tree in [no_kvm, other_pid] {
        let err = tree.read(1).unwrap_err();

        assert!(matches!(err, KvmError::NotKvm { pid: PID, .. }), "{err:?}");
        assert!(err.to_string().contains("does not run under KVM"));
    }
}

#[test]
fn two_vm_directories_for_one_pid_are_refused() {
    let tree = Tree::with_vm(&[(0, "-1")]);
    fs::create_dir_all(tree.root.path().join(format!("kvm/{PID}-18/vcpu0"))).unwrap();

    assert!(matches!(
        tree.read(1),
        Err(KvmError::SeveralVms { count: 2, .. })
    ));
}

#[test]
fn changed_offsets_are_listed_by_guest_cpu() {
    let start = Tree::with_vm(&[(0, "-100"), (1, "-100")]).read(2).unwrap();
    let stop = Tree::with_vm(&[(0, "-100"), (1, "-250")]).read(2).unwrap();

    assert_eq!(stop.changed_since(&start), [1]);
    assert!(start.changed_since(&start).is_empty());
}
