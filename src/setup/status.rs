//! `tvctl status`: how each domain stands against what setup would make of it, without
//! changing anything. Needs no root, only read access to libvirt.

use std::path::Path;

use super::report::{
    state_name, ChannelStatus, DomainStatus, FilesStatus, GroupReport, Problem, ProblemKind,
    StatusReport,
};
use super::SetupError;
use crate::channels::{DomainFolder, FileProblem};
use crate::domxml::{self, ChannelKind, ChannelPlan};
use crate::exitcode::ExitCode;
use crate::libvirt::{Dom, Hypervisor};

/// The status of domain `spec` (name, UUID or id), or of every domain that has tvctl's
/// channels or folder when `spec` is `None`.
pub fn status(
    hv: &Hypervisor,
    root: &Path,
    spec: Option<&str>,
) -> Result<StatusReport, SetupError> {
    let qemu = hv.qemu_dac_label()?;
    let libvirt_version = hv.lib_version()?;
    let mut domains = Vec::new();
    match spec {
        Some(spec) => domains.push(domain_status(
            &hv.lookup(spec)?,
            root,
            qemu,
            libvirt_version,
        )?),
        None => {
            for name in hv.domain_names()? {
                // A domain may vanish between listing and lookup, or while it is read (another
                // program undefines it); it is then not ours to show.
                let Ok(dom) = hv.lookup(&name) else { continue };
                let status = match domain_status(&dom, root, qemu, libvirt_version) {
                    Ok(status) => status,
                    Err(_) if hv.lookup(&name).is_err() => continue,
                    Err(e) => return Err(e),
                };
                if status.set_up || status.files.folder {
                    domains.push(status);
                }
            }
        }
    }
    Ok(StatusReport {
        command: "status",
        domains,
    })
}

impl StatusReport {
    /// 0 when every domain shown is fully set up; else the code of the gravest problem class
    /// (XML conflict 6, host file 7, not set up 8).
    pub fn exit_code(&self) -> ExitCode {
        let worst = self
            .domains
            .iter()
            .flat_map(|d| &d.problems)
            .map(|p| p.kind)
            .min();
        match worst {
            None => ExitCode::Ok,
            Some(ProblemKind::XmlConflict) => ExitCode::DomainXmlConflict,
            Some(ProblemKind::HostFile) => ExitCode::HostFileConflict,
            Some(ProblemKind::NotSetUp) => ExitCode::NotSetUp,
        }
    }
}

fn domain_status(
    dom: &Dom,
    root: &Path,
    qemu: Option<(u32, u32)>,
    libvirt_version: u32,
) -> Result<DomainStatus, SetupError> {
    let name = dom.name();
    let folder = DomainFolder::new(root, &name)?;
    let dir = folder.path().display().to_string();
    let state = dom.state()?;
    let xml = dom.inactive_xml()?;
    let mut problems = Vec::new();
    let mut problem = |kind, message: String| problems.push(Problem { kind, message });

    let ours = domxml::our_channels(&xml).unwrap_or_default();
    let mut channels = ChannelStatus {
        control: ours.iter().any(|ch| ch.kind == ChannelKind::Control),
        cpus: count(ours.iter().filter(|ch| ch.kind != ChannelKind::Control)),
        ..ChannelStatus::default()
    };
    let set_up = !ours.is_empty();
    let vcpus = match domxml::vcpus(&xml) {
        Ok(count) => Some(count.max),
        Err(err) => {
            problem(ProblemKind::XmlConflict, err.to_string());
            None
        }
    };
    if let Some(vcpus) = vcpus {
        let plan = ChannelPlan {
            dir: dir.clone(),
            vcpus,
        };
        match domxml::apply_plan(&xml, &plan) {
            Ok(_) if !set_up => problem(
                ProblemKind::NotSetUp,
                format!("domain '{name}' is not set up: run `tvctl setup {name}`"),
            ),
            Ok(edit) if edit.changed => {
                channels.missing = edit.added;
                channels.extra = edit.removed;
                problem(
                    ProblemKind::NotSetUp,
                    format!(
                        "the channels do not match the domain's {vcpus} vCPUs (missing: {}; extra: {}): run `tvctl setup {name}`",
                        list_or_none(&channels.missing),
                        list_or_none(&channels.extra)
                    ),
                );
            }
            Ok(_) => {}
            Err(err) => problem(ProblemKind::XmlConflict, err.to_string()),
        }
    }

    let inspected = folder.inspect(vcpus.unwrap_or(0), qemu);
    if set_up && !inspected.exists {
        problem(
            ProblemKind::NotSetUp,
            format!("the folder {dir} is missing: run `tvctl setup {name}`"),
        );
    }
    for file_problem in &inspected.problems {
        match file_problem {
            FileProblem::Missing(message) => problem(ProblemKind::NotSetUp, message.clone()),
            FileProblem::Wrong(message) => problem(ProblemKind::HostFile, message.clone()),
        }
    }
    let mut agent_port = None;
    let live_channels = if state.is_active() {
        let live_xml = dom.live_xml()?;
        let live = domxml::our_channels(&live_xml).unwrap_or_default();
        agent_port = live
            .iter()
            .find(|c| c.kind == ChannelKind::Control)
            .and_then(|c| c.target_state.clone())
            .filter(|s| s == "connected" || s == "disconnected");
        let live_count = count(live.iter());
        if set_up && live_count != count(ours.iter()) {
            let remedy = if super::live::hotplug_possible(libvirt_version, &live_xml) {
                format!("restart it, or run `tvctl setup --live {name}`")
            } else {
                restart_remedy(&live_xml, libvirt_version)
            };
            problem(
                ProblemKind::NotSetUp,
                format!(
                    "the running domain has {live_count} of the {} channels in its configuration: {remedy}",
                    ours.len()
                ),
            );
        }
        Some(live_count)
    } else {
        None
    };
    Ok(DomainStatus {
        domain: name,
        uuid: dom.uuid(),
        state: state_name(state),
        folder: dir,
        set_up,
        ok: problems.is_empty(),
        vcpus,
        channels,
        live_channels,
        files: FilesStatus {
            folder: inspected.exists,
            group: inspected.gid.map(GroupReport::of),
            fifos_expected: inspected.fifos_expected,
            fifos_ok: inspected.fifos_ok,
        },
        control_socket: inspected.socket,
        agent_port,
        serve: None,
        problems,
    })
}

/// Why `setup --live` cannot help this running domain, and the restart that does.
fn restart_remedy(live_xml: &str, libvirt_version: u32) -> String {
    let why = if libvirt_version < super::live::PIPE_HOTPLUG_SINCE {
        format!(
            "libvirt {} cannot hot-plug pipe channels",
            super::live::version_text(libvirt_version)
        )
    } else if domxml::virtio_serial_controllers(live_xml).is_ok_and(|c| c.is_empty()) {
        "it runs without a virtio-serial controller, which cannot be hot-plugged".to_owned()
    } else {
        "the channels cannot be hot-plugged".to_owned()
    };
    format!("restart it (shut it down and start it again; a reboot inside the guest is not enough): {why}")
}

fn count<T>(items: impl Iterator<Item = T>) -> u32 {
    u32::try_from(items.count()).unwrap_or(u32::MAX)
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}
