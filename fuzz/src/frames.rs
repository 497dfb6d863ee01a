//! Target `frames`: the control port's byte stream as the host and the agent read it.
//!
//! Input: one byte that seeds how the stream is cut into pieces, then the stream. The same
//! stream goes through [`FrameDecoder`] twice (all at once, and in pieces: pushed, or through
//! `read_from` of a reader that returns them if the byte's top bit is set; `read_from` zeroes up
//! to 64 KiB per call, too slow to do for every input), through the blocking [`read_message`],
//! and its first 16 bytes through [`FrameHeader::parse`] and [`decode_frame`]. Besides "no
//! panic", every way must find the same messages and non-fatal errors, the decoder must make
//! progress on every call, and a parsed header must give back its bytes.

use std::io::{self, Cursor, Read};

use tvctl::proto::{
    decode_frame, read_message, FrameDecoder, FrameHeader, Message, ProtoError, HEADER_LEN,
};

use crate::alloc_guard;

/// What a reader made of one frame: a message with its header version, or a non-fatal error.
type Outcome = Result<(u16, Message), String>;

/// Everything one way of decoding saw.
#[derive(Debug, PartialEq)]
struct Decoded {
    outcomes: Vec<Outcome>,
    /// Index into `outcomes` where the first fatal error happened.
    first_fatal: Option<usize>,
    /// Bytes left at the end, and whether `finish` accepted them.
    left: usize,
    finish_ok: bool,
}

pub fn run(data: &[u8]) {
    // The decoder holds at most one frame plus a 64 KiB read; everything else is per message.
    alloc_guard::budget(data.len(), 8);
    let Some((&split_seed, stream)) = data.split_first() else {
        return;
    };

    let whole = decode(stream, Feed::Push, &mut || usize::MAX);
    let (feed, how) = if split_seed & 0x80 == 0 {
        (Feed::Push, "pushed in pieces")
    } else {
        (Feed::Read, "read in pieces")
    };
    let split = decode(stream, feed, &mut pieces(split_seed));
    assert_same_frames(&whole, &split, how);

    let blocking = read_blocking(stream);
    let before_fatal = &whole.outcomes[..whole.first_fatal.unwrap_or(whole.outcomes.len())];
    assert_eq!(
        blocking, before_fatal,
        "read_message and FrameDecoder disagree before the first fatal error"
    );

    if let Some(head) = stream.first_chunk::<HEADER_LEN>() {
        if let Ok(header) = FrameHeader::parse(head) {
            assert_eq!(&header.to_bytes(), head, "a parsed header re-encodes");
            let _ = decode_frame(&header, &stream[HEADER_LEN..]);
        }
    }
}

/// Fatal errors may be seen more often when the stream arrives in pieces (a partial magic kept
/// by `resync` turns out wrong), and after one the bytes left at the end may differ (garbage
/// that came after the last resync is not judged until 16 bytes are there). Everything else
/// must be identical.
fn assert_same_frames(whole: &Decoded, split: &Decoded, how: &str) {
    assert_eq!(whole.outcomes, split.outcomes, "outcomes differ when {how}");
    if whole.first_fatal.is_none() && split.first_fatal.is_none() {
        assert_eq!(
            (whole.left, whole.finish_ok),
            (split.left, split.finish_ok),
            "leftover differs when {how}"
        );
    }
}

/// Lengths of the pieces: 1 to 2^k bytes, k and the sequence chosen by `seed`.
fn pieces(seed: u8) -> impl FnMut() -> usize {
    let max = 1usize << (seed % 12);
    let mut state = u32::from(seed) | 0x9e37_7900;
    move || {
        // xorshift32: cheap and deterministic.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        usize::try_from(state).unwrap_or(usize::MAX) % max + 1
    }
}

#[derive(Clone, Copy)]
enum Feed {
    Push,
    Read,
}

/// A reader that returns at most the next piece's length per call.
struct Pieces<'a, F> {
    rest: &'a [u8],
    next_len: &'a mut F,
}

impl<F: FnMut() -> usize> Read for Pieces<'_, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.next_len)().min(buf.len()).min(self.rest.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Ok(n)
    }
}

fn decode(stream: &[u8], feed: Feed, next_len: &mut impl FnMut() -> usize) -> Decoded {
    let mut dec = FrameDecoder::new();
    let mut rest = stream;
    let mut reader = Pieces {
        rest: stream,
        next_len,
    };
    let mut out = Decoded {
        outcomes: Vec::new(),
        first_fatal: None,
        left: 0,
        finish_ok: false,
    };
    // Every call consumes a frame, drops a byte (resync), or asks for bytes that are then fed:
    // anything past this is a decoder that stopped making progress.
    let max_steps = 3 * stream.len() + 8;
    let mut steps = 0;
    loop {
        let fed = match feed {
            Feed::Push => {
                let want = (reader.next_len)().min(rest.len());
                let took = dec.push(&rest[..want]);
                rest = &rest[took..];
                took
            }
            Feed::Read => dec
                .read_from(&mut reader)
                .expect("reading a slice cannot fail"),
        };
        loop {
            steps += 1;
            assert!(steps <= max_steps, "decoder stopped making progress");
            match dec.next_message() {
                Ok(Some(msg)) => out.outcomes.push(Ok(msg)),
                Ok(None) => break,
                Err(e) if e.is_fatal() => {
                    out.first_fatal.get_or_insert(out.outcomes.len());
                    if !dec.resync() {
                        break;
                    }
                }
                Err(e) => out.outcomes.push(Err(describe(&e))),
            }
        }
        let done = match feed {
            Feed::Push => rest.is_empty(),
            Feed::Read => fed == 0 && reader.rest.is_empty(),
        };
        if done {
            break;
        }
    }
    out.left = dec.buffered();
    out.finish_ok = dec.finish().is_ok();
    assert_eq!(out.finish_ok, out.left == 0, "finish and buffered disagree");
    out
}

fn read_blocking(stream: &[u8]) -> Vec<Outcome> {
    let mut cursor = Cursor::new(stream);
    let mut outcomes = Vec::new();
    loop {
        match read_message(&mut cursor) {
            Ok(Some(msg)) => outcomes.push(Ok(msg)),
            Ok(None) => return outcomes,
            Err(e) if e.is_fatal() => return outcomes,
            Err(e) => outcomes.push(Err(describe(&e))),
        }
    }
}

fn describe(e: &ProtoError) -> String {
    format!("{e:?}")
}
