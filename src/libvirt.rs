//! The one module that talks to libvirt (through the `virt` crate); everything else gets plain
//! strings and numbers from here.
//!
//! Errors are mapped to [`LibvirtError`] variants that callers can tell apart (daemon down,
//! no such domain, permission) and whose messages say how to fix the problem.

pub mod events;

use std::fmt;

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::error::ErrorNumber;
use virt::sys;

/// The URI used when neither `--connect` nor `LIBVIRT_DEFAULT_URI` names one.
pub const DEFAULT_URI: &str = "qemu:///system";

/// What went wrong talking to libvirt.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("libvirtd is not reachable at {uri}: {message}. Start it with `virtlogd -d && libvirtd -d` (or `systemctl start libvirtd`), or pass another URI with --connect")]
    Unreachable { uri: String, message: String },
    #[error("permission denied by libvirt at {uri}: {message}. Run tvctl as root or as a member of the libvirt group")]
    PermissionDenied { uri: String, message: String },
    #[error("domain '{0}' not found: check the name with `virsh list --all`")]
    NoDomain(String),
    #[error("libvirt rejected the domain XML: {0}")]
    BadXml(String),
    #[error("libvirt: {op}: {message}")]
    Other { op: &'static str, message: String },
}

impl LibvirtError {
    fn other(op: &'static str, e: virt::error::Error) -> LibvirtError {
        match e.code() {
            virt::error::ErrorNumberEnum::Known(ErrorNumber::XmlError)
            | virt::error::ErrorNumberEnum::Known(ErrorNumber::XmlDetail)
            | virt::error::ErrorNumberEnum::Known(ErrorNumber::ConfigUnsupported) => {
                LibvirtError::BadXml(e.message().to_string())
            }
            _ => LibvirtError::Other {
                op,
                message: e.message().to_string(),
            },
        }
    }
}

/// Why a qemu-ga command failed, as libvirt says.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QgaError {
    /// The domain has no `org.qemu.guest_agent.0` channel.
    #[error("{0}")]
    NoChannel(String),
    /// The channel is there but nothing answers on it (qemu-ga not installed or not running).
    #[error("{0}")]
    NotAnswering(String),
    #[error("{0}")]
    Other(String),
}

/// The state of a domain, as tvctl reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomState {
    Running,
    Paused,
    ShuttingDown,
    ShutOff,
    Crashed,
    Other,
}

impl DomState {
    pub fn is_active(self) -> bool {
        !matches!(self, DomState::ShutOff | DomState::Crashed)
    }
}

impl fmt::Display for DomState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DomState::Running => "running",
            DomState::Paused => "paused",
            DomState::ShuttingDown => "shutting down",
            DomState::ShutOff => "shut off",
            DomState::Crashed => "crashed",
            DomState::Other => "other",
        })
    }
}

/// A connection to libvirt.
pub struct Hypervisor {
    conn: Connect,
    uri: String,
}

impl fmt::Debug for Hypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hypervisor")
            .field("uri", &self.uri)
            .finish()
    }
}

