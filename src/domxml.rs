//! Pure edits of a libvirt domain's XML: find, add and remove tvctl's virtio-serial channels.
//!
//! `tvctl setup` puts one `unix` control channel (`agent-ctl-path`, bind mode, so QEMU creates
//! the socket and the domain boots whether or not tvctl runs) and one `pipe` channel per
//! possible vCPU (`trace-path-cpuN`, N in `0..max vCPUs`) into `<devices>`; `tvctl teardown`
//! takes them out again. The XML is edited as text: quick-xml only finds byte spans, and
//! everything but the channels we add or remove stays byte-for-byte as it was (comments,
//! other channels such as qemu-ga's, foreign namespaces like `<qemu:commandline>`, quoting,
//! whitespace). So the diff shown before `define` holds only our lines, and teardown after
//! setup gives back the input exactly. No libvirt and no files here: callers pass strings.
//!
//! # Layout
//! - New channels go right before `</devices>`, one per line, indented like the existing
//!   children of `<devices>`, with the document's own line break (`\n` or `\r\n`). If
//!   `</devices>` shares its line with other markup, each channel is put in front of it as
//!   line break + indentation + channel instead.
//! - A removed channel takes its line with it (or, in the second case above, the line break
//!   and indentation in front of it), which undoes exactly what setup inserted.
//! - No `<devices>`: setup creates one as the last child of `<domain>`. Teardown removes a
//!   `<devices>` it emptied if it is the last child of `<domain>`, both of its tags start their
//!   lines and only whitespace is left inside: that is the shape setup creates. Nothing is
//!   recorded in the XML; libvirt treats an empty `<devices>` like a missing one anyway.
//! - `<devices/>`: setup expands it to `<devices>` + channels + `</devices>`, with the end tag
//!   glued to the last channel; teardown collapses an emptied `<devices></devices>` back to
//!   the self-closing form. Setup then teardown is therefore the identity for every input
//!   except two hand-written forms libvirt never prints: `<devices></devices>` comes back as
//!   `<devices/>`, and a whitespace-only `<devices>` that is the last child of `<domain>`
//!   goes away. Both mean the same to libvirt as what they replace.
//!
//! We never add a `<controller type='virtio-serial'>`: libvirt adds one (and more when a
//! controller's ports run out) whenever a virtio channel needs a port, and it fills in each
//! channel's `<address type='virtio-serial' .../>` at define time. [`remove_ours`] leaves
//! those controllers alone, as other devices (qemu-ga's channel) may use them; `tvctl
//! teardown` removes only the ones that setup's define brought in, with
//! [`remove_virtio_serial_controllers`].

mod edit;
mod layout;
mod scan;

use std::collections::BTreeSet;
use std::ops::Range;

use edit::{insert_channels, remove_channels, tidy_emptied_devices};
use scan::{RawChannel, Scan};

/// Target name of the control channel (a unix socket on the host).
pub const CONTROL_NAME: &str = "agent-ctl-path";
/// Target name prefix of the per-vCPU pipe channels; the vCPU number follows.
pub const CPU_NAME_PREFIX: &str = "trace-path-cpu";

/// Target name of the pipe channel that carries vCPU `cpu`'s trace data.
pub fn cpu_channel_name(cpu: u32) -> String {
    format!("{CPU_NAME_PREFIX}{cpu}")
}

/// Which of our channels a `<channel>` is, decided by its target name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChannelKind {
    Control,
    Cpu(u32),
}

impl ChannelKind {
    /// The kind named by a channel target name, if the name is one of ours.
    ///
    /// Only canonical numbers count: `trace-path-cpu01` is not ours, as the guest agent
    /// would never open it.
    pub fn from_target_name(name: &str) -> Option<Self> {
        if name == CONTROL_NAME {
            return Some(Self::Control);
        }
        let digits = name.strip_prefix(CPU_NAME_PREFIX)?;
        let canonical = digits == "0" || !digits.starts_with('0');
        if !canonical || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok().map(Self::Cpu)
    }

