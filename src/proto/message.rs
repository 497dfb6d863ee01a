//! The control messages: one struct per message kind, and their payload layout.
//!
//! Each struct's `encode`/`decode` is the single definition of its wire layout
//! (field order and caps as tabled in `docs/protocol.md` §4). [`Message`] ties a
//! struct to its [`MessageKind`] and builds complete frames.

use super::codec::{Decoder, Encoder};
use super::error::ProtoError;
use super::frame::FrameHeader;
use super::limits::{
    COMMAND_OUTPUT_CHUNK, MAX_CLOCKS, MAX_COMMAND_ARGS, MAX_CPUS, MAX_EVENTS_PER_REQUEST, MAX_NAME,
    MAX_PAYLOAD, MAX_RESOLVED_EVENTS, MAX_STRING, MAX_TEXT, METADATA_CHUNK,
};

/// Message kind numbers, the `kind` field of the frame header.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// Never sent; a zero kind is treated as unknown.
    Invalid = 0,
    Hello = 1,
    HelloReply = 2,
    RecordRequest = 3,
    Started = 4,
    Metadata = 5,
    Stop = 6,
    Stopped = 7,
    Error = 8,
    Ping = 9,
    Pong = 10,
    Close = 11,
    /// Version 2.
    SyncProbe = 12,
    /// Version 2.
    SyncReply = 13,
    /// Version 3.
    ServeReady = 14,
    /// Version 3.
    RecordOffer = 15,
    /// Version 3.
    OfferAnswer = 16,
    /// Version 3.
    RecordDone = 17,
    /// Version 4.
    CommandOutput = 18,
}

impl MessageKind {
    /// Kinds whose layout never changes, so they decode at any header version
    /// (a failed negotiation must still be reportable).
    pub fn is_frozen(self) -> bool {
        matches!(self, Self::Hello | Self::Error)
    }

    /// The protocol version that introduced this kind: a frame of an older version carrying
    /// it is an unknown kind.
    pub fn since(self) -> u16 {
        match self {
            Self::SyncProbe | Self::SyncReply => 2,
            Self::ServeReady | Self::RecordOffer | Self::OfferAnswer | Self::RecordDone => 3,
            Self::CommandOutput => 4,
            _ => 1,
        }
    }
}

impl TryFrom<u16> for MessageKind {
    type Error = ProtoError;

    fn try_from(kind: u16) -> Result<Self, ProtoError> {
        Ok(match kind {
            0 => Self::Invalid,
            1 => Self::Hello,
            2 => Self::HelloReply,
            3 => Self::RecordRequest,
            4 => Self::Started,
            5 => Self::Metadata,
            6 => Self::Stop,
            7 => Self::Stopped,
            8 => Self::Error,
            9 => Self::Ping,
            10 => Self::Pong,
            11 => Self::Close,
            12 => Self::SyncProbe,
            13 => Self::SyncReply,
            14 => Self::ServeReady,
            15 => Self::RecordOffer,
            16 => Self::OfferAnswer,
            17 => Self::RecordDone,
            18 => Self::CommandOutput,
            _ => return Err(ProtoError::UnknownKind { kind }),
        })
    }
}

impl From<MessageKind> for u16 {
    fn from(kind: MessageKind) -> u16 {
        kind as u16
    }
}

/// Strings in lists are at least their 4-byte length.
const MIN_STRING: usize = 4;
const MIN_U32: usize = 4;

/// Host → agent, first message of a session. Frozen layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// Sender's name and version, for logs.
    pub software: String,
    /// Echoed by `HelloReply`, so replies meant for an earlier connection can be
    /// told apart after a reconnect.
    pub nonce: u64,
}

impl Hello {
    fn encode(&self, e: &mut Encoder) -> Result<(), ProtoError> {
        e.u16(self.min_version);
        e.u16(self.max_version);
        e.str("hello.software", &self.software, MAX_NAME)?;
        e.u64(self.nonce);
        Ok(())
    }

    fn decode(d: &mut Decoder) -> Result<Self, ProtoError> {
        Ok(Self {
            min_version: d.u16("hello.min_version")?,
            max_version: d.u16("hello.max_version")?,
            software: d.string("hello.software", MAX_NAME)?,
            nonce: d.u64("hello.nonce")?,
        })
    }
}

