//! Host files of a set-up domain: the per-domain folder, its FIFO pairs, their owners and
//! modes, checks of what is already there, and a [`Journal`] that undoes exactly what a failed
//! setup or teardown changed. Nothing here talks to libvirt: callers pass QEMU's group and
//! uid/gid (from libvirt's DAC label) in [`Owners`].
//!
//! # Layout
//! ```text
//! <dir>/                        0755 root:root      created (with missing parents) if absent
//! <dir>/<domain>/               0710 root:<group>   QEMU may enter, not list or write
//!     trace-path-cpuN.in        FIFO 0660 root:<group>   host -> guest, one pair per vCPU
//!     trace-path-cpuN.out       FIFO 0660 root:<group>   guest -> host
//!     agent-ctl-path.sock       socket: libvirt creates it at domain start (bind mode)
//!     setup.json                0600 root:root      what teardown must undo in the XML
//! ```
//! `<group>` is QEMU's group (libvirt's DAC label, or `--group`). While the domain runs,
//! libvirt hands the FIFOs to QEMU's uid:gid and gives them back at shutdown, so both owners
//! are accepted for an existing FIFO. Anything else already at one of these paths (a regular
//! file, a symlink, wider or narrower modes, a stranger's group) is an error: tvctl never
//! reuses or repairs a path it cannot vouch for.

mod journal;
mod mounts;

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::domxml::{ChannelKind, CPU_NAME_PREFIX};
use crate::exitcode::ExitCode;

pub use journal::{Journal, RollbackError};

/// Mode of `<dir>` when tvctl creates it: QEMU must be able to pass through.
pub const ROOT_MODE: u32 = 0o755;
/// Mode of the per-domain folder: QEMU's group may enter it, nobody but root may list it.
pub const FOLDER_MODE: u32 = 0o710;
/// Mode of each FIFO: read and write for root and QEMU's group.
pub const FIFO_MODE: u32 = 0o660;
/// Mode of the state file: only tvctl (root) reads it.
pub const STATE_MODE: u32 = 0o600;
/// Name of the state file in the per-domain folder.
pub const STATE_FILE: &str = "setup.json";
/// Longest path a Unix socket can have: `sun_path` holds 108 bytes with the final NUL.
pub const SOCKET_PATH_MAX: usize = 107;

/// Which end of a vCPU's FIFO pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// `.in`: host to guest.
    In,
    /// `.out`: guest to host.
    Out,
}

impl End {
    fn suffix(self) -> &'static str {
        match self {
            End::In => "in",
            End::Out => "out",
        }
    }
}

/// Who owns the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owners {
    /// Group of the folder and the FIFOs.
    pub group: u32,
    /// QEMU's uid and gid, which libvirt gives the FIFOs while the domain runs.
    pub qemu: Option<(u32, u32)>,
}

/// One change to the host's files; a plan is a list of them, applied in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOp {
    CreateDir { path: PathBuf, mode: u32, gid: u32 },
    CreateFifo { path: PathBuf, gid: u32 },
    Remove { path: PathBuf, kind: FileKind },
}

impl FileOp {
    pub fn path(&self) -> &Path {
        match self {
            FileOp::CreateDir { path, .. }
            | FileOp::CreateFifo { path, .. }
            | FileOp::Remove { path, .. } => path,
        }
    }

    pub fn creates(&self) -> bool {
        !matches!(self, FileOp::Remove { .. })
    }
}

/// What kind of file a path holds, as far as tvctl cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Dir,
    Fifo,
    Socket,
    File,
    Symlink,
    Other,
}

impl FileKind {
    fn of(meta: &fs::Metadata) -> FileKind {
        let ty = meta.file_type();
        if ty.is_dir() {
            FileKind::Dir
        } else if ty.is_fifo() {
            FileKind::Fifo
        } else if ty.is_socket() {
            FileKind::Socket
        } else if ty.is_file() {
            FileKind::File
        } else if ty.is_symlink() {
            FileKind::Symlink
        } else {
            FileKind::Other
        }
    }

