//! Property and robustness tests of the wire protocol: any message survives
//! encode → decode however the bytes are split, and no input (random, cut short,
//! lying about lengths, of unknown kind) panics the decoder or desynchronises it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{self, Read};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

use tvctl::proto::limits::{MAX_PAYLOAD, METADATA_CHUNK};
use tvctl::proto::{
    read_message, CpuStopped, ErrorCode, ErrorMessage, FrameDecoder, FrameHeader, Hello,
    HelloReply, Message, MessageKind, Metadata, Ping, Pong, ProtoError, RecordRequest, Started,
    StopReason, Stopped, HEADER_LEN, PROTOCOL_VERSION,
};

// ---- strategies -------------------------------------------------------------

/// Short strings, including non-ASCII, well inside every cap.
fn text() -> impl Strategy<Value = String> {
    "\\PC{0,24}"
}

fn texts() -> impl Strategy<Value = Vec<String>> {
    vec(text(), 0..6)
}

fn u32s() -> impl Strategy<Value = Vec<u32>> {
    vec(any::<u32>(), 0..8)
}

fn hello() -> impl Strategy<Value = Message> {
    (any::<u16>(), any::<u16>(), text(), any::<u64>()).prop_map(|(min, max, sw, nonce)| {
        Message::Hello(Hello {
            min_version: min,
            max_version: max,
            software: sw,
            nonce,
        })
    })
}

fn hello_reply() -> impl Strategy<Value = Message> {
    (
        (any::<u16>(), any::<u64>(), text(), text()),
        (any::<u32>(), any::<u32>(), texts(), u32s()),
    )
        .prop_map(
            |((version, nonce, agent, kernel), (cpus, page, clocks, ports))| {
                Message::HelloReply(HelloReply {
                    version,
                    nonce,
                    agent_version: agent,
                    kernel_release: kernel,
                    cpus,
                    page_size: page,
                    trace_clocks: clocks,
                    data_ports: ports,
                })
            },
        )
}

fn record_request() -> impl Strategy<Value = Message> {
    (
        texts(),
        any::<Option<u32>>(),
        proptest::option::of(text()),
        texts(),
        any::<u64>(),
    )
        .prop_map(|(events, buffer_kb, clock, command, stream_nonce)| {
            Message::RecordRequest(RecordRequest {
                events,
                buffer_kb,
                clock,
                command,
                stream_nonce,
            })
        })
}

fn started() -> impl Strategy<Value = Message> {
    (
        text(),
        texts(),
        u32s(),
        any::<u32>(),
        text(),
        any::<bool>(),
        text(),
    )
        .prop_map(|(instance, events, cpus, buffer_kb, clock, splice, note)| {
            Message::Started(Started {
                instance,
                events,
                cpus,
                buffer_kb,
                clock,
                splice,
                note,
            })
        })
}

fn metadata() -> impl Strategy<Value = Message> {
    (
        text(),
        any::<u64>(),
        any::<u64>(),
        // Mostly small chunks, sometimes a full one.
        prop_oneof![
            4 => vec(any::<u8>(), 0..64),
            1 => vec(any::<u8>(), METADATA_CHUNK..=METADATA_CHUNK),
        ],
    )
        .prop_map(|(name, total_len, offset, data)| {
            Message::Metadata(Metadata {
                name,
                total_len,
                offset,
                data,
            })
        })
}

fn stop_reason() -> impl Strategy<Value = StopReason> {
    prop_oneof![
        Just(StopReason::HostRequest),
        Just(StopReason::CommandExited),
        Just(StopReason::AgentError),
        Just(StopReason::HostGone),
    ]
}

fn cpu_stopped() -> impl Strategy<Value = CpuStopped> {
    (any::<u32>(), any::<[u64; 6]>(), text()).prop_map(|(cpu, n, stats_text)| CpuStopped {
        cpu,
        bytes: n[0],
        entries: n[1],
        overrun: n[2],
        commit_overrun: n[3],
        dropped_events: n[4],
        read_events: n[5],
        stats_text,
    })
}

