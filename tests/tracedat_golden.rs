//! A tiny synthetic recording must give exactly the bytes of `tests/data/tracedat/golden-v6.hex`
//! (written by hand from docs/trace-format.md), and synthetic files must be read by the real
//! `trace-cmd report`. The trace-cmd tests fail, never skip, when trace-cmd is missing.

mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use tvctl::tracedat::{write_trace_dat, CpuData, TraceDatError, TraceDatFile, TraceMeta};

const GOLDEN_HEX: &str = include_str!("data/tracedat/golden-v6.hex");
const HEADER_PAGE: &[u8] = include_bytes!("data/tracedat/header_page_64.txt");
const HEADER_EVENT: &[u8] = include_bytes!("data/tracedat/header_event.txt");

const MARKER_FORMAT: &str = "name: marker\nID: 5\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\
\nprint fmt: \"marker\"\n";
const GOLDEN_FORMAT: &str = "name: golden\nID: 1000\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\
\n\
\tfield:unsigned int value;\toffset:8;\tsize:4;\tsigned:0;\n\
\n\
print fmt: \"value=%u\", REC->value\n";

fn golden_meta() -> TraceMeta {
    TraceMeta {
        page_size: 4096,
        header_page: HEADER_PAGE.to_vec(),
        header_event: HEADER_EVENT.to_vec(),
        ftrace_formats: vec![MARKER_FORMAT.as_bytes().to_vec()],
        event_systems: vec![("tvctl".into(), vec![GOLDEN_FORMAT.as_bytes().to_vec()])],
        kallsyms: b"ffffffff81000000 T _stext\n".to_vec(),
        printk_formats: Vec::new(),
        saved_cmdlines: b"42 golden\n".to_vec(),
        uname: Some("Linux golden 6.1.0 x86_64".into()),
        trace_clock: Some("[local] global\n".into()),
        trace_id: Some(0x0123_4567_89ab_cdef),
        cpu_stats: vec!["entries: 0\nread events: 2\n".into()],
        ..TraceMeta::default()
    }
}

/// Two `golden` events (value 7 at 1 ms, value 8 at 1 ms + 500 ns) from pid 42.
fn golden_page() -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    page[..8].copy_from_slice(&1_000_000u64.to_le_bytes());
    page[8..16].copy_from_slice(&32u64.to_le_bytes());
    let mut at = 16;
    for (delta, value) in [(0u32, 7u32), (500, 8)] {
        page[at..at + 4].copy_from_slice(&(3 | (delta << 5)).to_le_bytes());
        page[at + 4..at + 6].copy_from_slice(&1000u16.to_le_bytes());
        page[at + 8..at + 12].copy_from_slice(&42u32.to_le_bytes());
        page[at + 12..at + 16].copy_from_slice(&value.to_le_bytes());
        at += 16;
    }
    page
}

/// Parses the annotated hex format described at the top of golden-v6.hex.
fn parse_golden_hex(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut rest = line.trim();
        if let Some(target) = rest.strip_prefix("pad-to ") {
            let target = usize::from_str_radix(target.trim().trim_start_matches("0x"), 16).unwrap();
            assert!(
                out.len() <= target,
                "pad-to {target:#x} but already at {:#x}",
                out.len()
            );
            out.resize(target, 0);
            continue;
        }
        while !rest.is_empty() && !rest.starts_with('#') {
            if let Some(quoted) = rest.strip_prefix('"') {
                let mut chars = quoted.char_indices();
                let end = loop {
                    let (i, c) = chars.next().expect("unterminated string");
                    match c {
                        '"' => break i,
                        '\\' => {
                            let (_, escaped) = chars.next().unwrap();
                            out.push(match escaped {
                                't' => b'\t',
                                'n' => b'\n',
                                '0' => 0,
                                '"' => b'"',
                                '\\' => b'\\',
                                other => panic!("unknown escape \\{other}"),
                            });
                        }
                        c => {
                            assert!(c.is_ascii(), "only ASCII in strings");
                            out.push(u8::try_from(c).unwrap());
                        }
                    }
                };
                rest = quoted[end + 1..].trim_start();
            } else {
                let (byte, tail) = rest.split_at(2);
                out.push(
                    u8::from_str_radix(byte, 16).unwrap_or_else(|_| panic!("bad hex {byte:?}")),
                );
                rest = tail.trim_start();
            }
        }
    }
    out
}

