//! Generated gRPC code. `workload` is the SPIFFE Workload API with the standard's exact names
//! (its proto has no package); `node` and `admin` are Tether's own server APIs.
#![allow(missing_docs)]

/// The SPIFFE Workload API (no proto package: methods are `/SpiffeWorkloadAPI/...`).
#[allow(clippy::all)]
pub mod workload {
    tonic::include_proto!("_");
}

/// Nested as the proto packages are, so cross-package references resolve.
#[allow(clippy::all)]
pub mod tether {
    pub mod node {
        pub mod v1 {
            tonic::include_proto!("tether.node.v1");
        }
    }
    pub mod admin {
        pub mod v1 {
            tonic::include_proto!("tether.admin.v1");
        }
    }
    pub mod tpm {
        pub mod v1 {
            tonic::include_proto!("tether.tpm.v1");
        }
    }
}

pub use tether::{admin::v1 as admin, node::v1 as node, tpm::v1 as tpm};

/// The node tunnels' HBONE framing: pure parsing of what arrives from the network.
pub mod hbone;
