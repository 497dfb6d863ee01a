//! tvctl-agent: the guest side of tvctl. Started by the guest's init; driven by the host.
//!
//! Usage: `tvctl-agent` runs the agent; `tvctl-agent --report` prints one `TVCTL-REPORT {json}`
//! line (tracefs, ports) and exits; `--version` prints the version.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--report") => {
            println!("{}", tvctl::agent::report::report_line());
            ExitCode::SUCCESS
        }
        Some("--version") => {
            println!("tvctl-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!(
                "tvctl-agent: unknown argument '{other}'; usage: tvctl-agent [--report|--version]"
            );
            ExitCode::from(2)
        }
        None => {
            eprintln!("tvctl-agent: the control loop is not built yet");
            ExitCode::from(1)
        }
    }
}
