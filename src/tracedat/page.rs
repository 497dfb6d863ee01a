//! Raw ring-buffer pages as `trace_pipe_raw` returns them.
//!
//! The page header's layout comes from the guest's `events/header_page` and the event header's
//! from `events/header_event`, parsed into a [`PageLayout`] rather than hard-coded, because the
//! size of `commit` (a `local_t`) follows the guest's `long`. Only little-endian guests are
//! supported, like the writer. Table of event types: `docs/trace-format.md`.

use super::format::parse_field_line;
use super::{TraceDatError, TraceMeta, MAX_PAGE_SIZE, MIN_PAGE_SIZE};
use std::fmt;

/// `commit` flag: events were lost before this page (kernel `RB_MISSED_EVENTS`).
pub const RB_MISSED_EVENTS: u64 = 1 << 31;
/// `commit` flag: the number of lost events follows the data (kernel `RB_MISSED_STORED`).
pub const RB_MISSED_STORED: u64 = 1 << 30;
const COMMIT_LEN_MASK: u64 = RB_MISSED_STORED - 1;

const TYPE_LEN_BITS: u32 = 5;
const TIME_DELTA_BITS: u32 = 27;
const TYPE_DATA_MAX: u32 = 28;
const TYPE_PADDING: u32 = 29;
const TYPE_TIME_EXTEND: u32 = 30;
const TYPE_TIME_STAMP: u32 = 31;
/// Bits of the time that an absolute time stamp event does not carry (kernel `TS_MSB`).
const TS_MSB: u64 = 0xf8 << 56;

/// Where the page header fields are, from `events/header_page`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLayout {
    page_size: usize,
    timestamp_offset: usize,
    commit_offset: usize,
    commit_size: usize,
    data_offset: usize,
}

impl PageLayout {
    /// Parses the guest's `events/header_page` and checks `events/header_event` describes the
    /// event header we decode (`type_len:5`, `time_delta:27`, types 29/30/31).
    pub fn parse(
        header_page: &[u8],
        header_event: &[u8],
        page_size: u32,
    ) -> Result<Self, TraceDatError> {
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(TraceDatError::InvalidMeta(format!(
                "page size {page_size} is not a power of two between {MIN_PAGE_SIZE} and \
                 {MAX_PAGE_SIZE}"
            )));
        }
        let page_size = usize::try_from(page_size).map_err(|_| {
            TraceDatError::InvalidMeta(format!("page size {page_size} does not fit in memory"))
        })?;
        let layout = parse_header_page(header_page, page_size)?;
        check_header_event(header_event)?;
        Ok(layout)
    }

    /// [`PageLayout::parse`] of a meta's header texts and page size.
    pub fn from_meta(meta: &TraceMeta) -> Result<Self, TraceDatError> {
        Self::parse(&meta.header_page, &meta.header_event, meta.page_size)
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// `sizeof(long)` of the guest: the size of `commit`.
    pub fn long_size(&self) -> usize {
        self.commit_size
    }

    /// Where the events start in a page.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// Reads the header of one page of exactly `page_size` bytes.
    pub fn page<'a>(&self, page: &'a [u8]) -> Result<Page<'a>, PageError> {
        if page.len() != self.page_size {
            return Err(PageError::new(
                0,
                format!("page has {} bytes, not {}", page.len(), self.page_size),
            ));
        }
        let timestamp = read_le(page, self.timestamp_offset, 8);
        let raw_commit = read_le(page, self.commit_offset, self.commit_size);
        // The kernel adds RB_MISSED_EVENTS, an int `1 << 31`, to a signed long: on 64-bit
        // guests it arrives sign-extended, as 0xffffffff in the upper half.
        let commit = raw_commit & 0xffff_ffff;
        let upper = raw_commit >> 32;
        let sign_extended = upper == 0xffff_ffff && commit & RB_MISSED_EVENTS != 0;
        if upper != 0 && !sign_extended {
            return Err(PageError::new(
                self.commit_offset,
                format!("commit {raw_commit:#x} has bits above bit 31 set"),
            ));
        }
        let data_len = usize::try_from(commit & COMMIT_LEN_MASK)
            .map_err(|_| PageError::new(self.commit_offset, "commit does not fit in memory"))?;
        let data_end = self.data_offset + data_len;
        if data_end > self.page_size {
            return Err(PageError::new(
                self.commit_offset,
                format!(
                    "commit says {data_len} bytes of events, the page holds {}",
                    self.page_size - self.data_offset
                ),
            ));
        }
        let missed = match (
            commit & RB_MISSED_EVENTS != 0,
            commit & RB_MISSED_STORED != 0,
        ) {
            (false, false) => MissedEvents::None,
            (true, false) => MissedEvents::Unknown,
            (true, true) => {
                if data_end + self.commit_size > self.page_size {
                    return Err(PageError::new(
                        data_end,
                        "missed-event count is stored past the end of the page",
                    ));
                }
                MissedEvents::Count(read_le(page, data_end, self.commit_size))
            }
            (false, true) => {
                return Err(PageError::new(
                    self.commit_offset,
                    format!("commit {commit:#x} has RB_MISSED_STORED without RB_MISSED_EVENTS"),
                ))
            }
        };
        Ok(Page {
            timestamp,
            missed,
            page,
            data_start: self.data_offset,
            data_end,
        })
    }
}

