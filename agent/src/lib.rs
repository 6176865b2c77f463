//! The Tether node agent.
//!
//! `ebpf` is the only module that talks to the kernel's BPF subsystem (and the only one that
//! imports aya); the rest works on the records it produces.

pub mod cgroup;
pub mod ebpf;
pub mod process;
pub mod telemetry;
