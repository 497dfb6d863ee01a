//! Golden bytes from the issue-9 spec (checked there against trace-cmd 3.1.6), the rules of the
//! validating constructors, trace-cmd's arithmetic, and encode/decode round trips.

use super::*;
use proptest::prelude::*;

fn hex(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

/// `u16 id, u32 size, payload`, as the writer frames an option.
fn framed(id: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = id.to_le_bytes().to_vec();
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Spec §1.2: peer 0x1111, interpolate, CPU 0 (1000, +1500) (2000, +1600), CPU 1 (1000, -7).
const TIME_SHIFT_HEX: &str = "
0c 00 78 00 00 00 11 11 00 00 00 00 00 00 01 00
00 00 02 00 00 00 02 00 00 00 e8 03 00 00 00 00
00 00 d0 07 00 00 00 00 00 00 dc 05 00 00 00 00
00 00 40 06 00 00 00 00 00 00 01 00 00 00 00 00
00 00 01 00 00 00 00 00 00 00 01 00 00 00 e8 03
00 00 00 00 00 00 f9 ff ff ff ff ff ff ff 01 00
00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
00 00 00 00 00 00 00 00 00 00 00 00 00 00";

/// Spec §7.6: GUEST `vm1`, id 0x2222, tids [4242, 4243].
const GUEST_HEX: &str = "0d 00 20 00 00 00 76 6d 31 00 22 22 00 00 00 00 00 00 02 00 00 00 \
                         00 00 00 00 92 10 00 00 01 00 00 00 93 10 00 00";

/// Spec §7.6: TSC2NSEC mult 715827883, shift 31 (3 GHz), offset 0.
const TSC2NSEC_HEX: &str = "0e 00 10 00 00 00 ab aa aa 2a 1f 00 00 00 00 00 00 00 00 00 00 00";

fn spec_time_shift() -> TimeShift {
    TimeShift::new(
        0x1111,
        true,
        vec![
            vec![TimeSample::new(1000, 1500), TimeSample::new(2000, 1600)],
            vec![TimeSample::new(1000, -7)],
        ],
    )
    .unwrap()
}

#[test]
fn time_shift_encodes_to_the_spec_bytes() {
    let shift = spec_time_shift();

    let bytes = framed(option_id_time_shift(), &shift.encode());

    assert_eq!(bytes, hex(TIME_SHIFT_HEX));
}

fn option_id_time_shift() -> u16 {
    crate::tracedat::option_id::TIME_SHIFT
}

#[test]
fn time_shift_decodes_from_the_spec_bytes() {
    let bytes = hex(TIME_SHIFT_HEX);

    let shift = TimeShift::decode(&bytes[6..]).unwrap();

    assert_eq!(shift, spec_time_shift());
    assert_eq!(shift.flags(), TimeShift::FLAG_INTERPOLATE);
}

#[test]
fn spec_example_gives_the_times_trace_cmd_printed() {
    // Spec §1.2: report printed 3050 and 4993 ns for raw 1500 (CPU 0) and 5000 (CPU 1).
    let shift = spec_time_shift();

    assert_eq!(shift.host_time(0, 1500), Some(3050));
    assert_eq!(shift.host_time(1, 5000), Some(4993));
    assert_eq!(shift.host_time(2, 5000), Some(5000), "CPUs beyond ncpu");
}

#[test]
fn guest_encodes_to_the_spec_bytes() {
    let guest = GuestOption::new("vm1", 0x2222, vec![4242, 4243]).unwrap();

    let bytes = framed(crate::tracedat::option_id::GUEST, &guest.encode());

    assert_eq!(bytes, hex(GUEST_HEX));
    assert_eq!(GuestOption::decode(&bytes[6..]).unwrap(), guest);
}

#[test]
fn tsc2nsec_encodes_to_the_spec_bytes() {
    let tsc2nsec = Tsc2Nsec::new(715_827_883, 31).unwrap();

    let bytes = framed(crate::tracedat::option_id::TSC2NSEC, &tsc2nsec.encode());

    assert_eq!(bytes, hex(TSC2NSEC_HEX));
    assert_eq!(Tsc2Nsec::decode(&bytes[6..]).unwrap(), tsc2nsec);
    assert_eq!(tsc2nsec.to_ns(3_000_000_000), 1_000_000_000);
}

#[test]
fn time_shift_without_fraction_arrays_reads_fraction_zero() {
    let shift = TimeShift::new(
        1,
        false,
        vec![vec![TimeSample::scaled(0, 5, 3, 0), TimeSample::new(9, 6)]],
    )
    .unwrap();
    let mut bytes = shift.encode();
    bytes.truncate(bytes.len() - 16);

    assert_eq!(TimeShift::decode(&bytes).unwrap(), shift);
}

#[test]
fn samples_are_sorted_by_time() {
    let shift = TimeShift::new(
        1,
        false,
        vec![vec![TimeSample::new(30, 3), TimeSample::new(10, 1)]],
    )
    .unwrap();

    assert_eq!(
        shift.cpus()[0],
        [TimeSample::new(10, 1), TimeSample::new(30, 3)]
    );
}

#[test]
fn time_shift_rules_are_enforced() {
    let one = |s: TimeSample| TimeShift::new(1, false, vec![vec![s]]).unwrap_err();
    use SyncOptionError as E;

    assert_eq!(
        TimeShift::new(1, false, vec![]).unwrap_err(),
        E::TimeShiftNoCpus
    );
    assert_eq!(
        TimeShift::new(1, false, vec![vec![TimeSample::new(0, 1)], vec![]]).unwrap_err(),
        E::TimeShiftNoSamples { cpu: 1 }
    );
    assert!(matches!(
        one(TimeSample::new(-1, 0)),
        E::TimeShiftNegativeTime { time: -1, .. }
    ));
    assert!(matches!(
        one(TimeSample::scaled(0, 0, 0, 0)),
        E::TimeShiftScaling { scaling: 0, .. }
    ));
    assert!(matches!(
        one(TimeSample::scaled(0, 0, 1, 64)),
        E::TimeShiftFraction { fraction: 64, .. }
    ));
    let twice = vec![vec![TimeSample::new(5, 1), TimeSample::new(5, 2)]];
    assert_eq!(
        TimeShift::new(1, false, twice).unwrap_err(),
        E::TimeShiftDuplicateTime { cpu: 0, time: 5 }
    );
    assert_eq!(
        TimeShift::decode(&[0; 12]).unwrap_err(),
        E::Truncated {
            option: "TIME_SHIFT",
            size: 12,
            what: "CPU count"
        }
    );
}

#[test]
fn interpolation_that_overflows_is_refused() {
    // Spec §2, `ovf.dat`: Δt 5e11 and Δo 1e10 overflowed in report; the product must stay < 2^63.
    let ovf = vec![vec![
        TimeSample::new(0, 0),
        TimeSample::new(500_000_000_000, 10_000_000_000),
    ]];
    let noovf = vec![vec![
        TimeSample::new(0, 0),
        TimeSample::new(500_000_000_000, 10_000_000),
    ]];

    let err = TimeShift::new(1, true, ovf.clone()).unwrap_err();

    assert!(
        matches!(
            err,
            SyncOptionError::TimeShiftInterpolationOverflow { cpu: 0, .. }
        ),
        "{err}"
    );
    assert!(TimeShift::new(1, false, ovf).is_ok(), "no interpolation");
    let shift = TimeShift::new(1, true, noovf).unwrap();
    assert_eq!(shift.host_time(0, 500_000_000_000), Some(500_010_000_000));
    assert!(shift.check_events(0, 0, 500_000_000_000).is_ok());
    assert!(matches!(
        shift.check_events(0, 0, 1 << 62),
        Err(SyncOptionError::TimeShiftEventOverflow { cpu: 0, .. })
    ));
}

#[test]
fn host_time_follows_trace_cmds_sample_selection() {
    // Spec §6 `m2f0`/`m3f0`/`m2f1`: samples at 1 s and 2 s (and 3 s), offsets 1000, 2000 (4000).
    let s = 1_000_000_000;
    let two = vec![TimeSample::new(s, 1000), TimeSample::new(2 * s, 2000)];
    let mut three = two.clone();
    three.push(TimeSample::new(3 * s, 4000));
    let m2f0 = TimeShift::new(1, false, vec![two.clone()]).unwrap();
    let m3f0 = TimeShift::new(1, false, vec![three]).unwrap();
    let m2f1 = TimeShift::new(1, true, vec![two]).unwrap();
    let shifted = |shift: &TimeShift, ts: i64| {
        let ts = u64::try_from(ts).unwrap();
        shift.host_time(0, ts).unwrap() - ts
    };

    // Two samples without interpolation: always the first offset.
    assert_eq!(shifted(&m2f0, 3 * s + s / 2), 1000);
    // More: the sample at or before ts, except after the last one (then the one before).
    assert_eq!(shifted(&m3f0, s / 2), 1000);
    assert_eq!(shifted(&m3f0, 2 * s + s / 2), 2000);
    assert_eq!(shifted(&m3f0, 3 * s), 2000);
    assert_eq!(shifted(&m3f0, 3 * s + s / 2), 2000);
    // Interpolation, rounded as report printed it (+501 at 0.5 s).
    assert_eq!(shifted(&m2f1, s / 2), 501);
    assert_eq!(shifted(&m2f1, 3 * s + s / 2), 3500);
}

#[test]
fn guest_rules_are_enforced() {
    use SyncOptionError as E;

    assert_eq!(
        GuestOption::new("", 1, vec![1]).unwrap_err(),
        E::GuestNameEmpty
    );
    assert!(matches!(
        GuestOption::new("a\0b", 1, vec![1]).unwrap_err(),
        E::GuestNameNul { .. }
    ));
    assert!(matches!(
        GuestOption::new("vm", 0, vec![1]).unwrap_err(),
        E::GuestTraceIdZero { .. }
    ));
    assert!(matches!(
        GuestOption::new("vm", 1, vec![]).unwrap_err(),
        E::GuestNoVcpus { .. }
    ));
    assert!(matches!(
        GuestOption::new("vm", 1, vec![5, 0]).unwrap_err(),
        E::GuestTidZero { vcpu: 1, .. }
    ));
    assert!(GuestOption::new("vm", 1, vec![GuestOption::UNKNOWN_TID]).is_ok());
}

#[test]
fn guest_vcpus_may_come_in_any_order_but_each_once() {
    let mut bytes = b"vm\0".to_vec();
    bytes.extend_from_slice(&7u64.to_le_bytes());
    bytes.extend_from_slice(&2u32.to_le_bytes());
    let entry = |vcpu: u32, tid: u32| [vcpu.to_le_bytes(), tid.to_le_bytes()].concat();
    let swapped = [bytes.clone(), entry(1, 11), entry(0, 10)].concat();
    let doubled = [bytes.clone(), entry(1, 11), entry(1, 10)].concat();
    let beyond = [bytes, entry(0, 10), entry(2, 12)].concat();

    assert_eq!(GuestOption::decode(&swapped).unwrap().vcpu_tids(), [10, 11]);
    assert!(matches!(
        GuestOption::decode(&doubled).unwrap_err(),
        SyncOptionError::GuestVcpuTwice { vcpu: 1, .. }
    ));
    assert!(matches!(
        GuestOption::decode(&beyond).unwrap_err(),
        SyncOptionError::GuestVcpuOutOfRange {
            vcpu: 2,
            count: 2,
            ..
        }
    ));
}

#[test]
fn guest_count_beyond_the_payload_is_refused_before_allocating() {
    let mut bytes = b"vm\0".to_vec();
    bytes.extend_from_slice(&7u64.to_le_bytes());
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());

    let err = GuestOption::decode(&bytes).unwrap_err();

    assert!(matches!(err, SyncOptionError::Truncated { .. }), "{err}");
}

#[test]
fn tsc2nsec_is_normalised_and_checked() {
    use SyncOptionError as E;

    // Spec §6 `big`/`big2`: 0xC0000000/31 printed garbage, 0x60000000/30 the right time.
    let big = Tsc2Nsec::new(0xC000_0000, 31).unwrap();

    assert_eq!((big.mult(), big.shift()), (0x6000_0000, 30));
    assert_eq!(big.to_ns(2_000_000_000), 3_000_000_000);
    assert_eq!(Tsc2Nsec::new(0, 1).unwrap_err(), E::Tsc2NsecMultZero);
    assert!(matches!(
        Tsc2Nsec::new(1, 33).unwrap_err(),
        E::Tsc2NsecShift { .. }
    ));
    assert!(matches!(
        Tsc2Nsec::new(0x8000_0000, 0).unwrap_err(),
        E::Tsc2NsecShift { .. }
    ));
    // Spec §6 `s32b`: shift 32 works.
    assert_eq!(
        Tsc2Nsec::new(1 << 30, 32).unwrap().to_ns(20_000_000_000),
        5_000_000_000
    );
    let mut with_offset = Tsc2Nsec::new(1, 0).unwrap().encode();
    with_offset[8] = 1;
    assert_eq!(
        Tsc2Nsec::decode(&with_offset).unwrap_err(),
        E::Tsc2NsecOffset { offset: 1 }
    );
    let raw_big = [0xC000_0000u32.to_le_bytes(), 31u32.to_le_bytes()].concat();
    let raw_big = [raw_big, vec![0; 8]].concat();
    assert!(matches!(
        Tsc2Nsec::decode(&raw_big).unwrap_err(),
        E::Tsc2NsecMultTooLarge { .. }
    ));
}

fn sample() -> impl Strategy<Value = TimeSample> {
    (
        0..i64::MAX,
        any::<i64>(),
        prop_oneof![Just(1i64), 1..i64::MAX],
        0..64i64,
    )
        .prop_map(|(time, offset, scaling, fraction)| {
            TimeSample::scaled(time, offset, scaling, fraction)
        })
}

prop_compose! {
    fn time_shift()(
        peer in any::<u64>(),
        cpus in proptest::collection::vec(proptest::collection::vec(sample(), 1..6), 1..5),
    ) -> TimeShift {
        // Without interpolation every sorted, distinct set is valid.
        let cpus = cpus.into_iter().map(|mut samples| {
            samples.sort_by_key(|s| s.time);
            samples.dedup_by_key(|s| s.time);
            samples
        }).collect();
        TimeShift::new(peer, false, cpus).unwrap()
    }
}

proptest! {
    #[test]
    fn time_shift_round_trips(shift in time_shift()) {
        prop_assert_eq!(TimeShift::decode(&shift.encode()).unwrap(), shift);
    }

    #[test]
    fn interpolating_time_shift_round_trips(
        cpus in proptest::collection::vec(
            proptest::collection::btree_map(0..1i64 << 40, -(1i64 << 20)..1 << 20, 1..6), 1..4),
    ) {
        let cpus = cpus.into_iter()
            .map(|m| m.into_iter().map(|(t, o)| TimeSample::new(t, o)).collect())
            .collect();
        let shift = TimeShift::new(9, true, cpus).unwrap();

        prop_assert_eq!(TimeShift::decode(&shift.encode()).unwrap(), shift);
    }

    #[test]
    fn guest_round_trips(
        name in "[^\u{0}]{1,30}",
        trace_id in 1..u64::MAX,
        tids in proptest::collection::vec(1..=u32::MAX, 1..20),
    ) {
        let guest = GuestOption::new(name, trace_id, tids).unwrap();

        prop_assert_eq!(GuestOption::decode(&guest.encode()).unwrap(), guest);
    }

    #[test]
    fn tsc2nsec_round_trips(mult in 1..=u32::MAX, shift in 0..=40u32) {
        if let Ok(tsc2nsec) = Tsc2Nsec::new(mult, shift) {
            prop_assert!(tsc2nsec.mult() <= Tsc2Nsec::MAX_MULT && tsc2nsec.shift() <= 32);
            prop_assert_eq!(Tsc2Nsec::decode(&tsc2nsec.encode()).unwrap(), tsc2nsec);
        }
    }

    #[test]
    fn truncated_time_shift_is_an_error(shift in time_shift(), cut in any::<prop::sample::Index>()) {
        let bytes = shift.encode();
        // Dropping exactly the fraction arrays is allowed (trace-cmd reads them as 0).
        let fractions: usize = shift.cpus().iter().map(|s| 8 * s.len()).sum();
        let cut = cut.index(bytes.len());
        prop_assume!(cut != bytes.len() - fractions);

        prop_assert!(TimeShift::decode(&bytes[..cut]).is_err());
    }

    #[test]
    fn random_payloads_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = TimeShift::decode(&data);
        let _ = GuestOption::decode(&data);
        let _ = Tsc2Nsec::decode(&data);
    }
}
