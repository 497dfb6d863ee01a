//! One CPU's pump: `per_cpu/cpuN/trace_pipe_raw` → pipe → virtio port `trace-path-cpuN`.
//!
//! Each pump runs on a thread pinned to its CPU (so reading the buffer does not bounce cache
//! lines between CPUs, and tracing another CPU's buffer does not wake it), moves whole pages
//! with splice(2) and counts exactly the bytes it put on the port after the stream marker.
//! Each pump alone uses its `trace_pipe_raw` and its port: no descriptor is shared between
//! threads, so the final read(2) never races a splice on another thread.
//!
//! Stopping is a handshake with [`super::recording`]: the controller turns the instance's
//! tracing off, then sets [`PumpShared::stop`] and wakes every pump ([`Waker`]). A pump then
//! drains what is left, full pages with splice and the partly filled last page with read(2)
//! (which hands it out as a whole page whose `commit` says how much is valid), and ends.
//!
//! No loop here spins. Both files are non-blocking, so the kernel never sleeps or loops on our
//! behalf: `tracing_buffers_splice_read` returns `-EAGAIN` before its wait-and-retry loop when
//! `O_NONBLOCK`/`SPLICE_F_NONBLOCK` is set, and the virtio port answers `-EAGAIN` when its
//! queue is full. Every round of every loop either moves bytes or sleeps in poll(2) with a
//! timeout, and a poll that claims data that then does not come is followed by a plain sleep.
//! Waits for the port end when the controller gives up on the pump ([`PumpShared::abort`]) or,
//! once stopping, when the host has taken nothing for [`STALL_LIMIT`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::zerocopy::{wait_writable_for, write_some, Pulled, SplicePipe};

/// How long a pump sleeps in poll(2) when its buffer has no full page. The kernel wakes
/// pollers when the buffer is `buffer_percent` (50 %) full, as trace-cmd's recorders wait;
/// this bounds how late the pages of a slow stream reach the host (the live display). Stop
/// does not wait for it: the controller's waker ends every sleep.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How long one wait for room on the port lasts before the pump looks at its flags again.
const PORT_POLL: Duration = Duration::from_millis(100);
/// A port that said it had room and then refused a write is retried after this pause.
const PORT_RETRY: Duration = Duration::from_millis(10);
/// Once stopping, a port that takes nothing for this long ends the drain: the host stopped
/// reading, and the controller must answer Stop. Generous: a host reading slowly still moves
/// bytes, and only a host taking nothing at all is cut off.
pub const STALL_LIMIT: Duration = Duration::from_secs(5);
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
    /// Benchmark only (`tvctl-agent --synthetic`): send empty pages (all zero: timestamp 0,
    /// commit 0) as fast as the port takes them instead of the ring buffer's, so the host's
    /// collector can be measured against the raw channel with a source faster than tracing.
    pub synthetic: bool,
    /// Rung by the controller when it sets `stop`, so pumps asleep in poll(2) drain at once.
    pub waker: Arc<Waker>,
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
    /// Tracing is off: drain what is left and end. Set only after tracing_on is 0, so the
    /// drain has an end.
    pub stop: AtomicBool,
    /// The controller's bound passed: end now, drained or not.
    pub abort: AtomicBool,
    /// Bytes written to the port after the marker, counted as they go out (exact even when
    /// a pump ends half-way through a chunk).
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
    /// False when the pump ended before its buffer was empty (aborted or the port stalled).
    pub drained: bool,
}

/// Wakes all pumps of a recording at once: a pipe whose read end every pump polls next to its
/// buffer. Once rung it stays readable (level-triggered), so a pump that polls later sees it
/// too; pumps only poll it while not stopping, so it cannot make them spin.
#[derive(Debug)]
pub struct Waker {
    read: OwnedFd,
    write: OwnedFd,
}

