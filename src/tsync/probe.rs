//! The probe method: estimates `offset = host − guest` from timed exchanges, as piecewise
//! constant segments of guest time, each with a bound that is a guarantee.
//!
//! Each [`Sample`] brackets the guest's two clock reads between two host reads, so the true
//! offset lies in `[host_before − guest_before, host_after − guest_after]`. [`estimate`]
//! intersects these intervals over all samples that agree (not only the fastest round trip):
//! the result is as narrow as the tightest lower edge and the tightest upper edge seen, which
//! usually come from different samples. A sample whose interval misses the running
//! intersection proves the offset changed (a `virsh suspend`/`resume` under TCG moves it) and
//! starts a new segment. Samples with a round trip far above the best ones are dropped first:
//! one that spans a pause can straddle an offset change and blur where it happened.
//! [`time_shift_samples`] writes the segments as TIME_SHIFT samples that trace-cmd 3.1.6
//! applies as intended despite its selection quirks. docs/clock-sync.md has the reasoning.
//!
//! All arithmetic is in `i128` or checked: no input panics or wraps.

use super::ShiftSample;

/// One exchange, all four values in the trace clock's raw units (TSC cycles for `x86-tsc`).
/// The host reads its clock, sends a ping; the guest reads its clock, writes a marker, reads
/// its clock again and replies; the host reads its clock on the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub host_before: u64,
    pub guest_before: u64,
    pub guest_after: u64,
    pub host_after: u64,
}

impl Sample {
    /// `host_after − host_before`, or `None` if the host clock ran backwards.
    pub fn round_trip(&self) -> Option<u64> {
        self.host_after.checked_sub(self.host_before)
    }

    /// The offsets this sample allows, `[host_before − guest_before, host_after −
    /// guest_after]`, clipped to what TIME_SHIFT can hold (s64); `None` if that is empty (the
    /// guest's reads took longer than the host's round trip, or a clock ran backwards: the
    /// sample cannot be right).
    fn interval(&self) -> Option<(i64, i64)> {
        if self.guest_after < self.guest_before {
            return None;
        }
        self.round_trip()?;
        let lo = i128::from(self.host_before) - i128::from(self.guest_before);
        let hi = i128::from(self.host_after) - i128::from(self.guest_after);
        let lo = i64::try_from(lo.max(i128::from(i64::MIN))).ok()?;
        let hi = i64::try_from(hi.min(i128::from(i64::MAX))).ok()?;
        (lo <= hi).then_some((lo, hi))
    }
}

/// Which round trips count as "far above the best ones": a sample is dropped when its round
/// trip exceeds `slack + factor × (median of the fastest 10 % of round trips)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundTripFilter {
    /// Raw clock units always allowed on top of the scaled best round trip.
    pub slack: u64,
    /// Multiple of the best round trips allowed.
    pub factor: u64,
}

impl RoundTripFilter {
    /// The default: 1 ms of slack plus 20 × the best round trips, for a clock with
    /// `raw_per_ms` units per millisecond (2,300,000 for a 2.3 GHz TSC).
    ///
    /// Why: normal round trips over virtio-serial on a busy TCG host vary by a factor of ten
    /// or so around the best ones, and are at most a few hundred µs; the limit keeps them.
    /// A `virsh suspend`/`resume` pauses the guest for tens of milliseconds at least (two
    /// libvirt calls and QMP commands), so a sample spanning one is far above it.
    pub fn for_clock(raw_per_ms: u64) -> RoundTripFilter {
        RoundTripFilter {
            slack: raw_per_ms,
            factor: 20,
        }
    }

    /// The round trip limit for these round trips (any order), or `None` if there are none.
    pub fn limit(&self, round_trips: &[u64]) -> Option<u64> {
        let mut sorted = round_trips.to_vec();
        sorted.sort_unstable();
        let fastest = sorted.len().div_ceil(10);
        let best = *sorted.get(fastest.checked_sub(1)? / 2)?;
        Some(self.slack.saturating_add(self.factor.saturating_mul(best)))
    }
}

