//! The attestation key and its quotes.

use std::collections::BTreeMap;

use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};

use super::{ek_cert::hex, VerifyError};
use crate::tpm::binding::{self, KeyHash, Mismatch};
use crate::tpm::wire::{
    Attest, Attribute, EccCurve, HashAlg, PcrSelection, Public, PublicKey, Scheme, Signature, WireError,
};

/// TPM_RH_ENDORSEMENT: the qualified name of the endorsement hierarchy is its handle.
const RH_ENDORSEMENT: u32 = 0x4000_000B;

/// The attributes that make a key an AK: created in this TPM and never leaving it, signing
/// only what the TPM itself generated (restricted), never decrypting.
const AK_ATTRIBUTES: [(Attribute, bool); 6] = [
    (Attribute::FixedTpm, true),
    (Attribute::FixedParent, true),
    (Attribute::SensitiveDataOrigin, true),
    (Attribute::Restricted, true),
    (Attribute::Sign, true),
    (Attribute::Decrypt, false),
];

/// Checks that `ak` is a restricted signing key bound to its TPM, of a type and scheme we
/// verify: RSA-2048 with RSASSA or RSAPSS over SHA-256, or ECDSA on P-256/P-384 over
/// SHA-256/384.
pub fn check_ak_attributes(ak: &Public) -> Result<(), VerifyError> {
    let attributes = ak.attributes();
    for (attribute, required) in AK_ATTRIBUTES {
        if attributes.contains(attribute) != required {
            return Err(VerifyError::AkAttribute { attribute, required });
        }
    }
    match (ak.key(), ak.scheme()) {
        (PublicKey::Rsa { key_bits: 2048, modulus, .. }, scheme) => {
            if modulus.len() != 256 {
                return Err(VerifyError::AkKeyUnsupported { found: format!("rsa modulus of {} bytes", modulus.len()) });
            }
            match scheme {
                Some(Scheme::RsaSsa(HashAlg::Sha256) | Scheme::RsaPss(HashAlg::Sha256)) => Ok(()),
                other => Err(scheme_unsupported(other)),
            }
        }
        (PublicKey::Rsa { key_bits, .. }, _) => Err(VerifyError::AkKeyUnsupported { found: format!("rsa-{key_bits}") }),
        (PublicKey::Ecc { curve, x, y, .. }, scheme) => {
            if x.len() > curve.field_len() || y.len() > curve.field_len() {
                return Err(VerifyError::AkKeyUnsupported {
                    found: format!("{curve} point with oversized coordinates"),
                });
            }
            match scheme {
                Some(Scheme::Ecdsa(HashAlg::Sha256 | HashAlg::Sha384)) => Ok(()),
                other => Err(scheme_unsupported(other)),
            }
        }
    }
}

fn scheme_unsupported(scheme: Option<Scheme>) -> VerifyError {
    VerifyError::AkSchemeUnsupported { found: scheme.map_or_else(|| "null".to_owned(), |s| s.to_string()) }
}

/// Qualified name of an EK (a primary key in the endorsement hierarchy).
pub fn ek_qualified_name(ek: &Public) -> Vec<u8> {
    ek.qualified_name(&RH_ENDORSEMENT.to_be_bytes())
}

/// An AK prepared for verifying many quotes: attributes checked once, key material and the
/// expected signer name ready.
#[derive(Debug, Clone)]
pub struct AkVerifier {
    key: AkKey,
    scheme: Scheme,
    qualified_name: Vec<u8>,
}

#[derive(Debug, Clone)]
enum AkKey {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    Ecdsa { curve: EccCurve, point: Vec<u8> },
}

/// What a verified quote says about the TPM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteInfo {
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub safe: bool,
    pub firmware_version: u64,
    pub selection: PcrSelection,
}

impl AkVerifier {
    /// An AK created as a child of `ek` (tpm2_createak, tss-esapi's `create_ak`): quotes name
    /// the signer by its qualified name, which chains through the EK.
    pub fn new(ak: &Public, ek: &Public) -> Result<Self, VerifyError> {
        Self::with_qualified_name(ak, ak.qualified_name(&ek_qualified_name(ek)))
    }

