//! The trust domain's bundle as the node holds it.

use tether_attestors::pem;
use tether_proto::node;

/// The trust bundle: DER roots, and the JWKS for JWT authorities.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bundle {
    pub trust_domain: String,
    pub x509_authorities: Vec<Vec<u8>>,
    pub jwks: Vec<u8>,
    pub sequence: i64,
}

impl Bundle {
    /// The X.509 authorities, PEM.
    pub fn pem(&self) -> String {
        pem::certificates(self.x509_authorities.iter().map(Vec::as_slice))
    }
}

impl From<node::Bundle> for Bundle {
    fn from(b: node::Bundle) -> Self {
        Bundle {
            trust_domain: b.trust_domain,
            x509_authorities: b.x509_authorities,
            jwks: b.jwks,
            sequence: b.sequence,
        }
    }
}
