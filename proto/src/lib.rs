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

/// Why the node API refused a *node* (not one request), as a typed code the agent acts on:
/// sent as the `tether-refusal` metadata of the status, so no client matches message text.
pub mod refusal {
    /// The metadata key carrying the code.
    pub const KEY: &str = "tether-refusal";

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum NodeRefusal {
        /// The caller's node SVID names no registered agent (evicted, or revoked earlier).
        NotAnAgent,
        /// A TPM node without its TPM record.
        NoTpmRecord,
        /// A TPM node whose last quote is older than the server accepts.
        EvidenceTooOld,
        /// A TPM node whose fresh evidence failed: revoked now.
        Revoked,
    }

    impl NodeRefusal {
        pub fn as_str(self) -> &'static str {
            match self {
                NodeRefusal::NotAnAgent => "not-an-agent",
                NodeRefusal::NoTpmRecord => "no-tpm-record",
                NodeRefusal::EvidenceTooOld => "evidence-too-old",
                NodeRefusal::Revoked => "revoked",
            }
        }

        fn parse(s: &str) -> Option<Self> {
            [NodeRefusal::NotAnAgent, NodeRefusal::NoTpmRecord, NodeRefusal::EvidenceTooOld, NodeRefusal::Revoked]
                .into_iter()
                .find(|r| r.as_str() == s)
        }

        /// A PermissionDenied status carrying this code and `message`.
        pub fn status(self, message: impl Into<String>) -> tonic::Status {
            let mut status = tonic::Status::permission_denied(message);
            status.metadata_mut().insert(KEY, tonic::metadata::MetadataValue::from_static(self.as_str()));
            status
        }

        /// The code a status carries, if it is a refusal of the node.
        pub fn of(status: &tonic::Status) -> Option<Self> {
            if status.code() != tonic::Code::PermissionDenied {
                return None;
            }
            status.metadata().get(KEY).and_then(|v| v.to_str().ok()).and_then(Self::parse)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn codes_round_trip_and_only_on_permission_denied() {
            for r in
                [NodeRefusal::NotAnAgent, NodeRefusal::NoTpmRecord, NodeRefusal::EvidenceTooOld, NodeRefusal::Revoked]
            {
                assert_eq!(NodeRefusal::of(&r.status("x")), Some(r));
            }
            assert_eq!(NodeRefusal::of(&tonic::Status::permission_denied("node revoked: looks like one")), None);
            let mut s = tonic::Status::unavailable("down");
            s.metadata_mut().insert(KEY, tonic::metadata::MetadataValue::from_static("revoked"));
            assert_eq!(NodeRefusal::of(&s), None);
        }
    }
}

/// The node tunnels' HBONE framing: pure parsing of what arrives from the network.
pub mod hbone;
