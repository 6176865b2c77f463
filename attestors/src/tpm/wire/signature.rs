//! TPMT_SIGNATURE for the schemes an AK may use.

use super::{put_tpm2b, HashAlg, Reader, WireError, MAX_ECC_BYTES, MAX_RSA_BYTES};

const STRUCTURE: &str = "tpmt_signature";

const ALG_RSASSA: u16 = 0x0014;
const ALG_RSAPSS: u16 = 0x0016;
const ALG_ECDSA: u16 = 0x0018;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    RsaSsa {
        hash: HashAlg,
        sig: Vec<u8>,
    },
    RsaPss {
        hash: HashAlg,
        sig: Vec<u8>,
    },
    /// r and s as the TPM sent them: big-endian, possibly shorter than the field.
    Ecdsa {
        hash: HashAlg,
        r: Vec<u8>,
        s: Vec<u8>,
    },
}

impl Signature {
    /// Parses a TPMT_SIGNATURE; trailing bytes are an error.
    pub fn parse(input: &[u8]) -> Result<Self, WireError> {
        let mut rd = Reader::new(STRUCTURE, input);
        let alg_at = rd.offset();
        let alg = rd.u16("sigAlg")?;
        let sig = match alg {
            ALG_RSASSA | ALG_RSAPSS => {
                let hash = rd.hash_alg("signature.hash")?;
                let sig = rd.tpm2b("signature.sig", MAX_RSA_BYTES)?.to_vec();
                if alg == ALG_RSASSA {
                    Signature::RsaSsa { hash, sig }
                } else {
                    Signature::RsaPss { hash, sig }
                }
            }
            ALG_ECDSA => {
                let hash = rd.hash_alg("signature.hash")?;
                let r = rd.tpm2b("signature.signatureR", MAX_ECC_BYTES)?.to_vec();
                let s = rd.tpm2b("signature.signatureS", MAX_ECC_BYTES)?.to_vec();
                Signature::Ecdsa { hash, r, s }
            }
            other => return Err(rd.unsupported("sigAlg", alg_at, other.into())),
        };
        rd.finish()?;
        Ok(sig)
    }

    pub fn hash(&self) -> HashAlg {
        match self {
            Signature::RsaSsa { hash, .. } | Signature::RsaPss { hash, .. } | Signature::Ecdsa { hash, .. } => *hash,
        }
    }

    pub fn marshal(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        match self {
            Signature::RsaSsa { hash, sig } | Signature::RsaPss { hash, sig } => {
                let alg = if matches!(self, Signature::RsaSsa { .. }) { ALG_RSASSA } else { ALG_RSAPSS };
                out.extend_from_slice(&alg.to_be_bytes());
                out.extend_from_slice(&hash.id().to_be_bytes());
                put_tpm2b(&mut out, STRUCTURE, sig)?;
            }
            Signature::Ecdsa { hash, r, s } => {
                out.extend_from_slice(&ALG_ECDSA.to_be_bytes());
                out.extend_from_slice(&hash.id().to_be_bytes());
                put_tpm2b(&mut out, STRUCTURE, r)?;
                put_tpm2b(&mut out, STRUCTURE, s)?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_round_trips() {
        let sig = Signature::Ecdsa { hash: HashAlg::Sha256, r: vec![1; 32], s: vec![2; 31] };
        let bytes = sig.marshal().unwrap();
        assert_eq!(Signature::parse(&bytes).unwrap(), sig);
    }

    #[test]
    fn unsupported_algorithm_named() {
        // TPM_ALG_HMAC
        assert_eq!(
            Signature::parse(&[0, 0x05, 0, 0x0b]),
            Err(WireError::Unsupported { structure: STRUCTURE, field: "sigAlg", offset: 0, value: 5 })
        );
    }
}
