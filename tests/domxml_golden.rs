//! Golden tests for `tvctl::domxml`: each `tests/data/domxml/NAME.in.xml` is set up for the
//! domain's own maximum vCPU count and compared with `NAME.setup.xml`; inputs that already
//! hold our channels also have `NAME.teardown.xml`.
//!
//! Run with `TVCTL_BLESS=1` to (re)write the expected files, then review them with `git diff`.

use std::fs;
use std::path::PathBuf;

use tvctl::domxml::{
    apply_plan, our_channels, remove_ours, unified_diff, vcpus, ChannelKind, ChannelPlan,
    DomXmlError, VcpuCount,
};

/// A golden input and the folder its channels live in.
struct Case {
    name: &'static str,
    dir: &'static str,
    /// The input already holds our channels, so teardown cannot give it back unchanged.
    has_ours: bool,
}

const fn case(name: &'static str, dir: &'static str) -> Case {
    Case {
        name,
        dir,
        has_ours: false,
    }
}

const fn set_up(name: &'static str, dir: &'static str) -> Case {
    Case {
        name,
        dir,
        has_ours: true,
    }
}

const CASES: &[Case] = &[
    case("vcpus1", "/var/lib/tvctl/tiny"),
    case("vcpus2-basic", "/var/lib/tvctl/trace-guest"),
    case("vcpus4-current2", "/var/lib/tvctl/hotplug-guest"),
    case("vcpus8", "/var/lib/tvctl/build-box"),
    case("comments", "/var/lib/tvctl/commented"),
    case("qemu-namespace", "/var/lib/tvctl/gdb-guest"),
    case("guest-agent", "/var/lib/tvctl/agent-guest"),
    case("console-same-name", "/var/lib/tvctl/consoles"),
    case("no-devices", "/var/lib/tvctl/bare"),
    case("no-devices-tabs", "/var/lib/tvctl/tabbed"),
    case("devices-self-closing", "/var/lib/tvctl/bare-devices"),
    case("one-line", "/var/lib/tvctl/inline"),
    case("one-line-no-devices", "/var/lib/tvctl/inline-bare"),
    case("crlf", "/var/lib/tvctl/crlf-guest"),
    case("escaping", "/var/lib/tvctl/R&D 'lab' <1>"),
    set_up("grow", "/var/lib/tvctl/trace-guest"),
    set_up("shrink", "/var/lib/tvctl/hotplug-guest"),
    set_up("defined-by-libvirt", "/var/lib/tvctl/agent-guest"),
];

fn data_path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/domxml")
        .join(file)
}

