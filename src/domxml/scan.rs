//! One pass of quick-xml over a domain XML that records where the parts we read or edit sit.
//!
//! Only `/domain`, `/domain/vcpu`, `/domain/devices`, `/domain/devices/channel` (with its
//! `<source>` and `<target>`) and `/domain/devices/controller[@type='virtio-serial']` are
//! looked at; every other element is only checked for being well-formed. Spans are byte ranges into the scanned string, so edits can splice text
//! without re-serialising anything.

use std::ops::Range;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::DomXmlError;

/// An element's tags: `end_tag` is `None` for a self-closing element (`<devices/>`).
#[derive(Debug, Clone)]
pub(super) struct Tags {
    pub start_tag: Range<usize>,
    pub end_tag: Option<Range<usize>>,
}

impl Tags {
    /// The whole element, from `<` of the start tag to `>` of the end tag.
    pub fn span(&self) -> Range<usize> {
        let end = self
            .end_tag
            .as_ref()
            .map_or(self.start_tag.end, |tag| tag.end);
        self.start_tag.start..end
    }
}

/// A `<channel>` directly under `<devices>`, with the attributes that identify it.
#[derive(Debug, Clone, Default)]
pub(super) struct RawChannel {
    pub span: Range<usize>,
    pub channel_type: Option<String>,
    pub source_mode: Option<String>,
    pub source_path: Option<String>,
    pub target_type: Option<String>,
    pub target_name: Option<String>,
    /// `<target state=...>` of a running domain: `connected` once a program in the guest
    /// opened the port (libvirt follows QEMU's VSERPORT_CHANGE), else `disconnected`.
    pub target_state: Option<String>,
}

/// A `<controller type='virtio-serial'>` directly under `<devices>`.
#[derive(Debug, Clone)]
pub(super) struct RawController {
    pub span: Range<usize>,
    pub index: Option<String>,
}

#[derive(Debug, Clone)]
pub(super) struct Devices {
    pub tags: Tags,
    /// Start offsets of the element children, in document order.
    pub children: Vec<usize>,
    pub channels: Vec<RawChannel>,
    pub virtio_serial_controllers: Vec<RawController>,
}

#[derive(Debug, Clone)]
pub(super) struct Vcpu {
    pub current: Option<String>,
    pub text: String,
}

#[derive(Debug, Clone)]
pub(super) struct Scan {
    pub domain: Tags,
    /// Start offsets of the element children of `<domain>`, in document order.
    pub domain_children: Vec<usize>,
    pub vcpu: Option<Vcpu>,
    pub devices: Option<Devices>,
}

/// What an open element is to us; decides how its children are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Domain,
    Vcpu,
    Devices,
    Channel,
    VirtioSerialController,
    Other,
}

struct Open {
    role: Role,
    start_tag: Range<usize>,
}

