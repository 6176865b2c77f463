//! What a quote vouches for. A quote over the server's nonce alone proves the TPM's state at
//! that moment, not who asked: a relay (a rogue server the node talks to) could forward the
//! node's challenge, take its evidence and submit it with a CSR for its own key. So the
//! quote's qualifying data (TPMS_ATTEST `extraData`) also covers the public key the request
//! certifies:
//!
//! ```text
//! qualifying data = SHA-256(nonce ‖ SHA-256(SubjectPublicKeyInfo DER))
//! ```
//!
//! The key is the CSR's when the request issues a node SVID (first attestation, renewal), and
//! the node SVID's own (the one the mTLS channel proves) on a re-attestation that issues
//! nothing. Agent and server both take the key from the DER they send or receive with these
//! functions, so they hash the same bytes. The nonce is the server's 32 random bytes: the
//! concatenation is unambiguous.

use ring::digest::{digest, Context, SHA256};
use thiserror::Error;
use x509_parser::prelude::{FromDer, X509Certificate};

/// SHA-256 of a DER SubjectPublicKeyInfo.
pub type KeyHash = [u8; 32];

/// The public key a quote covers, as the request carries it.
#[derive(Clone, Copy, Debug)]
pub enum BoundKey<'a> {
    /// A PKCS#10 CSR (DER): the key of the SVID the request asks for.
    Csr(&'a [u8]),
    /// An X.509 certificate (DER): the node SVID the caller authenticated with.
    Certificate(&'a [u8]),
}

#[derive(Debug, Error)]
pub enum BindingError {
    #[error("CSR does not parse: {reason}")]
    Csr { reason: String },
    #[error("certificate does not parse: {reason}")]
    Certificate { reason: String },
}

impl BoundKey<'_> {
    /// SHA-256 of the key's SubjectPublicKeyInfo, exactly as the DER carries it.
    pub fn key_hash(&self) -> Result<KeyHash, BindingError> {
        match self {
            BoundKey::Csr(der) => {
                let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
                    .map_err(|e| BindingError::Csr { reason: e.to_string() })?;
                if !rest.is_empty() {
                    return Err(BindingError::Csr { reason: format!("{} bytes after the CSR", rest.len()) });
                }
                Ok(key_hash(csr.certification_request_info.subject_pki.raw))
            }
            BoundKey::Certificate(der) => {
                let (rest, cert) =
                    X509Certificate::from_der(der).map_err(|e| BindingError::Certificate { reason: e.to_string() })?;
                if !rest.is_empty() {
                    return Err(BindingError::Certificate {
                        reason: format!("{} bytes after the certificate", rest.len()),
                    });
                }
                Ok(key_hash(cert.public_key().raw))
            }
        }
    }

    /// How errors name it.
    pub fn describe(&self) -> &'static str {
        match self {
            BoundKey::Csr(_) => "the CSR's key",
            BoundKey::Certificate(_) => "the node SVID's key",
        }
    }
}

/// SHA-256 of a DER SubjectPublicKeyInfo.
pub fn key_hash(spki_der: &[u8]) -> KeyHash {
    let mut out = [0; 32];
    out.copy_from_slice(digest(&SHA256, spki_der).as_ref());
    out
}

/// The qualifying data a quote answering `nonce` for `key` carries.
pub fn qualifying_data(nonce: &[u8], key: &KeyHash) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    ctx.update(nonce);
    ctx.update(key);
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Why a signed quote's qualifying data is not the expected one, as far as the quote itself
/// tells (the key hash the node says it bound only names the case; it proves nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// It answers this nonce, for another key: relayed evidence (or a confused agent).
    OtherKey,
    /// It carries the bare nonce: a quote that binds no key (an agent from before binding).
    BareNonce,
    /// Neither: another challenge's quote (stale or replayed).
    Stale,
}

/// Names the mismatch of `extra_data` against `nonce`, given the key hash the node claims
/// to have bound.
pub fn diagnose(extra_data: &[u8], nonce: &[u8], claimed_key: &[u8]) -> Mismatch {
    if extra_data == nonce {
        return Mismatch::BareNonce;
    }
    match <&KeyHash>::try_from(claimed_key) {
        Ok(claimed) if extra_data == qualifying_data(nonce, claimed) => Mismatch::OtherKey,
        _ => Mismatch::Stale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hex;

    #[test]
    fn qualifying_data_is_sha256_of_nonce_then_key_hash() {
        // Computed independently: python3 -c 'import hashlib; k=hashlib.sha256(b"spki").digest();
        // print(hashlib.sha256(bytes(range(32))+k).hexdigest())'
        let nonce: Vec<u8> = (0u8..32).collect();
        let key = key_hash(b"spki");
        assert_eq!(hex::encode(&key), "6feecc8c16c5551d9feb3eb5f77e2da773bf68bd9ef9c52927ceb2c86e56892b");
        assert_eq!(
            hex::encode(&qualifying_data(&nonce, &key)),
            "6f02871643275cbfe5b6daf508296d6e370d67bb6db8299887e68f73cbf4ce01"
        );
    }

    fn key_and_csr() -> (rcgen::KeyPair, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().der().to_vec();
        (key, csr)
    }

    #[test]
    fn a_csr_and_a_certificate_for_one_key_bind_the_same_hash() {
        use rcgen::PublicKeyData;
        let (key, csr) = key_and_csr();
        let cert = rcgen::CertificateParams::default().self_signed(&key).unwrap().der().to_vec();
        let want = key_hash(&key.subject_public_key_info());
        assert_eq!(BoundKey::Csr(&csr).key_hash().unwrap(), want);
        assert_eq!(BoundKey::Certificate(&cert).key_hash().unwrap(), want);
        let (_, other) = key_and_csr();
        assert_ne!(BoundKey::Csr(&other).key_hash().unwrap(), want);
    }

    #[test]
    fn malformed_and_padded_der_is_refused_naming_what() {
        let (_, mut csr) = key_and_csr();
        let e = BoundKey::Csr(&csr[..csr.len() - 3]).key_hash().unwrap_err().to_string();
        assert!(e.starts_with("CSR does not parse"), "{e}");
        csr.push(0);
        assert_eq!(
            BoundKey::Csr(&csr).key_hash().unwrap_err().to_string(),
            "CSR does not parse: 1 bytes after the CSR"
        );
        let e = BoundKey::Certificate(b"junk").key_hash().unwrap_err().to_string();
        assert!(e.starts_with("certificate does not parse"), "{e}");
    }

    #[test]
    fn mismatches_are_told_apart() {
        let nonce = [7u8; 32];
        let (mine, theirs) = (key_hash(b"mine"), key_hash(b"theirs"));
        let relayed = qualifying_data(&nonce, &theirs);
        assert_eq!(diagnose(&relayed, &nonce, &theirs), Mismatch::OtherKey);
        // The claim is only a name: without it (or with a wrong one) the same quote is "stale".
        assert_eq!(diagnose(&relayed, &nonce, &mine), Mismatch::Stale);
        assert_eq!(diagnose(&relayed, &nonce, b""), Mismatch::Stale);
        assert_eq!(diagnose(&nonce, &nonce, &mine), Mismatch::BareNonce);
        assert_eq!(diagnose(&qualifying_data(&[8; 32], &mine), &nonce, &mine), Mismatch::Stale);
    }
}
