//! One CPU's stream on the host: `trace-path-cpuN.out` FIFO → pipe → data file, with splice.
//!
//! The FIFO may still hold bytes of an earlier, interrupted recording, so the reader first
//! looks for the stream marker with this recording's nonce (a few small reads), then moves
//! everything after it with splice(2), never copying pages through user space. QEMU keeps the
//! FIFO open, so there is no end of file: the stream ends when the byte count the agent reports
//! in `Stopped` has arrived. The reader never reads past that count, and it is told to give up
//! early (second Ctrl-C, the domain died) through a shared flag.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;

use crate::proto::StreamMarker;
use crate::zerocopy::{wait_readable, write_all_fd, Pulled, SplicePipe};

/// Byte target meaning "not known yet".
const UNKNOWN: u64 = u64::MAX;
/// poll(2) timeout while waiting for data: bounds how late a cancel or a target is seen.
const POLL_MS: u64 = 50;
/// How much the seeking phase reads at a time.
const SEEK_READ: usize = 64 * 1024;
/// The FIFO's own buffer (the kernel's default is 64 KiB): QEMU writes into it while the
/// collector sleeps between batches.
const FIFO_BUFFER: i32 = 1 << 20;
/// While the recording runs, a splice that moved less than this waits [`BATCH_WAIT`] before
/// the next one, so that data is taken in big batches (few system calls, no EAGAIN churn)
/// instead of page by page as it trickles in. Fast streams fill batches and never wait.
const SMALL_BATCH: usize = 256 * 1024;
const BATCH_WAIT: Duration = Duration::from_millis(10);

/// Shared between a stream's thread and the recording's controller.
#[derive(Debug)]
pub struct StreamShared {
    /// Bytes after the marker written to the data file so far.
    pub received: AtomicU64,
    /// The agent's byte count, once `Stopped` has arrived.
    target: AtomicU64,
    /// Give up now, keeping what arrived.
    pub cancel: AtomicBool,
    /// The marker was found.
    pub synced: AtomicBool,
    /// Bytes discarded before the marker (stale data of an earlier recording).
    pub discarded: AtomicU64,
    /// Bytes beyond the agent's count that were cut off (an agent bug or a hostile guest).
    pub excess: AtomicU64,
    /// Writing the data file failed; the stream is being drained and dropped.
    pub failed: AtomicBool,
    /// Bytes read and dropped after a failure.
    pub dropped: AtomicU64,
    /// Bytes of the stream taken from the FIFO after the marker (written or not): with
    /// `dropped`, tells when a failed stream has been drained to the agent's count.
    consumed: AtomicU64,
    /// Most bytes this stream may store (set at `Stop` to what arrived plus what the guest may
    /// still legitimately send): beyond it the guest is writing more than it can have.
    limit: AtomicU64,
    /// Bytes read and not stored because the run's `--max-size` was reached.
    pub cut: AtomicU64,
    /// The run's `--max-size`, shared by every CPU's stream.
    budget: Option<Arc<ByteBudget>>,
}

/// What is left of the run's `--max-size`, shared by every stream of a recording.
#[derive(Debug)]
pub struct ByteBudget {
    left: AtomicU64,
}

impl ByteBudget {
    pub fn new(bytes: u64) -> ByteBudget {
        ByteBudget {
            left: AtomicU64::new(bytes),
        }
    }

    /// Takes up to `want` bytes; returns how many were granted.
    fn reserve(&self, want: u64) -> u64 {
        let mut left = self.left.load(Ordering::SeqCst);
        loop {
            let take = want.min(left);
            match self
                .left
                .compare_exchange(left, left - take, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return take,
                Err(now) => left = now,
            }
        }
    }

    fn give_back(&self, bytes: u64) {
        self.left.fetch_add(bytes, Ordering::SeqCst);
    }

    /// True once nothing is left.
    pub fn exhausted(&self) -> bool {
        self.left.load(Ordering::SeqCst) == 0
    }
}

impl StreamShared {
    fn with_budget(budget: Option<Arc<ByteBudget>>) -> StreamShared {
        StreamShared {
            budget,
            ..StreamShared::default()
        }
    }
}

impl Default for StreamShared {
    fn default() -> Self {
        StreamShared {
            received: AtomicU64::new(0),
            target: AtomicU64::new(UNKNOWN),
            cancel: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            discarded: AtomicU64::new(0),
            excess: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            limit: AtomicU64::new(u64::MAX),
            cut: AtomicU64::new(0),
            budget: None,
        }
    }
}

