//! `tvctl-agent record`: a recording started inside the guest, written by the host's
//! `tvctl serve` (docs/protocol.md §4.12). A client of the running agent over its local socket.
//!
//! ```text
//! tvctl-agent record -e EVENT… [--duration S] [-b KB] [-C CLOCK] [-o NAME] [-- COMMAND…]
//! ```
//!
//! It offers the recording, prints where the host writes it, runs COMMAND (on this terminal)
//! or waits for `--duration` or Ctrl-C, stops, and prints the host's summary. Exit codes
//! ([`RecordExit`]): 0 written whole, 2 usage, 3 the agent is not running, 4 no `tvctl serve`
//! on the host (or an older one), 5 refused (busy, over the host's limit), 6 written but
//! incomplete or failed, 130 interrupted before the recording started.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::proto::{ErrorCode, FrameDecoder, Message, RecordDone, RecordOffer, PROTOCOL_VERSION};

/// How `tvctl-agent record` ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordExit {
    Ok = 0,
    Internal = 1,
    Usage = 2,
    NoAgent = 3,
    NoServe = 4,
    Refused = 5,
    Incomplete = 6,
    Interrupted = 130,
}

pub const USAGE: &str = "usage: tvctl-agent record -e EVENT... [--duration SECS] [-b KB] [-C CLOCK] [-o NAME] [-- COMMAND...]";

/// What the user asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordArgs {
    pub events: Vec<String>,
    pub duration: Option<Duration>,
    pub buffer_kb: Option<u32>,
    pub clock: Option<String>,
    pub name: String,
    pub command: Vec<String>,
}

