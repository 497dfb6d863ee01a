//! Hand-made exchanges with known offsets, simulated clocks with offset changes, and arbitrary
//! input: each checks what the estimate promises (the true offset within ±bound).

use super::*;
use crate::tsync::trace_cmd_offset_at;
use proptest::prelude::*;

/// 1 ms at 2.3 GHz, as on the development host.
const TSC_PER_MS: u64 = 2_300_000;

fn filter() -> RoundTripFilter {
    RoundTripFilter::for_clock(TSC_PER_MS)
}

/// An exchange with true offset `offset`: the host reads at `at`, the guest reads `d1` and
/// `d1 + d2` later, the host reads again `d3` after that.
fn exchange(offset: i64, at: u64, d1: u64, d2: u64, d3: u64) -> Sample {
    let guest = |host: u64| host.checked_add_signed(-offset).unwrap();
    Sample {
        host_before: at,
        guest_before: guest(at + d1),
        guest_after: guest(at + d1 + d2),
        host_after: at + d1 + d2 + d3,
    }
}

fn segment(first: u64, last: u64, offset: i64) -> Segment {
    Segment {
        first_guest_ts: first,
        last_guest_ts: last,
        offset,
        lo: offset,
        hi: offset,
        bound: 0,
        samples: 1,
    }
}

#[test]
fn one_sample_gives_its_own_interval() {
    let sample = exchange(1000, 1_000_000, 10, 0, 10);

    let estimate = estimate(&[sample], &filter());

    let s = &estimate.segments[..];
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].lo, s[0].hi), (990, 1010));
    assert_eq!((s[0].offset, s[0].bound, s[0].samples), (1000, 10, 1));
    assert_eq!(
        (s[0].first_guest_ts, s[0].last_guest_ts),
        (999_010, 999_010)
    );
    assert_eq!(estimate.median_round_trip, Some(20));
}

#[test]
fn intersection_beats_the_fastest_round_trip() {
    // A has the tight lower edge (the guest read right after the host's), B the tight upper
    // edge (the reply came right back); B is the fastest, but alone it is ±21.
    let a = exchange(1000, 1_000_000, 2, 1, 47);
    let b = exchange(1000, 2_000_000, 40, 1, 2);
    assert!(b.round_trip() < a.round_trip());

    let estimate = estimate(&[a, b], &filter());

    let s = &estimate.segments[..];
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0].lo, s[0].hi, s[0].offset, s[0].bound),
        (998, 1002, 1000, 2)
    );
    assert_eq!(s[0].samples, 2);
}

#[test]
fn offset_change_starts_a_new_segment() {
    // A 50 ms suspend under TCG: the guest clock stands still, the offset grows by 50 ms.
    let pause = 50 * TSC_PER_MS;
    let before: Vec<Sample> = (0..5)
        .map(|i| exchange(7000, 10_000_000 + i * 1_000_000, 30, 5, 30))
        .collect();
    let after: Vec<Sample> = (0..5)
        .map(|i| {
            exchange(
                7000 + 115_000_000,
                15_000_000 + pause + i * 1_000_000,
                30,
                5,
                30,
            )
        })
        .collect();
    let samples: Vec<Sample> = before.iter().chain(&after).copied().collect();

    let estimate = estimate(&samples, &filter());

    let s = &estimate.segments[..];
    assert_eq!(s.len(), 2);
    assert!(s[0].lo <= 7000 && 7000 <= s[0].hi);
    assert!(s[1].lo <= 115_007_000 && 115_007_000 <= s[1].hi);
    assert_eq!((s[0].samples, s[1].samples, estimate.dropped), (5, 5, 0));
    assert_eq!(s[0].last_guest_ts, before[4].guest_after);
    assert_eq!(s[1].first_guest_ts, after[0].guest_before);
}