    /// The channel's `<target name=...>`.
    pub fn target_name(self) -> String {
        match self {
            Self::Control => CONTROL_NAME.to_owned(),
            Self::Cpu(cpu) => cpu_channel_name(cpu),
        }
    }

    /// The channel's `<source path=...>` for the per-domain folder `dir`.
    ///
    /// The control channel is a socket QEMU creates (`DIR/agent-ctl-path.sock`); a vCPU
    /// channel names the FIFO pair `DIR/trace-path-cpuN.in` / `.out` by its common stem.
    pub fn source_path(self, dir: &str) -> String {
        let dir = dir.trim_end_matches('/');
        match self {
            Self::Control => format!("{dir}/{CONTROL_NAME}.sock"),
            Self::Cpu(cpu) => format!("{dir}/{}", cpu_channel_name(cpu)),
        }
    }

    /// The `<channel type=...>` this kind must have.
    pub(crate) fn channel_type(self) -> &'static str {
        match self {
            Self::Control => "unix",
            Self::Cpu(_) => "pipe",
        }
    }
}

/// Why a domain XML could not be read or edited. Each message says what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomXmlError {
    #[error("the domain XML is not well-formed at line {line}: {message}; pass the XML that `virsh dumpxml --inactive DOMAIN` prints")]
    Malformed { line: usize, message: String },
    #[error("the XML's root element is {}, not <domain>: pass a libvirt domain definition (`virsh dumpxml --inactive DOMAIN`)", .found.as_deref().map_or("missing".to_owned(), |name| format!("<{name}>")))]
    NotADomain { found: Option<String> },
    #[error("the domain's <vcpu> {reason}: correct it with `virsh edit DOMAIN`")]
    BadVcpu { reason: String },
    #[error("channel '{name}' has {}, but tvctl expects '{expected}': if an earlier setup used another folder, run teardown with that folder; otherwise remove the channel with `virsh edit DOMAIN`", .found.as_deref().map_or("no source path".to_owned(), |path| format!("source path '{path}'")))]
    ConflictingPath {
        name: String,
        found: Option<String>,
        expected: String,
    },
    #[error("a channel with {found} uses the target name '{name}', which tvctl reserves for a {expected} channel with a virtio target: rename or remove that channel with `virsh edit DOMAIN`")]
    ForeignTarget {
        name: String,
        found: String,
        expected: String,
    },
    #[error("the control channel '{CONTROL_NAME}' has {}, but tvctl needs mode='bind' so that QEMU creates the socket and the domain boots without tvctl: run teardown and setup again", .found.as_deref().map_or("no source mode".to_owned(), |mode| format!("source mode='{mode}'")))]
    ControlNotBind { found: Option<String> },
    #[error("{count} channels use the target name '{name}', but QEMU needs unique port names: remove all but one with `virsh edit DOMAIN`")]
    DuplicateChannel { name: String, count: usize },
    #[error("channel folder {dir:?} {reason}: pass an absolute path without control characters")]
    InvalidDir { dir: String, reason: &'static str },
    #[error("the channel plan asks for 0 vCPUs: pass the domain's maximum vCPU count, which is at least 1")]
    ZeroVcpus,
}

/// A domain's vCPU counts, from `<vcpu current='C'>MAX</vcpu>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuCount {
    /// vCPUs the domain may have (hot-plug included); we plan one channel for each.
    pub max: u32,
    /// vCPUs online at boot; equals `max` when `current` is absent.
    pub current: u32,
}