/// A stretch of guest time over which the offset was constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// The earliest guest clock read among the segment's samples.
    pub first_guest_ts: u64,
    /// The latest guest clock read among the segment's samples.
    pub last_guest_ts: u64,
    /// The offset to write: the midpoint of `[lo, hi]` (rounded down).
    pub offset: i64,
    /// The intersection of the segment's sample intervals: the true offset is in `[lo, hi]`.
    pub lo: i64,
    pub hi: i64,
    /// `|offset − true offset| <= bound`, raw clock units: `⌈(hi − lo) / 2⌉`.
    pub bound: u64,
    /// How many samples the segment was built from.
    pub samples: usize,
}

impl Segment {
    fn start(checked: &Checked) -> Segment {
        let mut segment = Segment {
            first_guest_ts: checked.sample.guest_before,
            last_guest_ts: checked.sample.guest_after,
            offset: 0,
            lo: checked.lo,
            hi: checked.hi,
            bound: 0,
            samples: 1,
        };
        segment.settle();
        segment
    }

    /// Narrows the segment by a sample, or returns `false` if the sample's interval misses it
    /// (the offset changed).
    fn absorb(&mut self, checked: &Checked) -> bool {
        let (lo, hi) = (checked.lo.max(self.lo), checked.hi.min(self.hi));
        if lo > hi {
            return false;
        }
        (self.lo, self.hi) = (lo, hi);
        self.first_guest_ts = self.first_guest_ts.min(checked.sample.guest_before);
        self.last_guest_ts = self.last_guest_ts.max(checked.sample.guest_after);
        self.samples += 1;
        self.settle();
        true
    }

    fn settle(&mut self) {
        let width = i128::from(self.hi) - i128::from(self.lo); // 0 ..= 2^64 − 1
        let mid = i128::from(self.lo) + width / 2; // within [lo, hi], so within i64
        self.offset = i64::try_from(mid).unwrap_or(self.lo);
        self.bound = u64::try_from((width + 1) / 2).unwrap_or(u64::MAX);
    }
}

/// What [`estimate`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    /// In the order of the host's clock (the order the samples were taken).
    pub segments: Vec<Segment>,
    /// Samples not used: too slow, or `invalid`.
    pub dropped: usize,
    /// Of `dropped`: samples that cannot hold any offset (a clock ran backwards, the guest's
    /// reads spanned more than the host's round trip, or the offset is beyond s64). Many of
    /// them mean the two ends do not read the same clock at the same rate.
    pub invalid: usize,
    /// The median round trip of the samples used, raw units.
    pub median_round_trip: Option<u64>,
    /// The round trip limit applied, raw units.
    pub round_trip_limit: Option<u64>,
}

impl Estimate {
    /// The TIME_SHIFT samples for one guest CPU: see [`time_shift_samples`].
    pub fn time_shift_samples(
        &self,
        last_event_ts: u64,
    ) -> Result<Vec<ShiftSample>, TimeShiftError> {
        time_shift_samples(&self.segments, last_event_ts)
    }
}

/// Estimates the offset from `samples` (any order; they are taken in host clock order).
///
/// Steps: drop samples that cannot hold any offset; drop samples slower than
/// `filter`'s limit; then walk the rest in host order, intersecting each one's interval with
/// the current segment's, and start a new segment when the intersection would be empty.
pub fn estimate(samples: &[Sample], filter: &RoundTripFilter) -> Estimate {
    let valid: Vec<Checked> = samples.iter().filter_map(Checked::new).collect();
    let invalid = samples.len() - valid.len();
    let round_trips: Vec<u64> = valid.iter().map(|c| c.round_trip).collect();
    let limit = filter.limit(&round_trips);
    let mut kept: Vec<Checked> = valid
        .into_iter()
        .filter(|c| limit.is_some_and(|limit| c.round_trip <= limit))
        .collect();
    kept.sort_by_key(|c| (c.sample.host_before, c.sample.host_after));

    let mut segments: Vec<Segment> = Vec::new();
    for checked in &kept {
        let absorbed = segments
            .last_mut()
            .is_some_and(|segment| segment.absorb(checked));
        if !absorbed {
            segments.push(Segment::start(checked));
        }
    }
    let mut used: Vec<u64> = kept.iter().map(|c| c.round_trip).collect();
    used.sort_unstable();
    Estimate {
        segments,
        dropped: samples.len() - kept.len(),
        invalid,
        median_round_trip: used.get(used.len() / 2).copied(),
        round_trip_limit: limit,
    }
}