fn stopped() -> impl Strategy<Value = Message> {
    (
        stop_reason(),
        any::<Option<i32>>(),
        vec(cpu_stopped(), 0..5),
    )
        .prop_map(|(reason, command_status, cpus)| {
            Message::Stopped(Stopped {
                reason,
                command_status,
                cpus,
            })
        })
}

fn error() -> impl Strategy<Value = Message> {
    (any::<u32>(), text())
        .prop_map(|(code, text)| Message::Error(ErrorMessage::new(ErrorCode::from(code), text)))
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        hello(),
        hello_reply(),
        record_request(),
        started(),
        metadata(),
        Just(Message::Stop),
        stopped(),
        error(),
        any::<u64>().prop_map(|nonce| Message::Ping(Ping { nonce })),
        (any::<u64>(), text(), any::<u64>()).prop_map(|(nonce, clock, ts)| Message::Pong(Pong {
            nonce,
            clock,
            ts
        })),
        Just(Message::Close),
    ]
}

// ---- helpers ----------------------------------------------------------------

fn frame(msg: &Message) -> Vec<u8> {
    msg.encode_frame(PROTOCOL_VERSION).unwrap()
}

/// One message of every kind, for the exhaustive (non-random) tests.
fn one_of_each() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            min_version: 1,
            max_version: 1,
            software: "tvctl".into(),
            nonce: 1,
        }),
        Message::HelloReply(HelloReply {
            version: 1,
            nonce: 1,
            agent_version: "a".into(),
            kernel_release: "6.1".into(),
            cpus: 2,
            page_size: 4096,
            trace_clocks: vec!["local".into()],
            data_ports: vec![0, 1],
        }),
        Message::RecordRequest(RecordRequest {
            events: vec!["sched".into()],
            buffer_kb: Some(1),
            clock: Some("mono".into()),
            command: vec!["true".into()],
            stream_nonce: 2,
        }),
        Message::Started(Started {
            instance: "i".into(),
            events: vec!["sched:sched_switch".into()],
            cpus: vec![0],
            buffer_kb: 1,
            clock: "local".into(),
            splice: true,
            note: "n".into(),
        }),
        Message::Metadata(Metadata {
            name: "uname".into(),
            total_len: 3,
            offset: 0,
            data: b"abc".to_vec(),
        }),
        Message::Stop,
        Message::Stopped(Stopped {
            reason: StopReason::HostRequest,
            command_status: Some(0),
            cpus: vec![CpuStopped {
                cpu: 0,
                bytes: 1,
                entries: 2,
                overrun: 3,
                commit_overrun: 4,
                dropped_events: 5,
                read_events: 6,
                stats_text: "s".into(),
            }],
        }),
        Message::Error(ErrorMessage::new(ErrorCode::Busy, "busy")),
        Message::Ping(Ping { nonce: 3 }),
        Message::Pong(Pong {
            nonce: 3,
            clock: "local".into(),
            ts: 4,
        }),
        Message::Close,
    ]
}

/// Feeds `bytes` to a decoder in the given pieces and collects every outcome;
/// after a fatal error it resyncs, as the agent would.
fn decode_all(pieces: &[&[u8]]) -> Vec<Result<Message, String>> {
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    for piece in pieces {
        let mut rest = *piece;
        loop {
            let taken = dec.push(rest);
            rest = &rest[taken..];
            loop {
                match dec.next_message() {
                    Ok(Some((_, m))) => out.push(Ok(m)),
                    Ok(None) => break,
                    Err(e) if e.is_fatal() => {
                        out.push(Err(e.to_string()));
                        if !dec.resync() {
                            break;
                        }
                    }
                    Err(e) => out.push(Err(e.to_string())),
                }
            }
            if rest.is_empty() {
                break;
            }
        }
    }
    out
}

