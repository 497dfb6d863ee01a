//! tvctl-agent: the guest side of tvctl. Started by the guest's init; driven by the host.
//!
//! Usage: `tvctl-agent` runs the agent; `tvctl-agent record -e EVENT…` asks the running agent
//! for a recording that the host's `tvctl serve` writes (docs/protocol.md §4.12);
//! `tvctl-agent --report` prints one `TVCTL-REPORT {json}` line (tracefs, ports) and exits;
//! `--version` prints the version; `--help` prints the usage below; `--copy` runs the agent
//! with read/write instead of splice (to exercise the fallback).

use std::process::ExitCode;

/// What `tvctl-agent --help` prints (and, after an unknown argument, stderr).
const HELP: &str = "\
tvctl-agent: the guest side of tvctl; records ftrace events when the host asks (virtio-serial)

usage:
  tvctl-agent            run the agent (as root, started at boot: see tvctl-agent.service)
  tvctl-agent record -e EVENT... [--duration S] [-b KB] [-C CLOCK] [-o NAME] [-- COMMAND...]
                         ask the running agent for a recording the host's `tvctl serve` writes
  tvctl-agent --report   print what the agent sees (tracefs, ports) as one JSON line
  tvctl-agent --copy     run the agent with read/write instead of splice
  tvctl-agent --synthetic
                         benchmark only: recordings stream empty pages as fast as the
                         channel takes them (scripts/bench-channel.sh)
  tvctl-agent --version  print the version
  tvctl-agent --help     print this help

exit codes: 0 success, 1 the agent failed, 2 bad command line; `record`: see `record --help`";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    use tvctl::agent::session::DataMode;
    let mode = match args.first().map(String::as_str) {
        None => DataMode::Splice,
        Some("--copy") => DataMode::Copy,
        Some("--synthetic") => DataMode::Synthetic,
        Some("record") => {
            let code = tvctl::agent::record_cmd::run(&args[1..]);
            return ExitCode::from(code as u8);
        }
        Some("--report") => {
            println!("{}", tvctl::agent::report::report_line());
            return ExitCode::SUCCESS;
        }
        Some("--version" | "-V") => {
            println!("tvctl-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some("--help" | "-h") => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("tvctl-agent: unknown argument '{other}'\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    let opts = tvctl::agent::session::AgentOptions { mode };
    match tvctl::agent::session::run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tvctl-agent: {e}");
            ExitCode::from(1)
        }
    }
}
