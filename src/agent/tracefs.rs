//! The guest's tracefs: finding/mounting it, resolving event specs, and a private instance.
//!
//! The agent records in an instance of its own (`instances/tvctl-…`) so that other tracing
//! users in the guest, and the top-level buffer's settings, are left alone. Paths are always
//! built here from names that exist in tracefs (`available_events`, `per_cpu/cpuN`), never from
//! strings the host sent.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where tracefs may be mounted, preferred first.
const MOUNT_POINTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Errors of tracefs control. Each says which file and why.
#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error("tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {0}")]
    Mount(#[source] nix::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("event '{spec}' matches no event in available_events{}", did_you_mean(.suggestions))]
    UnknownEvent {
        spec: String,
        /// Up to [`MAX_SUGGESTIONS`] close names (`system:event`, or a system), closest first.
        suggestions: Vec<String>,
    },
    #[error("event spec '{0}' is malformed (use system, system:event, event or a glob)")]
    BadEventSpec(String),
    #[error("trace clock '{0}' is not offered by this kernel (see trace_clock)")]
    UnknownClock(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TracefsError + '_ {
    move |source| TracefsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A mounted tracefs.
#[derive(Debug, Clone)]
pub struct Tracefs {
    root: PathBuf,
}

impl Tracefs {
    /// Finds a mounted tracefs, or mounts one at /sys/kernel/tracing.
    pub fn find_or_mount() -> Result<Tracefs, TracefsError> {
        if let Some(t) = Tracefs::find() {
            return Ok(t);
        }
        nix::mount::mount(
            Some("nodev"),
            MOUNT_POINTS[0],
            Some("tracefs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(TracefsError::Mount)?;
        Ok(Tracefs {
            root: PathBuf::from(MOUNT_POINTS[0]),
        })
    }

    /// A mounted tracefs, if any.
    pub fn find() -> Option<Tracefs> {
        MOUNT_POINTS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("events/header_page").exists())
            .map(|root| Tracefs { root })
    }

    /// A tracefs at `root` (tests use a real one at a known place).
    pub fn at(root: impl Into<PathBuf>) -> Tracefs {
        Tracefs { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn read(&self, rel: &str) -> Result<Vec<u8>, TracefsError> {
        let path = self.root.join(rel);
        read_whole(&path).map_err(io_err(&path))
    }

    /// All `system:event` pairs of this kernel.
    pub fn available_events(&self) -> Result<Vec<EventName>, TracefsError> {
        let text = self.read("available_events")?;
        Ok(String::from_utf8_lossy(&text)
            .lines()
            .filter_map(EventName::parse)
            .collect())
    }

    /// Clocks offered by `trace_clock` (the current one is in brackets there).
    pub fn clocks(&self) -> Result<Vec<String>, TracefsError> {
        let text = self.read("trace_clock")?;
        Ok(parse_clock_list(&String::from_utf8_lossy(&text)))
    }

    /// The top level's current clock: the kernel's default, which new instances do not take.
    pub fn default_clock(&self) -> Option<String> {
        let text = self.read("trace_clock").ok()?;
        current_clock(&String::from_utf8_lossy(&text))
    }

    /// Format texts of the `ftrace` system's events (function, print, …), as trace-cmd saves them.
    /// Names of the `ftrace` system's events (each has a `format`), sorted.
    pub fn ftrace_format_names(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.root.join("events/ftrace"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("format").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    pub fn ftrace_formats(&self) -> Vec<(String, Vec<u8>)> {
        let dir = self.root.join("events/ftrace");
        let mut out = Vec::new();
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Ok(text) = read_whole(&e.path().join("format")) {
                    out.push((name, text));
                }
            }
        }
        out.sort();
        out
    }

    /// Creates the instance `name` (a fresh one: an existing one of that name is an error).
    pub fn create_instance(&self, name: &str) -> Result<Instance, TracefsError> {
        let path = self.root.join("instances").join(name);
        fs::create_dir(&path).map_err(io_err(&path))?;
        Ok(Instance {
            path,
            removed: false,
        })
    }

    /// Names of existing instances whose name starts with `prefix` (stale ones of ours).
    pub fn instances_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(entries) = fs::read_dir(self.root.join("instances")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(prefix) {
                    out.push(name);
                }
            }
        }
        out
    }

    /// Removes an instance left by an earlier agent (a crash, a power cut).
    pub fn remove_instance(&self, name: &str) -> Result<(), TracefsError> {
        let path = self.root.join("instances").join(name);
        let _ = fs::write(path.join("tracing_on"), "0");
        fs::remove_dir(&path).map_err(io_err(&path))
    }
}

/// Reads a tracefs (or procfs) file whole. Some tracefs files (`events/header_page`,
/// `header_event`) answer a short first read with those bytes and then end-of-file, and
/// `std::fs::read` starts with a 32-byte probe on files that report size 0; so read in large
/// chunks from the start.
pub fn read_whole(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    const CHUNK: usize = 256 * 1024;
    let mut f = fs::File::open(path)?;
    let mut out = Vec::new();
    loop {
        let len = out.len();
        out.resize(len + CHUNK, 0);
        match f.read(&mut out[len..]) {
            Ok(0) => {
                out.truncate(len);
                return Ok(out);
            }
            Ok(n) => out.truncate(len + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => out.truncate(len),
            Err(e) => return Err(e),
        }
    }
}

/// Parses `trace_clock` text such as `[local] global counter uptime perf mono`.
pub fn parse_clock_list(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| w.trim_start_matches('[').trim_end_matches(']').to_string())
        .filter(|w| !w.is_empty())
        .collect()
}

/// The clock in brackets of `trace_clock` text.
pub fn current_clock(text: &str) -> Option<String> {
    text.split_whitespace()
        .find(|w| w.starts_with('[') && w.ends_with(']'))
        .map(|w| w[1..w.len() - 1].to_string())
}

/// An event as `available_events` names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventName {
    pub system: String,
    pub event: String,
}

impl EventName {
    /// Parses one `system:event` line.
    pub fn parse(line: &str) -> Option<EventName> {
        let (system, event) = line.trim().split_once(':')?;
        if system.is_empty() || event.is_empty() || !is_name(system) || !is_name(event) {
            return None;
        }
        Some(EventName {
            system: system.to_string(),
            event: event.to_string(),
        })
    }
}

impl std::fmt::Display for EventName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.system, self.event)
    }
}