impl Waker {
    pub fn new() -> io::Result<Waker> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(io::Error::from)?;
        Ok(Waker { read, write })
    }

    /// Wakes every pump polling (or about to poll) this waker.
    pub fn wake(&self) {
        // A full pipe (impossible with one byte per recording) is as good as a written byte.
        let _ = nix::unistd::write(&self.write, &[1]);
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

/// Why a pump ended before its buffer was empty: the stop path's bounds, not an I/O failure.
#[derive(Debug)]
struct CutShort(String);

impl std::fmt::Display for CutShort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CutShort {}

impl CutShort {
    fn error(why: impl Into<String>) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, CutShort(why.into()))
    }

    fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<CutShort>())
    }
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
        drained: false,
    };
    match pump(cfg, shared, &mut outcome) {
        Ok(()) => outcome.drained = true,
        Err(e) if CutShort::is(&e) => {
            // Cut short by the stop path's bounds: not a failure of the pump, but the host
            // must learn that this CPU's stream ends early.
            let sent = shared.bytes.load(Ordering::SeqCst);
            outcome.note = Some(format!("cpu{}: {e}; {sent} bytes sent", cfg.cpu));
        }
        Err(e) => outcome.error = Some(e),
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
    // Declared first, so dropped last: the splice pipe below may hold pages of this buffer,
    // and it must be closed before the file that keeps the instance alive.
    let raw = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&cfg.raw_pipe)?;
    let port_file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&cfg.port)?;
    let mut port = Port::new(port_file, shared);
    port.send(&cfg.marker, false)?;
    if cfg.synthetic {
        let pages = vec![0u8; cfg.page_size * PAGES_PER_SPLICE];
        while !shared.stop.load(Ordering::SeqCst) {
            port.send(&pages, true)?;
        }
        return Ok(());
    }

    let chunk = cfg.page_size * PAGES_PER_SPLICE;
    let mut pipe = if cfg.force_copy {
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
    if pipe.is_none() {
        let note = outcome
            .note
            .clone()
            .unwrap_or_else(|| "read/write requested".to_string());
        fall_back(shared, outcome, note);
    }
    let mut page = vec![0u8; cfg.page_size];
    let mut mover = Mover {
        raw: &raw,
        page: &mut page,
        chunk,
        cpu: cfg.cpu,
        shared,
    };

    // Recording: move pages as they fill, sleep in poll(2) while none is full.
    let mut woke_early = false;
    while !shared.stop.load(Ordering::SeqCst) {
        let moved = mover.step(&mut pipe, &mut port, outcome)?;
        if moved > 0 {
            woke_early = false;
            continue;
        }
        woke_early = wait_for_pages(&raw, &cfg.waker, woke_early)?;
    }

    // Draining: tracing is off, so the buffer no longer grows and this ends. Full pages
    // first (splice hands out only those), then the partly filled last page with read(2).
    if let Some(p) = &pipe {
        loop {
            port.check_abort()?;
            match p.pull(&raw, p.capacity().min(chunk), true) {
                Ok(Pulled::Bytes(n)) => port.send_from_pipe(p, n)?,
                // No full page left, or splice refused: read(2) takes the rest.
                Ok(Pulled::WouldBlock) | Ok(Pulled::Eof) | Err(_) => break,
            }
        }
    }
    loop {
        port.check_abort()?;
        if mover.copy_page(&mut port)? == 0 {
            break;
        }
    }
    Ok(())
}

fn fall_back(shared: &PumpShared, outcome: &mut PumpOutcome, note: String) {
    outcome.spliced = false;
    if let Ok(mut n) = shared.note.lock() {
        *n = Some(note.clone());
    }
    outcome.note = Some(note);
    shared.mode.store(MODE_COPY, Ordering::SeqCst);
}

/// Moves pages from the buffer to the port, one step at a time.
struct Mover<'a> {
    raw: &'a File,
    page: &'a mut [u8],
    chunk: usize,
    cpu: u32,
    shared: &'a PumpShared,
}

