//! A record of every file change made so far, so that a failed setup or teardown can put the
//! host's files back exactly as they were: created paths are removed, removed FIFOs, files
//! and folders come back with their modes and owners. Only the control socket cannot come
//! back (libvirt makes it at the next domain start), so removals of sockets are not recorded.
//!
//! A journal that is dropped without [`Journal::commit`] rolls back, so a panic half-way
//! through an operation also leaves the files as they were.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::stat::Mode;

use super::mounts::filesystem_of;
use super::{lstat, FileError, FileKind, FileOp};

/// What to do to undo one change.
#[derive(Debug)]
enum Undo {
    RemoveDir(PathBuf),
    RemoveFile(PathBuf),
    RemoveIfPresent(PathBuf),
    Recreate {
        path: PathBuf,
        kind: FileKind,
        mode: u32,
        uid: u32,
        gid: u32,
        contents: Option<Vec<u8>>,
    },
}

/// Some changes could not be undone; the message lists them so a person can finish the job.
#[derive(Debug, thiserror::Error)]
#[error("could not undo every file change; fix these by hand: {}", .0.join("; "))]
pub struct RollbackError(pub Vec<String>);

/// The changes made so far, newest last.
#[derive(Debug, Default)]
pub struct Journal {
    undo: Vec<Undo>,
}

impl Journal {
    pub fn new() -> Journal {
        Journal::default()
    }

    /// Applies `op`, recording how to undo it; a half-done `op` is recorded too, so that
    /// [`Journal::rollback`] after a failure leaves nothing of it behind.
    pub fn apply(&mut self, op: &FileOp) -> Result<(), FileError> {
        match op {
            FileOp::CreateDir { path, mode, gid } => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(path)
                    .map_err(|e| FileError::io("create folder", path, e))?;
                self.undo.push(Undo::RemoveDir(path.clone()));
                set_owner_and_mode(path, *gid, *mode)
            }
            FileOp::CreateFifo { path, gid } => {
                // Created private, then handed to the group: never open to the wrong group.
                nix::unistd::mkfifo(path.as_path(), Mode::from_bits_truncate(0o600))
                    .map_err(|errno| unsupported_or_io("create FIFO", path, "FIFOs", errno))?;
                self.undo.push(Undo::RemoveFile(path.clone()));
                set_owner_and_mode(path, *gid, super::FIFO_MODE)
            }
            FileOp::Remove { path, kind } => self.remove(path, *kind),
        }
    }

    /// Writes `contents` to `path` (mode `mode`, owner root:root), replacing what is there;
    /// rollback restores the old contents or removes the file.
    pub fn write_file(&mut self, path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
        let before = self.snapshot(path, FileKind::File)?;
        let tmp = path.with_extension("tmp");
        // A leftover from a crash would make create_new fail.
        let _ = fs::remove_file(&tmp);
        let write = || -> io::Result<()> {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            file.set_permissions(fs::Permissions::from_mode(mode))?;
            file.write_all(contents)?;
            file.sync_all()?;
            fs::rename(&tmp, path)
        };
        if let Err(err) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(FileError::io("write", path, err));
        }
        self.undo
            .push(before.unwrap_or(Undo::RemoveFile(path.to_owned())));
        Ok(())
    }

    /// Records that something else (libvirt) is about to create `path`, so that a rollback
    /// removes it if it is there by then.
    pub fn expect_created(&mut self, path: &Path) {
        if !path.exists() {
            self.undo.push(Undo::RemoveIfPresent(path.to_owned()));
        }
    }

    /// Forgets the record: the changes stay.
    pub fn commit(mut self) {
        self.undo.clear();
    }

    /// Undoes every recorded change, newest first, and empties the record.
    pub fn rollback(&mut self) -> Result<(), RollbackError> {
        let mut failures = Vec::new();
        while let Some(undo) = self.undo.pop() {
            if let Err(message) = undo_one(&undo) {
                failures.push(message);
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(RollbackError(failures))
        }
    }

    fn remove(&mut self, path: &Path, kind: FileKind) -> Result<(), FileError> {
        let snapshot = self.snapshot(path, kind)?;
        let removed = if kind == FileKind::Dir {
            fs::remove_dir(path)
        } else {
            fs::remove_file(path)
        };
        match removed {
            Ok(()) => {}
            // Gone already (libvirt removes the socket at shutdown): nothing to undo.
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(FileError::io("remove", path, err)),
        }
        if let Some(undo) = snapshot {
            self.undo.push(undo);
        }
        Ok(())
    }

    /// How to bring back `path` as it is now, if it exists and can be brought back.
    fn snapshot(&self, path: &Path, kind: FileKind) -> Result<Option<Undo>, FileError> {
        let Some(meta) = lstat(path)? else {
            return Ok(None);
        };
        let contents = match kind {
            FileKind::File => Some(fs::read(path).map_err(|e| FileError::io("read", path, e))?),
            FileKind::Dir | FileKind::Fifo => None,
            _ => return Ok(None),
        };
        Ok(Some(Undo::Recreate {
            path: path.to_owned(),
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            contents,
        }))
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Err(err) = self.rollback() {
            eprintln!("tvctl: {err}");
        }
    }
}

