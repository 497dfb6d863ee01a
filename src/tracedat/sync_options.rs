//! The three options that let `trace-cmd report -i host.dat -i guest.dat` merge a host file and
//! its guests' files into one timeline: GUEST (13) in the host file ties a guest's trace id to the
//! host thread of each vCPU, TIME_SHIFT (12) in a guest file maps the guest's raw clock onto the
//! host's (`host_raw = guest_raw + offset`), and TSC2NSEC (14), in both, turns TSC cycles into
//! nanoseconds. trace-cmd 3.1.6 does not complain about bad values in these options, it silently
//! misbehaves (garbage times, a dropped option, an empty report), so every type here is built
//! by a validating constructor and the writer only ever sees values that 3.1.6 handles as
//! documented in `docs/trace-format.md` ("Host and guest files").
//!
//! Payloads (little-endian; the option framing `u16 id, u32 size` is the writer's):
//!
//! ```text
//! TIME_SHIFT  u64 peer trace id, u32 flags (bit 0 = interpolate), u32 ncpu,
//!             ncpu x {u32 n, s64 time[n], s64 offset[n], s64 scaling[n]},
//!             ncpu x {s64 fraction[n]}                 (after ALL CPUs' blocks)
//! GUEST       name\0, u64 trace id, u32 vcpu_count, vcpu_count x {u32 vcpu, u32 host_tid}
//! TSC2NSEC    u32 mult, u32 shift, u64 offset (always 0: 3.1.6 ignores it)
//! ```

use super::{MAX_CPUS, MAX_OPTION_SIZE};

