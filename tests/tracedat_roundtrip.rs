//! The reader gives back exactly what the writer wrote, for random metadata and pages; and a
//! truncated, corrupted or random file is an error, never a panic or a huge allocation.

mod common;

use proptest::prelude::*;
use std::fs;
use std::path::{Path, PathBuf};
use tvctl::tracedat::{TraceDatError, TraceDatFile, TraceMeta};

const HEADER_PAGE_64: &[u8] = include_bytes!("data/tracedat/header_page_64.txt");
const HEADER_EVENT: &[u8] = include_bytes!("data/tracedat/header_event.txt");
const HEADER_PAGE_32: &[u8] = b"\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n\
\tfield: local_t commit;\toffset:8;\tsize:4;\tsigned:1;\n\
\tfield: char data;\toffset:12;\tsize:4084;\tsigned:0;\n";

/// Pages filled from a seed, so that random CPU data stays cheap to generate.
fn pages(page_size: u32, count: u8, seed: u64) -> Vec<u8> {
    let len = usize::try_from(page_size).unwrap() * usize::from(count);
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn text_without_nul() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,40}"
}

prop_compose! {
    fn meta_and_pages()(
        page_size in prop_oneof![Just(4096u32), Just(8192), Just(65536)],
        header_page in prop_oneof![Just(HEADER_PAGE_64), Just(HEADER_PAGE_32)],
        ftrace_formats in proptest::collection::vec(bytes(300), 0..4),
        event_systems in proptest::collection::vec(
            ("[a-z_]{1,12}", proptest::collection::vec(bytes(300), 0..3)), 0..3),
        kallsyms in bytes(3000),
        printk_formats in bytes(300),
        saved_cmdlines in bytes(300),
        uname in proptest::option::of(text_without_nul()),
        trace_clock in proptest::option::of(text_without_nul()),
        trace_id in proptest::option::of(any::<u64>()),
        cpu_pages in proptest::collection::vec((0u8..3, any::<u64>()), 1..5),
        with_stats in any::<bool>(),
        stats_text in text_without_nul(),
    ) -> (TraceMeta, Vec<Vec<u8>>) {
        let cpu_stats = if with_stats {
            (0..cpu_pages.len()).map(|cpu| format!("cpu {cpu}: {stats_text}")).collect()
        } else {
            Vec::new()
        };
        let meta = TraceMeta {
            page_size,
            header_page: header_page.to_vec(),
            header_event: HEADER_EVENT.to_vec(),
            ftrace_formats,
            event_systems,
            kallsyms,
            printk_formats,
            saved_cmdlines,
            uname,
            trace_clock,
            trace_id,
            cpu_stats,
            ..TraceMeta::default()
        };
        let data = cpu_pages.iter().map(|(n, seed)| pages(page_size, *n, *seed)).collect();
        (meta, data)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn reader_returns_what_the_writer_wrote((meta, cpu_data) in meta_and_pages()) {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), &meta, &cpu_data);

        let file = TraceDatFile::open(&path).unwrap();

        prop_assert_eq!(file.meta(), &meta);
        prop_assert_eq!(file.cpus().len(), cpu_data.len());
        for (cpu, data) in cpu_data.iter().enumerate() {
            let extent = file.cpus()[cpu];
            prop_assert_eq!(extent.offset % u64::from(meta.page_size), 0);
            prop_assert_eq!(&file.read_cpu_data(cpu).unwrap(), data);
            let pages: Vec<u8> = file.pages(cpu).unwrap().map(Result::unwrap).collect::<Vec<_>>().concat();
            prop_assert_eq!(&pages, data);
        }
        prop_assert!(file.other_options().is_empty());
    }

    #[test]
    fn random_bytes_are_an_error(data in bytes(5000)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("random.dat");
        fs::write(&path, &data).unwrap();

        prop_assert!(TraceDatFile::open(&path).is_err());
    }

    #[test]
    fn valid_start_with_random_rest_never_panics(cut in 0usize..1200, tail in bytes(3000)) {
        let dir = tempfile::tempdir().unwrap();
        let mut data = sample_file(dir.path());
        data.truncate(cut.min(data.len()));
        data.extend_from_slice(&tail);
        let path = dir.path().join("mixed.dat");
        fs::write(&path, &data).unwrap();

        exercise(&path);
    }
}

/// A small valid file: two CPUs with one random page each, an empty one, all options.
fn sample_meta() -> TraceMeta {
    TraceMeta {
        page_size: 4096,
        header_page: HEADER_PAGE_64.to_vec(),
        header_event: HEADER_EVENT.to_vec(),
        ftrace_formats: vec![b"name: function\nID: 1\n".to_vec()],
        event_systems: vec![(
            "sched".into(),
            vec![b"name: sched_switch\nID: 2\n".to_vec()],
        )],
        kallsyms: b"ffffffff81000000 T _stext\n".to_vec(),
        printk_formats: b"0x1 : \"x\"\n".to_vec(),
        saved_cmdlines: b"1 init\n".to_vec(),
        uname: Some("Linux t 6.1 x86_64".into()),
        trace_clock: Some("[local] global\n".into()),
        trace_id: Some(7),
        cpu_stats: vec!["a".into(), "b".into(), "c".into()],
        ..TraceMeta::default()
    }
}