fn parse_header_page(text: &[u8], page_size: usize) -> Result<PageLayout, TraceDatError> {
    let bad = |what: String| TraceDatError::HeaderPage(what);
    if text.is_empty() {
        return Err(bad(
            "it is empty: pass the guest's events/header_page text".into()
        ));
    }
    let text = std::str::from_utf8(text).map_err(|e| bad(format!("not UTF-8: {e}")))?;
    let mut timestamp = None;
    let mut commit = None;
    let mut data = None;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("field:"))
    {
        let field = parse_field_line(line).map_err(bad)?;
        let span = (to_usize(field.offset), to_usize(field.size));
        match field.name.as_str() {
            "timestamp" => timestamp = Some(span),
            "commit" => commit = Some(span),
            "data" => data = Some(span),
            _ => {} // `overwrite` aliases commit's low byte; nothing to do with it.
        }
    }
    let (ts_offset, ts_size) = timestamp.ok_or_else(|| bad("no `timestamp` field".into()))?;
    let (commit_offset, commit_size) = commit.ok_or_else(|| bad("no `commit` field".into()))?;
    let (data_offset, _) = data.ok_or_else(|| bad("no `data` field".into()))?;
    if ts_size != 8 {
        return Err(bad(format!("timestamp has size {ts_size}, expected 8")));
    }
    if commit_size != 4 && commit_size != 8 {
        return Err(bad(format!(
            "commit has size {commit_size}, expected 4 or 8"
        )));
    }
    let header_end = (ts_offset.saturating_add(8)).max(commit_offset.saturating_add(commit_size));
    if data_offset < header_end {
        return Err(bad(format!(
            "data at offset {data_offset} overlaps timestamp or commit"
        )));
    }
    if data_offset.saturating_add(8) > page_size {
        return Err(bad(format!(
            "data at offset {data_offset} leaves no room for events in a {page_size}-byte page"
        )));
    }
    Ok(PageLayout {
        page_size,
        timestamp_offset: ts_offset,
        commit_offset,
        commit_size,
        data_offset,
    })
}

