//! The seed corpus, made by code from the library's own encoders and writer, so that it stays
//! valid when a format changes; and a replay of every corpus and crash file, uninstrumented.
//!
//! `cargo test --manifest-path fuzz/Cargo.toml` fails if `corpus/<target>/seed-*` differ from
//! what this file makes; `TVCTL_FUZZ_BLESS=1` rewrites them.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use tvctl::proto::{
    CpuStopped, ErrorCode, ErrorMessage, Hello, HelloReply, Message, Metadata, OfferAnswer, Ping,
    Pong, RecordDone, RecordOffer, RecordRequest, ServeReady, Started, StopReason, Stopped,
    SyncProbe, SyncReply, PROTOCOL_VERSION,
};
use tvctl::tracedat::{write_trace_dat, write_trace_dat_v7, Compression, CpuData, TraceMeta};

use crate::tracedat::memfd;
use crate::{HEADER_EVENT, HEADER_PAGE_32, HEADER_PAGE_64, TARGETS};

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn seeds(target: &str) -> Seeds {
    match target {
        "frames" => frames(),
        "guest_input" => guest_input(),
        "messages" => messages(),
        "metadata" => metadata(),
        "pages" => pages(),
        "sanitize" => sanitize(),
        "tracedat" => tracedat(),
        other => panic!("no seeds for target {other}: add them in src/seeds.rs"),
    }
}

/// What an agent sends in a recording, as frames: HelloReply, Started, metadata, Stopped; and
/// the same with hostile values (duplicate CPUs, escape sequences, unknown names).
fn guest_input() -> Seeds {
    let frame = |m: &Message| m.encode_frame(PROTOCOL_VERSION).unwrap();
    let session = |cpus: Vec<u32>, note: &str, names: &[&str]| {
        let mut out = Vec::new();
        for m in sample_messages() {
            if matches!(m, Message::HelloReply(_)) {
                out.extend(frame(&m));
            }
        }
        out.extend(frame(&Message::Started(Started {
            instance: "tvctl-1".into(),
            events: vec!["sched:sched_switch".into()],
            cpus: cpus.clone(),
            buffer_kb: 1408,
            clock: "x86-tsc".into(),
            splice: true,
            note: note.into(),
        })));
        for name in names {
            let data: &[u8] = match *name {
                "events/header_page" => HEADER_PAGE_64,
                "events/header_event" => HEADER_EVENT,
                _ => b"Linux 6.1\n",
            };
            for chunk in tvctl::proto::split_metadata(name, data).unwrap() {
                out.extend(frame(&Message::Metadata(chunk)));
            }
        }
        out.extend(frame(&Message::Stopped(Stopped {
            reason: StopReason::HostRequest,
            command_status: None,
            cpus: cpus
                .iter()
                .map(|&cpu| CpuStopped {
                    cpu,
                    bytes: 4096,
                    entries: 1,
                    overrun: u64::MAX,
                    commit_overrun: 1,
                    dropped_events: 0,
                    read_events: 1,
                    stats_text: "entries: 1\n\x1b[2J".into(),
                })
                .collect(),
        })));
        out
    };
    vec![
        (
            "seed-guest-input-session",
            session(
                vec![0, 1],
                "",
                &["events/header_page", "events/header_event", "uname"],
            ),
        ),
        (
            "seed-guest-input-hostile",
            session(
                vec![1, 1, 9],
                "\x1b]52;c;x\x07\nfake",
                &["uname", "uname", "junk/x"],
            ),
        ),
    ]
}

