//! Target `guest_input`: the host's boundary with the untrusted guest
//! (`tvctl::collect::guest_input`), fed what a hostile agent could send on the control channel.
//!
//! The input is a byte stream decoded with the real `FrameDecoder`; every message goes where
//! the host sends it: `HelloReply` to `GuestHello::check`, `Started` to `GuestStarted::check`,
//! `Metadata` to a `MetadataInbox`, `Stopped` to `GuestStopped::check`, `Error` text to
//! `clean_text`. Checked besides "no panic": nothing the boundary hands on holds a control
//! character (stats texts keep their line breaks), CPU lists are unique and within the
//! domain's, the kept metadata stays within its caps, and the problem list stays bounded.

use tvctl::collect::guest_input::{
    clean_text, GuestHello, GuestProblems, GuestStarted, GuestStopped, MetadataInbox,
};
use tvctl::proto::limits::{MAX_GUEST_PROBLEMS, MAX_METADATA_FILES, MAX_METADATA_TOTAL};
use tvctl::proto::{FrameDecoder, Message};

use crate::alloc_guard;

/// The domain's vCPUs, as the host knows them from its FIFOs.
const DOMAIN_CPUS: [u32; 4] = [0, 1, 2, 3];

pub fn run(data: &[u8]) {
    // Whole files are kept (64 MiB cap in all), so allow what the input can fill, no more.
    alloc_guard::budget(data.len(), 16);
    let mut decoder = FrameDecoder::new();
    let mut problems = GuestProblems::default();
    let mut inbox = MetadataInbox::new();
    let mut started_cpus: Vec<u32> = Vec::new();
    let mut rest = data;
    loop {
        let taken = decoder.push(rest);
        rest = &rest[taken..];
        loop {
            match decoder.next_message() {
                Ok(Some((_, msg))) => handle(msg, &mut problems, &mut inbox, &mut started_cpus),
                Ok(None) => break,
                Err(e) if e.is_fatal() => {
                    if !decoder.resync() {
                        break;
                    }
                }
                Err(_) => {}
            }
        }
        if rest.is_empty() || taken == 0 && decoder.space() == 0 {
            break;
        }
    }
    let (files, _formats) = inbox.finish(&mut problems);
    assert!(files.len() <= MAX_METADATA_FILES);
    let total: u64 = files.values().map(|f| f.len() as u64).sum();
    assert!(
        total <= MAX_METADATA_TOTAL,
        "{total} bytes of metadata kept"
    );
    assert!(problems.to_notes().len() <= MAX_GUEST_PROBLEMS + 1);
    for note in &problems.to_notes() {
        assert_printable(note, false);
    }
}

fn handle(
    msg: Message,
    problems: &mut GuestProblems,
    inbox: &mut MetadataInbox,
    cpus: &mut Vec<u32>,
) {
    match msg {
        Message::HelloReply(r) => {
            if let Ok(h) = GuestHello::check(&r) {
                assert!(h.page_size.is_power_of_two() && h.page_size >= 4096);
                assert_printable(&h.agent_version, false);
                assert_printable(&h.kernel_release, false);
                h.trace_clocks
                    .iter()
                    .for_each(|c| assert_printable(c, false));
            }
        }
        Message::Started(s) => {
            let g = GuestStarted::check(&s, &DOMAIN_CPUS, problems);
            let mut sorted = g.cpus.clone();
            sorted.dedup();
            assert_eq!(sorted, g.cpus, "CPUs unique and sorted");
            assert!(g.cpus.iter().all(|c| DOMAIN_CPUS.contains(c)));
            for s in [&g.instance, &g.clock, &g.note] {
                assert_printable(s, false);
            }
            g.events.iter().for_each(|e| assert_printable(e, false));
            *cpus = g.cpus;
        }
        Message::Metadata(m) => inbox.push(m, problems),
        Message::Stopped(s) => {
            let g = GuestStopped::check(&s, cpus, problems);
            for (cpu, counts) in &g.cpus {
                assert!(cpus.contains(cpu));
                let _ = counts.lost();
                assert_printable(&counts.stats_text, true);
            }
        }
        Message::Error(e) => assert_printable(&clean_text(&e.text), false),
        _ => {}
    }
}

/// No control character (but `\n` where `lines`), no bidi override.
fn assert_printable(s: &str, lines: bool) {
    for c in s.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        assert!(
            !(c.is_control() && !(lines && c == '\n')) && !bidi,
            "{c:?} reached the host's output in {s:?}"
        );
    }
}