/// Why a host/guest option cannot be built, written or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncOptionError {
    #[error("GUEST option: the guest name is empty: give the libvirt domain name")]
    GuestNameEmpty,
    #[error("GUEST option: the guest name {name:?} holds a NUL byte, which would end it early")]
    GuestNameNul { name: String },
    #[error(
        "GUEST option for {name:?}: trace id 0 means \"no id\" to trace-cmd and KernelShark: \
         give the guest file's non-zero TRACEID"
    )]
    GuestTraceIdZero { name: String },
    #[error("GUEST option for {name:?}: no vCPUs: give the host thread of every vCPU")]
    GuestNoVcpus { name: String },
    #[error("GUEST option for {name:?}: {count} vCPUs, at most {MAX_CPUS} are supported")]
    GuestTooManyVcpus { name: String, count: usize },
    #[error(
        "GUEST option for {name:?}: vCPU {vcpu} has host thread id 0: give its thread id, or \
         GuestOption::UNKNOWN_TID (-1) when it is unknown"
    )]
    GuestTidZero { name: String, vcpu: usize },
    #[error(
        "GUEST option for {name:?}: vCPU {vcpu} is not below the vCPU count {count} \
         (trace-cmd drops such an option)"
    )]
    GuestVcpuOutOfRange { name: String, vcpu: u32, count: u32 },
    #[error("GUEST option for {name:?}: vCPU {vcpu} is listed twice")]
    GuestVcpuTwice { name: String, vcpu: u32 },
    #[error(
        "two GUEST options carry trace id {trace_id:#x}: every guest file needs its own TRACEID"
    )]
    GuestTraceIdTwice { trace_id: u64 },
    #[error(
        "GUEST option for {name:?} carries the host file's own TRACEID {trace_id:#x}: \
         host and guest files need different ids"
    )]
    GuestTraceIdIsHost { name: String, trace_id: u64 },

    #[error("TIME_SHIFT option without CPUs: give one sample list per guest CPU")]
    TimeShiftNoCpus,
    #[error("TIME_SHIFT option for {count} CPUs, at most {MAX_CPUS} are supported")]
    TimeShiftTooManyCpus { count: usize },
    #[error(
        "TIME_SHIFT option: CPU {cpu} has no sample (trace-cmd then reads garbage): \
         give at least one"
    )]
    TimeShiftNoSamples { cpu: usize },
    #[error(
        "TIME_SHIFT option: CPU {cpu} has a sample at time {time} (trace-cmd compares times as \
         unsigned): sample times are guest raw times, at least 0"
    )]
    TimeShiftNegativeTime { cpu: usize, time: i64 },
    #[error(
        "TIME_SHIFT option: CPU {cpu} has two samples at time {time} (trace-cmd keeps an \
         arbitrary one): give distinct times"
    )]
    TimeShiftDuplicateTime { cpu: usize, time: i64 },
    #[error(
        "TIME_SHIFT option: the sample of CPU {cpu} at time {time} has scaling {scaling}: \
         it multiplies every timestamp, so it must be at least 1 (1 = no scaling)"
    )]
    TimeShiftScaling { cpu: usize, time: i64, scaling: i64 },
    #[error(
        "TIME_SHIFT option: the sample of CPU {cpu} at time {time} has fraction {fraction}: \
         it shifts a 64-bit timestamp right, so it must be 0..=63 (0 = no shift)"
    )]
    TimeShiftFraction {
        cpu: usize,
        time: i64,
        fraction: i64,
    },
    #[error(
        "TIME_SHIFT option: interpolating CPU {cpu} between its samples at {from} and {to} \
         overflows trace-cmd's 64-bit arithmetic: add samples in between"
    )]
    TimeShiftInterpolationOverflow { cpu: usize, from: i64, to: i64 },
    #[error(
        "TIME_SHIFT option: trace-cmd's 64-bit arithmetic overflows for CPU {cpu}'s event at \
         raw time {ts}: add samples closer to the first and last events"
    )]
    TimeShiftEventOverflow { cpu: usize, ts: u64 },
    #[error(
        "TIME_SHIFT option: flags {flags:#x} has bits other than INTERPOLATE (1), which \
         trace-cmd does not define"
    )]
    TimeShiftFlags { flags: u32 },
    #[error(
        "TIME_SHIFT option has samples for {option} CPUs, the file has {file}: trace-cmd leaves \
         the CPUs beyond the option uncorrected; give one sample list per guest CPU"
    )]
    TimeShiftCpuCount { option: usize, file: usize },

    #[error("TSC2NSEC option: mult 0 means \"no conversion\" to trace-cmd: give perf's time_mult")]
    Tsc2NsecMultZero,
    #[error(
        "TSC2NSEC option: mult {mult} with shift {shift} cannot be made to fit trace-cmd's \
         signed 32-bit mult with a shift of 0..=32"
    )]
    Tsc2NsecShift { mult: u32, shift: u32 },
    #[error(
        "TSC2NSEC option: mult {mult:#x} is above 0x7fffffff, which trace-cmd reads as a \
         negative int"
    )]
    Tsc2NsecMultTooLarge { mult: u32 },
    #[error(
        "TSC2NSEC option: offset {offset} is not 0; trace-cmd 3.1.6 ignores it, tvctl writes 0"
    )]
    Tsc2NsecOffset { offset: u64 },

    #[error("{option} option of {bytes} bytes, more than the {max} bytes a reader accepts")]
    TooLarge {
        option: &'static str,
        bytes: u64,
        max: u64,
    },
    #[error("{option} option of {size} bytes ends inside its {what}")]
    Truncated {
        option: &'static str,
        size: usize,
        what: &'static str,
    },
    #[error("{option} option has {extra} bytes after its last field")]
    TrailingBytes { option: &'static str, extra: usize },
    #[error("GUEST option: the guest name is not UTF-8")]
    GuestNameUtf8,
}

/// GUEST (13), written in the host file once per guest: which guest file (by its TRACEID) ran
/// on which host threads. trace-cmd uses it only to map vCPUs to host threads (the kvm plugin,
/// KernelShark's KVM combo plot), never for time correction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestOption {
    name: String,
    trace_id: u64,
    vcpu_tids: Vec<u32>,
}

impl GuestOption {
    /// Host thread id for a vCPU whose thread is unknown; `trace-cmd record` writes the same
    /// (-1) for network guests.
    pub const UNKNOWN_TID: u32 = u32::MAX;