/// One message of every kind, with the values of src/proto/golden_tests.rs.
fn sample_messages() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            min_version: 1,
            max_version: 1,
            software: "tvctl 0.1.0".into(),
            nonce: 0x1122_3344_5566_7788,
        }),
        Message::HelloReply(HelloReply {
            version: 1,
            nonce: 0x1122_3344_5566_7788,
            agent_version: "a1".into(),
            kernel_release: "6.1".into(),
            cpus: 2,
            page_size: 4096,
            trace_clocks: vec!["local".into(), "mono".into()],
            data_ports: vec![0, 1],
        }),
        Message::RecordRequest(RecordRequest {
            events: vec!["sched".into(), "irq:*".into()],
            buffer_kb: Some(1024),
            clock: Some("mono".into()),
            command: vec!["ls".into(), "-l".into()],
            stream_nonce: 0x0807_0605_0403_0201,
        }),
        Message::Started(Started {
            instance: "tvctl-1".into(),
            events: vec!["sched:sched_switch".into()],
            cpus: vec![0, 1],
            buffer_kb: 1408,
            clock: "local".into(),
            splice: true,
            note: "splice".into(),
        }),
        Message::Metadata(Metadata {
            name: "uname".into(),
            total_len: 10,
            offset: 4,
            data: b"x\n".to_vec(),
        }),
        Message::Stop,
        Message::Stopped(Stopped {
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
        }),
        Message::Error(ErrorMessage::new(ErrorCode::UnknownEvent, "no foo")),
        Message::Ping(Ping {
            nonce: 0x0102_0304_0506_0708,
        }),
        Message::Pong(Pong {
            nonce: 1,
            clock: "mono".into(),
            ts: 0x0102,
        }),
        Message::Close,
        Message::SyncProbe(SyncProbe { nonce: 5 }),
        Message::SyncReply(SyncReply {
            nonce: 5,
            clock: "x86-tsc".into(),
            before: 1_000,
            after: 1_250,
            marked: true,
        }),
        Message::ServeReady(ServeReady {
            host: "tvctl serve".into(),
        }),
        Message::RecordOffer(RecordOffer {
            offer_id: 1,
            name: "smoke".into(),
            events: vec!["sched".into()],
            buffer_kb: Some(1024),
            clock: Some("mono".into()),
        }),
        Message::OfferAnswer(OfferAnswer {
            offer_id: 1,
            accepted: true,
            file: "/var/lib/tvctl/web1/recordings/x.dat".into(),
            text: String::new(),
        }),
        Message::RecordDone(RecordDone {
            offer_id: 1,
            file: "/var/lib/tvctl/web1/recordings/x.dat".into(),
            events: 10,
            lost: 0,
            bytes: 4096,
            complete: true,
            text: "stopped in the guest".into(),
        }),
    ]
}

fn frame(msg: &Message) -> Vec<u8> {
    msg.encode_frame(PROTOCOL_VERSION).expect("sample encodes")
}

