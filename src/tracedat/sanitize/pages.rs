//! Ring-buffer pages: a page is kept only if libtraceevent's reader (`kbuffer`) walks exactly the
//! events our walker walks, and every record fits what trace-cmd's printing reads of it.
//!
//! Records are judged with the record size trace-cmd uses (`kbuffer` rounds a long record's
//! length up to 4 bytes) and with the page bytes after the record, which trace-cmd may read
//! without harm: the page is mapped, what lies beyond the last page of a CPU may not be.

use super::print_fmt::{Base, BinOp, Expr, Operand};
use super::{CheckedFormat, Field, FormatSet, MAX_KVM_INSN_LEN};
use crate::tracedat::page::{MissedEvents, PageError, PageLayout};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

/// At most this many page problems are kept in a [`PageScan`] for notes; the rest are counted.
pub const MAX_NOTED_PAGE_PROBLEMS: usize = 16;

/// What a good page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageInfo {
    /// Data records.
    pub events: u32,
    pub missed: MissedEvents,
    /// Time of the first and last record (`None` for a page without records).
    pub first_ts: Option<u64>,
    pub last_ts: Option<u64>,
}

/// Why a page is dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageProblem {
    /// The page header or an event header is corrupt.
    #[error(transparent)]
    Walk(#[from] PageError),
    /// A null padding event whose length leaves events behind it that trace-cmd would read but
    /// our walker does not.
    #[error("at byte {offset} of the page: events hide behind a padding event")]
    HiddenEvents { offset: usize },
    /// A record that trace-cmd would read past.
    #[error("at byte {offset} of the page: record of event {id}: {what}")]
    Record {
        offset: usize,
        id: u16,
        what: String,
    },
}

/// Checks the structure of one page of exactly `layout.page_size()` bytes: header, event
/// headers, lengths, time extends, padding, all inside `commit`.
pub fn check_page(layout: &PageLayout, page: &[u8]) -> Result<PageInfo, PageProblem> {
    walk(layout, page, None)
}

/// [`check_page`], and every record must also fit its format in `formats`: at least the common
/// fields' bytes, every field inside the record, strings terminated inside the page, and the
/// lengths the print fmt reads inside the record.
pub fn check_page_records(
    layout: &PageLayout,
    page: &[u8],
    formats: &FormatSet,
) -> Result<PageInfo, PageProblem> {
    walk(layout, page, Some(formats))
}

fn walk(
    layout: &PageLayout,
    page: &[u8],
    formats: Option<&FormatSet>,
) -> Result<PageInfo, PageProblem> {
    let header = layout.page(page)?;
    let data_end = layout.data_offset() + header.data_len();
    let mut info = PageInfo {
        events: 0,
        missed: header.missed,
        first_ts: None,
        last_ts: None,
    };
    // A string starting at byte p of the page ends inside it if p <= the page's last NUL.
    let last_nul = page.iter().rposition(|&b| b == 0);
    let mut events = header.events();
    while let Some(event) = events.next() {
        let event = event?;
        let end = events.position();
        let start = end - event.payload.len().next_multiple_of(4);
        if let Some(formats) = formats {
            let record = Placed {
                page,
                start,
                end,
                last_nul,
            };
            check_record(formats, layout.long_size(), &record).map_err(|what| {
                PageProblem::Record {
                    offset: start,
                    id: event.common_type,
                    what,
                }
            })?;
        }
        info.events += 1;
        info.first_ts.get_or_insert(event.ts);
        info.last_ts = Some(event.ts);
    }
    // Our walker stops at a null padding event (time delta 0); kbuffer instead jumps over its
    // length and reads on while it is inside `commit`.
    let stop = events.position();
    if stop < data_end {
        let length = page
            .get(stop + 4..stop + 8)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let resumes = length.is_none_or(|len| stop + 4 + to_usize(len) < data_end);
        if resumes {
            return Err(PageProblem::HiddenEvents { offset: stop });
        }
    }
    Ok(info)
}

fn to_usize(value: u32) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// A record in its page: `page[start..end]`, as long as trace-cmd's record size.
struct Placed<'a> {
    page: &'a [u8],
    start: usize,
    end: usize,
    /// Position of the page's last NUL byte.
    last_nul: Option<usize>,
}

