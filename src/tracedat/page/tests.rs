//! Hand-built pages: each test writes the bytes the kernel would and checks what we decode.

use super::*;
use crate::tracedat::EventCounts;
use proptest::prelude::*;

const HEADER_PAGE_64: &[u8] = include_bytes!("../../../tests/data/tracedat/header_page_64.txt");
const HEADER_EVENT: &[u8] = include_bytes!("../../../tests/data/tracedat/header_event.txt");
const HEADER_PAGE_32: &[u8] = b"\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n\
\tfield: local_t commit;\toffset:8;\tsize:4;\tsigned:1;\n\
\tfield: int overwrite;\toffset:8;\tsize:1;\tsigned:1;\n\
\tfield: char data;\toffset:12;\tsize:4084;\tsigned:0;\n";

fn layout() -> PageLayout {
    PageLayout::parse(HEADER_PAGE_64, HEADER_EVENT, 4096).unwrap()
}

/// Builds one 4096-byte page for the 64-bit layout.
struct PageBuilder {
    timestamp: u64,
    data: Vec<u8>,
    flags: u64,
    stored_missed: Option<u64>,
}

fn header(type_len: u32, delta: u32) -> [u8; 4] {
    (type_len | (delta << 5)).to_le_bytes()
}

fn payload(common_type: u16, len: usize) -> Vec<u8> {
    let mut p = vec![0xab; len];
    p[..2].copy_from_slice(&common_type.to_le_bytes());
    p
}

impl PageBuilder {
    fn new(timestamp: u64) -> Self {
        PageBuilder {
            timestamp,
            data: Vec::new(),
            flags: 0,
            stored_missed: None,
        }
    }

    /// A data event with `type_len = payload.len() / 4`.
    fn small(mut self, delta: u32, payload: &[u8]) -> Self {
        assert!(payload.len() % 4 == 0 && payload.len() <= 112);
        let type_len = u32::try_from(payload.len() / 4).unwrap();
        self.data.extend_from_slice(&header(type_len, delta));
        self.data.extend_from_slice(payload);
        self
    }

    /// A data event with type_len 0 and its length in array[0].
    fn long(mut self, delta: u32, payload: &[u8]) -> Self {
        self.data.extend_from_slice(&header(0, delta));
        let array0 = u32::try_from(payload.len() + 4).unwrap();
        self.data.extend_from_slice(&array0.to_le_bytes());
        self.data.extend_from_slice(payload);
        while self.data.len() % 4 != 0 {
            self.data.push(0);
        }
        self
    }

    fn time_extend(mut self, delta: u64) -> Self {
        let low = u32::try_from(delta & ((1 << 27) - 1)).unwrap();
        let high = u32::try_from(delta >> 27).unwrap();
        self.data.extend_from_slice(&header(30, low));
        self.data.extend_from_slice(&high.to_le_bytes());
        self
    }

    fn absolute(mut self, ts: u64) -> Self {
        let low = u32::try_from(ts & ((1 << 27) - 1)).unwrap();
        let high = u32::try_from((ts >> 27) & 0xffff_ffff).unwrap();
        self.data.extend_from_slice(&header(31, low));
        self.data.extend_from_slice(&high.to_le_bytes());
        self
    }

    /// Padding (a discarded event) of `len` bytes in total.
    fn padding(mut self, delta: u32, len: u32) -> Self {
        self.data.extend_from_slice(&header(29, delta));
        self.data.extend_from_slice(&(len - 4).to_le_bytes());
        self.data
            .resize(self.data.len() + usize::try_from(len).unwrap() - 8, 0);
        self
    }

    fn null_padding(mut self) -> Self {
        self.data.extend_from_slice(&header(29, 0));
        self
    }

    fn missed(mut self, stored: Option<u64>) -> Self {
        self.flags |= RB_MISSED_EVENTS;
        if stored.is_some() {
            self.flags |= RB_MISSED_STORED;
        }
        self.stored_missed = stored;
        self
    }

    fn build(self) -> Vec<u8> {
        let mut page = vec![0; 4096];
        page[..8].copy_from_slice(&self.timestamp.to_le_bytes());
        let mut commit = u64::try_from(self.data.len()).unwrap() | self.flags;
        if commit & RB_MISSED_EVENTS != 0 {
            commit |= 0xffff_ffff << 32; // sign-extended, as the kernel's local_add leaves it
        }
        page[8..16].copy_from_slice(&commit.to_le_bytes());
        page[16..16 + self.data.len()].copy_from_slice(&self.data);
        if let Some(n) = self.stored_missed {
            let at = 16 + self.data.len();
            page[at..at + 8].copy_from_slice(&n.to_le_bytes());
        }
        page
    }
}