impl StreamShared {
    pub fn set_target(&self, bytes: u64) {
        self.target.store(bytes, Ordering::SeqCst);
    }

    pub fn target(&self) -> Option<u64> {
        match self.target.load(Ordering::SeqCst) {
            UNKNOWN => None,
            t => Some(t),
        }
    }

    /// Stores at most `bytes` in all; what arrives beyond is read and counted as `excess`.
    pub fn set_limit(&self, bytes: u64) {
        self.limit.store(bytes, Ordering::SeqCst);
    }

    /// The most bytes this stream may store.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::SeqCst)
    }

    /// Bytes of the stream taken from the FIFO after the marker, stored or not.
    pub fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::SeqCst)
    }
}

/// How a stream ended.
#[derive(Debug)]
pub struct StreamOutcome {
    pub cpu: u32,
    pub received: u64,
    /// False when the stream was cancelled or failed before its target.
    pub complete: bool,
    pub error: Option<io::Error>,
    /// Bytes the guest sent beyond its count or its limit, read and not kept.
    pub excess: u64,
    /// Bytes read and not kept because `--max-size` was reached.
    pub cut: u64,
}

/// A running per-CPU reader.
#[derive(Debug)]
pub struct CpuStream {
    pub cpu: u32,
    pub shared: Arc<StreamShared>,
    pub data_path: PathBuf,
    handle: JoinHandle<StreamOutcome>,
}

