//! A global allocator that aborts on any allocation larger than the current input may justify.
//!
//! "A hostile guest cannot hurt the host" includes memory: a decoder must never reserve what a
//! length field claims before the bytes are there. Without AddressSanitizer (stable rustc has
//! none), libFuzzer's `-malloc_limit_mb` does not see single allocations, and `-rss_limit_mb`
//! misses a huge zeroed buffer that is never touched. So every target sets a budget from its
//! input before decoding, and an allocation over it is a crash that libFuzzer records.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// What every input may allocate at once regardless of its size: fixed buffers such as a
/// `BufReader`'s 64 KiB, a frame decoder's read chunk, and slack for `Vec` doubling.
pub const BASE: usize = 4 << 20;

static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Sets the largest single allocation allowed from now on: [`BASE`] plus `per_byte` bytes per
/// byte of `len` (the input, or what the target expanded it to).
pub fn budget(len: usize, per_byte: usize) {
    let limit = len.saturating_mul(per_byte).saturating_add(BASE);
    LIMIT.store(limit, Ordering::Relaxed);
}

/// The allocator installed in every fuzz binary and test of this package.
pub struct AllocGuard;

#[global_allocator]
static GUARD: AllocGuard = AllocGuard;

fn check(size: usize) {
    let limit = LIMIT.load(Ordering::Relaxed);
    // A panic's report (its backtrace's symbolizer reads debug info) may allocate freely, and
    // must: the panic is the finding.
    if size > limit && !std::thread::panicking() {
        over_budget(size, limit);
    }
}

#[cold]
fn over_budget(size: usize, limit: usize) -> ! {
    // Let the report itself allocate, then stop: unwinding out of an allocator is undefined.
    LIMIT.store(usize::MAX, Ordering::Relaxed);
    eprintln!(
        "tvctl-fuzz: allocation of {size} bytes, over this input's budget of {limit} bytes\n{}",
        std::backtrace::Backtrace::force_capture()
    );
    std::process::abort();
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, after a check
// that only reads an atomic (or never returns); so `System`'s guarantees carry over.
unsafe impl GlobalAlloc for AllocGuard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract for `layout`; passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator, with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds `new_size`'s rules.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
