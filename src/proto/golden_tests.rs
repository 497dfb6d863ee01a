//! Golden bytes: one fixed value per message and the exact frame it must encode
//! to, written from `docs/protocol.md`, not from the encoder. A layout change
//! breaks these on purpose: it is a protocol change and needs a version bump.

use super::*;

/// Parses hex digits, ignoring whitespace and `|` separators.
fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'|')
        .collect();
    assert!(digits.len() % 2 == 0, "odd number of hex digits");
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).unwrap();
            u8::from_str_radix(pair, 16).unwrap_or_else(|_| panic!("bad hex {pair:?}"))
        })
        .collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Asserts `msg` encodes to exactly `want` at the version in `want`'s header (layouts of
/// version 1 are unchanged in version 2) and that `want` decodes to `msg`.
fn assert_golden(msg: Message, want: &str) {
    let want = hex(want);
    let head = want.first_chunk::<HEADER_LEN>().unwrap();
    let header = FrameHeader::parse(head).unwrap();

    let got = msg.encode_frame(header.version).unwrap();

    assert_eq!(to_hex(&got), to_hex(&want), "encoding of {msg:?}");
    let mut dec = FrameDecoder::new();
    dec.push(&want);
    assert_eq!(
        dec.next_message().unwrap(),
        Some((header.version, msg.clone()))
    );
    assert_eq!(header.kind, u16::from(msg.kind()));
    assert_eq!(
        Message::decode(header.kind, &want[HEADER_LEN..]).unwrap(),
        msg
    );
}

#[test]
fn hello_matches_documented_example() {
    let msg = Message::Hello(Hello {
        min_version: 1,
        max_version: 1,
        software: "tvctl 0.1.0".into(),
        nonce: 0x1122_3344_5566_7788,
    });
    assert_golden(
        msg,
        "54 56 43 54 | 01 00 | 01 00 | 1b 00 00 00 | 00 00 00 00
         01 00 | 01 00
         0b 00 00 00 74 76 63 74 6c 20 30 2e 31 2e 30
         88 77 66 55 44 33 22 11",
    );
}

#[test]
fn hello_reply_golden() {
    let msg = Message::HelloReply(HelloReply {
        version: 1,
        nonce: 0x1122_3344_5566_7788,
        agent_version: "a1".into(),
        kernel_release: "6.1".into(),
        cpus: 2,
        page_size: 4096,
        trace_clocks: vec!["local".into(), "mono".into()],
        data_ports: vec![0, 1],
    });
    assert_golden(
        msg,
        "54 56 43 54 | 01 00 | 02 00 | 40 00 00 00 | 00 00 00 00
         01 00
         88 77 66 55 44 33 22 11
         02 00 00 00 61 31
         03 00 00 00 36 2e 31
         02 00 00 00
         00 10 00 00
         02 00 00 00 | 05 00 00 00 6c 6f 63 61 6c | 04 00 00 00 6d 6f 6e 6f
         02 00 00 00 | 00 00 00 00 | 01 00 00 00",
    );
}

#[test]
fn record_request_golden() {
    let msg = Message::RecordRequest(RecordRequest {
        events: vec!["sched".into(), "irq:*".into()],
        buffer_kb: Some(1024),
        clock: None,
        command: vec!["ls".into(), "-l".into()],
        stream_nonce: 0x0807_0605_0403_0201,
    });
    assert_golden(
        msg,
        "54 56 43 54 | 01 00 | 03 00 | 34 00 00 00 | 00 00 00 00
         02 00 00 00 | 05 00 00 00 73 63 68 65 64 | 05 00 00 00 69 72 71 3a 2a
         01 | 00 04 00 00
         00
         02 00 00 00 | 02 00 00 00 6c 73 | 02 00 00 00 2d 6c
         01 02 03 04 05 06 07 08",
    );
}

#[test]
fn record_request_with_clock_golden() {
    let msg = Message::RecordRequest(RecordRequest {
        events: vec![],
        buffer_kb: None,
        clock: Some("mono".into()),
        command: vec![],
        stream_nonce: 1,
    });
    assert_golden(
        msg,
        "54 56 43 54 | 01 00 | 03 00 | 1a 00 00 00 | 00 00 00 00
         00 00 00 00
         00
         01 | 04 00 00 00 6d 6f 6e 6f
         00 00 00 00
         01 00 00 00 00 00 00 00",
    );
}

