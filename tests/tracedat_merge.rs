//! Issue 9, one timeline: a host file and guest files written by tvctl merge in
//! `trace-cmd report -i host.dat -i vm1.dat` in corrected time order. The files are hand-built
//! (one `test:mark` event with a `value` field, one page per CPU) and go through our writer;
//! what counts is what the real trace-cmd 3.1.6 prints. The report tests fail, never skip, when
//! trace-cmd is missing.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use tvctl::tracedat::{
    GuestOption, SyncOptionError, TimeSample, TimeShift, TraceDatError, TraceDatFile, TraceMeta,
    Tsc2Nsec,
};

const HEADER_PAGE: &[u8] = include_bytes!("data/tracedat/header_page_64.txt");
const HEADER_EVENT: &[u8] = include_bytes!("data/tracedat/header_event.txt");
const MARK_FORMAT: &str = "name: mark\nID: 100\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\
\n\
\tfield:int value;\toffset:8;\tsize:4;\tsigned:1;\n\
\n\
print fmt: \"value=%d\", REC->value\n";

const LOCAL_CLOCK: &str = "[local] global counter uptime perf mono mono_raw boot\n";
const TSC_CLOCK: &str = "local global counter uptime perf mono mono_raw boot tai [x86-tsc]\n";
const HOST_ID: u64 = 0x1111_0000_0000_0001;
const VM1_ID: u64 = 0x2222_0000_0000_0002;
const VM2_ID: u64 = 0x3333_0000_0000_0003;
/// 3 GHz: spec §7.6's TSC2NSEC vector.
const MULT_3GHZ: u32 = 715_827_883;
const SEC: u64 = 1_000_000_000;

/// Spec §7.6 golden vectors, framed as options.
const GUEST_VM1_HEX: &str = "0d 00 20 00 00 00 76 6d 31 00 22 22 00 00 00 00 00 00 02 00 00 00 \
                             00 00 00 00 92 10 00 00 01 00 00 00 93 10 00 00";
const TSC2NSEC_3GHZ_HEX: &str = "0e 00 10 00 00 00 ab aa aa 2a 1f 00 00 00 00 00 00 00 00 00 00 00";

/// One CPU's events: `(raw time, value)`, sorted by time.
type Events = Vec<(u64, i32)>;

/// One 4096-byte ring-buffer page holding `events` of `pid`; gaps of 2^27 or more get a time
/// extend, as the kernel writes them.
fn page(events: &[(u64, i32)], pid: i32) -> Vec<u8> {
    let Some(&(first, _)) = events.first() else {
        return Vec::new();
    };
    let mut data = Vec::new();
    let mut prev = first;
    for &(ts, value) in events {
        let mut delta = ts - prev;
        if delta >= 1 << 27 {
            let low = u32::try_from(delta & ((1 << 27) - 1)).unwrap();
            data.extend_from_slice(&(30 | (low << 5)).to_le_bytes());
            data.extend_from_slice(&u32::try_from(delta >> 27).unwrap().to_le_bytes());
            delta = 0;
        }
        let delta = u32::try_from(delta).unwrap();
        data.extend_from_slice(&(3 | (delta << 5)).to_le_bytes());
        data.extend_from_slice(&100u16.to_le_bytes());
        data.extend_from_slice(&[0, 0]);
        data.extend_from_slice(&pid.to_le_bytes());
        data.extend_from_slice(&value.to_le_bytes());
        prev = ts;
    }
    let mut page = vec![0u8; 4096];
    page[..8].copy_from_slice(&first.to_le_bytes());
    page[8..16].copy_from_slice(&u64::try_from(data.len()).unwrap().to_le_bytes());
    page[16..16 + data.len()].copy_from_slice(&data);
    page
}

/// Metadata of a file whose events all come from `pid`, without host/guest options.
fn meta(pid: i32, trace_id: u64, clock: &str) -> TraceMeta {
    TraceMeta {
        page_size: 4096,
        header_page: HEADER_PAGE.to_vec(),
        header_event: HEADER_EVENT.to_vec(),
        event_systems: vec![("test".into(), vec![MARK_FORMAT.as_bytes().to_vec()])],
        saved_cmdlines: format!("{pid} task{pid}\n").into_bytes(),
        trace_clock: Some(clock.into()),
        trace_id: Some(trace_id),
        ..TraceMeta::default()
    }
}

