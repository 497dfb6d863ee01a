//! tvctl: record ftrace data of libvirt/QEMU guests from the host over virtio-serial.
//!
//! The host binary (`tvctl`) prepares a domain's channels, drives the guest agent and writes
//! `trace.dat` files; the guest binary (`tvctl-agent`) records in the guest and streams raw
//! ring-buffer pages back. Both share the wire format in [`proto`].
//!
//! Module map (docs/architecture.md has the longer version):
//! - [`proto`]: wire format shared by host and agent: frames, messages, limits.
//! - [`agent`]: guest side: tracefs control, per-CPU splice pumps, control loop.
//! - [`tracedat`]: trace.dat v6 writer/reader and ring-buffer page parsing.
//! - [`sigcount`]: SIGINT/SIGTERM counted, so waits can stop gracefully, then give up.
//! - [`zerocopy`]: splice(2) through a pipe, shared by the agent and the collector.
//! - `domxml` (host): pure edits of libvirt domain XML (our channels), no I/O.
//! - `channels` (host): the per-domain folder, FIFOs, owners and modes.
//! - `guestinstall` (host): `tvctl agent install/status`: the agent put into a guest via qemu-ga.
//! - `libvirt` (host): the only module that talks to libvirt (the `virt` crate).
//! - `control` (host): the host end of the control channel: connect, handshake, deadlines.
//! - `trace` (host): `tvctl trace`: boot, record, write trace.dat, summarise.
//! - `tsync` (host): clock sync: probe or kvm measurements → per-CPU TIME_SHIFT samples, bounded.
//! - `collect` (host): host side of a recording: per-CPU stream readers, progress.
//! - `serve` (host): `tvctl serve`: a daemon that serves every set-up domain's guest recordings.
//! - `setup` (host): `tvctl setup`/`teardown`/`status`: plan, apply, roll back, report.
//! - `cli` (host): the command line (clap) and the human and JSON output.
//! - `exitcode` (host): every exit code of `tvctl`, defined once.
//! - `generate` (host): shell completions and man pages from the clap definitions.

pub mod agent;
pub mod collect;
pub mod proto;
pub mod sigcount;
pub mod tracedat;
pub mod zerocopy;

#[cfg(feature = "host")]
pub mod channels;
#[cfg(feature = "host")]
pub mod cli;
#[cfg(feature = "host")]
pub mod control;
#[cfg(feature = "host")]
pub mod domxml;
#[cfg(feature = "host")]
pub mod exitcode;
#[cfg(feature = "host")]
pub mod generate;
#[cfg(feature = "host")]
pub mod guestinstall;
#[cfg(feature = "host")]
pub mod libvirt;
#[cfg(feature = "host")]
pub mod lock;
#[cfg(feature = "host")]
pub mod serve;
#[cfg(feature = "host")]
pub mod setup;
#[cfg(feature = "host")]
pub mod trace;
#[cfg(feature = "host")]
pub mod tsync;