#[test]
fn started_golden() {
    let msg = Message::Started(Started {
        instance: "tvctl-1".into(),
        events: vec!["sched:sched_switch".into()],
        cpus: vec![0, 1],
        buffer_kb: 1408,
        clock: "local".into(),
        splice: true,
        note: String::new(),
    });
    assert_golden(
        msg,
        "54 56 43 54 | 01 00 | 04 00 | 43 00 00 00 | 00 00 00 00
         07 00 00 00 74 76 63 74 6c 2d 31
         01 00 00 00 | 12 00 00 00 73 63 68 65 64 3a 73 63 68 65 64 5f 73 77 69 74 63 68
         02 00 00 00 | 00 00 00 00 | 01 00 00 00
         80 05 00 00
         05 00 00 00 6c 6f 63 61 6c
         01
         00 00 00 00",
    );
}

#[test]
fn metadata_golden() {
    let msg = Message::Metadata(Metadata {
        name: "uname".into(),
        total_len: 10,
        offset: 4,
        data: b"x\n".to_vec(),
    });
    assert_golden(
        msg,
        "54 56 43 54 | 01 00 | 05 00 | 1f 00 00 00 | 00 00 00 00
         05 00 00 00 75 6e 61 6d 65
         0a 00 00 00 00 00 00 00
         04 00 00 00 00 00 00 00
         02 00 00 00 78 0a",
    );
}

#[test]
fn stop_golden() {
    assert_golden(
        Message::Stop,
        "54 56 43 54 | 01 00 | 06 00 | 00 00 00 00 | 00 00 00 00",
    );
}

#[test]
fn stopped_golden() {
    let msg = Message::Stopped(Stopped {
        reason: StopReason::CommandExited,
        command_status: Some(-9),
        cpus: vec![CpuStopped {
            cpu: 1,
            bytes: 0x1000,
            entries: 5,
            overrun: 0,
            commit_overrun: 0,
            dropped_events: 1,
            read_events: 2,
            stats_text: "ok".into(),
        }],
    });
    assert_golden(
        msg,
        "54 56 43 54 | 01 00 | 07 00 | 44 00 00 00 | 00 00 00 00
         02
         01 | f7 ff ff ff
         01 00 00 00
         01 00 00 00
         00 10 00 00 00 00 00 00
         05 00 00 00 00 00 00 00
         00 00 00 00 00 00 00 00
         00 00 00 00 00 00 00 00
         01 00 00 00 00 00 00 00
         02 00 00 00 00 00 00 00
         02 00 00 00 6f 6b",
    );
}

#[test]
fn stopped_without_command_golden() {
    let msg = Message::Stopped(Stopped {
        reason: StopReason::HostRequest,
        command_status: None,
        cpus: vec![],
    });
    assert_golden(
        msg,
        "54 56 43 54 | 01 00 | 07 00 | 06 00 00 00 | 00 00 00 00
         01 | 00 | 00 00 00 00",
    );
}

#[test]
fn error_golden() {
    let msg = Message::Error(ErrorMessage::new(ErrorCode::UnknownEvent, "no foo"));
    assert_golden(
        msg,
        "54 56 43 54 | 01 00 | 08 00 | 0e 00 00 00 | 00 00 00 00
         04 00 00 00
         06 00 00 00 6e 6f 20 66 6f 6f",
    );
}

#[test]
fn error_with_unknown_code_golden() {
    let msg = Message::Error(ErrorMessage::new(ErrorCode::Other(77), ""));
    assert_golden(
        msg,
        "54 56 43 54 | 01 00 | 08 00 | 08 00 00 00 | 00 00 00 00
         4d 00 00 00 | 00 00 00 00",
    );
}

#[test]
fn ping_matches_documented_example() {
    assert_golden(
        Message::Ping(Ping {
            nonce: 0x0102_0304_0506_0708,
        }),
        "54 56 43 54 | 01 00 | 09 00 | 08 00 00 00 | 00 00 00 00
         08 07 06 05 04 03 02 01",
    );
}