/// Checks one record against its format.
fn check_record(formats: &FormatSet, long_size: usize, placed: &Placed) -> Result<(), String> {
    let bytes = &placed.page[placed.start..placed.end];
    let size = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    let common_end = formats.common_end();
    if size < common_end {
        return Err(format!(
            "{size} bytes, shorter than the {common_end} bytes of common fields"
        ));
    }
    let id = u16::from_le_bytes([bytes[0], bytes[1]]);
    let Some(format) = formats.get(id) else {
        return Ok(()); // printed as an unknown event: only the common fields are read
    };
    let r = Record {
        format,
        bytes,
        size,
        placed,
        long_size: u64::try_from(long_size).unwrap_or(8),
    };
    r.fields_fit()?;
    r.strings_end()?;
    r.spans_fit()?;
    r.stars_fit()?;
    r.plugin_reads_fit()
}

struct Record<'a> {
    format: &'a CheckedFormat,
    bytes: &'a [u8],
    size: u64,
    placed: &'a Placed<'a>,
    long_size: u64,
}

impl Record<'_> {
    fn field(&self, index: usize) -> &Field {
        &self.format.fields[index]
    }

    /// Bytes of the page after the record.
    fn tail_len(&self) -> usize {
        self.placed.page.len() - self.placed.end
    }

    /// Whether a string starting at `offset` in the record ends inside the page.
    fn terminated_from(&self, offset: u64) -> bool {
        let at = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(self.placed.start));
        matches!((at, self.placed.last_nul), (Some(at), Some(nul)) if at <= nul)
    }

    /// Every field inside the record; every dynamic field's data too (the kernel's invariant;
    /// plugins read dynamic fields without checking).
    fn fields_fit(&self) -> Result<(), String> {
        if self.format.fixed_end > self.size {
            let field = self
                .format
                .fields
                .iter()
                .find(|f| f.end() > self.size)
                .expect("fixed_end is the largest end");
            return Err(format!(
                "{} bytes, but field {:?} ends at byte {}",
                self.size,
                field.name,
                field.end()
            ));
        }
        for &i in &self.format.dynamic_fields {
            let field = self.field(i);
            let raw = self.read_number(field.offset, field.size);
            let offset = raw & 0xffff;
            let len = if field.size == 2 {
                0
            } else {
                (raw >> 16) & 0xffff
            };
            let base = if field.relative { field.end() } else { 0 };
            if base + offset + len > self.size {
                return Err(format!(
                    "the data of {:?} ({len} bytes at {}) ends past the record's {} bytes",
                    field.name,
                    base + offset,
                    self.size
                ));
            }
        }
        Ok(())
    }

    /// Strings libtraceevent may print with `%s` (string arrays when it prints raw fields, and
    /// `__get_str`) must end inside the page.
    fn strings_end(&self) -> Result<(), String> {
        for &(i, via_get_str) in &self.format.string_fields {
            let field = self.field(i);
            let start = if via_get_str || field.dynamic {
                self.dynamic(field).0
            } else {
                u64::from(field.offset)
            };
            if !self.terminated_from(start) {
                return Err(format!(
                    "string {:?} is not terminated inside the page",
                    field.name
                ));
            }
        }
        Ok(())
    }

    /// `__print_hex`, `__print_hex_str` and `__print_array` read inside the record.
    fn spans_fit(&self) -> Result<(), String> {
        for span in &self.format.rules.spans {
            let start = match span.base {
                Base::Field(i) => u64::from(self.field(i).offset),
                Base::Dynamic(i) => self.dynamic(self.field(i)).0,
            };
            let count = u64::from(low32(self.eval(&span.count)?));
            let element = match &span.element {
                None => 1,
                // libtraceevent prints other sizes as single bytes.
                Some(e) => match i32::from_le_bytes(low32(self.eval(e)?).to_le_bytes()) {
                    size @ (1 | 2 | 4 | 8) => u64::from(size.unsigned_abs()),
                    _ => 1,
                },
            };
            let end = start.saturating_add(count.saturating_mul(element));
            if end > self.size {
                return Err(format!(
                    "an array printed from byte {start} to {end}, past the record's {} bytes",
                    self.size
                ));
            }
        }
        Ok(())
    }

    /// `*` widths and precisions: not negative (libtraceevent then passes printf one argument
    /// too few) and not huge.
    fn stars_fit(&self) -> Result<(), String> {
        for (expr, limit) in &self.format.rules.stars {
            let value = i32::from_le_bytes(low32(self.eval(expr)?).to_le_bytes());
            if value < 0 || i64::from(value) > *limit {
                return Err(format!("a `*` width of {value}"));
            }
        }
        Ok(())
    }

    /// What plugins read: a pointer's bytes inside the page; kvm's instruction bytes.
    fn plugin_reads_fit(&self) -> Result<(), String> {
        let readable = self.size + u64::try_from(self.tail_len()).unwrap_or(0);
        for &(field, bytes) in &self.format.rules.pointers {
            let (start, _) = self.dynamic(self.field(field));
            let start = if start > self.size { 0 } else { start };
            if start + u64::try_from(bytes).unwrap_or(u64::MAX) > readable {
                return Err(format!(
                    "a plugin reads {bytes} bytes at byte {start}, past the page"
                ));
            }
        }
        if let Some(buf) = self.format.bprint_buf {
            // libtraceevent copies `%s` arguments of a binary printk with strdup and reads
            // number arguments up to 8 bytes past its last check of the record's end.
            let terminated = self.terminated_from(u64::from(self.field(buf).offset));
            if !terminated || self.tail_len() < 8 {
                return Err("a binary printk record at the end of its page or without NUL".into());
            }
        }
        if let Some((len, insn)) = self.format.kvm_insn {
            let len_field = self.field(len);
            let value = self.read_number(len_field.offset, len_field.size);
            if !(1..=MAX_KVM_INSN_LEN).contains(&value)
                || u64::from(self.field(insn).offset) + value > self.size
            {
                return Err(format!("an instruction length of {value}"));
            }
        }
        Ok(())
    }

    /// `tep_read_number` of a field, 0 when it is outside the record (as `eval_num_arg`).
    fn read_number(&self, offset: u32, size: u32) -> u64 {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let len = match size {
            1 | 2 | 4 | 8 => usize::try_from(size).unwrap_or(0),
            _ => return 0,
        };
        let Some(bytes) = start
            .checked_add(len)
            .and_then(|end| self.bytes.get(start..end))
        else {
            return 0;
        };
        let mut buf = [0u8; 8];
        buf[..len].copy_from_slice(bytes);
        u64::from_le_bytes(buf)
    }

    /// libtraceevent's `dynamic_offset_field`: where a field's dynamic data starts and how
    /// long it is, with its fallbacks (0) for values outside the record.
    fn dynamic(&self, field: &Field) -> (u64, u64) {
        if field.end() > self.size {
            return (0, 0);
        }
        let size32 = low32(self.size);
        let raw = self.read_number(field.offset, field.size);
        let o = low32(raw & 0xffff);
        let l = if field.size == 2 {
            size32.wrapping_sub(o)
        } else {
            low32((raw >> 16) & 0xffff)
        };
        let mut offset = u64::from(if o > size32 { 0 } else { o });
        let len = u64::from(if o.wrapping_add(l) > size32 { 0 } else { l });
        if field.relative {
            offset += field.end();
        }
        (offset, len)
    }

    /// `eval_num_arg` of a length expression.
    fn eval(&self, expr: &Expr) -> Result<u64, String> {
        let left = self.operand(expr.left);
        let Some((op, right)) = expr.right else {
            return Ok(left);
        };
        let right = self.operand(right);
        let shift = u32::try_from(right & 63).unwrap_or(0);
        Ok(match op {
            BinOp::Add => left.wrapping_add(right),
            BinOp::Sub => left.wrapping_sub(right),
            BinOp::Mul => left.wrapping_mul(right),
            BinOp::Div | BinOp::Rem if right == 0 => return Err("a division by zero".into()),
            BinOp::Div => left / right,
            BinOp::Rem => left % right,
            BinOp::Shl => left.wrapping_shl(shift),
            BinOp::Shr => left.wrapping_shr(shift),
            BinOp::And => left & right,
            BinOp::Or => left | right,
            BinOp::Xor => left ^ right,
        })
    }

    fn operand(&self, operand: Operand) -> u64 {
        match operand {
            Operand::Number(n) => n,
            Operand::Field(i) => {
                let f = self.field(i);
                self.read_number(f.offset, f.size)
            }
            Operand::DynamicLen(i) => self.dynamic(self.field(i)).1,
            Operand::SizeofLong => self.long_size,
        }
    }
}