impl Mover<'_> {
    /// One transfer attempt; the bytes it put on the port (0: no full page yet).
    fn step(
        &mut self,
        pipe: &mut Option<SplicePipe>,
        port: &mut Port<'_>,
        outcome: &mut PumpOutcome,
    ) -> io::Result<usize> {
        let Some(p) = pipe.as_ref() else {
            return self.copy_page(port);
        };
        match p.pull(self.raw, p.capacity().min(self.chunk), true) {
            Ok(Pulled::Bytes(n)) => {
                self.shared.mode.store(MODE_SPLICE, Ordering::SeqCst);
                port.send_from_pipe(p, n)?;
                Ok(n)
            }
            Ok(Pulled::WouldBlock) | Ok(Pulled::Eof) => {
                // The kernel accepted the splice; it just had no full page yet.
                self.shared.mode.store(MODE_SPLICE, Ordering::SeqCst);
                Ok(0)
            }
            Err(e) if self.shared.bytes.load(Ordering::SeqCst) == 0 => {
                // splice from trace_pipe_raw is not supported here: fall back, say so.
                let note = format!("cpu{}: splice failed ({e}); using read/write", self.cpu);
                fall_back(self.shared, outcome, note);
                *pipe = None;
                self.copy_page(port)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads one page (or nothing) from the buffer and writes it to the port.
    fn copy_page(&mut self, port: &mut Port<'_>) -> io::Result<usize> {
        loop {
            match nix::unistd::read(self.raw.as_fd(), self.page) {
                // 0: the kernel's "not empty, but nothing to hand out"; EAGAIN: empty.
                Ok(0) | Err(Errno::EAGAIN) => return Ok(0),
                Ok(n) => {
                    port.send(&self.page[..n], true)?;
                    return Ok(n);
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Sleeps until the buffer has pages, the waker rings, or [`IDLE_POLL`] passed. Returns
/// whether poll(2) came back early. After an early return that brought nothing (poll said
/// readable, splice said empty: e.g. the `block` trace option makes every poll readable) the
/// next wait is a plain sleep, so the loop cannot spin.
fn wait_for_pages(raw: &File, waker: &Waker, woke_early_for_nothing: bool) -> io::Result<bool> {
    if woke_early_for_nothing {
        // The buffer claimed pages that did not come: wait for the waker alone.
        let ms = u16::try_from(IDLE_POLL.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(waker.fd(), PollFlags::POLLIN)];
        return match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => Ok(false),
            Ok(_) | Err(Errno::EINTR) => Ok(true),
            Err(e) => Err(e.into()),
        };
    }
    let ms = u16::try_from(IDLE_POLL.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [
        PollFd::new(raw.as_fd(), PollFlags::POLLIN),
        PollFd::new(waker.fd(), PollFlags::POLLIN),
    ];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(0) => Ok(false),
        Ok(_) | Err(Errno::EINTR) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// The pump's data port, opened non-blocking: every wait for room is a bounded poll(2), so a
/// host that stops reading can delay a pump but never hold it for ever.
struct Port<'a> {
    file: File,
    shared: &'a PumpShared,
    /// When bytes last went out, or the pump learnt it is stopping: the stall clock.
    last_progress: Instant,
    /// Whether the stall clock was restarted for the drain (the host gets a whole
    /// [`STALL_LIMIT`] after Stop, however long it had been slow before).
    stop_seen: bool,
}

impl<'a> Port<'a> {
    fn new(file: File, shared: &'a PumpShared) -> Port<'a> {
        Port {
            file,
            shared,
            last_progress: Instant::now(),
            stop_seen: false,
        }
    }

    /// Writes all of `buf`; `counted` bytes are added to the stream's count as they go out.
    fn send(&mut self, mut buf: &[u8], counted: bool) -> io::Result<()> {
        let mut said_ready = false;
        while !buf.is_empty() {
            match write_some(&self.file, buf)? {
                Some(n) => {
                    self.progress(n, counted);
                    buf = &buf[n..];
                    said_ready = false;
                }
                None => said_ready = self.wait(said_ready)?,
            }
        }
        Ok(())
    }

    /// Moves the `n` bytes now in `pipe` to the port, counting them as they go out.
    fn send_from_pipe(&mut self, pipe: &SplicePipe, mut n: usize) -> io::Result<()> {
        let mut said_ready = false;
        while n > 0 {
            match pipe.push(&self.file, n)? {
                Some(k) => {
                    self.progress(k, true);
                    n -= k;
                    said_ready = false;
                }
                None => said_ready = self.wait(said_ready)?,
            }
        }
        Ok(())
    }

    fn progress(&mut self, n: usize, counted: bool) {
        self.last_progress = Instant::now();
        if counted {
            self.shared.bytes.fetch_add(n as u64, Ordering::SeqCst);
        }
    }

    /// Waits for room on the port; ends the pump (TimedOut) when told to, or when stopping and
    /// the host took nothing for [`STALL_LIMIT`]. `said_ready`: the last wait reported room
    /// and the write still found none, so pause instead of polling straight back.
    fn wait(&mut self, said_ready: bool) -> io::Result<bool> {
        self.check_abort()?;
        if self.shared.stop.load(Ordering::SeqCst) {
            if !self.stop_seen {
                self.stop_seen = true;
                self.last_progress = Instant::now();
            } else if self.last_progress.elapsed() > STALL_LIMIT {
                return Err(CutShort::error(format!(
                    "the host took nothing from the data port for {} s while draining",
                    STALL_LIMIT.as_secs()
                )));
            }
        }
        if said_ready {
            std::thread::sleep(PORT_RETRY);
        }
        wait_writable_for(self.file.as_fd(), PORT_POLL)
    }

    fn check_abort(&self) -> io::Result<()> {
        if self.shared.abort.load(Ordering::SeqCst) {
            return Err(CutShort::error(
                "stopped before the buffer was drained (the stop's time bound passed)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rung_waker_wakes_a_sleeping_poll_at_once() {
        // Arrange: a "buffer" that never has data, and a waker.
        let (idle_r, _idle_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        let idle = File::from(idle_r);
        let waker = Waker::new().unwrap();

        // Act
        waker.wake();
        let start = Instant::now();
        let early = wait_for_pages(&idle, &waker, false).unwrap();

        // Assert
        assert!(early);
        assert!(start.elapsed() < IDLE_POLL / 2);
    }

    #[test]
    fn a_poll_that_promised_pages_for_nothing_is_followed_by_a_sleep() {
        // Arrange: a fd that is always readable (poll returns at once).
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        nix::unistd::write(&w, b"x").unwrap();
        let always = File::from(r);
        let waker = Waker::new().unwrap();

        // Act: the first wait comes back early; the next one, after no progress, sleeps.
        let early = wait_for_pages(&always, &waker, false).unwrap();
        let start = Instant::now();
        let again = wait_for_pages(&always, &waker, early).unwrap();

        // Assert
        assert!(early);
        assert!(!again);
        assert!(start.elapsed() >= IDLE_POLL - Duration::from_millis(10));
    }

    /// A non-blocking pipe that takes nothing more (its reader kept, never read).
    fn full_port() -> (OwnedFd, File) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        while write_some(&w, &[0u8; 4096]).unwrap().is_some() {}
        (r, File::from(w))
    }

    #[test]
    fn an_aborted_pump_stops_waiting_for_a_full_port() {
        // Arrange
        let (_reader, file) = full_port();
        let shared = PumpShared::default();
        shared.stop.store(true, Ordering::SeqCst);
        shared.abort.store(true, Ordering::SeqCst);
        let mut port = Port::new(file, &shared);

        // Act
        let start = Instant::now();
        let err = port.send(&[1u8; 4096], true).unwrap_err();

        // Assert: at once, with nothing counted.
        assert!(CutShort::is(&err), "{err}");
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(shared.bytes.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_stopping_pump_gives_up_on_a_port_that_takes_nothing() {
        // Arrange: stopping, and the port has taken nothing for longer than the stall limit.
        let (_reader, file) = full_port();
        let shared = PumpShared::default();
        shared.stop.store(true, Ordering::SeqCst);
        let mut port = Port::new(file, &shared);
        port.stop_seen = true;
        port.last_progress = Instant::now() - STALL_LIMIT - Duration::from_secs(1);

        // Act
        let err = port.send(&[1u8; 16], true).unwrap_err();

        // Assert
        assert!(CutShort::is(&err), "{err}");
        assert!(err.to_string().contains("took nothing"), "{err}");
    }

    #[test]
    fn counted_bytes_are_exact_when_the_port_fills_half_way() {
        // Arrange: a port with room for exactly 4096 more bytes, then an abort.
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        while write_some(&w, &[0u8; 4096]).unwrap().is_some() {}
        let mut drain = [0u8; 4096];
        assert_eq!(nix::unistd::read(&r, &mut drain).unwrap(), 4096);
        let shared = PumpShared::default();
        shared.abort.store(true, Ordering::SeqCst);
        let mut port = Port::new(File::from(w), &shared);

        // Act: 3 pages offered, 1 fits.
        let err = port.send(&[1u8; 3 * 4096], true).unwrap_err();

        // Assert: the count is what went out, not what was offered.
        assert!(CutShort::is(&err), "{err}");
        assert_eq!(shared.bytes.load(Ordering::SeqCst), 4096);
    }
}
