//! The command of a `RecordRequest`: started in its own session (and, where systemd runs, its
//! own transient scope, so a restart of the agent's service does not kill it), with stdin on
//! /dev/null, and its stdout and stderr on pipes the control loop reads and relays to the host
//! as `CommandOutput` (protocol version 4). With an older host the output goes where the
//! agent's goes (its journal), as before.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::proto::limits::{COMMAND_OUTPUT_CHUNK, MAX_COMMAND_OUTPUT};
use crate::proto::{CommandOutput, OutputStream};

/// Most chunks taken from one pipe per look, so one chatty command cannot hold the control
/// loop (a `Ping` waits behind at most this much).
const CHUNKS_PER_LOOK: usize = 4;

/// A running guest command and its output pipes.
pub struct GuestCommand {
    pub child: Child,
    /// Readable once the command exits (pidfd_open(2), Linux 5.3+), so the control loop
    /// wakes at once instead of polling for its end; None where the kernel lacks it.
    pidfd: Option<OwnedFd>,
    /// stdout and stderr, while open; `None` without relay or after EOF.
    pipes: [Option<File>; 2],
    relayed: u64,
    over_cap_said: bool,
}

impl GuestCommand {
    /// Starts `prog args`. `relay`: pipe its output for `CommandOutput`.
    pub fn spawn(prog: &str, args: &[String], relay: bool) -> io::Result<GuestCommand> {
        let mut cmd = if systemd_runs() {
            // A transient scope of its own: `systemd-run --scope` execs the command in place
            // (same pid, same pipes) once systemd has moved it out of the agent's cgroup.
            let mut c = Command::new(systemd_run().unwrap_or("systemd-run"));
            c.args(["--scope", "--quiet", "--collect", "--"])
                .arg(prog)
                .args(args);
            c
        } else {
            let mut c = Command::new(prog);
            c.args(args);
            c
        };
        cmd.stdin(Stdio::null());
        if relay {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // setsid(2), which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(io::Error::from)?;
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let pidfd = pidfd_open(child.id());
        let pipes = [
            child.stdout.take().map(|p| nonblocking(OwnedFd::from(p))),
            child.stderr.take().map(|p| nonblocking(OwnedFd::from(p))),
        ];
        Ok(GuestCommand {
            child,
            pidfd,
            pipes,
            relayed: 0,
            over_cap_said: false,
        })
    }

    /// The open pipes, for poll(2).
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.pipes.iter().flatten().map(AsFd::as_fd).collect()
    }

    /// What wakes the control loop: the open pipes and the pidfd (readable at exit).
    pub fn wake_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = self.fds();
        fds.extend(self.pidfd.as_ref().map(AsFd::as_fd));
        fds
    }

    /// Whether the control loop must still look for the command's end on its own.
    pub fn has_pidfd(&self) -> bool {
        self.pidfd.is_some()
    }

    /// What the command wrote since the last look, never blocking. Past
    /// [`MAX_COMMAND_OUTPUT`] the output is read and dropped (one note says so).
    pub fn read_output(&mut self) -> Vec<CommandOutput> {
        let mut out = Vec::new();
        for (i, stream) in [OutputStream::Stdout, OutputStream::Stderr]
            .into_iter()
            .enumerate()
        {
            for _ in 0..CHUNKS_PER_LOOK {
                let Some(pipe) = self.pipes[i].as_mut() else {
                    break;
                };
                let mut buf = vec![0u8; COMMAND_OUTPUT_CHUNK];
                match pipe.read(&mut buf) {
                    Ok(0) => {
                        self.pipes[i] = None;
                        break;
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        let n64 = u64::try_from(n).unwrap_or(u64::MAX);
                        if self.relayed.saturating_add(n64) > MAX_COMMAND_OUTPUT {
                            if !self.over_cap_said {
                                self.over_cap_said = true;
                                out.push(CommandOutput {
                                    stream: OutputStream::Stderr,
                                    data: format!(
                                        "\n[tvctl-agent: the command's output passed {} MiB; the rest is not relayed]\n",
                                        MAX_COMMAND_OUTPUT >> 20
                                    )
                                    .into_bytes(),
                                });
                            }
                            continue;
                        }
                        self.relayed += n64;
                        out.push(CommandOutput { stream, data: buf });
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        self.pipes[i] = None;
                        break;
                    }
                }
            }
        }
        out
    }

    /// Everything still in the pipes once the command ended (or was ended): read until both
    /// are empty or closed. A grandchild holding a pipe open does not make this wait.
    pub fn drain_output(&mut self) -> Vec<CommandOutput> {
        let mut out = Vec::new();
        loop {
            let more = self.read_output();
            if more.is_empty() {
                return out;
            }
            out.extend(more);
        }
    }
}

