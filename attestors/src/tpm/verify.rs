//! The server's checks of a node's TPM evidence, in pure Rust:
//! - the EK certificate chains to a trusted manufacturer CA ([`verify_ek_certificate`]) and
//!   certifies the EK the node presents ([`check_ek_matches_certificate`]);
//! - the AK is a restricted signing key fixed to its TPM ([`check_ak_attributes`]);
//! - a quote is signed by that AK, names it as signer, carries our nonce and covers exactly the
//!   reported PCR values ([`AkVerifier::verify_quote`]); in the node API the nonce is bound to
//!   the key the request certifies ([`AkVerifier::verify_bound_quote`], `super::binding`);
//! - the TPM clock moved forward since the last accepted quote ([`check_clock`]).

mod ek_cert;
mod quote;

use std::path::PathBuf;

use thiserror::Error;

use super::wire::{Attribute, HashAlg, WireError};

pub use ek_cert::{check_ek_matches_certificate, ek_hash, verify_ek_certificate, EkCaStore, EkCertKey, EkCertificate};
pub use quote::{
    check_ak_attributes, check_clock, ek_qualified_name, verify_quote, AkVerifier, ClockProgress, ClockState,
    PcrValues, QuoteInfo,
};

/// Why TPM evidence was refused.
#[derive(Debug, Error)]
pub enum VerifyError {
    // --- trusted CA configuration ---
    /// A CA file or directory could not be read.
    #[error("reading ek ca {}", path.display())]
    CaFile { path: PathBuf, source: std::io::Error },
    /// A configured CA is not a usable CA certificate.
    #[error("ek ca {origin}: {reason}")]
    CaCertificate { origin: String, reason: String },
    #[error("no ek ca certificates in {origin}")]
    CaStoreEmpty { origin: String },

    // --- EK certificate ---
    #[error("ek certificate does not parse: {reason}")]
    EkCertificateMalformed { reason: String },
    #[error("ek intermediate certificate #{index} does not parse: {reason}")]
    IntermediateMalformed { index: usize, reason: String },
    /// No trusted CA (directly or through the supplied intermediates) issued the certificate.
    #[error("unknown ek ca: {issuer} is not a trusted manufacturer ca and no intermediate leads to one")]
    UnknownEkCa { issuer: String },
    /// A certificate names a known issuer but its signature does not verify with its key.
    #[error("signature on certificate {subject} does not verify with its issuer's key")]
    CertificateSignature { subject: String },
    #[error("certificate {subject} cannot issue certificates: {reason}")]
    IssuerNotCa { subject: String, reason: &'static str },
    #[error("certificate {subject} expired at {not_after} (unix time)")]
    CertificateExpired { subject: String, not_after: i64 },
    #[error("certificate {subject} is not valid before {not_before} (unix time)")]
    CertificateNotYetValid { subject: String, not_before: i64 },
    #[error("certificate {subject} has a critical extension {oid} that is not understood")]
    UnhandledCriticalExtension { subject: String, oid: String },
    #[error("ek chain longer than {max} intermediates")]
    ChainTooLong { max: usize },
    #[error("ek certificate key unsupported: {reason}")]
    EkCertificateKey { reason: &'static str },
    /// The EK public area is not the key the certificate certifies.
    #[error("ek public key does not match the ek certificate")]
    EkCertificateMismatch,

    // --- AK ---
    /// An AK attribute has the wrong value, e.g. `fixedTPM` clear or `decrypt` set.
    #[error("ak attribute {attribute} must be {}", if *required { "set" } else { "clear" })]
    AkAttribute { attribute: Attribute, required: bool },
    #[error("ak key {found} is unsupported (need rsa-2048 or ecc nist-p256/p384)")]
    AkKeyUnsupported { found: String },
    #[error("ak signing scheme {found} is unsupported (need rsassa/rsapss-sha256 or ecdsa-sha256/sha384)")]
    AkSchemeUnsupported { found: String },

    // --- quote ---
    /// A TPM structure is truncated, malformed, or of the wrong magic or type.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The signature uses another scheme than the AK's (a restricted key signs only with its own).
    #[error("quote signed with {found}, but the ak signs with {expected}")]
    SignatureSchemeMismatch { expected: String, found: String },
    /// Signed by another key, or the quote or signature was altered.
    #[error("quote signature does not verify with the ak")]
    SignatureInvalid,
    /// Signed by the AK but naming another signer (the AK is not under the expected EK).
    #[error("quote signer {found} is not the ak's qualified name {expected}")]
    SignerMismatch { expected: String, found: String },
    /// The quote answers another challenge: stale or replayed.
    #[error("quote nonce does not match the challenge (stale or replayed quote)")]
    NonceMismatch,
    /// It answers this challenge but binds another public key than the request's: the
    /// evidence was taken from the node it was made for and sent with another CSR (a relay).
    #[error(
        "quote does not cover the key to be certified: it answers this challenge for another key (relayed evidence?)"
    )]
    KeyNotCovered,
    /// Its qualifying data is the bare nonce: it binds no key at all.
    #[error("quote binds no key: its qualifying data is the bare nonce (an agent from before key binding?)")]
    KeyNotBound,
    #[error("quote selects pcr bank {bank} twice")]
    PcrBankDuplicate { bank: HashAlg },
    #[error("quote covers pcr {bank}:{index} but no value was reported for it")]
    PcrValueMissing { bank: HashAlg, index: u8 },
    #[error("pcr {bank}:{index} was reported but the quote does not cover it")]
    PcrValueNotQuoted { bank: HashAlg, index: u8 },
    /// The reported PCR values are not the ones the TPM quoted.
    #[error("reported pcr values do not match the quoted pcr digest")]
    PcrDigestMismatch,
    #[error("pcr {bank}:{index} value of {len} bytes is not a {bank} digest")]
    PcrValueLength { bank: HashAlg, index: u8, len: usize },
    #[error("pcr {bank}:{index} reported twice")]
    PcrValueDuplicate { bank: HashAlg, index: u8 },
    #[error("pcr index {index} in bank {bank} out of range")]
    PcrIndex { bank: HashAlg, index: u32 },
    #[error("unknown pcr bank {bank:?}")]
    PcrBankUnknown { bank: String },

    // --- clock ---
    /// The quote is from an earlier boot than the last accepted one: a replay.
    #[error("tpm reset count went back from {previous} to {current}: quote from before a reboot (replayed)")]
    ClockResetCountDecreased { previous: u32, current: u32 },
    #[error("tpm restart count went back from {previous} to {current} within one boot (replayed)")]
    ClockRestartCountDecreased { previous: u32, current: u32 },
    #[error("tpm clock did not advance ({current} ms after {previous} ms in the same boot): replayed quote")]
    ClockNotAdvanced { previous: u64, current: u64 },
}