impl CpuStream {
    /// Opens `fifo` for reading right away (so the guest never writes into a FIFO nobody
    /// reads) and starts the thread that fills `data_path`.
    /// `budget` is the run's `--max-size`, shared with the other CPUs' streams.
    pub fn start(
        cpu: u32,
        fifo: &Path,
        data_path: &Path,
        nonce: u64,
        budget: Option<Arc<ByteBudget>>,
    ) -> io::Result<CpuStream> {
        let fifo_file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(fifo)?;
        // Best effort: a kernel that refuses keeps its default and we only wake up more.
        let _ = nix::fcntl::fcntl(&fifo_file, nix::fcntl::FcntlArg::F_SETPIPE_SZ(FIFO_BUFFER));
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(data_path)?;
        let shared = Arc::new(StreamShared::with_budget(budget));
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name(format!("collect-cpu{cpu}"))
            .spawn(move || collect_stream(cpu, &fifo_file, &out, nonce, &thread_shared))?;
        Ok(CpuStream {
            cpu,
            shared,
            data_path: data_path.to_path_buf(),
            handle,
        })
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    pub fn join(self) -> StreamOutcome {
        let cpu = self.cpu;
        let received = self.shared.received.load(Ordering::SeqCst);
        self.handle.join().unwrap_or_else(|_| StreamOutcome {
            cpu,
            received,
            complete: false,
            error: Some(io::Error::other("collector thread panicked")),
            excess: 0,
            cut: 0,
        })
    }
}

/// The body of a stream's thread: collect, and on a write failure keep draining so the guest
/// never stalls.
fn collect_stream(
    cpu: u32,
    fifo: &File,
    out: &File,
    nonce: u64,
    shared: &StreamShared,
) -> StreamOutcome {
    let mut outcome = StreamOutcome {
        cpu,
        received: 0,
        complete: false,
        error: None,
        excess: 0,
        cut: 0,
    };
    match run(cpu, fifo, out, nonce, shared) {
        Ok(complete) => outcome.complete = complete,
        Err(e) => {
            // Keep reading (and dropping) so the guest's writer never stalls on a FIFO
            // nobody reads, e.g. when the host's disk is full.
            shared.failed.store(true, Ordering::SeqCst);
            discard_until_done(fifo, shared);
            outcome.error = Some(e);
        }
    }
    outcome.received = shared.received.load(Ordering::SeqCst);
    outcome.excess = shared.excess.load(Ordering::SeqCst);
    outcome.cut = shared.cut.load(Ordering::SeqCst);
    outcome
}

/// Returns Ok(true) when the target was reached, Ok(false) when cancelled first.
fn run(cpu: u32, fifo: &File, out: &File, nonce: u64, shared: &StreamShared) -> io::Result<bool> {
    // Phase 1: find the marker. Keep the last LEN-1 bytes in case it spans two reads.
    let mut window: Vec<u8> = Vec::with_capacity(SEEK_READ + StreamMarker::LEN);
    let mut buf = vec![0u8; SEEK_READ];
    loop {
        if shared.cancel.load(Ordering::SeqCst) {
            return Ok(false);
        }
        if shared.target() == Some(0) {
            // The agent sent nothing on this CPU (not even the marker is required then).
            return Ok(true);
        }
        let n = match read_some(fifo, &mut buf)? {
            Some(n) => n,
            None => continue,
        };
        window.extend_from_slice(&buf[..n]);
        if let Some(at) = StreamMarker::find(&window, nonce, cpu) {
            shared.discarded.fetch_add(at as u64, Ordering::SeqCst);
            shared.synced.store(true, Ordering::SeqCst);
            let tail = &window[at + StreamMarker::LEN..];
            shared
                .consumed
                .fetch_add(tail.len() as u64, Ordering::SeqCst);
            let granted = match &shared.budget {
                Some(b) => usize::try_from(b.reserve(tail.len() as u64)).unwrap_or(0),
                None => tail.len(),
            };
            write_all_fd(out, &tail[..granted])?;
            shared.received.fetch_add(granted as u64, Ordering::SeqCst);
            shared
                .cut
                .fetch_add((tail.len() - granted) as u64, Ordering::SeqCst);
            break;
        }
        let keep = StreamMarker::LEN - 1;
        if window.len() > keep {
            let drop = window.len() - keep;
            shared.discarded.fetch_add(drop as u64, Ordering::SeqCst);
            window.drain(..drop);
        }
    }
    drop(window);
    drop(buf);

    // Phase 2: splice until the target, storing what the limits allow and reading (so the
    // guest never stalls) but not storing the rest.
    let pipe = SplicePipe::new(1 << 20)?;
    let null = OpenOptions::new().write(true).open("/dev/null")?;
    loop {
        let received = shared.received.load(Ordering::SeqCst);
        let consumed = shared.consumed();
        if let Some(target) = shared.target() {
            if received > target {
                // More than the agent said it sent: keep exactly its count.
                out.set_len(target)?;
                shared.excess.fetch_add(received - target, Ordering::SeqCst);
                shared.received.store(target, Ordering::SeqCst);
                return Ok(true);
            }
            if consumed >= target {
                return Ok(true);
            }
        }
        if shared.cancel.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let want = match shared.target() {
            Some(t) => t - consumed,
            None => u64::MAX,
        }
        .min(u64::try_from(pipe.capacity()).unwrap_or(u64::MAX));
        let room = shared
            .limit
            .load(Ordering::SeqCst)
            .saturating_sub(received)
            .min(want);
        let granted = match &shared.budget {
            Some(b) => b.reserve(room),
            None => room,
        };
        let (max, store) = if granted > 0 {
            (granted, true)
        } else {
            (want, false)
        };
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let pulled = pipe.pull(fifo, max, true);
        let n = match pulled {
            Ok(Pulled::Bytes(n)) => n,
            _ => 0,
        };
        let n64 = n as u64;
        if store {
            if let Some(b) = &shared.budget {
                b.give_back(granted - n64);
            }
        }
        match pulled? {
            Pulled::Bytes(_) => {
                shared.consumed.fetch_add(n64, Ordering::SeqCst);
                if store {
                    pipe.push_all(out, n)?;
                    shared.received.fetch_add(n64, Ordering::SeqCst);
                    // Still recording and the data trickles: let it gather. After Stop the
                    // drain goes at full speed.
                    if n < SMALL_BATCH && shared.target().is_none() {
                        std::thread::sleep(BATCH_WAIT);
                    }
                } else {
                    pipe.push_all(&null, n)?;
                    let over_limit = shared.limit.load(Ordering::SeqCst) <= received;
                    let counter = if over_limit {
                        &shared.excess
                    } else {
                        &shared.cut
                    };
                    counter.fetch_add(n64, Ordering::SeqCst);
                }
            }
            Pulled::WouldBlock | Pulled::Eof => {
                wait_readable(fifo.as_fd(), Duration::from_millis(POLL_MS))?
            }
        }
    }
}

/// After a failure: reads and drops the rest of the stream (until the agent's count, or a
/// cancel) so that the guest's pump can finish.
fn discard_until_done(fifo: &File, shared: &StreamShared) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if shared.cancel.load(Ordering::SeqCst) {
            return;
        }
        let seen = shared.consumed.load(Ordering::SeqCst) + shared.dropped.load(Ordering::SeqCst);
        if shared.target().is_some_and(|t| seen >= t) {
            return;
        }
        match read_some(fifo, &mut buf) {
            Ok(Some(n)) => {
                shared.dropped.fetch_add(n as u64, Ordering::SeqCst);
            }
            Ok(None) => {}
            Err(_) => return,
        }
    }
}

