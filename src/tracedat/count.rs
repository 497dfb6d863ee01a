//! Counting events, pages and lost events over a CPU's raw pages, to report on a recording and
//! to check a written file against what `trace-cmd report` prints.

use super::page::{MissedEvents, PageError, PageLayout};
use super::TraceDatError;
use std::collections::BTreeMap;

/// Totals over ring-buffer pages. Feed the pages of one CPU in order (so that `ts_backwards`
/// means something), then [`merge`](EventCounts::merge) the CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventCounts {
    /// Data records.
    pub events: u64,
    pub pages: u64,
    /// Pages flagged RB_MISSED_EVENTS (events were lost before them).
    pub missed_pages: u64,
    /// Sum of the lost-event counts the kernel stored; pages without a stored count add none.
    pub missed_events: u64,
    /// Flagged pages without a stored count (the page was too full to hold it): more events
    /// than `missed_events` were lost, how many is unknown.
    pub missed_uncounted_pages: u64,
    /// Records per event id (`common_type`).
    pub per_type: BTreeMap<u16, u64>,
    /// Smallest event time.
    pub first_ts: Option<u64>,
    /// Largest event time.
    pub last_ts: Option<u64>,
    /// Records whose time is lower than the previous record's on the same CPU.
    pub ts_backwards: u64,
    /// Time of the last record fed, to detect `ts_backwards` across pages.
    previous_ts: Option<u64>,
}

impl EventCounts {
    /// Adds one page of `layout.page_size()` bytes.
    pub fn add_page(&mut self, layout: &PageLayout, page: &[u8]) -> Result<(), TraceDatError> {
        let index = self.pages;
        let wrap = |source| TraceDatError::Page {
            page: index,
            source,
        };
        let page = layout.page(page).map_err(wrap)?;
        self.pages += 1;
        match page.missed {
            MissedEvents::None => {}
            MissedEvents::Unknown => {
                self.missed_pages += 1;
                self.missed_uncounted_pages += 1;
            }
            MissedEvents::Count(n) => {
                self.missed_pages += 1;
                self.missed_events = self.missed_events.saturating_add(n);
            }
        }
        for event in page.events() {
            let event = event.map_err(wrap)?;
            self.events += 1;
            *self.per_type.entry(event.common_type).or_default() += 1;
            self.first_ts = Some(self.first_ts.map_or(event.ts, |t| t.min(event.ts)));
            self.last_ts = Some(self.last_ts.map_or(event.ts, |t| t.max(event.ts)));
            if self.previous_ts.is_some_and(|previous| event.ts < previous) {
                self.ts_backwards += 1;
            }
            self.previous_ts = Some(event.ts);
        }
        Ok(())
    }

    /// Adds the totals of another CPU.
    pub fn merge(&mut self, other: &EventCounts) {
        self.events += other.events;
        self.pages += other.pages;
        self.missed_pages += other.missed_pages;
        self.missed_events = self.missed_events.saturating_add(other.missed_events);
        self.missed_uncounted_pages += other.missed_uncounted_pages;
        for (id, n) in &other.per_type {
            *self.per_type.entry(*id).or_default() += n;
        }
        self.first_ts = pick_some(self.first_ts, other.first_ts, u64::min);
        self.last_ts = pick_some(self.last_ts, other.last_ts, u64::max);
        self.ts_backwards += other.ts_backwards;
        // Whatever is fed next belongs to neither stream.
        self.previous_ts = None;
    }
}

fn pick_some(a: Option<u64>, b: Option<u64>, pick: fn(u64, u64) -> u64) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(pick(a, b)),
        (a, b) => a.or(b),
    }
}

impl PageLayout {
    /// Counts the events of one CPU's raw pages; `data.len()` must be a multiple of the page
    /// size. The error names the page (0-based) that is corrupt.
    pub fn count_events(&self, data: &[u8]) -> Result<EventCounts, TraceDatError> {
        let partial = data.len() % self.page_size();
        if partial != 0 {
            return Err(TraceDatError::Page {
                page: u64::try_from(data.len() / self.page_size()).unwrap_or(u64::MAX),
                source: PageError::new(0, format!("the data ends {partial} bytes into the page")),
            });
        }
        let mut counts = EventCounts::default();
        for page in data.chunks_exact(self.page_size()) {
            counts.add_page(self, page)?;
        }
        Ok(counts)
    }
}
