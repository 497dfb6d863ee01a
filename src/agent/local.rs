//! The agent's local socket: how `tvctl-agent record` inside the guest reaches the running
//! agent, which owns the ports (docs/protocol.md §4.12, §12).
//!
//! The socket is root-only (bound under umask 077, so it is never 0666 even for a moment).
//! One client at a time. The client speaks version-3 frames without a `Hello`: one
//! `RecordOffer`, then `Stop` (or it closes the socket). Everything here is non-blocking: the
//! agent's control loop calls [`LocalSocket::accept`] and [`Client::read`] once per tick.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::proto::{ErrorCode, ErrorMessage, FrameDecoder, Message, PROTOCOL_VERSION};

/// Where the agent listens unless `$TVCTL_AGENT_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/tvctl-agent.sock";

/// How long the host may take to answer an offer.
pub const OFFER_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after accepting an offer the host may take to send its `RecordRequest`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new client may take to send its offer.
const OFFER_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket path in effect.
pub fn socket_path() -> PathBuf {
    std::env::var_os("TVCTL_AGENT_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// The listening socket.
pub struct LocalSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl LocalSocket {
    /// Binds `path` (0600). A socket file left by an earlier agent is replaced; anything else
    /// in the way is an error (the agent then runs without local recordings).
    pub fn bind(path: &Path) -> io::Result<LocalSocket> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another tvctl-agent listens on {}", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let listener = bound?;
        listener.set_nonblocking(true)?;
        Ok(LocalSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// A new connection, if one waits.
    pub fn accept(&self) -> Option<Client> {
        let (stream, _) = self.listener.accept().ok()?;
        Client::new(stream).ok()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// For poll(2): readable when a client connects.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.listener.as_fd()
    }
}

impl Drop for LocalSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a client's read produced.
pub enum ClientInput {
    Nothing,
    Message(Message),
    /// The client closed its socket, or sent bytes that are not frames.
    Gone,
}

/// One connected `tvctl-agent record`.
pub struct Client {
    stream: UnixStream,
    decoder: FrameDecoder,
    /// The client's pid, for "another record (pid N) is running".
    pub pid: Option<i32>,
    /// When it must have sent its offer.
    pub offer_deadline: Instant,
}

impl Client {
    fn new(stream: UnixStream) -> io::Result<Client> {
        stream.set_nonblocking(true)?;
        let pid = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            .ok()
            .map(|c| c.pid());
        Ok(Client {
            stream,
            decoder: FrameDecoder::new(),
            pid,
            offer_deadline: Instant::now() + OFFER_TIMEOUT,
        })
    }

    /// For poll(2): readable when the client sends or hangs up.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.stream.as_fd()
    }

    /// The next message from the client, without waiting.
    pub fn read(&mut self) -> ClientInput {
        loop {
            match self.decoder.next_message() {
                Ok(Some((_, msg))) => return ClientInput::Message(msg),
                Ok(None) => {}
                Err(_) => return ClientInput::Gone,
            }
            let mut buf = [0u8; 4096];
            let want = buf.len().min(self.decoder.space().max(1));
            match self.stream.read(&mut buf[..want]) {
                Ok(0) => return ClientInput::Gone,
                Ok(n) => {
                    self.decoder.push(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ClientInput::Nothing,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ClientInput::Gone,
            }
        }
    }

    /// Sends one message; false if the client is gone. Frames are small and the socket
    /// buffer large, so a write that would block means the client stopped reading.
    pub fn send(&mut self, msg: &Message) -> bool {
        let Ok(frame) = msg.encode_frame(PROTOCOL_VERSION) else {
            return false;
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut rest = &frame[..];
        while !rest.is_empty() {
            match self.stream.write(rest) {
                Ok(0) => return false,
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Sends an `Error`.
    pub fn send_error(&mut self, code: ErrorCode, text: &str) -> bool {
        self.send(&Message::Error(ErrorMessage::new(code, text)))
    }
}