    /// A guest named `name` (the libvirt domain name), whose file has TRACEID `trace_id`, with
    /// `vcpu_tids[i]` the host thread running vCPU `i`.
    pub fn new(
        name: impl Into<String>,
        trace_id: u64,
        vcpu_tids: Vec<u32>,
    ) -> Result<Self, SyncOptionError> {
        let name = name.into();
        if name.is_empty() {
            return Err(SyncOptionError::GuestNameEmpty);
        }
        if name.contains('\0') {
            return Err(SyncOptionError::GuestNameNul { name });
        }
        if trace_id == 0 {
            return Err(SyncOptionError::GuestTraceIdZero { name });
        }
        if vcpu_tids.is_empty() {
            return Err(SyncOptionError::GuestNoVcpus { name });
        }
        if vcpu_tids.len() > MAX_CPUS {
            let count = vcpu_tids.len();
            return Err(SyncOptionError::GuestTooManyVcpus { name, count });
        }
        if let Some(vcpu) = vcpu_tids.iter().position(|&tid| tid == 0) {
            return Err(SyncOptionError::GuestTidZero { name, vcpu });
        }
        let guest = GuestOption {
            name,
            trace_id,
            vcpu_tids,
        };
        check_size("GUEST", guest.encoded_len())?;
        Ok(guest)
    }

    /// The guest's name (the libvirt domain name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TRACEID of the guest's file.
    pub fn trace_id(&self) -> u64 {
        self.trace_id
    }

    /// Host thread id per vCPU: entry `i` runs vCPU `i`.
    pub fn vcpu_tids(&self) -> &[u32] {
        &self.vcpu_tids
    }

    fn encoded_len(&self) -> usize {
        self.name.len() + 1 + 8 + 4 + 8 * self.vcpu_tids.len()
    }

    /// The option's payload: vCPUs in order 0..n-1.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(self.name.as_bytes());
        out.push(0);
        out.extend_from_slice(&self.trace_id.to_le_bytes());
        out.extend_from_slice(&len_u32(self.vcpu_tids.len()).to_le_bytes());
        for (vcpu, tid) in self.vcpu_tids.iter().enumerate() {
            out.extend_from_slice(&len_u32(vcpu).to_le_bytes());
            out.extend_from_slice(&tid.to_le_bytes());
        }
        out
    }

    /// Parses a payload; the vCPU entries may come in any order but must name every vCPU once.
    pub fn decode(data: &[u8]) -> Result<Self, SyncOptionError> {
        let mut r = Cursor::new("GUEST", data);
        let nul = data
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| r.truncated("name"))?;
        let name = String::from_utf8(r.take(nul, "name")?.to_vec())
            .map_err(|_| SyncOptionError::GuestNameUtf8)?;
        r.take(1, "name")?;
        let trace_id = r.u64("trace id")?;
        let count = r.u32("vCPU count")?;
        let entries = r.count(count, 8, "vCPU entries")?;
        if entries > MAX_CPUS {
            return Err(SyncOptionError::GuestTooManyVcpus {
                name,
                count: entries,
            });
        }
        let mut tids: Vec<Option<u32>> = vec![None; entries];
        for _ in 0..entries {
            let vcpu = r.u32("vCPU entries")?;
            let tid = r.u32("vCPU entries")?;
            let slot = usize::try_from(vcpu)
                .ok()
                .and_then(|i| tids.get_mut(i))
                .ok_or_else(|| SyncOptionError::GuestVcpuOutOfRange {
                    name: name.clone(),
                    vcpu,
                    count,
                })?;
            if slot.replace(tid).is_some() {
                return Err(SyncOptionError::GuestVcpuTwice { name, vcpu });
            }
        }
        r.finish()?;
        // `entries` distinct vCPUs below `entries`: every slot is filled.
        let vcpu_tids = tids.into_iter().map(Option::unwrap_or_default).collect();
        GuestOption::new(name, trace_id, vcpu_tids)
    }
}

