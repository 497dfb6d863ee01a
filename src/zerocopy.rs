//! Moving bytes between file descriptors without copying them through user space.
//!
//! Both ends of tvctl move raw ring-buffer pages with splice(2) through an intermediate pipe:
//! the agent from `trace_pipe_raw` to a virtio port, the host from a FIFO to a file. This module
//! is that one mechanism, with the read/write fallback for systems where splice fails.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};

/// A pipe used as the middle of a splice: source → pipe → destination.
#[derive(Debug)]
pub struct SplicePipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

/// What one `pull` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pulled {
    /// This many bytes are now in the pipe.
    Bytes(usize),
    /// The source had nothing ready (non-blocking).
    WouldBlock,
    /// End of file on the source.
    Eof,
}

impl SplicePipe {
    /// A pipe of `capacity` bytes (rounded by the kernel; at least one page).
    pub fn new(capacity: usize) -> io::Result<SplicePipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let want = i32::try_from(capacity).unwrap_or(i32::MAX);
        // A bigger pipe means fewer system calls; if the kernel refuses, keep its default.
        let capacity = match fcntl(&write, FcntlArg::F_SETPIPE_SZ(want)) {
            Ok(n) => usize::try_from(n).unwrap_or(capacity),
            Err(_) => 65536,
        };
        Ok(SplicePipe {
            read,
            write,
            capacity,
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Splices up to `max` bytes from `src` into the pipe. `nonblock` asks the source not to wait.
    pub fn pull(&self, src: impl AsFd, max: usize, nonblock: bool) -> io::Result<Pulled> {
        let mut flags = SpliceFFlags::SPLICE_F_MOVE;
        if nonblock {
            flags |= SpliceFFlags::SPLICE_F_NONBLOCK;
        }
        loop {
            match splice(src.as_fd(), None, &self.write, None, max, flags) {
                Ok(0) => return Ok(Pulled::Eof),
                Ok(n) => return Ok(Pulled::Bytes(n)),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(Pulled::WouldBlock),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Splices up to `max` of the bytes in the pipe to `dst`, in one call: `Ok(Some(k))` moved
    /// `k` > 0 bytes, `Ok(None)` means a non-blocking `dst` is full. For callers that bound their
    /// waits themselves (the agent's pumps); [`SplicePipe::push_all`] waits as long as it takes.
    pub fn push(&self, dst: impl AsFd, max: usize) -> io::Result<Option<usize>> {
        loop {
            match splice(
                &self.read,
                None,
                dst.as_fd(),
                None,
                max,
                SpliceFFlags::SPLICE_F_MOVE,
            ) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "splice to the destination moved nothing",
                    ))
                }
                Ok(k) => return Ok(Some(k)),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Moves exactly `n` bytes that are in the pipe to `dst` (blocking on `dst` as needed).
    pub fn push_all(&self, dst: impl AsFd, mut n: usize) -> io::Result<()> {
        while n > 0 {
            match splice(
                &self.read,
                None,
                dst.as_fd(),
                None,
                n,
                SpliceFFlags::SPLICE_F_MOVE,
            ) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "splice to the destination moved nothing",
                    ))
                }
                Ok(k) => n -= k,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => wait_writable(dst.as_fd())?,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Waits up to a second until `fd` is writable (for destinations opened non-blocking).
pub fn wait_writable(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    wait_writable_for(fd, std::time::Duration::from_secs(1)).map(|_| ())
}

/// Waits up to `timeout` until `fd` is writable; true if it said so. poll(2) returning early
/// without `POLLOUT` (a hang-up or an error: a virtio port whose host side is closed reports
/// `POLLHUP` at once) waits out `timeout`, so callers that loop never spin.
pub fn wait_writable_for(
    fd: std::os::fd::BorrowedFd<'_>,
    timeout: std::time::Duration,
) -> io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let start = std::time::Instant::now();
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) | Err(Errno::EINTR) => {
            let writable = fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLOUT));
            if !writable {
                std::thread::sleep(timeout.saturating_sub(start.elapsed()));
            }
            Ok(writable)
        }
        Err(e) => Err(e.into()),
    }
}

