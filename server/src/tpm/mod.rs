//! TPM node attestation, the server's half: challenges and their verification. The TPM
//! structures are checked by `tether_attestors::tpm` (pure Rust); this module holds the
//! protocol state (one-time challenges), the golden PCR policy and the node's identity.
//!
//! First attestation (two calls):
//! 1. `BeginAttestation(Hello)`: EK certificate chained to a manufacturer CA, EK public key
//!    equal to the certificate's, AK attributes; a credential bound to the AK's name is made
//!    for the EK, with a fresh nonce and the policy's PCR selection.
//! 2. `Attest(Evidence)`: the activated secret proves the AK is in the EK's TPM; the quote,
//!    signed by that AK over the nonce, proves the PCR values; they must satisfy a golden set.
//!
//! Re-attestation (renewal, interval) is the same without the credential: the AK is known.
//!
//! Every quote's qualifying data binds the nonce to the key the request certifies (the CSR's,
//! or on a bare re-attestation the caller's node SVID's): `tether_attestors::tpm::binding`.
//! Pending challenges and their limits: `challenges`.

pub mod challenges;
pub mod policy;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use prost::Message;
use serde::Deserialize;
use tether_attestors::{
    hex,
    tpm::{
        binding::BoundKey,
        credential,
        verify::{self, AkVerifier, ClockState, QuoteInfo, VerifyError},
        wire,
    },
    Selector, SpiffeId,
};
use tether_proto::tpm as pb;

use challenges::{Challenges, Limits, Refused, Source};
pub use policy::Policy;

pub const ATTESTOR: &str = "tpm";

/// `[tpm]` in the server config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    /// Manufacturer CA certificates (PEM or DER, roots and intermediates) EK certificates
    /// must chain to.
    pub ek_ca_dir: PathBuf,
    /// Golden PCR policies, one TOML file per allowed set (see policy.rs).
    pub policy_dir: PathBuf,
    /// How long a challenge may be answered. Default 60.
    #[serde(default = "default_challenge_ttl")]
    pub challenge_ttl_seconds: u64,
    /// First-attestation challenges pending on the whole server; more are refused. Default
    /// 4096.
    #[serde(default = "default_max_pending")]
    pub max_pending_challenges: usize,
    /// First-attestation challenges pending per EK; a new one evicts that EK's oldest (the
    /// oldest asked from the same address first). Default 4.
    #[serde(default = "default_per_ek")]
    pub max_pending_challenges_per_ek: usize,
    /// First-attestation challenges pending per source address (IPv4 address, IPv6 /64); more
    /// are refused. Default 64. Behind a proxy every node shares its address: raise it.
    #[serde(default = "default_per_source")]
    pub max_pending_challenges_per_source: usize,
    /// Re-attestation challenges pending per attested node, in their own table; a new one
    /// evicts that node's oldest. Default 2.
    #[serde(default = "default_per_node")]
    pub max_pending_reattestations_per_node: usize,
    /// A TPM node whose last verified quote is older than this is refused service (it has
    /// stopped re-attesting). Default 0: the node SVID lifetime.
    #[serde(default)]
    pub max_evidence_age_seconds: i64,
}

fn default_challenge_ttl() -> u64 {
    60
}
fn default_max_pending() -> usize {
    4096
}
fn default_per_ek() -> usize {
    4
}
fn default_per_source() -> usize {
    64
}
fn default_per_node() -> usize {
    2
}

impl TpmConfig {
    /// The challenge table's bounds.
    pub fn limits(&self) -> Limits {
        Limits {
            ttl: Duration::from_secs(self.challenge_ttl_seconds),
            max_pending: self.max_pending_challenges,
            per_ek: self.max_pending_challenges_per_ek,
            per_source: self.max_pending_challenges_per_source,
            per_node: self.max_pending_reattestations_per_node,
        }
    }
}