fn frames() -> Seeds {
    let all: Vec<u8> = sample_messages().iter().flat_map(frame).collect();
    // Version 1 frames: version-2 kinds among them are unknown kinds at version 1.
    let all_v1: Vec<u8> = sample_messages()
        .iter()
        .flat_map(|m| m.encode_frame(1).expect("sample encodes"))
        .collect();
    let ping = frame(&Message::Ping(Ping { nonce: 7 }));
    let hello = frame(&sample_messages()[0]);
    let mut bad_flags = ping.clone();
    bad_flags[12] = 1;
    let mut oversized = ping.clone();
    oversized[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut unknown_kind = ping.clone();
    unknown_kind[6] = 99;
    let mut future_error = frame(&Message::Error(ErrorMessage::new(ErrorCode::Busy, "busy")));
    future_error[4] = 9;
    let with = |seed: u8, parts: &[&[u8]]| [&[seed][..], &parts.concat()].concat();
    vec![
        ("seed-all-kinds-whole", with(0xff, &[&all])),
        ("seed-all-kinds-bytewise", with(0, &[&all])),
        ("seed-all-kinds-pieces", with(7, &[&all])),
        ("seed-all-kinds-read", with(0x85, &[&all])),
        ("seed-all-kinds-v1", with(0x03, &[&all_v1])),
        ("seed-hello", with(3, &[&hello])),
        (
            "seed-garbage-between",
            with(
                0x82,
                &[b"garbage", &ping, b"xxTV", &ping, b"TVCTTV", &hello],
            ),
        ),
        (
            "seed-nonfatal-errors",
            with(5, &[&bad_flags, &unknown_kind, &future_error, &ping]),
        ),
        ("seed-oversized", with(4, &[&oversized, &ping])),
        ("seed-truncated", with(1, &[&ping, &hello[..20]])),
    ]
}

fn messages() -> Seeds {
    let names = [
        "seed-hello",
        "seed-hello-reply",
        "seed-record-request",
        "seed-started",
        "seed-metadata",
        "seed-stop",
        "seed-stopped",
        "seed-error",
        "seed-ping",
        "seed-pong",
        "seed-close",
        "seed-sync-probe",
        "seed-sync-reply",
        "seed-serve-ready",
        "seed-record-offer",
        "seed-offer-answer",
        "seed-record-done",
    ];
    let msgs = sample_messages();
    assert_eq!(names.len(), msgs.len());
    names
        .into_iter()
        .zip(msgs)
        .map(|(name, msg)| {
            let kind = u8::try_from(u16::from(msg.kind())).expect("kinds fit a byte");
            let payload = msg.encode_payload().expect("sample encodes");
            (name, [&[kind][..], &payload].concat())
        })
        .collect()
}

/// Encodes chunks in the little language of `metadata::next_chunk`.
#[derive(Default)]
struct Program(Vec<u8>);

impl Program {
    /// `name`, `len` and `off` are the selector's fields; `fields` what they read; `data` the
    /// data byte and what it reads.
    fn chunk(mut self, name: u8, len: u8, off: u8, fields: &[u8], data: &[u8]) -> Self {
        self.0.push(name | (len << 3) | (off << 6));
        self.0.extend_from_slice(fields);
        self.0.extend_from_slice(data);
        self
    }

    fn literal(self, name: u8, len: u8, fields: &[u8], bytes: &[u8]) -> Self {
        let n = u8::try_from(bytes.len()).expect("short literal");
        assert!(n < 0x80);
        self.chunk(name, len, 0, fields, &[&[n][..], bytes].concat())
    }
}

fn metadata() -> Seeds {
    const KNOWN: u8 = 0;
    const U16: u8 = 1;
    const U32: u8 = 2;
    const MAX_FILE: u8 = 4;
    const KNOWN_PLUS_1: u8 = 7;
    const F_N: u8 = 6;
    const REST_OF_FILE: u8 = 0x80;
    let uname = Program::default()
        .literal(2, U16, &6u16.to_le_bytes(), b"Lin")
        .literal(2, KNOWN, &[], b"ux\n");
    let mut kallsyms =
        Program::default().chunk(0, U32, 0, &200_000u32.to_le_bytes(), &[REST_OF_FILE]);
    for _ in 0..3 {
        kallsyms = kallsyms.chunk(0, KNOWN, 0, &[], &[REST_OF_FILE + 1]);
    }
    let interleaved = Program::default()
        .literal(2, U16, &6u16.to_le_bytes(), b"Lin")
        .literal(1, U16, &2u16.to_le_bytes(), b"hp")
        .literal(F_N, U16, &[9, 0, 0], b"")
        .literal(2, KNOWN, &[], b"ux\n");
    let mut at_the_caps = Program::default();
    for n in 0..5 {
        at_the_caps = at_the_caps.chunk(F_N, MAX_FILE, 0, &[n], &[0xc0, 1, 0, 0, 0]);
    }
    let refused = Program::default()
        .literal(4, U16, &1u16.to_le_bytes(), b"x")
        .literal(5, U16, &1u16.to_le_bytes(), b"x")
        .literal(
            7,
            U16,
            &[&[3][..], b"a b", &1u16.to_le_bytes()].concat(),
            b"x",
        )
        .literal(2, U16, &4u16.to_le_bytes(), b"Li")
        .chunk(2, KNOWN, 2, &[], &[1, b'n'])
        .literal(2, KNOWN_PLUS_1, &[], b"nu")
        .literal(2, KNOWN, &[], b"nu")
        .literal(2, KNOWN, &[], b"x");
    vec![
        ("seed-two-chunks", uname.0),
        ("seed-filler-chunks", kallsyms.0),
        ("seed-interleaved", interleaved.0),
        ("seed-total-cap", at_the_caps.0),
        ("seed-refused", refused.0),
    ]
}

/// Builds the data of one page, as src/tracedat/page/tests.rs does.
#[derive(Default)]
struct PageData(Vec<u8>);

impl PageData {
    fn word(mut self, type_len: u32, delta: u32) -> Self {
        self.0
            .extend_from_slice(&(type_len | (delta << 5)).to_le_bytes());
        self
    }

    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }

    /// A data event of `type_len` words whose payload starts with `common_type`.
    fn small(self, delta: u32, common_type: u16, words: u32) -> Self {
        let mut payload = vec![0xab; usize::try_from(words * 4).expect("small")];
        payload[..2].copy_from_slice(&common_type.to_le_bytes());
        self.word(words, delta).bytes(&payload)
    }

    /// Page header then data: `commit` of `long` bytes, plus flags and a stored count.
    fn page(self, long: usize, ts: u64, flags: u64, stored: Option<u64>) -> Vec<u8> {
        let mut page = ts.to_le_bytes().to_vec();
        let commit = u64::try_from(self.0.len()).expect("small") | flags;
        let commit = if long == 8 && flags & (1 << 31) != 0 {
            commit | (0xffff_ffff << 32)
        } else {
            commit
        };
        page.extend_from_slice(&commit.to_le_bytes()[..long]);
        page.extend_from_slice(&self.0);
        if let Some(n) = stored {
            page.extend_from_slice(&n.to_le_bytes()[..long]);
        }
        page
    }
}