/// Writes `dir/name` with one page per CPU.
fn write(dir: &Path, name: &str, meta: &TraceMeta, pid: i32, cpus: &[Events]) -> PathBuf {
    let parts = dir.join(format!("{name}.parts"));
    fs::create_dir(&parts).unwrap();
    let pages: Vec<Vec<u8>> = cpus.iter().map(|events| page(events, pid)).collect();
    let (written, _) = common::write_trace_file(&parts, meta, &pages);
    let path = dir.join(name);
    fs::rename(written, &path).unwrap();
    path
}

fn trace_cmd(args: &[&str], files: &[&Path]) -> String {
    let mut cmd = Command::new("trace-cmd");
    cmd.args(args);
    for file in files {
        cmd.arg("-i").arg(file);
    }
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

/// `trace-cmd report -t [extra] -i file...`, as `(file, cpu, time, value)` per event line.
fn report(extra: &[&str], files: &[&Path]) -> Vec<(String, u32, String, i32)> {
    let args: Vec<&str> = ["report", "-t"].iter().chain(extra).copied().collect();
    let out = trace_cmd(&args, files);
    let lines: Vec<_> = out
        .lines()
        .filter(|l| l.contains(": mark:"))
        .map(|line| parse_line(line).unwrap_or_else(|| panic!("odd line {line:?} in\n{out}")))
        .collect();
    assert!(!lines.is_empty(), "no events in\n{out}");
    lines
}

/// `" vm1.dat:    task20-20    [001]     2.500000000: mark:    value=2"`.
fn parse_line(line: &str) -> Option<(String, u32, String, i32)> {
    let (file, rest) = line.split_once(": ")?;
    let (_, rest) = rest.split_once('[')?;
    let (cpu, rest) = rest.split_once(']')?;
    let (time, rest) = rest.trim_start().split_once(": mark:")?;
    let (_, value) = rest.split_once("value=")?;
    Some((
        file.trim().to_owned(),
        cpu.parse().ok()?,
        time.to_owned(),
        value.trim().parse().ok()?,
    ))
}

/// `(file, cpu, time, value)` as the expected side of a comparison.
fn ev(file: &str, cpu: u32, time: &str, value: i32) -> (String, u32, String, i32) {
    (file.into(), cpu, time.into(), value)
}

/// Nanoseconds as report's `-t` prints them.
fn secs(ns: u64) -> String {
    format!("{}.{:09}", ns / SEC, ns % SEC)
}

/// Host events at 1.0 s and 3.0 s; vm1's one event at raw 0.5 s, shifted by +2.0 s.
fn one_sample_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let host = TraceMeta {
        guests: vec![GuestOption::new("vm1", VM1_ID, vec![4242]).unwrap()],
        ..meta(10, HOST_ID, LOCAL_CLOCK)
    };
    let guest = TraceMeta {
        time_shift: Some(TimeShift::fixed_offsets(HOST_ID, &[2 * SEC as i64]).unwrap()),
        ..meta(20, VM1_ID, LOCAL_CLOCK)
    };
    (
        write(dir, "host.dat", &host, 10, &[vec![(SEC, 1), (3 * SEC, 3)]]),
        write(dir, "vm1.dat", &guest, 20, &[vec![(SEC / 2, 2)]]),
    )
}

#[test]
fn guest_with_one_sample_is_merged_between_host_events() {
    let dir = tempfile::tempdir().unwrap();
    let (host, vm1) = one_sample_pair(dir.path());

    let lines = report(&[], &[&host, &vm1]);

    assert_eq!(
        lines,
        [
            ev("host.dat", 0, "1.000000000", 1),
            ev("vm1.dat", 0, "2.500000000", 2),
            ev("host.dat", 0, "3.000000000", 3),
        ]
    );
}

#[test]
fn raw_ts_shows_the_uncorrected_order() {
    let dir = tempfile::tempdir().unwrap();
    let (host, vm1) = one_sample_pair(dir.path());

    let lines = report(&["--raw-ts"], &[&host, &vm1]);

    // With --raw-ts, 3.1.6 prints raw integers even for a `[local]` clock.
    assert_eq!(
        lines,
        [
            ev("vm1.dat", 0, "500000000", 2),
            ev("host.dat", 0, "1000000000", 1),
            ev("host.dat", 0, "3000000000", 3),
        ]
    );
}