#[test]
fn sample_spanning_a_pause_is_dropped() {
    // The pause falls between the host's first read and the guest's: taken alone, this
    // sample would fit the old offset and carry a guest time of the new one.
    let mut samples: Vec<Sample> = (0..20)
        .map(|i| exchange(500, 10_000_000 + i * 1_000_000, 30, 5, 30))
        .collect();
    let pause = 80 * TSC_PER_MS;
    let at = 40_000_000;
    samples.push(Sample {
        host_before: at,
        guest_before: at + pause + 30 - (500 + pause),
        guest_after: at + pause + 35 - (500 + pause),
        host_after: at + pause + 65,
    });

    let estimate = estimate(&samples, &filter());

    assert_eq!(estimate.segments.len(), 1);
    assert_eq!((estimate.dropped, estimate.invalid), (1, 0));
    assert_eq!(estimate.segments[0].samples, 20);
    assert!(estimate.round_trip_limit.unwrap() < pause);
}

#[test]
fn impossible_samples_are_counted_as_invalid() {
    let good = exchange(0, 1_000_000, 10, 10, 10);
    let host_backwards = Sample {
        host_after: 5,
        ..good
    };
    let guest_backwards = Sample {
        guest_after: good.guest_before - 1,
        ..good
    };
    let guest_slower_than_host = Sample {
        guest_after: good.guest_before + 100,
        ..good
    };

    let estimate = estimate(
        &[
            good,
            host_backwards,
            guest_backwards,
            guest_slower_than_host,
        ],
        &filter(),
    );

    assert_eq!((estimate.dropped, estimate.invalid), (3, 3));
    assert_eq!(estimate.segments.len(), 1);
}

#[test]
fn no_samples_give_no_segments() {
    let estimate = estimate(&[], &filter());

    assert!(estimate.segments.is_empty());
    assert_eq!(estimate.median_round_trip, None);
    assert_eq!(estimate.round_trip_limit, None);
    assert_eq!(
        estimate.time_shift_samples(0),
        Err(TimeShiftError::NoSegments)
    );
}

#[test]
fn extreme_clock_values_do_not_wrap() {
    // Offset −(2^64 − 1) does not fit s64: invalid. Offset 2^63 − 1 does.
    let beyond = Sample {
        host_before: 0,
        guest_before: u64::MAX,
        guest_after: u64::MAX,
        host_after: 0,
    };
    let edge = Sample {
        host_before: u64::MAX,
        guest_before: 1 << 63,
        guest_after: 1 << 63,
        host_after: u64::MAX,
    };

    let estimate = estimate(
        &[beyond, edge],
        &RoundTripFilter {
            slack: 0,
            factor: 0,
        },
    );

    assert_eq!(estimate.invalid, 1);
    assert_eq!(estimate.segments[0].offset, i64::MAX);
    assert_eq!(estimate.segments[0].bound, 0);
}

#[test]
fn limit_is_slack_plus_factor_times_median_of_fastest_tenth() {
    let round_trips: Vec<u64> = (1..=30).map(|i| i * 100).collect(); // fastest 3: 100, 200, 300

    let limit = RoundTripFilter {
        slack: 7,
        factor: 20,
    }
    .limit(&round_trips);

    assert_eq!(limit, Some(7 + 20 * 200));
    assert_eq!(RoundTripFilter::for_clock(TSC_PER_MS).limit(&[]), None);
}

#[test]
fn one_segment_gives_one_sample() {
    let samples = time_shift_samples(&[segment(100, 200, -5)], 1000).unwrap();

    assert_eq!(
        samples,
        [ShiftSample {
            time: 0,
            offset: -5
        }]
    );
}

#[test]
fn two_segments_get_a_sentinel_after_the_last_event() {
    let segments = [segment(100, 200, 1), segment(300, 400, 2)];

    let samples = time_shift_samples(&segments, 1000).unwrap();

    let expect = [(0, 1), (201, 2), (1001, 2)].map(|(time, offset)| ShiftSample { time, offset });
    assert_eq!(samples, expect);
}

