//! Edge cases of `tvctl::domxml` that are clearer inline than as golden files: the two
//! documented non-identities, vCPU parsing errors and plan validation.

use tvctl::domxml::{apply_plan, remove_ours, vcpus, ChannelPlan, DomXmlError, VcpuCount};

const DIR: &str = "/var/lib/tvctl/edge";

fn plan(vcpus: u32) -> ChannelPlan {
    ChannelPlan {
        dir: DIR.to_owned(),
        vcpus,
    }
}

fn round_trip(xml: &str) -> String {
    let set_up = apply_plan(xml, &plan(1)).unwrap().xml;
    remove_ours(&set_up, DIR).unwrap().xml
}

#[test]
fn empty_devices_pair_comes_back_self_closing() {
    let xml = "<domain type='qemu'>\n  <name>e</name>\n  <devices></devices>\n</domain>\n";

    assert_eq!(
        round_trip(xml),
        "<domain type='qemu'>\n  <name>e</name>\n  <devices/>\n</domain>\n"
    );
}

#[test]
fn whitespace_only_devices_as_last_child_is_removed() {
    let xml = "<domain type='qemu'>\n  <name>e</name>\n  <devices>\n  </devices>\n</domain>\n";

    assert_eq!(
        round_trip(xml),
        "<domain type='qemu'>\n  <name>e</name>\n</domain>\n"
    );
}

#[test]
fn whitespace_only_devices_before_other_elements_is_kept() {
    let xml = "<domain type='qemu'>\n  <devices>\n  </devices>\n  <on_crash>destroy</on_crash>\n</domain>\n";

    assert_eq!(round_trip(xml), xml);
}

#[test]
fn self_closing_devices_with_a_space_keeps_its_space() {
    let xml = "<domain type='qemu'>\n  <devices />\n</domain>\n";

    assert_eq!(round_trip(xml), xml);
}

#[test]
fn devices_with_a_comment_left_is_kept_after_teardown() {
    let xml = "<domain type='qemu'>\n  <devices>\n    <!-- keep -->\n  </devices>\n</domain>\n";

    assert_eq!(round_trip(xml), xml);
}

#[test]
fn teardown_without_our_channels_changes_nothing() {
    let xml = "<domain type='qemu'>\n  <devices></devices>\n</domain>\n";

    let edit = remove_ours(xml, DIR).unwrap();

    assert!(!edit.changed);
    assert_eq!(edit.xml, xml);
}

#[test]
fn setup_on_a_self_closing_domain_is_malformed() {
    let err = apply_plan("<domain type='qemu'/>", &plan(1)).unwrap_err();

    assert!(
        matches!(err, DomXmlError::Malformed { line: 1, .. }),
        "{err}"
    );
}

#[test]
fn a_second_devices_element_is_malformed() {
    let xml = "<domain>\n<devices/>\n<devices/>\n</domain>";

    assert!(matches!(
        vcpus(xml),
        Err(DomXmlError::Malformed { line: 3, .. })
    ));
}

#[test]
fn vcpu_text_must_be_a_positive_count() {
    for bad in [
        "<vcpu>two</vcpu>",
        "<vcpu>0</vcpu>",
        "<vcpu/>",
        "<vcpu>-1</vcpu>",
    ] {
        let xml = format!("<domain>{bad}</domain>");

        assert!(
            matches!(vcpus(&xml), Err(DomXmlError::BadVcpu { .. })),
            "{bad}"
        );
    }
}

#[test]
fn vcpu_current_above_max_is_an_error() {
    let err = vcpus("<domain><vcpu current='8'>4</vcpu></domain>").unwrap_err();

    assert!(
        err.to_string().contains("current='8' above its maximum 4"),
        "{err}"
    );
}

#[test]
fn vcpu_allows_surrounding_whitespace() {
    let xml = "<domain><vcpu placement='static'>\n  4\n</vcpu></domain>";

    assert_eq!(vcpus(xml), Ok(VcpuCount { max: 4, current: 4 }));
}

#[test]
fn plan_for_zero_vcpus_is_refused() {
    let xml = "<domain><devices/></domain>";

    assert_eq!(apply_plan(xml, &plan(0)), Err(DomXmlError::ZeroVcpus));
}

#[test]
fn relative_dir_is_refused() {
    let xml = "<domain><devices/></domain>";
    let relative = ChannelPlan {
        dir: "tvctl/edge".to_owned(),
        vcpus: 1,
    };

    let err = apply_plan(xml, &relative).unwrap_err();

    assert!(
        matches!(
            err,
            DomXmlError::InvalidDir {
                reason: "is not absolute",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn trailing_slash_in_dir_makes_no_difference() {
    let xml = "<domain>\n  <devices>\n  </devices>\n  <on_crash>destroy</on_crash>\n</domain>\n";
    let with_slash = ChannelPlan {
        dir: format!("{DIR}/"),
        vcpus: 2,
    };

    let set_up = apply_plan(xml, &with_slash).unwrap().xml;

    assert_eq!(set_up, apply_plan(xml, &plan(2)).unwrap().xml);
    assert!(!apply_plan(&set_up, &plan(2)).unwrap().changed);
}

#[test]
fn our_names_nested_outside_devices_are_ignored() {
    let xml = "<domain>\n  <devices>\n  </devices>\n  <metadata><channel type='unix'><target type='virtio' name='agent-ctl-path'/></channel></metadata>\n</domain>\n";

    let edit = apply_plan(xml, &plan(1)).unwrap();

    assert_eq!(edit.added, ["agent-ctl-path", "trace-path-cpu0"]);
    assert_eq!(remove_ours(&edit.xml, DIR).unwrap().xml, xml);
}