#[test]
fn two_segments_with_a_sentinel_step_the_offset() {
    // Offset +0.5 s until raw 2.0 s, +1.5 s from then on. Without interpolation trace-cmd uses
    // the sample at or before an event, except after the last sample (then the one before it):
    // the sentinel after the last event keeps the step's own offset in force to the end.
    let dir = tempfile::tempdir().unwrap();
    let step = vec![
        TimeSample::new(0, SEC as i64 / 2),
        TimeSample::new(2 * SEC as i64, 3 * SEC as i64 / 2),
        TimeSample::new(3 * SEC as i64 + 1, 3 * SEC as i64 / 2),
    ];
    let shift = TimeShift::new(HOST_ID, false, vec![step.clone()]).unwrap();
    let host = meta(10, HOST_ID, LOCAL_CLOCK);
    let guest = TraceMeta {
        time_shift: Some(shift.clone()),
        ..meta(20, VM1_ID, LOCAL_CLOCK)
    };
    let host = write(
        dir.path(),
        "host.dat",
        &host,
        10,
        &[vec![(2 * SEC, 11), (4 * SEC, 12)]],
    );
    let guest_events = vec![(SEC, 21), (2 * SEC, 22), (3 * SEC, 23)];
    let vm1 = write(
        dir.path(),
        "vm1.dat",
        &guest,
        20,
        std::slice::from_ref(&guest_events),
    );

    let lines = report(&[], &[&host, &vm1]);

    assert_eq!(
        lines,
        [
            ev("vm1.dat", 0, "1.500000000", 21),
            ev("host.dat", 0, "2.000000000", 11),
            ev("vm1.dat", 0, "3.500000000", 22),
            ev("host.dat", 0, "4.000000000", 12),
            ev("vm1.dat", 0, "4.500000000", 23),
        ]
    );
    for (raw, value) in guest_events {
        let printed = lines.iter().find(|l| l.3 == value).unwrap();
        assert_eq!(
            printed.2,
            secs(shift.host_time(0, raw).unwrap()),
            "TimeShift::host_time"
        );
    }
    let without_sentinel = TimeShift::new(HOST_ID, false, vec![step[..2].to_vec()]).unwrap();
    assert_eq!(
        without_sentinel.host_time(0, 3 * SEC),
        Some(3 * SEC + SEC / 2),
        "two samples: trace-cmd keeps the first offset"
    );
}

#[test]
fn each_guest_cpu_has_its_own_offset_and_two_guests_merge() {
    let dir = tempfile::tempdir().unwrap();
    let host = TraceMeta {
        guests: vec![
            GuestOption::new("vm1", VM1_ID, vec![4242, 4243]).unwrap(),
            GuestOption::new("vm2", VM2_ID, vec![4250]).unwrap(),
        ],
        ..meta(10, HOST_ID, LOCAL_CLOCK)
    };
    let vm1 = TraceMeta {
        time_shift: Some(TimeShift::fixed_offsets(HOST_ID, &[SEC as i64, 3 * SEC as i64]).unwrap()),
        ..meta(20, VM1_ID, LOCAL_CLOCK)
    };
    let vm2 = TraceMeta {
        time_shift: Some(TimeShift::fixed_offsets(HOST_ID, &[-(11 * SEC as i64) / 2]).unwrap()),
        ..meta(30, VM2_ID, LOCAL_CLOCK)
    };
    let host_events = vec![(SEC, 11), (3 * SEC, 12), (5 * SEC, 13)];
    let host = write(dir.path(), "host.dat", &host, 10, &[host_events]);
    let vm1 = write(
        dir.path(),
        "vm1.dat",
        &vm1,
        20,
        &[vec![(SEC, 21)], vec![(SEC, 22)]],
    );
    let vm2 = write(dir.path(), "vm2.dat", &vm2, 30, &[vec![(10 * SEC, 31)]]);

    let lines = report(&[], &[&host, &vm1, &vm2]);

    assert_eq!(
        lines,
        [
            ev("host.dat", 0, "1.000000000", 11),
            ev("vm1.dat", 0, "2.000000000", 21),
            ev("host.dat", 0, "3.000000000", 12),
            ev("vm1.dat", 1, "4.000000000", 22),
            ev("vm2.dat", 0, "4.500000000", 31),
            ev("host.dat", 0, "5.000000000", 13),
        ]
    );
}

/// Spec §6 `t5`, at 3 GHz: both files on x86-tsc with TSC2NSEC; host events at 3e9 and 9e9
/// cycles, the guest's at raw 1.5e9 cycles with a TIME_SHIFT of +6e9 cycles.
fn tsc_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let tsc2nsec = Some(Tsc2Nsec::new(MULT_3GHZ, 31).unwrap());
    let host = TraceMeta {
        guests: vec![GuestOption::new("vm1", VM1_ID, vec![4242]).unwrap()],
        tsc2nsec,
        ..meta(10, HOST_ID, TSC_CLOCK)
    };
    let guest = TraceMeta {
        tsc2nsec,
        time_shift: Some(TimeShift::fixed_offsets(HOST_ID, &[6 * SEC as i64]).unwrap()),
        ..meta(20, VM1_ID, TSC_CLOCK)
    };
    (
        write(
            dir,
            "host.dat",
            &host,
            10,
            &[vec![(3 * SEC, 1), (9 * SEC, 3)]],
        ),
        write(dir, "vm1.dat", &guest, 20, &[vec![(3 * SEC / 2, 2)]]),
    )
}

