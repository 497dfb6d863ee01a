//! `tvctl teardown`: take out exactly what setup put in. Our channels leave the persistent
//! XML (everything else stays byte for byte), so do the virtio-serial controllers libvirt
//! added for them (recorded in `setup.json`); a running domain has our channels hot-unplugged;
//! the FIFOs, socket, state file and folder are removed. Transactional like setup.

use std::path::Path;

use super::{
    failed, files_report, read_state, refuse_remote, report, require_root, ChangeReport,
    ChannelChanges, Failed, LiveChanges, SetupError, Target, Undo,
};
use crate::channels::FileOp;
use crate::domxml::{self, Edit};
use crate::libvirt::Hypervisor;

/// Options of `tvctl teardown`.
#[derive(Debug, Clone, Default)]
pub struct TeardownOptions {
    /// Report what would change, change nothing.
    pub dry_run: bool,
}

/// Removes tvctl's channels and files from domain `spec` (name, UUID or id). A domain with
/// nothing of tvctl's is no error: the report says nothing changed.
pub fn teardown(
    hv: &Hypervisor,
    root: &Path,
    spec: &str,
    options: &TeardownOptions,
) -> Result<ChangeReport, SetupError> {
    if !options.dry_run {
        require_root("teardown")?;
    }
    refuse_remote(hv.uri())?;

    // 1. Check everything; change nothing.
    let target = Target::look_up(hv, root, spec)?;
    let dir = target.folder_str()?.to_owned();
    let before = target.dom.inactive_xml()?;
    let Edit {
        xml: without_channels,
        removed,
        ..
    } = domxml::remove_ours(&before, &dir)?;
    let mut controllers = Vec::new();
    let mut after = without_channels;
    if !removed.is_empty() {
        let state = read_state(&target.folder)?;
        (after, controllers) =
            domxml::remove_virtio_serial_controllers(&after, &state.added_controllers)?;
    }
    let file_ops = target.folder.plan_teardown()?;
    let state = target.dom.state()?;
    let detach = if state.is_active() {
        live_channels(&target, &dir)?
    } else {
        Vec::new()
    };
    let mut report = target.report("teardown", options.dry_run, report::state_name(state));
    // Idempotent like setup: nothing of ours left is success, said as such.
    report.changed = !(removed.is_empty() && file_ops.is_empty() && detach.is_empty());
    if !report.changed {
        return Ok(report);
    }
    report.channels = ChannelChanges {
        added: Vec::new(),
        removed,
    };
    report.controllers = controllers;
    report.files = files_report(&file_ops);
    report.live = LiveChanges {
        attached: Vec::new(),
        detached: detach.iter().map(|(name, _)| name.clone()).collect(),
    };
    if options.dry_run {
        report.xml_diff = domxml::unified_diff(&before, &after, "domain.xml");
        return Ok(report);
    }

    // 2. Change, undoing everything if a step fails.
    let mut undo = Undo::new(&target.dom, &before);
    match apply_teardown(&target, &mut undo, &detach, &before, &after, &file_ops) {
        Ok(defined) => {
            undo.commit();
            report.xml_diff = domxml::unified_diff(&before, &defined, "domain.xml");
            Ok(report)
        }
        Err(Failed { step, error }) => Err(undo.roll_back(hv, step, *error)),
    }
}

/// Returns the persistent XML as libvirt has it afterwards.
fn apply_teardown(
    target: &Target<'_>,
    undo: &mut Undo<'_>,
    detach: &[(String, String)],
    before: &str,
    after: &str,
    file_ops: &[FileOp],
) -> Result<String, Failed> {
    for (_, xml) in detach {
        let step = "hot-unplugging channels from the running domain";
        target.dom.detach_live(xml).map_err(failed(step))?;
        undo.detached.push(xml.clone());
    }
    let mut defined = before.to_owned();
    if after != before {
        let step = "defining the domain XML without our channels";
        target.hv.define(after).map_err(failed(step))?;
        undo.defined = true;
        defined = target.dom.inactive_xml().map_err(failed(step))?;
    }
    for op in file_ops {
        undo.journal
            .apply(op)
            .map_err(failed("removing the host files"))?;
    }
    Ok(defined)
}

/// Our channels in the running domain that use this folder: (target name, device XML).
fn live_channels(target: &Target<'_>, dir: &str) -> Result<Vec<(String, String)>, SetupError> {
    let live_xml = target.dom.live_xml()?;
    let ours = domxml::our_channels(&live_xml)?;
    Ok(ours
        .into_iter()
        .filter(|ch| ch.path.as_deref() == Some(ch.kind.source_path(dir).as_str()))
        .map(|ch| (ch.target_name, live_xml[ch.span].to_owned()))
        .collect())
}
