//! What `tvctl trace` shows while it records: on a terminal, a spinner while the guest boots
//! and then one line per CPU (bytes, rate) under a header (elapsed time, lost events so far).
//! On anything else, nothing: scripts and CI get only the final summary.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::output::TerminalText;
use super::stream::CpuStream;
use crate::proto::{CommandOutput, OutputStream};
use crate::tracedat::{MissedEvents, PageLayout};

/// The live display; every method is a no-op when it is disabled.
pub struct Progress {
    /// Where the guest command's output goes: `None` drops it (serve), `Some(true)` relays
    /// stdout to stdout, `Some(false)` keeps stdout off it (`--json` owns stdout).
    relay: Option<bool>,
    text: TerminalText,
    multi: Option<MultiProgress>,
    spinner: Option<ProgressBar>,
    header: Option<ProgressBar>,
    cpus: Vec<(ProgressBar, u64, Instant)>,
}

impl Progress {
    /// Enabled only when `enabled` and stderr is a terminal.
    pub fn new(enabled: bool) -> Progress {
        let on = enabled && std::io::IsTerminal::is_terminal(&std::io::stderr());
        Progress {
            relay: None,
            text: TerminalText::default(),
            multi: on.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            spinner: None,
            header: None,
            cpus: Vec::new(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.multi.is_some()
    }

    /// A spinner with `msg` until the next call.
    pub fn wait(&mut self, msg: &str) {
        let Some(multi) = &self.multi else { return };
        let sp = self.spinner.get_or_insert_with(|| {
            let sp = multi.add(ProgressBar::new_spinner());
            sp.enable_steady_tick(Duration::from_millis(120));
            sp
        });
        sp.set_message(msg.to_string());
    }

    /// A spinner with `msg`, the time waited and the time left of `timeout`, until the next
    /// call.
    pub fn wait_at_most(&mut self, msg: &str, timeout: Duration) {
        let Some(multi) = &self.multi else { return };
        if let Some(old) = self.spinner.take() {
            old.finish_and_clear();
        }
        let style = ProgressStyle::with_template("{spinner} {msg}: {waited} waited, {left} left")
            .expect("template")
            .with_key(
                "waited",
                |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{} s", s.elapsed().as_secs());
                },
            )
            .with_key(
                "left",
                move |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{} s", timeout.saturating_sub(s.elapsed()).as_secs());
                },
            );
        let sp = multi.add(ProgressBar::new_spinner());
        sp.set_style(style);
        sp.enable_steady_tick(Duration::from_millis(120));
        sp.set_message(msg.to_string());
        self.spinner = Some(sp);
    }

    /// Switches to the per-CPU display.
    pub fn recording(&mut self, cpus: &[u32]) {
        let Some(multi) = &self.multi else { return };
        if let Some(sp) = self.spinner.take() {
            sp.finish_and_clear();
        }
        let header = multi.add(ProgressBar::new_spinner());
        header.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("template"));
        header.enable_steady_tick(Duration::from_millis(120));
        self.header = Some(header);
        let style = ProgressStyle::with_template("  {prefix:>6} {msg}").expect("template");
        self.cpus = cpus
            .iter()
            .map(|cpu| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar.set_prefix(format!("cpu{cpu}"));
                (bar, 0, Instant::now())
            })
            .collect();
    }

    /// Refreshes the display from the streams' counters.
    pub fn update(&mut self, streams: &[CpuStream], elapsed: Duration, lost: u64) {
        if let Some(h) = &self.header {
            h.set_message(format!(
                "recording {:>6.1}s  lost events so far: {lost}  (Ctrl-C stops)",
                elapsed.as_secs_f64()
            ));
        }
        for ((bar, last, at), stream) in self.cpus.iter_mut().zip(streams) {
            let now = stream.shared.received.load(Ordering::Relaxed);
            let dt = at.elapsed().as_secs_f64();
            if dt >= 0.5 {
                let rate = (now.saturating_sub(*last)) as f64 / dt;
                bar.set_message(format!(
                    "{:>10}  {:>10}/s",
                    human_bytes(now as f64),
                    human_bytes(rate)
                ));
                *last = now;
                *at = Instant::now();
            }
        }
    }

    pub fn finish(&mut self) {
        if let Some(sp) = self.spinner.take() {
            sp.finish_and_clear();
        }
        if let Some(h) = self.header.take() {
            h.finish_and_clear();
        }
        for (bar, _, _) in self.cpus.drain(..) {
            bar.finish_and_clear();
        }
    }

    /// Relays the guest command's output from now on: stderr to stderr, and stdout to stdout
    /// when `stdout` (else it is only in the summary).
    pub fn relay_command_output(&mut self, stdout: bool) {
        self.relay = Some(stdout);
    }

    /// Prints the guest command's output, escaped, without tearing the display.
    pub fn command_output(&mut self, chunks: Vec<CommandOutput>) {
        let Some(to_stdout) = self.relay else { return };
        for chunk in chunks {
            let text = self.text.text(&chunk);
            self.write_output(chunk.stream, &text, to_stdout);
        }
    }

    /// Ends the relay: what an incomplete last character left is printed escaped.
    pub fn finish_command_output(&mut self) {
        let Some(to_stdout) = self.relay else { return };
        let [out, err] = self.text.finish();
        self.write_output(OutputStream::Stdout, &out, to_stdout);
        self.write_output(OutputStream::Stderr, &err, to_stdout);
    }

    fn write_output(&self, stream: OutputStream, text: &str, to_stdout: bool) {
        use std::io::Write as _;
        if text.is_empty() || (stream == OutputStream::Stdout && !to_stdout) {
            return;
        }
        let write = || {
            let _ = match stream {
                OutputStream::Stdout => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(text.as_bytes()).and_then(|()| o.flush())
                }
                OutputStream::Stderr => std::io::stderr().lock().write_all(text.as_bytes()),
            };
        };
        match &self.multi {
            Some(m) => m.suspend(write),
            None => write(),
        }
    }

    /// Prints a line without tearing the display (nothing when the display is off).
    pub fn println(&self, line: &str) {
        if let Some(m) = &self.multi {
            let _ = m.println(line);
        }
    }
}

/// `12.3 MiB` style.
pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Counts events lost so far by reading the header of each page as it lands in a CPU's data
/// file (one small pread per page; the pages themselves are never copied).
pub struct LossScanner {
    file: Option<File>,
    next_page: u64,
    pub missed_events: u64,
    pub missed_pages: u64,
}

impl LossScanner {
    pub fn new(data_path: &Path) -> LossScanner {
        LossScanner {
            file: File::open(data_path).ok(),
            next_page: 0,
            missed_events: 0,
            missed_pages: 0,
        }
    }

    /// Reads the headers of whole pages below `received` bytes not seen yet.
    pub fn scan(&mut self, layout: &PageLayout, received: u64) {
        let Some(file) = &self.file else { return };
        let page_size = layout.page_size() as u64;
        let mut page = vec![0u8; layout.page_size()];
        while (self.next_page + 1) * page_size <= received {
            if file
                .read_exact_at(&mut page, self.next_page * page_size)
                .is_err()
            {
                return;
            }
            if let Ok(p) = layout.page(&page) {
                match p.missed {
                    MissedEvents::None => {}
                    MissedEvents::Unknown => self.missed_pages += 1,
                    MissedEvents::Count(n) => {
                        self.missed_pages += 1;
                        self.missed_events = self.missed_events.saturating_add(n);
                    }
                }
            }
            self.next_page += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_picks_units() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(5.0 * 1024.0 * 1024.0), "5.0 MiB");
    }
}