/// The domain's vCPU counts. A missing `<vcpu>` means one vCPU, as in libvirt.
pub fn vcpus(xml: &str) -> Result<VcpuCount, DomXmlError> {
    let scan = scan::scan(xml)?;
    let Some(vcpu) = scan.vcpu else {
        return Ok(VcpuCount { max: 1, current: 1 });
    };
    let max = parse_count(&vcpu.text).ok_or_else(|| DomXmlError::BadVcpu {
        reason: format!("holds {:?}, not a vCPU count of at least 1", vcpu.text),
    })?;
    let current = match vcpu.current {
        None => max,
        Some(current) => parse_count(&current).ok_or_else(|| DomXmlError::BadVcpu {
            reason: format!("has current={current:?}, not a vCPU count of at least 1"),
        })?,
    };
    if current > max {
        return Err(DomXmlError::BadVcpu {
            reason: format!("has current='{current}' above its maximum {max}"),
        });
    }
    Ok(VcpuCount { max, current })
}

fn parse_count(text: &str) -> Option<u32> {
    text.trim().parse().ok().filter(|&count| count > 0)
}

/// A `<channel>` in `<devices>` whose target name is one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OurChannel {
    pub kind: ChannelKind,
    pub target_name: String,
    /// `<channel type=...>`: `unix` for control, `pipe` for a vCPU when all is well.
    pub channel_type: Option<String>,
    /// `<target type=...>`: `virtio` when all is well.
    pub target_type: Option<String>,
    /// `<source path=...>`, unescaped.
    pub path: Option<String>,
    /// `<source mode=...>`: `bind` for control when all is well.
    pub source_mode: Option<String>,
    /// `<target state=...>` in a running domain's XML: `connected` when a guest program has
    /// the port open.
    pub target_state: Option<String>,
    /// Byte range of the whole `<channel>` element in the XML it was read from.
    pub span: Range<usize>,
}

/// Our channels in `<devices>`, in document order, whatever their type or path.
pub fn our_channels(xml: &str) -> Result<Vec<OurChannel>, DomXmlError> {
    Ok(classify(&scan::scan(xml)?))
}

fn classify(scan: &Scan) -> Vec<OurChannel> {
    let channels = scan.devices.iter().flat_map(|devices| &devices.channels);
    channels.filter_map(our_channel).collect()
}

fn our_channel(raw: &RawChannel) -> Option<OurChannel> {
    let target_name = raw.target_name.as_deref()?;
    Some(OurChannel {
        kind: ChannelKind::from_target_name(target_name)?,
        target_name: target_name.to_owned(),
        channel_type: raw.channel_type.clone(),
        target_type: raw.target_type.clone(),
        path: raw.source_path.clone(),
        source_mode: raw.source_mode.clone(),
        target_state: raw.target_state.clone(),
        span: raw.span.clone(),
    })
}

/// The channels a domain should have: control plus one per vCPU in `0..vcpus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPlan {
    /// The per-domain folder holding the socket and FIFOs, e.g. `/var/lib/tvctl/<domain>`.
    pub dir: String,
    /// The domain's maximum vCPU count ([`VcpuCount::max`]), so hot-plugged vCPUs are traced.
    pub vcpus: u32,
}

impl ChannelPlan {
    /// Every channel in the plan, control first.
    pub fn kinds(&self) -> impl Iterator<Item = ChannelKind> {
        std::iter::once(ChannelKind::Control).chain((0..self.vcpus).map(ChannelKind::Cpu))
    }

    fn wants(&self, kind: ChannelKind) -> bool {
        match kind {
            ChannelKind::Control => true,
            ChannelKind::Cpu(cpu) => cpu < self.vcpus,
        }
    }
}

/// The result of an edit: the new XML and the target names added and removed, in plan order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub xml: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// `false` when `xml` is the input unchanged.
    pub changed: bool,
}

