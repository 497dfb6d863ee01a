//! Clock sync between a guest's trace clock and the host's: turns measurements into the
//! per-CPU samples of a guest file's TIME_SHIFT option (`host_raw = guest_raw + offset`), each
//! with an error bound.
//!
//! Two methods. [`probe`] works from timed ping/marker exchanges and works everywhere, under
//! TCG too; it yields an offset per stretch of guest time with a guaranteed bound. [`kvm`]
//! reads the offset KVM itself applies (`debugfs`), which is exact but needs KVM and an
//! unscaled TSC. Both are pure apart from reading a debugfs tree: the caller measures, writes
//! and reports. The samples are shaped for trace-cmd 3.1.6 with flags 0 (no interpolation),
//! whose reader has selection quirks that [`trace_cmd_offset_at`] models exactly;
//! docs/clock-sync.md explains the methods, the bound and the quirks.

pub mod kvm;
pub mod probe;

/// One TIME_SHIFT sample as trace-cmd reads it, with scaling 1 and fraction 0 (tvctl never
/// uses the reader's scaling): from guest raw time `time` on, `host_raw = guest_raw + offset`,
/// subject to the reader's selection rule ([`trace_cmd_offset_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShiftSample {
    /// Guest raw clock value (s64 in the file); always `>= 0` (the reader compares it as
    /// unsigned).
    pub time: i64,
    /// `host_raw − guest_raw`, raw clock units.
    pub offset: i64,
}

/// The offset trace-cmd 3.1.6 adds to a record of guest raw time `ts` on a CPU whose
/// TIME_SHIFT samples are `samples`, with flags 0, scaling 1 and fraction 0
/// (`timestamp_host_sync` in lib/trace-cmd/trace-input.c, rewritten step for step). `None`
/// when there are no samples: trace-cmd then reads past a zero-size allocation.
///
/// The reader sorts the samples by time and keeps one of equal times (which one is undefined
/// upstream: here the first given). Then, with `c` samples: `c == 1` → the only one; `c == 2` →
/// always the first, whatever `ts`; `c > 2` → the first for `ts <= S[0].time`, `S[c−2]` (not
/// the last!) for `ts >= S[c−1].time`, else the last sample at or before `ts`. Times are
/// compared as unsigned, like the C code (`unsigned long long ts` against `long long time`).
pub fn trace_cmd_offset_at(samples: &[ShiftSample], ts: u64) -> Option<i64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by_key(|s| s.time); // signed compare, as tsync_offset_cmp
    sorted.dedup_by_key(|s| s.time);
    // The C code casts `time` to unsigned when comparing it with `ts`.
    let time = |i: usize| sorted[i].time as u64;
    let count = sorted.len();
    match count {
        0 => None,
        1 | 2 => Some(sorted[0].offset),
        _ if ts <= time(0) => Some(sorted[0].offset),
        _ if ts >= time(count - 1) => Some(sorted[count - 2].offset),
        _ => {
            // The C binary search, with signed indices as there (`max` may reach −1).
            let (mut min, mut max) = (0isize, count as isize - 1);
            let mut mid = (min + max) / 2;
            while min <= max {
                let t = time(mid.unsigned_abs());
                if ts < t {
                    max = mid - 1;
                } else if ts > t {
                    min = mid + 1;
                } else {
                    break;
                }
                mid = (min + max) / 2;
            }
            Some(sorted[mid.unsigned_abs()].offset)
        }
    }
}

/// Converts a raw clock amount (a bound, a round trip) to nanoseconds with the TSC2NSEC
/// factors, as the reader converts times (`raw · mult >> shift`), without overflow; saturates.
pub fn raw_to_ns(raw: u64, mult: u32, shift: u32) -> u64 {
    let ns = (u128::from(raw) * u128::from(mult)) >> shift.min(127);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(time: i64, offset: i64) -> ShiftSample {
        ShiftSample { time, offset }
    }

    #[test]
    fn one_sample_applies_everywhere() {
        let samples = [s(500, 7)];
        for ts in [0, 499, 500, 501, u64::MAX] {
            assert_eq!(trace_cmd_offset_at(&samples, ts), Some(7));
        }
    }

    #[test]
    fn two_samples_always_use_the_first() {
        // Spec §6 case m2f0: +1000 everywhere, even after the second sample.
        let samples = [s(2_000_000_000, 2000), s(1_000_000_000, 1000)];
        for ts in [500_000_000, 1_000_000_000, 2_000_000_000, 3_500_000_000] {
            assert_eq!(trace_cmd_offset_at(&samples, ts), Some(1000));
        }
    }

    #[test]
    fn three_samples_use_the_second_last_from_the_last_time_on() {
        // Spec §6 case m3f0: events at 0.5 … 3.5 s get +1000 ×3, then +2000 ×4.
        let g = 1_000_000_000;
        let samples = [s(g, 1000), s(2 * g, 2000), s(3 * g, 4000)];
        let got: Vec<_> = (1..=7)
            .map(|half| trace_cmd_offset_at(&samples, half * g.unsigned_abs() / 2).unwrap())
            .collect();
        assert_eq!(got, [1000, 1000, 1000, 2000, 2000, 2000, 2000]);
    }

    #[test]
    fn exact_hits_and_between_samples_use_the_sample_at_or_before() {
        let samples = [s(0, 1), s(10, 2), s(20, 3), s(30, 4), s(40, 5)];
        let expect = [
            (0, 1),
            (9, 1),
            (10, 2),
            (19, 2),
            (20, 3),
            (29, 3),
            (30, 4),
            (39, 4),
        ];
        for (ts, offset) in expect {
            assert_eq!(trace_cmd_offset_at(&samples, ts), Some(offset), "ts {ts}");
        }
        assert_eq!(trace_cmd_offset_at(&samples, 40), Some(4));
        assert_eq!(trace_cmd_offset_at(&samples, 1000), Some(4));
    }

    #[test]
    fn duplicate_times_count_once() {
        // Two distinct times left → the c == 2 rule applies.
        let samples = [s(10, 1), s(10, 9), s(20, 2)];
        assert_eq!(trace_cmd_offset_at(&samples, 25), Some(1));
    }

    #[test]
    fn no_samples_give_none() {
        assert_eq!(trace_cmd_offset_at(&[], 5), None);
    }

    #[test]
    fn raw_to_ns_uses_mult_and_shift_without_overflow() {
        // 3 GHz: mult 715827883, shift 31 (spec §7.6): 3000 cycles ≈ 1000 ns.
        assert_eq!(raw_to_ns(3000, 715_827_883, 31), 1000);
        assert_eq!(raw_to_ns(u64::MAX, u32::MAX, 0), u64::MAX);
    }
}
