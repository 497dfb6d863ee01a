//! The guest command's output (`CommandOutput`, protocol 4) on the host: bytes the guest sent,
//! kept bounded, relayed to the user's terminal with every control character escaped, and
//! the tail of each stream kept for the JSON summary.
//!
//! The guest is not trusted: what waits to be printed is capped ([`MAX_PENDING`]; beyond it
//! bytes are counted and dropped), the tails are capped ([`TAIL`]), and no byte reaches a
//! terminal raw: only `\n` and `\t` pass, other control characters (ESC, CR, BEL, …) and
//! invalid UTF-8 are shown escaped, as [`super::guest_input::clean_text`] does.

use std::collections::VecDeque;

use crate::proto::{CommandOutput, OutputStream};

/// Most bytes of output waiting to be printed (the host prints them as they come; this
/// bounds a burst while it is busy stopping).
pub const MAX_PENDING: usize = 4 * 1024 * 1024;
/// Bytes of each stream's end kept for the summary.
pub const TAIL: usize = 64 * 1024;

/// What the command wrote, as the host received it.
#[derive(Debug, Default)]
pub struct CommandOutputLog {
    pending: VecDeque<CommandOutput>,
    pending_bytes: usize,
    /// Bytes received per stream (stdout, stderr).
    pub totals: [u64; 2],
    /// Bytes not printed because too much waited.
    pub dropped: u64,
    tails: [VecDeque<u8>; 2],
    /// At least one `CommandOutput` arrived.
    pub any: bool,
}

fn index(stream: OutputStream) -> usize {
    match stream {
        OutputStream::Stdout => 0,
        OutputStream::Stderr => 1,
    }
}

impl CommandOutputLog {
    pub fn push(&mut self, chunk: CommandOutput) {
        let i = index(chunk.stream);
        self.any = true;
        let n = chunk.data.len();
        self.totals[i] = self.totals[i].saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        let tail = &mut self.tails[i];
        tail.extend(chunk.data.iter().copied());
        if tail.len() > TAIL {
            let extra = tail.len() - TAIL;
            tail.drain(..extra);
        }
        if self.pending_bytes.saturating_add(n) > MAX_PENDING {
            self.dropped = self
                .dropped
                .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
            return;
        }
        self.pending_bytes += n;
        self.pending.push_back(chunk);
    }

    /// The chunks not printed yet, in arrival order.
    pub fn take_pending(&mut self) -> Vec<CommandOutput> {
        self.pending_bytes = 0;
        self.pending.drain(..).collect()
    }

    /// The last [`TAIL`] bytes of a stream as text: lines kept, control characters escaped.
    pub fn tail_text(&self, stream: OutputStream) -> String {
        let (a, b) = self.tails[index(stream)].as_slices();
        let mut bytes = Vec::with_capacity(a.len() + b.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        super::guest_input::clean_lines(&String::from_utf8_lossy(&bytes))
    }

    /// True when a stream's tail is not all of it.
    pub fn truncated(&self, stream: OutputStream) -> bool {
        self.totals[index(stream)] > u64::try_from(TAIL).unwrap_or(u64::MAX)
    }
}

/// Turns a stream's chunks into text safe for a terminal: UTF-8 sequences cut between chunks
/// are joined (up to 3 bytes are carried), `\n` and `\t` pass, every other control character
/// and invalid byte is escaped.
#[derive(Debug, Default)]
pub struct TerminalText {
    carry: [Vec<u8>; 2],
}

impl TerminalText {
    /// The printable text of `chunk` (the end of an incomplete UTF-8 sequence waits for the
    /// next chunk of its stream).
    pub fn text(&mut self, chunk: &CommandOutput) -> String {
        let carry = &mut self.carry[index(chunk.stream)];
        let mut bytes = std::mem::take(carry);
        bytes.extend_from_slice(&chunk.data);
        let keep = incomplete_utf8_suffix(&bytes);
        let cut = bytes.len() - keep;
        carry.extend_from_slice(&bytes[cut..]);
        bytes.truncate(cut);
        for_terminal(&String::from_utf8_lossy(&bytes))
    }

    /// What is left of each stream (an incomplete sequence at the very end), escaped.
    pub fn finish(&mut self) -> [String; 2] {
        let out = |b: &mut Vec<u8>| for_terminal(&String::from_utf8_lossy(&std::mem::take(b)));
        let [a, b] = &mut self.carry;
        [out(a), out(b)]
    }
}

/// `text` with every control character but `\n` and `\t` escaped (`\x1b`, `\r`, …), and the
/// bidi overrides too, as in [`super::guest_input::clean_text`].
pub fn for_terminal(text: &str) -> String {
    text.split('\n')
        .map(|line| {
            line.split('\t')
                .map(super::guest_input::clean_text)
                .collect::<Vec<_>>()
                .join("\t")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// How many bytes at the end of `b` start a UTF-8 sequence that is not complete yet (0..=3).
fn incomplete_utf8_suffix(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let byte = b[b.len() - back];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue; // a continuation byte: look further back for the lead
        }
        let need = match byte {
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => return 0,
        };
        return if need > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(stream: OutputStream, data: &[u8]) -> CommandOutput {
        CommandOutput {
            stream,
            data: data.to_vec(),
        }
    }

    #[test]
    fn control_characters_never_reach_the_terminal_raw() {
        let mut t = TerminalText::default();
        let text = t.text(&chunk(
            OutputStream::Stdout,
            b"ok\tline\n\x1b]52;c;cGF3bmVk\x07fake\rdone\n",
        ));
        assert_eq!(text, "ok\tline\n\\x1b]52;c;cGF3bmVk\\x07fake\\x0ddone\n");
        assert!(!text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'));
    }

    #[test]
    fn a_utf8_sequence_split_between_chunks_is_joined() {
        let mut t = TerminalText::default();
        let euro = "€".as_bytes(); // e2 82 ac
        assert_eq!(
            t.text(&chunk(OutputStream::Stdout, &[b'a', euro[0], euro[1]])),
            "a"
        );
        // The other stream's carry is its own.
        assert_eq!(t.text(&chunk(OutputStream::Stderr, b"x")), "x");
        assert_eq!(t.text(&chunk(OutputStream::Stdout, &[euro[2], b'b'])), "€b");
        assert_eq!(t.finish(), [String::new(), String::new()]);
        // A sequence that never completes is shown as a replacement at the end.
        t.text(&chunk(OutputStream::Stdout, &[euro[0]]));
        assert_eq!(t.finish()[0], "\u{fffd}");
    }

    #[test]
    fn the_log_keeps_bounded_tails_and_drops_what_waits_too_long() {
        let mut log = CommandOutputLog::default();
        let big = vec![b'x'; 1024 * 1024];
        log.push(chunk(OutputStream::Stderr, b"err\x1b\n"));
        for _ in 0..6 {
            log.push(chunk(OutputStream::Stdout, &big));
        }
        assert_eq!(log.totals, [6 * 1024 * 1024, 5]);
        // 5 bytes + 3 MiB wait; the 4th MiB would pass MAX_PENDING.
        assert_eq!(log.dropped, 3 * 1024 * 1024);
        assert_eq!(log.tail_text(OutputStream::Stdout).len(), TAIL);
        assert!(log.truncated(OutputStream::Stdout));
        assert_eq!(log.tail_text(OutputStream::Stderr), "err\\x1b\n");
        assert!(!log.truncated(OutputStream::Stderr));
        let pending = log.take_pending();
        assert_eq!(pending.len(), 4);
        assert!(log.take_pending().is_empty());
    }
}