fn to_usize(value: u32) -> usize {
    // u32 always fits in usize on the 32- and 64-bit targets we build for.
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// Checks the lines of `events/header_event`, e.g. `type_len : 5 bits` and
/// `padding : type == 29`, against the constants the page walker uses.
fn check_header_event(text: &[u8]) -> Result<(), TraceDatError> {
    let bad = |what: String| TraceDatError::HeaderEvent(what);
    let text = std::str::from_utf8(text).map_err(|e| bad(format!("not UTF-8: {e}")))?;
    // (key with whitespace removed, value we decode with, required)
    let expected: [(&str, u32, bool); 6] = [
        ("type_len:", TYPE_LEN_BITS, true),
        ("time_delta:", TIME_DELTA_BITS, true),
        ("padding:type==", TYPE_PADDING, true),
        ("time_extend:type==", TYPE_TIME_EXTEND, true),
        ("time_stamp:type==", TYPE_TIME_STAMP, false),
        ("datamaxtype_len==", TYPE_DATA_MAX, true),
    ];
    let mut seen = [false; 6];
    for line in text.lines() {
        let compact: String = line.chars().filter(|c| !c.is_whitespace()).collect();
        for (i, (key, want, _)) in expected.iter().enumerate() {
            let Some(rest) = compact.strip_prefix(key) else {
                continue;
            };
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let got: u32 = digits
                .parse()
                .map_err(|_| bad(format!("no number in {:?}", line.trim())))?;
            if got != *want {
                return Err(bad(format!(
                    "{:?} differs from the {want} this reader decodes",
                    line.trim()
                )));
            }
            seen[i] = true;
        }
    }
    for (i, (key, _, required)) in expected.iter().enumerate() {
        if *required && !seen[i] {
            return Err(bad(format!("no `{key}` line")));
        }
    }
    Ok(())
}

fn read_le(bytes: &[u8], at: usize, size: usize) -> u64 {
    let mut buf = [0u8; 8];
    buf[..size].copy_from_slice(&bytes[at..at + size]);
    u64::from_le_bytes(buf)
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut buf = [0u8; 4];
    buf.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(buf)
}

/// Whether events were lost before a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissedEvents {
    None,
    /// Events were lost; the kernel had no room to store how many.
    Unknown,
    /// This many events were lost.
    Count(u64),
}

/// A page whose header has been checked; [`Page::events`] walks its events.
#[derive(Debug, Clone, Copy)]
pub struct Page<'a> {
    /// Time of the page (the guest's trace clock); event times are deltas from it.
    pub timestamp: u64,
    pub missed: MissedEvents,
    page: &'a [u8],
    data_start: usize,
    data_end: usize,
}

impl<'a> Page<'a> {
    /// Bytes of events on the page (`commit` without its flags).
    pub fn data_len(&self) -> usize {
        self.data_end - self.data_start
    }

    pub fn events(&self) -> PageIter<'a> {
        PageIter {
            page: self.page,
            pos: self.data_start,
            end: self.data_end,
            ts: self.timestamp,
            missed: self.missed,
            done: false,
        }
    }
}

/// One data record of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent<'a> {
    /// Absolute time: the page timestamp plus all deltas up to and including this event's.
    pub ts: u64,
    /// The event id: the first two bytes of the payload.
    pub common_type: u16,
    /// The record as the event's format describes it, starting with `common_type`.
    pub payload: &'a [u8],
}

/// Walks the events of one page, yielding data records and applying time extends, absolute
/// time stamps and padding. After the first error it yields nothing more.
#[derive(Debug, Clone)]
pub struct PageIter<'a> {
    page: &'a [u8],
    pos: usize,
    end: usize,
    ts: u64,
    missed: MissedEvents,
    done: bool,
}

impl<'a> PageIter<'a> {
    /// Whether events were lost before this page.
    pub fn missed(&self) -> MissedEvents {
        self.missed
    }

    /// Byte offset in the page where the walk stands: just after the last event returned; once
    /// the walk is over, at the null padding event that ended it, at the event it failed on, or
    /// at the end of the data.
    pub fn position(&self) -> usize {
        self.pos
    }