/// tracefs names are identifiers; anything else would be a path trick.
fn is_name(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && s != "."
        && s != ".."
}

/// Resolves trace-cmd `-e` forms against the available events:
/// `sched` (a system), `sched_switch` (an event of any system), `sched:sched_switch`,
/// and globs with `*`/`?` on either side (`sched*`, `irq:*`). Without a colon a spec matches
/// systems and event names, as trace-cmd does. Each spec must match at least one event.
pub fn resolve_events(
    specs: &[String],
    available: &[EventName],
) -> Result<Vec<EventName>, TracefsError> {
    let mut chosen = BTreeSet::new();
    for spec in specs {
        let spec_t = spec.trim();
        let valid = |s: &str| {
            !s.is_empty()
                && s.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'*' | b'?')
                })
        };
        let matched: Vec<&EventName> = match spec_t.split_once(':') {
            Some((sys, ev)) => {
                if !valid(sys) || !valid(ev) {
                    return Err(TracefsError::BadEventSpec(spec.clone()));
                }
                available
                    .iter()
                    .filter(|e| glob_match(sys, &e.system) && glob_match(ev, &e.event))
                    .collect()
            }
            None => {
                if !valid(spec_t) {
                    return Err(TracefsError::BadEventSpec(spec.clone()));
                }
                available
                    .iter()
                    .filter(|e| glob_match(spec_t, &e.system) || glob_match(spec_t, &e.event))
                    .collect()
            }
        };
        if matched.is_empty() {
            return Err(TracefsError::UnknownEvent {
                spec: spec.clone(),
                suggestions: close_events(spec_t, available),
            });
        }
        chosen.extend(matched.into_iter().cloned());
    }
    Ok(chosen.into_iter().collect())
}

