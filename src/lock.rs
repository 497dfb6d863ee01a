//! One answer to "who holds this domain": `tvctl trace`, `setup` and `teardown` take an
//! exclusive `flock(2)` on the domain's folder (`<dir>/<domain>`) for as long as they run.
//!
//! Two traces of one domain would open the same FIFOs and steal each other's pages; a setup
//! during a trace would rewrite the channels under it. The lock makes the second comer stop at
//! once, before it touches anything, with the holder's pid from the kernel's lock table
//! (`/proc/locks`), so no pid file can go stale. The lock is tied to an open descriptor, so a
//! crashed holder releases it by dying. While a domain's folder does not exist yet (its first
//! `setup`), the root folder is locked instead, and waited for (up to 30 s): two first
//! setups of any domains take turns, which costs a moment.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a domain could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another tvctl{} is {what} {domain}: wait for it to finish{}", holder_pid(*.pid), stop_hint(*.pid))]
    Held {
        domain: String,
        pid: Option<u32>,
        /// "tracing", "setting up", … from the holder's command line.
        what: String,
    },
    /// `tvctl serve` holds the domain and would not lend it (a guest recording runs).
    #[error("{domain} is busy: {text}")]
    ServeRefused { domain: String, text: String },
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn holder_pid(pid: Option<u32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

fn stop_hint(pid: Option<u32>) -> String {
    pid.map(|p| format!(", or stop it (kill -INT {p})"))
        .unwrap_or_default()
}

/// An exclusive hold on a domain; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct DomainLock {
    _file: File,
    path: PathBuf,
}

impl DomainLock {
    /// Locks `<root>/<domain>` (or, while that folder does not exist, `root` or its nearest
    /// existing ancestor: taking a lock never creates anything), without waiting.
    pub fn acquire(root: &Path, domain: &str) -> Result<DomainLock, LockError> {
        let folder = root.join(domain);
        let path = std::iter::once(folder.as_path())
            .chain(root.ancestors())
            .find(|p| p.is_dir())
            .unwrap_or(Path::new("/"))
            .to_path_buf();
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // The folder's lock is held for a whole trace: the second comer is told at once. The
        // root's is held only by first setups, for a moment: wait for it (bounded).
        let patience = if path == folder {
            Duration::ZERO
        } else {
            Duration::from_secs(30)
        };
        let start = Instant::now();
        loop {
            // SAFETY: flock on a descriptor we own; it has no memory effects.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(err));
            }
            if start.elapsed() < patience {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let meta = file.metadata().map_err(io)?;
            let pid = lock_holder(meta.dev(), meta.ino());
            return Err(LockError::Held {
                domain: domain.to_string(),
                pid,
                what: pid.map_or_else(|| "using".to_string(), activity_of),
            });
        }
        Ok(DomainLock { _file: file, path })
    }

    /// The exit code for a failure to lock: 15 when another tvctl holds the domain.
    pub fn exit_code(err: &LockError) -> crate::exitcode::ExitCode {
        use crate::exitcode::ExitCode;
        match err {
            LockError::Held { .. } | LockError::ServeRefused { .. } => ExitCode::Busy,
            LockError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                ExitCode::PermissionDenied
            }
            LockError::Io { .. } => ExitCode::HostFileConflict,
        }
    }

    /// The folder that is locked.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A domain held for one command: its lock and, when `tvctl serve` held it, the loan that
/// serve takes back when this is dropped (after the lock: fields drop in order).
#[derive(Debug)]
pub struct DomainHold {
    pub lock: DomainLock,
    _loan: Option<crate::serve::socket::Loan>,
}