fn events(page: &[u8]) -> Vec<(u64, u16, usize)> {
    let layout = layout();
    let page = layout.page(page).unwrap();
    page.events()
        .map(|e| e.map(|e| (e.ts, e.common_type, e.payload.len())))
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn header_page_of_64_bit_guest_gives_layout() {
    let layout = layout();

    assert_eq!(layout.long_size(), 8);
    assert_eq!(layout.data_offset(), 16);
    assert_eq!(layout.page_size(), 4096);
}

#[test]
fn header_page_of_32_bit_guest_gives_4_byte_commit() {
    let layout = PageLayout::parse(HEADER_PAGE_32, HEADER_EVENT, 4096).unwrap();

    assert_eq!((layout.long_size(), layout.data_offset()), (4, 12));
}

#[test]
fn empty_header_page_is_an_error() {
    let err = PageLayout::parse(b"", HEADER_EVENT, 4096).unwrap_err();

    assert!(err.to_string().contains("empty"), "{err}");
}

#[test]
fn header_page_without_commit_is_an_error() {
    let text = b"\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n\
\tfield: char data;\toffset:16;\tsize:4080;\tsigned:0;\n";

    assert!(matches!(
        PageLayout::parse(text, HEADER_EVENT, 4096),
        Err(TraceDatError::HeaderPage(_))
    ));
}

#[test]
fn header_event_with_other_bit_widths_is_an_error() {
    let text = String::from_utf8(HEADER_EVENT.to_vec())
        .unwrap()
        .replace("27 bits", "26 bits");

    assert!(matches!(
        PageLayout::parse(HEADER_PAGE_64, text.as_bytes(), 4096),
        Err(TraceDatError::HeaderEvent(_))
    ));
}

#[test]
fn page_size_not_a_power_of_two_is_an_error() {
    assert!(PageLayout::parse(HEADER_PAGE_64, HEADER_EVENT, 6000).is_err());
    assert!(PageLayout::parse(HEADER_PAGE_64, HEADER_EVENT, 2048).is_err());
}

#[test]
fn small_events_add_their_deltas_to_the_page_time() {
    let page = PageBuilder::new(1000)
        .small(5, &payload(7, 8))
        .small(10, &payload(8, 112))
        .build();

    assert_eq!(events(&page), [(1005, 7, 8), (1015, 8, 112)]);
}

#[test]
fn long_event_takes_its_length_from_array0() {
    let page = PageBuilder::new(1)
        .long(2, &payload(9, 130))
        .small(1, &payload(3, 4))
        .build();

    assert_eq!(events(&page), [(3, 9, 130), (4, 3, 4)]);
}

#[test]
fn time_extend_adds_a_wide_delta() {
    let extend = (5u64 << 40) + 12345;
    let page = PageBuilder::new(100)
        .time_extend(extend)
        .small(3, &payload(1, 4))
        .build();

    assert_eq!(events(&page), [(100 + extend + 3, 1, 4)]);
}

#[test]
fn absolute_time_stamp_replaces_the_time_keeping_its_top_bits() {
    let page_ts = (0x18 << 59) | 77;
    let absolute = 0x0123_4567_89ab;
    let page = PageBuilder::new(page_ts)
        .small(1, &payload(1, 4))
        .absolute(absolute)
        .small(2, &payload(2, 4))
        .build();

    assert_eq!(
        events(&page),
        [(page_ts + 1, 1, 4), ((0x18 << 59) | (absolute + 2), 2, 4)]
    );
}

#[test]
fn padding_is_skipped_and_its_delta_counts() {
    let page = PageBuilder::new(0)
        .padding(4, 24)
        .small(1, &payload(5, 4))
        .build();

    assert_eq!(events(&page), [(5, 5, 4)]);
}

#[test]
fn null_padding_ends_the_page() {
    let page = PageBuilder::new(0)
        .small(1, &payload(5, 4))
        .null_padding()
        .small(1, &payload(6, 4))
        .build();

    assert_eq!(events(&page), [(1, 5, 4)]);
}

#[test]
fn missed_events_with_stored_count_are_reported() {
    let page = PageBuilder::new(0)
        .small(1, &payload(5, 4))
        .missed(Some(42))
        .build();

    let parsed = layout().page(&page).unwrap();

    assert_eq!(parsed.missed, MissedEvents::Count(42));
    assert_eq!(parsed.data_len(), 8);
    assert_eq!(parsed.events().count(), 1);
}

#[test]
fn missed_events_without_room_for_a_count_are_unknown() {
    let page = PageBuilder::new(0).missed(None).build();

    assert_eq!(layout().page(&page).unwrap().missed, MissedEvents::Unknown);
}

#[test]
fn missed_stored_without_missed_events_is_an_error() {
    let mut page = PageBuilder::new(0).build();
    page[8..16].copy_from_slice(&RB_MISSED_STORED.to_le_bytes());

    assert!(layout().page(&page).is_err());
}

#[test]
fn missed_events_flag_without_sign_extension_is_read_too() {
    let mut page = PageBuilder::new(0).small(1, &payload(5, 4)).build();
    page[8..16].copy_from_slice(&(8 | RB_MISSED_EVENTS).to_le_bytes());

    let parsed = layout().page(&page).unwrap();

    assert_eq!(
        (parsed.missed, parsed.data_len()),
        (MissedEvents::Unknown, 8)
    );
}

#[test]
fn sign_extension_without_missed_events_is_an_error() {
    let mut page = PageBuilder::new(0).build();
    page[8..16].copy_from_slice(&(0xffff_ffff_0000_0008u64).to_le_bytes());

    assert!(layout().page(&page).is_err());
}

#[test]
fn commit_larger_than_the_page_is_an_error() {
    let mut page = PageBuilder::new(0).build();
    page[8..16].copy_from_slice(&4081u64.to_le_bytes());

    let err = layout().page(&page).unwrap_err();

    assert!(err.what.contains("4080"), "{err}");
}

#[test]
fn commit_with_high_bits_is_an_error() {
    let mut page = PageBuilder::new(0).build();
    page[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());

    assert!(layout().page(&page).is_err());
}

#[test]
fn event_overrunning_the_commit_is_an_error() {
    let mut page = PageBuilder::new(0).small(1, &payload(5, 16)).build();
    page[8..16].copy_from_slice(&12u64.to_le_bytes()); // the event has 20 bytes

    let results: Vec<_> = layout().page(&page).unwrap().events().collect();

    assert_eq!(results.len(), 1);
    assert_eq!(results[0].as_ref().unwrap_err().offset, 16);
}

#[test]
fn long_event_with_length_below_4_is_an_error() {
    let mut page = PageBuilder::new(0).long(1, &payload(5, 8)).build();
    page[20..24].copy_from_slice(&3u32.to_le_bytes());

    assert!(layout()
        .page(&page)
        .unwrap()
        .events()
        .next()
        .unwrap()
        .is_err());
}

#[test]
fn page_of_wrong_length_is_an_error() {
    assert!(layout().page(&[0; 100]).is_err());
}

#[test]
fn counts_add_up_pages_events_types_and_missed_events() {
    let data = [
        PageBuilder::new(100)
            .small(1, &payload(7, 4))
            .small(1, &payload(8, 4))
            .build(),
        PageBuilder::new(90)
            .small(0, &payload(7, 4))
            .missed(Some(5))
            .build(),
        PageBuilder::new(200).missed(None).build(),
    ]
    .concat();

    let counts = layout().count_events(&data).unwrap();

    assert_eq!(counts.pages, 3);
    assert_eq!(counts.events, 3);
    assert_eq!(counts.per_type.get(&7), Some(&2));
    assert_eq!(counts.per_type.get(&8), Some(&1));
    assert_eq!((counts.missed_pages, counts.missed_events), (2, 5));
    assert_eq!(counts.missed_uncounted_pages, 1);
    assert_eq!((counts.first_ts, counts.last_ts), (Some(90), Some(102)));
    assert_eq!(counts.ts_backwards, 1);
}

#[test]
fn counting_a_partial_page_is_an_error() {
    assert!(layout().count_events(&[0; 5000]).is_err());
}

#[test]
fn merge_sums_counts_and_spans_times() {
    let layout = layout();
    let a = layout
        .count_events(&PageBuilder::new(10).small(0, &payload(1, 4)).build())
        .unwrap();
    let b = layout
        .count_events(&PageBuilder::new(5).small(0, &payload(2, 4)).build())
        .unwrap();

    let mut total = EventCounts::default();
    total.merge(&a);
    total.merge(&b);

    assert_eq!((total.events, total.pages), (2, 2));
    assert_eq!((total.first_ts, total.last_ts), (Some(5), Some(10)));
    assert_eq!(total.ts_backwards, 0);
}

proptest! {
    #[test]
    fn random_page_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 4080),
                                     commit in any::<u64>(), small_commit in 0u64..4200) {
        let layout = layout();
        for commit in [commit, small_commit, small_commit | RB_MISSED_EVENTS | RB_MISSED_STORED] {
            let mut page = vec![0; 16];
            page[8..16].copy_from_slice(&commit.to_le_bytes());
            page.extend_from_slice(&body);
            if let Ok(parsed) = layout.page(&page) {
                for event in parsed.events().flatten() {
                    prop_assert!(event.payload.len() >= 2);
                }
            }
        }
    }
}