#[test]
fn every_guest_time_in_a_segment_gets_its_offset() {
    for k in 1..=4u64 {
        let segments: Vec<Segment> = (0..k)
            .map(|j| segment(100 * j + 10, 100 * j + 50, 1000 * (j as i64 + 1)))
            .collect();
        let last_event = 100 * k + 70;

        let samples = time_shift_samples(&segments, last_event).unwrap();

        for segment in &segments {
            for ts in segment.first_guest_ts..=segment.last_guest_ts {
                assert_eq!(
                    trace_cmd_offset_at(&samples, ts),
                    Some(segment.offset),
                    "{k} segments, ts {ts}"
                );
            }
        }
        let last = segments.last().unwrap().offset;
        for ts in [last_event, last_event + 1, u64::MAX] {
            assert_eq!(trace_cmd_offset_at(&samples, ts), Some(last));
        }
    }
}

#[test]
fn overlapping_segments_are_refused() {
    let segments = [segment(100, 200, 1), segment(200, 300, 2)];

    assert_eq!(
        time_shift_samples(&segments, 1000),
        Err(TimeShiftError::Overlap { index: 0 })
    );
}

#[test]
fn guest_times_beyond_s64_are_refused() {
    let top = i64::MAX.unsigned_abs();
    let segments = [segment(100, top, 1), segment(top + 1, top + 2, 2)];

    assert_eq!(
        time_shift_samples(&segments, 0),
        Err(TimeShiftError::TimeOutOfRange { ts: top + 1 })
    );
    assert_eq!(
        time_shift_samples(&segments[..1], u64::MAX),
        Ok(vec![ShiftSample { time: 0, offset: 1 }])
    );
    assert!(time_shift_samples(&[segment(1, 2, 1), segment(3, 4, 2)], top).is_err());
}

// ---- simulated clocks ----

/// A change of the guest's offset. A pause stops the guest clock for `delta` host units (the
/// offset grows by `delta`, as a `virsh suspend`/`resume` under TCG does); a jump moves the
/// guest clock forward by `delta` at once (the offset shrinks).
#[derive(Debug, Clone, Copy)]
enum Change {
    Pause(u64),
    Jump(u64),
}

/// One exchange to simulate.
#[derive(Debug, Clone)]
struct Planned {
    /// Host time since the previous exchange.
    gap: u64,
    /// Host time before the guest's first read, between its reads, before the host's read.
    delays: [u64; 3],
    /// On some: a long extra delay (phase 1..=3, amount).
    long: Option<(usize, u64)>,
}

#[derive(Debug, Clone)]
struct Scenario {
    start: u64,
    offset: i64,
    samples: Vec<Planned>,
    /// (before sample, phase 0..=3, change): phase 0 between samples, 1 between the host's
    /// first read and the guest's, 2 between the guest's reads, 3 before the host's last read.
    changes: Vec<(usize, usize, Change)>,
}

/// What the simulation knows about one sample.
#[derive(Debug, Clone, Copy)]
struct Truth {
    sample: Sample,
    /// The piece (stretch of constant offset) of each guest read and its offset.
    piece: (usize, usize),
    offset: i64,
    /// Whether the estimator should use it: fast, and no change inside it that breaks it.
    usable: bool,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let one_sample = (
        1_000u64..50_000_000,
        [1u64..=5000, 1u64..=5000, 1u64..=5000],
        prop::option::weighted(0.3, (1usize..=3, 10_000_000u64..10_000_000_000)),
    )
        .prop_map(|(gap, delays, long)| Planned { gap, delays, long });
    let change = prop_oneof![
        (10_000_000u64..100_000_000_000).prop_map(Change::Pause),
        (10_000_000u64..100_000_000_000).prop_map(Change::Jump),
    ];
    (
        (1u64 << 45)..(1u64 << 50),
        -(1i64 << 44)..(1i64 << 44),
        prop::collection::vec(one_sample, 1..120),
        prop::collection::vec((0usize..120, 0usize..=3, change), 0..=2),
    )
        .prop_map(|(start, offset, mut samples, changes)| {
            // Long round trips on at most every fourth sample, so the fastest tenth is fast.
            for (i, sample) in samples.iter_mut().enumerate() {
                if i % 4 != 3 {
                    sample.long = None;
                }
            }
            let n = samples.len();
            let changes = changes.into_iter().map(|(i, p, c)| (i % n, p, c)).collect();
            Scenario {
                start,
                offset,
                samples,
                changes,
            }
        })
}