/// One TIME_SHIFT sample: at guest raw time `time`, `host_raw = guest_raw + offset` (with
/// interpolation between samples when the option's interpolate flag is set).
///
/// `scaling` and `fraction` turn that into `((guest_raw * scaling) >> fraction) + offset`, but
/// trace-cmd applies them only when a CPU has two or more samples, and upstream's own use of
/// them for KVM is wrong; keep them at 1 and 0 ([`TimeSample::new`]) unless you mean exactly
/// that formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeSample {
    /// Guest raw time (before TSC2NSEC), at least 0.
    pub time: i64,
    /// Host raw time minus guest raw time at `time`.
    pub offset: i64,
    /// Multiplier of the guest timestamp, at least 1.
    pub scaling: i64,
    /// Right shift of the scaled guest timestamp, 0..=63.
    pub fraction: i64,
}

impl TimeSample {
    /// A sample without scaling (scaling 1, fraction 0).
    pub const fn new(time: i64, offset: i64) -> Self {
        TimeSample {
            time,
            offset,
            scaling: 1,
            fraction: 0,
        }
    }

    /// A sample with an explicit scaling and fraction, see the type's doc.
    pub const fn scaled(time: i64, offset: i64, scaling: i64, fraction: i64) -> Self {
        TimeSample {
            time,
            offset,
            scaling,
            fraction,
        }
    }
}

/// TIME_SHIFT (12), written in a guest file: per guest CPU, the samples trace-cmd uses to move
/// that CPU's raw timestamps onto the host's raw clock. Built sorted by time, one list per CPU of
/// the file (checked when the file is written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeShift {
    peer_trace_id: u64,
    interpolate: bool,
    cpus: Vec<Vec<TimeSample>>,
}

impl TimeShift {
    /// The only flag trace-cmd defines: interpolate linearly between samples.
    pub const FLAG_INTERPOLATE: u32 = 1;

    /// `peer_trace_id` is the host file's TRACEID (trace-cmd stores it and never reads it);
    /// `cpus[c]` are the samples of guest CPU `c`, in any order (they are sorted here).
    pub fn new(
        peer_trace_id: u64,
        interpolate: bool,
        mut cpus: Vec<Vec<TimeSample>>,
    ) -> Result<Self, SyncOptionError> {
        if cpus.is_empty() {
            return Err(SyncOptionError::TimeShiftNoCpus);
        }
        if cpus.len() > MAX_CPUS {
            let count = cpus.len();
            return Err(SyncOptionError::TimeShiftTooManyCpus { count });
        }
        for (cpu, samples) in cpus.iter_mut().enumerate() {
            check_samples(cpu, samples, interpolate)?;
        }
        let shift = TimeShift {
            peer_trace_id,
            interpolate,
            cpus,
        };
        check_size("TIME_SHIFT", shift.encoded_len())?;
        Ok(shift)
    }

    /// One constant offset per guest CPU (one sample each, at time 0, no interpolation): exact
    /// for a KVM guest whose TSC runs at the host's rate, with `offsets[c] = -tsc_offset` of
    /// vCPU `c`.
    pub fn fixed_offsets(peer_trace_id: u64, offsets: &[i64]) -> Result<Self, SyncOptionError> {
        let cpus = offsets
            .iter()
            .map(|&o| vec![TimeSample::new(0, o)])
            .collect();
        TimeShift::new(peer_trace_id, false, cpus)
    }

    /// The host file's TRACEID this guest file was synchronised with.
    pub fn peer_trace_id(&self) -> u64 {
        self.peer_trace_id
    }

    /// Whether trace-cmd interpolates between samples.
    pub fn interpolate(&self) -> bool {
        self.interpolate
    }

    /// The flags word as written.
    pub fn flags(&self) -> u32 {
        if self.interpolate {
            Self::FLAG_INTERPOLATE
        } else {
            0
        }
    }

    /// Samples per guest CPU, each list sorted by time.
    pub fn cpus(&self) -> &[Vec<TimeSample>] {
        &self.cpus
    }

    fn encoded_len(&self) -> usize {
        16 + self.cpus.iter().map(|s| 4 + 32 * s.len()).sum::<usize>()
    }