fn report(path: &Path, extra: &[&str]) -> String {
    let mut cmd = Command::new("trace-cmd");
    cmd.arg("report").args(extra).arg(path);
    let output = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run trace-cmd ({e}): install it (`apt-get install trace-cmd`)")
    });
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{cmd:?} failed with {}:\n{}\n{stdout}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

#[test]
fn synthetic_recording_gives_the_golden_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let expected = parse_golden_hex(GOLDEN_HEX);

    let path = write_file(dir.path(), &golden_meta(), &[golden_page()]);

    let written = fs::read(&path).unwrap();
    if let Some(at) = first_difference(&written, &expected) {
        let window = |b: &[u8]| b[at.saturating_sub(8)..(at + 8).min(b.len())].to_vec();
        panic!(
            "written file ({} bytes) differs from golden-v6.hex ({} bytes) at byte {at:#x}:\n\
             written  {:02x?}\nexpected {:02x?}",
            written.len(),
            expected.len(),
            window(&written),
            window(&expected)
        );
    }
}

#[test]
fn golden_file_reads_back_as_its_meta_and_page() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("golden.dat");
    fs::write(&path, parse_golden_hex(GOLDEN_HEX)).unwrap();

    let file = TraceDatFile::open(&path).unwrap();

    assert_eq!(file.meta(), &golden_meta());
    assert_eq!(file.read_cpu_data(0).unwrap(), golden_page());
    let counts = file.count_events(0).unwrap();
    assert_eq!(counts.events, 2);
    assert_eq!(counts.per_type.get(&1000), Some(&2));
    assert_eq!(
        (counts.first_ts, counts.last_ts),
        (Some(1_000_000), Some(1_000_500))
    );
}

#[test]
fn golden_file_is_reported_by_trace_cmd() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("golden.dat");
    fs::write(&path, parse_golden_hex(GOLDEN_HEX)).unwrap();

    let out = report(&path, &["-t"]);

    let events: Vec<_> = out.lines().filter(|l| l.contains("golden:")).collect();
    assert_eq!(events.len(), 2, "{out}");
    assert!(
        events[0].contains("golden-42") && events[0].contains("[000]"),
        "{out}"
    );
    assert!(
        events[0].contains("0.001000000: golden:") && events[0].contains("value=7"),
        "{out}"
    );
    assert!(
        events[1].contains("0.001000500: golden:") && events[1].contains("value=8"),
        "{out}"
    );
    let uname = report(&path, &["--uname"]);
    assert!(uname.contains("Linux golden 6.1.0 x86_64"), "{uname}");
    let stat = report(&path, &["--stat"]);
    assert!(stat.contains("read events: 2"), "{stat}");
}

#[test]
fn empty_cpus_are_accepted_by_trace_cmd() {
    let dir = tempfile::tempdir().unwrap();
    let meta = TraceMeta {
        cpu_stats: Vec::new(),
        ..golden_meta()
    };
    let path = write_file(dir.path(), &meta, &[Vec::new(), golden_page(), Vec::new()]);

    let out = report(&path, &[]);
    let cpus = report(&path, &["--cpus"]);

    assert!(out.starts_with("cpus=3"), "{out}");
    let events: Vec<_> = out.lines().filter(|l| l.contains("golden:")).collect();
    assert_eq!(events.len(), 2, "{out}");
    assert!(events.iter().all(|l| l.contains("[001]")), "{out}");
    let listed: Vec<_> = cpus.lines().skip(1).map(str::trim).collect();
    assert_eq!(listed, ["1"], "{cpus}");
    let file = TraceDatFile::open(&path).unwrap();
    assert_eq!(file.cpus()[0].size, 0);
    assert_eq!(file.cpus()[2].size, 0);
    assert_eq!(file.cpus()[1].offset % 4096, 0);
}

#[test]
fn all_cpus_empty_is_accepted_by_trace_cmd() {
    let dir = tempfile::tempdir().unwrap();
    let meta = TraceMeta {
        cpu_stats: Vec::new(),
        ..golden_meta()
    };
    let path = write_file(dir.path(), &meta, &[Vec::new(), Vec::new()]);

    let out = report(&path, &[]);

    assert!(!out.contains("golden:"), "{out}");
    assert_eq!(TraceDatFile::open(&path).unwrap().cpus().len(), 2);
}

#[test]
fn file_without_options_is_accepted_by_trace_cmd() {
    let dir = tempfile::tempdir().unwrap();
    let meta = TraceMeta {
        uname: None,
        trace_clock: None,
        trace_id: None,
        cpu_stats: Vec::new(),
        ..golden_meta()
    };
    let path = write_file(dir.path(), &meta, &[golden_page()]);

    let out = report(&path, &[]);

    assert_eq!(
        out.lines().filter(|l| l.contains("golden:")).count(),
        2,
        "{out}"
    );
    assert_eq!(TraceDatFile::open(&path).unwrap().meta(), &meta);
}