#[test]
fn pong_golden() {
    let msg = Message::Pong(Pong {
        nonce: 1,
        clock: "mono".into(),
        ts: 0x0102,
    });
    assert_golden(
        msg,
        "54 56 43 54 | 01 00 | 0a 00 | 18 00 00 00 | 00 00 00 00
         01 00 00 00 00 00 00 00
         04 00 00 00 6d 6f 6e 6f
         02 01 00 00 00 00 00 00",
    );
}

#[test]
fn close_golden() {
    assert_golden(
        Message::Close,
        "54 56 43 54 | 01 00 | 0b 00 | 00 00 00 00 | 00 00 00 00",
    );
}

#[test]
fn kind_numbers_are_the_documented_ones() {
    let kinds = [
        (MessageKind::Invalid, 0),
        (MessageKind::Hello, 1),
        (MessageKind::HelloReply, 2),
        (MessageKind::RecordRequest, 3),
        (MessageKind::Started, 4),
        (MessageKind::Metadata, 5),
        (MessageKind::Stop, 6),
        (MessageKind::Stopped, 7),
        (MessageKind::Error, 8),
        (MessageKind::Ping, 9),
        (MessageKind::Pong, 10),
        (MessageKind::Close, 11),
        (MessageKind::SyncProbe, 12),
        (MessageKind::SyncReply, 13),
        (MessageKind::ServeReady, 14),
        (MessageKind::RecordOffer, 15),
        (MessageKind::OfferAnswer, 16),
        (MessageKind::RecordDone, 17),
        (MessageKind::CommandOutput, 18),
    ];
    for (kind, n) in kinds {
        assert_eq!(u16::from(kind), n);
        assert_eq!(MessageKind::try_from(n).unwrap(), kind);
    }
    assert!(matches!(
        MessageKind::try_from(19),
        Err(ProtoError::UnknownKind { kind: 19 })
    ));
}

#[test]
fn sync_probe_matches_documented_example() {
    assert_golden(
        Message::SyncProbe(SyncProbe {
            nonce: 0x0102_0304_0506_0708,
        }),
        "54 56 43 54 | 02 00 | 0c 00 | 08 00 00 00 | 00 00 00 00
         08 07 06 05 04 03 02 01",
    );
}

#[test]
fn sync_reply_matches_documented_example() {
    assert_golden(
        Message::SyncReply(SyncReply {
            nonce: 5,
            clock: "x86-tsc".into(),
            before: 1000,
            after: 1010,
            marked: true,
        }),
        "54 56 43 54 | 02 00 | 0d 00 | 24 00 00 00 | 00 00 00 00
         05 00 00 00 00 00 00 00 | 07 00 00 00 78 38 36 2d 74 73 63
         e8 03 00 00 00 00 00 00 | f2 03 00 00 00 00 00 00 | 01",
    );
}

#[test]
fn version_2_kinds_in_a_version_1_frame_are_unknown() {
    let mut frame = Message::SyncProbe(SyncProbe { nonce: 1 })
        .encode_frame(2)
        .unwrap();
    frame[4] = 1; // header version 1
    let mut dec = FrameDecoder::new();
    dec.push(&frame);

    let err = dec.next_message().unwrap_err();

    assert!(matches!(err, ProtoError::UnknownKind { kind: 12 }), "{err}");
    assert!(!err.is_fatal());
}

#[test]
fn error_codes_are_the_documented_ones() {
    let codes = [
        (ErrorCode::BadFrame, 1),
        (ErrorCode::UnknownKind, 2),
        (ErrorCode::UnsupportedVersion, 3),
        (ErrorCode::UnknownEvent, 4),
        (ErrorCode::UnknownClock, 5),
        (ErrorCode::BadBufferSize, 6),
        (ErrorCode::Busy, 7),
        (ErrorCode::Tracefs, 8),
        (ErrorCode::Command, 9),
        (ErrorCode::Internal, 10),
        (ErrorCode::NotRecording, 11),
        (ErrorCode::BadRequest, 12),
        (ErrorCode::NoServe, 13),
        (ErrorCode::Other(0), 0),
        (ErrorCode::Other(14), 14),
    ];
    for (code, n) in codes {
        assert_eq!(u32::from(code), n);
        assert_eq!(ErrorCode::from(n), code);
    }
}