/// Pads a page to 4096 bytes, so the next one starts on the next page.
fn full(mut page: Vec<u8>, size: usize) -> Vec<u8> {
    page.resize(size, 0);
    page
}

fn pages() -> Seeds {
    const MISSED: u64 = 1 << 31;
    const STORED: u64 = 1 << 30;
    let golden = PageData::default()
        .small(0, 1000, 3)
        .small(500, 1000, 3)
        .page(8, 1_000_000, 0, None);
    let every_kind = PageData::default()
        .word(30, 5)
        .bytes(&2u32.to_le_bytes())
        .small(1, 7, 2)
        .word(31, 100)
        .bytes(&1u32.to_le_bytes())
        .word(0, 3)
        .bytes(&14u32.to_le_bytes())
        .bytes(&[8, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0])
        .word(29, 2)
        .bytes(&12u32.to_le_bytes())
        .bytes(&[0; 8])
        .small(4, 9, 1)
        .word(29, 0)
        .page(8, 42, 0, None);
    let missed = [
        full(
            PageData::default()
                .small(1, 5, 1)
                .page(8, 10, MISSED | STORED, Some(17)),
            4096,
        ),
        full(
            PageData::default().small(1, 5, 1).page(8, 20, MISSED, None),
            4096,
        ),
        PageData::default().small(1, 5, 1).page(8, 30, 0, None),
    ]
    .concat();
    let long32 =
        PageData::default()
            .small(0, 3, 2)
            .small(9, 4, 28)
            .page(4, 77, MISSED | STORED, Some(2));
    let big_page = [
        full(PageData::default().small(0, 1, 1).page(8, 1, 0, None), 8192),
        PageData::default().small(0, 1, 1).page(8, 2, 0, None),
    ]
    .concat();
    let sel = |bits: u8, page: Vec<u8>| [&[bits][..], &page].concat();
    vec![
        ("seed-golden", sel(0, golden)),
        ("seed-every-kind", sel(0, every_kind)),
        ("seed-missed", sel(0, missed)),
        ("seed-32-bit", sel(1, long32)),
        ("seed-8k-pages", sel(2, big_page)),
    ]
}

const COMMON_FIELDS: &str = "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n";

/// The `golden` event of tests/tracedat_golden.rs: id 1000, a `value` after the common fields.
fn golden_format() -> String {
    format!(
        "name: golden\nID: 1000\nformat:\n{COMMON_FIELDS}\n\
\tfield:unsigned int value;\toffset:8;\tsize:4;\tsigned:0;\n\n\
print fmt: \"value=%u\", REC->value\n"
    )
}

