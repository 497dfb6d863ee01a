//! `tvctl setup`, `teardown` and `status`: give a libvirt domain tvctl's channels and the
//! host FIFOs behind them, take them away again, and report how a domain stands.
//!
//! Setup and teardown are transactional. Everything is checked first and nothing changes when
//! a check fails: the domain lookup, the XML edit ([`crate::domxml`]), the host files
//! ([`crate::channels`]) and, with `--live`, whether the running domain can take the
//! channels. Then, in this order, each step recorded so it can be undone:
//!
//! 1. create the folder and FIFOs (teardown: hot-unplug our channels from a running domain),
//! 2. `define` the new persistent XML (skipped when domxml reports no change),
//! 3. setup: record the virtio-serial controllers libvirt added for us in `setup.json`,
//!    then with `--live` hot-plug the channels; teardown: remove the files and the folder.
//!
//! If a step fails, the steps before it are undone in reverse order: hot-plugged channels
//! are unplugged (and unplugged ones plugged back), the old XML is defined again and the
//! file journal puts the files back. The domain's XML and the filesystem are then as before.

pub mod live;
mod report;
mod status;
mod teardown;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::channels::{self, DomainFolder, FileError, FileOp, Journal, Owners, RollbackError};
use crate::domxml::{self, ChannelPlan, DomXmlError};
use crate::exitcode::ExitCode;
use crate::libvirt::{Dom, Hypervisor, LibvirtError};

pub use report::*;
pub use status::status;
pub use teardown::{teardown, TeardownOptions};

/// Why setup, teardown or status failed. Every message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("tvctl {command} changes the domain's configuration and creates root-owned files: run it as root (sudo tvctl {command} ...)")]
    NotRoot { command: &'static str },
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Xml(#[from] DomXmlError),
    #[error(transparent)]
    Files(#[from] FileError),
    #[error("{uri} names a remote host, but the FIFOs must be on the host that runs QEMU: run tvctl on that host")]
    RemoteUri { uri: String },
    #[error("domain '{domain}' is transient (it has no persistent configuration): make it persistent with `virsh dumpxml {domain} > {domain}.xml && virsh define {domain}.xml`, then run tvctl again")]
    Transient { domain: String },
    #[error("domain '{domain}' is running without a virtio-serial controller, and libvirt cannot hot-plug one: run setup without --live and restart the domain")]
    NoLiveController { domain: String },
    #[error("libvirt cannot hot-plug these channels into a running domain ({message}): run setup without --live; the channels then take effect at the domain's next boot")]
    HotplugUnsupported { message: String },
    #[error("libvirt at {uri} reports no DAC label for QEMU, so tvctl cannot tell QEMU's group: pass --group with the group QEMU runs as")]
    NoQemuGroup { uri: String },
    #[error("group '{0}' does not exist: pass an existing group name or number to --group")]
    UnknownGroup(String),
    #[error("the folder {0:?} is not valid UTF-8, which libvirt's XML needs: pass another --dir")]
    NonUtf8Dir(std::path::PathBuf),
    #[error("{} is not valid: remove it (teardown then keeps libvirt's virtio-serial controllers)", .path.display())]
    BadState {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{step} failed; every change was undone")]
    RolledBack {
        step: &'static str,
        #[source]
        source: Box<SetupError>,
    },
    #[error(
        "{step} failed, and undoing the changes failed too ({rollback}); the step's error follows"
    )]
    RollbackFailed {
        step: &'static str,
        rollback: String,
        #[source]
        source: Box<SetupError>,
    },
}

impl SetupError {
    /// The exit code `tvctl` ends with for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            SetupError::NotRoot { .. } => ExitCode::PermissionDenied,
            SetupError::Libvirt(err) => libvirt_exit_code(err),
            SetupError::Xml(err) => match err {
                DomXmlError::InvalidDir { .. } => ExitCode::Usage,
                DomXmlError::ZeroVcpus => ExitCode::Internal,
                _ => ExitCode::DomainXmlConflict,
            },
            SetupError::Files(err) => err.exit_code(),
            SetupError::RemoteUri { .. }
            | SetupError::NoQemuGroup { .. }
            | SetupError::UnknownGroup(_)
            | SetupError::NonUtf8Dir(_) => ExitCode::Usage,
            SetupError::Transient { .. }
            | SetupError::NoLiveController { .. }
            | SetupError::HotplugUnsupported { .. } => ExitCode::DomainXmlConflict,
            SetupError::BadState { .. } => ExitCode::HostFileConflict,
            SetupError::RolledBack { source, .. } => source.exit_code(),
            SetupError::RollbackFailed { .. } => ExitCode::Internal,
        }
    }
}

