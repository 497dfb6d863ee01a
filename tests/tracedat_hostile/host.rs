//! The host's own tracefs: its formats, and a short recording of all its events in a private
//! instance. Needs root; fails saying so.

use super::TRACEFS;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub fn tracefs_root() -> PathBuf {
    let root = PathBuf::from(TRACEFS);
    if !root.join("events").is_dir() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", TRACEFS])
            .status();
    }
    assert!(
        root.join("events/header_page").is_file(),
        "tracefs is not mounted at {TRACEFS}: run the tests as root on a kernel with \
         CONFIG_TRACING, or mount it with `mount -t tracefs nodev {TRACEFS}`"
    );
    root
}

pub use crate::common::read_tracefs;

/// Every event format of the host, as (system, event, text).
pub fn host_formats(root: &Path) -> Vec<(String, String, Vec<u8>)> {
    let mut formats = Vec::new();
    for system in fs::read_dir(root.join("events")).unwrap() {
        let system = system.unwrap();
        if !system.file_type().unwrap().is_dir() {
            continue;
        }
        for event in fs::read_dir(system.path()).unwrap() {
            let path = event.unwrap().path().join("format");
            if path.is_file() {
                let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
                let event_name = name(path.parent().unwrap());
                formats.push((name(&system.path()), event_name, read_tracefs(&path)));
            }
        }
    }
    formats.sort();
    formats
}

/// A tracefs instance removed on drop.
struct Instance {
    dir: PathBuf,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("events/enable"), "0");
        let _ = fs::write(self.dir.join("tracing_on"), "0");
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove tracefs instance {}", self.dir.display());
    }
}

/// Records every event of the host for a moment in a private instance, CPU by CPU.
pub fn record_everything(root: &Path) -> Vec<Vec<u8>> {
    let dir = root
        .join("instances")
        .join(format!("tvctl-hostile-{}", std::process::id()));
    fs::create_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "cannot create {}: {e}: these tests need root",
            dir.display()
        )
    });
    let instance = Instance { dir };
    let set = |file: &str, value: &str| {
        fs::write(instance.dir.join(file), value)
            .unwrap_or_else(|e| panic!("cannot write {value:?} to {file}: {e}"))
    };
    set("buffer_size_kb", "256");
    set("events/enable", "1");
    for _ in 0..20 {
        let _ = Command::new("true").status();
    }
    std::thread::sleep(Duration::from_millis(200));
    set("tracing_on", "0");
    let cpus = fs::read_dir(instance.dir.join("per_cpu")).unwrap().count();
    (0..cpus)
        .map(|cpu| {
            let path = instance
                .dir
                .join(format!("per_cpu/cpu{cpu}/trace_pipe_raw"));
            let mut file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .unwrap();
            let mut data = Vec::new();
            let mut page = vec![0; 4096];
            loop {
                match file.read(&mut page) {
                    Ok(0) => break,
                    Ok(n) => data.extend_from_slice(&page[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => panic!("cannot read {}: {e}", path.display()),
                }
            }
            data
        })
        .collect()
}
