//! Every bound of the wire protocol in one place.
//!
//! Readers check each length and count they read against these numbers before
//! they allocate, and writers refuse to exceed them, so both sides agree on what
//! a well-formed frame is. The numbers are part of the protocol (see
//! `docs/protocol.md`, "Limits"): changing one is a protocol change.

/// Largest frame payload. Bounds a receiver's buffer to header + this.
pub const MAX_PAYLOAD: u32 = 1024 * 1024;

/// Largest `Metadata.data`. Small enough that a `Ping` is never stuck behind
/// megabytes of `kallsyms`.
pub const METADATA_CHUNK: usize = 64 * 1024;

/// Largest single metadata file: the largest of the per-kind caps below.
pub const MAX_METADATA_FILE: u64 = MAX_SYMBOL_METADATA;

/// Largest sum of all metadata files of one recording, kept in host memory. A Debian
/// kernel's `kallsyms` is ~5 MiB and its ~2 300 event formats ~2 MiB.
pub const MAX_METADATA_TOTAL: u64 = 64 * 1024 * 1024;

/// Largest `kallsyms`, `printk_formats`, `saved_cmdlines` or `saved_tgids` (big distribution
/// kernels with many modules reach ~15 MiB of `kallsyms`).
pub const MAX_SYMBOL_METADATA: u64 = 32 * 1024 * 1024;

/// Largest event `format` file, and `header_page`/`header_event`: the largest real one is
/// ~5.5 KiB. The trace.dat reader uses the same cap.
pub const MAX_EVENT_FORMAT: u64 = 64 * 1024;

/// Largest `uname` or `trace_clock`.
pub const MAX_SMALL_METADATA: u64 = 4096;

/// Most metadata files in one recording: every resolved event's format, the `ftrace`
/// system's formats, and the fixed files.
pub const MAX_METADATA_FILES: usize = MAX_RESOLVED_EVENTS + 256;

/// Most problem notes the host keeps about one recording (it counts them all).
pub const MAX_GUEST_PROBLEMS: usize = 20;

/// What a guest may still send on one CPU's stream after the host's `Stop`, beyond its ring
/// buffer (`Started.buffer_kb`): the agent's pipe and the virtio-serial queue in flight.
pub const DRAIN_SLACK: u64 = 8 * 1024 * 1024;

/// Most entries in `RecordRequest.events`.
pub const MAX_EVENTS_PER_REQUEST: usize = 1024;

/// Most entries in `Started.events`: globs expand, and kernels have ~3 000 events.
pub const MAX_RESOLVED_EVENTS: usize = 8192;

/// Most entries in `RecordRequest.command` (argv).
pub const MAX_COMMAND_ARGS: usize = 256;

/// Most CPUs in any list of CPUs.
pub const MAX_CPUS: usize = 1024;

/// Most entries in `HelloReply.trace_clocks`.
pub const MAX_CLOCKS: usize = 64;

/// Sanity cap on a per-CPU buffer size request: 4 GiB in KiB. Checked by the agent.
pub const MAX_BUFFER_KB: u32 = 4 * 1024 * 1024;

/// Cap on identifiers: event, clock, instance and metadata names, version strings.
pub const MAX_NAME: usize = 256;

/// Cap on free text: `Error.text`, `Started.note`, `CpuStopped.stats_text`.
pub const MAX_TEXT: usize = 4096;

/// Largest `CommandOutput.data` (version 4).
pub const COMMAND_OUTPUT_CHUNK: usize = 16 * 1024;

/// Most bytes of command output the agent relays for one recording (version 4); beyond
/// this it reads and drops the output, and says so once on the command's stderr stream.
pub const MAX_COMMAND_OUTPUT: u64 = 64 * 1024 * 1024;

/// Cap on any other string field (command arguments).
pub const MAX_STRING: usize = 64 * 1024;
