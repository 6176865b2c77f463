//! SVIDs held by the agent: keys generated here (they never leave the node), certificates
//! signed by the server, renewed at half life with jitter.

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use tether_attestors::{pem, SpiffeId};
use x509_parser::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("key generation: {0}")]
    Key(#[from] rcgen::Error),
    #[error("the server returned an unparsable certificate chain")]
    BadChain,
}

/// A key pair and the CSR that proves possession of it.
pub struct PendingKey {
    pub key: KeyPair,
    pub csr_der: Vec<u8>,
}

pub fn new_key() -> Result<PendingKey, SvidError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    // The server decides every field of the certificate; the CSR only proves the key.
    let csr_der = CertificateParams::default().serialize_request(&key)?.der().to_vec();
    Ok(PendingKey { key, csr_der })
}

/// An X.509-SVID with its key.
#[derive(Clone, Debug)]
pub struct X509Svid {
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER.
    pub key_pkcs8: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    /// When this SVID is due for renewal (unix time), chosen once when it arrived.
    pub renew_after: i64,
}

/// Splits concatenated DER certificates.
pub fn split_chain(mut der: &[u8]) -> Result<Vec<Vec<u8>>, SvidError> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = X509Certificate::from_der(der).map_err(|_| SvidError::BadChain)?;
        out.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    if out.is_empty() {
        return Err(SvidError::BadChain);
    }
    Ok(out)
}

impl X509Svid {
    /// An SVID received now.
    pub fn new(key: &KeyPair, chain_der: &[u8]) -> Result<Self, SvidError> {
        Self::received_at(key, chain_der, now())
    }

    /// An SVID the agent received at `received` (unix time): its life for renewal purposes
    /// starts then, not at its notBefore, which the server back-dates for clock skew (with a
    /// short TTL, half of the back-dated life would already be over on arrival).
    pub fn received_at(key: &KeyPair, chain_der: &[u8], received: i64) -> Result<Self, SvidError> {
        let chain = split_chain(chain_der)?;
        let (_, leaf) = X509Certificate::from_der(&chain[0]).map_err(|_| SvidError::BadChain)?;
        let spiffe_id = leaf
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    GeneralName::URI(u) => SpiffeId::parse(u).ok(),
                    _ => None,
                })
            })
            .ok_or(SvidError::BadChain)?;
        let not_before = leaf.validity().not_before.timestamp();
        let not_after = leaf.validity().not_after.timestamp();
        Ok(X509Svid {
            spiffe_id,
            not_before,
            not_after,
            renew_after: renew_after(received.max(not_before), not_after, jitter()),
            chain,
            key_pkcs8: key.serialize_der(),
        })
    }

    pub fn chain_pem(&self) -> String {
        pem::certificates(self.chain.iter().map(Vec::as_slice))
    }

    pub fn key_pem(&self) -> String {
        pem::encode("PRIVATE KEY", &self.key_pkcs8)
    }
}

/// Half-way through the life from `start` to `not_after`, less up to a tenth of that life
/// (`jitter_fraction` of it) so that many SVIDs issued together do not all renew together.
fn renew_after(start: i64, not_after: i64, jitter_fraction: f64) -> i64 {
    let life = (not_after - start).max(1);
    start + life / 2 - (life as f64 * 0.1 * jitter_fraction.clamp(0.0, 1.0)) as i64
}

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A uniform value in [0, 1) for jitter.
pub fn jitter() -> f64 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::renew_after;

    #[test]
    fn renewal_is_half_the_life_from_arrival_less_jitter() {
        // An 8 s SVID back-dated 10 s, received at 100: due at 104, not at once.
        assert_eq!(renew_after(100, 108, 0.0), 104);
        assert_eq!(renew_after(100, 108, 1.0), 104);
        assert_eq!(renew_after(0, 3600, 0.0), 1800);
        assert_eq!(renew_after(0, 3600, 1.0), 1440);
        assert_eq!(renew_after(0, 3600, 7.0), 1440, "jitter is clamped to a tenth of the life");
    }
}