    /// An AK whose qualified name is known otherwise (an AK under another parent).
    pub fn with_qualified_name(ak: &Public, qualified_name: Vec<u8>) -> Result<Self, VerifyError> {
        check_ak_attributes(ak)?;
        let scheme = ak.scheme().ok_or_else(|| scheme_unsupported(None))?;
        let key = match ak.key() {
            PublicKey::Rsa { exponent, modulus, .. } => {
                let e = exponent.to_be_bytes();
                let first = e.iter().position(|b| *b != 0).unwrap_or(e.len() - 1);
                AkKey::Rsa { n: modulus.clone(), e: e.get(first..).unwrap_or(&e).to_vec() }
            }
            PublicKey::Ecc { curve, x, y, .. } => {
                let len = curve.field_len();
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(0x04);
                for c in [x, y] {
                    point.resize(point.len() + len.saturating_sub(c.len()), 0);
                    point.extend_from_slice(c);
                }
                AkKey::Ecdsa { curve: *curve, point }
            }
        };
        Ok(AkVerifier { key, scheme, qualified_name })
    }

    /// The signer name quotes by this AK carry.
    pub fn qualified_name(&self) -> &[u8] {
        &self.qualified_name
    }

    /// Verifies a quote: `signature` by this AK over exactly `attest`, signed by this AK's
    /// qualified name, carrying `nonce`, and selecting exactly the PCRs in `pcrs`, whose
    /// values hash to the quoted digest.
    pub fn verify_quote(
        &self,
        attest: &[u8],
        signature: &[u8],
        nonce: &[u8],
        pcrs: &PcrValues,
    ) -> Result<QuoteInfo, VerifyError> {
        let quote = Attest::parse(attest)?;
        let signature = Signature::parse(signature)?;
        self.verify_signature(attest, &signature)?;
        if quote.qualified_signer != self.qualified_name {
            return Err(VerifyError::SignerMismatch {
                expected: hex(&self.qualified_name),
                found: hex(&quote.qualified_signer),
            });
        }
        if quote.extra_data != nonce {
            return Err(VerifyError::NonceMismatch);
        }
        check_pcrs(&quote.pcr_select, &quote.pcr_digest, signature.hash(), pcrs)?;
        Ok(QuoteInfo {
            clock: quote.clock_info.clock,
            reset_count: quote.clock_info.reset_count,
            restart_count: quote.clock_info.restart_count,
            safe: quote.clock_info.safe,
            firmware_version: quote.firmware_version,
            selection: quote.pcr_select,
        })
    }

    /// [`AkVerifier::verify_quote`] for a quote whose qualifying data binds `key` to `nonce`
    /// (`SHA-256(nonce ‖ key)`, see [`crate::tpm::binding`]). `claimed_key` is the key hash the
    /// node says it bound: it proves nothing, it only lets a mismatch be named (another key:
    /// [`VerifyError::KeyNotCovered`]; the bare nonce: [`VerifyError::KeyNotBound`]; else
    /// [`VerifyError::NonceMismatch`]), and only once the signature has verified.
    pub fn verify_bound_quote(
        &self,
        attest: &[u8],
        signature: &[u8],
        nonce: &[u8],
        key: &KeyHash,
        claimed_key: &[u8],
        pcrs: &PcrValues,
    ) -> Result<QuoteInfo, VerifyError> {
        match self.verify_quote(attest, signature, &binding::qualifying_data(nonce, key), pcrs) {
            Err(VerifyError::NonceMismatch) => {
                let quote = Attest::parse(attest)?;
                Err(match binding::diagnose(&quote.extra_data, nonce, claimed_key) {
                    Mismatch::OtherKey => VerifyError::KeyNotCovered,
                    Mismatch::BareNonce => VerifyError::KeyNotBound,
                    Mismatch::Stale => VerifyError::NonceMismatch,
                })
            }
            other => other,
        }
    }

