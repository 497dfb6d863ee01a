//! One CPU's pump: `per_cpu/cpuN/trace_pipe_raw` → pipe → virtio port `trace-path-cpuN`.
//!
//! Each pump runs on a thread pinned to its CPU (so reading the buffer does not bounce cache
//! lines between CPUs, and tracing another CPU's buffer does not wake it), moves whole pages
//! with splice(2) and counts exactly the bytes it put on the port after the stream marker.
//! When told to stop (after the instance's tracing is off) it drains what is left, partial last
//! page included: splice only hands out full pages, so the rest comes with read(2), which
//! returns the partly filled page as a whole page whose `commit` says how much is valid.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;

use crate::zerocopy::{wait_readable, write_all_fd, Pulled, SplicePipe};

/// How long a pump sleeps in poll(2) when its buffer has no full page. The kernel wakes
/// pollers only when the buffer is `buffer_percent` full, so this bounds the latency.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// Pages moved per splice call.
const PAGES_PER_SPLICE: usize = 16;

/// What a pump needs to know.
#[derive(Debug, Clone)]
pub struct PumpConfig {
    pub cpu: u32,
    pub raw_pipe: PathBuf,
    pub port: PathBuf,
    pub page_size: usize,
    /// Written to the port before any page (see docs/protocol.md, "Data streams").
    pub marker: Vec<u8>,
    /// Use read/write even if splice works (tests of the fallback).
    pub force_copy: bool,
}

/// How a pump moves pages, once it knows (see [`PumpShared::mode`]).
pub const MODE_UNKNOWN: u8 = 0;
/// splice(2) works from trace_pipe_raw to the port.
pub const MODE_SPLICE: u8 = 1;
/// read/write: asked for, or splice failed on this system.
pub const MODE_COPY: u8 = 2;

/// Shared between a pump and the controller.
#[derive(Debug, Default)]
pub struct PumpShared {
    pub stop: AtomicBool,
    pub bytes: AtomicU64,
    /// MODE_*: set after the pump's first attempt, so `Started` can say how pages travel.
    pub mode: AtomicU8,
    /// Why the pump fell back to read/write, if it did.
    pub note: std::sync::Mutex<Option<String>>,
}

/// How a pump ended.
#[derive(Debug)]
pub struct PumpOutcome {
    pub cpu: u32,
    pub bytes: u64,
    pub spliced: bool,
    pub note: Option<String>,
    pub error: Option<io::Error>,
}

/// Starts the pump thread for one CPU.
pub fn spawn(
    cfg: PumpConfig,
    shared: Arc<PumpShared>,
) -> io::Result<std::thread::JoinHandle<PumpOutcome>> {
    std::thread::Builder::new()
        .name(format!("pump-cpu{}", cfg.cpu))
        .spawn(move || run(&cfg, &shared))
}

fn run(cfg: &PumpConfig, shared: &PumpShared) -> PumpOutcome {
    pin_to_cpu(cfg.cpu);
    let mut outcome = PumpOutcome {
        cpu: cfg.cpu,
        bytes: 0,
        spliced: !cfg.force_copy,
        note: None,
        error: None,
    };
    if let Err(e) = pump(cfg, shared, &mut outcome) {
        outcome.error = Some(e);
    }
    outcome.bytes = shared.bytes.load(Ordering::SeqCst);
    outcome
}

fn pin_to_cpu(cpu: u32) {
    let mut set = nix::sched::CpuSet::new();
    if let Ok(idx) = usize::try_from(cpu) {
        if set.set(idx).is_ok() {
            // Not fatal: an offline CPU's buffer can still be read from elsewhere.
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        }
    }
}

fn pump(cfg: &PumpConfig, shared: &PumpShared, outcome: &mut PumpOutcome) -> io::Result<()> {
    let raw = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&cfg.raw_pipe)?;
    let port = OpenOptions::new().write(true).open(&cfg.port)?;
    write_all_fd(&port, &cfg.marker)?;

    let chunk = cfg.page_size * PAGES_PER_SPLICE;
    let pipe = if cfg.force_copy {
        None
    } else {
        match SplicePipe::new(chunk) {
            Ok(p) => Some(p),
            Err(e) => {
                outcome.note = Some(format!("cpu{}: no pipe for splice ({e})", cfg.cpu));
                None
            }
        }
    };
    let mut pipe = pipe;
    let mut page = vec![0u8; cfg.page_size];
    let fall_back = |outcome: &mut PumpOutcome, note: String| {
        outcome.spliced = false;
        if let Ok(mut n) = shared.note.lock() {
            *n = Some(note.clone());
        }
        outcome.note = Some(note);
        shared.mode.store(MODE_COPY, Ordering::SeqCst);
    };
    if pipe.is_none() {
        let note = outcome
            .note
            .clone()
            .unwrap_or_else(|| "read/write requested".to_string());
        fall_back(outcome, note);
    }

    loop {
        let stopping = shared.stop.load(Ordering::SeqCst);
        let moved = match &pipe {
            Some(p) => match p.pull(&raw, p.capacity().min(chunk), true) {
                Ok(Pulled::Bytes(n)) => {
                    shared.mode.store(MODE_SPLICE, Ordering::SeqCst);
                    p.push_all(&port, n)?;
                    n
                }
                Ok(Pulled::WouldBlock) | Ok(Pulled::Eof) => {
                    // The kernel accepted the splice; it just had no full page yet.
                    shared.mode.store(MODE_SPLICE, Ordering::SeqCst);
                    0
                }
                Err(e) if shared.bytes.load(Ordering::SeqCst) == 0 => {
                    // splice from trace_pipe_raw is not supported here: fall back, say so.
                    let note = format!("cpu{}: splice failed ({e}); using read/write", cfg.cpu);
                    fall_back(outcome, note);
                    pipe = None;
                    continue;
                }
                Err(e) => return Err(e),
            },
            None => copy_page(&raw, &port, &mut page)?,
        };
        if moved > 0 {
            shared.bytes.fetch_add(moved as u64, Ordering::SeqCst);
            continue;
        }
        if stopping {
            break;
        }
        wait_readable(raw.as_fd(), IDLE_POLL)?;
    }

    // Tracing is off: whatever is left is a partly filled page per CPU at most; read(2)
    // hands it out as a whole page.
    loop {
        let n = copy_page(&raw, &port, &mut page)?;
        if n == 0 {
            break;
        }
        shared.bytes.fetch_add(n as u64, Ordering::SeqCst);
    }
    Ok(())
}

/// Reads one page (or nothing) from the raw pipe and writes it to the port.
fn copy_page(raw: &File, port: &File, page: &mut [u8]) -> io::Result<usize> {
    loop {
        match nix::unistd::read(raw.as_fd(), page) {
            Ok(0) => return Ok(0),
            Ok(n) => {
                write_all_fd(port, &page[..n])?;
                return Ok(n);
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(0),
            Err(e) => return Err(e.into()),
        }
    }
}