/// Splits `bytes` at the given indices (sorted, deduplicated).
fn split_at<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    at.sort_unstable();
    at.dedup();
    let mut pieces = Vec::new();
    let mut start = 0;
    for cut in at {
        pieces.push(&bytes[start..cut]);
        start = cut;
    }
    pieces.push(&bytes[start..]);
    pieces
}

fn header(kind: u16, len: u32) -> [u8; HEADER_LEN] {
    FrameHeader {
        version: PROTOCOL_VERSION,
        kind,
        len,
        flags: 0,
    }
    .to_bytes()
}

// ---- properties -------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_message_round_trips(msg in message()) {
        let bytes = frame(&msg);

        let mut reader = io::Cursor::new(&bytes);
        prop_assert_eq!(read_message(&mut reader).unwrap(), Some((PROTOCOL_VERSION, msg.clone())));
        prop_assert_eq!(
            Message::decode(u16::from(msg.kind()), &bytes[HEADER_LEN..]).unwrap(),
            msg
        );
    }

    #[test]
    fn frame_decoder_reassembles_any_split(
        msgs in vec(message(), 1..6),
        cuts in vec(any::<Index>(), 0..12),
    ) {
        let stream: Vec<u8> = msgs.iter().flat_map(frame).collect();

        let got = decode_all(&split_at(&stream, &cuts));

        let want: Vec<_> = msgs.into_iter().map(Ok).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn random_bytes_never_panic_or_hang(bytes in vec(any::<u8>(), 0..600), cuts in vec(any::<Index>(), 0..4)) {
        decode_all(&split_at(&bytes, &cuts));
        let _ = read_message(&mut io::Cursor::new(&bytes));
    }

    #[test]
    fn random_payload_of_every_kind_never_panics(kind in 0u16..14, payload in vec(any::<u8>(), 0..200)) {
        if let Err(e) = Message::decode(kind, &payload) {
            prop_assert!(!e.is_fatal(), "{}", e);
        }
    }

    #[test]
    fn corrupted_valid_payload_never_panics(msg in message(), at in any::<Index>(), byte in any::<u8>()) {
        let mut payload = msg.encode_payload().unwrap();
        if !payload.is_empty() {
            let i = at.index(payload.len());
            payload[i] = byte;
        }
        if let Err(e) = Message::decode(u16::from(msg.kind()), &payload) {
            prop_assert!(!e.is_fatal(), "{}", e);
        }
    }

    #[test]
    fn garbage_before_a_hello_is_skipped_by_resync(
        garbage in vec(any::<u8>(), 0..300),
        msg in hello(),
    ) {
        // The agent's recovery: after a fatal error it hunts for the next frame.
        let mut stream = garbage;
        stream.extend_from_slice(&frame(&msg));

        let got = decode_all(&[&stream]);

        prop_assert_eq!(got.last(), Some(&Ok(msg)));
    }
}

// ---- robustness, exhaustive ---------------------------------------------------

#[test]
fn every_cut_of_every_message_is_truncated_not_misread() {
    for msg in one_of_each() {
        let bytes = frame(&msg);
        for cut in 0..bytes.len() {
            let prefix = &bytes[..cut];

            let read = read_message(&mut io::Cursor::new(prefix));
            let mut dec = FrameDecoder::new();
            dec.push(prefix);

            if cut == 0 {
                assert!(matches!(read, Ok(None)), "{msg:?} cut {cut}");
                dec.finish().unwrap();
            } else {
                assert!(
                    matches!(read, Err(ProtoError::Truncated { .. })),
                    "{msg:?} cut {cut}: {read:?}"
                );
                assert!(
                    matches!(dec.finish(), Err(ProtoError::Truncated { .. })),
                    "{msg:?} cut {cut}"
                );
            }
            assert!(matches!(dec.next_message(), Ok(None)), "{msg:?} cut {cut}");
        }
    }
}

#[test]
fn every_short_payload_is_a_bad_field() {
    for msg in one_of_each() {
        let payload = msg.encode_payload().unwrap();
        for cut in 0..payload.len() {
            let err = Message::decode(u16::from(msg.kind()), &payload[..cut]).unwrap_err();
            assert!(
                matches!(err, ProtoError::BadField { .. }),
                "{msg:?} cut {cut}: {err}"
            );
        }
    }
}