/// Why TPM evidence was refused. Each is its own message: operators read these in logs.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("malformed {what}: {message}")]
    Malformed { what: &'static str, message: String },
    #[error("EK certificate: {0}")]
    EkCertificate(String),
    #[error("EK public key does not match its certificate: {0}")]
    EkMismatch(String),
    #[error("attestation key: {0}")]
    AkAttributes(String),
    #[error("credential activation failed: the AK is not in the same TPM as the EK")]
    Activation,
    #[error("unknown, expired, evicted or already used challenge (replayed attestation?)")]
    UnknownChallenge,
    #[error("node {0} is banned")]
    Banned(String),
    /// A first-attestation challenge refused by a limit; `key` is its name in `[tpm]`.
    #[error(
        "too many pending TPM challenges {scope} (limit tpm.{key} = {limit}): answer them or let them expire ({ttl} s)"
    )]
    TooManyChallenges { scope: String, key: &'static str, limit: usize, ttl: u64 },
    #[error("quote: {0}")]
    Quote(String),
    /// The quote answers this challenge for another key than the one the request certifies.
    #[error("quote does not cover {key}: it answers this challenge for another key (relayed evidence?)")]
    KeyNotCovered { key: &'static str },
    #[error("quote does not cover {key}: its qualifying data is the bare nonce (an agent from before key binding?)")]
    KeyNotBound { key: &'static str },
    #[error("{0}")]
    Binding(#[from] tether_attestors::tpm::binding::BindingError),
    #[error("TPM clock: {0}")]
    Clock(String),
    #[error("{0}")]
    OutsidePolicy(#[from] policy::OutsidePolicy),
    #[error("golden PCR policy unavailable: {0}")]
    Policy(#[from] policy::PolicyError),
    #[error("EK CA directory: {0}")]
    CaStore(String),
    #[error("making the credential: {0}")]
    Credential(String),
}

fn malformed(what: &'static str) -> impl FnOnce(String) -> TpmError {
    move |message| TpmError::Malformed { what, message }
}

/// What a first attestation established.
#[derive(Debug)]
pub struct Attested {
    pub node_id: SpiffeId,
    pub ek_hash: String,
    pub ak: AkRecord,
    pub selectors: Vec<Selector>,
    pub quote: QuoteInfo,
}

/// The AK as re-attestations need it: its public area and its qualified name (quotes name
/// their signer by it; it chains through the EK, so the EK need not be kept).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AkRecord {
    pub public: Vec<u8>,
    pub qualified_name: Vec<u8>,
}

enum PendingKind {
    First {
        ek_hash: String,
        ca_subject: String,
        ek_kind: String,
        ak: AkRecord,
        secret: Vec<u8>,
    },
    /// The node it belongs to is its row in the re-attestation table.
    Again,
}

struct Pending {
    kind: PendingKind,
    nonce: Vec<u8>,
    policy: Policy,
}

pub struct TpmAttestor {
    pub config: TpmConfig,
    cas: verify::EkCaStore,
    pending: Mutex<Challenges<Pending>>,
}

fn random(n: usize) -> Result<Vec<u8>, TpmError> {
    let mut b = vec![0; n];
    getrandom::fill(&mut b).map_err(|e| TpmError::Credential(e.to_string()))?;
    Ok(b)
}

/// `spiffe://<td>/tether/agent/tpm/<ek-hash>`: the same EK always gets the same ID.
pub fn node_id(trust_domain: &str, ek_hash: &str) -> Option<SpiffeId> {
    SpiffeId::from_parts(trust_domain, &["tether", "agent", ATTESTOR, ek_hash]).ok()
}

impl TpmAttestor {
    /// Loads the CA directory and checks the policy directory at start-up (the policy is
    /// re-read for every attestation, so a rollout's new file needs no restart).
    pub fn new(config: TpmConfig) -> Result<Self, TpmError> {
        let cas = verify::EkCaStore::load_dir(&config.ek_ca_dir).map_err(|e| TpmError::CaStore(e.to_string()))?;
        Policy::load_dir(&config.policy_dir)?;
        let pending = Mutex::new(Challenges::new(config.limits()));
        Ok(TpmAttestor { config, cas, pending })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Challenges<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parks a first-attestation challenge for `ek_hash`, asked from `source`.
    fn park_first(
        &self,
        kind: PendingKind,
        ek_hash: &str,
        source: Source,
        policy: Policy,
    ) -> Result<(String, Vec<u8>), TpmError> {
        let id = hex::encode(&random(16)?);
        let nonce = random(32)?;
        let pending = Pending { kind, nonce: nonce.clone(), policy };
        let limits = self.config.limits();
        let inserted = self.pending().insert_first(Instant::now(), id.clone(), ek_hash, source, pending);
        match inserted {
            Ok(Some(evicted)) => {
                tracing::info!(
                    ek_hash,
                    source = %source,
                    evicted_from = %evicted.source,
                    "TPM challenge evicted: its EK asked for a newer one"
                );
            }
            Ok(None) => {}
            Err(refused) => {
                let (scope, key, limit) = match refused {
                    Refused::Source { source, limit } => {
                        (format!("from {source}"), "max_pending_challenges_per_source", limit)
                    }
                    Refused::Server { limit } => ("on this server".to_owned(), "max_pending_challenges", limit),
                };
                return Err(TpmError::TooManyChallenges { scope, key, limit, ttl: limits.ttl.as_secs() });
            }
        }
        Ok((id, nonce))
    }

    fn selection(policy: &Policy) -> pb::PcrSelection {
        pb::PcrSelection { bank: policy.bank.clone(), pcrs: policy.selection() }
    }

    /// Step 1 of a first attestation, asked from `source`. Returns (challenge id, encoded
    /// `tpm.Challenge`).
    pub fn begin(
        &self,
        trust_domain: &str,
        hello: &[u8],
        source: Source,
        now_unix: i64,
        banned: impl FnOnce(&SpiffeId) -> bool,
    ) -> Result<(String, Vec<u8>), TpmError> {
        let hello = pb::Hello::decode(hello).map_err(|e| malformed("hello")(e.to_string()))?;
        let ek =
            wire::Public::parse(&hello.ek_public).map_err(|e| malformed("EK public (TPMT_PUBLIC)")(e.to_string()))?;
        let ak =
            wire::Public::parse(&hello.ak_public).map_err(|e| malformed("AK public (TPMT_PUBLIC)")(e.to_string()))?;
        let cert = verify::verify_ek_certificate(&self.cas, &hello.ek_certificate, &hello.ek_intermediates, now_unix)
            .map_err(|e| TpmError::EkCertificate(e.to_string()))?;
        verify::check_ek_matches_certificate(&ek, &cert).map_err(|e| TpmError::EkMismatch(e.to_string()))?;
        // Checks the AK's attributes too.
        let ak_verifier = AkVerifier::new(&ak, &ek).map_err(|e| TpmError::AkAttributes(e.to_string()))?;
        let ek_hash = cert.ek_hash.clone();
        let id =
            node_id(trust_domain, &ek_hash).ok_or_else(|| TpmError::EkCertificate("cannot form a node ID".into()))?;
        // Before any work for it: a banned EK gets no credential.
        if banned(&id) {
            return Err(TpmError::Banned(id.to_string()));
        }
        let policy = Policy::load_dir(&self.config.policy_dir)?;
        let secret = random(32)?;
        let made =
            credential::make_credential(&ek, &ak.name(), &secret).map_err(|e| TpmError::Credential(e.to_string()))?;
        let ek_kind = match ek.key() {
            wire::PublicKey::Rsa { key_bits, .. } => format!("rsa-{key_bits}"),
            wire::PublicKey::Ecc { curve, .. } => format!("ecc-{}", curve_name(*curve)),
        };
        let kind = PendingKind::First {
            ek_hash: ek_hash.clone(),
            ca_subject: cert.anchor_subject.clone(),
            ek_kind,
            ak: AkRecord { public: hello.ak_public, qualified_name: ak_verifier.qualified_name().to_vec() },
            secret,
        };
        let selection = Self::selection(&policy);
        let (id, nonce) = self.park_first(kind, &ek_hash, source, policy)?;
        let challenge = pb::Challenge {
            credential_blob: made.credential_blob,
            encrypted_secret: made.encrypted_secret,
            nonce,
            pcrs: Some(selection),
        };
        Ok((id, challenge.encode_to_vec()))
    }

    /// Step 1 of a re-attestation by an already attested node (authenticated by its node
    /// SVID). Its challenges have their own row: never refused, never evicted by others.
    pub fn begin_again(&self, node_id: &SpiffeId) -> Result<(String, Vec<u8>), TpmError> {
        let policy = Policy::load_dir(&self.config.policy_dir)?;
        let selection = Self::selection(&policy);
        let id = hex::encode(&random(16)?);
        let nonce = random(32)?;
        let pending = Pending { kind: PendingKind::Again, nonce: nonce.clone(), policy };
        let evicted = self.pending().insert_again(Instant::now(), id.clone(), &node_id.to_string(), pending);
        if let Some(evicted) = evicted {
            tracing::info!(
                node = %node_id,
                evicted,
                "TPM re-attestation challenge evicted: the node asked for a newer one"
            );
        }
        let challenge = pb::Challenge { nonce, pcrs: Some(selection), ..Default::default() };
        Ok((id, challenge.encode_to_vec()))
    }

    /// Step 2 of a first attestation, for the node SVID the CSR `csr` asks for (the quote
    /// must cover its key). `previous` looks up the clock state last recorded for an EK hash
    /// (a node seen before).
    pub fn finish(
        &self,
        trust_domain: &str,
        challenge_id: &str,
        evidence: &[u8],
        csr: &[u8],
        previous: impl FnOnce(&str) -> Option<ClockState>,
    ) -> Result<Attested, TpmError> {
        // Taken out whether or not it verifies: a challenge is answered once.
        let pending = self.pending().take_first(Instant::now(), challenge_id).ok_or(TpmError::UnknownChallenge)?;
        let PendingKind::First { ek_hash, ca_subject, ek_kind, ak, secret } = &pending.kind else {
            return Err(TpmError::UnknownChallenge);
        };
        let ev = pb::Evidence::decode(evidence).map_err(|e| malformed("evidence")(e.to_string()))?;
        if !constant_time_eq(&ev.activated_secret, secret) {
            return Err(TpmError::Activation);
        }
        let (matched, quote) =
            check_quote(ak, &pending.policy, &pending.nonce, BoundKey::Csr(csr), &ev, previous(ek_hash))?;
        let node_id =
            node_id(trust_domain, ek_hash).ok_or_else(|| TpmError::EkCertificate("cannot form a node ID".into()))?;
        let mut selectors = vec![
            Selector::new(ATTESTOR, format!("ek-hash:{ek_hash}")),
            Selector::new(ATTESTOR, format!("ca-subject:{ca_subject}")),
            Selector::new(ATTESTOR, format!("ek-type:{ek_kind}")),
        ];
        selectors.extend(matched.iter().map(|m| Selector::new(ATTESTOR, format!("policy:{m}"))));
        Ok(Attested { node_id, ek_hash: ek_hash.clone(), ak: ak.clone(), selectors, quote })
    }

    /// Step 2 of a re-attestation: the node that asked, the key the quote must cover (the
    /// renewal's CSR, or the node SVID the caller authenticated with), its stored AK and clock
    /// state.
    pub fn finish_again(
        &self,
        caller: &SpiffeId,
        challenge_id: &str,
        evidence: &[u8],
        bound: BoundKey<'_>,
        ak: &AkRecord,
        previous: ClockState,
    ) -> Result<(Vec<String>, QuoteInfo), TpmError> {
        let pending = self
            .pending()
            .take_again(Instant::now(), &caller.to_string(), challenge_id)
            .ok_or(TpmError::UnknownChallenge)?;
        if !matches!(pending.kind, PendingKind::Again) {
            return Err(TpmError::UnknownChallenge);
        }
        let ev = pb::Evidence::decode(evidence).map_err(|e| malformed("evidence")(e.to_string()))?;
        check_quote(ak, &pending.policy, &pending.nonce, bound, &ev, Some(previous))
    }
}

/// A quote by `ak` over `nonce` bound to the key `bound`, its PCR values exactly the policy's
/// selection, against the golden sets; the clock after `previous`. Returns the names of the
/// sets matched.
fn check_quote(
    ak: &AkRecord,
    policy: &Policy,
    nonce: &[u8],
    bound: BoundKey<'_>,
    ev: &pb::Evidence,
    previous: Option<ClockState>,
) -> Result<(Vec<String>, QuoteInfo), TpmError> {
    let key = bound.key_hash()?;
    let public = wire::Public::parse(&ak.public).map_err(|e| malformed("AK public (TPMT_PUBLIC)")(e.to_string()))?;
    let verifier = AkVerifier::with_qualified_name(&public, ak.qualified_name.clone())
        .map_err(|e| TpmError::AkAttributes(e.to_string()))?;
    let mut values = verify::PcrValues::new();
    let mut bank_values = BTreeMap::new();
    for v in &ev.pcr_values {
        if v.bank != policy.bank {
            return Err(TpmError::Quote(format!("PCR {} of bank {:?} was not asked for", v.index, v.bank)));
        }
        values.insert_named(&v.bank, v.index, v.value.clone()).map_err(|e| TpmError::Quote(e.to_string()))?;
        bank_values.insert(v.index, v.value.clone());
    }
    let want: Vec<u32> = policy.selection();
    let got: Vec<u32> = bank_values.keys().copied().collect();
    if want != got {
        return Err(TpmError::Quote(format!("PCRs {got:?} sent, {want:?} asked for")));
    }
    let info = verifier
        .verify_bound_quote(&ev.quote, &ev.signature, nonce, &key, &ev.bound_key_sha256, &values)
        .map_err(|e| match e {
            VerifyError::KeyNotCovered => TpmError::KeyNotCovered { key: bound.describe() },
            VerifyError::KeyNotBound => TpmError::KeyNotBound { key: bound.describe() },
            e => TpmError::Quote(e.to_string()),
        })?;
    if let Some(prev) = previous {
        verify::check_clock(&prev, &info).map_err(|e| TpmError::Clock(e.to_string()))?;
    }
    let matched = policy.evaluate(&bank_values)?;
    Ok((matched, info))
}

/// `tether-server tpm check-quote`: a node's evidence checked offline, as an attestation
/// checks it (AK attributes and name under the EK, quote signature, nonce bound to the CSR's
/// key, PCR digest, golden policy), except what needs the live exchange (EK certificate
/// chain, credential activation, the clock against earlier quotes). `hello` and `evidence`
/// are the node API's encoded `tpm.Hello` and `tpm.Evidence` (`tether-agent tpm quote`
/// writes them), `csr` the PKCS#10 DER the quote was made for. Returns the golden sets
/// matched.
pub fn check_offline(
    hello: &[u8],
    evidence: &[u8],
    nonce: &[u8],
    csr: &[u8],
    policy_dir: &Path,
) -> Result<Vec<String>, TpmError> {
    let hello = pb::Hello::decode(hello).map_err(|e| malformed("hello")(e.to_string()))?;
    let ev = pb::Evidence::decode(evidence).map_err(|e| malformed("evidence")(e.to_string()))?;
    let ek = wire::Public::parse(&hello.ek_public).map_err(|e| malformed("EK public (TPMT_PUBLIC)")(e.to_string()))?;
    let ak = wire::Public::parse(&hello.ak_public).map_err(|e| malformed("AK public (TPMT_PUBLIC)")(e.to_string()))?;
    let qualified_name =
        AkVerifier::new(&ak, &ek).map_err(|e| TpmError::AkAttributes(e.to_string()))?.qualified_name().to_vec();
    let record = AkRecord { public: hello.ak_public, qualified_name };
    let policy = Policy::load_dir(policy_dir)?;
    check_quote(&record, &policy, nonce, BoundKey::Csr(csr), &ev, None).map(|(matched, _)| matched)
}

fn curve_name(c: wire::EccCurve) -> &'static str {
    match c {
        wire::EccCurve::NistP256 => "p256",
        wire::EccCurve::NistP384 => "p384",
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