    fn describe(self) -> &'static str {
        match self {
            FileKind::Dir => "a folder",
            FileKind::Fifo => "a FIFO",
            FileKind::Socket => "a socket",
            FileKind::File => "a regular file",
            FileKind::Symlink => "a symbolic link",
            FileKind::Other => "a device or other special file",
        }
    }
}

/// Why the host's files do not allow the change. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{} is {}, not a FIFO: tvctl never reuses it; move it away and run setup again", .path.display(), .found.describe())]
    NotAFifo { path: PathBuf, found: FileKind },
    #[error("{} is {}, not a folder: move it away or pass another --dir", .path.display(), .found.describe())]
    NotAFolder { path: PathBuf, found: FileKind },
    #[error("{} has {found}, but tvctl needs {expected}: fix it with `{fix}`, or remove it and run setup again", .path.display())]
    WrongModes {
        path: PathBuf,
        found: String,
        expected: String,
        fix: String,
    },
    #[error("QEMU (uid {uid}, gid {gid}) cannot enter {} (mode {mode:04o}, {owner}): run `chmod o+x {}` or pass a --dir that QEMU can reach", .path.display(), .path.display())]
    QemuCannotEnter {
        path: PathBuf,
        mode: u32,
        owner: String,
        uid: u32,
        gid: u32,
    },
    #[error("cannot {op} {}: the {fs} filesystem mounted at {} does not support {what}; pass a --dir on a local filesystem such as ext4, xfs or tmpfs", .path.display(), .mount_point.display())]
    Unsupported {
        op: &'static str,
        path: PathBuf,
        what: &'static str,
        fs: String,
        mount_point: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the control socket {} would be {len} bytes long, but Unix socket paths are limited to {SOCKET_PATH_MAX} and the domain would not start: pass a shorter --dir", .path.display())]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("{} holds files tvctl did not create ({}): move them away, then run teardown again", .path.display(), .names.join(", "))]
    ForeignFiles { path: PathBuf, names: Vec<String> },
    #[error("domain name {0:?} cannot name a folder (it is empty, '.', '..' or holds '/')")]
    BadDomainName(String),
    #[error("cannot {op} {}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl FileError {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> FileError {
        FileError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        match self {
            FileError::BadDomainName(_) => ExitCode::Usage,
            FileError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::EACCES) | Some(libc::EPERM) => ExitCode::PermissionDenied,
                Some(libc::EROFS) | Some(libc::ENOSPC) => ExitCode::HostFileConflict,
                _ => ExitCode::Internal,
            },
            _ => ExitCode::HostFileConflict,
        }
    }
}

/// The per-domain folder `<dir>/<domain>/` and where each of our files sits in it.
#[derive(Debug, Clone)]
pub struct DomainFolder {
    root: PathBuf,
    path: PathBuf,
}