/// Agent → host, answer to `Hello`: the chosen version and what the guest offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    pub version: u16,
    pub nonce: u64,
    pub agent_version: String,
    pub kernel_release: String,
    /// Online CPUs.
    pub cpus: u32,
    pub page_size: u32,
    pub trace_clocks: Vec<String>,
    /// CPU numbers whose `trace-path-cpuN` port the agent found.
    pub data_ports: Vec<u32>,
}

impl HelloReply {
    fn encode(&self, e: &mut Encoder) -> Result<(), ProtoError> {
        e.u16(self.version);
        e.u64(self.nonce);
        e.str("hello_reply.agent_version", &self.agent_version, MAX_NAME)?;
        e.str("hello_reply.kernel_release", &self.kernel_release, MAX_NAME)?;
        e.u32(self.cpus);
        e.u32(self.page_size);
        e.list(
            "hello_reply.trace_clocks",
            &self.trace_clocks,
            MAX_CLOCKS,
            |e, s| e.str("hello_reply.trace_clocks[]", s, MAX_NAME),
        )?;
        e.list(
            "hello_reply.data_ports",
            &self.data_ports,
            MAX_CPUS,
            |e, &c| {
                e.u32(c);
                Ok(())
            },
        )
    }

    fn decode(d: &mut Decoder) -> Result<Self, ProtoError> {
        Ok(Self {
            version: d.u16("hello_reply.version")?,
            nonce: d.u64("hello_reply.nonce")?,
            agent_version: d.string("hello_reply.agent_version", MAX_NAME)?,
            kernel_release: d.string("hello_reply.kernel_release", MAX_NAME)?,
            cpus: d.u32("hello_reply.cpus")?,
            page_size: d.u32("hello_reply.page_size")?,
            trace_clocks: d.list("hello_reply.trace_clocks", MAX_CLOCKS, MIN_STRING, |d| {
                d.string("hello_reply.trace_clocks[]", MAX_NAME)
            })?,
            data_ports: d.list("hello_reply.data_ports", MAX_CPUS, MIN_U32, |d| {
                d.u32("hello_reply.data_ports[]")
            })?,
        })
    }
}

/// Host → agent: start a recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRequest {
    /// trace-cmd `-e` forms: `sched`, `sched:sched_switch`, `sched_switch`, globs.
    pub events: Vec<String>,
    /// Per-CPU buffer size; `None` keeps the kernel's.
    pub buffer_kb: Option<u32>,
    /// Trace clock; `None` means `local`.
    pub clock: Option<String>,
    /// Command to run while recording (argv); empty = none.
    pub command: Vec<String>,
    /// Written into every data stream's marker.
    pub stream_nonce: u64,
}

impl RecordRequest {
    fn encode(&self, e: &mut Encoder) -> Result<(), ProtoError> {
        e.list(
            "record.events",
            &self.events,
            MAX_EVENTS_PER_REQUEST,
            |e, s| e.str("record.events[]", s, MAX_NAME),
        )?;
        e.option(self.buffer_kb.as_ref(), |e, &kb| {
            e.u32(kb);
            Ok(())
        })?;
        e.option(self.clock.as_deref(), |e, s| {
            e.str("record.clock", s, MAX_NAME)
        })?;
        e.list("record.command", &self.command, MAX_COMMAND_ARGS, |e, s| {
            e.str("record.command[]", s, MAX_STRING)
        })?;
        e.u64(self.stream_nonce);
        Ok(())
    }

    fn decode(d: &mut Decoder) -> Result<Self, ProtoError> {
        Ok(Self {
            events: d.list("record.events", MAX_EVENTS_PER_REQUEST, MIN_STRING, |d| {
                d.string("record.events[]", MAX_NAME)
            })?,
            buffer_kb: d.option("record.buffer_kb", |d| d.u32("record.buffer_kb"))?,
            clock: d.option("record.clock", |d| d.string("record.clock", MAX_NAME))?,
            command: d.list("record.command", MAX_COMMAND_ARGS, MIN_STRING, |d| {
                d.string("record.command[]", MAX_STRING)
            })?,
            stream_nonce: d.u64("record.stream_nonce")?,
        })
    }
}

