//! The guest side of tvctl: what `tvctl-agent` does inside the guest.
//!
//! The agent owns the guest's end of the control port, records in a tracefs instance of its
//! own and pumps each CPU's raw ring-buffer pages to that CPU's data port. It never logs in
//! anywhere and needs no library: it is one static binary started by the guest's init.

pub mod local; // the local socket `tvctl-agent record` talks to
pub mod metacache; // static metadata read once per boot (and per set of modules)
pub mod ports; // find virtio-serial ports by name (sysfs first, udev links as fallback)
pub mod pump; // per-CPU trace_pipe_raw → port pumps, splice with read/write fallback
pub mod record_cmd; // `tvctl-agent record`: a recording started in the guest, written by serve
pub mod recording; // one recording: validate, private instance, pumps, command, metadata
pub mod report; // `tvctl-agent --report`: a one-line self-check for consoles and tests
pub mod session;
pub mod tracefs; // tracefs mount, event specs, our private instance, per-CPU stats // the control loop: wait for a host, serve its session, repeat
