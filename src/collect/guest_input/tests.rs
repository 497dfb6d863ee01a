use super::*;
use crate::proto::split_metadata;

const SCHED_SWITCH: &str = include_str!("../../../tests/data/tracedat/sched_switch.format");

fn hello(page_size: u32) -> HelloReply {
    HelloReply {
        version: 1,
        nonce: 1,
        agent_version: "tvctl-agent 0.1.0".into(),
        kernel_release: "6.1.0".into(),
        cpus: 2,
        page_size,
        trace_clocks: vec!["local".into()],
        data_ports: vec![0, 1],
    }
}

fn started(cpus: &[u32]) -> Started {
    Started {
        instance: "tvctl-1".into(),
        events: vec!["sched:sched_switch".into()],
        cpus: cpus.to_vec(),
        buffer_kb: 1408,
        clock: "local".into(),
        splice: true,
        note: String::new(),
    }
}

fn cpu_stopped(cpu: u32, bytes: u64) -> CpuStopped {
    CpuStopped {
        cpu,
        bytes,
        entries: 0,
        overrun: 0,
        commit_overrun: 0,
        dropped_events: 0,
        read_events: 0,
        stats_text: String::new(),
    }
}

fn push_file(inbox: &mut MetadataInbox, problems: &mut GuestProblems, name: &str, data: &[u8]) {
    for chunk in split_metadata(name, data).unwrap() {
        inbox.push(chunk, problems);
    }
}

#[test]
fn terminal_sequences_and_fake_lines_are_escaped() {
    let hostile = "ok\x1b]52;c;ZWNobyBwd25lZA==\x07\ntrace finished OK\r\u{202e}txt\u{9b}";

    let clean = clean_text(hostile);

    assert_eq!(
        clean,
        "ok\\x1b]52;c;ZWNobyBwd25lZA==\\x07\\ntrace finished OK\\x0d\\u{202e}txt\\x9b"
    );
    assert!(!clean.chars().any(|c| c.is_control()));
}

#[test]
fn multi_line_stats_keep_their_lines_but_lose_control_characters() {
    assert_eq!(
        clean_lines("entries: 1\noverrun: 0\x1b[2J\n"),
        "entries: 1\noverrun: 0\\x1b[2J\n"
    );
}

#[test]
fn page_sizes_that_are_not_usable_are_refused_not_panicked_on() {
    for bad in [0, 1, 3, 4095, 6144, 1 << 30] {
        assert_eq!(
            GuestHello::check(&hello(bad)),
            Err(GuestError::BadPageSize(bad)),
            "{bad}"
        );
    }
    assert_eq!(GuestHello::check(&hello(4096)).unwrap().page_size, 4096);
    assert_eq!(GuestHello::check(&hello(65536)).unwrap().page_size, 65536);
}

#[test]
fn started_cpus_are_unique_sorted_and_within_the_domain() {
    let mut problems = GuestProblems::default();

    let s = GuestStarted::check(&started(&[1, 0, 1, 1, 7]), &[0, 1], &mut problems);

    assert_eq!(s.cpus, [0, 1]);
    assert_eq!(problems.count(), 3, "{:?}", problems.to_notes());
}

#[test]
fn started_strings_are_cleaned() {
    let mut problems = GuestProblems::default();
    let mut raw = started(&[0]);
    raw.note = "\x1b]52;c;x\x07".into();
    raw.clock = "local\x1b[31m".into();

    let s = GuestStarted::check(&raw, &[0], &mut problems);

    assert!(!s.note.contains('\x1b') && !s.clock.contains('\x1b'));
    assert!(problems.is_empty());
}

#[test]
fn huge_counters_saturate_instead_of_wrapping() {
    let mut problems = GuestProblems::default();
    let mut c = cpu_stopped(0, 4096);
    c.overrun = u64::MAX;
    c.commit_overrun = u64::MAX;
    c.dropped_events = 5;
    let raw = Stopped {
        reason: StopReason::HostRequest,
        command_status: None,
        cpus: vec![c],
    };

    let s = GuestStopped::check(&raw, &[0], &mut problems);

    assert_eq!(s.cpus[&0].lost(), u64::MAX);
}

#[test]
fn stopped_cpus_are_unique_and_only_those_recorded() {
    let mut problems = GuestProblems::default();
    let mut nul = cpu_stopped(0, 8192);
    nul.stats_text = "entries: 3\0\x1b[2J".into();
    let raw = Stopped {
        reason: StopReason::HostRequest,
        command_status: Some(1 << 20),
        cpus: vec![nul, cpu_stopped(0, 1), cpu_stopped(5, 1)],
    };

    let s = GuestStopped::check(&raw, &[0, 1], &mut problems);

    assert_eq!(s.cpus.len(), 1);
    assert_eq!(s.cpus[&0].bytes, 8192, "the first entry is kept");
    assert_eq!(s.cpus[&0].stats_text, "entries: 3\\x00\\x1b[2J");
    assert_eq!(s.command_status, None);
    // duplicate, unrecorded CPU 5, no count for CPU 1, bad status
    assert_eq!(problems.count(), 4, "{:?}", problems.to_notes());
}