/// One non-blocking read, after waiting briefly for data. None: nothing yet.
fn read_some(fifo: &File, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match nix::unistd::read(fifo.as_fd(), buf) {
        Ok(0) => {
            // No writer (QEMU not running yet): wait like for no data.
            wait_readable(fifo.as_fd(), Duration::from_millis(POLL_MS))?;
            Ok(None)
        }
        Ok(n) => Ok(Some(n)),
        Err(Errno::EAGAIN) | Err(Errno::EINTR) => {
            wait_readable(fifo.as_fd(), Duration::from_millis(POLL_MS))?;
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn fifo_pair(dir: &Path) -> (PathBuf, File) {
        let p = dir.join("f.out");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Like QEMU: the writer holds the FIFO read-write, so readers never see EOF.
        let w = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        (p, w)
    }

    #[test]
    fn stale_bytes_before_the_marker_are_discarded_and_the_target_is_exact() {
        let tmp = tempfile::tempdir().unwrap();
        let (fifo, mut writer) = fifo_pair(tmp.path());
        let data = tmp.path().join("cpu0.data");
        let stream = CpuStream::start(0, &fifo, &data, 42, None).unwrap();

        let stale = vec![0xAAu8; 1000];
        let old_marker = StreamMarker {
            stream_nonce: 41,
            cpu: 0,
            page_size: 4096,
        }
        .to_bytes();
        let marker = StreamMarker {
            stream_nonce: 42,
            cpu: 0,
            page_size: 4096,
        }
        .to_bytes();
        let pages: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 253) as u8).collect();
        writer.write_all(&stale).unwrap();
        writer.write_all(&old_marker).unwrap();
        writer.write_all(&marker).unwrap();
        writer.write_all(&pages).unwrap();
        // Bytes beyond the agent's count (here already in the FIFO) must not be kept.
        writer.write_all(b"beyond the count").unwrap();
        stream.shared.set_target(pages.len() as u64);
        let shared = Arc::clone(&stream.shared);

        let outcome = stream.join();
        assert!(outcome.complete, "{outcome:?}");
        assert_eq!(outcome.received, pages.len() as u64);
        assert_eq!(std::fs::read(&data).unwrap(), pages);
        // Read along with the pages (then cut) or never read at all, depending on timing.
        assert!([0, 16].contains(&shared.excess.load(Ordering::SeqCst)));
        assert_eq!(shared.discarded.load(Ordering::SeqCst), 1000 + 32);
    }

    #[test]
    fn a_full_disk_fails_the_stream_but_it_is_still_drained_to_the_count() {
        let tmp = tempfile::tempdir().unwrap();
        let (fifo, mut writer) = fifo_pair(tmp.path());
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let shared = Arc::new(StreamShared::default());
        let marker = StreamMarker {
            stream_nonce: 9,
            cpu: 0,
            page_size: 4096,
        }
        .to_bytes();
        let pages = vec![7u8; 8 * 4096];
        shared.set_target(pages.len() as u64);
        let thread_shared = Arc::clone(&shared);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(collect_stream(0, &reader, &full, 9, &thread_shared));
        });

        writer.write_all(&marker).unwrap();
        for page in pages.chunks(4096) {
            // Would block for ever if the failed stream stopped reading.
            writer.write_all(page).unwrap();
        }
        let outcome = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the failed stream must finish once the agent's count is drained");

        assert!(outcome.error.is_some(), "{outcome:?}");
        assert!(shared.failed.load(Ordering::SeqCst));
        assert!(!outcome.complete);
    }

    #[test]
    fn cancel_keeps_what_arrived() {
        let tmp = tempfile::tempdir().unwrap();
        let (fifo, mut writer) = fifo_pair(tmp.path());
        let data = tmp.path().join("cpu1.data");
        let stream = CpuStream::start(1, &fifo, &data, 7, None).unwrap();
        writer
            .write_all(
                &StreamMarker {
                    stream_nonce: 7,
                    cpu: 1,
                    page_size: 4096,
                }
                .to_bytes(),
            )
            .unwrap();
        writer.write_all(&[1u8; 4096]).unwrap();
        while stream.shared.received.load(Ordering::SeqCst) < 4096 {
            std::thread::sleep(Duration::from_millis(10));
        }
        stream.shared.cancel.store(true, Ordering::SeqCst);
        let outcome = stream.join();
        assert!(!outcome.complete);
        assert_eq!(std::fs::read(&data).unwrap().len(), 4096);
    }
}