#[test]
fn stop_reasons_are_the_documented_ones_and_others_are_bad() {
    for (reason, n) in [
        (StopReason::HostRequest, 1),
        (StopReason::CommandExited, 2),
        (StopReason::AgentError, 3),
        (StopReason::HostGone, 4),
        (StopReason::GuestRequest, 5),
    ] {
        assert_eq!(StopReason::try_from(n).unwrap(), reason);
    }
    assert!(StopReason::try_from(0).is_err());
    assert!(Message::decode(7, &hex("06 00 00 00 00 00")).is_err());
}

#[test]
fn kind_zero_is_unknown() {
    assert!(matches!(
        Message::decode(0, &[]),
        Err(ProtoError::UnknownKind { kind: 0 })
    ));
}

#[test]
fn trailing_byte_after_last_field_is_refused() {
    let err = Message::decode(6, &[0]).unwrap_err();
    assert!(matches!(
        err,
        ProtoError::TrailingBytes { kind: 6, extra: 1 }
    ));
    assert!(!err.is_fatal());
}

#[test]
fn bad_bool_in_started_is_refused() {
    let mut payload = Message::Started(Started {
        instance: String::new(),
        events: vec![],
        cpus: vec![],
        buffer_kb: 0,
        clock: String::new(),
        splice: false,
        note: String::new(),
    })
    .encode_payload()
    .unwrap();
    // instance(4) events(4) cpus(4) buffer_kb(4) clock(4), then splice.
    payload[20] = 2;
    assert!(matches!(
        Message::decode(4, &payload),
        Err(ProtoError::BadField {
            what: "started.splice"
        })
    ));
}

#[test]
fn encoder_refuses_fields_over_their_caps() {
    let too_many_events = Message::RecordRequest(RecordRequest {
        events: vec!["e".into(); limits::MAX_EVENTS_PER_REQUEST + 1],
        buffer_kb: None,
        clock: None,
        command: vec![],
        stream_nonce: 0,
    });
    assert!(matches!(
        too_many_events.encode_frame(1),
        Err(ProtoError::BadField {
            what: "record.events"
        })
    ));

    let big_chunk = Message::Metadata(Metadata {
        name: "kallsyms".into(),
        total_len: 0,
        offset: 0,
        data: vec![0; limits::METADATA_CHUNK + 1],
    });
    assert!(matches!(
        big_chunk.encode_frame(1),
        Err(ProtoError::BadField {
            what: "metadata.data"
        })
    ));
}

#[test]
fn encoder_refuses_payload_over_max_payload() {
    // Each field is within its cap, but together they pass 1 MiB.
    let msg = Message::RecordRequest(RecordRequest {
        events: vec![],
        buffer_kb: None,
        clock: None,
        command: vec!["x".repeat(limits::MAX_STRING); 17],
        stream_nonce: 0,
    });
    assert!(matches!(
        msg.encode_frame(1),
        Err(ProtoError::Oversized { .. })
    ));
}

#[test]
fn error_text_is_cut_at_a_char_boundary() {
    let long = "é".repeat(limits::MAX_TEXT);
    let msg = ErrorMessage::new(ErrorCode::Internal, long);
    assert_eq!(msg.text.len(), limits::MAX_TEXT);
    assert!(Message::Error(msg).encode_frame(1).is_ok());
}

#[test]
fn serve_ready_matches_documented_example() {
    assert_golden(
        Message::ServeReady(ServeReady {
            host: "serve".into(),
        }),
        "54 56 43 54 | 03 00 | 0e 00 | 09 00 00 00 | 00 00 00 00
         05 00 00 00 73 65 72 76 65",
    );
}

#[test]
fn record_offer_matches_documented_example() {
    assert_golden(
        Message::RecordOffer(RecordOffer {
            offer_id: 1,
            name: "smoke".into(),
            events: vec!["sched".into()],
            buffer_kb: None,
            clock: None,
        }),
        "54 56 43 54 | 03 00 | 0f 00 | 20 00 00 00 | 00 00 00 00
         01 00 00 00 00 00 00 00 | 05 00 00 00 73 6d 6f 6b 65
         01 00 00 00 | 05 00 00 00 73 63 68 65 64 | 00 | 00",
    );
}