    /// The option's payload, fraction arrays included (after all CPUs' blocks, as 3.1.6 reads
    /// them).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&self.peer_trace_id.to_le_bytes());
        out.extend_from_slice(&self.flags().to_le_bytes());
        out.extend_from_slice(&len_u32(self.cpus.len()).to_le_bytes());
        let put = |out: &mut Vec<u8>, samples: &[TimeSample], field: fn(&TimeSample) -> i64| {
            for s in samples {
                out.extend_from_slice(&field(s).to_le_bytes());
            }
        };
        for samples in &self.cpus {
            out.extend_from_slice(&len_u32(samples.len()).to_le_bytes());
            put(&mut out, samples, |s| s.time);
            put(&mut out, samples, |s| s.offset);
            put(&mut out, samples, |s| s.scaling);
        }
        for samples in &self.cpus {
            put(&mut out, samples, |s| s.fraction);
        }
        out
    }

    /// Parses a payload. As in trace-cmd, the fraction arrays may be missing (then all 0).
    pub fn decode(data: &[u8]) -> Result<Self, SyncOptionError> {
        let mut r = Cursor::new("TIME_SHIFT", data);
        let peer_trace_id = r.u64("peer trace id")?;
        let flags = r.u32("flags")?;
        if flags & !Self::FLAG_INTERPOLATE != 0 {
            return Err(SyncOptionError::TimeShiftFlags { flags });
        }
        let ncpu = r.u32("CPU count")?;
        let ncpu = r.count(ncpu, 4, "per-CPU blocks")?;
        if ncpu > MAX_CPUS {
            return Err(SyncOptionError::TimeShiftTooManyCpus { count: ncpu });
        }
        let mut cpus = Vec::with_capacity(ncpu);
        for _ in 0..ncpu {
            let n = r.u32("sample count")?;
            let n = r.count(n, 24, "samples")?;
            let times = r.i64s(n, "times")?;
            let offsets = r.i64s(n, "offsets")?;
            let scalings = r.i64s(n, "scalings")?;
            let samples = (times.into_iter().zip(offsets).zip(scalings))
                .map(|((time, offset), scaling)| TimeSample::scaled(time, offset, scaling, 0));
            cpus.push(samples.collect::<Vec<_>>());
        }
        if !r.is_empty() {
            for samples in &mut cpus {
                let fractions = r.i64s(samples.len(), "fractions")?;
                for (s, fraction) in samples.iter_mut().zip(fractions) {
                    s.fraction = fraction;
                }
            }
        }
        r.finish()?;
        TimeShift::new(peer_trace_id, flags & Self::FLAG_INTERPOLATE != 0, cpus)
    }

    /// The raw host time `trace-cmd report` 3.1.6 gives a record of guest CPU `cpu` at guest raw
    /// time `raw` (before TSC2NSEC), computed as its `timestamp_host_sync()` does; `None` where
    /// its 64-bit arithmetic overflows or wraps and the printed time is garbage.
    pub fn host_time(&self, cpu: usize, raw: u64) -> Option<u64> {
        let Some(samples) = self.cpus.get(cpu) else {
            return Some(raw); // CPUs beyond the option are not corrected
        };
        let time = |k: usize| u64::try_from(samples[k].time).unwrap_or(0);
        let c = samples.len();
        let (min, max) = match c {
            0 => return None,
            1 => return raw.checked_add_signed(samples[0].offset),
            2 => (0, 1),
            _ if raw <= time(0) => (0, 1),
            _ if raw >= time(c - 1) => (c - 2, c - 1),
            // The segment with samples[k].time <= raw < samples[k + 1].time.
            _ => {
                let k = samples.partition_point(|s| u64::try_from(s.time).unwrap_or(0) <= raw);
                (k - 1, k)
            }
        };
        let (min, max) = (&samples[min], &samples[max]);
        let tscor = if self.interpolate {
            interpolated_offset(i64::try_from(raw).ok()?, min, max)?
        } else {
            min.offset
        };
        let scaled = raw.checked_mul(u64::try_from(min.scaling).ok()?)?;
        (scaled >> min.fraction).checked_add_signed(tscor)
    }

    /// Checks that trace-cmd's arithmetic does not overflow for any event of guest CPU `cpu`
    /// between raw times `first` and `last` (e.g. from [`EventCounts`](super::EventCounts)).
    /// With interpolation, events before the first or after the last sample extrapolate the
    /// outer segments, so far-away events can overflow even where the samples do not.
    pub fn check_events(&self, cpu: usize, first: u64, last: u64) -> Result<(), SyncOptionError> {
        let Some(samples) = self.cpus.get(cpu) else {
            return Ok(());
        };
        // Within a segment the result is monotone, so its ends decide.
        let edges = samples
            .iter()
            .filter_map(|s| u64::try_from(s.time).ok())
            .flat_map(|t| [t.saturating_sub(1), t]);
        for ts in [first, last].into_iter().chain(edges) {
            if (first..=last).contains(&ts) && self.host_time(cpu, ts).is_none() {
                return Err(SyncOptionError::TimeShiftEventOverflow { cpu, ts });
            }
        }
        Ok(())
    }
}