/// Brings the domain's channels in line with `plan`.
///
/// Missing channels are added; vCPU channels numbered `plan.vcpus` or higher are removed;
/// correct ones stay untouched, so a second call returns the input with `changed == false`.
/// Any channel that uses one of our names without being exactly ours is an error, and
/// nothing is edited then.
pub fn apply_plan(xml: &str, plan: &ChannelPlan) -> Result<Edit, DomXmlError> {
    let dir = checked_dir(&plan.dir)?;
    if plan.vcpus == 0 {
        return Err(DomXmlError::ZeroVcpus);
    }
    let scan = scan::scan(xml)?;
    let ours = classify(&scan);
    check_ownership(&ours, dir, Strictness::Setup)?;

    let (keep, drop): (Vec<_>, Vec<_>) = ours.into_iter().partition(|ch| plan.wants(ch.kind));
    let mut text = xml.to_owned();
    let removed = remove_channels(&mut text, drop);
    let present: BTreeSet<ChannelKind> = keep.iter().map(|ch| ch.kind).collect();
    let missing: Vec<ChannelKind> = plan.kinds().filter(|k| !present.contains(k)).collect();
    if !missing.is_empty() {
        // Removals shift offsets; scan again rather than patch them up.
        let scan = if removed.is_empty() {
            scan
        } else {
            scan::scan(&text)?
        };
        text = insert_channels(&text, &scan, &missing, dir)?;
    }
    Ok(Edit {
        changed: text != xml,
        xml: text,
        added: missing.into_iter().map(ChannelKind::target_name).collect(),
        removed,
    })
}

/// Removes all our channels for folder `dir`, and a `<devices>` that only existed for them.
///
/// A channel with one of our names but another folder's path or the wrong type is an error
/// rather than left behind silently; a control channel in the wrong mode and duplicates are
/// removed like any other of ours.
pub fn remove_ours(xml: &str, dir: &str) -> Result<Edit, DomXmlError> {
    let dir = checked_dir(dir)?;
    let ours = classify(&scan::scan(xml)?);
    check_ownership(&ours, dir, Strictness::Teardown)?;
    let mut text = xml.to_owned();
    let removed = remove_channels(&mut text, ours);
    if !removed.is_empty() {
        text = tidy_emptied_devices(text)?;
    }
    Ok(Edit {
        changed: text != xml,
        xml: text,
        added: Vec::new(),
        removed,
    })
}

/// Indices of the `<controller type='virtio-serial'>` elements in `<devices>`, in document order.
///
/// libvirt adds such a controller at `define` time when a virtio channel needs a port and
/// there is none; comparing the indices before and after tells setup which ones its channels
/// brought in, so that teardown can take exactly those out again. A controller without a
/// numeric `index` (libvirt always writes one) is left out.
pub fn virtio_serial_controllers(xml: &str) -> Result<Vec<u32>, DomXmlError> {
    let scan = scan::scan(xml)?;
    let controllers = scan
        .devices
        .iter()
        .flat_map(|d| &d.virtio_serial_controllers);
    Ok(controllers
        .filter_map(|c| c.index.as_deref()?.trim().parse().ok())
        .collect())
}

/// Removes the virtio-serial controllers whose index is in `indices`, each with its lines,
/// and returns the new XML with the indices actually removed. Everything else stays byte for
/// byte; indices not present are ignored.
pub fn remove_virtio_serial_controllers(
    xml: &str,
    indices: &[u32],
) -> Result<(String, Vec<u32>), DomXmlError> {
    let scan = scan::scan(xml)?;
    let mut doomed: Vec<(u32, Range<usize>)> = scan
        .devices
        .iter()
        .flat_map(|d| &d.virtio_serial_controllers)
        .filter_map(|c| {
            let index = c.index.as_deref()?.trim().parse().ok()?;
            indices.contains(&index).then(|| (index, c.span.clone()))
        })
        .collect();
    // From the end backwards, so the spans still to cut keep their offsets.
    doomed.sort_by_key(|(_, span)| std::cmp::Reverse(span.start));
    let mut text = xml.to_owned();
    for (_, span) in &doomed {
        let range = layout::removal_range(&text, span.clone());
        text.replace_range(range, "");
    }
    let mut removed: Vec<u32> = doomed.into_iter().map(|(index, _)| index).collect();
    removed.sort_unstable();
    Ok((text, removed))
}

/// A unified diff of two XML texts, `a/LABEL` against `b/LABEL`; empty when they are equal.
pub fn unified_diff(old: &str, new: &str, label: &str) -> String {
    if old == new {
        return String::new();
    }
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(&format!("a/{label}"), &format!("b/{label}"))
        .to_string()
}

