//! The host end of the control channel: connect to the socket QEMU binds for `agent-ctl-path`,
//! handshake, and exchange messages with deadlines.
//!
//! The guest is not trusted: every frame is read through the bounded decoder of
//! [`crate::proto`], replies are matched by nonce (stale replies of an earlier session are
//! discarded), and every wait has a deadline so a silent guest cannot hang the host.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::proto::{
    ErrorMessage, FrameDecoder, Hello, HelloReply, Message, ProtoError, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};

/// Errors on the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot connect to the agent's control socket {path}: {source}. Is the domain running and set up (`tvctl setup`)?")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the guest agent did not answer within {0:?}: is tvctl-agent running in the guest? (read the guest's console log)")]
    Timeout(Duration),
    #[error("the guest closed the control channel")]
    Closed,
    #[error("control channel I/O: {0}")]
    Io(#[from] io::Error),
    #[error("the guest sent a broken frame: {0}")]
    Protocol(#[from] ProtoError),
    #[error("the agent refused: {0:?}: {1}")]
    Refused(crate::proto::ErrorCode, String),
    #[error("the agent sent {0} where {1} was expected")]
    Unexpected(String, &'static str),
    #[error("interrupted (Ctrl-C or SIGTERM) while waiting for the guest agent")]
    Interrupted,
}

impl ControlError {
    fn refused(e: ErrorMessage) -> ControlError {
        ControlError::Refused(e.code, e.text)
    }
}

/// A connected, handshaken control channel.
#[derive(Debug)]
pub struct ControlChannel {
    sock: UnixStream,
    decoder: FrameDecoder,
    version: u16,
    pub hello: HelloReply,
}

impl ControlChannel {
    /// Connects to `socket` (retrying until `deadline`: QEMU may not have bound it yet) and
    /// handshakes. The agent polls for hosts every ~100 ms, so the Hello is re-sent until the
    /// answer with our nonce arrives. `interrupted()` is asked every 100 ms: Ctrl-C must end
    /// every wait.
    pub fn connect(
        socket: &Path,
        software: &str,
        timeout: Duration,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<Self, ControlError> {
        let deadline = Instant::now() + timeout;
        let sock = loop {
            if interrupted() {
                return Err(ControlError::Interrupted);
            }
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    if e.kind() == io::ErrorKind::PermissionDenied {
                        return Err(ControlError::Connect {
                            path: socket.display().to_string(),
                            source: e,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(ControlError::Connect {
                        path: socket.display().to_string(),
                        source: e,
                    })
                }
            }
        };
        let nonce = random_u64();
        let mut chan = ControlChannel {
            sock,
            decoder: FrameDecoder::new(),
            version: PROTOCOL_VERSION,
            hello: HelloReply {
                version: 0,
                nonce: 0,
                agent_version: String::new(),
                kernel_release: String::new(),
                cpus: 0,
                page_size: 0,
                trace_clocks: Vec::new(),
                data_ports: Vec::new(),
            },
        };
        let hello = Message::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            software: software.to_string(),
            nonce,
        });
        // Bytes sent while the agent was between sessions may be lost, so a Hello may go
        // unanswered; but every Hello that arrives is answered, so one is resent only after a
        // quiet while (not every second: a booting guest would answer dozens at once).
        let mut next_send = Instant::now();
        let mut resend_after = Duration::from_secs(1);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ControlError::Timeout(timeout));
            }
            if interrupted() {
                return Err(ControlError::Interrupted);
            }
            if now >= next_send {
                chan.send(&hello)?;
                next_send = now + resend_after;
                resend_after = (resend_after * 2).min(Duration::from_secs(4));
            }
            let wait = next_send
                .min(deadline)
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            match chan.recv(wait.max(Duration::from_millis(1))) {
                Ok(Message::HelloReply(r)) if r.nonce == nonce => {
                    chan.version = r.version;
                    chan.hello = r;
                    return Ok(chan);
                }
                Ok(Message::Error(e)) if e.code == crate::proto::ErrorCode::UnsupportedVersion => {
                    return Err(ControlError::refused(e));
                }
                Ok(_) => {} // stale: an earlier session's reply
                Err(ControlError::Timeout(_)) => {}
                // Bytes of an earlier connection, or garbage: skip to the next frame
                // (docs/protocol.md §9) and keep waiting for our nonce.
                Err(ControlError::Protocol(_)) => {
                    chan.decoder.resync();
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn version(&self) -> u16 {
        self.version
    }

    pub fn send(&mut self, msg: &Message) -> Result<(), ControlError> {
        let frame = msg.encode_frame(self.version)?;
        self.sock.write_all(&frame)?;
        Ok(())
    }

    /// The next message, waiting at most `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Message, ControlError> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.decoder.next_message() {
                Ok(Some((_, msg))) => return Ok(msg),
                Ok(None) => {}
                Err(e) if e.is_fatal() => return Err(e.into()),
                Err(_) => continue, // a well-framed message we cannot use: skip it
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ControlError::Timeout(timeout));
            }
            self.sock.set_read_timeout(Some(left))?;
            let want = buf.len().min(self.decoder.space().max(1));
            match self.sock.read(&mut buf[..want]) {
                Ok(0) => return Err(ControlError::Closed),
                Ok(n) => {
                    self.decoder.push(&buf[..n]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ControlError::Timeout(timeout));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends `msg` and waits for the first reply that is not a late `HelloReply` (the agent
    /// answers every Hello it received, also those of the handshake's retries), and not a
    /// `Pong` or `SyncReply` of an earlier ping or probe. Asks
    /// `interrupted()` every 100 ms.
    pub fn request(
        &mut self,
        msg: &Message,
        timeout: Duration,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<Message, ControlError> {
        self.send(msg)?;
        let ping_nonce = match msg {
            Message::Ping(p) => Some(p.nonce),
            _ => None,
        };
        let probe_nonce = match msg {
            Message::SyncProbe(p) => Some(p.nonce),
            _ => None,
        };
        let deadline = Instant::now() + timeout;
        loop {
            if interrupted() {
                return Err(ControlError::Interrupted);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ControlError::Timeout(timeout));
            }
            match self.recv(left.min(Duration::from_millis(100))) {
                Ok(Message::Error(e)) => return Err(ControlError::refused(e)),
                // Late answers: to the handshake's retried Hellos, and to pings and probes
                // sent before this request (tvctl serve keeps an idle session alive with
                // pings). The answer to a Ping or SyncProbe request is the one with its nonce.
                Ok(Message::HelloReply(_)) | Err(ControlError::Timeout(_)) => continue,
                Ok(Message::Pong(p)) if Some(p.nonce) != ping_nonce => continue,
                Ok(Message::SyncReply(r)) if Some(r.nonce) != probe_nonce => continue,
                Ok(other) => return Ok(other),
                Err(e) => return Err(e),
            }
        }
    }

    /// Says goodbye (best effort) and shuts the socket.
    pub fn close(mut self) {
        let _ = self.send(&Message::Close);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// The raw socket, for callers that poll it together with other descriptors.
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }
}

/// What tvctl says it is in its `Hello` (the agent names it in messages to guest users):
/// `tvctl 0.1.0 trace (pid 1234)`.
pub fn host_software(role: &str) -> String {
    format!(
        "tvctl {} {role} (pid {})",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    )
}

/// A random u64 for nonces (no RNG crate needed: the kernel's).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    let v = u64::from_le_bytes(b);
    if v == 0 {
        // Never 0: the clock is good enough as a last resort.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(1))
            .unwrap_or(1)
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Ping, Pong, RecordRequest, Started};
    use std::os::unix::net::UnixListener;

    /// A fake agent that handshakes, then answers each request with `answers`.
    fn agent(listener: UnixListener, answers: Vec<Vec<Message>>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            let mut dec = FrameDecoder::new();
            let mut buf = [0u8; 4096];
            let mut answers = answers.into_iter();
            loop {
                let msg = loop {
                    if let Ok(Some((_, m))) = dec.next_message() {
                        break m;
                    }
                    let n = sock.read(&mut buf).unwrap();
                    if n == 0 {
                        return;
                    }
                    dec.push(&buf[..n]);
                };
                let replies = match msg {
                    Message::Hello(h) => vec![Message::HelloReply(HelloReply {
                        version: PROTOCOL_VERSION,
                        nonce: h.nonce,
                        agent_version: "t".into(),
                        kernel_release: "k".into(),
                        cpus: 1,
                        page_size: 4096,
                        trace_clocks: vec![],
                        data_ports: vec![0],
                    })],
                    _ => match answers.next() {
                        Some(r) => r,
                        None => return,
                    },
                };
                for r in replies {
                    sock.write_all(&r.encode_frame(PROTOCOL_VERSION).unwrap())
                        .unwrap();
                }
            }
        })
    }

    fn pong(nonce: u64) -> Message {
        Message::Pong(Pong {
            nonce,
            clock: "mono".into(),
            ts: 1,
        })
    }

    #[test]
    fn requests_skip_late_pongs_but_a_ping_gets_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let started = Message::Started(Started {
            instance: "i".into(),
            events: vec![],
            cpus: vec![0],
            buffer_kb: 4,
            clock: "mono".into(),
            splice: true,
            note: String::new(),
        });
        let fake = agent(
            listener,
            vec![vec![pong(1), started.clone()], vec![pong(2), pong(9)]],
        );
        let never = &mut || false;
        let mut chan = ControlChannel::connect(&path, "t", Duration::from_secs(5), never).unwrap();
        let request = Message::RecordRequest(RecordRequest {
            events: vec![],
            buffer_kb: None,
            clock: None,
            command: vec![],
            stream_nonce: 1,
        });
        let got = chan
            .request(&request, Duration::from_secs(5), never)
            .unwrap();
        assert_eq!(got, started, "a Pong of an earlier ping is not the answer");
        let got = chan
            .request(
                &Message::Ping(Ping { nonce: 9 }),
                Duration::from_secs(5),
                never,
            )
            .unwrap();
        assert_eq!(got, pong(9));
        chan.close();
        fake.join().unwrap();
    }
}
