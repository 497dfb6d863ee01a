//! Serve's own socket: how `tvctl status` asks what serve does, and how `tvctl trace`,
//! `setup` and `teardown` borrow a domain that serve holds (docs/protocol.md §12).
//!
//! One JSON object per line each way. The socket lives under `/run/tvctl` (0700) and is
//! 0600; a peer that is not root is refused. A borrower keeps its connection open for as long
//! as it holds the domain: when it closes (also when the borrower crashes), serve takes the
//! domain back.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where sockets go.
pub const RUN_DIR: &str = "/run/tvctl";

/// The socket of the serve that serves `dir`: `serve.sock` for the default folder,
/// `serve-<FNV-1a-64 of the path, 16 hex digits>.sock` for any other.
pub fn socket_path(dir: &Path) -> PathBuf {
    let run = Path::new(RUN_DIR);
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if dir == Path::new(crate::cli::DEFAULT_DIR) {
        return run.join("serve.sock");
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in dir.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    run.join(format!("serve-{hash:016x}.sock"))
}

/// A request on serve's socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Lend {
        domain: String,
        pid: u32,
        what: String,
    },
}

/// Serve's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<DomainState>,
}

/// What serve does with one domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainState {
    pub domain: String,
    /// `waiting` (for the agent, or for another tvctl's lock), `connected`, `recording`,
    /// `lent` (to a `tvctl trace`, `setup` or `teardown`).
    pub state: String,
    pub detail: String,
}

/// Binds serve's socket: refuses when another serve answers on it.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))?;
    }
    if UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("another tvctl serve listens on {}", path.display()),
        ));
    }
    let _ = std::fs::remove_file(path);
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    listener
}

/// Whether the peer is root.
pub fn peer_is_root(stream: &UnixStream) -> bool {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .is_ok_and(|c| c.uid() == 0)
}

/// One request line from a connection.
pub fn read_request(reader: &mut BufReader<UnixStream>) -> Option<Request> {
    let mut line = String::new();
    // A request is one short line: cap what a peer can make us buffer.
    let n = reader.by_ref().take(64 * 1024).read_line(&mut line).ok()?;
    if n == 0 {
        return None;
    }
    serde_json::from_str(line.trim()).ok()
}

pub fn write_answer(stream: &mut UnixStream, answer: &Answer) -> std::io::Result<()> {
    let mut line = serde_json::to_string(answer).map_err(std::io::Error::other)?;
    line.push('\n');
    stream.write_all(line.as_bytes())
}

/// A client connection to the serve of `dir`; `None` when no serve runs.
fn connect(dir: &Path) -> Option<UnixStream> {
    let s = UnixStream::connect(socket_path(dir)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    Some(s)
}

fn ask(stream: &mut UnixStream, req: &Request) -> std::io::Result<Answer> {
    let mut line = serde_json::to_string(req).map_err(std::io::Error::other)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut answer = String::new();
    reader.read_line(&mut answer)?;
    serde_json::from_str(answer.trim()).map_err(std::io::Error::other)
}

/// What the serve of `dir` does, or `None` when none runs.
pub fn status(dir: &Path) -> Option<Answer> {
    let mut s = connect(dir)?;
    ask(&mut s, &Request::Status).ok()
}

/// A domain borrowed from serve: serve takes it back when this is dropped.
#[derive(Debug)]
pub struct Loan {
    _stream: UnixStream,
}

/// Asks the serve of `dir` to release `domain` for this process (`what`: "tracing", …).
/// `Ok(None)` when no serve runs; `Err(text)` when serve refuses (the text names the holder).
pub fn borrow(dir: &Path, domain: &str, what: &str) -> Result<Option<Loan>, String> {
    let Some(mut s) = connect(dir) else {
        return Ok(None);
    };
    let req = Request::Lend {
        domain: domain.to_string(),
        pid: std::process::id(),
        what: what.to_string(),
    };
    match ask(&mut s, &req) {
        Ok(a) if a.ok => {
            let _ = s.set_read_timeout(None);
            Ok(Some(Loan { _stream: s }))
        }
        Ok(a) => Err(a.error.unwrap_or_else(|| "tvctl serve refused".into())),
        Err(e) => Err(format!("tvctl serve did not answer: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_json() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"op":"status"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Lend {
                domain: "web1".into(),
                pid: 7,
                what: "tracing".into()
            })
            .unwrap(),
            r#"{"op":"lend","domain":"web1","pid":7,"what":"tracing"}"#
        );
        let a = Answer {
            ok: false,
            error: Some("busy".into()),
            ..Answer::default()
        };
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"ok":false,"error":"busy"}"#
        );
    }

    #[test]
    fn socket_names_depend_on_the_folder() {
        let a = socket_path(Path::new("/nonexistent/a"));
        let b = socket_path(Path::new("/nonexistent/b"));
        assert_ne!(a, b);
        assert!(
            a.to_string_lossy().starts_with("/run/tvctl/serve-"),
            "{a:?}"
        );
        assert_eq!(a, socket_path(Path::new("/nonexistent/a")));
    }
}