    fn fail(
        &mut self,
        at: usize,
        what: impl Into<String>,
    ) -> Option<Result<RawEvent<'a>, PageError>> {
        self.done = true;
        Some(Err(PageError::new(at, what)))
    }

    /// The end of an event of `len` bytes at `pos`, if it fits before the commit end.
    fn event_end(&self, len: u64) -> Option<usize> {
        let end = u64::try_from(self.pos).ok()?.checked_add(len)?;
        let end = usize::try_from(end).ok()?;
        (end <= self.end).then_some(end)
    }
}

impl<'a> Iterator for PageIter<'a> {
    type Item = Result<RawEvent<'a>, PageError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done && self.pos < self.end {
            let at = self.pos;
            if self.end - at < 4 {
                return self.fail(at, "event header cut by the end of the data");
            }
            let header = read_u32(self.page, at);
            let type_len = header & ((1 << TYPE_LEN_BITS) - 1);
            let delta = u64::from(header >> TYPE_LEN_BITS);
            if type_len == TYPE_PADDING && delta == 0 {
                // A null padding event: nothing follows on this page.
                self.done = true;
                return None;
            }
            let needs_array0 = type_len == 0 || type_len > TYPE_DATA_MAX;
            if needs_array0 && self.end - at < 8 {
                return self.fail(
                    at,
                    format!("type {type_len} event cut by the end of the data"),
                );
            }
            let array0 = if needs_array0 {
                u64::from(read_u32(self.page, at + 4))
            } else {
                0
            };
            match type_len {
                TYPE_PADDING => {
                    let Some(end) = self.event_end(4 + array0) else {
                        return self
                            .fail(at, format!("padding of {array0} bytes overruns the data"));
                    };
                    // libtraceevent adds a padding event's delta too; so do we.
                    self.ts = self.ts.wrapping_add(delta);
                    self.pos = end;
                }
                TYPE_TIME_EXTEND => {
                    self.ts = self.ts.wrapping_add((array0 << TIME_DELTA_BITS) | delta);
                    self.pos = at + 8;
                }
                TYPE_TIME_STAMP => {
                    let absolute = (array0 << TIME_DELTA_BITS) | delta;
                    self.ts = absolute | (self.ts & TS_MSB);
                    self.pos = at + 8;
                }
                _ => {
                    let (payload_start, payload_len, total) = if type_len == 0 {
                        // array[0] counts itself; the record is padded to 4 bytes.
                        if array0 < 4 {
                            return self.fail(at, format!("event length {array0} is below 4"));
                        }
                        (at + 8, array0 - 4, 4 + array0.next_multiple_of(4))
                    } else {
                        let len = u64::from(type_len) * 4;
                        (at + 4, len, 4 + len)
                    };
                    let Some(end) = self.event_end(total) else {
                        return self.fail(at, format!("event of {total} bytes overruns the data"));
                    };
                    if payload_len < 2 {
                        return self.fail(at, "event payload shorter than common_type");
                    }
                    // payload_len < total, and the event fits, so this cannot overflow.
                    let payload_end = payload_start + usize::try_from(payload_len).unwrap_or(0);
                    let payload = &self.page[payload_start..payload_end];
                    self.ts = self.ts.wrapping_add(delta);
                    self.pos = end;
                    return Some(Ok(RawEvent {
                        ts: self.ts,
                        common_type: u16::from_le_bytes([payload[0], payload[1]]),
                        payload,
                    }));
                }
            }
        }
        None
    }
}

/// What is wrong with a page, and where (byte offset within the page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageError {
    pub offset: usize,
    pub what: String,
}

impl PageError {
    pub(crate) fn new(offset: usize, what: impl Into<String>) -> Self {
        PageError {
            offset,
            what: what.into(),
        }
    }
}

impl fmt::Display for PageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at byte {} of the page: {}", self.offset, self.what)
    }
}

impl std::error::Error for PageError {}

#[cfg(test)]
mod tests;