/// Writes the golden page as CPU 0 (and, with `lens` longer than one, the same file again as
/// further CPUs), announcing `lens[i]` bytes for CPU i; returns the writer's error.
fn write_golden_page_err(meta: &TraceMeta, lens: &[u64]) -> TraceDatError {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("cpu0.raw");
    fs::write(&page, golden_page()).unwrap();
    let page = File::open(&page).unwrap();
    let mut out = File::create(dir.path().join("trace.dat")).unwrap();
    let cpus: Vec<CpuData> = lens
        .iter()
        .map(|&len| CpuData { file: &page, len })
        .collect();
    write_trace_dat(&mut out, meta, &cpus).unwrap_err()
}

#[test]
fn empty_header_page_is_refused() {
    let meta = TraceMeta {
        header_page: Vec::new(),
        ..golden_meta()
    };

    let err = write_golden_page_err(&meta, &[4096]);

    assert!(matches!(err, TraceDatError::HeaderPage(_)), "{err}");
}

#[test]
fn partial_page_is_refused() {
    let err = write_golden_page_err(&golden_meta(), &[100]);

    assert!(
        matches!(
            err,
            TraceDatError::PartialPage {
                cpu: 0,
                len: 100,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn cpu_file_shorter_than_its_length_is_an_error() {
    let err = write_golden_page_err(&golden_meta(), &[8192]);

    assert!(
        matches!(
            err,
            TraceDatError::ShortCpuData {
                cpu: 0,
                copied: 4096,
                len: 8192
            }
        ),
        "{err}"
    );
}

#[test]
fn cpu_stats_count_must_match_the_cpus() {
    // golden_meta() carries stats for one CPU; two are written.
    let err = write_golden_page_err(&golden_meta(), &[4096, 0]);

    assert!(matches!(err, TraceDatError::InvalidMeta(_)), "{err}");
}

fn write_file(dir: &Path, meta: &TraceMeta, cpu_data: &[Vec<u8>]) -> PathBuf {
    common::write_trace_file(dir, meta, cpu_data).0
}

/// Files the real trace-cmd 3.1.6 wrote (`trace-cmd convert --file-version 7 --compression
/// zstd|none` of a small version-6 file, tests/data/tracedat/trace-cmd-v7-source-v6.dat): tvctl's
/// reader gets the same metadata and pages from all three.
#[test]
fn version_7_files_of_the_real_trace_cmd_read_like_their_version_6_source() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tracedat");
    let v6 = TraceDatFile::open(data.join("trace-cmd-v7-source-v6.dat")).unwrap();
    for name in ["trace-cmd-v7-zstd.dat", "trace-cmd-v7-none.dat"] {
        let v7 = TraceDatFile::open(data.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (a, b) = (v6.meta(), v7.meta());
        assert_eq!(a.header_page, b.header_page, "{name}");
        assert_eq!(a.header_event, b.header_event, "{name}");
        assert_eq!(a.event_systems, b.event_systems, "{name}");
        assert_eq!(a.saved_cmdlines, b.saved_cmdlines, "{name}");
        assert_eq!(v6.cpus().len(), v7.cpus().len(), "{name}");
        for cpu in 0..v6.cpus().len() {
            assert_eq!(
                v6.read_cpu_data(cpu).unwrap(),
                v7.read_cpu_data(cpu).unwrap(),
                "{name} CPU {cpu}"
            );
            assert_eq!(
                v6.count_events(cpu).unwrap(),
                v7.count_events(cpu).unwrap(),
                "{name} CPU {cpu}"
            );
        }
    }
}

/// `u16 id, u16 flags, s32 desc, u64 size` at `at`.
fn section_header(bytes: &[u8], at: usize) -> (u16, u16, i32, u64) {
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    (
        u16_at(at),
        u16_at(at + 2),
        i32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()),
        u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap()),
    )
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// The version-7 layout of docs/trace-format.md, byte by byte where it is fixed: file start,
/// the HEADER_INFO section right after it, an options section that points at it and chains
/// to the options section after the data, and the BUFFER option's page-aligned CPU block.
#[test]
fn version_7_without_compression_has_the_documented_layout() {
    use tvctl::tracedat::{write_trace_dat_v7, Compression, CpuData};
    let dir = tempfile::tempdir().unwrap();
    let meta = golden_meta();
    let page = golden_page();
    let raw = dir.path().join("cpu0.raw");
    fs::write(&raw, &page).unwrap();
    let raw = fs::File::open(&raw).unwrap();
    let path = dir.path().join("v7.dat");
    let mut out = fs::File::create(&path).unwrap();
    let cpus = [CpuData {
        file: &raw,
        len: 4096,
    }];
    write_trace_dat_v7(&mut out, &meta, &cpus, Compression::None).unwrap();
    let b = fs::read(&path).unwrap();

    // File start: magic, "7\0", little endian, sizeof(long) 8, page 4096, "none\0" "\0".
    let mut start = vec![0x17, 0x08, 0x44];
    start.extend_from_slice(b"tracing7\0");
    start.extend_from_slice(&[0, 8, 0x00, 0x10, 0, 0]);
    start.extend_from_slice(b"none\0\0");
    assert_eq!(&b[..24], &start[..]);
    let options1 = usize::try_from(u64_at(&b, 24)).unwrap();

    // HEADER_INFO at 32, uncompressed, no description, its exact payload.
    let mut info = b"header_page\0".to_vec();
    info.extend_from_slice(&u64::try_from(meta.header_page.len()).unwrap().to_le_bytes());
    info.extend_from_slice(&meta.header_page);
    info.extend_from_slice(b"header_event\0");
    info.extend_from_slice(
        &u64::try_from(meta.header_event.len())
            .unwrap()
            .to_le_bytes(),
    );
    info.extend_from_slice(&meta.header_event);
    assert_eq!(
        section_header(&b, 32),
        (16, 0, -1, u64::try_from(info.len()).unwrap())
    );
    assert_eq!(&b[48..48 + info.len()], &info[..]);

    // Options section 1: its first option points at HEADER_INFO; it ends with DONE -> options 2.
    let (id, flags, _, size) = section_header(&b, options1);
    assert_eq!((id, flags), (0, 0));
    let body = options1 + 16;
    assert_eq!(&b[body..body + 6], &[16, 0, 8, 0, 0, 0]);
    assert_eq!(u64_at(&b, body + 6), 32);
    let done = body + usize::try_from(size).unwrap() - 14;
    assert_eq!(&b[done..done + 6], &[0, 0, 8, 0, 0, 0]);
    let options2 = usize::try_from(u64_at(&b, done + 6)).unwrap();

    // Options section 2: the BUFFER option, then DONE with next 0 at the very end.
    assert_eq!(section_header(&b, options2).0, 0);
    let opt = options2 + 16;
    assert_eq!(u16::from_le_bytes([b[opt], b[opt + 1]]), 3);
    let buffer_at = usize::try_from(u64_at(&b, opt + 6)).unwrap();
    assert_eq!(&b[opt + 14..opt + 21], b"\0local\0");
    assert_eq!(&b[opt + 21..opt + 29], &[0, 0x10, 0, 0, 1, 0, 0, 0]);
    assert_eq!(&b[opt + 29..opt + 33], &[0, 0, 0, 0]); // CPU 0
    let data_at = usize::try_from(u64_at(&b, opt + 33)).unwrap();
    assert_eq!(u64_at(&b, opt + 41), 4096);
    assert_eq!(&b[b.len() - 14..b.len() - 8], &[0, 0, 8, 0, 0, 0]);
    assert_eq!(u64_at(&b, b.len() - 8), 0);

    // The BUFFER section: uncompressed, its page aligned and verbatim.
    let (id, flags, _, size) = section_header(&b, buffer_at);
    assert_eq!((id, flags), (3, 0));
    assert_eq!(data_at % 4096, 0);
    assert_eq!(
        buffer_at + 16 + usize::try_from(size).unwrap(),
        data_at + 4096
    );
    assert_eq!(&b[data_at..data_at + 4096], &page[..]);

    // And trace-cmd 3.1.6 prints what it prints for the version-6 golden file.
    let v6 = write_file(dir.path(), &meta, &[page]);
    assert_eq!(report(&path, &[]), report(&v6, &[]));
}

/// A version-7 file the fuzzer made whose BUFFER option lists CPU 4294967295: the reader
/// once overflowed counting CPUs; now it refuses the file.
#[test]
fn a_version_7_buffer_naming_cpu_u32_max_is_refused_not_a_panic() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tracedat/fuzz-buffer-cpu-id-u32-max.dat");
    assert!(TraceDatFile::open(&path).is_err());
}