/// The URI tvctl uses: the flag, else `LIBVIRT_DEFAULT_URI`, else [`DEFAULT_URI`].
pub fn effective_uri(flag: Option<&str>) -> String {
    flag.map(str::to_string)
        .or_else(|| {
            std::env::var("LIBVIRT_DEFAULT_URI")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_URI.to_string())
}

impl Hypervisor {
    /// Opens a read-write connection to `uri`.
    pub fn connect(uri: &str) -> Result<Hypervisor, LibvirtError> {
        // libvirt's default handler prints every error to stderr; ours carry them instead.
        virt::error::clear_error_callback();
        match Connect::open(Some(uri)) {
            Ok(conn) => Ok(Hypervisor {
                conn,
                uri: uri.to_string(),
            }),
            Err(e) => {
                let message = e.message().to_string();
                let denied = matches!(
                    e.code(),
                    virt::error::ErrorNumberEnum::Known(
                        ErrorNumber::AuthFailed
                            | ErrorNumber::OperationDenied
                            | ErrorNumber::AuthCancelled
                    )
                ) || message.contains("Permission denied")
                    // Without root, polkit refuses in many ways (no D-Bus, no agent); only
                    // a failed socket connection means that the daemon is down.
                    || (!nix::unistd::geteuid().is_root()
                        && !message.contains("Failed to connect socket"));
                if denied {
                    Err(LibvirtError::PermissionDenied {
                        uri: uri.to_string(),
                        message,
                    })
                } else {
                    Err(LibvirtError::Unreachable {
                        uri: uri.to_string(),
                        message,
                    })
                }
            }
        }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Finds a domain by id, UUID or name, as virsh does.
    pub fn lookup(&self, spec: &str) -> Result<Dom, LibvirtError> {
        if let Ok(id) = spec.parse::<u32>() {
            if let Ok(d) = self.conn.lookup_domain_by_id(id) {
                return Ok(Dom { dom: d });
            }
        }
        if spec.len() == 36 && spec.bytes().filter(|&b| b == b'-').count() == 4 {
            if let Ok(d) = self.conn.lookup_domain_by_uuid_string(spec) {
                return Ok(Dom { dom: d });
            }
        }
        match self.conn.lookup_domain_by_name(spec) {
            Ok(d) => Ok(Dom { dom: d }),
            Err(e)
                if matches!(
                    e.code(),
                    virt::error::ErrorNumberEnum::Known(ErrorNumber::NoDomain)
                ) =>
            {
                Err(LibvirtError::NoDomain(spec.to_string()))
            }
            Err(e) => Err(LibvirtError::other("look up domain", e)),
        }
    }

    /// Defines (or redefines) a persistent domain from XML.
    pub fn define(&self, xml: &str) -> Result<Dom, LibvirtError> {
        self.conn
            .define_domain_xml(xml)
            .map(|dom| Dom { dom })
            .map_err(|e| LibvirtError::other("define domain", e))
    }

    /// The capabilities XML.
    pub fn capabilities(&self) -> Result<String, LibvirtError> {
        self.conn
            .capabilities()
            .map_err(|e| LibvirtError::other("read capabilities", e))
    }

    /// The version of the libvirt daemon serving this connection, as major * 1,000,000 +
    /// minor * 1,000 + micro (libvirt's own encoding).
    pub fn lib_version(&self) -> Result<u32, LibvirtError> {
        self.conn
            .lib_version()
            .map_err(|e| LibvirtError::other("read the libvirt version", e))
    }

    /// QEMU's uid and gid from the DAC security model's base label, if libvirt has one.
    pub fn qemu_dac_label(&self) -> Result<Option<(u32, u32)>, LibvirtError> {
        Ok(parse_dac_baselabel(&self.capabilities()?))
    }

    /// Names of all persistent and running domains.
    pub fn domain_names(&self) -> Result<Vec<String>, LibvirtError> {
        let doms = self
            .conn
            .list_all_domains(0)
            .map_err(|e| LibvirtError::other("list domains", e))?;
        let mut names: Vec<String> = doms.iter().filter_map(|d| d.name().ok()).collect();
        names.sort();
        Ok(names)
    }
}

/// Reads `+UID:+GID` from the `<baselabel>` of the `dac` `<secmodel>` in capabilities XML.
pub fn parse_dac_baselabel(caps: &str) -> Option<(u32, u32)> {
    let mut rest = caps;
    while let Some(start) = rest.find("<secmodel>") {
        let block_end = rest[start..].find("</secmodel>")? + start;
        let block = &rest[start..block_end];
        if block.contains("<model>dac</model>") {
            let label_start = block.find("<baselabel")?;
            let text_start = block[label_start..].find('>')? + label_start + 1;
            let text_end = block[text_start..].find('<')? + text_start;
            let label = block[text_start..text_end].trim();
            let (u, g) = label.split_once(':')?;
            let uid = u.trim_start_matches('+').parse().ok()?;
            let gid = g.trim_start_matches('+').parse().ok()?;
            return Some((uid, gid));
        }
        rest = &rest[block_end..];
    }
    None
}

/// A libvirt domain.
pub struct Dom {
    dom: Domain,
}

impl fmt::Debug for Dom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dom").field("name", &self.name()).finish()
    }
}

impl Dom {
    pub fn name(&self) -> String {
        self.dom.name().unwrap_or_default()
    }

    pub fn uuid(&self) -> String {
        self.dom.uuid_string().unwrap_or_default()
    }

    /// The persistent configuration (what the next boot uses).
    pub fn inactive_xml(&self) -> Result<String, LibvirtError> {
        self.dom
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(|e| LibvirtError::other("read domain XML", e))
    }

    /// The running configuration (what QEMU has now).
    pub fn live_xml(&self) -> Result<String, LibvirtError> {
        self.dom
            .xml_desc(0)
            .map_err(|e| LibvirtError::other("read domain XML", e))
    }

