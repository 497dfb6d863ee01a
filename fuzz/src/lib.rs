//! Fuzz targets for every decoder of guest input (issue 8: a hostile guest cannot hurt the host).
//!
//! Each module is one target: a `run(&[u8])` that feeds the input to a decoder and asserts what
//! must hold besides "no panic" (round trips, two ways of decoding agreeing, bounds). The
//! binaries in `fuzz_targets/` only hand libFuzzer's inputs to `run`; [`alloc_guard`] turns an
//! allocation the input does not justify into a crash. Without the `libfuzzer` feature this
//! package's tests check the seed corpus (`corpus/<target>/`) and replay crash files
//! (`artifacts/<target>/`) through the same functions, uninstrumented. How to run and add
//! targets: docs/testing.md, "Fuzzing".

pub mod alloc_guard;
pub mod frames;
pub mod guest_input;
pub mod messages;
pub mod metadata;
pub mod pages;
pub mod sanitize;
pub mod tracedat;

#[cfg(test)]
mod seeds;

/// A target's entry point: decode one input, panic on a finding.
pub type Target = fn(&[u8]);

/// Every target by name, as the binaries, `corpus/` and `artifacts/` call it.
pub const TARGETS: &[(&str, Target)] = &[
    ("frames", frames::run),
    ("guest_input", guest_input::run),
    ("messages", messages::run),
    ("metadata", metadata::run),
    ("pages", pages::run),
    ("sanitize", sanitize::run),
    ("tracedat", tracedat::run),
];

/// A 64-bit guest's `events/header_page`, as recorded in the main package's test data.
pub const HEADER_PAGE_64: &[u8] = include_bytes!("../../tests/data/tracedat/header_page_64.txt");
/// A 32-bit guest's: `commit` is a 4-byte `local_t` (from src/tracedat/page/tests.rs).
pub const HEADER_PAGE_32: &[u8] = b"\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n\
\tfield: local_t commit;\toffset:8;\tsize:4;\tsigned:1;\n\
\tfield: int overwrite;\toffset:8;\tsize:1;\tsigned:1;\n\
\tfield: char data;\toffset:12;\tsize:4084;\tsigned:0;\n";
/// `events/header_event`, the same on every kernel we support.
pub const HEADER_EVENT: &[u8] = include_bytes!("../../tests/data/tracedat/header_event.txt");

/// Reads little-endian fields off the front of an input; past its end every byte is zero.
#[derive(Debug)]
pub struct Input<'a> {
    rest: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Up to `n` bytes: fewer at the end of the input.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let head = self.take(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}