/// Agent → host: the recording runs, with these settings in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub instance: String,
    /// Enabled events, resolved to `system:event`.
    pub events: Vec<String>,
    pub cpus: Vec<u32>,
    pub buffer_kb: u32,
    pub clock: String,
    /// False when the agent fell back to read/write copies.
    pub splice: bool,
    /// Free text for the user, e.g. why splice fell back.
    pub note: String,
}

impl Started {
    fn encode(&self, e: &mut Encoder) -> Result<(), ProtoError> {
        e.str("started.instance", &self.instance, MAX_NAME)?;
        e.list(
            "started.events",
            &self.events,
            MAX_RESOLVED_EVENTS,
            |e, s| e.str("started.events[]", s, MAX_NAME),
        )?;
        e.list("started.cpus", &self.cpus, MAX_CPUS, |e, &c| {
            e.u32(c);
            Ok(())
        })?;
        e.u32(self.buffer_kb);
        e.str("started.clock", &self.clock, MAX_NAME)?;
        e.bool(self.splice);
        e.str("started.note", &self.note, MAX_TEXT)
    }

    fn decode(d: &mut Decoder) -> Result<Self, ProtoError> {
        Ok(Self {
            instance: d.string("started.instance", MAX_NAME)?,
            events: d.list("started.events", MAX_RESOLVED_EVENTS, MIN_STRING, |d| {
                d.string("started.events[]", MAX_NAME)
            })?,
            cpus: d.list("started.cpus", MAX_CPUS, MIN_U32, |d| {
                d.u32("started.cpus[]")
            })?,
            buffer_kb: d.u32("started.buffer_kb")?,
            clock: d.string("started.clock", MAX_NAME)?,
            splice: d.bool("started.splice")?,
            note: d.string("started.note", MAX_TEXT)?,
        })
    }
}

/// Agent → host: one chunk of a named guest file (see `metadata.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub name: String,
    /// Size of the whole file, the same in every chunk.
    pub total_len: u64,
    /// Where `data` starts in the file.
    pub offset: u64,
    pub data: Vec<u8>,
}

impl Metadata {
    fn encode(&self, e: &mut Encoder) -> Result<(), ProtoError> {
        e.str("metadata.name", &self.name, MAX_NAME)?;
        e.u64(self.total_len);
        e.u64(self.offset);
        e.bytes("metadata.data", &self.data, METADATA_CHUNK)
    }

    fn decode(d: &mut Decoder) -> Result<Self, ProtoError> {
        Ok(Self {
            name: d.string("metadata.name", MAX_NAME)?,
            total_len: d.u64("metadata.total_len")?,
            offset: d.u64("metadata.offset")?,
            data: d.bytes("metadata.data", METADATA_CHUNK)?,
        })
    }
}

/// Why a recording ended.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The host sent `Stop`.
    HostRequest = 1,
    /// The command given in `RecordRequest` exited.
    CommandExited = 2,
    /// The agent failed; an `Error` came first.
    AgentError = 3,
    /// The control connection dropped or a new `Hello` arrived.
    HostGone = 4,
    /// Version 3: the guest's `tvctl-agent record` ended the recording it offered.
    GuestRequest = 5,
}

impl TryFrom<u8> for StopReason {
    type Error = ProtoError;

    fn try_from(v: u8) -> Result<Self, ProtoError> {
        Ok(match v {
            1 => Self::HostRequest,
            2 => Self::CommandExited,
            3 => Self::AgentError,
            4 => Self::HostGone,
            5 => Self::GuestRequest,
            _ => {
                return Err(ProtoError::BadField {
                    what: "stopped.reason",
                })
            }
        })
    }
}

/// Final numbers of one CPU's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuStopped {
    pub cpu: u32,
    /// Exact bytes written to the CPU's data stream after the marker: the host
    /// reads this many, since it never sees end-of-file on QEMU's FIFO.
    pub bytes: u64,
    pub entries: u64,
    pub overrun: u64,
    pub commit_overrun: u64,
    pub dropped_events: u64,
    pub read_events: u64,
    /// `per_cpu/cpuN/stats` verbatim.
    pub stats_text: String,
}