/// Runs the scenario: returns each sample's truth and each piece's offset.
fn simulate(scenario: &Scenario) -> (Vec<Truth>, Vec<i64>) {
    let mut host = scenario.start;
    let mut offset = scenario.offset;
    let mut pieces = vec![offset];
    let mut truths = Vec::new();
    for (i, Planned { gap, delays, long }) in scenario.samples.iter().enumerate() {
        let changes_at = |phase: usize| {
            scenario
                .changes
                .iter()
                .filter(move |c| (c.0, c.1) == (i, phase))
                .map(|c| c.2)
        };
        let mut usable = long.is_none();
        if i > 0 {
            host += gap;
        }
        let mut host_before = host;
        let mut reads = [(0u64, 0usize); 3];
        for phase in 0..=3 {
            for change in changes_at(phase) {
                match change {
                    Change::Pause(delta) => {
                        host += delta;
                        offset += i64::try_from(delta).unwrap();
                        usable &= phase == 0;
                    }
                    Change::Jump(delta) => {
                        offset -= i64::try_from(delta).unwrap();
                        usable &= phase != 2;
                    }
                }
                pieces.push(offset);
            }
            if phase == 0 {
                host_before = host;
                continue;
            }
            host += delays[phase - 1];
            if let Some((long_phase, extra)) = long {
                if *long_phase == phase {
                    host += extra;
                }
            }
            let guest = host.checked_add_signed(-offset).unwrap();
            reads[phase - 1] = (guest, pieces.len() - 1);
        }
        let sample = Sample {
            host_before,
            guest_before: reads[0].0,
            guest_after: reads[1].0,
            host_after: host,
        };
        truths.push(Truth {
            sample,
            piece: (reads[0].1, reads[1].1),
            offset: pieces[reads[0].1],
            usable,
        });
    }
    (truths, pieces)
}

/// The runs of usable samples by piece, in order: what the segments should be.
fn expected_runs(truths: &[Truth]) -> Vec<Vec<Truth>> {
    let mut runs: Vec<Vec<Truth>> = Vec::new();
    for truth in truths.iter().filter(|t| t.usable) {
        match runs.last_mut() {
            Some(run) if run[0].piece.0 == truth.piece.0 => run.push(*truth),
            _ => runs.push(vec![*truth]),
        }
    }
    runs
}

fn check_segment_invariants(segment: &Segment) -> Result<(), TestCaseError> {
    prop_assert!(segment.lo <= segment.offset && segment.offset <= segment.hi);
    let width = i128::from(segment.hi) - i128::from(segment.lo);
    prop_assert_eq!(i128::from(segment.bound), (width + 1) / 2);
    for edge in [segment.lo, segment.hi] {
        let error = (i128::from(segment.offset) - i128::from(edge)).unsigned_abs();
        prop_assert!(error <= u128::from(segment.bound));
    }
    prop_assert!(segment.first_guest_ts <= segment.last_guest_ts);
    prop_assert!(segment.samples >= 1);
    Ok(())
}

