//! What setup, teardown and status tell their caller: plain structs that the CLI prints for
//! people and serialises for `--json`. The JSON schema is documented field by field in
//! docs/json.md; golden files in tests/data/setup/ pin it. Field names are part of tvctl's
//! interface: add fields, never rename or remove them.

use serde::Serialize;

use crate::libvirt::DomState;

/// A group, by name and number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupReport {
    pub name: String,
    pub gid: u32,
}

impl GroupReport {
    pub fn of(gid: u32) -> GroupReport {
        GroupReport {
            name: crate::channels::group_name(gid),
            gid,
        }
    }
}

/// Channels added to or removed from the domain's persistent configuration, by target name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChannelChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// Host paths created or removed, in the order it happened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FileChanges {
    pub created: Vec<String>,
    pub removed: Vec<String>,
}

/// Channels hot-plugged into or out of the running domain, by target name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LiveChanges {
    pub attached: Vec<String>,
    pub detached: Vec<String>,
}

/// The outcome of `tvctl setup` or `tvctl teardown`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangeReport {
    /// `"setup"` or `"teardown"`.
    pub command: &'static str,
    pub domain: String,
    pub uuid: String,
    /// The per-domain folder, `<dir>/<domain>`.
    pub folder: String,
    pub dry_run: bool,
    /// Whether anything changed (with `dry_run`: would change).
    pub changed: bool,
    /// The domain's maximum vCPU count (setup), or `null` (teardown).
    pub vcpus: Option<u32>,
    /// The group given to the folder and FIFOs (setup), or `null` (teardown).
    pub group: Option<GroupReport>,
    /// The domain's state when the command ran: see [`state_name`].
    pub state: &'static str,
    pub channels: ChannelChanges,
    /// Indices of virtio-serial controllers libvirt added for our channels (setup) or that
    /// teardown removed again.
    pub controllers: Vec<u32>,
    pub files: FileChanges,
    pub live: LiveChanges,
    /// The domain runs with other channels than its configuration now has: they take
    /// effect at its next boot.
    pub restart_needed: bool,
    /// `setup --live` can hot-plug the channels into this running domain: libvirt hot-plugs
    /// pipe chardevs and the domain has a virtio-serial controller (see `setup::live`);
    /// false when the domain is not running.
    pub live_possible: bool,
    /// Unified diff of the persistent domain XML, as libvirt returns it, before and after
    /// (with `dry_run`: against the XML tvctl would define). Empty when unchanged.
    pub xml_diff: String,
}

/// The outcome of `tvctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusReport {
    /// Always `"status"`.
    pub command: &'static str,
    pub domains: Vec<DomainStatus>,
}

/// One domain's set-up state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DomainStatus {
    pub domain: String,
    pub uuid: String,
    pub state: &'static str,
    pub folder: String,
    /// Any tvctl channel is in the persistent configuration.
    pub set_up: bool,
    /// Fully set up: nothing for setup to do and nothing wrong (`problems` is empty).
    pub ok: bool,
    /// Maximum vCPUs in the persistent configuration; `null` if it cannot be read.
    pub vcpus: Option<u32>,
    pub channels: ChannelStatus,
    /// Our channels in the running domain; `null` when it is not running.
    pub live_channels: Option<u32>,
    pub files: FilesStatus,
    /// The control socket exists (libvirt creates it while the domain runs).
    pub control_socket: bool,
    /// Whether a program in the running guest has the control port open (libvirt's channel
    /// `state`: `connected` or `disconnected`): the sign that tvctl-agent runs there. `null`
    /// when the domain is not running or libvirt does not say.
    pub agent_port: Option<String>,
    pub problems: Vec<Problem>,
    /// What `tvctl serve` does with this domain; `null` when no serve runs for this folder.
    pub serve: Option<ServeInfo>,
}

/// One domain as `tvctl serve` sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServeInfo {
    /// `connected`, `recording`, `waiting`, `lent`, or `not-served` (not running, or not set
    /// up under serve's folder).
    pub state: String,
    pub detail: String,
}

/// Our channels in the persistent configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChannelStatus {
    /// `agent-ctl-path` is there.
    pub control: bool,
    /// Number of `trace-path-cpuN` channels.
    pub cpus: u32,
    /// Target names setup would add.
    pub missing: Vec<String>,
    /// Target names setup would remove (vCPUs the domain no longer has).
    pub extra: Vec<String>,
}

/// The per-domain folder and its FIFOs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FilesStatus {
    /// The folder exists.
    pub folder: bool,
    /// The folder's group; `null` when there is no folder.
    pub group: Option<GroupReport>,
    /// FIFOs the domain needs: two per vCPU.
    pub fifos_expected: u32,
    /// FIFOs present with the right type, mode and owner.
    pub fifos_ok: u32,
}

/// Something `tvctl status` found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    pub message: String,
}

/// The class of a problem; it decides the exit code of `tvctl status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The domain XML conflicts with our channels (exit code 6).
    XmlConflict,
    /// A host file is in the way or has the wrong modes (exit code 7).
    HostFile,
    /// Something setup would add or remove is missing or left over (exit code 8).
    NotSetUp,
}

/// The stable JSON name of a domain state.
pub fn state_name(state: DomState) -> &'static str {
    match state {
        DomState::Running => "running",
        DomState::Paused => "paused",
        DomState::ShuttingDown => "shutting_down",
        DomState::ShutOff => "shut_off",
        DomState::Crashed => "crashed",
        DomState::Other => "other",
    }
}