impl DomainHold {
    /// Locks `<root>/<domain>` as [`DomainLock::acquire`]; when `tvctl serve` holds it, asks
    /// serve to lend it (`what`: "tracing", …) and locks it then.
    pub fn acquire(root: &Path, domain: &str, what: &str) -> Result<DomainHold, LockError> {
        match DomainLock::acquire(root, domain) {
            Ok(lock) => Ok(DomainHold { lock, _loan: None }),
            Err(LockError::Held { what: held, .. }) if held == "serving" => {
                let loan = crate::serve::socket::borrow(root, domain, what).map_err(|text| {
                    LockError::ServeRefused {
                        domain: domain.to_string(),
                        text,
                    }
                })?;
                // Serve drops its lock before it answers; a moment of grace for the kernel.
                let start = Instant::now();
                loop {
                    match DomainLock::acquire(root, domain) {
                        Ok(lock) => return Ok(DomainHold { lock, _loan: loan }),
                        Err(e) if start.elapsed() > Duration::from_secs(3) => return Err(e),
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            }
            Err(e) => Err(e),
        }
    }
}

/// The pid holding a FLOCK on (dev, ino), from `/proc/locks`.
fn lock_holder(dev: u64, ino: u64) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/locks").ok()?;
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    table
        .lines()
        .find_map(|line| parse_lock_line(line, major, minor, ino))
}

/// `1: FLOCK  ADVISORY  WRITE 1234 fd:01:56789 0 EOF` → 1234 if the device and inode match.
/// The kernel prints major and minor in hex, the inode in decimal.
fn parse_lock_line(line: &str, major: u32, minor: u32, ino: u64) -> Option<u32> {
    let mut words = line.split_whitespace();
    words.next()?; // "1:"
    if words.next()? != "FLOCK" {
        return None;
    }
    let pid: u32 = words.nth(2)?.parse().ok()?;
    let mut id = words.next()?.split(':');
    let maj = u32::from_str_radix(id.next()?, 16).ok()?;
    let min = u32::from_str_radix(id.next()?, 16).ok()?;
    let inode: u64 = id.next()?.parse().ok()?;
    (maj == major && min == minor && inode == ino).then_some(pid)
}

/// What the holder does, from its command line (`tvctl … trace dom` → "tracing").
fn activity_of(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    activity_in(&cmdline).to_string()
}

fn activity_in(cmdline: &[u8]) -> &'static str {
    for arg in cmdline.split(|&b| b == 0) {
        match arg {
            b"trace" => return "tracing",
            b"setup" => return "setting up",
            b"teardown" => return "tearing down",
            b"serve" => return "serving",
            _ => {}
        }
    }
    "using"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("web1")).unwrap();
        let held = DomainLock::acquire(root.path(), "web1").unwrap();

        let err = DomainLock::acquire(root.path(), "web1").unwrap_err();

        let LockError::Held { pid, domain, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(*pid, Some(std::process::id()));
        assert_eq!(domain, "web1");
        assert!(err.to_string().contains("web1"), "{err}");
        drop(held);
        DomainLock::acquire(root.path(), "web1").expect("free again once dropped");
    }

    #[test]
    fn a_domain_without_folder_locks_the_root() {
        let root = tempfile::tempdir().unwrap();
        let held = DomainLock::acquire(root.path(), "new").unwrap();
        assert_eq!(held.path(), root.path());
        let root2 = root.path().to_path_buf();
        let waiter = std::thread::spawn(move || DomainLock::acquire(&root2, "other").is_ok());
        std::thread::sleep(Duration::from_millis(200));
        drop(held);
        assert!(waiter.join().unwrap(), "a first setup waits for the other");
    }

    #[test]
    fn lock_lines_parse_hex_devices_and_skip_posix_locks() {
        let line = "3: FLOCK  ADVISORY  WRITE 4242 fd:01:123456 0 EOF";
        assert_eq!(parse_lock_line(line, 0xfd, 1, 123456), Some(4242));
        assert_eq!(parse_lock_line(line, 0xfd, 1, 123457), None);
        let posix = "1: POSIX  ADVISORY  WRITE 77 fd:01:123456 0 EOF";
        assert_eq!(parse_lock_line(posix, 0xfd, 1, 123456), None);
    }

    #[test]
    fn activity_comes_from_the_subcommand() {
        assert_eq!(activity_in(b"tvctl\0--dir\0/x\0trace\0web1\0"), "tracing");
        assert_eq!(activity_in(b"tvctl\0teardown\0web1\0"), "tearing down");
        assert_eq!(activity_in(b"python3\0x\0"), "using");
    }
}
