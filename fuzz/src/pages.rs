//! Target `pages`: raw ring-buffer pages as a guest's `trace_pipe_raw` returns them.
//!
//! Input: one byte choosing the layout (bit 0: the 32-bit guest's `header_page`, else the
//! 64-bit one; bits 1-2: page size 4096 << n), then the pages, zero-padded to whole pages (zeros
//! after a page's commit end are what the kernel leaves). Each page is walked with
//! [`PageLayout::page`] and [`Page::events`](tvctl::tracedat::Page::events), and all of them
//! counted with [`PageLayout::count_events`]; both must agree, every event must lie inside its
//! page's data, and a partial page must be refused.

use tvctl::tracedat::{EventCounts, MissedEvents, PageLayout};

use crate::{alloc_guard, HEADER_EVENT, HEADER_PAGE_32, HEADER_PAGE_64};

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
    let layout = PageLayout::parse(header_page, HEADER_EVENT, page_size)
        .expect("the checked-in header texts parse");
    let size = layout.page_size();
    let mut pages = rest.to_vec();
    pages.resize(rest.len().next_multiple_of(size).max(size), 0);
    alloc_guard::budget(pages.len(), 2);

    let counted = layout.count_events(&pages);
    let walked = walk(&layout, &pages);
    match (&counted, &walked) {
        (Ok(c), Ok(w)) => {
            assert_eq!((c.events, c.pages), (w.events, w.pages));
            assert_eq!(c.missed_pages, w.missed_pages);
            assert_eq!(c.missed_events, w.missed_events);
        }
        (Err(_), Err(_)) => {}
        _ => panic!("count_events and a page walk disagree: {counted:?} vs {walked:?}"),
    }
    let partial = layout.count_events(&pages[..pages.len() - 1]);
    assert!(partial.is_err(), "a partial page was counted");
}

/// Counts like `count_events`, through the page API, checking every event's bounds.
fn walk(layout: &PageLayout, pages: &[u8]) -> Result<EventCounts, String> {
    let mut counts = EventCounts::default();
    for bytes in pages.chunks_exact(layout.page_size()) {
        let page = layout.page(bytes).map_err(|e| e.to_string())?;
        let room = layout.page_size() - layout.data_offset();
        assert!(page.data_len() <= room, "commit past the page accepted");
        counts.pages += 1;
        match page.missed {
            MissedEvents::None => {}
            MissedEvents::Unknown => counts.missed_pages += 1,
            MissedEvents::Count(n) => {
                counts.missed_pages += 1;
                counts.missed_events = counts.missed_events.saturating_add(n);
            }
        }
        let mut events = page.events();
        assert_eq!(events.missed(), page.missed);
        let mut seen = 0usize;
        for event in events.by_ref() {
            let event = event.map_err(|e| e.to_string())?;
            assert!(event.payload.len() >= 2, "payload shorter than common_type");
            assert_eq!(
                event.common_type,
                u16::from_le_bytes([event.payload[0], event.payload[1]])
            );
            // Each record takes at least its 4-byte header and its payload.
            seen += 4 + event.payload.len();
            assert!(
                seen <= page.data_len(),
                "events add up past the page's data"
            );
            counts.events += 1;
        }
        assert!(events.next().is_none(), "iterator resumed after its end");
    }
    Ok(counts)
}
