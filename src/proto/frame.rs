//! Frames: the 16-byte header, and splitting a byte stream into messages.
//!
//! The control port is a byte stream, so message boundaries come from the
//! header's length. This file turns bytes into `(version, Message)` in two ways:
//! [`FrameDecoder`] for the agent's non-blocking loop (push bytes as they come),
//! and [`read_message`]/[`write_message`] for blocking callers. Both decide
//! fatal framing errors from the header alone, before allocating or waiting for
//! a payload, and consume a well-delimited frame before reporting what is wrong
//! inside it, so the caller can answer `Error` and keep going.

use std::io::{self, Read, Write};

use super::error::ProtoError;
use super::limits::MAX_PAYLOAD;
use super::message::{Message, MessageKind};
use super::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"TVCT";

/// Size of [`FrameHeader`] on the wire.
pub const HEADER_LEN: usize = 16;

/// Largest frame a receiver ever holds. (`u32 as usize` widens on every target
/// we build for; `try_from` is not available in a const.)
const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD as usize;

/// The fixed frame header: magic, version, kind, payload length, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    /// Raw kind: unknown kinds must survive parsing so their payload can be skipped.
    pub kind: u16,
    pub len: u32,
    /// Zero in version 1; checked by [`decode_frame`], not by `parse`, because a
    /// frame with bad flags is still well delimited and can be skipped.
    pub flags: u32,
}

impl FrameHeader {
    pub fn new(version: u16, kind: MessageKind, len: u32) -> Self {
        Self {
            version,
            kind: kind.into(),
            len,
            flags: 0,
        }
    }

    /// Parses a header, failing only on what makes the stream unusable: bad
    /// magic, or a length over `MAX_PAYLOAD` (refused before any allocation).
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self, ProtoError> {
        let [m0, m1, m2, m3, v0, v1, k0, k1, l0, l1, l2, l3, f0, f1, f2, f3] = *bytes;
        let found = [m0, m1, m2, m3];
        if found != MAGIC {
            return Err(ProtoError::BadMagic { found });
        }
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        if len > MAX_PAYLOAD {
            return Err(ProtoError::Oversized { len: len.into() });
        }
        Ok(Self {
            version: u16::from_le_bytes([v0, v1]),
            kind: u16::from_le_bytes([k0, k1]),
            len,
            flags: u32::from_le_bytes([f0, f1, f2, f3]),
        })
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&self.kind.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..16].copy_from_slice(&self.flags.to_le_bytes());
        out
    }

    /// Payload length as a buffer size. `parse` bounded it to `MAX_PAYLOAD`.
    fn payload_len(&self) -> usize {
        usize::try_from(self.len).expect("a u32 fits in usize on supported targets")
    }
}

/// Decodes the payload of a frame whose header passed [`FrameHeader::parse`]:
/// checks flags and version, then the message. Every error here is non-fatal.
pub fn decode_frame(header: &FrameHeader, payload: &[u8]) -> Result<Message, ProtoError> {
    if header.flags != 0 {
        return Err(ProtoError::BadFlags {
            flags: header.flags,
        });
    }
    let frozen = MessageKind::try_from(header.kind).is_ok_and(MessageKind::is_frozen);
    let spoken = if frozen {
        header.version >= 1
    } else {
        (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&header.version)
    };
    if !spoken {
        return Err(ProtoError::UnsupportedVersion {
            version: header.version,
        });
    }
    if MessageKind::try_from(header.kind).is_ok_and(|k| k.since() > header.version) {
        return Err(ProtoError::UnknownKind { kind: header.kind });
    }
    Message::decode(header.kind, payload)
}