/// The kernel's `sched_switch` (as in src/tracedat/sanitize/tests.rs), with a print fmt that
/// exercises the expression parser.
fn sched_switch_format() -> String {
    format!(
        "name: sched_switch\nID: 372\nformat:\n{COMMON_FIELDS}\n\
\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;\n\
\tfield:int prev_prio;\toffset:28;\tsize:4;\tsigned:1;\n\
\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;\n\
\tfield:char next_comm[16];\toffset:40;\tsize:16;\tsigned:0;\n\
\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;\n\
\tfield:int next_prio;\toffset:60;\tsize:4;\tsigned:1;\n\n\
print fmt: \"prev_comm=%s prev_pid=%d prev_prio=%d prev_state=%s%s ==> next_comm=%s next_pid=%d \
next_prio=%d\", REC->prev_comm, REC->prev_pid, REC->prev_prio, (REC->prev_state & ((((0x00000000 \
+ 1) << 1) << 1) - 1)) ? __print_flags(REC->prev_state & ((((0x00000000 + 1) << 1) << 1) - 1), \
\"|\", {{ 0x00000001, \"S\" }}, {{ 0x00000002, \"D\" }}) : \"R\", \
REC->prev_state & ((((0x00000000 + 1) << 1) << 1) - 1) ? \"+\" : \"\", \
REC->next_comm, REC->next_pid, REC->next_prio\n"
    )
}

const PRINTK_FORMATS: &str = "0xffffffff81e0a1b0 : \"hello %d\\n\"\n\
0xffffffff81e0a1c0 : \"%s: %*d\"\n0xffffffff81e0a1d0 : \"x\"\n";

fn sanitize() -> Seeds {
    use crate::sanitize::PAGES_MARKER;
    /// One `golden` record: 12 bytes of payload (common fields, value).
    fn golden(data: PageData, delta: u32, value: u32) -> PageData {
        let mut payload = 1000u16.to_le_bytes().to_vec();
        payload.extend_from_slice(&[0, 0]);
        payload.extend_from_slice(&42u32.to_le_bytes());
        payload.extend_from_slice(&value.to_le_bytes());
        data.word(3, delta).bytes(&payload)
    }
    let page =
        |long| golden(golden(PageData::default(), 0, 7), 500, 8).page(long, 1_000_000, 0, None);
    let texts = |parts: &[&str]| parts.join("\0").into_bytes();
    let with = |sel: u8, texts: Vec<u8>, page: Option<Vec<u8>>| {
        let mut out = vec![sel];
        out.extend_from_slice(&texts);
        if let Some(page) = page {
            out.extend_from_slice(PAGES_MARKER);
            out.extend_from_slice(&page);
        }
        out
    };
    let golden_fmt = golden_format();
    let sched = sched_switch_format();
    let header_page = String::from_utf8(HEADER_PAGE_64.to_vec()).expect("ASCII");
    vec![
        (
            "seed-golden",
            with(0, texts(&[&golden_fmt, &sched]), Some(page(8))),
        ),
        ("seed-32-bit", with(1, texts(&[&golden_fmt]), Some(page(4)))),
        (
            "seed-formats",
            with(0, texts(&[&sched, &golden_fmt, &sched]), None),
        ),
        ("seed-printk", with(0, texts(&[PRINTK_FORMATS]), None)),
        (
            "seed-header-page",
            with(2, texts(&[&header_page, &golden_fmt]), Some(page(8))),
        ),
    ]
}

fn trace_meta(header_page: &[u8]) -> TraceMeta {
    TraceMeta {
        page_size: 4096,
        header_page: header_page.to_vec(),
        header_event: HEADER_EVENT.to_vec(),
        ftrace_formats: vec![b"name: marker\nID: 5\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\nprint fmt: \"marker\"\n"
            .to_vec()],
        event_systems: vec![(
            "tvctl".into(),
            vec![b"name: golden\nID: 1000\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:unsigned int value;\toffset:8;\tsize:4;\tsigned:0;\n\
\nprint fmt: \"value=%u\", REC->value\n"
                .to_vec()],
        )],
        kallsyms: b"ffffffff81000000 T _stext\n".to_vec(),
        printk_formats: Vec::new(),
        saved_cmdlines: b"42 golden\n".to_vec(),
        uname: Some("Linux golden 6.1.0 x86_64".into()),
        trace_clock: Some("[local] global\n".into()),
        trace_id: Some(0x0123_4567_89ab_cdef),
        cpu_stats: Vec::new(),
        ..TraceMeta::default()
    }
}

