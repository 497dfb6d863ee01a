//! Each rule of the sanitizer on a hand-made format or page. Which of these crashed trace-cmd
//! 3.1.6 is shown in `tests/tracedat_hostile.rs`, against the real program.

use super::print_fmt::{number, tokenize, Tok};
use super::*;
use crate::tracedat::page::{PageLayout, RB_MISSED_EVENTS};
use std::io::Write;

const HEADER_PAGE: &[u8] = include_bytes!("../../../tests/data/tracedat/header_page_64.txt");
const HEADER_EVENT: &[u8] = include_bytes!("../../../tests/data/tracedat/header_event.txt");

const COMMON: &str = "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n";
const VALUE: &str = "\tfield:unsigned int value;\toffset:8;\tsize:4;\tsigned:0;\n";
const NAME: &str = "\tfield:__data_loc char[] name;\toffset:12;\tsize:4;\tsigned:0;\n";

/// A format named `x` with id 7: the kernel's common fields, `fields`, and `print fmt: {print}`.
fn format_text(fields: &str, print: &str) -> Vec<u8> {
    format!("name: x\nID: 7\nformat:\n{COMMON}\n{fields}\nprint fmt: {print}\n").into_bytes()
}

fn check(fields: &str, print: &str) -> Result<CheckedFormat, FormatProblem> {
    check_event_format(&format_text(fields, print))
}

fn refused(fields: &str, print: &str) -> String {
    match check(fields, print) {
        Ok(_) => panic!("accepted: fields {fields:?}, print fmt {print:?}"),
        Err(e) => e.to_string(),
    }
}

const SCHED_SWITCH: &str = "name: sched_switch\nID: 372\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;\n\
\tfield:int prev_prio;\toffset:28;\tsize:4;\tsigned:1;\n\
\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;\n\
\tfield:char next_comm[16];\toffset:40;\tsize:16;\tsigned:0;\n\
\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;\n\
\tfield:int next_prio;\toffset:60;\tsize:4;\tsigned:1;\n\n\
print fmt: \"prev_comm=%s prev_pid=%d prev_prio=%d prev_state=%s%s ==> next_comm=%s next_pid=%d \
next_prio=%d\", REC->prev_comm, REC->prev_pid, REC->prev_prio, (REC->prev_state & ((((0x00000000 \
+ 1) << 1) << 1) - 1)) ? __print_flags(REC->prev_state & ((((0x00000000 + 1) << 1) << 1) - 1), \
\"|\", { 0x00000001, \"S\" }, { 0x00000002, \"D\" }) : \"R\", \
REC->prev_state & ((((0x00000000 + 1) << 1) << 1) - 1) ? \"+\" : \"\", \
REC->next_comm, REC->next_pid, REC->next_prio\n";

#[test]
fn kernel_sched_switch_format_passes() {
    let format = check_event_format(SCHED_SWITCH.as_bytes()).unwrap();

    assert_eq!((format.name.as_str(), format.id), ("sched_switch", 372));
    let names: Vec<_> = format.field_names().collect();
    assert_eq!(names[3..6], ["common_pid", "prev_comm", "prev_pid"]);
}

#[test]
fn format_without_print_fmt_passes() {
    let text = format!("name: x\nID: 7\nformat:\n{COMMON}\n{VALUE}\n");

    assert!(check_event_format(text.as_bytes()).is_ok());
}

#[test]
fn text_that_is_not_printable_ascii_is_refused() {
    for bad in [b'\0', 0x01, b'\r', 0x7f, 0xc3] {
        let mut text = format_text(VALUE, "\"%u\", REC->value");
        text[30] = bad;
        let err = check_event_format(&text).unwrap_err();
        assert!(
            matches!(err, FormatProblem::NotText { offset: 30, .. }),
            "{bad:#x}: {err}"
        );
    }
}

#[test]
fn oversized_texts_are_refused() {
    let big = format!("\"{}\"", "x".repeat(MAX_PRINT_FMT));
    assert!(refused(VALUE, &big).contains("print fmt has"));
    let huge = vec![b'x'; MAX_FORMAT_TEXT + 1];
    assert!(matches!(
        check_event_format(&huge),
        Err(FormatProblem::TooLong { .. })
    ));
}

