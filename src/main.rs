//! `tvctl`: parse the command line, run it, exit with its documented code (see `tvctl --help`).

use std::process::ExitCode;

use clap::Parser as _;
use tvctl::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli::run(&cli) {
        Ok(code) => code.into(),
        Err(err) => {
            eprint!("{}", cli::error_text(&err));
            cli::exit_code_of(&err).into()
        }
    }
}
