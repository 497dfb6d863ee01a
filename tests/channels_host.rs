//! Host tier, no libvirt: the per-domain folder and FIFOs that `tvctl setup` creates, the
//! checks that refuse paths it cannot vouch for, and the journal that undoes a half-done
//! change. Needs root (chown); fails loudly without it.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tvctl::channels::{
    DomainFolder, End, FileError, FileKind, FileOp, Journal, Owners, FIFO_MODE, FOLDER_MODE,
};

const GROUP: u32 = 4242;
const QEMU: (u32, u32) = (4243, GROUP);

fn owners() -> Owners {
    Owners {
        group: GROUP,
        qemu: Some(QEMU),
    }
}

/// A scratch root that QEMU could enter, removed at the end of the test.
fn scratch() -> tempfile::TempDir {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates root-owned files: run it as root"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn apply_all(ops: &[FileOp]) {
    let mut journal = Journal::new();
    for op in ops {
        journal.apply(op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    }
    journal.commit();
}

/// Every path under `root` with its type, mode, uid and gid: the whole observable state.
fn tree(root: &Path) -> Vec<(PathBuf, u32, u32, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path.clone());
            }
            out.push((path, meta.mode(), meta.uid(), meta.gid()));
        }
    }
    out.sort();
    out
}

fn set_up(root: &Path, vcpus: u32) -> DomainFolder {
    let folder = DomainFolder::new(root, "dom").unwrap();
    apply_all(&folder.plan_setup(vcpus, &owners()).unwrap());
    folder
}

#[test]
fn setup_creates_folder_and_fifo_pairs_with_modes_and_group() {
    let root = scratch();
    let folder = DomainFolder::new(&root.path().join("tvctl"), "dom").unwrap();

    apply_all(&folder.plan_setup(2, &owners()).unwrap());

    let meta = fs::metadata(folder.path()).unwrap();
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (FOLDER_MODE, 0, GROUP)
    );
    assert_eq!(fs::metadata(folder.root()).unwrap().mode() & 0o7777, 0o755);
    for cpu in 0..2 {
        for end in [End::In, End::Out] {
            let meta = fs::symlink_metadata(folder.fifo(cpu, end)).unwrap();
            assert!(meta.file_type().is_fifo(), "{:?}", folder.fifo(cpu, end));
            assert_eq!(
                (meta.mode() & 0o7777, meta.uid(), meta.gid()),
                (FIFO_MODE, 0, GROUP)
            );
        }
    }
}

#[test]
fn setup_twice_plans_nothing() {
    let root = scratch();
    let folder = set_up(root.path(), 3);

    let again = folder.plan_setup(3, &owners()).unwrap();

    assert_eq!(again, Vec::new());
}

#[test]
fn fifos_handed_to_qemu_while_the_domain_runs_are_accepted() {
    let root = scratch();
    let folder = set_up(root.path(), 1);
    for end in [End::In, End::Out] {
        std::os::unix::fs::chown(folder.fifo(0, end), Some(QEMU.0), Some(QEMU.1)).unwrap();
    }

    let again = folder.plan_setup(1, &owners()).unwrap();

    assert_eq!(again, Vec::new());
}

#[test]
fn growing_adds_and_shrinking_removes_exactly_the_changed_vcpus() {
    let root = scratch();
    let folder = set_up(root.path(), 2);

    let grow = folder.plan_setup(3, &owners()).unwrap();
    let shrink = folder.plan_setup(1, &owners()).unwrap();

    let paths =
        |ops: &[FileOp]| -> Vec<PathBuf> { ops.iter().map(|op| op.path().to_owned()).collect() };
    assert!(grow.iter().all(FileOp::creates));
    assert_eq!(
        paths(&grow),
        vec![folder.fifo(2, End::In), folder.fifo(2, End::Out)]
    );
    assert!(shrink.iter().all(|op| !op.creates()));
    assert_eq!(
        paths(&shrink),
        vec![folder.fifo(1, End::In), folder.fifo(1, End::Out)]
    );
}

#[test]
fn regular_file_at_a_fifo_path_is_refused() {
    let root = scratch();
    let folder = set_up(root.path(), 1);
    let fifo = folder.fifo(0, End::Out);
    fs::remove_file(&fifo).unwrap();
    fs::write(&fifo, b"not a fifo").unwrap();

    let err = folder.plan_setup(1, &owners()).unwrap_err();

    assert!(
        matches!(&err, FileError::NotAFifo { path, found: FileKind::File } if *path == fifo),
        "{err:?}"
    );
    assert!(err.to_string().contains("move it away"), "{err}");
}