/// Sorts one CPU's samples and checks them; see [`SyncOptionError`] for each rule.
fn check_samples(
    cpu: usize,
    samples: &mut [TimeSample],
    interpolate: bool,
) -> Result<(), SyncOptionError> {
    if samples.is_empty() {
        return Err(SyncOptionError::TimeShiftNoSamples { cpu });
    }
    samples.sort_by_key(|s| s.time);
    for s in samples.iter() {
        let time = s.time;
        if time < 0 {
            return Err(SyncOptionError::TimeShiftNegativeTime { cpu, time });
        }
        if s.scaling < 1 {
            let scaling = s.scaling;
            return Err(SyncOptionError::TimeShiftScaling { cpu, time, scaling });
        }
        if !(0..=63).contains(&s.fraction) {
            let fraction = s.fraction;
            return Err(SyncOptionError::TimeShiftFraction {
                cpu,
                time,
                fraction,
            });
        }
    }
    for pair in samples.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.time == b.time {
            let time = a.time;
            return Err(SyncOptionError::TimeShiftDuplicateTime { cpu, time });
        }
        // The largest product inside a segment is at its far end.
        if interpolate && interpolated_offset(b.time, a, b).is_none() {
            return Err(SyncOptionError::TimeShiftInterpolationOverflow {
                cpu,
                from: a.time,
                to: b.time,
            });
        }
    }
    Ok(())
}

/// trace-cmd's interpolated offset at `ts` between `min` and `max`
/// (`timestamp_correction_calc()`), or `None` where its signed 64-bit arithmetic overflows.
fn interpolated_offset(ts: i64, min: &TimeSample, max: &TimeSample) -> Option<i64> {
    let delta = max.time.checked_sub(min.time)?;
    let product = ts
        .checked_sub(min.time)?
        .checked_mul(max.offset.checked_sub(min.offset)?)?;
    min.offset
        .checked_add(product.checked_add(delta / 2)?.checked_div(delta)?)
}

/// TSC2NSEC (14), in the host file and every guest file whose clock is `x86-tsc`: trace-cmd
/// prints `ns = (cycles * mult) >> shift` (after TIME_SHIFT). The option's offset field is
/// always written as 0 (3.1.6 reads and ignores it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tsc2Nsec {
    mult: u32,
    shift: u32,
}

impl Tsc2Nsec {
    /// Largest mult trace-cmd reads correctly: it stores mult in a C `int`.
    pub const MAX_MULT: u32 = 0x7fff_ffff;
    /// Largest shift trace-cmd's `mul_u64_u32_shr()` handles.
    pub const MAX_SHIFT: u32 = 32;

    /// From perf's `time_mult`/`time_shift`. A mult above [`Self::MAX_MULT`] is halved (and the
    /// shift decremented) until it fits, which loses its lowest bits only.
    pub fn new(mut mult: u32, mut shift: u32) -> Result<Self, SyncOptionError> {
        let (given_mult, given_shift) = (mult, shift);
        if mult == 0 {
            return Err(SyncOptionError::Tsc2NsecMultZero);
        }
        while mult > Self::MAX_MULT {
            let Some(smaller) = shift.checked_sub(1) else {
                break;
            };
            mult >>= 1;
            shift = smaller;
        }
        if mult > Self::MAX_MULT || shift > Self::MAX_SHIFT {
            return Err(SyncOptionError::Tsc2NsecShift {
                mult: given_mult,
                shift: given_shift,
            });
        }
        Ok(Tsc2Nsec { mult, shift })
    }