/// How many "did you mean" names an unknown event gets.
pub const MAX_SUGGESTIONS: usize = 3;

/// Specs longer than this get no suggestions: nobody mistypes 64 characters, and the edit
/// distance costs length x length per available event.
const MAX_SUGGEST_LEN: usize = 64;

fn did_you_mean(suggestions: &[String]) -> String {
    if suggestions.is_empty() {
        String::new()
    } else {
        format!("; did you mean {}?", suggestions.join(", "))
    }
}

/// Up to [`MAX_SUGGESTIONS`] available names close to `spec`, closest first: events (printed
/// `system:event`) and systems within a small edit distance of it, or starting with it. A
/// `system:event` spec is compared with whole names, a bare one with event and system names.
/// Globs get none (what they meant is anyone's guess).
pub fn close_events(spec: &str, available: &[EventName]) -> Vec<String> {
    let spec = spec.trim().to_ascii_lowercase();
    if spec.len() < 2 || spec.len() > MAX_SUGGEST_LEN || spec.contains(['*', '?']) {
        return Vec::new();
    }
    // One typo in a short name, about one in four in a long one.
    let limit = (spec.len() / 4).max(1);
    let score = |name: &str| -> Option<usize> {
        if spec.len() >= 3 && name.starts_with(&spec) {
            return Some(1);
        }
        let d = edit_distance(&spec, name);
        (d <= limit).then_some(d)
    };
    let mut scored: Vec<(usize, String)> = Vec::new();
    let mut systems = BTreeSet::new();
    for e in available {
        let full = e.to_string();
        let s = if spec.contains(':') {
            score(&full)
        } else {
            score(&e.event)
        };
        if let Some(s) = s {
            scored.push((s, full));
        }
        if !spec.contains(':') && systems.insert(e.system.as_str()) {
            if let Some(s) = score(&e.system) {
                scored.push((s, e.system.clone()));
            }
        }
    }
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored
        .into_iter()
        .take(MAX_SUGGESTIONS)
        .map(|(_, name)| name)
        .collect()
}

