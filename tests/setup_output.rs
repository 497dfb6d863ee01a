//! Pure tier: the JSON and human output of setup, teardown and status, pinned by golden files
//! in tests/data/setup/ (rewrite them with `TVCTL_BLESS=1` after a deliberate change, and
//! update docs/json.md with it). Every JSON field must be documented in docs/json.md.

mod common;

use std::fs;
use std::path::PathBuf;

use common::key_paths;

use tvctl::cli::{print_change, print_status, Verbosity};
use tvctl::domxml::unified_diff;
use tvctl::setup::{
    ChangeReport, ChannelChanges, ChannelStatus, DomainStatus, FileChanges, FilesStatus,
    GroupReport, LiveChanges, Problem, ProblemKind, ServeInfo, StatusReport,
};

const FOLDER: &str = "/var/lib/tvctl/web1";

fn group() -> GroupReport {
    GroupReport {
        name: "libvirt-qemu".into(),
        gid: 64055,
    }
}

fn setup_report() -> ChangeReport {
    ChangeReport {
        command: "setup",
        domain: "web1".into(),
        uuid: "0b5c4bd2-3a6f-4d0e-9a51-7c2d1e0f9a10".into(),
        folder: FOLDER.into(),
        dry_run: false,
        changed: true,
        vcpus: Some(2),
        group: Some(group()),
        state: "running",
        channels: ChannelChanges {
            added: vec![
                "agent-ctl-path".into(),
                "trace-path-cpu0".into(),
                "trace-path-cpu1".into(),
            ],
            removed: vec![],
        },
        controllers: vec![0],
        files: FileChanges {
            created: [
                "",
                "/trace-path-cpu0.in",
                "/trace-path-cpu0.out",
                "/trace-path-cpu1.in",
                "/trace-path-cpu1.out",
                "/setup.json",
            ]
            .iter()
            .map(|p| format!("{FOLDER}{p}"))
            .collect(),
            removed: vec![],
        },
        live: LiveChanges::default(),
        restart_needed: true,
        live_possible: false,
        xml_diff: "--- a/domain.xml\n+++ b/domain.xml\n@@ -1 +1,2 @@\n <devices>\n+  <channel/>\n"
            .into(),
    }
}

fn teardown_report() -> ChangeReport {
    let mut report = setup_report();
    report.command = "teardown";
    report.dry_run = true;
    report.vcpus = None;
    report.group = None;
    report.state = "shut_off";
    report.channels = ChannelChanges {
        added: vec![],
        removed: report.channels.added.clone(),
    };
    let mut removed = report.files.created.split_off(1);
    removed.sort();
    removed.push(FOLDER.into());
    report.files = FileChanges {
        created: vec![],
        removed,
    };
    report.live = LiveChanges::default();
    report.restart_needed = false;
    report
}

fn status_report() -> StatusReport {
    let good = DomainStatus {
        domain: "web1".into(),
        uuid: "0b5c4bd2-3a6f-4d0e-9a51-7c2d1e0f9a10".into(),
        state: "running",
        folder: FOLDER.into(),
        set_up: true,
        ok: true,
        vcpus: Some(2),
        channels: ChannelStatus {
            control: true,
            cpus: 2,
            missing: vec![],
            extra: vec![],
        },
        live_channels: Some(3),
        files: FilesStatus {
            folder: true,
            group: Some(group()),
            fifos_expected: 4,
            fifos_ok: 4,
        },
        control_socket: true,
        agent_port: Some("connected".into()),
        problems: vec![],
        serve: Some(ServeInfo {
            state: "connected".into(),
            detail: "tvctl-agent 0.1.0, protocol 3".into(),
        }),
    };
    let grown = DomainStatus {
        domain: "web2".into(),
        uuid: "5f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9".into(),
        state: "shut_off",
        folder: "/var/lib/tvctl/web2".into(),
        set_up: true,
        ok: false,
        vcpus: Some(3),
        channels: ChannelStatus {
            control: true,
            cpus: 2,
            missing: vec!["trace-path-cpu2".into()],
            extra: vec![],
        },
        live_channels: None,
        files: FilesStatus {
            folder: true,
            group: Some(group()),
            fifos_expected: 6,
            fifos_ok: 4,
        },
        control_socket: false,
        agent_port: None,
        problems: vec![Problem {
            kind: ProblemKind::NotSetUp,
            message: "run `tvctl setup web2`".into(),
        }],
        serve: None,
    };
    StatusReport {
        command: "status",
        domains: vec![good, grown],
    }
}

fn data_path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/setup")
        .join(file)
}

/// Compares `actual` with the golden file, or rewrites the file under `TVCTL_BLESS=1`.
fn assert_golden(file: &str, actual: &str) {
    let path = data_path(file);
    if std::env::var_os("TVCTL_BLESS").is_some() {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, actual).unwrap();
        return;
    }
    let expected = fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "{file} differs from the golden file (TVCTL_BLESS=1 rewrites it):\n{}",
        unified_diff(&expected, actual, file)
    );
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap() + "\n"
}

#[test]
fn setup_json_matches_golden_file() {
    assert_golden("setup.json", &json(&setup_report()));
}

#[test]
fn teardown_json_matches_golden_file() {
    assert_golden("teardown.json", &json(&teardown_report()));
}

#[test]
fn status_json_matches_golden_file() {
    assert_golden("status.json", &json(&status_report()));
}

#[test]
fn human_output_matches_golden_files() {
    let mut unchanged = setup_report();
    unchanged.changed = false;
    let mut hot_pluggable = setup_report();
    hot_pluggable.live_possible = true;
    let mut nothing_to_remove = teardown_report();
    nothing_to_remove.dry_run = false;
    nothing_to_remove.changed = false;
    let text = [
        print_change(&setup_report(), Verbosity::Normal),
        print_change(&unchanged, Verbosity::Normal),
        print_change(&hot_pluggable, Verbosity::Normal),
        print_change(&teardown_report(), Verbosity::Normal),
        print_change(&nothing_to_remove, Verbosity::Normal),
        print_status(&status_report(), Verbosity::Normal),
        print_status(
            &StatusReport {
                command: "status",
                domains: vec![],
            },
            Verbosity::Normal,
        ),
    ]
    .join("----\n");
    assert_golden("human.txt", &text);
}

/// Every key path in `value`: `files.created`, `problems[].kind`.

#[test]
fn every_json_field_is_documented() {
    let docs = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/json.md")).unwrap();
    let mut paths = Vec::new();
    for value in [
        serde_json::to_value(setup_report()).unwrap(),
        serde_json::to_value(teardown_report()).unwrap(),
        serde_json::to_value(status_report()).unwrap(),
    ] {
        key_paths(&value, "", &mut paths);
    }
    let undocumented: Vec<&String> = paths
        .iter()
        .filter(|path| {
            // Status entries are documented in their own table; a *group* once, as a type.
            let path = path.strip_prefix("domains[].").unwrap_or(path);
            let in_group = path.ends_with("group.name") || path.ends_with("group.gid");
            !in_group && !docs.contains(&format!("| `{path}` |"))
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "docs/json.md has no table row for {undocumented:?}"
    );
}