/// Whether `prog` can be run: a path must name an executable file; a bare name must be one
/// in `$PATH` (as the spawn will look it up). Checked before a recording starts, so a typo
/// is a refusal that changes nothing.
pub fn find_program(prog: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if prog.contains('/') {
        return if runnable(Path::new(prog)) {
            Ok(())
        } else {
            Err("no executable file there".to_string())
        };
    }
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    if path
        .split(':')
        .any(|dir| runnable(&Path::new(dir).join(prog)))
    {
        Ok(())
    } else {
        Err(format!("not found in PATH ({path})"))
    }
}

/// A pidfd for `pid` (a child of ours, so the pid cannot be reused before we reap it).
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    use std::os::fd::FromRawFd;
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn nonblocking(fd: OwnedFd) -> File {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    if let Ok(flags) = fcntl(&fd, FcntlArg::F_GETFL) {
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        let _ = fcntl(&fd, FcntlArg::F_SETFL(flags));
    }
    File::from(fd)
}

/// systemd is PID 1 (sd_booted(3)'s test).
fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").is_dir() && systemd_run().is_some()
}

fn systemd_run() -> Option<&'static str> {
    ["/usr/bin/systemd-run", "/bin/systemd-run"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn collect(cmd: &mut GuestCommand) -> (Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            for o in cmd.read_output() {
                match o.stream {
                    OutputStream::Stdout => out.extend(o.data),
                    OutputStream::Stderr => err.extend(o.data),
                }
            }
            if cmd.fds().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (out, err)
    }

    #[test]
    fn output_of_both_streams_is_read_in_order_and_the_status_kept() {
        let mut cmd = GuestCommand::spawn(
            "sh",
            &[
                "-c".into(),
                "echo out; echo err >&2; echo more; exit 3".into(),
            ],
            true,
        )
        .unwrap();
        let (out, err) = collect(&mut cmd);
        assert_eq!(out, b"out\nmore\n");
        assert_eq!(err, b"err\n");
        assert_eq!(cmd.child.wait().unwrap().code(), Some(3));
    }

    #[test]
    fn programs_are_found_as_the_spawn_would_find_them() {
        assert!(find_program("sh").is_ok());
        assert!(find_program("/bin/sh").is_ok());
        assert!(find_program("no-such-program-tvctl")
            .unwrap_err()
            .contains("not found in PATH"));
        let dir = std::env::temp_dir().join(format!("tvctl-find-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("plain");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let result = find_program(plain.to_str().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        assert!(result.is_err(), "a file without execute permission");
        assert!(find_program("/no/such/file").is_err());
    }

    #[test]
    fn the_end_of_the_command_wakes_a_poller_at_once() {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut cmd = GuestCommand::spawn("sleep", &["0.2".into()], false).unwrap();
        assert!(cmd.has_pidfd(), "Linux 5.3+ has pidfd_open");
        let start = Instant::now();
        let mut fds: Vec<PollFd> = cmd
            .wake_fds()
            .into_iter()
            .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
            .collect();
        let n = poll(&mut fds, PollTimeout::from(5000u16)).unwrap();
        drop(fds);
        assert_eq!(n, 1);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert!(cmd.child.try_wait().unwrap().is_some());
    }

    #[test]
    fn the_command_runs_in_a_session_of_its_own() {
        let mut cmd =
            GuestCommand::spawn("sh", &["-c".into(), "cat /proc/$$/stat".into()], true).unwrap();
        let pid = cmd.child.id();
        let (out, _) = collect(&mut cmd);
        let text = String::from_utf8_lossy(&out);
        // Fields after "(comm)": state ppid pgrp session.
        let after_comm = &text[text.rfind(')').unwrap() + 1..];
        let sid: u32 = after_comm
            .split_whitespace()
            .nth(3)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(sid, pid, "{text}");
        let _ = cmd.child.wait();
    }
}