fn sample_file(dir: &Path) -> Vec<u8> {
    let sub = dir.join("sample");
    fs::create_dir_all(&sub).unwrap();
    let data = [pages(4096, 1, 1), Vec::new(), pages(4096, 1, 2)];
    fs::read(write_file(&sub, &sample_meta(), &data)).unwrap()
}

/// Opens a file and, if it opens, reads and counts every CPU: any outcome but a panic is fine.
fn exercise(path: &Path) {
    if let Ok(file) = TraceDatFile::open(path) {
        for cpu in 0..file.cpus().len() {
            for page in file.pages(cpu).unwrap() {
                let _ = page;
            }
            let _ = file.count_events(cpu);
        }
    }
}

#[test]
fn every_truncation_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = sample_file(dir.path());
    let path = dir.path().join("cut.dat");

    for cut in 0..data.len() {
        fs::write(&path, &data[..cut]).unwrap();
        let result = TraceDatFile::open(&path);
        assert!(
            result.is_err(),
            "file cut to {cut} of {} bytes opened",
            data.len()
        );
    }
    fs::write(&path, &data).unwrap();
    assert_eq!(TraceDatFile::open(&path).unwrap().meta(), &sample_meta());
}

#[test]
fn corrupting_any_header_byte_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let data = sample_file(dir.path());
    let header_len = 4096;
    let path = dir.path().join("corrupt.dat");

    for at in 0..header_len {
        for value in [0x00, 0xff, data[at] ^ 0x01, data[at] ^ 0x80] {
            let mut corrupt = data.clone();
            corrupt[at] = value;
            fs::write(&path, &corrupt).unwrap();
            exercise(&path);
        }
    }
}

/// Replaces the first occurrence of `pattern` after `from` with `replacement`.
fn patch(data: &mut [u8], from: usize, pattern: &[u8], replacement: &[u8]) -> usize {
    let at = from
        + data[from..]
            .windows(pattern.len())
            .position(|w| w == pattern)
            .expect("pattern not in sample file");
    data[at..at + replacement.len()].copy_from_slice(replacement);
    at
}

#[test]
fn huge_lengths_are_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let good = sample_file(dir.path());
    let path = dir.path().join("huge.dat");
    let header_page_len = 205u64.to_le_bytes();
    let kallsyms_len = 26u32.to_le_bytes();

    for (pattern, replacement) in [
        (&header_page_len[..], &u64::MAX.to_le_bytes()[..]),
        (&header_page_len[..], &(1u64 << 40).to_le_bytes()[..]),
        (&kallsyms_len[..], &u32::MAX.to_le_bytes()[..]),
    ] {
        let mut data = good.clone();
        patch(&mut data, 0, pattern, replacement);
        fs::write(&path, &data).unwrap();

        let err = TraceDatFile::open(&path).unwrap_err();

        assert!(matches!(err, TraceDatError::Corrupt { .. }), "{err}");
    }
}

#[test]
fn cpu_extent_beyond_the_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = sample_file(dir.path());
    let table = patch(&mut data, 0, b"flyrecord\0", b"flyrecord\0") + 10;
    data[table + 8..table + 16].copy_from_slice(&(1u64 << 20).to_le_bytes());
    let path = dir.path().join("beyond.dat");
    fs::write(&path, &data).unwrap();

    let err = TraceDatFile::open(&path).unwrap_err();

    assert!(err.to_string().contains("beyond the file"), "{err}");
}

#[test]
fn a_version_6_body_labelled_7_is_refused_not_misread() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = sample_file(dir.path());
    data[10] = b'7';
    let path = dir.path().join("v7.dat");
    fs::write(&path, &data).unwrap();

    // Version 7 expects a compression name where version 6 has "header_page".
    let err = TraceDatFile::open(&path).unwrap_err();

    assert!(matches!(err, TraceDatError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("compression"), "{err}");
}

#[test]
fn version_8_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = sample_file(dir.path());
    data[10] = b'8';
    let path = dir.path().join("v8.dat");
    fs::write(&path, &data).unwrap();

    let err = TraceDatFile::open(&path).unwrap_err();

    assert!(matches!(err, TraceDatError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("version"), "{err}");
}

#[test]
fn unknown_options_are_kept_raw() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = sample_file(dir.path());
    // Turn the TRACEID option (id 11, 8 bytes) into an unknown id 99.
    patch(&mut data, 0, &[11, 0, 8, 0, 0, 0], &[99, 0, 8, 0, 0, 0]);
    let path = dir.path().join("unknown.dat");
    fs::write(&path, &data).unwrap();

    let file = TraceDatFile::open(&path).unwrap();

    assert_eq!(file.meta().trace_id, None);
    assert_eq!(file.other_options(), [(99, 7u64.to_le_bytes().to_vec())]);
}

fn write_file(dir: &Path, meta: &TraceMeta, cpu_data: &[Vec<u8>]) -> PathBuf {
    common::write_trace_file(dir, meta, cpu_data).0
}