/// The exit code for a libvirt error, wherever it comes from.
pub fn libvirt_exit_code(err: &LibvirtError) -> ExitCode {
    match err {
        LibvirtError::Unreachable { .. } => ExitCode::LibvirtUnreachable,
        LibvirtError::PermissionDenied { .. } => ExitCode::PermissionDenied,
        LibvirtError::NoDomain(_) => ExitCode::DomainNotFound,
        LibvirtError::BadXml(_) => ExitCode::DomainXmlConflict,
        LibvirtError::Other { .. } => ExitCode::Internal,
    }
}

/// Options of `tvctl setup`.
#[derive(Debug, Clone, Default)]
pub struct SetupOptions {
    /// Report what would change, change nothing.
    pub dry_run: bool,
    /// Also hot-plug the channels into the running domain.
    pub live: bool,
    /// The group of the folder and FIFOs instead of QEMU's (libvirt's DAC label).
    pub group: Option<String>,
}

/// Fails unless tvctl runs as root; setup and teardown check this before anything else.
pub fn require_root(command: &'static str) -> Result<(), SetupError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(SetupError::NotRoot { command })
    }
}

/// Fails for a URI that names another host: the FIFOs must be where QEMU runs.
pub fn refuse_remote(uri: &str) -> Result<(), SetupError> {
    let Some((_, rest)) = uri.split_once("://") else {
        return Ok(());
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    let host = host.split(':').next().unwrap_or_default();
    if matches!(host, "" | "localhost" | "127.0.0.1" | "[::1]") {
        Ok(())
    } else {
        Err(SetupError::RemoteUri {
            uri: uri.to_owned(),
        })
    }
}

/// Gives domain `spec` (name, UUID or id) tvctl's channels and FIFOs under `root`.
pub fn setup(
    hv: &Hypervisor,
    root: &Path,
    spec: &str,
    options: &SetupOptions,
) -> Result<ChangeReport, SetupError> {
    if !options.dry_run {
        require_root("setup")?;
    }
    refuse_remote(hv.uri())?;

    // 1. Check everything; change nothing.
    let target = Target::look_up(hv, root, spec)?;
    let owners = owners(hv, options.group.as_deref())?;
    let before = target.dom.inactive_xml()?;
    let vcpus = domxml::vcpus(&before)?.max;
    let plan = ChannelPlan {
        dir: target.folder_str()?.to_owned(),
        vcpus,
    };
    let edit = domxml::apply_plan(&before, &plan)?;
    let file_ops = target.folder.plan_setup(vcpus, &owners)?;
    let state = target.dom.state()?;
    let live = if options.live && state.is_active() {
        plan_live(&target, &plan)?
    } else {
        LivePlan::default()
    };
    let mut report = target.report("setup", options.dry_run, report::state_name(state));
    report.vcpus = Some(vcpus);
    report.group = Some(GroupReport::of(owners.group));
    report.channels = ChannelChanges {
        added: edit.added.clone(),
        removed: edit.removed.clone(),
    };
    report.files = files_report(&file_ops);
    report.live = LiveChanges {
        attached: live.attach.iter().map(|d| d.name.clone()).collect(),
        detached: live.detach.iter().map(|d| d.name.clone()).collect(),
    };
    report.changed = edit.changed || !file_ops.is_empty() || !live.is_empty();
    if state.is_active() {
        let live_xml = target.dom.live_xml()?;
        report.live_possible = live::hotplug_possible(hv.lib_version()?, &live_xml);
        report.restart_needed =
            !options.live && domxml::apply_plan(&live_xml, &plan).map_or(true, |e| e.changed);
    }
    if options.dry_run {
        report.xml_diff = domxml::unified_diff(&before, &edit.xml, "domain.xml");
        return Ok(report);
    }
    if !report.changed {
        return Ok(report);
    }

    // 2. Change, undoing everything if a step fails.
    let mut undo = Undo::new(&target.dom, &before);
    let applied = apply_setup(&target, &mut undo, &file_ops, &edit, &before, &live);
    match applied {
        Ok(after) => {
            undo.commit();
            report.controllers = after.controllers;
            report.xml_diff = domxml::unified_diff(&before, &after.xml, "domain.xml");
            Ok(report)
        }
        Err(Failed { step, error }) => Err(undo.roll_back(hv, step, *error)),
    }
}

/// A step of a change that failed, and why; small, so that results carrying it stay small.
struct Failed {
    step: &'static str,
    error: Box<SetupError>,
}

/// `map_err` adapter: marks an error as the failure of `step`.
fn failed<E: Into<SetupError>>(step: &'static str) -> impl FnOnce(E) -> Failed {
    move |err| Failed {
        step,
        error: Box::new(err.into()),
    }
}

/// What setup learnt after `define`.
struct Applied {
    xml: String,
    controllers: Vec<u32>,
}

fn apply_setup(
    target: &Target<'_>,
    undo: &mut Undo<'_>,
    file_ops: &[FileOp],
    edit: &domxml::Edit,
    before: &str,
    live: &LivePlan,
) -> Result<Applied, Failed> {
    for op in file_ops {
        undo.journal
            .apply(op)
            .map_err(failed("creating the host files"))?;
    }
    let mut controllers = Vec::new();
    let mut xml = before.to_owned();
    if edit.changed {
        let step = "defining the new domain XML";
        target.hv.define(&edit.xml).map_err(failed(step))?;
        undo.defined = true;
        xml = target.dom.inactive_xml().map_err(failed(step))?;
        controllers = added_controllers(before, &xml).map_err(failed(step))?;
        if !controllers.is_empty() {
            let step = "recording the controllers libvirt added";
            let mut state = read_state(&target.folder).map_err(failed(step))?;
            state.added_controllers.extend(&controllers);
            state.added_controllers.sort_unstable();
            state.added_controllers.dedup();
            write_state(&target.folder, &state, &mut undo.journal).map_err(failed(step))?;
        }
    }
    for device in &live.detach {
        let step = "hot-unplugging channels from the running domain";
        target.dom.detach_live(&device.xml).map_err(failed(step))?;
        undo.detached.push(device.xml.clone());
    }
    for device in &live.attach {
        let step = "hot-plugging channels into the running domain";
        if device.name == domxml::CONTROL_NAME {
            // libvirt makes the control socket when it plugs the channel in; a rollback
            // must take that away too.
            undo.journal.expect_created(&target.folder.socket());
        }
        target
            .dom
            .attach_live(&device.xml)
            .map_err(explain_hotplug_refusal)
            .map_err(failed(step))?;
        undo.attached.push(device.xml.clone());
    }
    Ok(Applied { xml, controllers })
}

/// libvirt refuses to hot-plug some chardev types (libvirt 9.0: `pipe`) with a generic
/// error; say what that means for the user.
fn explain_hotplug_refusal(err: LibvirtError) -> SetupError {
    match &err {
        LibvirtError::Other { message, .. } if message.contains("Hotplug unsupported") => {
            SetupError::HotplugUnsupported {
                message: message.clone(),
            }
        }
        _ => err.into(),
    }
}

/// The virtio-serial controllers in `after` that `before` did not have.
fn added_controllers(before: &str, after: &str) -> Result<Vec<u32>, DomXmlError> {
    let old = domxml::virtio_serial_controllers(before)?;
    let mut new = domxml::virtio_serial_controllers(after)?;
    new.retain(|index| !old.contains(index));
    Ok(new)
}

/// A looked-up domain and its folder.
struct Target<'a> {
    hv: &'a Hypervisor,
    dom: Dom,
    name: String,
    folder: DomainFolder,
}

