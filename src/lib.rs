//! tvctl: record ftrace data of libvirt/QEMU guests from the host over virtio-serial.
//!
//! The host binary (`tvctl`) prepares a domain's channels, drives the guest agent and writes
//! `trace.dat` files; the guest binary (`tvctl-agent`) records in the guest and streams raw
//! ring-buffer pages back. Both share the wire format in [`proto`].

pub mod proto; // wire format shared by host and agent: frames, messages, limits
pub mod agent; // guest side: tracefs control, per-CPU splice pumps, control loop
pub mod tracedat; // trace.dat v6 writer/reader and ring-buffer page parsing

#[cfg(feature = "host")]
pub mod domxml; // pure edits of libvirt domain XML (our channels), no I/O
#[cfg(feature = "host")]
pub mod channels; // host files: per-domain folder, FIFOs, owners and modes
#[cfg(feature = "host")]
pub mod libvirt; // the only module that talks to libvirt (the `virt` crate)
#[cfg(feature = "host")]
pub mod collect; // host side of a recording: per-CPU stream readers, progress
