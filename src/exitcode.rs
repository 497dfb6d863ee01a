//! tvctl's exit codes, defined once: `main` returns them, `tvctl --help` prints the table from
//! [`help_table`], and README.md lists the same rows (a test keeps the two in step). Scripts
//! and CI depend on these numbers: never renumber a code, only add new ones.
//!
//! | code | name | meaning |
//! | ---: | --- | --- |
//! | 0 | `Ok` | success |
//! | 1 | `Internal` | internal or unexpected error |
//! | 2 | `Usage` | bad command line or option value |
//! | 3 | `LibvirtUnreachable` | libvirtd not reachable at the URI |
//! | 4 | `PermissionDenied` | not root, or permission denied |
//! | 5 | `DomainNotFound` | no domain with that name, UUID or id |
//! | 6 | `DomainXmlConflict` | the domain's XML conflicts with tvctl's channels |
//! | 7 | `HostFileConflict` | a host file or folder is in the way or unusable |
//! | 8 | `NotSetUp` | the domain is not (completely) set up |
//! | 9 | `AgentTimeout` | the guest agent did not answer in time |
//! | 10 | `DomainStopped` | the domain stopped during a recording |
//! | 11 | `OutputNotWritable` | the output could not be written (disk full, ...) |
//! | 12 | `AgentRefused` | the guest agent refused the request (unknown event or clock, bad size) |
//! | 13 | `GuestMisbehaved` | the guest broke the protocol or a limit; the good data is written |
//! | 14 | `Incomplete` | a stream fell short or the agent stopped answering; the file holds what arrived |
//! | 15 | `Busy` | another tvctl holds the domain (trace, setup, teardown, a guest recording of serve), or serve already runs |
//! | 16 | `NoGuestAgent` | agent install/status: no usable qemu-guest-agent (domain not running, no channel, not answering, a needed command forbidden) |
//! | 17 | `InstallFailed` | agent install: no static agent binary, the guest's architecture differs, or a step in the guest failed |
//! | 130 | `Interrupted` | trace: Ctrl-C twice (once before recording); a file holds what had arrived |

use std::fmt::Write as _;

/// Every way tvctl can end, with the number the shell sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ExitCode {
    Ok = 0,
    Internal = 1,
    /// clap uses 2 for its own usage errors; ours match.
    Usage = 2,
    LibvirtUnreachable = 3,
    PermissionDenied = 4,
    DomainNotFound = 5,
    DomainXmlConflict = 6,
    HostFileConflict = 7,
    NotSetUp = 8,
    AgentTimeout = 9,
    DomainStopped = 10,
    OutputNotWritable = 11,
    AgentRefused = 12,
    GuestMisbehaved = 13,
    Incomplete = 14,
    Busy = 15,
    NoGuestAgent = 16,
    InstallFailed = 17,
    /// 128 + SIGINT, as shells report a process killed by Ctrl-C.
    Interrupted = 130,
}

impl ExitCode {
    /// All codes in numeric order: the rows of the table.
    pub const ALL: [ExitCode; 19] = [
        ExitCode::Ok,
        ExitCode::Internal,
        ExitCode::Usage,
        ExitCode::LibvirtUnreachable,
        ExitCode::PermissionDenied,
        ExitCode::DomainNotFound,
        ExitCode::DomainXmlConflict,
        ExitCode::HostFileConflict,
        ExitCode::NotSetUp,
        ExitCode::AgentTimeout,
        ExitCode::DomainStopped,
        ExitCode::OutputNotWritable,
        ExitCode::AgentRefused,
        ExitCode::GuestMisbehaved,
        ExitCode::Incomplete,
        ExitCode::Busy,
        ExitCode::NoGuestAgent,
        ExitCode::InstallFailed,
        ExitCode::Interrupted,
    ];