#[test]
fn name_id_and_format_lines_are_required_and_plain() {
    let cases: [&[u8]; 7] = [
        b"ID: 7\nformat:\n",
        b"name: x y\nID: 7\nformat:\n",
        b"name: ../x\nID: 7\nformat:\n",
        b"name: x\nID: 65536\nformat:\n",
        b"name: x\nID: 010\nformat:\n",
        b"name: x\nID: -1\nformat:\n",
        b"name: x\nID: 7\n",
    ];
    for text in cases {
        let err = check_event_format(text).unwrap_err();
        assert!(matches!(err, FormatProblem::Line { .. }), "{err}");
    }
}

#[test]
fn field_lines_must_be_sane() {
    let cases = [
        "\tfield:unsigned int value;\toffset:65535;\tsize:4;\tsigned:0;\n",
        "\tfield:unsigned int value;\toffset:8;\tsize:4294967295;\tsigned:0;\n",
        "\tfield:unsigned int value;\toffset:-8;\tsize:4;\tsigned:0;\n",
        "\tfield:unsigned int value;\toffset:08;\tsize:4;\tsigned:0;\n",
        "\tfield:unsigned int value;\tsize:4;\toffset:8;\tsigned:0;\n",
        "\tfield:value;\toffset:8;\tsize:4;\tsigned:0;\n",
        "\tfield:unsigned int value[2][2];\toffset:8;\tsize:4;\tsigned:0;\n",
        "\tfield:unsigned int (value);\toffset:8;\tsize:4;\tsigned:0;\n",
        "\tfield:__data_loc char[] name;\toffset:8;\tsize:8;\tsigned:0;\n",
        "\tfield:unsigned int value;\toffset:8;\tsize:4;\tsigned:0\n",
        "garbage\n",
    ];
    for fields in cases {
        refused(fields, "\"x\"");
    }
    let long_decl = format!(
        "\tfield:unsigned {}value;\toffset:8;\tsize:4;\tsigned:0;\n",
        "int ".repeat(MAX_FIELD_DECL)
    );
    refused(&long_decl, "\"x\"");
    let many = VALUE.repeat(MAX_FIELDS);
    assert!(refused(&many, "\"x\"").contains("more than"));
}

#[test]
fn declarations_parse_as_libtraceevent_reads_them() {
    let check_decl = |decl: &str| parse_decl(decl).map(|d| (d.name, d.type_text, d.array));

    assert_eq!(
        check_decl("__data_loc char[] name").unwrap(),
        ("name".into(), "__data_loc char[]".into(), true)
    );
    assert_eq!(
        check_decl("unsigned long caller[8]").unwrap(),
        ("caller".into(), "unsigned long[8]".into(), true)
    );
    assert_eq!(check_decl("const char * filename").unwrap().0, "filename");
    assert_eq!(
        check_decl("const char __attribute__((user)) * buf")
            .unwrap()
            .0,
        "buf"
    );
    assert!(check_decl("int").is_err());
    assert!(check_decl("int *").is_err());
}

#[test]
fn common_fields_must_be_the_kernels() {
    let no_type =
        "name: x\nID: 7\nformat:\n\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\n";
    let moved_type = "name: x\nID: 7\nformat:\n\
\tfield:unsigned short common_type;\toffset:100;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\n";
    let no_pid = "name: x\nID: 7\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\n";
    for text in [no_type, moved_type, no_pid] {
        assert!(check_event_format(text.as_bytes()).is_err(), "{text}");
    }
}

#[test]
fn deep_nesting_and_long_operator_chains_are_refused() {
    let nest = |depth: usize| {
        format!(
            "\"%u\", {}REC->value{}",
            "(".repeat(depth),
            ")".repeat(depth)
        )
    };
    assert!(check(VALUE, &nest(MAX_PRINT_FMT_NESTING - 1)).is_ok());
    assert!(refused(VALUE, &nest(MAX_PRINT_FMT_NESTING + 1)).contains("nested"));
    let chains = [
        format!("\"%u\", {}REC->value", "!".repeat(MAX_PRINT_FMT_EXPR_DEPTH)),
        format!(
            "\"%u\", REC->value{}",
            " + 1".repeat(MAX_PRINT_FMT_EXPR_DEPTH)
        ),
        format!(
            "\"%u\", {}REC->value",
            "(int)".repeat(MAX_PRINT_FMT_EXPR_DEPTH)
        ),
    ];
    for print in chains {
        assert!(refused(VALUE, &print).contains("deeper"));
    }
    // Long comma-separated lists are read in loops: they pass.
    let symbols: Vec<String> = (0..1000).map(|i| format!("{{ {i}, \"s{i}\" }}")).collect();
    let table = format!(
        "\"%s\", __print_symbolic(REC->value, {})",
        symbols.join(", ")
    );
    assert!(check(VALUE, &table).is_ok());
}

