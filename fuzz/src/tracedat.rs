//! Target `tracedat`: a whole trace.dat file through [`TraceDatFile`].
//!
//! Input: the file's bytes, written to a memfd (the reader needs a `File`: it reads pages with
//! `pread`). A file that opens has its metadata and event formats parsed, and every CPU's events
//! counted twice, page by page from the file and at once from [`TraceDatFile::read_cpu_data`];
//! the two must agree. Then it is written again with [`write_trace_dat`] and read back: what
//! the writer accepts must come back unchanged (metadata and every CPU's pages).

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use tvctl::tracedat::{
    parse_event_format, write_trace_dat, CpuData, EventNames, PageLayout, TraceDatFile,
};

use crate::alloc_guard;

/// Most CPUs of a file that is also written back (each needs a memfd of its own).
const MAX_REWRITE_CPUS: usize = 16;

thread_local! {
    /// memfds reused across inputs: 0 holds the input, 1 the rewritten file, then CPU data.
    static FILES: RefCell<Vec<File>> = const { RefCell::new(Vec::new()) };
}

pub fn run(data: &[u8]) {
    // The reader allocates at most the file's length at once (a section, a CPU's pages).
    // zstd-compressed version-7 files legitimately expand (the reader allows up to 4096×).
    let zstd = data.len() > 23 && data[10] == b'7' && &data[18..23] == b"zstd\0";
    alloc_guard::budget(data.len(), if zstd { 2 * 4096 + 3 } else { 3 });
    FILES.with_borrow_mut(|files| {
        while files.len() < 2 + MAX_REWRITE_CPUS {
            files.push(memfd());
        }
        fill(&files[0], data);
        check(data.len(), files);
    });
}

fn check(len: usize, files: &mut [File]) {
    let Ok(trace) = TraceDatFile::from_file(dup(&files[0])) else {
        return;
    };
    let meta = trace.meta();
    let layout = trace.layout();
    assert_eq!(PageLayout::from_meta(meta).ok().as_ref(), Some(layout));
    let _ = EventNames::from_meta(meta);
    for (_, formats) in &meta.event_systems {
        for text in formats {
            let _ = parse_event_format(text);
        }
    }

    let len = u64::try_from(len).expect("usize fits u64");
    let page_size = u64::try_from(layout.page_size()).expect("usize fits u64");
    let mut cpu_data = Vec::new();
    let compressed = trace.compressed();
    for (cpu, extent) in trace.cpus().iter().enumerate() {
        if compressed && extent.size > 1024 * len {
            return; // a file that claims more than 1024× its size in pages: not read here
        }
        if !compressed {
            assert!(extent
                .offset
                .checked_add(extent.size)
                .is_some_and(|end| end <= len));
        }
        assert_eq!(extent.size % page_size, 0, "CPU {cpu}: partial page");
        let paged = trace.count_events(cpu);
        let bytes = match trace.read_cpu_data(cpu) {
            Ok(bytes) => bytes,
            // A compressed chunk may not decompress (it is checked only when read); then
            // counting page by page fails too.
            Err(_) if compressed => {
                assert!(
                    paged.is_err(),
                    "CPU {cpu}: counted data that cannot be read"
                );
                return;
            }
            Err(e) => panic!("CPU {cpu}: an extent lies inside the file: {e}"),
        };
        let whole = layout.count_events(&bytes);
        match (&paged, &whole) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "CPU {cpu}: counts differ"),
            (Err(_), Err(_)) => {}
            _ => panic!("CPU {cpu}: page by page {paged:?}, at once {whole:?}"),
        }
        cpu_data.push(bytes);
    }
    assert!(
        trace.pages(trace.cpus().len()).is_err(),
        "a CPU past the last"
    );

    if cpu_data.len() > MAX_REWRITE_CPUS {
        return;
    }
    let (out, cpu_files) = files[1..].split_first_mut().expect("pool is filled");
    for (file, bytes) in cpu_files.iter().zip(&cpu_data) {
        fill(file, bytes);
    }
    let cpus: Vec<CpuData<'_>> = cpu_files
        .iter()
        .zip(&cpu_data)
        .map(|(file, bytes)| CpuData {
            file,
            len: u64::try_from(bytes.len()).expect("usize fits u64"),
        })
        .collect();
    // The rewritten file is a little larger (page alignment); let it be.
    alloc_guard::budget(usize::try_from(len).unwrap_or(usize::MAX), 8);
    if write_trace_dat(out, meta, &cpus).is_err() {
        return;
    }
    let again = TraceDatFile::from_file(dup(out)).expect("what we wrote reads back");
    assert_eq!(again.meta(), meta, "metadata changed in a rewrite");
    assert_eq!(again.cpus().len(), cpu_data.len());
    for (cpu, bytes) in cpu_data.iter().enumerate() {
        assert_eq!(&again.read_cpu_data(cpu).expect("rewritten pages"), bytes);
    }
}

/// Replaces a memfd's contents.
fn fill(file: &File, bytes: &[u8]) {
    file.set_len(0).expect("truncate a memfd");
    file.write_all_at(bytes, 0).expect("write a memfd");
}

fn dup(file: &File) -> File {
    file.try_clone().expect("dup a memfd")
}

pub(crate) fn memfd() -> File {
    // SAFETY: the name is a NUL-terminated literal and the flags are valid; the call has no
    // other preconditions.
    let fd = unsafe { libc::memfd_create(c"tvctl-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    File::from(unsafe { OwnedFd::from_raw_fd(fd) })
}