#[test]
fn fifo_with_wider_modes_is_refused_with_the_fix() {
    let root = scratch();
    let folder = set_up(root.path(), 1);
    let fifo = folder.fifo(0, End::In);
    fs::set_permissions(&fifo, fs::Permissions::from_mode(0o666)).unwrap();

    let err = folder.plan_setup(1, &owners()).unwrap_err();

    assert!(matches!(err, FileError::WrongModes { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("mode 0666"), "{message}");
    assert!(message.contains("chmod 0660"), "{message}");
}

#[test]
fn folder_with_wider_modes_is_refused() {
    let root = scratch();
    let folder = set_up(root.path(), 1);
    fs::set_permissions(folder.path(), fs::Permissions::from_mode(0o755)).unwrap();

    let err = folder.plan_setup(1, &owners()).unwrap_err();

    assert!(matches!(err, FileError::WrongModes { .. }), "{err:?}");
}

#[test]
fn symlink_in_place_of_the_folder_is_refused() {
    let root = scratch();
    let target = root.path().join("elsewhere");
    fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&target, root.path().join("dom")).unwrap();
    let folder = DomainFolder::new(root.path(), "dom").unwrap();

    let err = folder.plan_setup(1, &owners()).unwrap_err();

    assert!(
        matches!(
            err,
            FileError::NotAFolder {
                found: FileKind::Symlink,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_root_qemu_cannot_enter_is_refused() {
    let root = scratch();
    let closed = root.path().join("closed");
    fs::create_dir(&closed).unwrap();
    fs::set_permissions(&closed, fs::Permissions::from_mode(0o700)).unwrap();
    let folder = DomainFolder::new(&closed, "dom").unwrap();

    let err = folder.plan_setup(1, &owners()).unwrap_err();

    assert!(matches!(err, FileError::QemuCannotEnter { .. }), "{err:?}");
    assert!(err.to_string().contains("chmod o+x"), "{err}");
}

#[test]
fn rollback_removes_everything_created_including_missing_parents() {
    let root = scratch();
    let before = tree(root.path());
    let folder = DomainFolder::new(&root.path().join("a/b"), "dom").unwrap();
    let ops = folder.plan_setup(2, &owners()).unwrap();
    let mut journal = Journal::new();
    for op in &ops {
        journal.apply(op).unwrap();
    }

    journal.rollback().unwrap();

    assert_eq!(tree(root.path()), before);
}

#[test]
fn dropping_an_uncommitted_journal_rolls_back() {
    let root = scratch();
    let before = tree(root.path());
    let folder = DomainFolder::new(root.path(), "dom").unwrap();
    let ops = folder.plan_setup(1, &owners()).unwrap();

    {
        let mut journal = Journal::new();
        for op in &ops {
            journal.apply(op).unwrap();
        }
    }

    assert_eq!(tree(root.path()), before);
}

#[test]
fn teardown_removes_our_files_and_the_folder() {
    let root = scratch();
    let folder = set_up(root.path(), 2);
    fs::write(folder.state_file(), b"{}").unwrap();

    apply_all(&folder.plan_teardown().unwrap());

    assert_eq!(tree(root.path()), Vec::new());
    assert_eq!(folder.plan_teardown().unwrap(), Vec::new());
}

#[test]
fn teardown_rollback_restores_files_with_modes_owners_and_contents() {
    let root = scratch();
    let folder = set_up(root.path(), 2);
    std::os::unix::fs::chown(folder.fifo(1, End::Out), Some(QEMU.0), None).unwrap();
    fs::write(folder.state_file(), b"{\"format\":1}").unwrap();
    let before = tree(root.path());
    let ops = folder.plan_teardown().unwrap();
    let mut journal = Journal::new();
    for op in &ops {
        journal.apply(op).unwrap();
    }

    journal.rollback().unwrap();

    assert_eq!(tree(root.path()), before);
    assert_eq!(fs::read(folder.state_file()).unwrap(), b"{\"format\":1}");
}

#[test]
fn teardown_refuses_a_folder_holding_foreign_files() {
    let root = scratch();
    let folder = set_up(root.path(), 1);
    fs::write(folder.path().join("notes.txt"), b"mine").unwrap();

    let err = folder.plan_teardown().unwrap_err();

    assert!(
        matches!(&err, FileError::ForeignFiles { names, .. } if names == &["notes.txt"]),
        "{err:?}"
    );
}

#[test]
fn status_counts_good_fifos_and_names_the_bad_ones() {
    let root = scratch();
    let folder = set_up(root.path(), 2);
    fs::set_permissions(folder.fifo(1, End::In), fs::Permissions::from_mode(0o644)).unwrap();
    fs::remove_file(folder.fifo(1, End::Out)).unwrap();

    let report = folder.inspect(2, Some(QEMU));

    assert!(report.exists);
    assert_eq!(report.gid, Some(GROUP));
    assert_eq!((report.fifos_ok, report.fifos_expected), (2, 4));
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert!(!report.socket);
}