/// Edit distance over bytes (tracefs names are ASCII): insertions, deletions, substitutions
/// and swaps of two neighbours (`shced` is one typo from `sched`), each costing 1.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 0..a.len() {
        cur[0] = i + 1;
        for j in 0..b.len() {
            let mut d = (prev[j] + usize::from(a[i] != b[j]))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
            if i > 0 && j > 0 && a[i] == b[j - 1] && a[i - 1] == b[j] {
                d = d.min(before[j - 1] + 1);
            }
            cur[j + 1] = d;
        }
        std::mem::swap(&mut before, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Shell-style glob with `*` and `?`, no character classes.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Ring-buffer statistics of one CPU, from `per_cpu/cpuN/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuStats {
    pub entries: u64,
    pub overrun: u64,
    pub commit_overrun: u64,
    pub dropped_events: u64,
    pub read_events: u64,
    pub text: String,
}

impl CpuStats {
    pub fn parse(text: &str) -> CpuStats {
        let mut s = CpuStats {
            text: text.to_string(),
            ..CpuStats::default()
        };
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let Ok(v) = value.trim().parse::<u64>() else {
                continue;
            };
            match key.trim() {
                "entries" => s.entries = v,
                "overrun" => s.overrun = v,
                "commit overrun" => s.commit_overrun = v,
                "dropped events" => s.dropped_events = v,
                "read events" => s.read_events = v,
                _ => {}
            }
        }
        s
    }
}

/// A tracefs instance of ours. Dropping it turns tracing off and removes it.
#[derive(Debug)]
pub struct Instance {
    path: PathBuf,
    removed: bool,
}

impl Instance {
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&self, rel: &str, value: &str) -> Result<(), TracefsError> {
        let path = self.path.join(rel);
        fs::write(&path, value).map_err(io_err(&path))
    }

    fn read_string(&self, rel: &str) -> Result<String, TracefsError> {
        let path = self.path.join(rel);
        let bytes = read_whole(&path).map_err(io_err(&path))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub fn set_tracing_on(&self, on: bool) -> Result<(), TracefsError> {
        self.write("tracing_on", if on { "1" } else { "0" })
    }

    pub fn set_buffer_kb(&self, kb: u32) -> Result<(), TracefsError> {
        self.write("buffer_size_kb", &kb.to_string())
    }

    pub fn buffer_kb(&self) -> Result<u32, TracefsError> {
        let text = self.read_string("buffer_size_kb")?;
        // "1408" or "7 (expanded: 1408)" before the buffer is first used.
        let digits: String = match text.split_once("expanded:") {
            Some((_, rest)) => rest.chars().filter(char::is_ascii_digit).collect(),
            None => text.chars().filter(char::is_ascii_digit).collect(),
        };
        Ok(digits.parse().unwrap_or(0))
    }

    pub fn set_clock(&self, clock: &str) -> Result<(), TracefsError> {
        self.write("trace_clock", clock)
    }

    pub fn trace_clock_text(&self) -> Result<String, TracefsError> {
        self.read_string("trace_clock")
    }

    pub fn enable_event(&self, e: &EventName) -> Result<(), TracefsError> {
        self.write(&format!("events/{}/{}/enable", e.system, e.event), "1")
    }

    /// Writes `text` into this instance's `trace_marker` (one `print` event).
    pub fn write_marker(&self, text: &str) -> Result<(), TracefsError> {
        let path = self.path().join("trace_marker");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|source| TracefsError::Io {
                path: path.clone(),
                source,
            })?;
        std::io::Write::write_all(&mut f, text.as_bytes())
            .map_err(|source| TracefsError::Io { path, source })
    }

    pub fn raw_pipe(&self, cpu: u32) -> PathBuf {
        self.path.join(format!("per_cpu/cpu{cpu}/trace_pipe_raw"))
    }

    pub fn stats(&self, cpu: u32) -> Result<CpuStats, TracefsError> {
        Ok(CpuStats::parse(
            &self.read_string(&format!("per_cpu/cpu{cpu}/stats"))?,
        ))
    }

    /// Turns the instance off and removes it; every fd into it must be closed by now.
    pub fn remove(mut self) -> Result<(), TracefsError> {
        self.try_remove()
    }

    /// Like [`Instance::remove`], but keeps the instance when the kernel refuses (`EBUSY`
    /// while any file of it is open), so the caller can try again later.
    pub fn try_remove(&mut self) -> Result<(), TracefsError> {
        let _ = self.set_tracing_on(false);
        fs::remove_dir(&self.path).map_err(io_err(&self.path))?;
        self.removed = true;
        Ok(())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if !self.removed {
            let _ = fs::write(self.path.join("tracing_on"), "0");
            let _ = fs::remove_dir(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(list: &[&str]) -> Vec<EventName> {
        list.iter().filter_map(|l| EventName::parse(l)).collect()
    }

    fn names(v: &[EventName]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    fn sample() -> Vec<EventName> {
        events(&[
            "sched:sched_switch",
            "sched:sched_wakeup",
            "irq:irq_handler_entry",
            "irq:softirq_entry",
            "timer:hrtimer_start",
            "schedx:other",
        ])
    }

    #[test]
    fn system_name_selects_whole_system() {
        let got = resolve_events(&["sched".into()], &sample()).unwrap();
        assert_eq!(names(&got), ["sched:sched_switch", "sched:sched_wakeup"]);
    }

    #[test]
    fn bare_event_name_selects_that_event() {
        let got = resolve_events(&["sched_switch".into()], &sample()).unwrap();
        assert_eq!(names(&got), ["sched:sched_switch"]);
    }

    #[test]
    fn glob_matches_systems_and_events() {
        let got = resolve_events(&["sched*".into()], &sample()).unwrap();
        assert_eq!(
            names(&got),
            ["sched:sched_switch", "sched:sched_wakeup", "schedx:other"]
        );
        let got = resolve_events(&["irq:*".into()], &sample()).unwrap();
        assert_eq!(names(&got), ["irq:irq_handler_entry", "irq:softirq_entry"]);
    }

    #[test]
    fn unknown_and_malformed_specs_are_errors() {
        assert!(matches!(
            resolve_events(&["nosuch".into()], &sample()),
            Err(TracefsError::UnknownEvent { .. })
        ));
        assert!(matches!(
            resolve_events(&["../etc:passwd".into()], &sample()),
            Err(TracefsError::BadEventSpec(_))
        ));
        assert!(matches!(
            resolve_events(&["".into()], &sample()),
            Err(TracefsError::BadEventSpec(_))
        ));
    }

    #[test]
    fn a_mistyped_event_gets_did_you_mean() {
        let err = resolve_events(&["sched_swich".into()], &sample()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "event 'sched_swich' matches no event in available_events; did you mean sched:sched_switch?"
        );
    }

    #[test]
    fn suggestions_cover_full_names_prefixes_and_systems() {
        assert_eq!(
            close_events("sched:sched_wakup", &sample()),
            ["sched:sched_wakeup"]
        );
        assert_eq!(
            close_events("irq_handler", &sample()),
            ["irq:irq_handler_entry"]
        );
        assert_eq!(close_events("shced", &sample()), ["sched"]);
    }

    #[test]
    fn suggestions_are_at_most_three_and_none_for_far_names_or_globs() {
        let many: Vec<EventName> = (0..10)
            .filter_map(|i| EventName::parse(&format!("sys:event_{i}")))
            .collect();
        assert_eq!(close_events("event_", &many).len(), MAX_SUGGESTIONS);
        assert!(close_events("network", &sample()).is_empty());
        assert!(close_events("sched_swi*", &sample()).is_empty());
        let err = resolve_events(&["nosuch".into()], &sample()).unwrap_err();
        assert!(!err.to_string().contains("did you mean"), "{err}");
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("sched_swich", "sched_switch"), 1);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("shced", "sched"), 1);
    }

    #[test]
    fn event_names_with_path_tricks_are_not_parsed() {
        assert!(EventName::parse("..:x").is_none());
        assert!(EventName::parse("a/b:c").is_none());
        assert!(EventName::parse("sched:sched_switch").is_some());
    }

    #[test]
    fn glob_basics() {
        assert!(glob_match("*", ""));
        assert!(glob_match("s*h", "sched_switch"));
        assert!(glob_match("sched_?witch", "sched_switch"));
        assert!(!glob_match("sched", "sched_switch"));
        assert!(glob_match("*switch*", "sched_switch"));
    }

    #[test]
    fn clock_list_and_current() {
        let t = "[local] global counter uptime perf mono mono_raw boot x86-tsc\n";
        assert_eq!(parse_clock_list(t).len(), 9);
        assert_eq!(current_clock(t).as_deref(), Some("local"));
    }

    #[test]
    fn read_whole_reads_header_page_completely_on_the_real_tracefs() {
        let path = Path::new("/sys/kernel/tracing/events/header_page");
        assert!(
            path.exists(),
            "this test needs tracefs at /sys/kernel/tracing: mount -t tracefs nodev /sys/kernel/tracing"
        );
        let text = String::from_utf8(read_whole(path).unwrap()).unwrap();
        assert!(text.contains("field: u64 timestamp"), "{text}");
        assert!(text.contains("field: char data"), "short read: {text}");
    }

    #[test]
    fn stats_parse_kernel_text() {
        let t = "entries: 12\noverrun: 3\ncommit overrun: 0\nbytes: 100\noldest event ts:  12.5\nnow ts:  13.0\ndropped events: 1\nread events: 7\n";
        let s = CpuStats::parse(t);
        assert_eq!(
            (s.entries, s.overrun, s.dropped_events, s.read_events),
            (12, 3, 1, 7)
        );
    }
}
