//! TPM 2.0 structures in their wire encoding (big-endian, as the TPM marshals them).
//!
//! Every input here comes from the node, so the parsers treat it as hostile: each length and
//! count is bounded by the TPM's own limits and by what is left of the input before anything
//! is allocated, and every failure names the structure, the field and the offset.

mod attest;
mod public;
mod signature;

use std::fmt;

use thiserror::Error;

pub use attest::{Attest, ClockInfo, PcrBank, PcrSelection, ATTEST_QUOTE, GENERATED_VALUE};
pub use public::{Attribute, EccCurve, Kdf, ObjectAttributes, Public, PublicKey, Scheme, SymAlg, SymDef};
pub use signature::Signature;

/// TPM_ALG_NULL: "none" wherever an algorithm is optional.
pub const ALG_NULL: u16 = 0x0010;

/// TPM2B_DIGEST holds at most sizeof(TPMU_HA) bytes (SHA-512).
pub const MAX_DIGEST: usize = 64;
/// TPM2B_NAME and TPM2B_DATA hold at most sizeof(TPMT_HA): an algorithm and a digest.
pub const MAX_NAME: usize = 2 + MAX_DIGEST;
/// TPM2B_PUBLIC_KEY_RSA (modulus, signature): RSA-4096.
pub const MAX_RSA_BYTES: usize = 512;
/// TPM2B_ECC_PARAMETER: generous for every curve a TPM implements (P-521 needs 66).
pub const MAX_ECC_BYTES: usize = 128;

/// A structure that does not parse. `offset` is where the offending field starts, counted
/// from the beginning of the outermost structure handed to the parser.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The input ends inside a field.
    #[error("{structure} truncated at offset {offset}: {field} needs {needed} bytes, {available} left")]
    Truncated { structure: &'static str, field: &'static str, offset: usize, needed: usize, available: usize },
    /// The structure is complete but more bytes follow.
    #[error("{structure} has {extra} trailing bytes at offset {offset}")]
    TrailingBytes { structure: &'static str, offset: usize, extra: usize },
    /// A size or count beyond what the TPM specification allows.
    #[error("{structure}: {field} of {value} exceeds the limit of {max} at offset {offset}")]
    TooLarge { structure: &'static str, field: &'static str, offset: usize, value: usize, max: usize },
    /// An algorithm, curve or selector value this verifier does not implement.
    #[error("{structure}: unsupported {field} {value:#06x} at offset {offset}")]
    Unsupported { structure: &'static str, field: &'static str, offset: usize, value: u32 },
    /// A value the specification does not allow in this field.
    #[error("{structure}: invalid {field} {value:#x} at offset {offset}")]
    Invalid { structure: &'static str, field: &'static str, offset: usize, value: u64 },
    /// TPMS_ATTEST not starting with TPM_GENERATED_VALUE: the TPM did not produce it.
    #[error(
        "tpms_attest has wrong magic {found:#010x} (a tpm-generated structure starts with {GENERATED_VALUE:#010x})"
    )]
    WrongMagic { found: u32 },
    /// A TPMS_ATTEST of another kind than a quote (a certify, a time attestation, ...).
    #[error("tpms_attest has wrong type {found:#06x} (a quote is {ATTEST_QUOTE:#06x})")]
    WrongType { found: u16 },
}

/// The hash algorithms a TPM uses for names, PCR banks and signatures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HashAlg {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    pub const ALL: [HashAlg; 4] = [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512];

    /// The TPM_ALG_ID.
    pub const fn id(self) -> u16 {
        match self {
            HashAlg::Sha1 => 0x0004,
            HashAlg::Sha256 => 0x000B,
            HashAlg::Sha384 => 0x000C,
            HashAlg::Sha512 => 0x000D,
        }
    }

    pub fn from_id(id: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|h| h.id() == id)
    }

    /// The name tpm2-tools and our protocol use for the PCR bank ("sha256").
    pub const fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|h| h.name() == name)
    }

    pub const fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        self.digest_parts(&[data])
    }

    /// The digest of the concatenation of `parts`, without building it.
    pub fn digest_parts(self, parts: &[&[u8]]) -> Vec<u8> {
        let mut ctx = ring::digest::Context::new(self.ring_digest());
        for part in parts {
            ctx.update(part);
        }
        ctx.finish().as_ref().to_vec()
    }

    pub(crate) fn ring_digest(self) -> &'static ring::digest::Algorithm {
        match self {
            HashAlg::Sha1 => &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            HashAlg::Sha256 => &ring::digest::SHA256,
            HashAlg::Sha384 => &ring::digest::SHA384,
            HashAlg::Sha512 => &ring::digest::SHA512,
        }
    }

    pub(crate) fn hmac(self) -> ring::hmac::Algorithm {
        match self {
            HashAlg::Sha1 => ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            HashAlg::Sha256 => ring::hmac::HMAC_SHA256,
            HashAlg::Sha384 => ring::hmac::HMAC_SHA384,
            HashAlg::Sha512 => ring::hmac::HMAC_SHA512,
        }
    }
}