/// A reader that fails the test if anything reads past the header: an
/// oversized header must be refused from the header alone.
struct HeaderThenPanic {
    header: io::Cursor<Vec<u8>>,
}

impl Read for HeaderThenPanic {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.header.read(buf)?;
        assert!(n > 0 || buf.is_empty(), "read past an oversized header");
        Ok(n)
    }
}

#[test]
fn header_announcing_4_gib_is_oversized_without_reading_on() {
    let head = header(u16::from(MessageKind::Metadata), u32::MAX);

    let parsed = FrameHeader::parse(&head);
    let mut dec = FrameDecoder::new();
    dec.push(&head);
    let from_decoder = dec.next_message();
    let from_reader = read_message(&mut HeaderThenPanic {
        header: io::Cursor::new(head.to_vec()),
    });

    for r in [
        parsed.map(|_| ()),
        from_decoder.map(|_| ()),
        from_reader.map(|_| ()),
    ] {
        let err = r.unwrap_err();
        assert!(
            matches!(err, ProtoError::Oversized { len } if len == u64::from(u32::MAX)),
            "{err}"
        );
        assert!(err.is_fatal());
    }
    assert!(dec.buffered() <= HEADER_LEN);
}

#[test]
fn header_just_over_max_payload_is_oversized() {
    let head = header(u16::from(MessageKind::Metadata), MAX_PAYLOAD + 1);
    assert!(matches!(
        FrameHeader::parse(&head),
        Err(ProtoError::Oversized { .. })
    ));
}

/// Payloads whose first list count (or string length) claims 0xFFFF_FFFF.
fn lying_payloads() -> Vec<(MessageKind, Vec<u8>, &'static str)> {
    let huge = [0xff, 0xff, 0xff, 0xff];
    let mut hello_reply = vec![1, 0]; // version
    hello_reply.extend_from_slice(&[0; 8]); // nonce
    hello_reply.extend_from_slice(&[0; 8]); // two empty strings
    hello_reply.extend_from_slice(&[0; 8]); // cpus, page_size
    let mut clocks = hello_reply.clone();
    clocks.extend_from_slice(&huge);
    let mut ports = hello_reply;
    ports.extend_from_slice(&[0; 4]);
    ports.extend_from_slice(&huge);

    let mut stopped = vec![1, 0];
    stopped.extend_from_slice(&huge);

    vec![
        (
            MessageKind::Hello,
            [&[1, 0, 1, 0][..], &huge].concat(),
            "hello.software",
        ),
        (MessageKind::HelloReply, clocks, "hello_reply.trace_clocks"),
        (MessageKind::HelloReply, ports, "hello_reply.data_ports"),
        (MessageKind::RecordRequest, huge.to_vec(), "record.events"),
        (MessageKind::Started, huge.to_vec(), "started.instance"),
        (
            MessageKind::Started,
            [&[0; 4][..], &huge].concat(),
            "started.events",
        ),
        (MessageKind::Metadata, huge.to_vec(), "metadata.name"),
        (
            MessageKind::Metadata,
            [&[0; 20][..], &huge].concat(),
            "metadata.data",
        ),
        (MessageKind::Stopped, stopped, "stopped.cpus"),
        (
            MessageKind::Error,
            [&[1, 0, 0, 0][..], &huge].concat(),
            "error.text",
        ),
    ]
}

#[test]
fn counts_of_4_billion_are_bad_fields() {
    for (kind, payload, what) in lying_payloads() {
        let err = Message::decode(u16::from(kind), &payload).unwrap_err();
        assert!(
            matches!(err, ProtoError::BadField { what: w } if w == what),
            "{kind:?}: {err}"
        );
        assert!(!err.is_fatal());
    }
}