/// The low 32 bits, as C's conversion to `unsigned int` keeps them.
fn low32(value: u64) -> u32 {
    u32::try_from(value & u64::from(u32::MAX)).unwrap_or(u32::MAX)
}

/// The good pages of one CPU's data, and what was dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageScan {
    /// Byte ranges of the CPU's data that hold only good pages, in order, each a run of
    /// consecutive pages (so copying them in order gives the sanitized data).
    pub good: Vec<Range<u64>>,
    pub good_pages: u64,
    /// Pages dropped, a trailing partial page included.
    pub dropped_pages: u64,
    /// The first [`MAX_NOTED_PAGE_PROBLEMS`] problems, with the page index (from 0).
    pub problems: Vec<(u64, PageProblem)>,
    /// Events, pages and lost events of the good pages: what the written file holds, counted
    /// while scanning (no second read of the data).
    pub counts: crate::tracedat::EventCounts,
}

impl PageScan {
    /// Bytes of good pages.
    pub fn good_bytes(&self) -> u64 {
        self.good.iter().map(|r| r.end - r.start).sum()
    }

    fn add(
        &mut self,
        layout: &PageLayout,
        page: &[u8],
        index: u64,
        offset: u64,
        verdict: Result<PageInfo, PageProblem>,
    ) {
        let len = u64::try_from(page.len()).unwrap_or(u64::MAX);
        match verdict {
            Ok(_) => {
                // A page the walk accepted parses for counting too; if it did not, it would
                // still be kept (the counts then miss it, which the summary's check shows).
                let _ = self.counts.add_page(layout, page);
                self.good_pages += 1;
                match self.good.last_mut() {
                    Some(last) if last.end == offset => last.end += len,
                    _ => self.good.push(offset..offset + len),
                }
            }
            Err(problem) => {
                self.dropped_pages += 1;
                if self.problems.len() < MAX_NOTED_PAGE_PROBLEMS {
                    self.problems.push((index, problem));
                }
            }
        }
    }
}