impl CpuStopped {
    /// Smallest encoding: seven integers and an empty string.
    pub const MIN_ENCODED_LEN: usize = 4 + 6 * 8 + 4;

    fn encode(&self, e: &mut Encoder) -> Result<(), ProtoError> {
        e.u32(self.cpu);
        e.u64(self.bytes);
        e.u64(self.entries);
        e.u64(self.overrun);
        e.u64(self.commit_overrun);
        e.u64(self.dropped_events);
        e.u64(self.read_events);
        e.str("cpu_stopped.stats_text", &self.stats_text, MAX_TEXT)
    }

    fn decode(d: &mut Decoder) -> Result<Self, ProtoError> {
        Ok(Self {
            cpu: d.u32("cpu_stopped.cpu")?,
            bytes: d.u64("cpu_stopped.bytes")?,
            entries: d.u64("cpu_stopped.entries")?,
            overrun: d.u64("cpu_stopped.overrun")?,
            commit_overrun: d.u64("cpu_stopped.commit_overrun")?,
            dropped_events: d.u64("cpu_stopped.dropped_events")?,
            read_events: d.u64("cpu_stopped.read_events")?,
            stats_text: d.string("cpu_stopped.stats_text", MAX_TEXT)?,
        })
    }
}

/// Agent → host: the recording is over; the last message about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    pub reason: StopReason,
    /// Exit code 0..=255, or `-signal` if a signal killed the command; `None`
    /// when no command ran.
    pub command_status: Option<i32>,
    pub cpus: Vec<CpuStopped>,
}

impl Stopped {
    fn encode(&self, e: &mut Encoder) -> Result<(), ProtoError> {
        e.u8(self.reason as u8);
        e.option(self.command_status.as_ref(), |e, &s| {
            e.i32(s);
            Ok(())
        })?;
        e.list("stopped.cpus", &self.cpus, MAX_CPUS, |e, c| c.encode(e))
    }

    fn decode(d: &mut Decoder) -> Result<Self, ProtoError> {
        Ok(Self {
            reason: StopReason::try_from(d.u8("stopped.reason")?)?,
            command_status: d.option("stopped.command_status", |d| {
                d.i32("stopped.command_status")
            })?,
            cpus: d.list(
                "stopped.cpus",
                MAX_CPUS,
                CpuStopped::MIN_ENCODED_LEN,
                CpuStopped::decode,
            )?,
        })
    }
}

/// The code of an `Error` message. Unknown codes are kept, not rejected, so a
/// newer peer's errors still reach the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadFrame,
    UnknownKind,
    UnsupportedVersion,
    UnknownEvent,
    UnknownClock,
    BadBufferSize,
    Busy,
    Tracefs,
    Command,
    Internal,
    NotRecording,
    BadRequest,
    /// Version 3, agent → its local client: no host that takes guest recordings is connected.
    NoServe,
    /// A code this side does not know.
    Other(u32),
}

impl From<u32> for ErrorCode {
    fn from(code: u32) -> Self {
        match code {
            1 => Self::BadFrame,
            2 => Self::UnknownKind,
            3 => Self::UnsupportedVersion,
            4 => Self::UnknownEvent,
            5 => Self::UnknownClock,
            6 => Self::BadBufferSize,
            7 => Self::Busy,
            8 => Self::Tracefs,
            9 => Self::Command,
            10 => Self::Internal,
            11 => Self::NotRecording,
            12 => Self::BadRequest,
            13 => Self::NoServe,
            other => Self::Other(other),
        }
    }
}

impl From<ErrorCode> for u32 {
    fn from(code: ErrorCode) -> u32 {
        match code {
            ErrorCode::BadFrame => 1,
            ErrorCode::UnknownKind => 2,
            ErrorCode::UnsupportedVersion => 3,
            ErrorCode::UnknownEvent => 4,
            ErrorCode::UnknownClock => 5,
            ErrorCode::BadBufferSize => 6,
            ErrorCode::Busy => 7,
            ErrorCode::Tracefs => 8,
            ErrorCode::Command => 9,
            ErrorCode::Internal => 10,
            ErrorCode::NotRecording => 11,
            ErrorCode::BadRequest => 12,
            ErrorCode::NoServe => 13,
            ErrorCode::Other(code) => code,
        }
    }
}