#[test]
fn unbalanced_print_fmts_are_refused() {
    for print in [
        "\"%u\", ((REC->value",
        "\"%u\", REC->value))",
        "\"%u\", (REC->value]",
    ] {
        refused(VALUE, print);
    }
}

#[test]
fn unclosed_literals_are_checked_up_to_where_libtraceevent_stops() {
    // libtraceevent fails there and prints raw fields: fine.
    assert!(check(VALUE, "\"%u, REC->value").is_ok());
    // A raw tab ends a literal for it; the rest is not parsed (maple_tree's real formats).
    assert!(check(VALUE, "\"%s\tNode: %p (%lu)\", REC->value").is_ok());
    // What it parses before the failure still counts.
    assert!(refused(VALUE, "\"%d\", 1 / 0, \"abc").contains("division"));
    let deep = format!("\"%d\", {}\"abc", "(".repeat(MAX_PRINT_FMT_NESTING + 1));
    assert!(refused(VALUE, &deep).contains("nested"));
}

#[test]
fn divisions_need_a_positive_constant_divisor() {
    for ok in [
        "\"%u\", REC->value / 250",
        "\"%u\", REC->value / 1000L, REC->value",
        "\"%u\", (REC->value / sizeof(u64))",
        "\"%u\", REC->value % 64 + 1",
    ] {
        assert!(check(VALUE, ok).is_ok(), "{ok}");
    }
    for bad in [
        "\"%u\", REC->value / 0",
        "\"%u\", REC->value / 0x0",
        "\"%u\", 5 / REC->value",
        "\"%u\", 5 % REC->value",
        "\"%u\", REC->value / -1",
        "\"%u\", REC->value / FOO",
        "\"%u\", REC->value / 2 * 0",
        "\"%u\", REC->value / (2 - 2)",
        "\"%u\", REC->value / 2 [0]",
    ] {
        assert!(refused(VALUE, bad).contains("division"), "{bad}");
    }
}

#[test]
fn static_widths_are_bounded() {
    assert!(check(
        VALUE,
        "\"%08x %-20u %.3d\", REC->value, REC->value, REC->value"
    )
    .is_ok());
    for bad in [
        "\"%999999999d\", REC->value",
        "\"%.999999999d\", REC->value",
    ] {
        assert!(refused(VALUE, bad).contains("width"), "{bad}");
    }
}

#[test]
fn field_indices_must_be_small_constants() {
    let array = format!(
        "\tfield:unsigned long caller[8];\toffset:8;\tsize:64;\tsigned:0;\n{}",
        NAME.replace("offset:12", "offset:72")
    );
    for ok in [
        "\"%lx\", REC->caller[7]",
        "\"%lx\", (REC->caller)[0]",
        // ras:mc_event does this; libtraceevent reads no record bytes for it.
        "\"%s\", __get_str(name)[0] ? \" \" : \"\"",
    ] {
        assert!(check(&array, ok).is_ok(), "{ok}");
    }
    for bad in [
        "\"%lx\", REC->caller[REC->caller]",
        "\"%lx\", REC->caller[100000000]",
        "\"%lx\", (REC->caller)[REC->caller]",
        "\"%x\", __get_dynamic_array(name)[REC->caller]",
    ] {
        refused(&array, bad);
    }
}

#[test]
fn plugin_pointer_functions_need_a_dynamic_array() {
    let buf = "\tfield:__data_loc u8[] buf;\toffset:8;\tsize:4;\tsigned:0;\n";
    assert!(check(buf, "\"%d\", __le16_to_cpup(__get_dynamic_array(buf))").is_ok());
    refused(VALUE, "\"%d\", __le16_to_cpup(REC->value)");
    refused(buf, "\"%s\", scsi_trace_parse_cdb(p, REC->buf, 6)");
}

