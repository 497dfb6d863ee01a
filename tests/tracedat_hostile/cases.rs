//! The hostile inputs: every shape that crashed or hung trace-cmd 3.1.6, the binary printk
//! cases, and the generators of the property tests.

use super::*;

/// A hostile input: formats (system, text) and records to put on a page.
pub struct Case {
    pub name: &'static str,
    pub formats: Vec<(&'static str, Vec<u8>)>,
    pub records: Vec<Vec<u8>>,
}

pub fn case(name: &'static str, fields: &str, print: &str, rest: &[u8]) -> Case {
    Case {
        name,
        formats: vec![("hostile", format_text("h", HOSTILE_ID, fields, print))],
        records: vec![record(HOSTILE_ID, rest)],
    }
}

pub fn named_case(name: &'static str, system: &'static str, event: &str, fields: &str) -> Case {
    Case {
        name,
        formats: vec![(system, format_text(event, HOSTILE_ID, fields, "\"x\""))],
        records: Vec::new(),
    }
}

impl Case {
    fn with_record(mut self, rest: &[u8]) -> Case {
        self.records.push(record(HOSTILE_ID, rest));
        self
    }
}

/// A print fmt printing `value` through `depth` nested parentheses.
pub fn nested(depth: usize) -> String {
    format!(
        "\"value=%u\", {}REC->value{}",
        "(".repeat(depth),
        ")".repeat(depth)
    )
}

pub const DATA_LOC_BUF: &str = "\tfield:__data_loc u8[] buf;\toffset:12;\tsize:4;\tsigned:0;\n";

/// The kernel's common fields with `common_type` or `common_pid` moved, in a format of id 1
/// (the lowest, whose common fields libtraceevent uses for every record).
pub fn moved_common(type_offset: u32, pid_offset: u32) -> Vec<u8> {
    let common = field("unsigned short common_type", type_offset, 2)
        + &field("int common_pid", pid_offset, 4);
    format!("name: h\nID: 1\nformat:\n{common}\n\nprint fmt: \"x\"\n").into_bytes()
}

/// Every shape found to crash or hang trace-cmd 3.1.6, and neighbours of them. The comments
/// say what the unsanitized input did.
pub fn hostile_cases() -> Vec<Case> {
    let nine = u32s(&[9]);
    let huge = u32s(&[0xffff_ff00]);
    let name_at_12 = format!("{VALUE}{}", field("__data_loc char[] name", 12, 4));
    let name_at_8 = field("__data_loc char[] name", 8, 4);
    let kvm_fields = [
        field("__u64 rip", 8, 8),
        field("__u32 csbase", 16, 4),
        field("__u32 len", 20, 4),
        field("__u8 insn[15]", 24, 15),
        field("__u8 flags", 39, 1),
        field("__u8 failed", 40, 1),
    ]
    .concat();
    let kvm_record = [&u32s(&[0, 0, 0, 100_000])[..], &[0x90; 15], &[0; 2]].concat();
    let sched_fields = field("char prev_comm[16]", 8, 60_000)
        + &field("int prev_pid", 12, 4)
        + &field("int next_pid", 16, 4);
    let stack_fields = field("int size", 8, 4) + &field("unsigned long caller[8]", 60_000, 64);
    let garbage: Vec<u8> = (0..5000u32)
        .map(|i| u8::try_from(i.wrapping_mul(2_654_435_761) >> 24).unwrap())
        .collect();
    let chain = |prefix: &str, n: usize, body: &str, suffix: &str| {
        format!("\"%u\", {}{body}{}", prefix.repeat(n), suffix.repeat(n))
    };
    vec![
        // SIGSEGV: 50,000 nested parentheses (the 400 KB sched_switch).
        case("deep_parentheses", VALUE, &nested(50_000), &nine),
        case("nesting_at_limit", VALUE, &nested(60), &nine),
        // SIGSEGV: operator chains of 30,000 to 100,000 without brackets.
        case(
            "not_chain",
            VALUE,
            &chain("!", 60_000, "REC->value", ""),
            &nine,
        ),
        case(
            "plus_chain",
            VALUE,
            &chain("", 60_000, "REC->value", " + 1"),
            &nine,
        ),
        case(
            "ternary_chain",
            VALUE,
            &chain("REC->value ? ", 40_000, "1", " : 2"),
            &nine,
        ),
        case(
            "cast_chain",
            VALUE,
            &chain("(int)", 60_000, "REC->value", ""),
            &nine,
        ),
        case(
            "call_nesting",
            VALUE,
            &chain("__print_symbolic(", 40_000, "REC->value", ", {0,\"a\"})"),
            &nine,
        ),
        // SIGBUS/SIGSEGV: a %s field far bigger than or far past the record.
        case(
            "string_size_huge",
            &field("char value[16]", 8, 100_000_000),
            "\"%s\", REC->value",
            &nine,
        ),
        case(
            "string_offset_huge",
            &field("char value[16]", 100_000_000, 16),
            "\"%s\", REC->value",
            &nine,
        ),
        case(
            "rest_of_record_past_it",
            &field("char value[]", 5000, 0),
            "\"%s\", REC->value",
            &nine,
        ),
        case(
            "string_past_record",
            &field("char value[3000]", 8, 3000),
            "\"%s\", REC->value",
            &nine,
        ),
        // SIGBUS: __print_hex/__print_array lengths from the format or the record.
        case(
            "hex_length_constant",
            VALUE,
            "\"%s\", __print_hex(REC->value, 100000000)",
            &nine,
        ),
        case(
            "hex_length_from_record",
            VALUE,
            "\"%s\", __print_hex(REC->value, REC->value)",
            &huge,
        ),
        case(
            "hex_str_length_from_record",
            VALUE,
            "\"%s\", __print_hex_str(REC->value, REC->value)",
            &huge,
        ),
        case(
            "array_count_from_record",
            VALUE,
            "\"%s\", __print_array(REC->value, REC->value, 8)",
            &huge,
        ),
        case(
            "array_bad_element_size",
            VALUE,
            "\"%s\", __print_array(REC->value, 100000000, 3)",
            &nine,
        ),
        case(
            "hex_dynamic_from_record",
            &format!("{VALUE}{DATA_LOC_BUF}"),
            "\"%s\", __print_hex(__get_dynamic_array(buf), REC->value)",
            &[huge.clone(), loc(16, 4), b"abcd".to_vec()].concat(),
        ),
        case(
            "hex_fits",
            VALUE,
            "\"%s\", __print_hex(REC->value, REC->value)",
            &u32s(&[4]),
        ),
        // SIGFPE: division by zero, folded at load time or taken from the record.
        case("divide_by_zero", VALUE, "\"%u\", REC->value / 0", &nine),
        case(
            "divide_by_record",
            VALUE,
            "\"%u\", 5 / REC->value",
            &u32s(&[0]),
        ),
        case(
            "modulo_by_record",
            VALUE,
            "\"%u\", 5 % REC->value",
            &u32s(&[0]),
        ),
        case("divide_by_symbol", VALUE, "\"%u\", REC->value / FOO", &nine),
        case(
            "divide_by_minus_one",
            &field("long value", 8, 8),
            "\"%ld\", REC->value / -1",
            &i64::MIN.to_le_bytes(),
        ),
        case(
            "divide_grouped_right",
            VALUE,
            "\"%u\", REC->value / 2 * 0",
            &nine,
        ),
        // Hangs: widths of a billion, written or from the record (also negative ones).
        case("static_width", VALUE, "\"%999999999d\", REC->value", &nine),
        case(
            "static_precision",
            VALUE,
            "\"%.999999999d\", REC->value",
            &nine,
        ),
        case(
            "star_width",
            VALUE,
            "\"%*d\", REC->value, REC->value",
            &u32s(&[0x7fff_ffff]),
        ),
        case(
            "star_precision",
            VALUE,
            "\"%.*d\", REC->value, REC->value",
            &u32s(&[0x7fff_ffff]),
        ),
        case(
            "star_width_negative",
            &name_at_12,
            "\"%*s\", REC->value, __get_str(name)",
            &[u32s(&[0xffff_ffff]), loc(16, 3), b"ab\0\0".to_vec()].concat(),
        ),
        case(
            "precision_of_string",
            &name_at_12,
            "\"%.*s\", REC->value, __get_str(name)",
            &[u32s(&[2]), loc(16, 3), b"ab\0\0".to_vec()].concat(),
        ),
        // SIGSEGV: a plugin function dereferencing a number; an index from the record.
        case(
            "le16_of_a_number",
            VALUE,
            "\"%d\", __le16_to_cpup(REC->value)",
            &u32s(&[0x1234_5678]),
        ),
        case(
            "index_from_record",
            &field("unsigned int value[1]", 8, 4),
            "\"%u\", REC->value[REC->value]",
            &u32s(&[0x7fff_fff0]),
        ),
        case("index_huge", VALUE, "\"%u\", REC->value[100000000]", &nine),
        // Dynamic data and strings out of the record or without NUL.
        case(
            "data_loc_outside",
            &name_at_8,
            "\"%s\", __get_str(name)",
            &loc(60000, 4000),
        ),
        case(
            "data_loc_no_nul",
            &name_at_8,
            "\"%s\", __get_str(name)",
            &[loc(12, 4), b"abcd".to_vec(), vec![b'z'; 60]].concat(),
        ),
        case(
            "data_loc_size_8",
            &field("__data_loc char[] name", 8, 8),
            "\"%s\", __get_str(name)",
            &[loc(16, 3), vec![0; 4], b"ab\0\0".to_vec()].concat(),
        ),
        case(
            "rel_loc_outside",
            &field("__rel_loc char[] name", 8, 4),
            "\"%s\", __get_rel_str(name)",
            &loc(0, 0xfff0),
        ),
        case(
            "bitmask_long",
            &format!("{VALUE}{}", field("__data_loc unsigned long[] buf", 12, 4)),
            "\"%s\", __get_bitmask(buf)",
            &[u32s(&[1]), loc(16, 0xffff), vec![0xff; 8]].concat(),
        ),
        // SIGABRT (stack smashing) in the kvm plugin: a 100,000-byte instruction.
        named_case("kvm_insn_long", "kvm", "kvm_emulate_insn", &kvm_fields)
            .with_record(&kvm_record),
        // Plugins reading fields placed past the record.
        named_case(
            "sched_switch_comm_huge",
            "sched",
            "sched_switch",
            &sched_fields,
        )
        .with_record(&u32s(&[1, 2, 3])),
        named_case("kernel_stack_far", "ftrace", "kernel_stack", &stack_fields)
            .with_record(&[0; 68]),
        // Formats that break other events or the parser's view: same id or name as the golden
        // event, moved common fields, garbage, a NUL, odd names.
        Case {
            name: "duplicate_id",
            formats: vec![(
                "hostile",
                format_text(
                    "h",
                    GOLDEN_ID,
                    &field("char value[3000]", 8, 3000),
                    "\"%s\", REC->value",
                ),
            )],
            records: Vec::new(),
        },
        Case {
            name: "duplicate_name",
            formats: vec![(
                "tvctl",
                format_text("golden", HOSTILE_ID, VALUE, "\"%u\", REC->value"),
            )],
            records: Vec::new(),
        }
        .with_record(&nine),
        Case {
            name: "common_type_moved",
            formats: vec![("hostile", moved_common(100_000, 4))],
            records: Vec::new(),
        },
        Case {
            name: "common_pid_moved",
            formats: vec![("hostile", moved_common(0, 40))],
            records: Vec::new(),
        },
        Case {
            name: "garbage",
            formats: vec![("hostile", garbage)],
            records: Vec::new(),
        }
        .with_record(&nine),
        case("nul_inside", VALUE, "\"%u\0x\", REC->value", &nine),
        Case {
            name: "odd_system",
            formats: vec![(
                "../e x",
                format_text("h", HOSTILE_ID, VALUE, "\"%u\", REC->value"),
            )],
            records: Vec::new(),
        }
        .with_record(&nine),
        Case {
            name: "odd_name",
            formats: vec![(
                "hostile",
                format_text("h/../x", HOSTILE_ID, VALUE, "\"%u\", REC->value"),
            )],
            records: Vec::new(),
        }
        .with_record(&nine),
        case(
            "many_fields",
            &field("unsigned int v", 8, 4).repeat(50_000),
            "\"%u\", REC->v",
            &nine,
        ),
        case(
            "long_declaration",
            &field(&format!("unsigned {}value", "int ".repeat(200_000)), 8, 4),
            "\"%u\", REC->value",
            &nine,
        ),
        case(
            "huge_string_literal",
            VALUE,
            &format!("\"{}%u\", REC->value", "x".repeat(900_000)),
            &nine,
        ),
        case("unbalanced", VALUE, "\"%u\", ((((REC->value", &nine),
        case("unterminated", VALUE, "\"%u, REC->value", &nine),
        case(
            "unknown_field",
            VALUE,
            "\"%u %s\", REC->nope, __get_str(nope)",
            &nine,
        ),
        case(
            "mac_of_a_byte",
            &field("unsigned char value", 8, 1),
            "\"%pM %pI6 %pU\", REC->value, REC->value, REC->value",
            &nine,
        ),
        case(
            "record_shorter_than_fields",
            &format!("{VALUE}{}", field("char tail[64]", 12, 64)),
            "\"%u %s\", REC->value, REC->tail",
            &nine,
        ),
        Case {
            name: "record_without_format",
            formats: Vec::new(),
            records: vec![record(4321, &nine), vec![0x39, 0x05]],
        },
    ]
}

/// The inputs that crashed or hung trace-cmd 3.1.6 when written without sanitizing.
pub const CRASHERS: [&str; 19] = [
    "deep_parentheses",
    "not_chain",
    "plus_chain",
    "call_nesting",
    "string_size_huge",
    "string_offset_huge",
    "rest_of_record_past_it",
    "hex_length_constant",
    "hex_length_from_record",
    "hex_str_length_from_record",
    "array_count_from_record",
    "divide_by_zero",
    "divide_by_record",
    "divide_by_minus_one",
    "static_width",
    "star_width",
    "le16_of_a_number",
    "index_from_record",
    "kvm_insn_long",
];

// ---- binary printk records and printk_formats ----

/// The kernel's `ftrace/bprint` format (Linux 6.18).
pub const BPRINT: &str = "name: bprint\nID: 6\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:unsigned long ip;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:const char * fmt;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:u32 buf[];\toffset:24;\tsize:0;\tsigned:0;\n\n\
print fmt: \"%ps: %s\", (void *)REC->ip, REC->fmt\n";

/// printk_formats lines: string `i` is at address 0x1000 + i.
pub const PRINTK_STRINGS: [&str; 6] =
    ["%999999999d", "%*d", "%*s", "%.*d", "value %u and %s", "%s"];

/// A bprint record of the string at `index`, with the binary arguments `args`.
pub fn bprint(index: u64, args: &[u8]) -> Vec<u8> {
    let mut rest = 0xffff_ffff_8100_0000u64.to_le_bytes().to_vec();
    rest.extend_from_slice(&(0x1000 + index).to_le_bytes());
    rest.extend_from_slice(args);
    record(6, &rest)
}

pub fn bprint_records() -> Vec<Vec<u8>> {
    let big = 0x7fff_ffffu32.to_le_bytes();
    let minus = 0xffff_ffffu32.to_le_bytes();
    vec![
        bprint(0, &5u32.to_le_bytes()),
        bprint(1, &[big, 5u32.to_le_bytes()].concat()),
        bprint(2, &[&minus[..], b"abc\0"].concat()),
        bprint(3, &[big, 5u32.to_le_bytes()].concat()),
        bprint(4, &[&7u32.to_le_bytes()[..], b"text\0"].concat()),
        bprint(5, &[b'z'; 40]),
    ]
}

/// Writes golden events, the bprint format, `printk` and one page per bprint record.
pub fn write_bprint_file(dir: &Path, printk: Vec<u8>, pages: Vec<Vec<u8>>) -> PathBuf {
    let meta = TraceMeta {
        ftrace_formats: vec![BPRINT.as_bytes().to_vec()],
        printk_formats: printk,
        ..meta(vec![("tvctl".into(), vec![golden_format()])])
    };
    let data: Vec<u8> = std::iter::once(golden_page())
        .chain(pages)
        .flatten()
        .collect();
    write(dir, &meta, &[data])
}

pub fn printk_text() -> Vec<u8> {
    PRINTK_STRINGS
        .iter()
        .zip(0x1000u64..)
        .map(|(s, addr)| format!("0x{addr:x} : \"{s}\"\n"))
        .collect::<String>()
        .into_bytes()
}

// ---- generated inputs ----

/// Formats a guest could send that pass the checks and read records in risky ways.
pub fn risky_formats() -> Vec<(&'static str, Vec<u8>)> {
    let fields = format!("{VALUE}{DATA_LOC_BUF}");
    let dynamic = "__get_dynamic_array(buf)";
    let dynamic_len = "__get_dynamic_array_len(buf)";
    let specs = [
        (
            "hex",
            "\"%s\", __print_hex(REC->value, REC->value)".to_owned(),
        ),
        (
            "dynamic_hex",
            format!("\"%s\", __print_hex({dynamic}, {dynamic_len})"),
        ),
        (
            "array",
            format!("\"%s\", __print_array({dynamic}, {dynamic_len} / 4, REC->value)"),
        ),
        (
            "star",
            "\"%*d %.*s\", REC->value, REC->value, REC->value, __get_str(buf)".to_owned(),
        ),
        (
            "string",
            format!("\"%s %pI4 %pM\", __get_str(buf), {dynamic}, {dynamic}"),
        ),
        (
            "symbols",
            "\"%s\", __print_flags(REC->value, \"|\", { 1, \"A\" }, { 2, \"B\" })".to_owned(),
        ),
    ];
    specs
        .into_iter()
        .zip(2000u16..)
        .map(|((name, print), id)| ("risky", format_text(name, id, &fields, &print)))
        .collect()
}

/// Records for the risky formats (ids 2000..2006) with values where the bounds lie, a few of
/// other ids and random bytes; mostly well-formed, so that pages survive and trace-cmd prints them.
pub fn records_strategy() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let value = prop_oneof![
        Just(0u32),
        Just(1),
        Just(4),
        Just(8),
        Just(0xff),
        Just(4096),
        Just(4097),
        Just(0x7fff_ffff),
        Just(0xffff_ffff),
        any::<u32>(),
    ];
    let risky = (
        2000u16..2006,
        value,
        prop_oneof![3 => Just(16u16), 1 => any::<u16>()],
        prop_oneof![3 => 0u16..24, 1 => any::<u16>()],
        proptest::collection::vec(any::<u8>(), 0..24),
        any::<bool>(),
    )
        .prop_map(|(id, value, offset, len, mut bytes, terminate)| {
            if terminate {
                bytes.push(0);
            }
            record(
                id,
                &[&value.to_le_bytes()[..], &loc(offset, len), &bytes].concat(),
            )
        });
    let other = (
        prop_oneof![Just(GOLDEN_ID), any::<u16>()],
        proptest::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(id, rest)| record(id, &rest));
    proptest::collection::vec(prop_oneof![5 => risky, 1 => other], 1..12)
}