/// Either way: a request failed, or a recording hit trouble. Frozen layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMessage {
    pub code: ErrorCode,
    /// What failed and what to do, for the user; at most `MAX_TEXT` bytes.
    pub text: String,
}

impl ErrorMessage {
    /// An error whose text is cut (at a character boundary) to `MAX_TEXT`, so a
    /// long error chain never makes the report itself unsendable.
    pub fn new(code: ErrorCode, text: impl Into<String>) -> Self {
        let mut text = text.into();
        if text.len() > MAX_TEXT {
            let mut end = MAX_TEXT;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        Self { code, text }
    }

    fn encode(&self, e: &mut Encoder) -> Result<(), ProtoError> {
        e.u32(self.code.into());
        e.str("error.text", &self.text, MAX_TEXT)
    }

    fn decode(d: &mut Decoder) -> Result<Self, ProtoError> {
        Ok(Self {
            code: ErrorCode::from(d.u32("error.code")?),
            text: d.string("error.text", MAX_TEXT)?,
        })
    }
}

/// Either way: liveness check, answered by `Pong`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ping {
    pub nonce: u64,
}

/// Answer to `Ping`, with a reading of the guest's trace clock for later
/// host/guest clock alignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pong {
    pub nonce: u64,
    pub clock: String,
    pub ts: u64,
}

impl Pong {
    fn encode(&self, e: &mut Encoder) -> Result<(), ProtoError> {
        e.u64(self.nonce);
        e.str("pong.clock", &self.clock, MAX_NAME)?;
        e.u64(self.ts);
        Ok(())
    }

    fn decode(d: &mut Decoder) -> Result<Self, ProtoError> {
        Ok(Self {
            nonce: d.u64("pong.nonce")?,
            clock: d.string("pong.clock", MAX_NAME)?,
            ts: d.u64("pong.ts")?,
        })
    }
}

/// Host → agent (version 2): a clock-sync probe. While recording, the agent writes
/// `tvctl-sync <nonce>` into the recording's `trace_marker`, reading the recording's clock just
/// before and just after; then it answers `SyncReply`. The marker's trace time thus lies in
/// `[before, after]`, which lets anyone check the host–guest sync in the merged trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncProbe {
    pub nonce: u64,
}

/// Agent → host (version 2): the answer to `SyncProbe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReply {
    pub nonce: u64,
    /// The clock read: the recording's trace clock where user space can read it (`x86-tsc`,
    /// `mono`, `mono_raw`, `boot`), else `mono` (CLOCK_MONOTONIC).
    pub clock: String,
    pub before: u64,
    pub after: u64,
    /// The marker was written (a recording runs and its clock is the one read).
    pub marked: bool,
}

impl SyncReply {
    fn encode(&self, e: &mut Encoder) -> Result<(), ProtoError> {
        e.u64(self.nonce);
        e.str("sync_reply.clock", &self.clock, MAX_NAME)?;
        e.u64(self.before);
        e.u64(self.after);
        e.bool(self.marked);
        Ok(())
    }

    fn decode(d: &mut Decoder) -> Result<Self, ProtoError> {
        Ok(Self {
            nonce: d.u64("sync_reply.nonce")?,
            clock: d.string("sync_reply.clock", MAX_NAME)?,
            before: d.u64("sync_reply.before")?,
            after: d.u64("sync_reply.after")?,
            marked: d.bool("sync_reply.marked")?,
        })
    }
}

/// Host → agent (version 3): this session's host is `tvctl serve`, which takes recordings
/// the guest starts (`RecordOffer`). Sent once, right after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeReady {
    /// Who serves, for messages in the guest: `tvctl serve 0.1.0 (pid 1234)`.
    pub host: String,
}