impl fmt::Display for HashAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Appends a TPM2B: a u16 size, then the bytes.
pub fn put_tpm2b(out: &mut Vec<u8>, structure: &'static str, data: &[u8]) -> Result<(), WireError> {
    let size = u16::try_from(data.len()).map_err(|_| WireError::TooLarge {
        structure,
        field: "size",
        offset: out.len(),
        value: data.len(),
        max: usize::from(u16::MAX),
    })?;
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

/// A cursor over hostile input. Reads never panic: each one checks what is left first.
pub(crate) struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
    structure: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(structure: &'static str, input: &'a [u8]) -> Self {
        Reader { input, pos: 0, structure }
    }

    pub(crate) fn offset(&self) -> usize {
        self.pos
    }

    fn remaining(&self) -> usize {
        self.input.len().saturating_sub(self.pos)
    }

    pub(crate) fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], WireError> {
        let available = self.remaining();
        let end = self.pos.checked_add(n).filter(|_| n <= available);
        match end.and_then(|end| self.input.get(self.pos..end)) {
            Some(bytes) => {
                self.pos += n;
                Ok(bytes)
            }
            None => {
                Err(WireError::Truncated { structure: self.structure, field, offset: self.pos, needed: n, available })
            }
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        self.array(field).map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        self.array(field).map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        self.array(field).map(u64::from_be_bytes)
    }

    /// A TPM2B whose size may not exceed `max` (the TPM's buffer) nor what is left.
    pub(crate) fn tpm2b(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], WireError> {
        let at = self.pos;
        let size = usize::from(self.u16(field)?);
        if size > max {
            return Err(self.too_large(field, at, size, max));
        }
        self.take(field, size)
    }

    pub(crate) fn hash_alg(&mut self, field: &'static str) -> Result<HashAlg, WireError> {
        let at = self.pos;
        let id = self.u16(field)?;
        HashAlg::from_id(id).ok_or_else(|| self.unsupported(field, at, id.into()))
    }

    /// Succeeds only if the whole input was consumed.
    pub(crate) fn finish(&self) -> Result<(), WireError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(WireError::TrailingBytes { structure: self.structure, offset: self.pos, extra }),
        }
    }

    pub(crate) fn unsupported(&self, field: &'static str, offset: usize, value: u32) -> WireError {
        WireError::Unsupported { structure: self.structure, field, offset, value }
    }

    pub(crate) fn invalid(&self, field: &'static str, offset: usize, value: u64) -> WireError {
        WireError::Invalid { structure: self.structure, field, offset, value }
    }

    pub(crate) fn too_large(&self, field: &'static str, offset: usize, value: usize, max: usize) -> WireError {
        WireError::TooLarge { structure: self.structure, field, offset, value, max }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reports_structure_field_and_offset() {
        let mut r = Reader::new("tpmt_test", &[0, 1, 2]);
        assert_eq!(r.u16("a").unwrap(), 1);
        assert_eq!(
            r.u16("b"),
            Err(WireError::Truncated { structure: "tpmt_test", field: "b", offset: 2, needed: 2, available: 1 })
        );
    }

    #[test]
    fn tpm2b_bounded_by_limit_before_input() {
        let mut r = Reader::new("t", &[0xff, 0xff]);
        assert!(matches!(r.tpm2b("x", 64), Err(WireError::TooLarge { value: 0xffff, max: 64, .. })));
        let mut r = Reader::new("t", &[0, 4, 1, 2]);
        assert!(matches!(r.tpm2b("x", 64), Err(WireError::Truncated { needed: 4, available: 2, .. })));
    }

    #[test]
    fn hash_names_round_trip() {
        for h in HashAlg::ALL {
            assert_eq!(HashAlg::from_name(h.name()), Some(h));
            assert_eq!(HashAlg::from_id(h.id()), Some(h));
            assert_eq!(h.digest(b"").len(), h.digest_len());
        }
    }
}