    fn verify_signature(&self, message: &[u8], given: &Signature) -> Result<(), VerifyError> {
        let ok = match (&self.key, self.scheme, given) {
            (AkKey::Rsa { n, e }, Scheme::RsaSsa(h), Signature::RsaSsa { hash, sig }) if h == *hash => {
                let params = match h {
                    HashAlg::Sha256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    HashAlg::Sha384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    HashAlg::Sha512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    HashAlg::Sha1 => &signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
                };
                RsaPublicKeyComponents { n, e }.verify(params, message, sig).is_ok()
            }
            // The TPM's PSS salt is as long as the digest, which is what ring expects.
            (AkKey::Rsa { n, e }, Scheme::RsaPss(h), Signature::RsaPss { hash, sig }) if h == *hash => {
                let params = match h {
                    HashAlg::Sha256 => &signature::RSA_PSS_2048_8192_SHA256,
                    HashAlg::Sha384 => &signature::RSA_PSS_2048_8192_SHA384,
                    HashAlg::Sha512 => &signature::RSA_PSS_2048_8192_SHA512,
                    HashAlg::Sha1 => return Err(self.scheme_mismatch(given)),
                };
                RsaPublicKeyComponents { n, e }.verify(params, message, sig).is_ok()
            }
            (AkKey::Ecdsa { curve, point }, Scheme::Ecdsa(h), Signature::Ecdsa { hash, r, s }) if h == *hash => {
                // ring has fixed-width (r || s) variants only for matching curve and hash;
                // its ASN.1 variants cover every pairing.
                let alg = match (curve, h) {
                    (EccCurve::NistP256, HashAlg::Sha256) => &signature::ECDSA_P256_SHA256_ASN1,
                    (EccCurve::NistP256, HashAlg::Sha384) => &signature::ECDSA_P256_SHA384_ASN1,
                    (EccCurve::NistP384, HashAlg::Sha256) => &signature::ECDSA_P384_SHA256_ASN1,
                    (EccCurve::NistP384, HashAlg::Sha384) => &signature::ECDSA_P384_SHA384_ASN1,
                    _ => return Err(self.scheme_mismatch(given)),
                };
                match der_rs(curve.field_len(), r, s) {
                    Some(rs) => UnparsedPublicKey::new(alg, point).verify(message, &rs).is_ok(),
                    None => false,
                }
            }
            _ => return Err(self.scheme_mismatch(given)),
        };
        if ok {
            Ok(())
        } else {
            Err(VerifyError::SignatureInvalid)
        }
    }

    fn scheme_mismatch(&self, sig: &Signature) -> VerifyError {
        let found = match sig {
            Signature::RsaSsa { hash, .. } => Scheme::RsaSsa(*hash),
            Signature::RsaPss { hash, .. } => Scheme::RsaPss(*hash),
            Signature::Ecdsa { hash, .. } => Scheme::Ecdsa(*hash),
        };
        VerifyError::SignatureSchemeMismatch { expected: self.scheme.to_string(), found: found.to_string() }
    }
}

/// Verifies a quote by an AK created under `ek`. Prefer [`AkVerifier`] for repeated quotes.
pub fn verify_quote(
    ak: &Public,
    ek: &Public,
    attest: &[u8],
    signature: &[u8],
    nonce: &[u8],
    pcrs: &PcrValues,
) -> Result<QuoteInfo, VerifyError> {
    AkVerifier::new(ak, ek)?.verify_quote(attest, signature, nonce, pcrs)
}

/// ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER } in DER. None if a value is longer
/// than the curve's field (no valid signature has one).
fn der_rs(field_len: usize, r: &[u8], s: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::with_capacity(2 * (field_len + 3));
    for v in [r, s] {
        let first = v.iter().position(|b| *b != 0).unwrap_or(v.len());
        let v = v.get(first..)?;
        if v.len() > field_len {
            return None;
        }
        // A positive INTEGER needs a leading zero when its top bit is set; zero is one 0 byte.
        let pad = v.first().is_none_or(|b| b & 0x80 != 0);
        body.push(0x02);
        body.push(u8::try_from(v.len() + usize::from(pad)).ok()?);
        if pad {
            body.push(0);
        }
        body.extend_from_slice(v);
    }
    // At most 2 * (2 + 1 + 48) bytes: a short-form length.
    let mut out = vec![0x30, u8::try_from(body.len()).ok().filter(|l| *l < 0x80)?];
    out.extend_from_slice(&body);
    Some(out)
}