    pub fn state(&self) -> Result<DomState, LibvirtError> {
        let (state, _) = self
            .dom
            .state()
            .map_err(|e| LibvirtError::other("read domain state", e))?;
        Ok(match state {
            virt::enumutil::Enum::Known(DomainState::Running)
            | virt::enumutil::Enum::Known(DomainState::Blocked) => DomState::Running,
            virt::enumutil::Enum::Known(DomainState::Paused)
            | virt::enumutil::Enum::Known(DomainState::PMSuspended) => DomState::Paused,
            virt::enumutil::Enum::Known(DomainState::Shutdown) => DomState::ShuttingDown,
            virt::enumutil::Enum::Known(DomainState::Shutoff) => DomState::ShutOff,
            virt::enumutil::Enum::Known(DomainState::Crashed) => DomState::Crashed,
            _ => DomState::Other,
        })
    }

    pub fn is_active(&self) -> Result<bool, LibvirtError> {
        self.dom
            .is_active()
            .map_err(|e| LibvirtError::other("read domain state", e))
    }

    /// Whether the domain has a persistent configuration (a transient one exists only while
    /// it runs, and `define` would make it persistent).
    pub fn is_persistent(&self) -> Result<bool, LibvirtError> {
        self.dom
            .is_persistent()
            .map_err(|e| LibvirtError::other("read domain state", e))
    }

    pub fn start(&self) -> Result<(), LibvirtError> {
        self.dom
            .create()
            .map_err(|e| LibvirtError::other("start domain", e))
    }

    pub fn destroy(&self) -> Result<(), LibvirtError> {
        self.dom
            .destroy()
            .map_err(|e| LibvirtError::other("destroy domain", e))
    }

    pub fn undefine(&self) -> Result<(), LibvirtError> {
        self.dom
            .undefine()
            .map_err(|e| LibvirtError::other("undefine domain", e))
    }

    /// PID of the domain's QEMU process, from libvirt's pid file (system URIs only).
    pub fn qemu_pid(&self) -> Option<u32> {
        let path = format!("/run/libvirt/qemu/{}.pid", self.name());
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Sends one command to the QEMU guest agent (qemu-ga) in the guest and returns its JSON
    /// reply, waiting at most `timeout_s` seconds. The error keeps libvirt's code, which
    /// tells "no qemu-ga channel" from "qemu-ga not answering" ([`QgaError`]).
    pub fn qemu_agent_command(&self, cmd: &str, timeout_s: i32) -> Result<String, QgaError> {
        self.dom.qemu_agent_command(cmd, timeout_s, 0).map_err(|e| {
            let message = e.message().to_string();
            match e.code() {
                virt::error::ErrorNumberEnum::Known(ErrorNumber::AgentUnresponsive) => {
                    QgaError::NotAnswering(message)
                }
                virt::error::ErrorNumberEnum::Known(ErrorNumber::ArgumentUnsupported)
                | virt::error::ErrorNumberEnum::Known(ErrorNumber::OperationInvalid)
                    if message.contains("not configured") =>
                {
                    QgaError::NoChannel(message)
                }
                _ => QgaError::Other(message),
            }
        })
    }

    /// Hot-plugs a device into the running domain only.
    pub fn attach_live(&self, device_xml: &str) -> Result<(), LibvirtError> {
        self.dom
            .attach_device_flags(device_xml, sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(|e| LibvirtError::other("hot-plug device", e))
    }

    /// Hot-unplugs a device from the running domain only.
    pub fn detach_live(&self, device_xml: &str) -> Result<(), LibvirtError> {
        self.dom
            .detach_device_flags(device_xml, sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(|e| LibvirtError::other("hot-unplug device", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dac_baselabel_is_read_from_the_dac_secmodel() {
        let caps = "<capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel>\
            <secmodel><model>dac</model><doi>0</doi><baselabel type='kvm'>+64055:+64055</baselabel>\
            <baselabel type='qemu'>+64055:+64055</baselabel></secmodel></host></capabilities>";
        assert_eq!(parse_dac_baselabel(caps), Some((64055, 64055)));
    }

    #[test]
    fn no_dac_secmodel_means_no_label() {
        assert_eq!(
            parse_dac_baselabel("<secmodel><model>selinux</model></secmodel>"),
            None
        );
    }

    #[test]
    fn uri_prefers_flag_then_environment() {
        assert_eq!(effective_uri(Some("test:///default")), "test:///default");
    }
}
