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

/// Blocks until `fd` is writable (for destinations opened non-blocking).
pub fn wait_writable(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::from(1000u16)) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
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
}