/// The quoted selection must be exactly the supplied PCRs, and their values, in digest order,
/// must hash (with the signature's hash, as the TPM did) to the quoted digest.
fn check_pcrs(selection: &PcrSelection, digest: &[u8], hash: HashAlg, pcrs: &PcrValues) -> Result<(), VerifyError> {
    let banks = selection.banks();
    for (i, bank) in banks.iter().enumerate() {
        if banks.iter().take(i).any(|b| b.hash == bank.hash) {
            return Err(VerifyError::PcrBankDuplicate { bank: bank.hash });
        }
    }
    let mut ctx = ring::digest::Context::new(hash.ring_digest());
    let mut used = 0usize;
    for (bank, index) in selection.iter() {
        let value = pcrs.get(bank, index).ok_or(VerifyError::PcrValueMissing { bank, index })?;
        ctx.update(value);
        used += 1;
    }
    if used != pcrs.len() {
        if let Some((bank, index)) = pcrs.iter().map(|(b, i, _)| (b, i)).find(|(b, i)| !selection.contains(*b, *i)) {
            return Err(VerifyError::PcrValueNotQuoted { bank, index });
        }
    }
    if ctx.finish().as_ref() != digest {
        return Err(VerifyError::PcrDigestMismatch);
    }
    Ok(())
}

/// PCR values the node reports, by bank and index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PcrValues {
    values: BTreeMap<(HashAlg, u8), Vec<u8>>,
}

impl PcrValues {
    /// PCR indices beyond this do not exist on any TPM (and do not fit a selection).
    pub const MAX_INDEX: u8 = 63;

    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a value; it must be a digest of the bank's size, and each PCR may come once.
    pub fn insert(&mut self, bank: HashAlg, index: u8, value: Vec<u8>) -> Result<(), VerifyError> {
        if index > Self::MAX_INDEX {
            return Err(VerifyError::PcrIndex { bank, index: index.into() });
        }
        if value.len() != bank.digest_len() {
            return Err(VerifyError::PcrValueLength { bank, index, len: value.len() });
        }
        if self.values.contains_key(&(bank, index)) {
            return Err(VerifyError::PcrValueDuplicate { bank, index });
        }
        self.values.insert((bank, index), value);
        Ok(())
    }

    /// [`PcrValues::insert`] for values as the protocol carries them ("sha256", index).
    pub fn insert_named(&mut self, bank: &str, index: u32, value: Vec<u8>) -> Result<(), VerifyError> {
        let hash = HashAlg::from_name(bank)
            .ok_or_else(|| VerifyError::PcrBankUnknown { bank: bank.chars().take(32).collect() })?;
        let index = u8::try_from(index).map_err(|_| VerifyError::PcrIndex { bank: hash, index })?;
        self.insert(hash, index, value)
    }

    pub fn get(&self, bank: HashAlg, index: u8) -> Option<&[u8]> {
        self.values.get(&(bank, index)).map(Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (HashAlg, u8, &[u8])> {
        self.values.iter().map(|((b, i), v)| (*b, *i, v.as_slice()))
    }

    /// The selection covering exactly these values (banks in hash-algorithm order).
    pub fn selection(&self) -> Result<PcrSelection, WireError> {
        let mut selection = PcrSelection::new();
        for (bank, index) in self.values.keys() {
            selection.select(*bank, *index)?;
        }
        Ok(selection)
    }
}

/// What the server remembers of a node's TPM clock from its last accepted quote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockState {
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
}

impl From<&QuoteInfo> for ClockState {
    fn from(q: &QuoteInfo) -> Self {
        ClockState { clock: q.clock, reset_count: q.reset_count, restart_count: q.restart_count }
    }
}

/// How the TPM's clock moved since the last accepted quote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockProgress {
    /// Same boot, clock advanced.
    Advanced,
    /// Resumed from hibernation (TPM restart) since the last quote.
    Resumed,
    /// Rebooted (TPM reset) since the last quote.
    Rebooted,
}

/// A quote must be younger than the last one accepted from the same TPM: its reset and
/// restart counters never go back, and within one boot its clock moves forward.
pub fn check_clock(previous: &ClockState, current: &QuoteInfo) -> Result<ClockProgress, VerifyError> {
    use std::cmp::Ordering::*;
    match current.reset_count.cmp(&previous.reset_count) {
        Greater => return Ok(ClockProgress::Rebooted),
        Less => {
            return Err(VerifyError::ClockResetCountDecreased {
                previous: previous.reset_count,
                current: current.reset_count,
            })
        }
        Equal => {}
    }
    match current.restart_count.cmp(&previous.restart_count) {
        Greater => Ok(ClockProgress::Resumed),
        Less => Err(VerifyError::ClockRestartCountDecreased {
            previous: previous.restart_count,
            current: current.restart_count,
        }),
        Equal if current.clock > previous.clock => Ok(ClockProgress::Advanced),
        Equal => Err(VerifyError::ClockNotAdvanced { previous: previous.clock, current: current.clock }),
    }
}