/// A trace.dat as the writer makes it.
fn written(meta: &TraceMeta, cpus: &[Vec<u8>]) -> Vec<u8> {
    written_as(meta, cpus, None)
}

/// A file of `meta` and `cpus`: version 6, or version 7 with `v7` compression.
fn written_as(meta: &TraceMeta, cpus: &[Vec<u8>], v7: Option<Compression>) -> Vec<u8> {
    let files: Vec<_> = cpus.iter().map(|_| memfd()).collect();
    for (file, bytes) in files.iter().zip(cpus) {
        file.write_all_at(bytes, 0).expect("write a memfd");
    }
    let data: Vec<CpuData<'_>> = files
        .iter()
        .zip(cpus)
        .map(|(file, bytes)| CpuData {
            file,
            len: u64::try_from(bytes.len()).expect("small"),
        })
        .collect();
    let mut out = memfd();
    match v7 {
        None => write_trace_dat(&mut out, meta, &data).map(|_| ()),
        Some(c) => write_trace_dat_v7(&mut out, meta, &data, c).map(|_| ()),
    }
    .expect("seed meta is valid");
    let mut bytes = Vec::new();
    out.seek(SeekFrom::Start(0)).expect("seek a memfd");
    out.read_to_end(&mut bytes).expect("read back");
    bytes
}

fn tracedat() -> Seeds {
    let golden_page = full(
        PageData::default()
            .small(0, 1000, 3)
            .small(500, 1000, 3)
            .page(8, 1_000_000, 0, None),
        4096,
    );
    let missed_page = full(
        PageData::default()
            .small(0, 5, 1)
            .page(8, 9, (1 << 31) | (1 << 30), Some(3)),
        4096,
    );
    let golden = trace_meta(HEADER_PAGE_64);
    let two_cpus = TraceMeta {
        uname: None,
        trace_clock: None,
        trace_id: None,
        cpu_stats: vec!["entries: 1\n".into(), "entries: 0\n".into()],
        ..trace_meta(HEADER_PAGE_64)
    };
    let page32 = full(PageData::default().small(0, 5, 2).page(4, 3, 0, None), 4096);
    vec![
        (
            "seed-golden",
            written(&golden, std::slice::from_ref(&golden_page)),
        ),
        (
            "seed-two-cpus",
            written(
                &two_cpus,
                &[[golden_page.clone(), missed_page].concat(), Vec::new()],
            ),
        ),
        (
            "seed-32-bit",
            written(&trace_meta(HEADER_PAGE_32), &[page32]),
        ),
        (
            "seed-v7-zstd",
            written_as(
                &golden,
                std::slice::from_ref(&golden_page),
                Some(Compression::Zstd),
            ),
        ),
        (
            "seed-v7-none",
            written_as(&golden, &[golden_page], Some(Compression::None)),
        ),
    ]
}

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .map(|e| e.expect("read a corpus directory").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn seed_corpus_is_current() {
    let bless = std::env::var_os("TVCTL_FUZZ_BLESS").is_some();
    let mut stale = Vec::new();
    for (target, _) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(target);
        let want = seeds(target);
        if bless {
            fs::create_dir_all(&dir).expect("create the corpus directory");
            for old in files_in(&dir) {
                fs::remove_file(old).expect("remove an old seed");
            }
            for (name, bytes) in &want {
                fs::write(dir.join(name), bytes).expect("write a seed");
            }
            continue;
        }
        let have: Vec<_> = files_in(&dir)
            .into_iter()
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    fs::read(&p).unwrap(),
                )
            })
            .collect();
        let mut want: Vec<_> = want.into_iter().map(|(n, b)| (n.to_owned(), b)).collect();
        want.sort();
        if have != want {
            stale.push(*target);
        }
    }
    assert!(
        stale.is_empty(),
        "seed corpus of {stale:?} differs from src/seeds.rs: rerun with TVCTL_FUZZ_BLESS=1"
    );
}