#[test]
fn print_hex_lengths_must_be_evaluable() {
    let fields = format!("{VALUE}{NAME}");
    for ok in [
        "\"%s\", __print_hex(REC->value, REC->value)",
        "\"%s\", __print_hex(__get_dynamic_array(name), __get_dynamic_array_len(name))",
        "\"%s\", __print_array(__get_dynamic_array(name), \
         __get_dynamic_array_len(name) / sizeof(u64), sizeof(u64))",
    ] {
        assert!(check(&fields, ok).is_ok(), "{ok}");
    }
    for bad in [
        "\"%s\", __print_hex(REC->value + 1, 4)",
        "\"%s\", __print_hex(REC->value, REC->value * 2 + 1)",
        "\"%s\", __print_hex(REC->value, (int)REC->value)",
        "\"%s\", __print_array(REC->value, 4)",
    ] {
        refused(&fields, bad);
    }
}

#[test]
fn star_arguments_must_be_evaluable() {
    let fields = format!("{VALUE}{NAME}");
    assert!(check(&fields, "\"%.*s\", REC->value, __get_str(name)").is_ok());
    assert!(check(&fields, "\"%*pbl\", (1 << 10), REC->value").is_ok());
    refused(&fields, "\"%*d\", REC->value ? 1 : 2, REC->value");
}

#[test]
fn tokens_are_split_as_libtraceevent_splits_them() {
    let (tokens, complete) = tokenize("\"a\" \"b\", REC->x >>= 2 != '\\'' foo_1");
    assert!(complete);

    assert_eq!(
        tokens,
        [
            Tok::Str("ab".into()),
            Tok::Delim(b','),
            Tok::Item("REC".into()),
            Tok::Op("->".into()),
            Tok::Item("x".into()),
            Tok::Op(">>=".into()),
            Tok::Item("2".into()),
            Tok::Op("!=".into()),
            Tok::Char,
            Tok::Item("foo_1".into()),
        ]
    );
}

#[test]
fn numbers_read_like_strtoull_base_0() {
    assert_eq!(number("1000L"), Some(1000));
    assert_eq!(number("0x10"), Some(16));
    assert_eq!(number("010"), Some(8));
    assert_eq!(number("0"), Some(0));
    assert_eq!(number("99999999999999999999999"), Some(u64::MAX));
    assert_eq!(number("FOO"), None);
}

fn admit_all(texts: &[(&str, Vec<u8>)]) -> (FormatSet, Vec<Result<u16, FormatProblem>>) {
    let mut set = FormatSet::new();
    let results = texts
        .iter()
        .map(|(system, text)| set.admit(system, text).map(|f| f.id))
        .collect();
    (set, results)
}

#[test]
fn a_format_set_keeps_the_first_of_two_ids_or_names() {
    let other_id = format_text(VALUE, "\"x\"").into_iter().collect::<Vec<u8>>();
    let renamed = String::from_utf8(other_id.clone())
        .unwrap()
        .replace("name: x", "name: y");
    let moved = String::from_utf8(other_id.clone())
        .unwrap()
        .replace("ID: 7", "ID: 8");

    let (set, results) = admit_all(&[
        ("a", other_id.clone()),
        ("b", renamed.into_bytes()),
        ("a", moved.clone().into_bytes()),
        ("b", moved.into_bytes()),
        ("bad/system", other_id),
    ]);

    assert_eq!(results[0], Ok(7));
    assert!(matches!(
        results[1],
        Err(FormatProblem::DuplicateId { id: 7, .. })
    ));
    assert!(matches!(results[2], Err(FormatProblem::DuplicateName(_))));
    assert_eq!(results[3], Ok(8));
    assert_eq!(results[4], Err(FormatProblem::SystemName));
    assert_eq!(set.len(), 2);
}

#[test]
fn a_format_set_refuses_other_common_fields() {
    let first = format_text(VALUE, "\"x\"");
    let other = String::from_utf8(first.clone())
        .unwrap()
        .replace("ID: 7", "ID: 8")
        .replace("common_flags;\toffset:2", "common_flags;\toffset:3");

    let (_, results) = admit_all(&[("a", first), ("b", other.into_bytes())]);

    assert_eq!(results[1], Err(FormatProblem::CommonFields));
}

