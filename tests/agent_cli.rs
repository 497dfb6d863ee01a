//! `tvctl-agent`'s own command line: help and version exit 0, a bad argument exits 2. Runs the
//! real binary; needs no guest.

use assert_cmd::Command;

fn agent() -> Command {
    Command::cargo_bin("tvctl-agent").expect("the tvctl-agent binary is built")
}

#[test]
fn help_prints_usage_on_stdout_and_exits_0() {
    for flag in ["--help", "-h"] {
        let out = agent().arg(flag).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{flag}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("usage:"), "{flag}: {text}");
        assert!(
            text.contains("tvctl-agent record -e EVENT"),
            "{flag}: {text}"
        );
    }
}

#[test]
fn version_prints_the_crate_version_and_exits_0() {
    let out = agent().arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("tvctl-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn an_unknown_argument_exits_2_with_the_usage_on_stderr() {
    let out = agent().arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown argument '--bogus'"), "{err}");
    assert!(err.contains("usage:"), "{err}");
}
