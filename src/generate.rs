//! Shell completions and man pages, generated from the clap definitions in [`crate::cli`] so
//! that they cannot drift from the parser. `tvctl completions bash|zsh|fish` prints a script;
//! the hidden `tvctl man --out-dir DIR` writes `tvctl.1` and one page per visible subcommand
//! (`tvctl-trace.1`, …), each with an EXIT STATUS section built from [`crate::exitcode`].
//! scripts/build-deb.sh runs both to fill the Debian package.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

use crate::cli::Cli;
use crate::exitcode::ExitCode;

/// The shells `tvctl completions` writes scripts for (those Debian packages completions for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: CompletionShell, out: &mut dyn Write) {
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut Cli::command(), "tvctl", out);
}

/// Writes `tvctl.1` and `tvctl-<subcommand>.1` for every visible subcommand into `dir`
/// (created if missing); returns the paths written, `tvctl.1` first.
pub fn man_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    // build() gives subcommands their display names (tvctl-trace) and the global options.
    cmd.build();
    let mut written = vec![write_page(&cmd, dir)?];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written.push(write_page(sub, dir)?);
    }
    Ok(written)
}

fn write_page(cmd: &clap::Command, dir: &Path) -> io::Result<PathBuf> {
    let man = Man::new(cmd.clone());
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    render_page(&man, cmd, &mut page)?;
    std::fs::write(&path, page)?;
    Ok(path)
}

/// clap_mangen's sections, with EXIT STATUS from [`crate::exitcode`] instead of its EXTRA
/// section (which would repeat `after_help`, the same table as plain text).
fn render_page(man: &Man, cmd: &clap::Command, out: &mut dyn Write) -> io::Result<()> {
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(out)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(out)?;
    }
    exit_status_section().to_writer(out)?;
    if cmd.get_version().is_some() {
        man.render_version_section(out)?;
    }
    Ok(())
}

/// `.SH "EXIT STATUS"` with one tagged paragraph per code, as `tvctl --help` lists them.
fn exit_status_section() -> Roff {
    let mut roff = Roff::default();
    roff.control("SH", ["EXIT STATUS"]);
    roff.text([roman(
        "Scripts and CI depend on these numbers; they never change meaning.",
    )]);
    for code in ExitCode::ALL {
        roff.control("TP", []);
        roff.text([bold(code.code().to_string())]);
        roff.text([roman(code.meaning())]);
    }
    roff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bash_completion_names_every_visible_subcommand() {
        let mut script = Vec::new();
        completions(CompletionShell::Bash, &mut script);
        let script = String::from_utf8(script).unwrap();
        assert!(script.contains("complete -F _tvctl"), "{script}");
        for sub in [
            "setup",
            "teardown",
            "status",
            "trace",
            "serve",
            "completions",
        ] {
            assert!(script.contains(sub), "bash completion lacks {sub}");
        }
    }

    #[test]
    fn man_pages_are_written_per_subcommand_with_exit_status() {
        let dir = tempfile::tempdir().unwrap();
        let written = man_pages(dir.path()).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for name in ["tvctl.1", "tvctl-setup.1", "tvctl-trace.1", "tvctl-serve.1"] {
            assert!(names.contains(&name.to_owned()), "{name} not in {names:?}");
        }
        assert!(
            !names.contains(&"tvctl-man.1".to_owned()),
            "the hidden man page leaked"
        );
        let page = std::fs::read_to_string(dir.path().join("tvctl.1")).unwrap();
        assert!(page.contains(".SH \"EXIT STATUS\""), "{page}");
        assert!(page.contains("another tvctl holds the domain"), "{page}");
        assert!(
            !page.contains(".SH EXTRA"),
            "the plain-text table is repeated"
        );
        let trace = std::fs::read_to_string(dir.path().join("tvctl-trace.1")).unwrap();
        assert!(trace.contains("duration"), "{trace}");
    }
}