/// Every checked-in seed and every crash file under `artifacts/<target>/` runs clean. A crash
/// file reproduces here with a plain build, a backtrace and a debugger at hand.
#[test]
fn corpus_and_artifacts_replay() {
    if std::env::var_os("TVCTL_FUZZ_BLESS").is_some() {
        return; // the corpus is being rewritten by the test beside this one
    }
    let mut failed = Vec::new();
    for (target, run) in TARGETS {
        for sub in ["corpus", "artifacts"] {
            for path in files_in(&fuzz_dir().join(sub).join(target)) {
                let bytes = fs::read(&path).expect("read a corpus file");
                if panic::catch_unwind(AssertUnwindSafe(|| run(&bytes))).is_err() {
                    failed.push(path);
                }
            }
        }
    }
    assert!(failed.is_empty(), "these inputs fail: {failed:?}");
}

/// Seeds that the decoders refuse early would leave the fuzzer to find the formats alone.
#[test]
fn seeds_get_past_the_first_checks() {
    use tvctl::proto::FrameDecoder;
    use tvctl::tracedat::{PageLayout, TraceDatFile};

    for (name, bytes) in messages() {
        let kind = u16::from(bytes[0]);
        assert!(
            Message::decode(kind, &bytes[1..]).is_ok(),
            "messages/{name}"
        );
    }
    for (name, bytes) in frames() {
        let mut dec = FrameDecoder::new();
        dec.push(&bytes[1..]);
        let mut messages = 0;
        loop {
            match dec.next_message() {
                Ok(Some(_)) => messages += 1,
                Ok(None) => break,
                Err(e) if e.is_fatal() && !dec.resync() => break,
                Err(_) => {}
            }
        }
        assert!(messages > 0, "frames/{name}");
    }
    for (name, bytes) in pages() {
        let header_page = if bytes[0] & 1 == 0 {
            HEADER_PAGE_64
        } else {
            HEADER_PAGE_32
        };
        let layout = PageLayout::parse(header_page, HEADER_EVENT, 4096 << (bytes[0] >> 1)).unwrap();
        let mut data = bytes[1..].to_vec();
        data.resize(data.len().next_multiple_of(layout.page_size()), 0);
        let counts = layout
            .count_events(&data)
            .unwrap_or_else(|e| panic!("pages/{name}: {e:?}"));
        assert!(counts.events >= 2, "pages/{name}: {counts:?}");
    }
    for (name, bytes) in sanitize() {
        use tvctl::tracedat::sanitize::FormatSet;
        let texts = bytes[1..].split(|&b| b == 0).take_while(|t| *t != b"PAGES");
        let mut set = FormatSet::new();
        let admitted = texts.filter(|t| set.admit("fuzz", t).is_ok()).count();
        assert!(admitted > 0 || name.contains("printk"), "sanitize/{name}");
        let marker = crate::sanitize::PAGES_MARKER;
        if let Some(at) = bytes.windows(marker.len()).position(|w| w == marker) {
            let header_page = if bytes[0] & 1 == 0 {
                HEADER_PAGE_64
            } else {
                HEADER_PAGE_32
            };
            let size = 4096 << ((bytes[0] >> 1) & 3);
            let layout = PageLayout::parse(header_page, HEADER_EVENT, size).unwrap();
            let mut page = bytes[at + marker.len()..].to_vec();
            page.resize(layout.page_size(), 0);
            let scan = tvctl::tracedat::sanitize::scan_cpu_data(&layout, &page, Some(&set));
            assert_eq!(scan.good_pages, 1, "sanitize/{name}: {:?}", scan.problems);
        }
    }
    for (name, bytes) in tracedat() {
        let file = memfd();
        file.write_all_at(&bytes, 0).unwrap();
        let trace =
            TraceDatFile::from_file(file).unwrap_or_else(|e| panic!("tracedat/{name}: {e}"));
        let counts = trace.count_events(0).unwrap();
        assert!(counts.events >= 1, "tracedat/{name}");
    }
}
