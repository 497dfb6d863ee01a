//! Target `metadata`: reassembly of a guest's files from `Metadata` chunks.
//!
//! The input is a little program: each chunk is a selector byte, the fields it asks for, and a
//! data byte (see [`next_chunk`]). Selectors pick names among a few real and a few illegal
//! ones, lengths among the caps and their neighbours, and offsets that are usually where the
//! file stands, so the fuzzer reaches deep states (whole files, caps) with small inputs; data
//! can be a cheap filler, so a 64 MiB file costs a few bytes of input per 64 KiB chunk.
//!
//! Checked after every chunk, from outside: an accepted chunk obeys the rules of
//! docs/protocol.md §4.5 (valid name, contiguous, within the file and the caps), "completed"
//! means all bytes arrived, and the completed files are exactly the accepted bytes.

use std::collections::BTreeMap;

use tvctl::proto::limits::{MAX_METADATA_FILE, MAX_METADATA_TOTAL, METADATA_CHUNK};
use tvctl::proto::{validate_name, Metadata, MetadataAssembler};

use crate::{alloc_guard, Input};

/// Names selectors 0..=5 pick: real ones and refused ones.
const NAMES: [&str; 6] = [
    "kallsyms",
    "events/header_page",
    "uname",
    "events/sched/sched_switch/format",
    "../escape",
    "",
];

/// Stop expanding filler past this many bytes per input, to keep an execution short.
const MAX_FILLER: usize = 72 << 20;
/// Most chunks per input.
const MAX_CHUNKS: usize = 4096;

/// What the assembler accepted, per file.
#[derive(Debug, Default)]
struct Accepted {
    total_len: u64,
    data: Vec<u8>,
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut asm = MetadataAssembler::new();
    let mut model: BTreeMap<String, Accepted> = BTreeMap::new();
    let mut reserved: u64 = 0;
    let mut expanded = 0usize;

    for _ in 0..MAX_CHUNKS {
        if input.is_empty() {
            break;
        }
        let chunk = next_chunk(&mut input, &model, &mut expanded);
        // The assembler keeps what it accepted, once, plus one file's Vec doubling.
        alloc_guard::budget(expanded + data.len(), 2);
        let before = model.get(&chunk.name).map_or(0, |f| f.data.len());
        if let Ok(done) = asm.push(chunk.clone()) {
            check_accepted(&chunk, before, &mut model, &mut reserved);
            let file = &model[&chunk.name];
            let complete = u64::try_from(file.data.len()) == Ok(file.total_len);
            assert_eq!(done, complete, "push said done={done} for {:?}", chunk.name);
            if done {
                assert_eq!(
                    asm.files()[&chunk.name],
                    file.data,
                    "completed file differs"
                );
            }
        }
        assert_eq!(
            asm.files().len(),
            model.values().filter(|f| is_complete(f)).count(),
            "completed files differ from the accepted chunks"
        );
    }

    let all_complete = model.values().all(is_complete);
    match asm.finish() {
        Ok(files) => {
            assert!(all_complete, "finish accepted an incomplete file");
            assert_eq!(files.len(), model.len());
            for (name, file) in &files {
                assert_eq!(file, &model[name].data, "file {name:?} differs");
            }
        }
        Err(_) => assert!(!all_complete, "finish refused complete files"),
    }
}

fn is_complete(file: &Accepted) -> bool {
    u64::try_from(file.data.len()) == Ok(file.total_len)
}

/// The rules an accepted chunk must have obeyed; records its bytes.
fn check_accepted(
    chunk: &Metadata,
    before: usize,
    model: &mut BTreeMap<String, Accepted>,
    reserved: &mut u64,
) {
    let name = &chunk.name;
    assert!(validate_name(name).is_ok(), "accepted bad name {name:?}");
    assert!(
        chunk.data.len() <= METADATA_CHUNK,
        "accepted an oversized chunk"
    );
    assert!(
        chunk.total_len <= MAX_METADATA_FILE,
        "accepted an oversized file"
    );
    let before = u64::try_from(before).expect("usize fits u64");
    assert_eq!(chunk.offset, before, "accepted a chunk out of order");
    let len = u64::try_from(chunk.data.len()).expect("usize fits u64");
    assert!(
        before + len <= chunk.total_len,
        "accepted bytes past the end"
    );
    assert!(len > 0 || chunk.total_len == 0, "accepted an empty chunk");
    let file = match model.get_mut(name) {
        Some(file) => {
            assert_eq!(file.total_len, chunk.total_len, "accepted a changed length");
            assert!(!is_complete(file), "accepted a chunk of a complete file");
            file
        }
        None => {
            *reserved += chunk.total_len;
            assert!(
                *reserved <= MAX_METADATA_TOTAL,
                "accepted over the total cap"
            );
            model.entry(name.clone()).or_insert(Accepted {
                total_len: chunk.total_len,
                data: Vec::new(),
            })
        }
    };
    file.data.extend_from_slice(&chunk.data);
}

/// Decodes one chunk from the input:
///
/// ```text
/// sel: u8      bits 0-2 name:   0..=5 NAMES[i]; 6 "f<u8>"; 7 u8 length + bytes (lossy UTF-8)
///              bits 3-5 length: 0 as known for the name (else 0); 1 u16; 2 u32; 3 u64;
///                               4 MAX_METADATA_FILE; 5 MAX_METADATA_FILE + 1; 6 u64::MAX;
///                               7 as known + 1
///              bits 6-7 offset: 0 where the file stands; 1 u64; 2 where it stands + 1; 3 zero
/// data: u8     0x00..=0x7f that many bytes of input; 0x80..=0xbf the rest of the file (at most a
///              chunk) of filler; 0xc0..=0xff u32 & 0x1ffff bytes of filler; filler byte = data
/// ```
/// Missing bytes read as zero.
fn next_chunk(
    input: &mut Input<'_>,
    model: &BTreeMap<String, Accepted>,
    expanded: &mut usize,
) -> Metadata {
    let sel = input.u8();
    let name = match sel & 7 {
        i @ 0..=5 => NAMES[usize::from(i)].to_owned(),
        6 => format!("f{}", input.u8()),
        _ => {
            let len = input.u8();
            String::from_utf8_lossy(input.take(usize::from(len))).into_owned()
        }
    };
    let known = model.get(&name);
    let known_len = known.map_or(0, |f| f.total_len);
    let stands = known.map_or(0, |f| u64::try_from(f.data.len()).unwrap_or(u64::MAX));
    let total_len = match (sel >> 3) & 7 {
        0 => known_len,
        1 => u64::from(input.u16()),
        2 => u64::from(input.u32()),
        3 => input.u64(),
        4 => MAX_METADATA_FILE,
        5 => MAX_METADATA_FILE + 1,
        6 => u64::MAX,
        _ => known_len.saturating_add(1),
    };
    let offset = match sel >> 6 {
        0 => stands,
        1 => input.u64(),
        2 => stands.saturating_add(1),
        _ => 0,
    };
    let d = input.u8();
    let data = match d {
        0..=0x7f => input.take(usize::from(d)).to_vec(),
        _ => {
            let want = if d < 0xc0 {
                let left = total_len.saturating_sub(offset);
                usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(METADATA_CHUNK)
            } else {
                usize::try_from(input.u32() & 0x1_ffff).unwrap_or(0)
            };
            let len = want.min(MAX_FILLER.saturating_sub(*expanded));
            *expanded += len;
            vec![d; len]
        }
    };
    Metadata {
        name,
        total_len,
        offset,
        data,
    }
}
