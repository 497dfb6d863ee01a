//! The wire protocol between `tvctl` (host) and `tvctl-agent` (guest).
//!
//! Control messages travel in length-prefixed frames on the `agent-ctl-path`
//! virtio-serial port; each CPU's trace data travels unframed on its own
//! `trace-path-cpuN` port behind a [`StreamMarker`]. This module defines the
//! bytes only: frames, messages, limits, version negotiation and metadata
//! reassembly. It does no I/O policy (no sockets, timeouts or retries) and needs
//! only `std`, so the static guest agent builds it without the `host` feature.
//! The full specification, with every field table and examples, is
//! `docs/protocol.md`; the golden tests keep code and document in step.
//!
//! ```text
//! frame:  "TVCT" | version u16 | kind u16 | len u32 (<= 1 MiB) | flags u32 (0) | payload[len]
//!
//! host                                        agent
//!  |-- Hello{min, max, nonce} ------------------>|
//!  |<- HelloReply{version, nonce, cpus, ...} ----|
//!  |-- RecordRequest{events, ..., stream_nonce} ->|
//!  |<= cpuN port: StreamMarker, then raw pages ==|
//!  |<- Started{...} -----------------------------|
//!  |-- Stop ------------------------------------>|
//!  |<- Metadata{name, total_len, offset, data}* -|
//!  |<- Stopped{reason, per-CPU byte counts} -----|
//!  |-- Close ----------------------------------->|
//! ```

mod codec;
mod error;
mod frame;
pub mod limits;
mod marker;
mod message;
mod metadata;
mod version;

#[cfg(test)]
mod golden_tests;

pub use codec::{Decoder, Encoder};
pub use error::ProtoError;
pub use frame::{
    decode_frame, read_message, write_message, FrameDecoder, FrameHeader, HEADER_LEN, MAGIC,
};
pub use marker::{StreamMarker, MARKER_MAGIC};
pub use message::{
    CommandOutput, CpuStopped, ErrorCode, ErrorMessage, Hello, HelloReply, Message, MessageKind,
    Metadata, OfferAnswer, OutputStream, Ping, Pong, RecordDone, RecordOffer, RecordRequest,
    ServeReady, Started, StopReason, Stopped, SyncProbe, SyncReply,
};
pub use metadata::{
    split_metadata, validate_name, MetadataAssembler, MetadataChunks, MetadataError,
};
pub use version::{negotiate, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