impl DomainFolder {
    /// The folder for `domain` under `root` (tvctl's `--dir`, an absolute path).
    pub fn new(root: &Path, domain: &str) -> Result<DomainFolder, FileError> {
        if domain.is_empty() || domain == "." || domain == ".." || domain.contains(['/', '\0']) {
            return Err(FileError::BadDomainName(domain.to_owned()));
        }
        Ok(DomainFolder {
            root: root.to_owned(),
            path: root.join(domain),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The FIFO for one end of vCPU `cpu`'s channel.
    pub fn fifo(&self, cpu: u32, end: End) -> PathBuf {
        self.path.join(format!(
            "{}.{}",
            ChannelKind::Cpu(cpu).target_name(),
            end.suffix()
        ))
    }

    /// The control socket (it exists while the domain runs).
    pub fn socket(&self) -> PathBuf {
        self.path
            .join(format!("{}.sock", ChannelKind::Control.target_name()))
    }

    pub fn state_file(&self) -> PathBuf {
        self.path.join(STATE_FILE)
    }

    /// What setup must create (and, after the vCPU count shrank, remove) so that the folder
    /// holds exactly the FIFOs for `vcpus` vCPUs. Fails, changing nothing, if an existing
    /// path is not what setup would have made.
    pub fn plan_setup(&self, vcpus: u32, owners: &Owners) -> Result<Vec<FileOp>, FileError> {
        let socket = self.socket();
        let len = socket.as_os_str().len();
        if len > SOCKET_PATH_MAX {
            return Err(FileError::SocketPathTooLong { path: socket, len });
        }
        let mut ops = Vec::new();
        if let Some(meta) = lstat(&self.path)? {
            check_folder(&self.path, &meta, owners.group)?;
        } else {
            ops.extend(self.missing_ancestors()?);
            ops.push(FileOp::CreateDir {
                path: self.path.clone(),
                mode: FOLDER_MODE,
                gid: owners.group,
            });
        }
        check_qemu_can_enter(&self.path, owners)?;
        for cpu in 0..vcpus {
            for end in [End::In, End::Out] {
                let path = self.fifo(cpu, end);
                match lstat(&path)? {
                    Some(meta) => check_fifo(&path, &meta, owners)?,
                    None => ops.push(FileOp::CreateFifo {
                        path,
                        gid: owners.group,
                    }),
                }
            }
        }
        for (cpu, path) in self.existing_fifos()? {
            if cpu >= vcpus {
                ops.push(FileOp::Remove {
                    path,
                    kind: FileKind::Fifo,
                });
            }
        }
        Ok(ops)
    }

    /// What teardown removes: every file setup or libvirt put in the folder, then the folder.
    /// Fails, changing nothing, if the folder holds anything else.
    pub fn plan_teardown(&self) -> Result<Vec<FileOp>, FileError> {
        let Some(meta) = lstat(&self.path)? else {
            return Ok(Vec::new());
        };
        if FileKind::of(&meta) != FileKind::Dir {
            return Err(FileError::NotAFolder {
                path: self.path.clone(),
                found: FileKind::of(&meta),
            });
        }
        let mut ops = Vec::new();
        let mut foreign = Vec::new();
        for (name, kind) in self.entries()? {
            let path = self.path.join(&name);
            let ours = match kind {
                FileKind::Fifo => cpu_of_fifo_name(&name).is_some(),
                FileKind::Socket => path == self.socket(),
                FileKind::File => name == STATE_FILE,
                _ => false,
            };
            if ours {
                ops.push(FileOp::Remove { path, kind });
            } else {
                foreign.push(name);
            }
        }
        if !foreign.is_empty() {
            foreign.sort();
            return Err(FileError::ForeignFiles {
                path: self.path.clone(),
                names: foreign,
            });
        }
        // The folder goes last, once it is empty.
        ops.sort_by(|a, b| a.path().cmp(b.path()));
        ops.push(FileOp::Remove {
            path: self.path.clone(),
            kind: FileKind::Dir,
        });
        Ok(ops)
    }

    /// The state of the folder for `tvctl status`, measured against `vcpus` FIFO pairs.
    pub fn inspect(&self, vcpus: u32, qemu: Option<(u32, u32)>) -> FolderReport {
        let mut report = FolderReport {
            fifos_expected: vcpus.saturating_mul(2),
            ..FolderReport::default()
        };
        let meta = match lstat(&self.path) {
            Ok(Some(meta)) => meta,
            Ok(None) => return report,
            Err(err) => {
                report.problems.push(FileProblem::Wrong(err.to_string()));
                return report;
            }
        };
        report.exists = true;
        let group = meta.gid();
        report.gid = Some(group);
        let owners = Owners { group, qemu };
        if let Err(err) = check_folder(&self.path, &meta, group) {
            report.problems.push(FileProblem::Wrong(err.to_string()));
            return report;
        }
        for cpu in 0..vcpus {
            for end in [End::In, End::Out] {
                let path = self.fifo(cpu, end);
                match lstat(&path) {
                    Ok(Some(meta)) => match check_fifo(&path, &meta, &owners) {
                        Ok(()) => report.fifos_ok += 1,
                        Err(err) => report.problems.push(FileProblem::Wrong(err.to_string())),
                    },
                    Ok(None) => report.problems.push(FileProblem::Missing(format!(
                        "{} is missing",
                        path.display()
                    ))),
                    Err(err) => report.problems.push(FileProblem::Wrong(err.to_string())),
                }
            }
        }
        if let Ok(fifos) = self.existing_fifos() {
            for (cpu, path) in fifos.into_iter().filter(|(cpu, _)| *cpu >= vcpus) {
                report.problems.push(FileProblem::Missing(format!(
                    "{} is left from vCPU {cpu}, which the domain no longer has",
                    path.display()
                )));
            }
        }
        report.socket = matches!(lstat(&self.socket()), Ok(Some(meta)) if FileKind::of(&meta) == FileKind::Socket);
        report
    }

    /// `<dir>` and its parents that do not exist yet, outermost first.
    fn missing_ancestors(&self) -> Result<Vec<FileOp>, FileError> {
        let mut missing = Vec::new();
        let mut at = self.root.as_path();
        loop {
            match fs::metadata(at) {
                Ok(meta) if meta.is_dir() => break,
                Ok(meta) => {
                    return Err(FileError::NotAFolder {
                        path: at.to_owned(),
                        found: FileKind::of(&meta),
                    })
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    missing.push(FileOp::CreateDir {
                        path: at.to_owned(),
                        mode: ROOT_MODE,
                        gid: 0,
                    });
                }
                Err(err) => return Err(FileError::io("inspect", at, err)),
            }
            match at.parent() {
                Some(parent) => at = parent,
                None => break,
            }
        }
        missing.reverse();
        Ok(missing)
    }

    /// Names and kinds of everything in the folder.
    fn entries(&self) -> Result<Vec<(String, FileKind)>, FileError> {
        let read = fs::read_dir(&self.path).map_err(|e| FileError::io("list", &self.path, e))?;
        let mut entries = Vec::new();
        for entry in read {
            let entry = entry.map_err(|e| FileError::io("list", &self.path, e))?;
            let path = entry.path();
            let meta =
                fs::symlink_metadata(&path).map_err(|e| FileError::io("inspect", &path, e))?;
            entries.push((
                entry.file_name().to_string_lossy().into_owned(),
                FileKind::of(&meta),
            ));
        }
        Ok(entries)
    }

    /// Every `trace-path-cpuN.{in,out}` in the folder with its vCPU, in order; a path with
    /// such a name that is not a FIFO is an error.
    fn existing_fifos(&self) -> Result<Vec<(u32, PathBuf)>, FileError> {
        if lstat(&self.path)?.is_none() {
            return Ok(Vec::new());
        }
        let mut found = BTreeSet::new();
        for (name, kind) in self.entries()? {
            let Some(cpu) = cpu_of_fifo_name(&name) else {
                continue;
            };
            let path = self.path.join(&name);
            if kind != FileKind::Fifo {
                return Err(FileError::NotAFifo { path, found: kind });
            }
            found.insert((cpu, path));
        }
        Ok(found.into_iter().collect())
    }
}

/// The vCPU of a FIFO file name `trace-path-cpuN.in` / `.out`, if it is one.
pub fn cpu_of_fifo_name(name: &str) -> Option<u32> {
    let stem = name
        .strip_suffix(".in")
        .or_else(|| name.strip_suffix(".out"))?;
    stem.starts_with(CPU_NAME_PREFIX).then_some(())?;
    match ChannelKind::from_target_name(stem)? {
        ChannelKind::Cpu(cpu) => Some(cpu),
        ChannelKind::Control => None,
    }
}

/// What `tvctl status` reports about a domain's folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FolderReport {
    pub exists: bool,
    /// The folder's group, which the FIFOs must share.
    pub gid: Option<u32>,
    pub fifos_expected: u32,
    pub fifos_ok: u32,
    /// The control socket exists (libvirt creates it while the domain runs).
    pub socket: bool,
    pub problems: Vec<FileProblem>,
}

/// Something wrong with the folder: missing or surplus files (setup would fix them) or files
/// that setup refuses to touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileProblem {
    Missing(String),
    Wrong(String),
}

/// `lstat`, with "does not exist" as `None`.
pub(crate) fn lstat(path: &Path) -> Result<Option<fs::Metadata>, FileError> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Ok(Some(meta)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(FileError::io("inspect", path, err)),
    }
}

