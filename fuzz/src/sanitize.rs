//! Target `sanitize`: the checks of `tracedat::sanitize` that stand between what a guest sends
//! and `trace-cmd report` (event formats and their print fmt parser, header texts,
//! `printk_formats`, and pages judged against the admitted formats).
//!
//! Input: one byte choosing the layout (bit 0: 32-bit `header_page`; bits 1-2: page size
//! 4096 << n), then texts separated by NUL bytes, optionally followed by `\0PAGES\0` and raw
//! pages (zero-padded to whole pages). Each text is offered to a [`FormatSet`] (alternately as
//! a format of `fuzz` and of `ftrace`), checked as a header text and sanitized as
//! `printk_formats`; the first text is also tried as `header_page`. The pages are scanned with
//! and without the admitted formats. Besides "no panic": sanitized `printk_formats` are a fixed
//! point; a page that passes the record checks passes the structural ones and walks cleanly;
//! every page is counted exactly once.

use std::collections::BTreeSet;

use tvctl::tracedat::sanitize::{
    check_event_format, check_header_text, check_headers, sanitize_printk_formats, scan_cpu_data,
    FormatSet, PageScan,
};
use tvctl::tracedat::PageLayout;

use crate::{alloc_guard, HEADER_EVENT, HEADER_PAGE_32, HEADER_PAGE_64};

/// Separates the texts from the pages.
pub const PAGES_MARKER: &[u8] = b"\0PAGES\0";

pub fn run(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let header_page = if sel & 1 == 0 {
        HEADER_PAGE_64
    } else {
        HEADER_PAGE_32
    };
    let page_size = 4096u32 << ((sel >> 1) & 3);
    let layout = check_headers(header_page, HEADER_EVENT, page_size)
        .expect("the checked-in header texts pass");
    let (texts, pages) = match rest
        .windows(PAGES_MARKER.len())
        .position(|w| w == PAGES_MARKER)
    {
        Some(at) => (&rest[..at], &rest[at + PAGES_MARKER.len()..]),
        None => (rest, &[][..]),
    };
    let size = layout.page_size();
    alloc_guard::budget(rest.len().next_multiple_of(size) + size, 4);

    let mut formats = FormatSet::new();
    for (i, text) in texts.split(|&b| b == 0).enumerate() {
        let system = if i % 2 == 0 { "fuzz" } else { "ftrace" };
        let alone = check_event_format(text);
        let admitted = formats.admit(system, text).map(|f| f.id);
        if let Ok(id) = admitted {
            assert!(alone.is_ok(), "admitted a format that fails alone");
            assert!(formats.get(id).is_some(), "admitted format {id} not kept");
        }
        let _ = check_header_text(text);
        let printk = sanitize_printk_formats(text);
        let again = sanitize_printk_formats(&printk.text);
        assert_eq!(
            again.text, printk.text,
            "sanitized printk_formats changed again"
        );
        assert_eq!(
            again.dropped_lines, 0,
            "sanitized printk_formats lost lines"
        );
        if i == 0 {
            if let Ok(fuzzed) = check_headers(text, HEADER_EVENT, page_size) {
                assert_eq!(fuzzed.page_size(), size);
            }
        }
    }

    let mut bytes = pages.to_vec();
    bytes.resize(pages.len().next_multiple_of(size).max(size), 0);
    let structural = scan_cpu_data(&layout, &bytes, None);
    let records = scan_cpu_data(&layout, &bytes, Some(&formats));
    let pages_total = u64::try_from(bytes.len() / size).expect("usize fits u64");
    for scan in [&structural, &records] {
        assert_eq!(scan.good_pages + scan.dropped_pages, pages_total);
        assert_eq!(
            scan.good_bytes(),
            scan.good_pages * u64::try_from(size).unwrap()
        );
    }
    let walkable = good_pages(&structural, size);
    let printable = good_pages(&records, size);
    assert!(
        printable.is_subset(&walkable),
        "a page passed the record checks only"
    );
    for &index in &walkable {
        let at = usize::try_from(index).expect("in memory") * size;
        walks_cleanly(&layout, &bytes[at..at + size]);
    }
    let partial = scan_cpu_data(&layout, &bytes[..bytes.len() - 1], None);
    assert_eq!(partial.good_pages + partial.dropped_pages, pages_total);
    assert!(partial.dropped_pages >= 1, "a partial page was kept");
}

/// Indices of the pages a scan kept.
fn good_pages(scan: &PageScan, size: usize) -> BTreeSet<u64> {
    let size = u64::try_from(size).expect("usize fits u64");
    scan.good
        .iter()
        .flat_map(|range| {
            assert!(
                range.start % size == 0 && range.end % size == 0,
                "range of part pages"
            );
            range.start / size..range.end / size
        })
        .collect()
}

fn walks_cleanly(layout: &PageLayout, page: &[u8]) {
    let page = layout.page(page).expect("a good page has a good header");
    for event in page.events() {
        event.expect("a good page walks cleanly");
    }
}