/// Checks every page of one CPU's data (with [`check_page_records`] when `formats` is given).
pub fn scan_cpu_data(layout: &PageLayout, data: &[u8], formats: Option<&FormatSet>) -> PageScan {
    let mut scan = PageScan::default();
    let page_size = layout.page_size();
    for (index, page) in data.chunks(page_size).enumerate() {
        let index = u64::try_from(index).unwrap_or(u64::MAX);
        let offset = index * u64::try_from(page_size).unwrap_or(u64::MAX);
        scan.add(layout, page, index, offset, walk(layout, page, formats));
    }
    scan
}

/// [`scan_cpu_data`] over the first `len` bytes of a file, read a few pages at a time.
pub fn scan_cpu_file(
    layout: &PageLayout,
    file: &File,
    len: u64,
    formats: Option<&FormatSet>,
) -> io::Result<PageScan> {
    const PAGES_PER_READ: usize = 256;
    let page_size = layout.page_size();
    let page_len = u64::try_from(page_size).unwrap_or(u64::MAX);
    let mut buf = vec![0u8; page_size * PAGES_PER_READ];
    let mut scan = PageScan::default();
    let mut offset = 0u64;
    while offset < len {
        let want = usize::try_from((len - offset).min(u64::try_from(buf.len()).unwrap_or(0)))
            .unwrap_or(buf.len());
        file.read_exact_at(&mut buf[..want], offset)?;
        for page in buf[..want].chunks(page_size) {
            let index = offset / page_len;
            let n = u64::try_from(page.len()).unwrap_or(u64::MAX);
            scan.add(layout, page, index, offset, walk(layout, page, formats));
            offset += n;
        }
    }
    Ok(scan)
}