#[test]
fn tsc2nsec_on_both_files_turns_cycles_into_ns() {
    let dir = tempfile::tempdir().unwrap();
    let (host, vm1) = tsc_pair(dir.path());
    let tsc = Tsc2Nsec::new(MULT_3GHZ, 31).unwrap();

    let lines = report(&[], &[&host, &vm1]);

    // mul_u64_u32_shr() rounds each 32-bit half down, hence the stray nanosecond.
    assert_eq!(
        lines,
        [
            ev("host.dat", 0, "1.000000000", 1),
            ev("vm1.dat", 0, "2.500000001", 2),
            ev("host.dat", 0, "3.000000001", 3),
        ]
    );
    assert_eq!(secs(tsc.to_ns(3 * SEC)), lines[0].2, "Tsc2Nsec::to_ns");
    assert_eq!(secs(tsc.to_ns(15 * SEC / 2)), lines[1].2, "Tsc2Nsec::to_ns");
    assert_eq!(secs(tsc.to_ns(9 * SEC)), lines[2].2, "Tsc2Nsec::to_ns");
}

#[test]
fn tsc_files_with_raw_ts_show_cycles_in_uncorrected_order() {
    let dir = tempfile::tempdir().unwrap();
    let (host, vm1) = tsc_pair(dir.path());

    let lines = report(&["--raw-ts"], &[&host, &vm1]);

    assert_eq!(
        lines,
        [
            ev("vm1.dat", 0, "1500000000", 2),
            ev("host.dat", 0, "3000000000", 1),
            ev("host.dat", 0, "9000000000", 3),
        ]
    );
}

#[test]
fn dump_options_shows_guest_tsc2nsec_and_time_shift() {
    let dir = tempfile::tempdir().unwrap();
    let (host, vm1) = tsc_pair(dir.path());

    let host_options = trace_cmd(&["dump", "--options"], &[&host]);
    let guest_options = trace_cmd(&["dump", "--options"], &[&vm1]);

    for expected in [
        "[Option GUEST, 24 bytes]",
        "vm1 [Guest name]",
        "0x2222000000000002 [trace id]",
        "1 [Guest CPUs]",
        "0 4242 [guest cpu, host pid]",
        "[Option TSC2NSEC, 16 bytes]",
        "715827883 31 0 [multiplier, shift, offset]",
    ] {
        assert!(
            host_options.contains(expected),
            "{expected:?} in\n{host_options}"
        );
    }
    for expected in [
        "[Option TimeShift, 52 bytes]",
        "0x1111000000000001 [peer's trace id]",
        "0x1 [peer's CPU count]",
        "6000000000 1 0 0[offset * scaling >> fraction @ time]",
    ] {
        assert!(
            guest_options.contains(expected),
            "{expected:?} in\n{guest_options}"
        );
    }
}

#[test]
fn written_options_read_back_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let (host, vm1) = tsc_pair(dir.path());
    let host_meta = TraceMeta {
        guests: vec![GuestOption::new("vm1", VM1_ID, vec![4242]).unwrap()],
        tsc2nsec: Some(Tsc2Nsec::new(MULT_3GHZ, 31).unwrap()),
        ..meta(10, HOST_ID, TSC_CLOCK)
    };

    let host = TraceDatFile::open(host).unwrap();
    let vm1 = TraceDatFile::open(vm1).unwrap();

    assert_eq!(host.meta(), &host_meta);
    assert!(host.other_options().is_empty());
    let shift = vm1.meta().time_shift.as_ref().unwrap();
    assert_eq!(shift.peer_trace_id(), HOST_ID);
    assert_eq!(shift.cpus(), [vec![TimeSample::new(0, 6 * SEC as i64)]]);
    assert_eq!(vm1.meta().tsc2nsec, host_meta.tsc2nsec);
    assert!(vm1.meta().guests.is_empty());
}

