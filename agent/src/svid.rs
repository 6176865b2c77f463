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
    pub fn new(key: &KeyPair, chain_der: &[u8]) -> Result<Self, SvidError> {
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
        Ok(X509Svid {
            spiffe_id,
            not_before: leaf.validity().not_before.timestamp(),
            not_after: leaf.validity().not_after.timestamp(),
            chain,
            key_pkcs8: key.serialize_der(),
        })
    }

    /// Due for renewal: past half its life, minus up to a tenth of it of jitter so that many
    /// SVIDs issued together do not all renew together.
    pub fn renew_at(&self, jitter_fraction: f64) -> i64 {
        let life = (self.not_after - self.not_before).max(1);
        self.not_before + life / 2 - (life as f64 * 0.1 * jitter_fraction.clamp(0.0, 1.0)) as i64
    }

    pub fn chain_pem(&self) -> String {
        pem::certificates(self.chain.iter().map(Vec::as_slice))
    }

    pub fn key_pem(&self) -> String {
        pem::encode("PRIVATE KEY", &self.key_pkcs8)
    }
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