    pub fn mult(&self) -> u32 {
        self.mult
    }

    pub fn shift(&self) -> u32 {
        self.shift
    }

    /// Nanoseconds for `cycles` exactly as trace-cmd computes them (`mul_u64_u32_shr()`,
    /// wrapping where it wraps).
    pub fn to_ns(&self, cycles: u64) -> u64 {
        let mult = u64::from(self.mult);
        let low = cycles & 0xffff_ffff;
        let high = cycles >> 32;
        let mut ns = low.wrapping_mul(mult) >> self.shift;
        if high != 0 {
            ns = ns.wrapping_add(high.wrapping_mul(mult) << (32 - self.shift));
        }
        ns
    }

    /// The option's payload: mult, shift, offset 0.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        out.extend_from_slice(&self.mult.to_le_bytes());
        out.extend_from_slice(&self.shift.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        out
    }

    /// Parses a payload; the values must already be normalised and the offset 0.
    pub fn decode(data: &[u8]) -> Result<Self, SyncOptionError> {
        let mut r = Cursor::new("TSC2NSEC", data);
        let mult = r.u32("mult")?;
        let shift = r.u32("shift")?;
        let offset = r.u64("offset")?;
        r.finish()?;
        if offset != 0 {
            return Err(SyncOptionError::Tsc2NsecOffset { offset });
        }
        if mult > Self::MAX_MULT {
            return Err(SyncOptionError::Tsc2NsecMultTooLarge { mult });
        }
        Tsc2Nsec::new(mult, shift)
    }
}

fn check_size(option: &'static str, len: usize) -> Result<(), SyncOptionError> {
    let bytes = u64::try_from(len).unwrap_or(u64::MAX);
    if bytes > MAX_OPTION_SIZE {
        return Err(SyncOptionError::TooLarge {
            option,
            bytes,
            max: MAX_OPTION_SIZE,
        });
    }
    Ok(())
}

/// A count that the constructors bounded by [`MAX_CPUS`] or [`MAX_OPTION_SIZE`].
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A bounded cursor over one option's payload.
struct Cursor<'a> {
    option: &'static str,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(option: &'static str, data: &'a [u8]) -> Self {
        Cursor {
            option,
            data,
            pos: 0,
        }
    }

    fn truncated(&self, what: &'static str) -> SyncOptionError {
        SyncOptionError::Truncated {
            option: self.option,
            size: self.data.len(),
            what,
        }
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SyncOptionError> {
        if n > self.remaining() {
            return Err(self.truncated(what));
        }
        let bytes = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], SyncOptionError> {
        let bytes = self.take(N, what)?;
        Ok(bytes.try_into().unwrap_or([0; N]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, SyncOptionError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, SyncOptionError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// `n` items of at least `item_size` bytes each, checked against the bytes left before
    /// anything is allocated for them.
    fn count(
        &self,
        n: u32,
        item_size: usize,
        what: &'static str,
    ) -> Result<usize, SyncOptionError> {
        usize::try_from(n)
            .ok()
            .filter(|&n| {
                n.checked_mul(item_size)
                    .is_some_and(|b| b <= self.remaining())
            })
            .ok_or_else(|| self.truncated(what))
    }

    fn i64s(&mut self, n: usize, what: &'static str) -> Result<Vec<i64>, SyncOptionError> {
        let len = n.checked_mul(8).ok_or_else(|| self.truncated(what))?;
        let bytes = self.take(len, what)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            .collect())
    }

    fn finish(&self) -> Result<(), SyncOptionError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(SyncOptionError::TrailingBytes {
                option: self.option,
                extra,
            }),
        }
    }
}

#[cfg(test)]
mod tests;
