//! The host's TSC: reading it, and how the kernel turns cycles into nanoseconds.
//!
//! Files recorded with the `x86-tsc` trace clock hold timestamps in TSC cycles. trace-cmd
//! prints them as time when the file carries a TSC2NSEC option: `ns = cycles * mult >> shift`.
//! The kernel publishes exactly those two numbers for user space in the first page of any perf
//! event's mmap (`perf_event_mmap_page.time_mult/time_shift`, `cap_user_time`), which is
//! where `trace-cmd record` takes them too. Where perf is not allowed, they are measured
//! against CLOCK_MONOTONIC_RAW over 100 ms (a few ppm off, said in the summary).

use std::time::Duration;

/// `ns = cycles * mult >> shift`, as trace-cmd's TSC2NSEC option holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TscToNs {
    pub mult: u32,
    pub shift: u32,
    /// From the kernel (perf), or measured here.
    pub exact: bool,
}

impl TscToNs {
    /// The kernel's numbers, else a measurement.
    pub fn host() -> TscToNs {
        perf_time_conversion().unwrap_or_else(measure)
    }

    /// Converts a cycle count (for summaries and bounds).
    pub fn ns(&self, cycles: u64) -> u64 {
        let wide = (u128::from(cycles) * u128::from(self.mult)) >> self.shift;
        u64::try_from(wide).unwrap_or(u64::MAX)
    }

    /// trace-cmd 3.1.6 reads `mult` as a signed int: keep it below 2^31 (one bit of
    /// precision lost per halving).
    fn normalised(mut mult: u64, mut shift: u32, exact: bool) -> Option<TscToNs> {
        while mult > 0x7fff_ffff && shift > 0 {
            mult >>= 1;
            shift -= 1;
        }
        let mult = u32::try_from(mult).ok().filter(|&m| m > 0)?;
        (shift <= 32).then_some(TscToNs { mult, shift, exact })
    }
}

/// Reads the TSC.
pub fn rdtsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no memory effects; every x86-64 CPU has it.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

/// `time_mult` and `time_shift` from a perf event's mmap page, if the kernel lets us open one
/// and offers user-space time (`cap_user_time`).
fn perf_time_conversion() -> Option<TscToNs> {
    // perf_event_attr: type u32 @0, size u32 @4, config u64 @8; the rest zero. 128 bytes is
    // PERF_ATTR_SIZE_VER7, which every kernel since 5.x accepts (older ones a smaller size).
    const PERF_TYPE_SOFTWARE: u32 = 1;
    const PERF_COUNT_SW_DUMMY: u64 = 9;
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&PERF_TYPE_SOFTWARE.to_ne_bytes());
    attr[4..8].copy_from_slice(&128u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&PERF_COUNT_SW_DUMMY.to_ne_bytes());
    let (this_process, any_cpu, no_group): (libc::pid_t, libc::c_int, libc::c_int) = (0, -1, -1);
    // SAFETY: perf_event_open reads `attr` (a live, correctly sized buffer) and returns a fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            this_process,
            any_cpu,
            no_group,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    let page = 4096usize;
    // SAFETY: maps one read-only page of the perf event we own; unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    let result = if map == libc::MAP_FAILED {
        None
    } else {
        // SAFETY: the page is mapped and readable; perf_event_mmap_page puts capabilities at
        // 40, time_shift (u16) at 50 and time_mult (u32) at 52. Volatile: the kernel writes it.
        let (caps, shift, mult) = unsafe {
            let base = map.cast::<u8>();
            (
                std::ptr::read_volatile(base.add(40).cast::<u64>()),
                std::ptr::read_volatile(base.add(50).cast::<u16>()),
                std::ptr::read_volatile(base.add(52).cast::<u32>()),
            )
        };
        // SAFETY: unmapping the page mapped above.
        unsafe { libc::munmap(map, page) };
        let cap_user_time = caps & (1 << 3) != 0;
        (cap_user_time && mult != 0)
            .then(|| TscToNs::normalised(u64::from(mult), u32::from(shift), true))
            .flatten()
    };
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    result
}

/// Measures cycles per nanosecond against CLOCK_MONOTONIC_RAW over 100 ms.
///
/// Each end is the tightest of several `rdtsc, clock_gettime, rdtsc` brackets, so a preemption
/// between the two reads (common on a loaded CI machine) cannot skew the result: the error is
/// at most half the best bracket at each end, well under a microsecond in 100 ms.
fn measure() -> TscToNs {
    let (t0, c0) = bracketed_read();
    std::thread::sleep(Duration::from_millis(100));
    let (t1, c1) = bracketed_read();
    let ns = t1.saturating_sub(t0).max(1);
    let cycles = c1.saturating_sub(c0).max(1);
    // mult = ns / cycles * 2^shift, with shift as large as keeps mult below 2^31.
    let shift = 31u32;
    let mult = (ns << shift) / cycles;
    TscToNs::normalised(u64::try_from(mult).unwrap_or(u64::MAX), shift, false).unwrap_or(TscToNs {
        mult: 1,
        shift: 0,
        exact: false,
    })
}

/// CLOCK_MONOTONIC_RAW in ns and the TSC at the same moment (the midpoint of the bracket):
/// the tightest of 16 brackets.
fn bracketed_read() -> (u128, u128) {
    let now = || {
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_RAW)
            .map(|t| {
                u128::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                    + u128::try_from(t.tv_nsec()).unwrap_or(0)
            })
            .unwrap_or(0)
    };
    let mut best: Option<(u64, u128, u128)> = None;
    for _ in 0..16 {
        let before = rdtsc();
        let t = now();
        let after = rdtsc();
        let width = after.wrapping_sub(before);
        if best.is_none_or(|(w, _, _)| width < w) {
            let mid = (u128::from(before) + u128::from(after)) / 2;
            best = Some((width, t, mid));
        }
    }
    let (_, t, c) = best.unwrap_or((0, 0, 0));
    (t, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_conversion_agrees_with_the_monotonic_clock() {
        let conv = TscToNs::host();
        let measured = measure();
        // Both turn one second's worth of cycles into ~1e9 ns (within 0.1 %).
        let cycles_per_s = (1u128 << measured.shift) * 1_000_000_000 / u128::from(measured.mult);
        let ns = conv.ns(u64::try_from(cycles_per_s).unwrap());
        assert!(
            (999_000_000..=1_001_000_000).contains(&ns),
            "{conv:?}: {ns}"
        );
    }

    #[test]
    fn two_measurements_agree_even_when_the_machine_is_busy() {
        // CI machines often refuse perf, so `host()` falls back to `measure()`: a preemption
        // between the clock and TSC reads once made two measurements differ by 0.13 %.
        let (a, b) = (measure(), measure());
        let one_s = (1u128 << a.shift) * 1_000_000_000 / u128::from(a.mult);
        let ns = b.ns(u64::try_from(one_s).unwrap());
        assert!(
            (999_900_000..=1_000_100_000).contains(&ns),
            "{a:?} {b:?}: {ns}"
        );
    }

    #[test]
    fn big_multipliers_are_halved_for_trace_cmd() {
        let t = TscToNs::normalised(0xC000_0000, 31, true).unwrap();
        assert_eq!((t.mult, t.shift), (0x6000_0000, 30));
        assert!(TscToNs::normalised(0, 10, true).is_none());
    }
}