/// Agent → host (version 3): a user in the guest asks for a recording (`tvctl-agent record`).
/// The same message goes from `tvctl-agent record` to the agent over its local socket, with
/// `offer_id` 0; the agent numbers the offers it forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordOffer {
    pub offer_id: u64,
    /// The name the user gave (`-o`); the host sanitises it into its file name.
    pub name: String,
    pub events: Vec<String>,
    pub buffer_kb: Option<u32>,
    pub clock: Option<String>,
}

impl RecordOffer {
    fn encode(&self, e: &mut Encoder) -> Result<(), ProtoError> {
        e.u64(self.offer_id);
        e.str("record_offer.name", &self.name, MAX_NAME)?;
        e.list(
            "record_offer.events",
            &self.events,
            MAX_EVENTS_PER_REQUEST,
            |e, s| e.str("record_offer.events[]", s, MAX_NAME),
        )?;
        e.option(self.buffer_kb.as_ref(), |e, &kb| {
            e.u32(kb);
            Ok(())
        })?;
        e.option(self.clock.as_deref(), |e, s| {
            e.str("record_offer.clock", s, MAX_NAME)
        })
    }

    fn decode(d: &mut Decoder) -> Result<Self, ProtoError> {
        Ok(Self {
            offer_id: d.u64("record_offer.offer_id")?,
            name: d.string("record_offer.name", MAX_NAME)?,
            events: d.list(
                "record_offer.events",
                MAX_EVENTS_PER_REQUEST,
                MIN_STRING,
                |d| d.string("record_offer.events[]", MAX_NAME),
            )?,
            buffer_kb: d.option("record_offer.buffer_kb", |d| {
                d.u32("record_offer.buffer_kb")
            })?,
            clock: d.option("record_offer.clock", |d| {
                d.string("record_offer.clock", MAX_NAME)
            })?,
        })
    }
}

/// Host → agent (version 3), relayed to the local client: the host takes the offer (and
/// sends `RecordRequest` next) or refuses it (`text` says why and what to do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferAnswer {
    pub offer_id: u64,
    pub accepted: bool,
    /// The host file the recording will be written to (for display only); empty if refused.
    pub file: String,
    pub text: String,
}

impl OfferAnswer {
    fn encode(&self, e: &mut Encoder) -> Result<(), ProtoError> {
        e.u64(self.offer_id);
        e.bool(self.accepted);
        e.str("offer_answer.file", &self.file, MAX_TEXT)?;
        e.str("offer_answer.text", &self.text, MAX_TEXT)
    }

    fn decode(d: &mut Decoder) -> Result<Self, ProtoError> {
        Ok(Self {
            offer_id: d.u64("offer_answer.offer_id")?,
            accepted: d.bool("offer_answer.accepted")?,
            file: d.string("offer_answer.file", MAX_TEXT)?,
            text: d.string("offer_answer.text", MAX_TEXT)?,
        })
    }
}

/// Host → agent (version 3), relayed to the local client: the offered recording's file is
/// written (or could not be). The last message about an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordDone {
    pub offer_id: u64,
    /// The host file (empty when none was written).
    pub file: String,
    /// Events in the file, as `trace-cmd report` counts them.
    pub events: u64,
    /// Events the ring buffers lost.
    pub lost: u64,
    /// Bytes of trace data in the file.
    pub bytes: u64,
    /// Every stream arrived whole and the guest broke no rule.
    pub complete: bool,
    /// Why it stopped and anything the user should know.
    pub text: String,
}

impl RecordDone {
    fn encode(&self, e: &mut Encoder) -> Result<(), ProtoError> {
        e.u64(self.offer_id);
        e.str("record_done.file", &self.file, MAX_TEXT)?;
        e.u64(self.events);
        e.u64(self.lost);
        e.u64(self.bytes);
        e.bool(self.complete);
        e.str("record_done.text", &self.text, MAX_TEXT)
    }

    fn decode(d: &mut Decoder) -> Result<Self, ProtoError> {
        Ok(Self {
            offer_id: d.u64("record_done.offer_id")?,
            file: d.string("record_done.file", MAX_TEXT)?,
            events: d.u64("record_done.events")?,
            lost: d.u64("record_done.lost")?,
            bytes: d.u64("record_done.bytes")?,
            complete: d.bool("record_done.complete")?,
            text: d.string("record_done.text", MAX_TEXT)?,
        })
    }
}

