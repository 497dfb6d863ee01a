//! tvctl-agent: the guest side of tvctl. Started by the guest's init; driven by the host.
//!
//! Usage: `tvctl-agent` runs the agent; `tvctl-agent record -e EVENT…` asks the running agent
//! for a recording that the host's `tvctl serve` writes (docs/protocol.md §4.12);
//! `tvctl-agent --report` prints one `TVCTL-REPORT {json}` line (tracefs, ports) and exits;
//! `--version` prints the version; `--copy` runs the agent with read/write instead of splice
//! (to exercise the fallback).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let force_copy = match args.first().map(String::as_str) {
        None => false,
        Some("--copy") => true,
        Some("record") => {
            let code = tvctl::agent::record_cmd::run(&args[1..]);
            return ExitCode::from(code as u8);
        }
        Some("--report") => {
            println!("{}", tvctl::agent::report::report_line());
            return ExitCode::SUCCESS;
        }
        Some("--version") => {
            println!("tvctl-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!(
                "tvctl-agent: unknown argument '{other}'; usage: tvctl-agent [--copy|--report|--version] | tvctl-agent record -e EVENT... [--duration S] [-b KB] [-C CLOCK] [-o NAME] [-- COMMAND...]"
            );
            return ExitCode::from(2);
        }
    };
    let opts = tvctl::agent::session::AgentOptions { force_copy };
    match tvctl::agent::session::run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tvctl-agent: {e}");
            ExitCode::from(1)
        }
    }
}
