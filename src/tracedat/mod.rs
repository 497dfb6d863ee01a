//! trace.dat files: the version-6 writer, a bounded reader and the ring-buffer page parser.
//!
//! The host turns what a guest sent (its tracefs metadata plus the raw pages of every CPU's
//! `trace_pipe_raw`) into one `trace.dat` that `trace-cmd report` and KernelShark open. The
//! writer copies the per-CPU page files into the output with `copy_file_range`, so page data
//! never passes through user space. The reader parses the files we write, bounding every length
//! by the file size and by fixed caps, so a corrupt file is an error and never a huge allocation
//! or a panic. The page parser walks raw ring-buffer pages as the guest's `events/header_page`
//! and `events/header_event` describe them, to count events and lost events and to find
//! timestamps.
//!
//! The byte layout, the options we write and how we count events are drawn in
//! `docs/trace-format.md`; in short:
//!
//! ```text
//! 17 08 44 "tracing" "6\0" endian(1) sizeof_long(1) page_size(u32)
//! "header_page\0" u64 len text      "header_event\0" u64 len text
//! u32 n {u64 len, ftrace format}    u32 n {name\0, u32 n {u64 len, event format}}
//! u32 len kallsyms   u32 len printk_formats   u64 len saved_cmdlines   u32 ncpus
//! "options  \0" {u16 id, u32 size, data}... u16 0
//! "flyrecord\0" ncpus x {u64 offset, u64 size}   [u64 len trace_clock, if option 4]
//! zero padding to a page boundary, then every CPU's raw pages, page aligned
//! ```

mod count;
mod format;
mod page;
mod reader;
mod reader_v7;
pub mod sanitize;
mod sync_options;
mod writer;
#[cfg(feature = "tracedat-v7")]
pub mod writer_v7;

pub use count::EventCounts;
pub use format::{parse_event_format, EventFormat, EventNames, FieldFormat};
pub use page::{MissedEvents, Page, PageError, PageIter, PageLayout, RawEvent};
pub use reader::{CpuPages, TraceDatFile};
pub use sync_options::{GuestOption, SyncOptionError, TimeSample, TimeShift, Tsc2Nsec};
pub use writer::{write_trace_dat, CpuData, WriteSummary};
#[cfg(feature = "tracedat-v7")]
pub use writer_v7::{write_trace_dat_v7, Compression};

use std::io;

/// The first bytes of every trace.dat file, before the version string.
pub const MAGIC: &[u8; 10] = b"\x17\x08\x44tracing";

/// Option ids of trace-cmd's `enum tracecmd_file_options` that we write or recognise.
pub mod option_id {
    /// Ends the option list.
    pub const DONE: u16 = 0;
    /// Offset between trace clock and wall clock (we never write it).
    pub const DATE: u16 = 1;
    /// One `per_cpu/cpuN/stats` text per CPU.
    pub const CPUSTAT: u16 = 2;
    /// The guest's `trace_clock` text; its copy also follows the flyrecord table in v6.
    pub const TRACECLOCK: u16 = 4;
    /// `uname` of the traced machine.
    pub const UNAME: u16 = 5;
    /// u64 id that a host file's GUEST option refers to.
    pub const TRACEID: u16 = 11;
    /// Guest file: how its raw timestamps map onto the host's clock.
    pub const TIME_SHIFT: u16 = 12;
    /// Host file: a guest's trace id and the host thread of each of its vCPUs.
    pub const GUEST: u16 = 13;
    /// TSC cycles to nanoseconds (mult, shift).
    pub const TSC2NSEC: u16 = 14;
}

/// Smallest and largest page size we accept. Every architecture Linux runs on has pages of at
/// least 4 KiB; the kernel caps ring-buffer sub-buffers far below 64 MiB.
pub const MIN_PAGE_SIZE: u32 = 4096;
/// See [`MIN_PAGE_SIZE`].
pub const MAX_PAGE_SIZE: u32 = 64 << 20;

/// Most CPUs a file may have; Linux's own limit (`NR_CPUS`) is 8192 on common configurations.
pub const MAX_CPUS: usize = 1 << 16;

/// Largest option payload the reader accepts, and so the writer writes.
pub const MAX_OPTION_SIZE: u64 = 1 << 24;

