//! The host side of a recording: per-CPU stream readers (and, in `tvctl trace`, progress).
//!
//! Each CPU's data arrives on its own FIFO and is moved to its own data file by a thread of
//! its own ([`stream::CpuStream`]): FIFOs have no readiness that crosses CPUs, a thread per
//! CPU keeps each splice loop trivial, and guests have few vCPUs.

pub mod guest_input; // the boundary with the untrusted guest: checked, cleaned, bounded
#[cfg(feature = "host")]
pub mod host; // the host recorded like a guest: its own instance, the agent's pumps, FIFOs
#[cfg(feature = "host")]
pub mod output; // the guest command's output: bounded, relayed escaped, tails for the summary
#[cfg(feature = "host")]
pub mod progress; // the live display on a terminal; lost events counted from page headers
#[cfg(feature = "host")]
pub mod recorder; // one recording: FIFO readers, control session, stop and drain
pub mod stream; // one CPU: FIFO → marker search → splice to the data file, exact byte count
pub mod tsc; // the host's TSC and the kernel's cycles→ns conversion (TSC2NSEC)