#[test]
fn documented_metadata_is_kept_and_formats_are_checked() {
    let mut inbox = MetadataInbox::new();
    let mut problems = GuestProblems::default();

    push_file(&mut inbox, &mut problems, "uname", b"Linux 6.1\n");
    push_file(
        &mut inbox,
        &mut problems,
        "events/sched/sched_switch/format",
        SCHED_SWITCH.as_bytes(),
    );
    push_file(
        &mut inbox,
        &mut problems,
        "events/sched/broken/format",
        b"no name line",
    );
    let (files, _) = inbox.finish(&mut problems);

    assert!(files.contains_key("uname"));
    assert!(files.contains_key("events/sched/sched_switch/format"));
    assert!(!files.contains_key("events/sched/broken/format"));
    assert_eq!(problems.count(), 1, "{:?}", problems.to_notes());
}

#[test]
fn unknown_and_repeated_names_are_dropped_and_cost_nothing() {
    let mut inbox = MetadataInbox::new();
    let mut problems = GuestProblems::default();
    push_file(&mut inbox, &mut problems, "uname", b"Linux\n");

    for i in 0..50_000 {
        push_file(&mut inbox, &mut problems, &format!("junk/{i}"), b"");
        push_file(&mut inbox, &mut problems, "uname", b"other\n");
    }

    assert_eq!(inbox.seen.len(), 1, "unknown names are never remembered");
    assert_eq!(inbox.files()["uname"], b"Linux\n");
    assert_eq!(problems.count(), 100_000);
    assert!(problems.too_many());
    assert_eq!(problems.to_notes().len(), MAX_GUEST_PROBLEMS + 1);
}

#[test]
fn too_many_format_names_stop_being_remembered() {
    let mut inbox = MetadataInbox::new();
    let mut problems = GuestProblems::default();

    for i in 0..MAX_METADATA_FILES + 5000 {
        let chunk = Metadata {
            name: format!("events/s{i}/e/format"),
            total_len: 0,
            offset: 0,
            data: Vec::new(),
        };
        inbox.push(chunk, &mut problems);
    }

    assert!(inbox.seen.len() <= MAX_METADATA_FILES);
}

#[test]
fn per_kind_caps_apply_before_any_data_is_kept() {
    let mut inbox = MetadataInbox::new();
    let mut problems = GuestProblems::default();
    let big_format = Metadata {
        name: "events/sched/sched_switch/format".into(),
        total_len: MAX_EVENT_FORMAT + 1,
        offset: 0,
        data: vec![b'('; 1024],
    };
    let big_uname = Metadata {
        name: "uname".into(),
        total_len: MAX_SMALL_METADATA + 1,
        offset: 0,
        data: vec![b'x'; 16],
    };

    inbox.push(big_format.clone(), &mut problems);
    inbox.push(big_uname, &mut problems);
    // Its next chunk is ignored quietly: the file was dropped.
    inbox.push(
        Metadata {
            offset: 1024,
            ..big_format
        },
        &mut problems,
    );

    assert_eq!(problems.count(), 2, "{:?}", problems.to_notes());
    assert!(inbox.finish(&mut problems).0.is_empty());
}

#[test]
fn a_half_sent_file_is_left_out_with_a_note() {
    let mut inbox = MetadataInbox::new();
    let mut problems = GuestProblems::default();
    inbox.push(
        Metadata {
            name: "kallsyms".into(),
            total_len: 10,
            offset: 0,
            data: b"ffff".to_vec(),
        },
        &mut problems,
    );

    let (files, _) = inbox.finish(&mut problems);

    assert!(files.is_empty());
    assert_eq!(problems.count(), 1);
}

#[test]
fn a_broken_chunk_drops_its_file_but_keeps_the_others() {
    let mut inbox = MetadataInbox::new();
    let mut problems = GuestProblems::default();
    push_file(
        &mut inbox,
        &mut problems,
        "trace_clock",
        b"[local] global\n",
    );
    inbox.push(
        Metadata {
            name: "kallsyms".into(),
            total_len: 10,
            offset: 0,
            data: b"ffff".to_vec(),
        },
        &mut problems,
    );
    inbox.push(
        Metadata {
            name: "kallsyms".into(),
            total_len: 10,
            offset: 7,
            data: b"ff".to_vec(),
        },
        &mut problems,
    );

    let (files, _) = inbox.finish(&mut problems);

    assert_eq!(files.keys().collect::<Vec<_>>(), ["trace_clock"]);
    assert_eq!(problems.count(), 1, "{:?}", problems.to_notes());
}

#[test]
fn the_protocol_and_the_sanitizer_agree_on_the_format_cap() {
    assert_eq!(
        Ok(MAX_EVENT_FORMAT),
        u64::try_from(crate::tracedat::sanitize::MAX_FORMAT_TEXT)
    );
}