/// Checks the samples against the model: every guest time in each segment's range (tried at
/// its edges) gets the segment's offset.
fn check_time_shift(segments: &[Segment], samples: &[ShiftSample]) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        samples.len(),
        if segments.len() == 1 {
            1
        } else {
            segments.len() + 1
        }
    );
    prop_assert!(samples.windows(2).all(|w| w[0].time < w[1].time));
    prop_assert!(samples.iter().all(|s| s.time >= 0));
    for segment in segments {
        for ts in [segment.first_guest_ts, segment.last_guest_ts] {
            prop_assert_eq!(trace_cmd_offset_at(samples, ts), Some(segment.offset));
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn simulated_clocks_are_recovered_within_the_bound(scenario in scenario()) {
        let (truths, pieces) = simulate(&scenario);
        // Offset changes must exceed what two fast samples can blur (2 × 15,000), even
        // between pieces that are not neighbours (a piece with no usable sample in between).
        for (i, a) in pieces.iter().enumerate() {
            for b in &pieces[i + 1..] {
                prop_assume!(a.abs_diff(*b) >= 1_000_000);
            }
        }
        let usable = truths.iter().filter(|t| t.usable).count();
        prop_assume!(usable >= 1 && usable * 10 >= truths.len());
        let samples: Vec<Sample> = truths.iter().map(|t| t.sample).collect();

        let estimate = estimate(&samples, &filter());

        let runs = expected_runs(&truths);
        prop_assert_eq!(estimate.dropped, truths.len() - usable);
        prop_assert_eq!(estimate.segments.len(), runs.len());
        for (segment, run) in estimate.segments.iter().zip(&runs) {
            check_segment_invariants(segment)?;
            let truth = run[0].offset;
            prop_assert!(segment.lo <= truth && truth <= segment.hi);
            prop_assert!(segment.offset.abs_diff(truth) <= segment.bound);
            prop_assert_eq!(segment.samples, run.len());
            prop_assert_eq!(segment.first_guest_ts, run[0].sample.guest_before);
            prop_assert_eq!(segment.last_guest_ts, run[run.len() - 1].sample.guest_after);
            prop_assert!(run.iter().all(|t| t.piece.0 == t.piece.1));
        }
        let last_event = samples.iter().map(|s| s.guest_after).max().unwrap();
        let shift = estimate.time_shift_samples(last_event).unwrap();
        check_time_shift(&estimate.segments, &shift)?;
        for (segment, run) in estimate.segments.iter().zip(&runs) {
            for truth in run {
                for ts in [truth.sample.guest_before, truth.sample.guest_after] {
                    let written = trace_cmd_offset_at(&shift, ts).unwrap();
                    prop_assert!(written.abs_diff(truth.offset) <= segment.bound);
                }
            }
        }
    }

    #[test]
    fn arbitrary_samples_never_panic(
        raw in prop::collection::vec(any::<[u64; 4]>(), 0..40),
        small in prop::collection::vec([0u64..64, 0u64..64, 0u64..64, 0u64..64], 0..40),
        slack in any::<u64>(),
        factor in any::<u64>(),
        last_event in any::<u64>(),
    ) {
        for quads in [raw, small] {
            let samples: Vec<Sample> = quads
                .iter()
                .map(|q| Sample { host_before: q[0], guest_before: q[1], guest_after: q[2], host_after: q[3] })
                .collect();

            let estimate = estimate(&samples, &RoundTripFilter { slack, factor });

            let used: usize = estimate.segments.iter().map(|s| s.samples).sum();
            prop_assert_eq!(used + estimate.dropped, samples.len());
            prop_assert!(estimate.invalid <= estimate.dropped);
            for segment in &estimate.segments {
                check_segment_invariants(segment)?;
            }
            if let Ok(shift) = estimate.time_shift_samples(last_event) {
                check_time_shift(&estimate.segments, &shift)?;
            }
        }
    }

    #[test]
    fn time_shift_samples_give_each_guest_time_its_segment_offset(
        shape in prop::collection::vec((1u64..1000, 0u64..1000, any::<i64>()), 1..8),
        beyond in 0u64..2000,
        probes in prop::collection::vec(0u64..20_000, 0..64),
    ) {
        let mut segments = Vec::new();
        let mut ts = 0;
        for (gap, len, offset) in shape {
            segments.push(segment(ts + gap, ts + gap + len, offset));
            ts += gap + len;
        }
        let last_event = ts + beyond;

        let samples = time_shift_samples(&segments, last_event).unwrap();

        check_time_shift(&segments, &samples)?;
        // Model: segment j's offset from the end of segment j−1 (exclusive) through the end of
        // segment j; the first segment's from 0, the last's on to the end of time.
        let model = |ts: u64| {
            segments
                .iter()
                .find(|s| ts <= s.last_guest_ts)
                .unwrap_or(segments.last().unwrap())
                .offset
        };
        let edges = segments.iter().flat_map(|s| [s.first_guest_ts - 1, s.first_guest_ts, s.last_guest_ts, s.last_guest_ts + 1]);
        for ts in probes.into_iter().chain(edges).chain([0, last_event, last_event + 1, u64::MAX]) {
            prop_assert_eq!(trace_cmd_offset_at(&samples, ts), Some(model(ts)), "ts {}", ts);
        }
    }
}