#[test]
fn kernel_headers_pass_and_moved_fields_are_refused() {
    let layout = check_headers(HEADER_PAGE, HEADER_EVENT, 4096).unwrap();
    assert_eq!((layout.long_size(), layout.data_offset()), (8, 16));

    let header = std::str::from_utf8(HEADER_PAGE).unwrap();
    let moved = [
        header.replace("offset:16;\tsize:4080", "offset:24;\tsize:4072"),
        header
            .replace("u64 timestamp;\toffset:0", "u64 timestamp;\toffset:8")
            .replace("commit;\toffset:8", "commit;\toffset:0"),
        header.replace("size:4080", "size:8000"),
        format!("{header}\tfield: char junk;\toffset:0;\tsize:1;\tsigned:0;\n"),
    ];
    for text in moved {
        let err = check_headers(text.as_bytes(), HEADER_EVENT, 4096).unwrap_err();
        assert!(matches!(err, FormatProblem::Header(_)), "{err}");
    }
    assert!(check_header_text(&vec![b'x'; MAX_HEADER_TEXT + 1]).is_err());
}

// ---- pages ----

fn layout() -> PageLayout {
    check_headers(HEADER_PAGE, HEADER_EVENT, 4096).unwrap()
}

/// A page of 4096 bytes holding `records`, 100 ns apart: as small events (length in type_len)
/// up to 112 bytes, longer ones with their length in array[0].
fn page_of(records: &[Vec<u8>]) -> Vec<u8> {
    let mut data = Vec::new();
    for record in records {
        let mut record = record.clone();
        record.resize(record.len().next_multiple_of(4), 0);
        let words = u32::try_from(record.len() / 4).unwrap();
        if words <= 28 {
            data.extend_from_slice(&(words | (100 << 5)).to_le_bytes());
        } else {
            data.extend_from_slice(&(100u32 << 5).to_le_bytes());
            data.extend_from_slice(&(words * 4 + 4).to_le_bytes());
        }
        data.extend_from_slice(&record);
    }
    raw_page(&data)
}

fn raw_page(data: &[u8]) -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    page[..8].copy_from_slice(&1_000_000u64.to_le_bytes());
    page[8..16].copy_from_slice(&u64::try_from(data.len()).unwrap().to_le_bytes());
    page[16..16 + data.len()].copy_from_slice(data);
    page
}

/// A record of the test format `x` (id 7): common fields (pid 42), then `rest`.
fn record(rest: &[u8]) -> Vec<u8> {
    let mut r = 7u16.to_le_bytes().to_vec();
    r.extend_from_slice(&[0, 0]);
    r.extend_from_slice(&42i32.to_le_bytes());
    r.extend_from_slice(rest);
    r
}

fn set_of(fields: &str, print: &str) -> FormatSet {
    let mut set = FormatSet::new();
    set.admit("t", &format_text(fields, print)).unwrap();
    set
}

fn record_problem(set: &FormatSet, page: &[u8]) -> String {
    match check_page_records(&layout(), page, set) {
        Err(PageProblem::Record { what, .. }) => what,
        other => panic!("expected a record problem, got {other:?}"),
    }
}

#[test]
fn a_good_page_passes_with_its_counts() {
    let set = set_of(VALUE, "\"%u\", REC->value");
    let page = page_of(&[record(&7u32.to_le_bytes()), record(&8u32.to_le_bytes())]);

    let info = check_page_records(&layout(), &page, &set).unwrap();

    assert_eq!(info.events, 2);
    assert_eq!(
        (info.first_ts, info.last_ts),
        (Some(1_000_100), Some(1_000_200))
    );
    assert_eq!(check_page(&layout(), &page).unwrap(), info);
}

#[test]
fn corrupt_pages_are_refused() {
    let mut overrun = page_of(&[record(&[0; 4])]);
    overrun[8..16].copy_from_slice(&5000u64.to_le_bytes());
    let mut cut = raw_page(&[3 | (1 << 5), 7, 0, 0]);
    cut[8..16].copy_from_slice(&4u64.to_le_bytes());
    let mut flags = page_of(&[record(&[0; 4])]);
    flags[12] = 0x01; // bit 32 without RB_MISSED_EVENTS

    for page in [overrun, cut, flags, vec![0; 100]] {
        assert!(matches!(
            check_page(&layout(), &page),
            Err(PageProblem::Walk(_))
        ));
    }
}