/// Splits a byte stream pushed in pieces into frames, for non-blocking readers.
///
/// Holds at most one maximal frame (header + `MAX_PAYLOAD`): [`push`](Self::push)
/// accepts only as many bytes as fit, and the caller keeps the rest until
/// [`next_message`](Self::next_message) has made room. A fatal error is sticky
/// (the bad bytes stay at the front) until [`resync`](Self::resync).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the first unconsumed byte in `buf`; consumed bytes are dropped
    /// lazily so decoding many small frames does not shift the buffer each time.
    start: usize,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// How many more bytes [`push`](Self::push) would accept now.
    pub fn space(&self) -> usize {
        MAX_FRAME - self.buffered()
    }

    /// Appends as much of `data` as fits and returns how many bytes were taken.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.space());
        self.compact();
        self.buf.extend_from_slice(&data[..n]);
        n
    }

    /// Reads once from `r` into the buffer (at most 64 KiB, at most
    /// [`space`](Self::space)). `Ok(0)` means end of stream, provided the
    /// caller drained [`next_message`](Self::next_message) first (then there
    /// is always space).
    pub fn read_from(&mut self, r: &mut impl Read) -> io::Result<usize> {
        const READ_CHUNK: usize = 64 * 1024;
        let want = self.space().min(READ_CHUNK);
        self.compact();
        let old_len = self.buf.len();
        self.buf.resize(old_len + want, 0);
        let res = r.read(&mut self.buf[old_len..]);
        let got = *res.as_ref().unwrap_or(&0);
        self.buf.truncate(old_len + got);
        res
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    /// The next complete message and its header version, `Ok(None)` if more
    /// bytes are needed. After a non-fatal error the bad frame is consumed and
    /// the next call goes on with the following frame.
    pub fn next_message(&mut self) -> Result<Option<(u16, Message)>, ProtoError> {
        let pending = &self.buf[self.start..];
        let Some(head) = pending.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = FrameHeader::parse(head)?;
        let end = HEADER_LEN + header.payload_len();
        if pending.len() < end {
            return Ok(None);
        }
        let payload_at = self.start + HEADER_LEN;
        self.start += end;
        let msg = decode_frame(&header, &self.buf[payload_at..self.start])?;
        Ok(Some((header.version, msg)))
    }

    /// After a fatal error: drops at least one byte, then everything before the
    /// next `TVCT`, so decoding can restart at a possible frame. Returns whether
    /// such a candidate is buffered; if not, only a possible partial magic at
    /// the end is kept and the caller should push more bytes and call again.
    pub fn resync(&mut self) -> bool {
        let pending = &self.buf[self.start..];
        if pending.is_empty() {
            return false;
        }
        match pending[1..].windows(MAGIC.len()).position(|w| w == MAGIC) {
            Some(at) => {
                self.start += 1 + at;
                true
            }
            None => {
                // Keep a tail that may be the first bytes of a magic.
                let keep = (1..MAGIC.len())
                    .rev()
                    .find(|&k| pending.len() > k && pending.ends_with(&MAGIC[..k]))
                    .unwrap_or(0);
                self.start = self.buf.len() - keep;
                false
            }
        }
    }

    /// At end of stream: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), ProtoError> {
        let pending = &self.buf[self.start..];
        let need = match pending.first_chunk::<HEADER_LEN>() {
            None if pending.is_empty() => return Ok(()),
            None => HEADER_LEN,
            Some(head) => HEADER_LEN + FrameHeader::parse(head)?.payload_len(),
        };
        Err(ProtoError::Truncated {
            have: pending.len(),
            need,
        })
    }
}