/// Waits up to `timeout` until `fd` has data. A hang-up without data (a FIFO with no writer
/// reports one at once) also waits out `timeout`, so callers that loop never spin.
pub fn wait_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    timeout: std::time::Duration,
) -> io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) | Err(Errno::EINTR) => {
            let hung_up = fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLHUP) && !r.contains(PollFlags::POLLIN));
            if hung_up {
                std::thread::sleep(timeout);
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes what `fd` takes of `buf` in one call: `Ok(Some(k))` wrote `k` > 0 bytes, `Ok(None)`
/// means a non-blocking `fd` is full. The bounded counterpart of [`write_all_fd`].
pub fn write_some(fd: impl AsFd, buf: &[u8]) -> io::Result<Option<usize>> {
    loop {
        match nix::unistd::write(fd.as_fd(), buf) {
            Ok(0) if !buf.is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write moved nothing",
                ))
            }
            Ok(n) => return Ok(Some(n)),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes all of `buf` to `fd`, waiting when it is non-blocking and full.
pub fn write_all_fd(fd: impl AsFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(fd.as_fd(), buf) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write moved nothing",
                ))
            }
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => wait_writable(fd.as_fd())?,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn splice_moves_file_bytes_through_the_pipe() {
        let mut src = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        src.write_all(&data).unwrap();
        src.rewind().unwrap();
        let mut dst = tempfile::tempfile().unwrap();
        let pipe = SplicePipe::new(1 << 16).unwrap();
        let mut moved = 0;
        loop {
            match pipe.pull(&src, pipe.capacity(), false).unwrap() {
                Pulled::Bytes(n) => {
                    pipe.push_all(&dst, n).unwrap();
                    moved += n;
                }
                Pulled::Eof => break,
                Pulled::WouldBlock => unreachable!("regular files never block"),
            }
        }
        assert_eq!(moved, data.len());
        dst.rewind().unwrap();
        let mut back = Vec::new();
        dst.read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }

    /// A non-blocking pipe filled up to the brim.
    fn full_pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).unwrap();
        let chunk = [7u8; 4096];
        while write_some(&w, &chunk).unwrap().is_some() {}
        (r, w)
    }

    #[test]
    fn one_step_writes_say_would_block_instead_of_waiting() {
        // Arrange: a destination that takes nothing more, and a splice pipe holding a page.
        let (_keep_reader, dst) = full_pipe();
        let mut src = tempfile::tempfile().unwrap();
        src.write_all(&[1u8; 4096]).unwrap();
        src.rewind().unwrap();
        let pipe = SplicePipe::new(1 << 16).unwrap();
        assert_eq!(pipe.pull(&src, 4096, false).unwrap(), Pulled::Bytes(4096));

        // Act + Assert: both one-step writers come back at once with None.
        let start = std::time::Instant::now();
        assert_eq!(pipe.push(&dst, 4096).unwrap(), None);
        assert_eq!(write_some(&dst, b"x").unwrap(), None);
        assert!(start.elapsed() < std::time::Duration::from_millis(500));
    }

    #[test]
    fn waiting_to_write_on_a_hung_up_fd_sleeps_instead_of_spinning() {
        // Arrange: a full pipe whose reader is gone: poll(2) reports POLLERR (and no POLLOUT)
        // at once, as a virtio port whose host side closed reports POLLHUP.
        let (r, w) = full_pipe();
        drop(r);
        let timeout = std::time::Duration::from_millis(200);

        // Act
        let start = std::time::Instant::now();
        let writable = wait_writable_for(w.as_fd(), timeout).unwrap();

        // Assert: not writable, and the whole timeout was slept.
        assert!(!writable);
        assert!(start.elapsed() >= timeout - std::time::Duration::from_millis(20));
    }

    #[test]
    fn waiting_to_write_returns_at_once_when_there_is_room() {
        let (_r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).unwrap();
        let start = std::time::Instant::now();
        assert!(wait_writable_for(w.as_fd(), std::time::Duration::from_secs(5)).unwrap());
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }
}
