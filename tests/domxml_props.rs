//! Property tests for `tvctl::domxml`: for every golden input, any vCPU count in 1..=64 and
//! any folder name, setup then teardown is the identity and setup is idempotent.

use std::fs;
use std::path::PathBuf;

use proptest::prelude::*;
use tvctl::domxml::{apply_plan, our_channels, remove_ours, ChannelPlan};

/// Golden inputs without channels of ours, so teardown must give them back exactly.
const INPUTS: &[&str] = &[
    "vcpus1",
    "vcpus2-basic",
    "vcpus4-current2",
    "vcpus8",
    "comments",
    "qemu-namespace",
    "guest-agent",
    "console-same-name",
    "no-devices",
    "no-devices-tabs",
    "devices-self-closing",
    "one-line",
    "one-line-no-devices",
    "crlf",
    "escaping",
];

fn load_inputs() -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/domxml");
    INPUTS
        .iter()
        .map(|name| {
            let path = dir.join(format!("{name}.in.xml"));
            fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        })
        .collect()
}

/// Absolute folders from a charset that includes the XML specials `&`, `'`, `"`, `<`, `>`.
fn folder() -> impl Strategy<Value = String> {
    proptest::collection::vec("[a-zA-Z0-9._ &'\"<>@-]{1,12}", 1..4)
        .prop_map(|parts| format!("/{}", parts.join("/")))
}

proptest! {
    #[test]
    fn setup_then_teardown_is_identity_and_setup_is_idempotent(
        input in proptest::sample::select(load_inputs()),
        vcpus in 1u32..=64,
        dir in folder(),
    ) {
        let plan = ChannelPlan { dir: dir.clone(), vcpus };

        let setup = apply_plan(&input, &plan).unwrap();
        let again = apply_plan(&setup.xml, &plan).unwrap();
        let teardown = remove_ours(&setup.xml, &dir).unwrap();

        prop_assert!(setup.changed);
        prop_assert_eq!(setup.added.len(), usize::try_from(vcpus).unwrap() + 1);
        prop_assert_eq!(our_channels(&setup.xml).unwrap().len(), setup.added.len());
        prop_assert!(!again.changed);
        prop_assert_eq!(&again.xml, &setup.xml);
        prop_assert_eq!(&teardown.xml, &input);
        prop_assert_eq!(teardown.removed, setup.added);
    }

    #[test]
    fn resizing_matches_a_fresh_setup(
        input in proptest::sample::select(load_inputs()),
        from in 1u32..=16,
        to in 1u32..=16,
        dir in folder(),
    ) {
        let first = ChannelPlan { dir: dir.clone(), vcpus: from };
        let second = ChannelPlan { dir: dir.clone(), vcpus: to };

        let resized = apply_plan(&apply_plan(&input, &first).unwrap().xml, &second).unwrap();

        let mut kinds: Vec<_> = our_channels(&resized.xml).unwrap().into_iter().map(|ch| ch.kind).collect();
        kinds.sort();
        prop_assert_eq!(kinds, second.kinds().collect::<Vec<_>>());
        prop_assert_eq!(remove_ours(&resized.xml, &dir).unwrap().xml, input);
    }
}