#[test]
fn unknown_kind_is_consumed_and_the_next_frame_decodes() {
    let mut stream = header(999, 5).to_vec();
    stream.extend_from_slice(b"hello");
    stream.extend_from_slice(&frame(&Message::Ping(Ping { nonce: 42 })));

    let mut dec = FrameDecoder::new();
    dec.push(&stream);
    let err = dec.next_message().unwrap_err();
    assert!(matches!(err, ProtoError::UnknownKind { kind: 999 }));
    assert!(!err.is_fatal());
    assert_eq!(err.reply_code(), Some(ErrorCode::UnknownKind));
    assert_eq!(
        dec.next_message().unwrap(),
        Some((PROTOCOL_VERSION, Message::Ping(Ping { nonce: 42 })))
    );

    let mut reader = io::Cursor::new(&stream);
    assert!(matches!(
        read_message(&mut reader),
        Err(ProtoError::UnknownKind { kind: 999 })
    ));
    assert_eq!(
        read_message(&mut reader).unwrap(),
        Some((PROTOCOL_VERSION, Message::Ping(Ping { nonce: 42 })))
    );
}

#[test]
fn bad_field_frame_is_consumed_and_the_next_frame_decodes() {
    let mut bad = header(u16::from(MessageKind::Started), 4).to_vec();
    bad.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    bad.extend_from_slice(&frame(&Message::Close));

    let got = decode_all(&[&bad]);

    assert_eq!(got.len(), 2);
    assert!(got[0].is_err());
    assert_eq!(got[1], Ok(Message::Close));
}

// ---- "without allocating": a global allocator that records, per thread, the
// largest single allocation, so the tests below can prove a lying length never
// reaches `Vec::with_capacity`.

struct PeakAlloc;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: the slot may be gone while a thread is being torn down.
    let _ = PEAK.try_with(|p| p.set(p.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the
// `GlobalAlloc` contract; we only record sizes in a const thread-local cell,
// which itself never allocates.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` was allocated by `System` with `layout` (all our
        // allocations go there), as our caller guarantees for us.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// Runs `f` and returns the largest single allocation it made on this thread.
fn peak_allocation(f: impl FnOnce()) -> usize {
    PEAK.with(|p| p.set(0));
    f();
    PEAK.with(Cell::get)
}

/// Far below any length the lying inputs announce, above what decoding them needs.
const SMALL: usize = 4096;

#[test]
fn peak_allocation_sees_a_big_vec() {
    let peak = peak_allocation(|| drop(std::hint::black_box(vec![0u8; 1 << 20])));
    assert!(peak >= 1 << 20, "allocation tracking is broken: {peak}");
}

#[test]
fn oversized_header_allocates_nothing_big() {
    let head = header(u16::from(MessageKind::Metadata), u32::MAX);

    let peak = peak_allocation(|| {
        let mut dec = FrameDecoder::new();
        dec.push(&head);
        assert!(dec.next_message().is_err());
        let mut r = io::Cursor::new(head.to_vec()).chain(io::repeat(0));
        assert!(read_message(&mut r).is_err());
    });

    assert!(peak < SMALL, "allocated {peak} bytes for a lying header");
}

#[test]
fn lying_counts_allocate_nothing_big() {
    for (kind, payload, what) in lying_payloads() {
        let peak = peak_allocation(|| {
            assert!(Message::decode(u16::from(kind), &payload).is_err());
        });
        assert!(peak < SMALL, "{what}: allocated {peak} bytes");
    }
}

#[test]
fn count_that_fits_the_cap_but_not_the_bytes_allocates_nothing_big() {
    // 1 000 CpuStopped (under MAX_CPUS) need 56 000 bytes; only 100 follow.
    let mut payload = vec![1, 0];
    payload.extend_from_slice(&1000u32.to_le_bytes());
    payload.extend_from_slice(&[0; 100]);

    let peak = peak_allocation(|| {
        let err = Message::decode(u16::from(MessageKind::Stopped), &payload).unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::BadField {
                    what: "stopped.cpus"
                }
            ),
            "{err}"
        );
    });

    assert!(peak < SMALL, "allocated {peak} bytes");
}