/// Reads one message from a blocking stream. `Ok(None)` at a clean end of stream
/// between frames; `Truncated` if it ends inside a frame.
pub fn read_message(r: &mut impl Read) -> Result<Option<(u16, Message)>, ProtoError> {
    let mut head = [0; HEADER_LEN];
    let mut have = 0;
    while have < HEADER_LEN {
        match r.read(&mut head[have..]) {
            Ok(0) if have == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::truncated_header(have)),
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let header = FrameHeader::parse(&head)?;
    let need = header.payload_len();
    // Bounded by MAX_PAYLOAD above; `take` stops a lying stream at `len`.
    let mut payload = Vec::with_capacity(need);
    r.take(u64::from(header.len)).read_to_end(&mut payload)?;
    if payload.len() < need {
        return Err(ProtoError::Truncated {
            have: HEADER_LEN + payload.len(),
            need: HEADER_LEN + need,
        });
    }
    let msg = decode_frame(&header, &payload)?;
    Ok(Some((header.version, msg)))
}

/// Writes `msg` as one frame at `version` and flushes.
pub fn write_message(w: &mut impl Write, version: u16, msg: &Message) -> Result<(), ProtoError> {
    let frame = msg.encode_frame(version)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::message::Ping;

    fn ping_frame(nonce: u64) -> Vec<u8> {
        Message::Ping(Ping { nonce }).encode_frame(1).unwrap()
    }

    #[test]
    fn header_round_trips() {
        let h = FrameHeader {
            version: 1,
            kind: 999,
            len: 5,
            flags: 0,
        };
        assert_eq!(FrameHeader::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn header_layout_is_magic_version_kind_len_flags() {
        let h = FrameHeader::new(0x0102, MessageKind::Pong, 0x0304_0506);
        assert_eq!(
            h.to_bytes(),
            [b'T', b'V', b'C', b'T', 0x02, 0x01, 10, 0, 0x06, 0x05, 0x04, 0x03, 0, 0, 0, 0]
        );
    }

    #[test]
    fn bad_magic_is_fatal() {
        let mut bytes = ping_frame(1);
        bytes[0] = b'X';
        let head = bytes.first_chunk::<HEADER_LEN>().unwrap();
        let err = FrameHeader::parse(head).unwrap_err();
        assert!(matches!(err, ProtoError::BadMagic { found } if &found == b"XVCT"));
        assert!(err.is_fatal());
    }

    #[test]
    fn length_over_limit_is_oversized_but_limit_itself_is_fine() {
        let mut h = FrameHeader::new(1, MessageKind::Metadata, MAX_PAYLOAD);
        assert!(FrameHeader::parse(&h.to_bytes()).is_ok());
        h.len = MAX_PAYLOAD + 1;
        let err = FrameHeader::parse(&h.to_bytes()).unwrap_err();
        assert!(matches!(err, ProtoError::Oversized { len } if len == u64::from(MAX_PAYLOAD) + 1));
    }

    #[test]
    fn nonzero_flags_consume_the_frame_and_are_not_fatal() {
        let mut bad = ping_frame(1);
        bad[12] = 1;
        let mut dec = FrameDecoder::new();
        dec.push(&bad);
        dec.push(&ping_frame(2));

        let err = dec.next_message().unwrap_err();
        assert!(matches!(err, ProtoError::BadFlags { flags: 1 }));
        assert!(!err.is_fatal());
        assert_eq!(
            dec.next_message().unwrap(),
            Some((1, Message::Ping(Ping { nonce: 2 })))
        );
    }

    #[test]
    fn unspoken_version_is_refused_except_for_frozen_kinds() {
        let ping = FrameHeader::new(PROTOCOL_VERSION + 1, MessageKind::Ping, 8);
        assert!(matches!(
            decode_frame(&ping, &[0; 8]),
            Err(ProtoError::UnsupportedVersion { version }) if version == PROTOCOL_VERSION + 1
        ));

        let error = Message::Error(crate::proto::ErrorMessage::new(
            crate::proto::ErrorCode::UnsupportedVersion,
            "no",
        ));
        let payload = error.encode_payload().unwrap();
        let len = u32::try_from(payload.len()).unwrap();
        let header = FrameHeader::new(PROTOCOL_VERSION + 5, MessageKind::Error, len);
        assert_eq!(decode_frame(&header, &payload).unwrap(), error);

        let zero = FrameHeader::new(0, MessageKind::Error, len);
        assert!(decode_frame(&zero, &payload).is_err());
    }

    #[test]
    fn decoder_waits_for_whole_frames() {
        let frame = ping_frame(7);
        let mut dec = FrameDecoder::new();
        for &b in &frame[..frame.len() - 1] {
            assert_eq!(dec.push(&[b]), 1);
            assert_eq!(dec.next_message().unwrap(), None);
        }
        dec.push(&frame[frame.len() - 1..]);
        assert_eq!(
            dec.next_message().unwrap(),
            Some((1, Message::Ping(Ping { nonce: 7 })))
        );
        assert_eq!(dec.buffered(), 0);
        dec.finish().unwrap();
    }

    #[test]
    fn decoder_never_holds_more_than_one_maximal_frame() {
        let mut dec = FrameDecoder::new();
        let big = vec![0u8; MAX_FRAME + 100];
        assert_eq!(dec.push(&big), MAX_FRAME);
        assert_eq!(dec.push(&big), 0);
        assert_eq!(dec.space(), 0);
    }

    #[test]
    fn fatal_error_is_sticky_until_resync() {
        let mut dec = FrameDecoder::new();
        dec.push(b"garbage");
        dec.push(&ping_frame(3));

        assert!(matches!(
            dec.next_message(),
            Err(ProtoError::BadMagic { .. })
        ));
        assert!(matches!(
            dec.next_message(),
            Err(ProtoError::BadMagic { .. })
        ));
        assert!(dec.resync());
        assert_eq!(
            dec.next_message().unwrap(),
            Some((1, Message::Ping(Ping { nonce: 3 })))
        );
    }

    #[test]
    fn resync_keeps_a_partial_magic_at_the_end() {
        let mut dec = FrameDecoder::new();
        dec.push(b"xxxxxxxxxxxxxxxxxxTV");
        assert!(!dec.resync());
        assert_eq!(dec.buffered(), 2);

        let frame = ping_frame(4);
        dec.push(&frame[2..]);
        assert_eq!(
            dec.next_message().unwrap(),
            Some((1, Message::Ping(Ping { nonce: 4 })))
        );
    }

    #[test]
    fn finish_reports_a_partial_frame() {
        let frame = ping_frame(5);
        let mut dec = FrameDecoder::new();
        dec.push(&frame[..20]);
        assert!(matches!(
            dec.finish(),
            Err(ProtoError::Truncated { have: 20, need: 24 })
        ));
    }

    #[test]
    fn read_from_fills_and_reports_eof() {
        let frames = [ping_frame(1), ping_frame(2)].concat();
        let mut src = io::Cursor::new(frames);
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        loop {
            while let Some((_, m)) = dec.next_message().unwrap() {
                got.push(m);
            }
            if dec.read_from(&mut src).unwrap() == 0 {
                break;
            }
        }
        assert_eq!(
            got,
            [
                Message::Ping(Ping { nonce: 1 }),
                Message::Ping(Ping { nonce: 2 })
            ]
        );
    }

    #[test]
    fn read_message_sees_clean_end_and_truncation() {
        let frame = ping_frame(9);
        let mut whole = io::Cursor::new(frame.clone());
        assert_eq!(
            read_message(&mut whole).unwrap(),
            Some((1, Message::Ping(Ping { nonce: 9 })))
        );
        assert!(read_message(&mut whole).unwrap().is_none());

        let mut cut = io::Cursor::new(frame[..10].to_vec());
        assert!(matches!(
            read_message(&mut cut),
            Err(ProtoError::Truncated { have: 10, need: 16 })
        ));
        let mut cut = io::Cursor::new(frame[..18].to_vec());
        assert!(matches!(
            read_message(&mut cut),
            Err(ProtoError::Truncated { have: 18, need: 24 })
        ));
    }

    #[test]
    fn write_then_read_round_trips() {
        let mut wire = Vec::new();
        write_message(&mut wire, 1, &Message::Close).unwrap();
        write_message(&mut wire, 1, &Message::Stop).unwrap();
        let mut r = io::Cursor::new(wire);
        assert_eq!(read_message(&mut r).unwrap(), Some((1, Message::Close)));
        assert_eq!(read_message(&mut r).unwrap(), Some((1, Message::Stop)));
    }
}
