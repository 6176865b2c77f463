//! The Tether node agent.
//!
//! `ebpf` is the only module that talks to the kernel's BPF subsystem (and the only one that
//! imports aya); the rest works on the records it produces.

pub mod api_client;
pub mod cgroup;
pub mod config;
pub mod ebpf;
pub mod enforcement;
pub mod h2_authority;
pub mod identity;
pub mod manager;
pub mod mesh;
pub mod netns;
pub mod node_client;
pub mod persist;
pub mod policy;
pub mod process;
pub mod server_tls;
pub mod svid;
pub mod telemetry;
pub mod tpm;
pub mod tunnel;
pub mod workload_api;