impl<'a> Target<'a> {
    fn look_up(hv: &'a Hypervisor, root: &Path, spec: &str) -> Result<Target<'a>, SetupError> {
        let dom = hv.lookup(spec)?;
        let name = dom.name();
        if !dom.is_persistent()? {
            return Err(SetupError::Transient { domain: name });
        }
        let folder = DomainFolder::new(root, &name)?;
        Ok(Target {
            hv,
            dom,
            name,
            folder,
        })
    }

    fn folder_str(&self) -> Result<&str, SetupError> {
        let path = self.folder.path();
        path.to_str()
            .ok_or_else(|| SetupError::NonUtf8Dir(path.to_owned()))
    }

    fn report(&self, command: &'static str, dry_run: bool, state: &'static str) -> ChangeReport {
        ChangeReport {
            command,
            domain: self.name.clone(),
            uuid: self.dom.uuid(),
            folder: self.folder.path().display().to_string(),
            dry_run,
            changed: false,
            vcpus: None,
            group: None,
            state,
            channels: ChannelChanges::default(),
            controllers: Vec::new(),
            files: FileChanges::default(),
            live: LiveChanges::default(),
            restart_needed: false,
            live_possible: false,
            xml_diff: String::new(),
        }
    }
}

/// The folder's group and QEMU's uid:gid.
fn owners(hv: &Hypervisor, group: Option<&str>) -> Result<Owners, SetupError> {
    let qemu = hv.qemu_dac_label()?;
    let group = match group {
        Some(name) => resolve_group(name)?,
        None => qemu
            .map(|(_, gid)| gid)
            .ok_or_else(|| SetupError::NoQemuGroup {
                uri: hv.uri().to_owned(),
            })?,
    };
    Ok(Owners { group, qemu })
}

/// A group given by name or number.
fn resolve_group(name: &str) -> Result<u32, SetupError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        _ => Err(SetupError::UnknownGroup(name.to_owned())),
    }
}