/// Parses the arguments after `record`.
pub fn parse(args: &[String]) -> Result<RecordArgs, String> {
    let mut out = RecordArgs {
        events: Vec::new(),
        duration: None,
        buffer_kb: None,
        clock: None,
        name: "recording".into(),
        command: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag {
            "--" => {
                out.command = it.by_ref().cloned().collect();
                break;
            }
            "-e" | "--event" => out.events.push(value("-e")?),
            "--duration" => {
                let v = value("--duration")?;
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s <= 1e9)
                    .ok_or_else(|| {
                        format!("--duration {v}: give seconds above 0, e.g. 3 or 0.5")
                    })?;
                out.duration = Some(Duration::from_secs_f64(secs));
            }
            "-b" | "--buffer-kb" => {
                let v = value("-b")?;
                out.buffer_kb = Some(
                    v.parse()
                        .ok()
                        .filter(|&kb: &u32| kb > 0)
                        .ok_or_else(|| format!("-b {v}: give KiB per CPU, e.g. 4096"))?,
                );
            }
            "-C" | "--clock" => out.clock = Some(value("-C")?),
            "-o" | "--output" => out.name = value("-o")?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    if out.events.is_empty() {
        return Err("give at least one -e EVENT (e.g. -e sched or -e 'sched:*')".into());
    }
    Ok(out)
}

fn say(msg: &str) {
    eprintln!("tvctl-agent record: {msg}");
}

/// Runs `tvctl-agent record`; returns its exit code.
pub fn run(args: &[String]) -> RecordExit {
    let args = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                say(&e);
            }
            eprintln!("{USAGE}");
            return if e.is_empty() {
                RecordExit::Ok
            } else {
                RecordExit::Usage
            };
        }
    };
    crate::sigcount::install();
    let path = super::local::socket_path();
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            say(&format!(
                "tvctl-agent is not running in this guest ({}: {e}); start it (it runs as a \
                 service, or: tvctl-agent &)",
                path.display()
            ));
            return RecordExit::NoAgent;
        }
    };
    let mut conn = Conn {
        stream,
        decoder: FrameDecoder::new(),
    };
    let offer = Message::RecordOffer(RecordOffer {
        offer_id: 0,
        name: args.name.clone(),
        events: args.events.clone(),
        buffer_kb: args.buffer_kb,
        clock: args.clock.clone(),
    });
    if let Err(e) = conn.send(&offer) {
        say(&format!("cannot talk to tvctl-agent: {e}"));
        return RecordExit::NoAgent;
    }
    // The offer: answered by the host (through the agent) or refused by the agent.
    let answer = match conn.wait(Duration::from_secs(30), true) {
        Wait::Message(Message::OfferAnswer(a)) => a,
        Wait::Message(Message::Error(e)) => return refused(e.code, &e.text),
        other => return other.fail("the host's answer"),
    };
    if !answer.accepted {
        say(&format!("the host refused: {}", answer.text));
        return RecordExit::Refused;
    }
    say(&format!("the host records into {}", answer.file));
    let started = match conn.wait(Duration::from_secs(90), true) {
        Wait::Message(Message::Started(s)) => s,
        Wait::Message(Message::Error(e)) => return refused(e.code, &e.text),
        Wait::Message(Message::RecordDone(d)) => return done(&d, None),
        other => return other.fail("the recording to start"),
    };
    say(&format!(
        "recording {} event(s) on cpus {:?} ({}); {}",
        started.events.len(),
        started.cpus,
        started.clock,
        match (&args.command.is_empty(), args.duration) {
            (false, _) => "stops when the command ends".to_string(),
            (true, Some(d)) => format!("stops after {:.1} s or on Ctrl-C", d.as_secs_f64()),
            (true, None) => "Ctrl-C stops".to_string(),
        }
    ));
    let seen = crate::sigcount::count();
    let mut child = if args.command.is_empty() {
        None
    } else {
        match Command::new(&args.command[0])
            .args(&args.command[1..])
            .spawn()
        {
            Ok(c) => Some(c),
            Err(e) => {
                say(&format!("cannot run {}: {e}; stopping", args.command[0]));
                None
            }
        }
    };
    let command_failed_to_start = !args.command.is_empty() && child.is_none();
    let start = Instant::now();
    let mut status = None;
    // Record until the command ends, the duration passes, Ctrl-C, or the host stops.
    loop {
        if command_failed_to_start || crate::sigcount::count() > seen {
            break;
        }
        if args.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        if let Some(st) = child.as_mut().and_then(exited) {
            status = Some(st);
            break;
        }
        match conn.wait(Duration::from_millis(100), false) {
            Wait::Timeout => {}
            Wait::Message(Message::RecordDone(d)) => {
                reap(child.take());
                return done(&d, status);
            }
            Wait::Message(Message::Error(e)) => {
                reap(child.take());
                return refused(e.code, &e.text);
            }
            Wait::Message(_) => {}
            other => {
                reap(child.take());
                return other.fail("the end of the recording");
            }
        }
    }
    if let Some(st) = status {
        say(&format!("the command exited with {st}; stopping"));
    }
    if let Err(e) = conn.send(&Message::Stop) {
        say(&format!("cannot ask tvctl-agent to stop: {e}"));
        return RecordExit::Internal;
    }
    let seen = crate::sigcount::count();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if crate::sigcount::count() > seen {
            say("interrupted while the host wrote the file; it may still be written");
            reap(child.take());
            return RecordExit::Interrupted;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.wait(left.min(Duration::from_millis(200)), false) {
            Wait::Timeout if left.is_zero() => {
                return Wait::Timeout.fail("the host to write the file");
            }
            Wait::Timeout | Wait::Message(Message::Started(_)) => {}
            Wait::Message(Message::RecordDone(d)) => {
                reap(child.take());
                return done(&d, status);
            }
            Wait::Message(Message::Error(e)) => return refused(e.code, &e.text),
            Wait::Message(other) => {
                say(&format!("unexpected {:?} from tvctl-agent", other.kind()));
            }
            other => return other.fail("the host to write the file"),
        }
    }
}

/// The child's exit status if it ended: its code, or -signal.
fn exited(child: &mut Child) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    let st = child.try_wait().ok().flatten()?;
    Some(st.code().unwrap_or_else(|| -st.signal().unwrap_or(0)))
}

fn reap(child: Option<Child>) {
    if let Some(mut c) = child {
        let _ = c.wait();
    }
}

fn refused(code: ErrorCode, text: &str) -> RecordExit {
    say(text);
    match code {
        ErrorCode::NoServe => RecordExit::NoServe,
        // Busy, or the request itself refused (unknown event or clock, bad size).
        ErrorCode::Busy
        | ErrorCode::UnknownEvent
        | ErrorCode::UnknownClock
        | ErrorCode::BadBufferSize
        | ErrorCode::BadRequest => RecordExit::Refused,
        _ => RecordExit::Internal,
    }
}