/// A sample that can hold an offset, with its interval and round trip.
struct Checked {
    sample: Sample,
    lo: i64,
    hi: i64,
    round_trip: u64,
}

impl Checked {
    fn new(sample: &Sample) -> Option<Checked> {
        let (lo, hi) = sample.interval()?;
        Some(Checked {
            sample: *sample,
            lo,
            hi,
            round_trip: sample.round_trip()?,
        })
    }
}

/// Why segments cannot be written as TIME_SHIFT samples.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeShiftError {
    #[error("no clock sample was usable, so there is no offset to write: check that host and guest trace the same clock (x86-tsc), or trace without clock sync")]
    NoSegments,
    #[error("clock segments {index} and {next} overlap in guest time (the guest clock went backwards between them), so no guest timestamp order can pick their offsets: trace without clock sync or retry", next = .index + 1)]
    Overlap { index: usize },
    #[error("guest time {ts} is beyond what TIME_SHIFT can hold (2^63 − 1): the guest clock is not a plausible x86-tsc")]
    TimeOutOfRange { ts: u64 },
}

/// The TIME_SHIFT samples of one guest CPU for trace-cmd 3.1.6 with flags 0 (no
/// interpolation), such that [`trace_cmd_offset_at`](super::trace_cmd_offset_at) gives every
/// guest time in segment `k`'s range segment `k`'s offset. `last_event_ts` is the CPU's last
/// event time (guest raw).
///
/// One segment → one sample `(0, offset)`. `k >= 2` segments → `k + 1` samples: `(0, o₀)`,
/// then `(last_guest_ts of segment j−1 + 1, o_j)` for each later segment, then a sentinel
/// `(max(last_event_ts, previous time) + 1, o_{k−1})`. The sentinel is needed because the
/// reader uses `S[0]` for every time when there are exactly two samples, and `S[c−2]` for
/// times at or after the last sample when there are more. A guest time between two segments
/// (no sample saw it) gets the later segment's offset.
pub fn time_shift_samples(
    segments: &[Segment],
    last_event_ts: u64,
) -> Result<Vec<ShiftSample>, TimeShiftError> {
    let time = |ts: u64| i64::try_from(ts).map_err(|_| TimeShiftError::TimeOutOfRange { ts });
    let after = |ts: u64| {
        ts.checked_add(1)
            .ok_or(TimeShiftError::TimeOutOfRange { ts })
            .and_then(time)
    };
    let (first, rest) = segments.split_first().ok_or(TimeShiftError::NoSegments)?;
    let mut samples = vec![ShiftSample {
        time: 0,
        offset: first.offset,
    }];
    if rest.is_empty() {
        return Ok(samples);
    }
    for (index, pair) in segments.windows(2).enumerate() {
        let (previous, segment) = (&pair[0], &pair[1]);
        if segment.first_guest_ts <= previous.last_guest_ts {
            return Err(TimeShiftError::Overlap { index });
        }
        samples.push(ShiftSample {
            time: after(previous.last_guest_ts)?,
            offset: segment.offset,
        });
    }
    let last_time = samples.last().map_or(0, |s| s.time).unsigned_abs();
    let last_offset = samples.last().map_or(0, |s| s.offset);
    samples.push(ShiftSample {
        time: after(last_event_ts.max(last_time))?,
        offset: last_offset,
    });
    Ok(samples)
}

#[cfg(test)]
mod tests;