fn files_report(ops: &[FileOp]) -> FileChanges {
    let show = |op: &FileOp| op.path().display().to_string();
    FileChanges {
        created: ops.iter().filter(|op| op.creates()).map(show).collect(),
        removed: ops.iter().filter(|op| !op.creates()).map(show).collect(),
    }
}

/// One channel to hot-plug or unplug: its target name and device XML.
#[derive(Debug, Clone)]
struct LiveDevice {
    name: String,
    xml: String,
}

#[derive(Debug, Default)]
struct LivePlan {
    attach: Vec<LiveDevice>,
    detach: Vec<LiveDevice>,
}

impl LivePlan {
    fn is_empty(&self) -> bool {
        self.attach.is_empty() && self.detach.is_empty()
    }
}

/// What to hot-plug so that the running domain has the channels of `plan`.
fn plan_live(target: &Target<'_>, plan: &ChannelPlan) -> Result<LivePlan, SetupError> {
    let live_xml = target.dom.live_xml()?;
    let edit = domxml::apply_plan(&live_xml, plan)?;
    if !edit.added.is_empty() && domxml::virtio_serial_controllers(&live_xml)?.is_empty() {
        return Err(SetupError::NoLiveController {
            domain: target.name.clone(),
        });
    }
    // Attach the channels as rendered from the templates (libvirt picks free ports); detach
    // them as the running domain describes them.
    let devices = |xml: &str, names: &[String]| -> Result<Vec<LiveDevice>, SetupError> {
        let ours = domxml::our_channels(xml)?;
        Ok(ours
            .into_iter()
            .filter(|ch| names.contains(&ch.target_name))
            .map(|ch| LiveDevice {
                name: ch.target_name,
                xml: xml[ch.span].to_owned(),
            })
            .collect())
    };
    Ok(LivePlan {
        attach: devices(&edit.xml, &edit.added)?,
        detach: devices(&live_xml, &edit.removed)?,
    })
}