#[test]
fn events_hidden_behind_a_null_padding_are_refused() {
    let mut data = 29u32.to_le_bytes().to_vec(); // null padding: type 29, delta 0
    data.extend_from_slice(&0u32.to_le_bytes()); // length 0: kbuffer reads on at +4
    data.extend_from_slice(&(3u32 | (1 << 5)).to_le_bytes());
    data.extend_from_slice(&record(&[0; 4]));

    let err = check_page(&layout(), &raw_page(&data)).unwrap_err();

    assert_eq!(err, PageProblem::HiddenEvents { offset: 16 });
    // A null padding that covers the rest of the data, as the kernel writes it, is fine.
    let mut tail = 29u32.to_le_bytes().to_vec();
    tail.extend_from_slice(&100u32.to_le_bytes());
    tail.resize(104, 0);
    assert!(check_page(&layout(), &raw_page(&tail)).is_ok());
}

#[test]
fn missed_event_flags_are_kept_in_the_info() {
    let mut page = page_of(&[record(&[0; 4])]);
    let commit = 16u64 | RB_MISSED_EVENTS | (0xffff_ffff << 32);
    page[8..16].copy_from_slice(&commit.to_le_bytes());

    let info = check_page(&layout(), &page).unwrap();

    assert_eq!(info.missed, crate::tracedat::MissedEvents::Unknown);
}

#[test]
fn records_shorter_than_their_fields_are_refused() {
    let set = set_of(VALUE, "\"%u\", REC->value");
    // 4 bytes: shorter than the common fields, whatever the id.
    let short = page_of(&[vec![9, 0, 0, 0]]);
    assert!(record_problem(&set, &short).contains("common fields"));
    let wide = set_of(
        "\tfield:char value[32];\toffset:8;\tsize:32;\tsigned:0;\n",
        "\"%s\", REC->value",
    );
    let page = page_of(&[record(b"abcd")]);
    assert!(record_problem(&wide, &page).contains("ends at byte 40"));
}

#[test]
fn dynamic_data_must_lie_inside_the_record() {
    let set = set_of(
        NAME.replace("offset:12", "offset:8").as_str(),
        "\"%s\", __get_str(name)",
    );
    let loc = |offset: u16, len: u16| [offset.to_le_bytes(), len.to_le_bytes()].concat();
    let ok = page_of(&[record(&[loc(12, 4), b"abc\0".to_vec()].concat())]);
    assert!(check_page_records(&layout(), &ok, &set).is_ok());
    let past = page_of(&[record(&[loc(12, 400), b"abc\0".to_vec()].concat())]);
    assert!(record_problem(&set, &past).contains("ends past"));
}

#[test]
fn strings_must_end_inside_the_page() {
    let set = set_of(
        "\tfield:__data_loc char[] name;\toffset:8;\tsize:4;\tsigned:0;\n",
        "\"%s\", __get_str(name)",
    );
    let loc = [12u16.to_le_bytes(), 4u16.to_le_bytes()].concat();
    // A 4072-byte record fills the page to its last byte: no NUL after the string's start.
    let unterminated = [loc.clone(), vec![b'z'; 4072 - 8 - 4]].concat();
    let page = page_of(&[record(&unterminated)]);
    assert!(record_problem(&set, &page).contains("not terminated"));
    let mut terminated = unterminated;
    terminated[100] = 0;
    assert!(check_page_records(&layout(), &page_of(&[record(&terminated)]), &set).is_ok());
}

#[test]
fn record_lengths_of_print_hex_and_stars_are_checked() {
    let fields = format!("{VALUE}{NAME}");
    let hex = set_of(&fields, "\"%s\", __print_hex(REC->value, REC->value)");
    let star = set_of(&fields, "\"%*d\", REC->value, REC->value");
    let loc = [16u16.to_le_bytes(), 4u16.to_le_bytes()].concat();
    let with =
        |value: u32| page_of(&[record(&[&value.to_le_bytes()[..], &loc, b"abc\0"].concat())]);

    assert!(check_page_records(&layout(), &with(4), &hex).is_ok());
    assert!(record_problem(&hex, &with(0xffff_ff00)).contains("past the record"));
    assert!(check_page_records(&layout(), &with(20), &star).is_ok());
    assert!(record_problem(&star, &with(0xffff_ffff)).contains("`*` width of -1"));
    assert!(record_problem(&star, &with(MAX_PRINT_WIDTH + 1)).contains("`*` width"));
}