#[test]
fn options_follow_cpustat_in_records_order() {
    // The spec's GUEST and TSC2NSEC vectors appear in the file as they are, after CPUSTAT
    // and followed by TIME_SHIFT, then the end of the option list.
    let dir = tempfile::tempdir().unwrap();
    let shift = TimeShift::fixed_offsets(HOST_ID, &[7]).unwrap();
    let meta = TraceMeta {
        cpu_stats: vec!["entries: 0\n".into()],
        guests: vec![GuestOption::new("vm1", 0x2222, vec![4242, 4243]).unwrap()],
        tsc2nsec: Some(Tsc2Nsec::new(MULT_3GHZ, 31).unwrap()),
        time_shift: Some(shift.clone()),
        ..meta(10, HOST_ID, LOCAL_CLOCK)
    };
    let path = write(dir.path(), "both.dat", &meta, 10, &[vec![(SEC, 1)]]);
    let mut expected = b"entries: 0\n\0".to_vec();
    expected.extend(hex(GUEST_VM1_HEX));
    expected.extend(hex(TSC2NSEC_3GHZ_HEX));
    expected.extend_from_slice(&[12, 0, 52, 0, 0, 0]);
    expected.extend(shift.encode());
    expected.extend_from_slice(b"\0\0flyrecord\0");

    let bytes = fs::read(&path).unwrap();

    assert!(
        bytes.windows(expected.len()).any(|w| w == expected),
        "options not found in the written file"
    );
    assert_eq!(TraceDatFile::open(&path).unwrap().meta(), &meta);
}

fn hex(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

/// The writer's error for `meta` with one CPU.
fn write_err(meta: &TraceMeta, cpus: usize) -> TraceDatError {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("cpu.raw");
    fs::write(&raw, page(&[(SEC, 1)], 1)).unwrap();
    let raw = fs::File::open(&raw).unwrap();
    let data = vec![
        tvctl::tracedat::CpuData {
            file: &raw,
            len: 4096
        };
        cpus
    ];
    let mut out = fs::File::create(dir.path().join("out.dat")).unwrap();
    tvctl::tracedat::write_trace_dat(&mut out, meta, &data).unwrap_err()
}

#[test]
fn time_shift_for_another_cpu_count_is_refused() {
    // trace-cmd would leave CPU 1 uncorrected.
    let meta = TraceMeta {
        time_shift: Some(TimeShift::fixed_offsets(HOST_ID, &[5]).unwrap()),
        ..meta(20, VM1_ID, LOCAL_CLOCK)
    };

    let err = write_err(&meta, 2);

    assert!(
        matches!(
            err,
            TraceDatError::SyncOption(SyncOptionError::TimeShiftCpuCount { option: 1, file: 2 })
        ),
        "{err:?}"
    );
}

#[test]
fn guests_need_their_own_trace_ids() {
    let guest = |id| GuestOption::new("vm", id, vec![4242]).unwrap();
    let twice = TraceMeta {
        guests: vec![guest(VM1_ID), guest(VM1_ID)],
        ..meta(10, HOST_ID, LOCAL_CLOCK)
    };
    let hosts_id = TraceMeta {
        guests: vec![guest(HOST_ID)],
        ..meta(10, HOST_ID, LOCAL_CLOCK)
    };

    let twice = write_err(&twice, 1);
    let hosts_id = write_err(&hosts_id, 1);

    assert!(
        matches!(
            twice,
            TraceDatError::SyncOption(SyncOptionError::GuestTraceIdTwice { trace_id: VM1_ID })
        ),
        "{twice:?}"
    );
    assert!(
        matches!(
            hosts_id,
            TraceDatError::SyncOption(SyncOptionError::GuestTraceIdIsHost { .. })
        ),
        "{hosts_id:?}"
    );
}

#[test]
fn sample_count_beyond_the_option_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let shift = TimeShift::fixed_offsets(HOST_ID, &[5]).unwrap();
    let meta = TraceMeta {
        time_shift: Some(shift.clone()),
        ..meta(20, VM1_ID, LOCAL_CLOCK)
    };
    let path = write(dir.path(), "vm1.dat", &meta, 20, &[vec![(SEC, 1)]]);
    let mut bytes = fs::read(&path).unwrap();
    let option = shift.encode();
    let at = bytes
        .windows(option.len())
        .position(|w| w == option)
        .unwrap();
    // The u32 sample count of CPU 0 follows peer id, flags and ncpu.
    bytes[at + 16..at + 20].copy_from_slice(&u32::MAX.to_le_bytes());
    fs::write(&path, bytes).unwrap();

    let err = TraceDatFile::open(&path).unwrap_err();

    assert!(matches!(err, TraceDatError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("TIME_SHIFT"), "{err}");
}