/// Scans `xml`, failing on anything that is not a well-formed document rooted at `<domain>`.
pub(super) fn scan(xml: &str) -> Result<Scan, DomXmlError> {
    let mut reader = Reader::from_str(xml);
    let mut stack: Vec<Open> = Vec::new();
    let mut domain: Option<Tags> = None;
    let mut domain_children = Vec::new();
    let mut vcpu: Option<Vcpu> = None;
    let mut devices: Option<Devices> = None;
    let mut channel: Option<RawChannel> = None;

    loop {
        let start = position(&reader);
        let event = reader
            .read_event()
            .map_err(|err| malformed(xml, offset(reader.error_position()), err.to_string()))?;
        let end = position(&reader);
        let parent = stack.last().map(|open| open.role);
        match event {
            Event::Start(ref tag) | Event::Empty(ref tag) => {
                let self_closing = matches!(event, Event::Empty(_));
                let role = open_element(
                    xml,
                    tag,
                    parent,
                    start..end,
                    domain.is_some(),
                    &mut ElementSinks {
                        domain_children: &mut domain_children,
                        vcpu: &mut vcpu,
                        devices: &mut devices,
                        channel: &mut channel,
                    },
                )?;
                if self_closing {
                    close_element(
                        role,
                        start..end,
                        None,
                        &mut domain,
                        &mut devices,
                        &mut channel,
                    );
                } else {
                    stack.push(Open {
                        role,
                        start_tag: start..end,
                    });
                }
            }
            Event::End(_) => {
                // quick-xml already checked that the name matches the open element.
                let open = stack
                    .pop()
                    .expect("quick-xml reports an end tag without a start tag as an error");
                close_element(
                    open.role,
                    open.start_tag,
                    Some(start..end),
                    &mut domain,
                    &mut devices,
                    &mut channel,
                );
            }
            Event::Text(ref text) if parent == Some(Role::Vcpu) => {
                let text = text
                    .unescape()
                    .map_err(|err| malformed(xml, start, err.to_string()))?;
                if let Some(vcpu) = vcpu.as_mut() {
                    vcpu.text.push_str(&text);
                }
            }
            Event::CData(ref data) if parent == Some(Role::Vcpu) => {
                if let Some(vcpu) = vcpu.as_mut() {
                    vcpu.text.push_str(&String::from_utf8_lossy(data));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }

    if let Some(open) = stack.last() {
        return Err(malformed(
            xml,
            open.start_tag.start,
            format!("element `{}` is never closed", &xml[open.start_tag.clone()]),
        ));
    }
    let domain = domain.ok_or(DomXmlError::NotADomain { found: None })?;
    Ok(Scan {
        domain,
        domain_children,
        vcpu,
        devices,
    })
}

/// Where the scan stores what it finds below `<domain>`.
struct ElementSinks<'a> {
    domain_children: &'a mut Vec<usize>,
    vcpu: &'a mut Option<Vcpu>,
    devices: &'a mut Option<Devices>,
    channel: &'a mut Option<RawChannel>,
}

/// Records a start (or self-closing) tag and returns the role of the element it opens.
fn open_element(
    xml: &str,
    tag: &BytesStart<'_>,
    parent: Option<Role>,
    span: Range<usize>,
    seen_root: bool,
    sinks: &mut ElementSinks<'_>,
) -> Result<Role, DomXmlError> {
    let name = tag.name();
    let name = name.as_ref();
    let attr = |key: &[u8]| attribute(tag, key).map_err(|msg| malformed(xml, span.start, msg));
    let role = match parent {
        None if seen_root => {
            return Err(malformed(
                xml,
                span.start,
                "a second root element follows </domain>".to_owned(),
            ))
        }
        None if name == b"domain" => Role::Domain,
        None => {
            return Err(DomXmlError::NotADomain {
                found: Some(String::from_utf8_lossy(name).into_owned()),
            })
        }
        Some(Role::Domain) => {
            sinks.domain_children.push(span.start);
            match name {
                // libvirt reads the first <vcpu> only; so do we.
                b"vcpu" if sinks.vcpu.is_none() => {
                    *sinks.vcpu = Some(Vcpu {
                        current: attr(b"current")?,
                        text: String::new(),
                    });
                    Role::Vcpu
                }
                b"devices" if sinks.devices.is_some() => {
                    return Err(malformed(
                        xml,
                        span.start,
                        "a second <devices> element; libvirt allows only one".to_owned(),
                    ))
                }
                b"devices" => {
                    *sinks.devices = Some(Devices {
                        tags: Tags {
                            start_tag: span.clone(),
                            end_tag: None,
                        },
                        children: Vec::new(),
                        channels: Vec::new(),
                        virtio_serial_controllers: Vec::new(),
                    });
                    Role::Devices
                }
                _ => Role::Other,
            }
        }
        Some(Role::Devices) => {
            if let Some(devices) = sinks.devices.as_mut() {
                devices.children.push(span.start);
            }
            if name == b"channel" {
                *sinks.channel = Some(RawChannel {
                    span: span.clone(),
                    channel_type: attr(b"type")?,
                    ..RawChannel::default()
                });
                Role::Channel
            } else if name == b"controller" && attr(b"type")?.as_deref() == Some("virtio-serial") {
                if let Some(devices) = sinks.devices.as_mut() {
                    devices.virtio_serial_controllers.push(RawController {
                        span: span.clone(),
                        index: attr(b"index")?,
                    });
                }
                Role::VirtioSerialController
            } else {
                Role::Other
            }
        }
        Some(Role::Channel) => {
            if let Some(channel) = sinks.channel.as_mut() {
                // Like libvirt, the first <source> and <target> count.
                if name == b"source"
                    && channel.source_mode.is_none()
                    && channel.source_path.is_none()
                {
                    channel.source_mode = attr(b"mode")?;
                    channel.source_path = attr(b"path")?;
                } else if name == b"target"
                    && channel.target_type.is_none()
                    && channel.target_name.is_none()
                {
                    channel.target_type = attr(b"type")?;
                    channel.target_name = attr(b"name")?;
                    channel.target_state = attr(b"state")?;
                }
            }
            Role::Other
        }
        Some(Role::Vcpu | Role::VirtioSerialController | Role::Other) => Role::Other,
    };
    Ok(role)
}

/// Records the end of an element; `end_tag` is `None` when it was self-closing.
fn close_element(
    role: Role,
    start_tag: Range<usize>,
    end_tag: Option<Range<usize>>,
    domain: &mut Option<Tags>,
    devices: &mut Option<Devices>,
    channel: &mut Option<RawChannel>,
) {
    let tags = Tags { start_tag, end_tag };
    match role {
        Role::Domain => *domain = Some(tags),
        Role::Devices => {
            if let Some(devices) = devices.as_mut() {
                devices.tags = tags;
            }
        }
        Role::Channel => {
            if let (Some(mut done), Some(devices)) = (channel.take(), devices.as_mut()) {
                done.span = tags.span();
                devices.channels.push(done);
            }
        }
        Role::VirtioSerialController => {
            // Controllers do not nest, so the last one recorded is the one closing.
            let last = devices
                .as_mut()
                .and_then(|devices| devices.virtio_serial_controllers.last_mut());
            if let Some(controller) = last {
                controller.span = tags.span();
            }
        }
        Role::Vcpu | Role::Other => {}
    }
}

/// The unescaped value of attribute `key`, or `None` if the tag lacks it.
fn attribute(tag: &BytesStart<'_>, key: &[u8]) -> Result<Option<String>, String> {
    for attr in tag.attributes() {
        let attr = attr.map_err(|err| err.to_string())?;
        if attr.key.as_ref() == key {
            let value = attr.unescape_value().map_err(|err| err.to_string())?;
            return Ok(Some(value.into_owned()));
        }
    }
    Ok(None)
}

fn position(reader: &Reader<&[u8]>) -> usize {
    offset(reader.buffer_position())
}

fn offset(position: u64) -> usize {
    // Positions index the &str we were given, so they always fit.
    usize::try_from(position).expect("a position inside a &str fits in usize")
}

fn malformed(xml: &str, position: usize, message: String) -> DomXmlError {
    let position = position.min(xml.len());
    let line = xml.as_bytes()[..position]
        .iter()
        .filter(|&&byte| byte == b'\n')
        .count()
        + 1;
    DomXmlError::Malformed { line, message }
}