fn check_folder(path: &Path, meta: &fs::Metadata, group: u32) -> Result<(), FileError> {
    let kind = FileKind::of(meta);
    if kind != FileKind::Dir {
        return Err(FileError::NotAFolder {
            path: path.to_owned(),
            found: kind,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode != FOLDER_MODE || meta.uid() != 0 || meta.gid() != group {
        return Err(wrong_modes(path, meta, FOLDER_MODE, group));
    }
    Ok(())
}

fn check_fifo(path: &Path, meta: &fs::Metadata, owners: &Owners) -> Result<(), FileError> {
    let kind = FileKind::of(meta);
    if kind != FileKind::Fifo {
        return Err(FileError::NotAFifo {
            path: path.to_owned(),
            found: kind,
        });
    }
    let (qemu_uid, qemu_gid) = owners.qemu.unzip();
    let uid_ok = meta.uid() == 0 || Some(meta.uid()) == qemu_uid;
    let gid_ok = meta.gid() == owners.group || Some(meta.gid()) == qemu_gid;
    if meta.mode() & 0o7777 != FIFO_MODE || !uid_ok || !gid_ok {
        return Err(wrong_modes(path, meta, FIFO_MODE, owners.group));
    }
    Ok(())
}

fn wrong_modes(path: &Path, meta: &fs::Metadata, mode: u32, group: u32) -> FileError {
    FileError::WrongModes {
        path: path.to_owned(),
        found: format!(
            "mode {:04o}, owner {}",
            meta.mode() & 0o7777,
            owner_name(meta.uid(), meta.gid())
        ),
        expected: format!("mode {mode:04o}, owner {}", owner_name(0, group)),
        fix: format!(
            "chown root:{} {p} && chmod {mode:04o} {p}",
            group_name(group),
            p = path.display()
        ),
    }
}

/// Fails if QEMU could not reach `folder` through its existing ancestors.
fn check_qemu_can_enter(folder: &Path, owners: &Owners) -> Result<(), FileError> {
    let Some((uid, gid)) = owners.qemu else {
        return Ok(());
    };
    for dir in folder.ancestors().skip(1) {
        let Ok(meta) = fs::metadata(dir) else {
            // Missing: setup creates it with ROOT_MODE.
            continue;
        };
        let mode = meta.mode();
        let may_enter = if meta.uid() == uid {
            mode & 0o100 != 0
        } else if meta.gid() == gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !may_enter {
            return Err(FileError::QemuCannotEnter {
                path: dir.to_owned(),
                mode: mode & 0o7777,
                owner: owner_name(meta.uid(), meta.gid()),
                uid,
                gid,
            });
        }
    }
    Ok(())
}

/// `user:group` by name where the names are known, else by number.
pub fn owner_name(uid: u32, gid: u32) -> String {
    let user = nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |user| user.name);
    format!("{user}:{}", group_name(gid))
}

/// A group's name, or its number when it has none.
pub fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(gid.into())
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |group| group.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_names_map_to_their_vcpu() {
        assert_eq!(cpu_of_fifo_name("trace-path-cpu0.in"), Some(0));
        assert_eq!(cpu_of_fifo_name("trace-path-cpu12.out"), Some(12));
        for name in [
            "trace-path-cpu0",
            "trace-path-cpu01.in",
            "agent-ctl-path.in",
            "trace-path-cpu1.inx",
            "setup.json",
        ] {
            assert_eq!(cpu_of_fifo_name(name), None, "{name}");
        }
    }

    #[test]
    fn folder_names_must_be_one_path_component() {
        for name in ["", ".", "..", "a/b", "nul\0"] {
            assert!(
                matches!(
                    DomainFolder::new(Path::new("/x"), name),
                    Err(FileError::BadDomainName(_))
                ),
                "{name:?}"
            );
        }
        let folder = DomainFolder::new(Path::new("/x"), "web 1").unwrap();
        assert_eq!(
            folder.fifo(3, End::Out),
            Path::new("/x/web 1/trace-path-cpu3.out")
        );
        assert_eq!(folder.socket(), Path::new("/x/web 1/agent-ctl-path.sock"));
    }
}