fn read(file: &str) -> String {
    let path = data_path(file);
    fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn input(case: &Case) -> String {
    read(&format!("{}.in.xml", case.name))
}

fn plan_for(case: &Case, xml: &str) -> ChannelPlan {
    let VcpuCount { max, .. } = vcpus(xml).unwrap_or_else(|err| panic!("{}: {err}", case.name));
    ChannelPlan {
        dir: case.dir.to_owned(),
        vcpus: max,
    }
}

fn setup(case: &Case, xml: &str) -> String {
    let plan = plan_for(case, xml);
    apply_plan(xml, &plan)
        .unwrap_or_else(|err| panic!("{}: setup failed: {err}", case.name))
        .xml
}

fn teardown(case: &Case, xml: &str) -> String {
    remove_ours(xml, case.dir)
        .unwrap_or_else(|err| panic!("{}: teardown failed: {err}", case.name))
        .xml
}

/// Compares `actual` with the golden file, or rewrites the file under `TVCTL_BLESS=1`.
fn check_golden(file: &str, actual: &str) -> Option<String> {
    let path = data_path(file);
    if std::env::var_os("TVCTL_BLESS").is_some() {
        fs::write(&path, actual).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        return None;
    }
    let expected = fs::read_to_string(&path).unwrap_or_default();
    (expected != actual).then(|| unified_diff(&expected, actual, file))
}

/// Runs `check` on every case and reports all failures at once.
fn for_all_cases(
    cases: impl IntoIterator<Item = &'static Case>,
    check: impl Fn(&Case) -> Option<String>,
) {
    let failures: Vec<String> = cases
        .into_iter()
        .filter_map(|case| check(case).map(|why| format!("{}:\n{why}", case.name)))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn setup_matches_golden_output() {
    for_all_cases(CASES, |case| {
        let xml = input(case);
        check_golden(&format!("{}.setup.xml", case.name), &setup(case, &xml))
    });
}

#[test]
fn teardown_of_existing_setup_matches_golden_output() {
    for_all_cases(CASES.iter().filter(|case| case.has_ours), |case| {
        let xml = input(case);
        check_golden(
            &format!("{}.teardown.xml", case.name),
            &teardown(case, &xml),
        )
    });
}

#[test]
fn setup_then_teardown_returns_the_input_byte_for_byte() {
    for_all_cases(CASES.iter().filter(|case| !case.has_ours), |case| {
        let xml = input(case);
        let back = teardown(case, &setup(case, &xml));
        (back != xml).then(|| unified_diff(&xml, &back, case.name))
    });
}

#[test]
fn teardown_after_setup_equals_teardown_of_the_input() {
    for_all_cases(CASES.iter().filter(|case| case.has_ours), |case| {
        let xml = input(case);
        let direct = teardown(case, &xml);
        let after_setup = teardown(case, &setup(case, &xml));
        (after_setup != direct).then(|| unified_diff(&direct, &after_setup, case.name))
    });
}

#[test]
fn setup_twice_changes_nothing() {
    for_all_cases(CASES, |case| {
        let once = setup(case, &input(case));
        let again = apply_plan(&once, &plan_for(case, &once)).unwrap();
        let unchanged = !again.changed && again.xml == once && again.added.is_empty();
        (!unchanged).then(|| format!("{again:?}"))
    });
}

#[test]
fn teardown_twice_changes_nothing() {
    for_all_cases(CASES, |case| {
        let once = teardown(case, &setup(case, &input(case)));
        let again = remove_ours(&once, case.dir).unwrap();
        (again.changed || again.xml != once).then(|| format!("{again:?}"))
    });
}

#[test]
fn setup_adds_control_and_one_channel_per_possible_vcpu() {
    for_all_cases(CASES, |case| {
        let xml = input(case);
        let plan = plan_for(case, &xml);
        let mut kinds: Vec<ChannelKind> = our_channels(&setup(case, &xml))
            .unwrap()
            .into_iter()
            .map(|channel| channel.kind)
            .collect();
        kinds.sort();
        let expected: Vec<ChannelKind> = plan.kinds().collect();
        (kinds != expected).then(|| format!("got {kinds:?}, want {expected:?}"))
    });
}

#[test]
fn setup_diff_only_adds_lines_for_a_domain_with_devices() {
    let case = &CASES[1];
    let xml = input(case);

    let diff = unified_diff(&xml, &setup(case, &xml), "trace-guest.xml");

    let changes: Vec<&str> = diff
        .lines()
        .filter(|line| !line.starts_with("+++") && !line.starts_with("---"))
        .filter(|line| line.starts_with('+') || line.starts_with('-'))
        .collect();
    assert_eq!(changes.len(), 3, "{diff}");
    assert!(
        changes
            .iter()
            .all(|line| line.starts_with("+    <channel ")),
        "{diff}"
    );
    assert!(
        diff.starts_with("--- a/trace-guest.xml\n+++ b/trace-guest.xml\n"),
        "{diff}"
    );
}

#[test]
fn unified_diff_of_equal_texts_is_empty() {
    assert_eq!(unified_diff("<a/>\n", "<a/>\n", "x.xml"), "");
}

#[test]
fn grow_adds_only_the_new_vcpu_channels() {
    let case = CASES.iter().find(|case| case.name == "grow").unwrap();
    let xml = input(case);

    let edit = apply_plan(&xml, &plan_for(case, &xml)).unwrap();

    assert_eq!(edit.added, ["trace-path-cpu2", "trace-path-cpu3"]);
    assert!(edit.removed.is_empty());
    assert!(edit.changed);
}

#[test]
fn shrink_removes_only_the_surplus_vcpu_channels() {
    let case = CASES.iter().find(|case| case.name == "shrink").unwrap();
    let xml = input(case);

    let edit = apply_plan(&xml, &plan_for(case, &xml)).unwrap();

    assert!(edit.added.is_empty());
    assert_eq!(edit.removed, ["trace-path-cpu2", "trace-path-cpu3"]);
}

#[test]
fn vcpu_current_and_max_are_read_separately() {
    let xml = read("vcpus4-current2.in.xml");

    assert_eq!(vcpus(&xml), Ok(VcpuCount { max: 4, current: 2 }));
}

#[test]
fn missing_vcpu_means_one_like_libvirt() {
    let xml = read("one-line-no-devices.in.xml");

    assert_eq!(vcpus(&xml), Ok(VcpuCount { max: 1, current: 1 }));
}

#[test]
fn paths_are_xml_escaped_and_read_back_unescaped() {
    let case = CASES.iter().find(|case| case.name == "escaping").unwrap();
    let out = setup(case, &input(case));

    let paths: Vec<String> = our_channels(&out)
        .unwrap()
        .into_iter()
        .filter_map(|ch| ch.path)
        .collect();

    assert!(
        out.contains("path='/var/lib/tvctl/R&amp;D &apos;lab&apos; &lt;1&gt;/agent-ctl-path.sock'"),
        "{out}"
    );
    assert_eq!(paths[0], "/var/lib/tvctl/R&D 'lab' <1>/agent-ctl-path.sock");
}

#[test]
fn consoles_and_serials_with_our_names_are_left_alone() {
    let xml = read("console-same-name.in.xml");

    assert_eq!(our_channels(&xml), Ok(Vec::new()));
}

#[test]
fn qemu_guest_agent_channel_is_not_ours() {
    let xml = read("guest-agent.in.xml");

    assert_eq!(our_channels(&xml), Ok(Vec::new()));
}

/// An input that must be refused, the folder to try it with, and the expected error.
fn conflict(file: &str, dir: &str) -> (DomXmlError, Option<DomXmlError>) {
    let xml = read(file);
    let plan = ChannelPlan {
        dir: dir.to_owned(),
        vcpus: 2,
    };
    let setup_err = apply_plan(&xml, &plan).expect_err(file);
    let teardown_err = remove_ours(&xml, dir).err();
    (setup_err, teardown_err)
}

#[test]
fn channel_left_from_another_folder_is_a_conflicting_path() {
    let expected = DomXmlError::ConflictingPath {
        name: "agent-ctl-path".to_owned(),
        found: Some("/var/lib/tvctl/old-name/agent-ctl-path.sock".to_owned()),
        expected: "/var/lib/tvctl/renamed/agent-ctl-path.sock".to_owned(),
    };

    let (setup_err, teardown_err) = conflict("conflict-path.xml", "/var/lib/tvctl/renamed");

    assert_eq!(setup_err, expected);
    assert_eq!(teardown_err, Some(expected));
}

#[test]
fn unix_channel_with_a_cpu_name_is_a_foreign_target() {
    let (setup_err, teardown_err) =
        conflict("conflict-unix-cpu-name.xml", "/var/lib/tvctl/foreign");

    let expected = DomXmlError::ForeignTarget {
        name: "trace-path-cpu1".to_owned(),
        found: "type='unix'".to_owned(),
        expected: "type='pipe'".to_owned(),
    };
    assert_eq!(setup_err, expected);
    assert_eq!(teardown_err, Some(expected));
}

#[test]
fn pipe_channel_with_the_control_name_is_a_foreign_target() {
    let (setup_err, _) = conflict("conflict-pipe-control-name.xml", "/var/lib/tvctl/foreign");

    assert_eq!(
        setup_err,
        DomXmlError::ForeignTarget {
            name: "agent-ctl-path".to_owned(),
            found: "type='pipe'".to_owned(),
            expected: "type='unix'".to_owned(),
        }
    );
}

#[test]
fn control_channel_in_connect_mode_is_refused_by_setup_but_removed_by_teardown() {
    let dir = "/var/lib/tvctl/connect";

    let (setup_err, teardown_err) = conflict("conflict-connect-mode.xml", dir);

    assert_eq!(
        setup_err,
        DomXmlError::ControlNotBind {
            found: Some("connect".to_owned())
        }
    );
    assert_eq!(teardown_err, None);
    let edit = remove_ours(&read("conflict-connect-mode.xml"), dir).unwrap();
    assert_eq!(edit.removed, ["agent-ctl-path"]);
}

#[test]
fn duplicate_channel_names_are_refused_by_setup() {
    let (setup_err, teardown_err) = conflict("conflict-duplicate.xml", "/var/lib/tvctl/dup");

    assert_eq!(
        setup_err,
        DomXmlError::DuplicateChannel {
            name: "trace-path-cpu0".to_owned(),
            count: 2
        }
    );
    assert_eq!(teardown_err, None);
}

#[test]
fn mismatched_end_tag_is_malformed() {
    let (setup_err, teardown_err) = conflict("malformed-end-tag.xml", "/var/lib/tvctl/x");

    assert!(
        matches!(setup_err, DomXmlError::Malformed { line: 13, .. }),
        "{setup_err}"
    );
    assert!(matches!(teardown_err, Some(DomXmlError::Malformed { .. })));
}

#[test]
fn truncated_xml_is_malformed() {
    let (setup_err, _) = conflict("malformed-truncated.xml", "/var/lib/tvctl/x");

    assert!(
        matches!(setup_err, DomXmlError::Malformed { .. }),
        "{setup_err}"
    );
}

#[test]
fn network_xml_is_not_a_domain() {
    let (setup_err, _) = conflict("not-a-domain.xml", "/var/lib/tvctl/x");

    assert_eq!(
        setup_err,
        DomXmlError::NotADomain {
            found: Some("network".to_owned())
        }
    );
}

#[test]
fn empty_input_has_no_domain() {
    let plan = ChannelPlan {
        dir: "/var/lib/tvctl/x".to_owned(),
        vcpus: 1,
    };

    assert_eq!(
        apply_plan("", &plan),
        Err(DomXmlError::NotADomain { found: None })
    );
}

#[test]
fn every_error_message_says_how_to_fix_it() {
    let errors = [
        conflict("conflict-path.xml", "/var/lib/tvctl/renamed").0,
        conflict("conflict-unix-cpu-name.xml", "/var/lib/tvctl/foreign").0,
        conflict("conflict-pipe-control-name.xml", "/var/lib/tvctl/foreign").0,
        conflict("conflict-connect-mode.xml", "/var/lib/tvctl/connect").0,
        conflict("conflict-duplicate.xml", "/var/lib/tvctl/dup").0,
        conflict("malformed-end-tag.xml", "/var/lib/tvctl/x").0,
        conflict("not-a-domain.xml", "/var/lib/tvctl/x").0,
    ];

    for err in errors {
        let message = err.to_string();
        let fix = [
            "`virsh edit DOMAIN`",
            "`virsh dumpxml --inactive DOMAIN`",
            "run teardown",
        ];
        assert!(
            fix.iter().any(|fix| message.contains(fix)),
            "no fix in: {message}"
        );
    }
}
