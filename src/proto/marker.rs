//! The start marker of a per-CPU data stream.
//!
//! Data ports carry raw ring-buffer pages with no framing, and the host FIFO may
//! still hold bytes of an earlier, interrupted recording. The agent therefore
//! writes one 32-byte marker before the first page; the host skips everything
//! up to the marker carrying its own `stream_nonce` and CPU. The marker is not
//! counted in `CpuStopped::bytes`, which is how the host knows a stream is
//! complete: QEMU keeps the FIFO open, so the host never sees end-of-file.
//!
//! ```text
//!  0  8  magic        b"TVCTDATA"
//!  8  8  stream_nonce u64 LE
//! 16  4  cpu          u32 LE
//! 20  4  page_size    u32 LE
//! 24  8  reserved     zero
//! ```

/// First eight bytes of a marker.
pub const MARKER_MAGIC: [u8; 8] = *b"TVCTDATA";

/// Identifies the start of one CPU's stream for one recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamMarker {
    /// `RecordRequest::stream_nonce` of the recording.
    pub stream_nonce: u64,
    pub cpu: u32,
    /// Size of each ring-buffer page that follows.
    pub page_size: u32,
}

impl StreamMarker {
    /// Size on the wire.
    pub const LEN: usize = 32;

    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut out = [0; Self::LEN];
        out[0..8].copy_from_slice(&MARKER_MAGIC);
        out[8..16].copy_from_slice(&self.stream_nonce.to_le_bytes());
        out[16..20].copy_from_slice(&self.cpu.to_le_bytes());
        out[20..24].copy_from_slice(&self.page_size.to_le_bytes());
        out
    }

    /// A marker, if `bytes` is one (right magic, reserved bytes zero).
    pub fn parse(bytes: &[u8; Self::LEN]) -> Option<Self> {
        let (magic, rest) = bytes.split_first_chunk::<8>()?;
        let (nonce, rest) = rest.split_first_chunk::<8>()?;
        let (cpu, rest) = rest.split_first_chunk::<4>()?;
        let (page_size, reserved) = rest.split_first_chunk::<4>()?;
        if *magic != MARKER_MAGIC || reserved.iter().any(|&b| b != 0) {
            return None;
        }
        Some(Self {
            stream_nonce: u64::from_le_bytes(*nonce),
            cpu: u32::from_le_bytes(*cpu),
            page_size: u32::from_le_bytes(*page_size),
        })
    }

    /// Offset in `buf` of the first marker for `stream_nonce` and `cpu`; the
    /// stream's pages start at that offset + [`Self::LEN`]. When `None`, the
    /// caller may drop all but the last `LEN - 1` bytes, which could be the
    /// start of a marker split across two reads.
    pub fn find(buf: &[u8], stream_nonce: u64, cpu: u32) -> Option<usize> {
        buf.windows(Self::LEN).position(|w| {
            let w: &[u8; Self::LEN] = w.try_into().expect("windows have LEN bytes");
            Self::parse(w).is_some_and(|m| m.stream_nonce == stream_nonce && m.cpu == cpu)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: StreamMarker = StreamMarker {
        stream_nonce: 0x0807_0605_0403_0201,
        cpu: 3,
        page_size: 4096,
    };

    #[test]
    fn marker_bytes_match_the_documented_example() {
        let want = [
            0x54, 0x56, 0x43, 0x54, 0x44, 0x41, 0x54, 0x41, // "TVCTDATA"
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // nonce
            0x03, 0x00, 0x00, 0x00, // cpu
            0x00, 0x10, 0x00, 0x00, // page size
            0, 0, 0, 0, 0, 0, 0, 0, // reserved
        ];
        assert_eq!(EXAMPLE.to_bytes(), want);
        assert_eq!(StreamMarker::parse(&want), Some(EXAMPLE));
    }

    #[test]
    fn nonzero_reserved_bytes_are_not_a_marker() {
        let mut bytes = EXAMPLE.to_bytes();
        bytes[31] = 1;
        assert_eq!(StreamMarker::parse(&bytes), None);
    }

    #[test]
    fn find_skips_stale_bytes_and_other_recordings() {
        let stale = StreamMarker {
            stream_nonce: 99,
            ..EXAMPLE
        };
        let other_cpu = StreamMarker { cpu: 4, ..EXAMPLE };
        let mut buf = b"old pages".to_vec();
        buf.extend_from_slice(&stale.to_bytes());
        buf.extend_from_slice(b"more old pages");
        buf.extend_from_slice(&other_cpu.to_bytes());
        let at = buf.len();
        buf.extend_from_slice(&EXAMPLE.to_bytes());
        buf.extend_from_slice(b"new page");

        assert_eq!(StreamMarker::find(&buf, EXAMPLE.stream_nonce, 3), Some(at));
        assert_eq!(&buf[at + StreamMarker::LEN..], b"new page");
    }

    #[test]
    fn find_needs_the_whole_marker() {
        let bytes = EXAMPLE.to_bytes();
        assert_eq!(
            StreamMarker::find(&bytes[..31], EXAMPLE.stream_nonce, 3),
            None
        );
        assert_eq!(StreamMarker::find(&bytes, EXAMPLE.stream_nonce, 3), Some(0));
    }
}