/// Prints the host's summary: the line tests and scripts read is the first.
fn done(d: &RecordDone, status: Option<i32>) -> RecordExit {
    println!(
        "tvctl-agent record: {} events, {} lost, {} bytes; file on the host: {}",
        d.events, d.lost, d.bytes, d.file
    );
    if !d.text.is_empty() {
        say(&d.text);
    }
    if let Some(st) = status.filter(|&s| s != 0) {
        say(&format!("note: the command exited with {st}"));
    }
    if d.file.is_empty() || !d.complete {
        RecordExit::Incomplete
    } else {
        RecordExit::Ok
    }
}

struct Conn {
    stream: UnixStream,
    decoder: FrameDecoder,
}

enum Wait {
    Message(Message),
    Timeout,
    Closed,
    Broken(String),
    Interrupted,
}

impl Wait {
    fn fail(self, what: &str) -> RecordExit {
        match self {
            Wait::Interrupted => {
                say("interrupted");
                RecordExit::Interrupted
            }
            Wait::Timeout => {
                say(&format!("gave up waiting for {what}"));
                RecordExit::Internal
            }
            Wait::Closed => {
                say(&format!(
                    "tvctl-agent closed the connection while waiting for {what} (it restarted?)"
                ));
                RecordExit::NoAgent
            }
            Wait::Broken(e) => {
                say(&format!("broken answer from tvctl-agent: {e}"));
                RecordExit::Internal
            }
            Wait::Message(m) => {
                say(&format!(
                    "unexpected {:?} while waiting for {what}",
                    m.kind()
                ));
                RecordExit::Internal
            }
        }
    }
}

impl Conn {
    fn send(&mut self, msg: &Message) -> std::io::Result<()> {
        let frame = msg
            .encode_frame(PROTOCOL_VERSION)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.stream.write_all(&frame)
    }

    /// The next message within `timeout`; a signal ends the wait when `interruptible`.
    fn wait(&mut self, timeout: Duration, interruptible: bool) -> Wait {
        let deadline = Instant::now() + timeout;
        let seen = crate::sigcount::count();
        loop {
            match self.decoder.next_message() {
                Ok(Some((_, m))) => return Wait::Message(m),
                Ok(None) => {}
                Err(e) => return Wait::Broken(e.to_string()),
            }
            if interruptible && crate::sigcount::count() > seen {
                return Wait::Interrupted;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Wait::Timeout;
            }
            let _ = self
                .stream
                .set_read_timeout(Some(left.min(Duration::from_millis(100))));
            let mut buf = [0u8; 8192];
            let want = buf.len().min(self.decoder.space().max(1));
            match self.stream.read(&mut buf[..want]) {
                Ok(0) => return Wait::Closed,
                Ok(n) => {
                    self.decoder.push(&buf[..n]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Wait::Broken(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn full_command_line_parses() {
        let a = parse(&args(&[
            "-e",
            "sched",
            "--event=irq:*",
            "--duration",
            "3",
            "-b",
            "1024",
            "-C",
            "mono",
            "-o",
            "smoke",
            "--",
            "sleep",
            "1",
        ]))
        .unwrap();
        assert_eq!(a.events, ["sched", "irq:*"]);
        assert_eq!(a.duration, Some(Duration::from_secs(3)));
        assert_eq!(a.buffer_kb, Some(1024));
        assert_eq!(a.clock.as_deref(), Some("mono"));
        assert_eq!(a.name, "smoke");
        assert_eq!(a.command, ["sleep", "1"]);
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        for (line, want) in [
            (&["--duration", "3"][..], "-e EVENT"),
            (&["-e", "sched", "--duration", "0"][..], "--duration 0"),
            (&["-e", "sched", "--duration", "nan"][..], "--duration nan"),
            (&["-e", "sched", "-b", "0"][..], "-b 0"),
            (&["-e"][..], "-e needs a value"),
            (&["-e", "sched", "--frobnicate"][..], "unknown argument"),
        ] {
            let err = parse(&args(line)).unwrap_err();
            assert!(err.contains(want), "{line:?}: {err}");
        }
    }

    #[test]
    fn the_name_defaults_to_recording() {
        assert_eq!(parse(&args(&["-e", "sched"])).unwrap().name, "recording");
    }
}