/// Which output of the guest command a [`CommandOutput`] carries.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputStream {
    Stdout = 1,
    Stderr = 2,
}

/// Agent → host (version 4): bytes the command of `RecordRequest` wrote, in the order it
/// wrote them on that stream, between `Started` and `Stopped`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub stream: OutputStream,
    pub data: Vec<u8>,
}

impl CommandOutput {
    fn encode(&self, e: &mut Encoder) -> Result<(), ProtoError> {
        e.u8(self.stream as u8);
        e.bytes("command_output.data", &self.data, COMMAND_OUTPUT_CHUNK)
    }

    fn decode(d: &mut Decoder) -> Result<Self, ProtoError> {
        let stream = match d.u8("command_output.stream")? {
            1 => OutputStream::Stdout,
            2 => OutputStream::Stderr,
            _ => {
                return Err(ProtoError::BadField {
                    what: "command_output.stream",
                })
            }
        };
        Ok(Self {
            stream,
            data: d.bytes("command_output.data", COMMAND_OUTPUT_CHUNK)?,
        })
    }
}

/// Any control message. `Stop` and `Close` carry no fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloReply(HelloReply),
    RecordRequest(RecordRequest),
    Started(Started),
    Metadata(Metadata),
    Stop,
    Stopped(Stopped),
    Error(ErrorMessage),
    Ping(Ping),
    Pong(Pong),
    Close,
    SyncProbe(SyncProbe),
    SyncReply(SyncReply),
    ServeReady(ServeReady),
    RecordOffer(RecordOffer),
    OfferAnswer(OfferAnswer),
    RecordDone(RecordDone),
    CommandOutput(CommandOutput),
}

impl Message {
    pub fn kind(&self) -> MessageKind {
        match self {
            Self::Hello(_) => MessageKind::Hello,
            Self::HelloReply(_) => MessageKind::HelloReply,
            Self::RecordRequest(_) => MessageKind::RecordRequest,
            Self::Started(_) => MessageKind::Started,
            Self::Metadata(_) => MessageKind::Metadata,
            Self::Stop => MessageKind::Stop,
            Self::Stopped(_) => MessageKind::Stopped,
            Self::Error(_) => MessageKind::Error,
            Self::Ping(_) => MessageKind::Ping,
            Self::Pong(_) => MessageKind::Pong,
            Self::Close => MessageKind::Close,
            Self::SyncProbe(_) => MessageKind::SyncProbe,
            Self::SyncReply(_) => MessageKind::SyncReply,
            Self::ServeReady(_) => MessageKind::ServeReady,
            Self::RecordOffer(_) => MessageKind::RecordOffer,
            Self::OfferAnswer(_) => MessageKind::OfferAnswer,
            Self::RecordDone(_) => MessageKind::RecordDone,
            Self::CommandOutput(_) => MessageKind::CommandOutput,
        }
    }

    /// The payload alone, without header. Fails if a field is over its cap.
    pub fn encode_payload(&self) -> Result<Vec<u8>, ProtoError> {
        let mut e = Encoder::new();
        match self {
            Self::Hello(m) => m.encode(&mut e)?,
            Self::HelloReply(m) => m.encode(&mut e)?,
            Self::RecordRequest(m) => m.encode(&mut e)?,
            Self::Started(m) => m.encode(&mut e)?,
            Self::Metadata(m) => m.encode(&mut e)?,
            Self::Stopped(m) => m.encode(&mut e)?,
            Self::Error(m) => m.encode(&mut e)?,
            Self::Ping(m) => e.u64(m.nonce),
            Self::Pong(m) => m.encode(&mut e)?,
            Self::SyncProbe(m) => e.u64(m.nonce),
            Self::SyncReply(m) => m.encode(&mut e)?,
            Self::ServeReady(m) => e.str("serve_ready.host", &m.host, MAX_NAME)?,
            Self::RecordOffer(m) => m.encode(&mut e)?,
            Self::OfferAnswer(m) => m.encode(&mut e)?,
            Self::RecordDone(m) => m.encode(&mut e)?,
            Self::CommandOutput(m) => m.encode(&mut e)?,
            Self::Stop | Self::Close => {}
        }
        Ok(e.into_bytes())
    }