#[test]
fn offer_answer_matches_documented_example() {
    assert_golden(
        Message::OfferAnswer(OfferAnswer {
            offer_id: 1,
            accepted: true,
            file: "/r/a.dat".into(),
            text: String::new(),
        }),
        "54 56 43 54 | 03 00 | 10 00 | 19 00 00 00 | 00 00 00 00
         01 00 00 00 00 00 00 00 | 01 | 08 00 00 00 2f 72 2f 61 2e 64 61 74 | 00 00 00 00",
    );
}

#[test]
fn record_done_matches_documented_example() {
    assert_golden(
        Message::RecordDone(RecordDone {
            offer_id: 1,
            file: "/r/a.dat".into(),
            events: 100,
            lost: 0,
            bytes: 4096,
            complete: true,
            text: String::new(),
        }),
        "54 56 43 54 | 03 00 | 11 00 | 31 00 00 00 | 00 00 00 00
         01 00 00 00 00 00 00 00 | 08 00 00 00 2f 72 2f 61 2e 64 61 74
         64 00 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 | 00 10 00 00 00 00 00 00
         01 | 00 00 00 00",
    );
}

#[test]
fn command_output_matches_documented_example() {
    assert_golden(
        Message::CommandOutput(CommandOutput {
            stream: OutputStream::Stdout,
            data: b"out\n".to_vec(),
        }),
        "54 56 43 54 | 04 00 | 12 00 | 09 00 00 00 | 00 00 00 00
         01 | 04 00 00 00 6f 75 74 0a",
    );
}

#[test]
fn command_output_is_bounded_and_names_a_known_stream() {
    let too_big = Message::CommandOutput(CommandOutput {
        stream: OutputStream::Stderr,
        data: vec![0; crate::proto::limits::COMMAND_OUTPUT_CHUNK + 1],
    });
    assert!(too_big.encode_frame(4).is_err());
    // Stream 3 does not exist: the frame is dropped (not fatal), the session goes on.
    let mut frame = Message::CommandOutput(CommandOutput {
        stream: OutputStream::Stdout,
        data: b"x".to_vec(),
    })
    .encode_frame(4)
    .unwrap();
    frame[HEADER_LEN] = 3;
    let mut dec = FrameDecoder::new();
    dec.push(&frame);
    let err = dec.next_message().unwrap_err();
    assert!(matches!(err, ProtoError::BadField { .. }), "{err}");
    assert!(!err.is_fatal());
    // In a version-3 frame it is an unknown kind: an older host never misreads it.
    let mut old = Message::CommandOutput(CommandOutput {
        stream: OutputStream::Stdout,
        data: vec![],
    })
    .encode_frame(4)
    .unwrap();
    old[4] = 3;
    let mut dec = FrameDecoder::new();
    dec.push(&old);
    assert!(matches!(
        dec.next_message().unwrap_err(),
        ProtoError::UnknownKind { kind: 18 }
    ));
}

#[test]
fn version_3_kinds_in_a_version_2_frame_are_unknown() {
    // An agent never sends these to a host that negotiated version 2; if one did, the old
    // host would answer Error{UnknownKind} and go on (§5), never misread them.
    for msg in [
        Message::ServeReady(ServeReady { host: "x".into() }),
        Message::RecordOffer(RecordOffer {
            offer_id: 1,
            name: String::new(),
            events: vec![],
            buffer_kb: None,
            clock: None,
        }),
    ] {
        let mut frame = msg.encode_frame(3).unwrap();
        frame[4] = 2; // header version 2
        let mut dec = FrameDecoder::new();
        dec.push(&frame);
        let err = dec.next_message().unwrap_err();
        assert!(matches!(err, ProtoError::UnknownKind { .. }), "{err}");
        assert!(!err.is_fatal());
        assert_eq!(err.reply_code(), Some(ErrorCode::UnknownKind));
    }
}