/// Everything of a trace.dat besides the per-CPU pages: the guest's tracefs metadata.
///
/// Texts are the exact bytes of the tracefs files. A CPU count is not stored here: it is the
/// number of per-CPU data blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceMeta {
    /// Size of one ring-buffer page (sub-buffer) of the guest, a power of two.
    pub page_size: u32,
    /// The guest's `events/header_page` text. Required: without it `trace-cmd report` prints no
    /// events at all, and no error.
    pub header_page: Vec<u8>,
    /// The guest's `events/header_event` text.
    pub header_event: Vec<u8>,
    /// `events/ftrace/*/format` texts.
    pub ftrace_formats: Vec<Vec<u8>>,
    /// System name → `format` texts of its enabled events, in the order they are written.
    pub event_systems: Vec<(String, Vec<Vec<u8>>)>,
    /// `/proc/kallsyms` text (may be empty: then report shows no symbol names).
    pub kallsyms: Vec<u8>,
    /// `printk_formats` text (may be empty).
    pub printk_formats: Vec<u8>,
    /// `saved_cmdlines` text (may be empty: then report shows no process names).
    pub saved_cmdlines: Vec<u8>,
    /// `"sysname nodename release machine"` of the guest, as `trace-cmd record` writes it.
    pub uname: Option<String>,
    /// The guest's `trace_clock` text, e.g. `"[local] global counter uptime perf ...\n"`.
    pub trace_clock: Option<String>,
    /// Id that a host trace.dat's GUEST option refers to.
    pub trace_id: Option<u64>,
    /// `per_cpu/cpuN/stats` texts: empty, or exactly one per CPU in CPU order.
    pub cpu_stats: Vec<String>,
    /// Host file: one GUEST option per guest (its file's trace id, the host thread of each
    /// vCPU), each with a different trace id, none equal to `trace_id`.
    pub guests: Vec<GuestOption>,
    /// Guest file: the TIME_SHIFT option that maps its raw timestamps onto the host's raw
    /// clock; it must have one sample list per CPU of the file.
    pub time_shift: Option<TimeShift>,
    /// Host and guest files on the `x86-tsc` clock: the TSC2NSEC option (cycles to ns).
    pub tsc2nsec: Option<Tsc2Nsec>,
}

/// Where one CPU's pages sit in a trace.dat file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuExtent {
    /// Absolute file offset of the first page (a multiple of the page size).
    pub offset: u64,
    /// Bytes of pages, a multiple of the page size; 0 for a CPU without data.
    pub size: u64,
}

/// Why reading or writing a trace.dat, or parsing a page, failed.
#[derive(Debug, thiserror::Error)]
pub enum TraceDatError {
    /// A system call on a file failed; `action` says what we were doing.
    #[error("cannot {action}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
    /// The metadata handed to the writer cannot make a readable file.
    #[error("invalid trace metadata: {0}")]
    InvalidMeta(String),
    /// A CPU's data is not made of whole pages.
    #[error(
        "CPU {cpu}: {len} bytes of ring-buffer data is not a multiple of the page size \
         {page_size}: pass whole pages as trace_pipe_raw returns them"
    )]
    PartialPage {
        cpu: usize,
        len: u64,
        page_size: u32,
    },
    /// A CPU's data file held fewer bytes than its announced length.
    #[error("CPU {cpu}: its data file ended after {copied} of the announced {len} bytes")]
    ShortCpuData { cpu: usize, copied: u64, len: u64 },
    /// The file is not a trace.dat, or a length or count in it is impossible.
    #[error("corrupt trace.dat at byte {offset}: {what}")]
    Corrupt { offset: u64, what: String },
    /// A valid trace.dat of a kind we do not read (version 7, big endian, ...).
    #[error("unsupported trace.dat: {0}")]
    Unsupported(String),
    /// The guest's `events/header_page` text does not describe a page we can read.
    #[error("cannot use events/header_page: {0}")]
    HeaderPage(String),
    /// The guest's `events/header_event` text does not describe the event header we know.
    #[error("cannot use events/header_event: {0}")]
    HeaderEvent(String),
    /// A ring-buffer page is corrupt.
    #[error("ring-buffer page {page} is corrupt")]
    Page {
        page: u64,
        #[source]
        source: PageError,
    },
    /// An event `format` text lacks its name or id.
    #[error("cannot parse event format: {0}")]
    EventFormat(String),
    /// A GUEST, TIME_SHIFT or TSC2NSEC option handed to the writer cannot be written as is.
    #[error("invalid host/guest option")]
    SyncOption(#[from] SyncOptionError),
}

impl TraceDatError {
    pub(crate) fn io(action: impl Into<String>, source: io::Error) -> Self {
        TraceDatError::Io {
            action: action.into(),
            source,
        }
    }
}