    /// A complete frame (header + payload) at protocol `version`. Fails if a
    /// field is over its cap or the payload over `MAX_PAYLOAD`: better the
    /// sender learns it than the peer rejects the frame.
    pub fn encode_frame(&self, version: u16) -> Result<Vec<u8>, ProtoError> {
        let payload = self.encode_payload()?;
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&len| len <= MAX_PAYLOAD)
            .ok_or(ProtoError::Oversized {
                len: u64::try_from(payload.len()).unwrap_or(u64::MAX),
            })?;
        let header = FrameHeader::new(version, self.kind(), len);
        let mut frame = Vec::with_capacity(payload.len() + super::HEADER_LEN);
        frame.extend_from_slice(&header.to_bytes());
        frame.extend_from_slice(&payload);
        Ok(frame)
    }

    /// Decodes a payload of the given `kind`, strictly (no trailing bytes).
    /// Version checks belong to the frame layer ([`super::decode_frame`]).
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Message, ProtoError> {
        let mut d = Decoder::new(payload);
        let msg = match MessageKind::try_from(kind)? {
            MessageKind::Invalid => return Err(ProtoError::UnknownKind { kind }),
            MessageKind::Hello => Self::Hello(Hello::decode(&mut d)?),
            MessageKind::HelloReply => Self::HelloReply(HelloReply::decode(&mut d)?),
            MessageKind::RecordRequest => Self::RecordRequest(RecordRequest::decode(&mut d)?),
            MessageKind::Started => Self::Started(Started::decode(&mut d)?),
            MessageKind::Metadata => Self::Metadata(Metadata::decode(&mut d)?),
            MessageKind::Stop => Self::Stop,
            MessageKind::Stopped => Self::Stopped(Stopped::decode(&mut d)?),
            MessageKind::Error => Self::Error(ErrorMessage::decode(&mut d)?),
            MessageKind::Ping => Self::Ping(Ping {
                nonce: d.u64("ping.nonce")?,
            }),
            MessageKind::Pong => Self::Pong(Pong::decode(&mut d)?),
            MessageKind::Close => Self::Close,
            MessageKind::SyncProbe => Self::SyncProbe(SyncProbe {
                nonce: d.u64("sync_probe.nonce")?,
            }),
            MessageKind::SyncReply => Self::SyncReply(SyncReply::decode(&mut d)?),
            MessageKind::ServeReady => Self::ServeReady(ServeReady {
                host: d.string("serve_ready.host", MAX_NAME)?,
            }),
            MessageKind::RecordOffer => Self::RecordOffer(RecordOffer::decode(&mut d)?),
            MessageKind::OfferAnswer => Self::OfferAnswer(OfferAnswer::decode(&mut d)?),
            MessageKind::RecordDone => Self::RecordDone(RecordDone::decode(&mut d)?),
            MessageKind::CommandOutput => Self::CommandOutput(CommandOutput::decode(&mut d)?),
        };
        d.finish(kind)?;
        Ok(msg)
    }
}

macro_rules! impl_from_struct {
    ($($ty:ident => $variant:ident),* $(,)?) => {
        $(impl From<$ty> for Message {
            fn from(m: $ty) -> Self {
                Self::$variant(m)
            }
        })*
    };
}

impl_from_struct! {
    Hello => Hello,
    HelloReply => HelloReply,
    RecordRequest => RecordRequest,
    Started => Started,
    Metadata => Metadata,
    Stopped => Stopped,
    ErrorMessage => Error,
    Ping => Ping,
    Pong => Pong,
    SyncProbe => SyncProbe,
    SyncReply => SyncReply,
    ServeReady => ServeReady,
    RecordOffer => RecordOffer,
    OfferAnswer => OfferAnswer,
    RecordDone => RecordDone,
    CommandOutput => CommandOutput,
}