/// The state file: what teardown must undo that the XML itself does not show.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SetupState {
    /// Format version of this file; 1.
    format: u32,
    /// virtio-serial controllers libvirt added when setup defined our channels.
    added_controllers: Vec<u32>,
}

fn read_state(folder: &DomainFolder) -> Result<SetupState, SetupError> {
    let path = folder.state_file();
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| SetupError::BadState {
            path: path.clone(),
            source,
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(SetupState {
            format: 1,
            added_controllers: Vec::new(),
        }),
        Err(err) => Err(FileError::io("read", &path, err).into()),
    }
}

fn write_state(
    folder: &DomainFolder,
    state: &SetupState,
    journal: &mut Journal,
) -> Result<(), SetupError> {
    let mut json = serde_json::to_vec_pretty(state).expect("the state serialises");
    json.push(b'\n');
    journal.write_file(&folder.state_file(), &json, channels::STATE_MODE)?;
    Ok(())
}

/// Everything done so far that a failure must undo.
struct Undo<'a> {
    dom: &'a Dom,
    old_xml: &'a str,
    journal: Journal,
    defined: bool,
    attached: Vec<String>,
    detached: Vec<String>,
}

impl<'a> Undo<'a> {
    fn new(dom: &'a Dom, old_xml: &'a str) -> Undo<'a> {
        Undo {
            dom,
            old_xml,
            journal: Journal::new(),
            defined: false,
            attached: Vec::new(),
            detached: Vec::new(),
        }
    }

    fn commit(self) {
        self.journal.commit();
    }

    /// Undoes everything, newest first, and wraps `err` to say so.
    fn roll_back(mut self, hv: &Hypervisor, step: &'static str, err: SetupError) -> SetupError {
        let mut failures = Vec::new();
        for xml in self.attached.iter().rev() {
            if let Err(e) = self.dom.detach_live(xml) {
                failures.push(e.to_string());
            }
        }
        for xml in self.detached.iter().rev() {
            if let Err(e) = self.dom.attach_live(xml) {
                failures.push(e.to_string());
            }
        }
        if self.defined {
            if let Err(e) = hv.define(self.old_xml) {
                failures.push(format!("{e}; the old XML is:\n{}", self.old_xml));
            }
        }
        if let Err(RollbackError(files)) = self.journal.rollback() {
            failures.extend(files);
        }
        if failures.is_empty() {
            SetupError::RolledBack {
                step,
                source: Box::new(err),
            }
        } else {
            SetupError::RollbackFailed {
                step,
                rollback: failures.join("; "),
                source: Box::new(err),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_uris_are_accepted_and_remote_ones_refused() {
        for uri in [
            "qemu:///system",
            "qemu:///system?socket=/run/x",
            "qemu+unix:///system",
            "test:///default",
            "qemu://localhost/system",
        ] {
            assert!(refuse_remote(uri).is_ok(), "{uri}");
        }
        for uri in [
            "qemu+ssh://root@host/system",
            "qemu+tcp://10.0.0.1:16509/system",
        ] {
            assert!(
                matches!(refuse_remote(uri), Err(SetupError::RemoteUri { .. })),
                "{uri}"
            );
        }
    }

    #[test]
    fn groups_resolve_by_name_or_number() {
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert_eq!(resolve_group("4242").unwrap(), 4242);
        assert!(matches!(
            resolve_group("no-such-group-tvctl"),
            Err(SetupError::UnknownGroup(_))
        ));
    }

    #[test]
    fn a_rolled_back_error_keeps_the_exit_code_of_its_cause() {
        let err = SetupError::RolledBack {
            step: "creating the host files",
            source: Box::new(SetupError::UnknownGroup("x".into())),
        };
        assert_eq!(err.exit_code(), ExitCode::Usage);
    }

    #[test]
    fn controllers_libvirt_added_are_found() {
        let before =
            "<domain><devices><controller type='virtio-serial' index='0'/></devices></domain>";
        let after = "<domain><devices><controller type='virtio-serial' index='0'/>\
                     <controller type='virtio-serial' index='1'/></devices></domain>";
        assert_eq!(added_controllers(before, after).unwrap(), vec![1]);
    }
}