#[test]
fn kvm_instructions_longer_than_15_bytes_are_refused() {
    let fields = "\tfield:__u8 len;\toffset:8;\tsize:1;\tsigned:0;\n\
\tfield:__u8 insn[15];\toffset:9;\tsize:15;\tsigned:0;\n";
    let text = String::from_utf8(format_text(fields, "\"x\""))
        .unwrap()
        .replace("name: x", "name: kvm_emulate_insn");
    let mut set = FormatSet::new();
    set.admit("kvm", text.as_bytes()).unwrap();
    let insn = |len: u8| {
        let mut rest = vec![len];
        rest.extend_from_slice(&[0x90; 15]);
        rest.push(0);
        page_of(&[record(&rest)])
    };

    assert!(check_page_records(&layout(), &insn(15), &set).is_ok());
    assert!(record_problem(&set, &insn(16)).contains("instruction length"));
}

#[test]
fn scans_keep_runs_of_good_pages_and_count_the_others() {
    let good = page_of(&[record(&[0; 4])]);
    let bad = vec![0xff; 4096];
    let data: Vec<u8> = [&good, &good, &bad, &good, &bad, &bad, &good]
        .iter()
        .flat_map(|p| p.iter().copied())
        .chain([0u8; 100])
        .collect();

    let scan = scan_cpu_data(&layout(), &data, None);

    assert_eq!(scan.good, [0..8192, 12288..16384, 24576..28672]);
    assert_eq!((scan.good_pages, scan.dropped_pages), (4, 4));
    assert_eq!(scan.good_bytes(), 4 * 4096);
    let indices: Vec<u64> = scan.problems.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, [2, 4, 5, 7]);

    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&data).unwrap();
    let len = u64::try_from(data.len()).unwrap();
    assert_eq!(scan_cpu_file(&layout(), &file, len, None).unwrap(), scan);
}

#[test]
fn scans_note_at_most_a_few_problems() {
    let data = vec![0xffu8; 4096 * (MAX_NOTED_PAGE_PROBLEMS + 5)];

    let scan = scan_cpu_data(&layout(), &data, None);

    assert_eq!(scan.problems.len(), MAX_NOTED_PAGE_PROBLEMS);
    assert_eq!(
        scan.dropped_pages,
        u64::try_from(MAX_NOTED_PAGE_PROBLEMS + 5).unwrap()
    );
}

#[test]
fn printk_lines_that_could_hang_a_bprint_record_are_dropped() {
    let text = b"0xffffffff8281a8ff : \"thaw_processes\"\n\
0xffffffff8281b739 : \"rcu %d of %s\\n\"\n\
0xffffffff81000000 : \"%999999999d\"\n\
0xffffffff81000001 : \"%*d\"\n\
0xffffffff81000002 : \"%.*s\"\n\
0xffffffff81000003 : \"a\"\n\
0xffffffff81000004 : \"\"\n\
garbage\n\
0xzz : \"text\"\n\
0xffffffff81000005 : \"ta\tb\"\n\
0xffffffff81000006 : \"100%% sure\"\n";

    let kept = sanitize_printk_formats(text);

    assert_eq!(
        String::from_utf8(kept.text).unwrap(),
        "0xffffffff8281a8ff : \"thaw_processes\"\n\
0xffffffff8281b739 : \"rcu %d of %s\\n\"\n\
0xffffffff81000006 : \"100%% sure\"\n"
    );
    assert_eq!(kept.dropped_lines, 8);
}

const BPRINT: &str = "name: bprint\nID: 6\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:unsigned long ip;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:const char * fmt;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:u32 buf[];\toffset:24;\tsize:0;\tsigned:0;\n\n\
print fmt: \"%ps: %s\", (void *)REC->ip, REC->fmt\n";

#[test]
fn bprint_records_need_a_nul_and_room_after_them() {
    let mut set = FormatSet::new();
    set.admit("ftrace", BPRINT.as_bytes()).unwrap();
    let bprint = |args: &[u8]| {
        let mut r = 6u16.to_le_bytes().to_vec();
        r.extend_from_slice(&[0, 0]);
        r.extend_from_slice(&42i32.to_le_bytes());
        r.extend_from_slice(&[0; 16]);
        r.extend_from_slice(args);
        r
    };

    let terminated = page_of(&[bprint(b"abc\0")]);
    assert!(check_page_records(&layout(), &terminated, &set).is_ok());
    // The record fills the page to its last byte.
    let full = page_of(&[bprint(&[b'z'; 4072 - 24])]);
    assert!(record_problem(&set, &full).contains("binary printk"));
}
