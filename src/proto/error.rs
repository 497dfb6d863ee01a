//! The error type of the wire protocol.
//!
//! Callers must tell two families apart: errors after which the byte stream can
//! no longer be split into frames (the session must close or resync), and errors
//! in one well-delimited frame (answer `Error` and go on). [`ProtoError::is_fatal`]
//! draws that line; [`ProtoError::reply_code`] says what to answer.

use super::message::ErrorCode;
use super::HEADER_LEN;

/// What went wrong while framing, encoding or decoding a message.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The frame does not start with `TVCT`.
    #[error("frame starts with {found:02x?} instead of the magic \"TVCT\": the peer is not a tvctl agent/host or the stream lost sync")]
    BadMagic { found: [u8; 4] },

    /// The header's flags are not zero (version 1 defines none).
    #[error("frame has flags {flags:#x}, but protocol version 1 defines none: the peer is buggy or newer")]
    BadFlags { flags: u32 },

    /// The payload length is over `MAX_PAYLOAD`; nothing was allocated for it.
    #[error("frame payload of {len} bytes is over the 1 MiB limit: the stream is corrupt or the peer is buggy")]
    Oversized { len: u64 },

    /// The stream ended inside a frame.
    #[error(
        "stream ended inside a frame ({have} of {need} bytes): the peer went away mid-message"
    )]
    Truncated { have: usize, need: usize },

    /// A well-framed frame of a kind this side does not know (or kind 0).
    #[error("unknown message kind {kind}: the peer speaks a different protocol version")]
    UnknownKind { kind: u16 },

    /// A field breaks its encoding rule or its limit.
    #[error("bad field {what}: out of range, over its limit, or not enough bytes left")]
    BadField { what: &'static str },

    /// Bytes left after the last field of a message.
    #[error("{extra} bytes left after the last field of message kind {kind}")]
    TrailingBytes { kind: u16, extra: usize },

    /// A frame at a protocol version this side does not speak.
    #[error("protocol version {version} is not spoken here (supported: {min}..={max})", min = super::MIN_PROTOCOL_VERSION, max = super::PROTOCOL_VERSION)]
    UnsupportedVersion { version: u16 },

    /// Reading or writing the byte stream failed.
    #[error("control channel I/O failed")]
    Io(#[from] std::io::Error),
}

impl ProtoError {
    /// True if the stream can no longer be split into frames: the session must
    /// end (host) or resync on the next `Hello` (agent).
    pub fn is_fatal(&self) -> bool {
        match self {
            Self::BadMagic { .. }
            | Self::Oversized { .. }
            | Self::Truncated { .. }
            | Self::Io(_) => true,
            Self::BadFlags { .. }
            | Self::UnknownKind { .. }
            | Self::BadField { .. }
            | Self::TrailingBytes { .. }
            | Self::UnsupportedVersion { .. } => false,
        }
    }

    /// The `Error` code to answer a non-fatal error with; `None` when fatal
    /// (there is no frame to answer).
    pub fn reply_code(&self) -> Option<ErrorCode> {
        match self {
            Self::BadFlags { .. } | Self::BadField { .. } | Self::TrailingBytes { .. } => {
                Some(ErrorCode::BadFrame)
            }
            Self::UnknownKind { .. } => Some(ErrorCode::UnknownKind),
            Self::UnsupportedVersion { .. } => Some(ErrorCode::UnsupportedVersion),
            Self::BadMagic { .. }
            | Self::Oversized { .. }
            | Self::Truncated { .. }
            | Self::Io(_) => None,
        }
    }

    /// A truncated header: `have` of the header's bytes arrived.
    pub(crate) fn truncated_header(have: usize) -> Self {
        Self::Truncated {
            have,
            need: HEADER_LEN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_errors_are_fatal_and_have_no_reply() {
        let fatal = [
            ProtoError::BadMagic { found: *b"XXXX" },
            ProtoError::Oversized { len: u64::MAX },
            ProtoError::truncated_header(3),
            ProtoError::Io(std::io::Error::other("x")),
        ];
        for e in fatal {
            assert!(e.is_fatal(), "{e}");
            assert_eq!(e.reply_code(), None, "{e}");
        }
    }

    #[test]
    fn errors_inside_a_frame_are_not_fatal_and_have_a_reply() {
        let cases = [
            (ProtoError::BadFlags { flags: 1 }, ErrorCode::BadFrame),
            (ProtoError::BadField { what: "x" }, ErrorCode::BadFrame),
            (
                ProtoError::TrailingBytes { kind: 9, extra: 1 },
                ErrorCode::BadFrame,
            ),
            (
                ProtoError::UnknownKind { kind: 999 },
                ErrorCode::UnknownKind,
            ),
            (
                ProtoError::UnsupportedVersion { version: 7 },
                ErrorCode::UnsupportedVersion,
            ),
        ];
        for (e, code) in cases {
            assert!(!e.is_fatal(), "{e}");
            assert_eq!(e.reply_code(), Some(code), "{e}");
        }
    }
}
