//! Target `messages`: every message kind's payload decoder, with a round trip.
//!
//! Input: one byte, the message kind (all of 0..=255, so unknown kinds are tried too), then the
//! payload. A payload that decodes must re-encode to exactly its own bytes (the encoding is
//! canonical: strict tags, no trailing bytes, the same caps both ways), decode again to the same
//! message, and survive a whole frame through [`FrameDecoder`].

use tvctl::proto::{FrameDecoder, Message, PROTOCOL_VERSION};

use crate::alloc_guard;

pub fn run(data: &[u8]) {
    // A message holds its payload's bytes, a few times over while being re-encoded.
    alloc_guard::budget(data.len(), 16);
    let Some((&kind, payload)) = data.split_first() else {
        return;
    };
    let kind = u16::from(kind);
    let Ok(msg) = Message::decode(kind, payload) else {
        return;
    };

    assert_eq!(u16::from(msg.kind()), kind, "decoded as another kind");
    let again = msg
        .encode_payload()
        .expect("a message that decoded must encode");
    assert_eq!(again, payload, "re-encoding changed the bytes of {msg:?}");
    assert_eq!(
        Message::decode(kind, &again).expect("re-encoded payload decodes"),
        msg
    );

    // Over MAX_PAYLOAD the frame is refused, rightly: a payload is not always a frame.
    if let Ok(frame) = msg.encode_frame(PROTOCOL_VERSION) {
        let mut dec = FrameDecoder::new();
        assert_eq!(dec.push(&frame), frame.len(), "one frame always fits");
        let got = dec.next_message().expect("our own frame decodes");
        assert_eq!(got, Some((PROTOCOL_VERSION, msg)));
        assert_eq!(dec.buffered(), 0);
    }
}