/// `dir` without trailing slashes, once it is known to be usable in a source path.
fn checked_dir(dir: &str) -> Result<&str, DomXmlError> {
    let reason = if dir.is_empty() {
        "is empty"
    } else if !dir.starts_with('/') {
        // QEMU would resolve a relative path against its own working directory.
        "is not absolute"
    } else if dir.chars().any(char::is_control) {
        // XML attribute normalisation would turn tabs and line breaks into spaces.
        "contains a control character"
    } else {
        return Ok(dir.trim_end_matches('/'));
    };
    Err(DomXmlError::InvalidDir {
        dir: dir.to_owned(),
        reason,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strictness {
    /// Everything must match what setup writes.
    Setup,
    /// Type and path must match; the source mode and duplicates do not matter for removal.
    Teardown,
}

fn check_ownership(
    ours: &[OurChannel],
    dir: &str,
    strictness: Strictness,
) -> Result<(), DomXmlError> {
    for channel in ours {
        let expected_type = channel.kind.channel_type();
        let foreign = if channel.channel_type.as_deref() != Some(expected_type) {
            Some(describe("type", channel.channel_type.as_deref()))
        } else if channel.target_type.as_deref() != Some("virtio") {
            Some(describe("target type", channel.target_type.as_deref()))
        } else {
            None
        };
        if let Some(found) = foreign {
            return Err(DomXmlError::ForeignTarget {
                name: channel.target_name.clone(),
                found,
                expected: format!("type='{expected_type}'"),
            });
        }
        let expected = channel.kind.source_path(dir);
        if channel.path.as_deref() != Some(expected.as_str()) {
            return Err(DomXmlError::ConflictingPath {
                name: channel.target_name.clone(),
                found: channel.path.clone(),
                expected,
            });
        }
        let bind = channel.source_mode.as_deref() == Some("bind");
        if strictness == Strictness::Setup && channel.kind == ChannelKind::Control && !bind {
            return Err(DomXmlError::ControlNotBind {
                found: channel.source_mode.clone(),
            });
        }
    }
    if strictness == Strictness::Setup {
        let mut kinds: Vec<ChannelKind> = ours.iter().map(|ch| ch.kind).collect();
        kinds.sort_unstable();
        if let Some(pair) = kinds.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(DomXmlError::DuplicateChannel {
                name: pair[0].target_name(),
                count: kinds.iter().filter(|&&kind| kind == pair[0]).count(),
            });
        }
    }
    Ok(())
}

fn describe(attribute: &str, value: Option<&str>) -> String {
    value.map_or(format!("no {attribute}"), |value| {
        format!("{attribute}='{value}'")
    })
}

/// Where the domain's serial console is logged, if to a file: the `<source path>` of a
/// `<serial type='file'>` (or `<console type='file'>`), else a `<log file>` of either. The
/// first place to look when a guest stops answering.
pub fn console_log_path(xml: &str) -> Option<String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut depth = 0usize;
    // The depth of the open <serial>/<console>, and whether its type is 'file'.
    let mut inside: Option<(usize, bool)> = None;
    let mut log_file = None;
    loop {
        let event = reader.read_event().ok()?;
        match &event {
            Event::Start(tag) | Event::Empty(tag) => {
                let opens = matches!(event, Event::Start(_));
                let attr = |key: &str| {
                    tag.try_get_attribute(key)
                        .ok()
                        .flatten()
                        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
                };
                match (inside, tag.name().as_ref()) {
                    (None, b"serial" | b"console") if opens => {
                        inside = Some((depth + 1, attr("type").as_deref() == Some("file")));
                    }
                    (Some((_, true)), b"source") => {
                        if let Some(path) = attr("path") {
                            return Some(path);
                        }
                    }
                    (Some(_), b"log") => log_file = log_file.or_else(|| attr("file")),
                    _ => {}
                }
                if opens {
                    depth += 1;
                }
            }
            Event::End(_) => {
                if inside.is_some_and(|(d, _)| d == depth) {
                    inside = None;
                }
                depth = depth.saturating_sub(1);
            }
            Event::Eof => return log_file,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn console_log_path_is_the_file_serial_source_else_a_log_file() {
        let file = "<domain><devices><serial type='pty'><log file='/l/pty.log'/></serial>\
                    <serial type='file'><source path='/var/log/c&amp;d.log'/></serial>\
                    </devices></domain>";
        assert_eq!(
            super::console_log_path(file).as_deref(),
            Some("/var/log/c&d.log")
        );
        let log_only = "<domain><devices><disk><source file='/x'/></disk>\
                        <serial type='pty'><source path='/dev/pts/3'/><log file='/l/pty.log'/></serial>\
                        </devices></domain>";
        assert_eq!(
            super::console_log_path(log_only).as_deref(),
            Some("/l/pty.log")
        );
        assert_eq!(super::console_log_path("<domain/>"), None);
    }

    use super::*;

    #[test]
    fn rendered_channels_read_back_as_ours() {
        let dir = "/srv/a&b 'q' <x>";
        for kind in [ChannelKind::Control, ChannelKind::Cpu(7)] {
            let xml = format!(
                "<domain><devices>{}</devices></domain>",
                edit::render(kind, dir)
            );

            let ours = our_channels(&xml).unwrap();

            assert_eq!(ours.len(), 1);
            assert_eq!(ours[0].kind, kind);
            assert_eq!(
                ours[0].path.as_deref(),
                Some(kind.source_path(dir).as_str())
            );
            check_ownership(&ours, dir, Strictness::Setup).unwrap();
        }
    }

    #[test]
    fn virtio_serial_controllers_are_found_and_removed_with_their_lines() {
        let xml = "<domain>\n  <devices>\n    <controller type='usb' index='0'/>\n    \
            <controller type='virtio-serial' index='0'>\n      <address type='pci'/>\n    \
            </controller>\n    <controller type='virtio-serial' index='1'/>\n  </devices>\n</domain>\n";

        assert_eq!(virtio_serial_controllers(xml).unwrap(), vec![0, 1]);
        let (text, removed) = remove_virtio_serial_controllers(xml, &[0, 7]).unwrap();

        assert_eq!(removed, vec![0]);
        assert_eq!(
            text,
            "<domain>\n  <devices>\n    <controller type='usb' index='0'/>\n    \
             <controller type='virtio-serial' index='1'/>\n  </devices>\n</domain>\n"
        );
        assert_eq!(virtio_serial_controllers(&text).unwrap(), vec![1]);
    }

    #[test]
    fn only_canonical_cpu_numbers_are_ours() {
        assert_eq!(
            ChannelKind::from_target_name("trace-path-cpu0"),
            Some(ChannelKind::Cpu(0))
        );
        assert_eq!(
            ChannelKind::from_target_name("trace-path-cpu63"),
            Some(ChannelKind::Cpu(63))
        );
        assert_eq!(
            ChannelKind::from_target_name("agent-ctl-path"),
            Some(ChannelKind::Control)
        );
        for name in [
            "trace-path-cpu",
            "trace-path-cpu01",
            "trace-path-cpu+1",
            "trace-path-cpu99999999999",
        ] {
            assert_eq!(ChannelKind::from_target_name(name), None, "{name}");
        }
    }

    #[test]
    fn source_paths_ignore_trailing_slashes() {
        assert_eq!(
            ChannelKind::Control.source_path("/v/"),
            "/v/agent-ctl-path.sock"
        );
        assert_eq!(ChannelKind::Cpu(3).source_path("/v"), "/v/trace-path-cpu3");
    }

    #[test]
    fn unusable_dirs_are_rejected() {
        for dir in ["", "relative/dir", "/with\nnewline"] {
            assert!(
                matches!(checked_dir(dir), Err(DomXmlError::InvalidDir { .. })),
                "{dir:?}"
            );
        }
    }
}