    /// The number the process exits with.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// One line on when tvctl exits with this code.
    pub fn meaning(self) -> &'static str {
        match self {
            ExitCode::Ok => "success",
            ExitCode::Internal => "internal or unexpected error",
            ExitCode::Usage => "bad command line or option value",
            ExitCode::LibvirtUnreachable => "libvirtd is not reachable at the URI",
            ExitCode::PermissionDenied => "not root, or permission denied",
            ExitCode::DomainNotFound => "no domain with that name, UUID or id",
            ExitCode::DomainXmlConflict => {
                "domain XML conflict: a foreign channel uses our names, a channel of ours has another path, or the domain cannot take the change"
            }
            ExitCode::HostFileConflict => {
                "host file conflict: a path that is not a FIFO, wrong modes or owner, or a --dir without FIFO support"
            }
            ExitCode::NotSetUp => "the domain is not (completely) set up: run `tvctl setup`",
            ExitCode::AgentTimeout => "trace: the guest agent did not answer in time",
            ExitCode::DomainStopped => "trace: the domain stopped during the recording",
            ExitCode::OutputNotWritable => "trace: the output is not writable or the disk is full",
            ExitCode::AgentRefused => {
                "trace: the guest agent refused the request (unknown event or clock, bad buffer size)"
            }
            ExitCode::GuestMisbehaved => {
                "trace: the guest broke the protocol or a limit (bad page size, CPU list, metadata, pages, too much data); the file holds the good data"
            }
            ExitCode::Incomplete => {
                "trace: the recording is incomplete (a stream fell short of the agent's count, or the agent stopped answering); the file holds what arrived"
            }
            ExitCode::Busy => {
                "another tvctl holds the domain (trace, setup, teardown, or a guest recording of serve), or serve already runs for --dir: wait for it or stop it"
            }
            ExitCode::NoGuestAgent => {
                "agent install/status: no usable qemu-guest-agent in the domain (not running, no channel, not answering, or a needed command forbidden)"
            }
            ExitCode::InstallFailed => {
                "agent install: no static tvctl-agent binary, the guest's architecture differs, or a step in the guest failed"
            }
            ExitCode::Interrupted => {
                "trace: Ctrl-C or SIGTERM twice (once before the recording started): stopped waiting; a file holds what had arrived"
            }
        }
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(code: ExitCode) -> Self {
        std::process::ExitCode::from(code.code())
    }
}

/// The table shown after `tvctl --help`.
pub fn help_table() -> String {
    let mut table = String::from("Exit codes:\n");
    for code in ExitCode::ALL {
        // Writing to a String cannot fail.
        let _ = writeln!(table, "  {:>3}  {}", code.code(), code.meaning());
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_in_order() {
        let codes: Vec<u8> = ExitCode::ALL.iter().map(|c| c.code()).collect();
        let mut sorted = codes.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(codes, sorted);
    }

    #[test]
    fn numbers_scripts_depend_on_do_not_move() {
        assert_eq!(ExitCode::Usage.code(), 2);
        assert_eq!(ExitCode::LibvirtUnreachable.code(), 3);
        assert_eq!(ExitCode::PermissionDenied.code(), 4);
        assert_eq!(ExitCode::DomainNotFound.code(), 5);
        assert_eq!(ExitCode::DomainXmlConflict.code(), 6);
        assert_eq!(ExitCode::HostFileConflict.code(), 7);
        assert_eq!(ExitCode::NotSetUp.code(), 8);
        assert_eq!(ExitCode::AgentTimeout.code(), 9);
        assert_eq!(ExitCode::DomainStopped.code(), 10);
        assert_eq!(ExitCode::OutputNotWritable.code(), 11);
        assert_eq!(ExitCode::AgentRefused.code(), 12);
        assert_eq!(ExitCode::GuestMisbehaved.code(), 13);
        assert_eq!(ExitCode::Incomplete.code(), 14);
        assert_eq!(ExitCode::Busy.code(), 15);
        assert_eq!(ExitCode::Interrupted.code(), 130);
    }

    #[test]
    fn help_table_has_a_row_per_code() {
        let table = help_table();
        for code in ExitCode::ALL {
            let row = format!("{:>3}  {}", code.code(), code.meaning());
            assert!(table.contains(&row), "{row:?} missing in\n{table}");
        }
    }

    #[test]
    fn module_doc_table_matches_the_enum() {
        let source = include_str!("exitcode.rs");
        for code in ExitCode::ALL {
            let row = format!("//! | {} | `{:?}` |", code.code(), code);
            assert!(source.contains(&row), "module doc lacks {row:?}");
        }
    }

    #[test]
    fn readme_lists_every_exit_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).expect("README.md");
        for code in ExitCode::ALL {
            let row = format!("| {} | {} |", code.code(), code.meaning());
            assert!(readme.contains(&row), "README.md lacks the row {row:?}");
        }
    }
}