/// Pages of two records each: a bad record costs only its page.
pub fn pages_of(records: &[Vec<u8>]) -> Vec<Vec<u8>> {
    records
        .chunks(2)
        .zip(0u64..)
        .map(|(records, i)| page(2_000_000 + i * 10_000, records))
        .collect()
}

/// Mutations of a real format text.
#[derive(Debug, Clone)]
pub enum Mutation {
    Insert(usize, String),
    Delete(usize, usize),
    Replace(usize, u8),
    Nest(usize, usize),
    Repeat(usize, usize, usize),
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (
            any::<usize>(),
            "[-+*/%()\\[\\]{},;:\"'\\\\ a-zA-Z0-9_>.?!~^&|\n\t]{1,12}"
        )
            .prop_map(|(at, s)| Mutation::Insert(at, s)),
        (any::<usize>(), 1usize..20).prop_map(|(at, n)| Mutation::Delete(at, n)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Replace(at, b)),
        (any::<usize>(), 1usize..3000).prop_map(|(at, n)| Mutation::Nest(at, n)),
        (any::<usize>(), 1usize..40, 1usize..200)
            .prop_map(|(at, n, times)| Mutation::Repeat(at, n, times)),
    ]
}

pub fn apply(text: &mut Vec<u8>, m: &Mutation) {
    let at = |i: usize, text: &Vec<u8>| i % (text.len() + 1);
    match m {
        Mutation::Insert(i, s) => {
            let i = at(*i, text);
            text.splice(i..i, s.bytes());
        }
        Mutation::Delete(i, n) => {
            let i = at(*i, text);
            let end = (i + n).min(text.len());
            text.drain(i..end);
        }
        Mutation::Replace(i, b) => {
            if !text.is_empty() {
                let i = *i % text.len();
                text[i] = *b;
            }
        }
        Mutation::Nest(i, n) => {
            let i = at(*i, text);
            let open = "(".repeat(*n);
            text.splice(i..i, open.bytes());
            let j = at(i + n + 7, text);
            text.splice(j..j, ")".repeat(*n).bytes());
        }
        Mutation::Repeat(i, n, times) => {
            let i = at(*i, text);
            let end = (i + n).min(text.len());
            let piece = text[i..end].to_vec();
            let repeated: Vec<u8> = piece
                .iter()
                .copied()
                .cycle()
                .take(piece.len() * times)
                .collect();
            text.splice(i..i, repeated);
        }
    }
}

/// A `sched_switch` format, for the sched plugin's handler.
pub fn sched_switch_format(id: u16) -> Vec<u8> {
    let fields = field("char prev_comm[16]", 8, 16)
        + &field("pid_t prev_pid", 24, 4)
        + &field("pid_t next_pid", 28, 4);
    format_text(
        "sched_switch",
        id,
        &fields,
        "\"%s %d\", REC->prev_comm, REC->prev_pid",
    )
}