fn undo_one(undo: &Undo) -> Result<(), String> {
    let describe = |what: &str, path: &Path, err: &dyn std::fmt::Display| {
        format!("{what} {}: {err}", path.display())
    };
    match undo {
        Undo::RemoveDir(path) => {
            fs::remove_dir(path).map_err(|e| describe("remove folder", path, &e))
        }
        Undo::RemoveFile(path) => fs::remove_file(path).map_err(|e| describe("remove", path, &e)),
        Undo::RemoveIfPresent(path) => match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(describe("remove", path, &e)),
            _ => Ok(()),
        },
        Undo::Recreate {
            path,
            kind,
            mode,
            uid,
            gid,
            contents,
        } => {
            let created = match kind {
                FileKind::Dir => fs::DirBuilder::new().mode(0o700).create(path),
                FileKind::Fifo => {
                    nix::unistd::mkfifo(path.as_path(), Mode::from_bits_truncate(0o600))
                        .map_err(io::Error::from)
                }
                _ => fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .and_then(|mut file| file.write_all(contents.as_deref().unwrap_or_default())),
            };
            created.map_err(|e| describe("recreate", path, &e))?;
            std::os::unix::fs::chown(path, Some(*uid), Some(*gid))
                .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(*mode)))
                .map_err(|e| describe("restore owner and mode of", path, &e))
        }
    }
}

/// root:`gid`, then `mode`: the group is right before the group bits open.
fn set_owner_and_mode(path: &Path, gid: u32, mode: u32) -> Result<(), FileError> {
    std::os::unix::fs::chown(path, Some(0), Some(gid)).map_err(|err| {
        let errno = Errno::from_raw(err.raw_os_error().unwrap_or(0));
        unsupported_or_io("set the owner of", path, "Unix owners", errno)
    })?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|err| {
        let errno = Errno::from_raw(err.raw_os_error().unwrap_or(0));
        unsupported_or_io("set the mode of", path, "Unix modes", errno)
    })
}

/// Errors that root only gets from a filesystem lacking a feature (vfat, bpffs, some FUSE
/// filesystems) become [`FileError::Unsupported`], naming the filesystem.
fn unsupported_or_io(op: &'static str, path: &Path, what: &'static str, errno: Errno) -> FileError {
    let unsupported = matches!(errno, Errno::EPERM | Errno::EINVAL | Errno::EOPNOTSUPP);
    if unsupported {
        if let Some(fs) = filesystem_of(path) {
            return FileError::Unsupported {
                op,
                path: path.to_owned(),
                what,
                fs: fs.fstype,
                mount_point: fs.mount_point,
                source: io::Error::from(errno),
            };
        }
    }
    FileError::io(op, path, io::Error::from(errno))
}
