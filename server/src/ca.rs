//! The trust domain's signing authorities: X.509 CAs and JWT keys, with rotation.
//!
//! Rotation follows the schedule SPIRE users know: the next authority is prepared (and
//! published in the bundle) at half the active one's life, activated when a sixth of that
//! life remains, and the old one stays in the bundle until it expires, so SVIDs it signed keep
//! validating.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64URL, Engine};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use ring::{
    rand::SystemRandom,
    signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use serde::{Deserialize, Serialize};
use tether_attestors::SpiffeId;
use thiserror::Error;
use time::OffsetDateTime;

/// SVIDs start this far in the past, for clock skew between hosts.
pub const BACKDATE_SECONDS: i64 = 10;

#[derive(Debug, Error)]
pub enum CaError {
    #[error("certificate building: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the CSR is malformed or its signature does not verify: {0}")]
    BadCsr(rcgen::Error),
    #[error("JWT key: {0}")]
    Jwt(String),
    #[error("time out of range")]
    Time,
    #[error("upstream CA: {0}")]
    Upstream(String),
}

fn unix_time(secs: i64) -> Result<OffsetDateTime, CaError> {
    OffsetDateTime::from_unix_timestamp(secs).map_err(|_| CaError::Time)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    let _ = getrandom::fill(&mut bytes);
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn b64_ser<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&B64URL.encode(v))
}
fn b64_de<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = String::deserialize(d)?;
    B64URL.decode(s).map_err(serde::de::Error::custom)
}

/// One X.509 signing authority.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct X509Authority {
    #[serde(serialize_with = "b64_ser", deserialize_with = "b64_de")]
    pub cert_der: Vec<u8>,
    #[serde(serialize_with = "b64_ser", deserialize_with = "b64_de")]
    key_pkcs8: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    /// With an upstream CA: the certificates between this CA and the upstream root (sent
    /// after the leaf in every SVID chain), and the upstream root (what the bundle trusts).
    #[serde(default)]
    pub upstream_chain: Vec<Vec<u8>>,
    #[serde(default)]
    pub upstream_root: Option<Vec<u8>>,
    /// Parsed once: parsing the key and certificate per signature cost a third of the
    /// issuance rate (B9).
    #[serde(skip)]
    issuer: std::sync::Arc<std::sync::OnceLock<Issuer<'static, KeyPair>>>,
}

impl X509Authority {
    /// A P-256 CA for `trust_domain`, carrying the trust domain's SPIFFE ID: self-signed, or
    /// an intermediate signed by `upstream` (never outliving it).
    pub fn generate(trust_domain: &str, now: i64, ttl: i64, upstream: Option<&UpstreamCa>) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let not_after = upstream.map_or(now + ttl, |u| (now + ttl).min(u.not_after));
        let params = ca_params(trust_domain, now, not_after - now)?;
        let (cert, upstream_chain, upstream_root) = match upstream {
            None => (params.self_signed(&key)?, Vec::new(), None),
            Some(u) => (params.signed_by(&key, &u.issuer()?)?, u.intermediates.clone(), Some(u.root.clone())),
        };
        Ok(X509Authority {
            cert_der: cert.der().to_vec(),
            key_pkcs8: key.serialize_der(),
            not_before: now - BACKDATE_SECONDS,
            not_after,
            upstream_chain,
            upstream_root,
            issuer: Default::default(),
        })
    }

    /// What relying parties trust for this authority.
    pub fn trust_anchor(&self) -> &[u8] {
        self.upstream_root.as_deref().unwrap_or(&self.cert_der)
    }

    fn issuer(&self) -> Result<&Issuer<'static, KeyPair>, CaError> {
        if let Some(issuer) = self.issuer.get() {
            return Ok(issuer);
        }
        let key = KeyPair::try_from(self.key_pkcs8.as_slice())?;
        let issuer = Issuer::from_ca_cert_der(&self.cert_der.as_slice().into(), key)?;
        Ok(self.issuer.get_or_init(|| issuer))
    }
}

/// An upstream CA from disk: Tether's CAs become its intermediates, and the bundle carries the
/// upstream root instead of a self-signed Tether root.
#[derive(Clone, Debug)]
pub struct UpstreamCa {
    cert_der: Vec<u8>,
    key_pkcs8: Vec<u8>,
    /// Certificates between the upstream signing certificate and the root, signing cert first.
    intermediates: Vec<Vec<u8>>,
    root: Vec<u8>,
    not_after: i64,
}

impl UpstreamCa {
    /// `cert_pem`: the signing CA certificate, optionally followed by its chain up to the
    /// root; `key_pem`: its PKCS#8 private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let bad = |m: &str| CaError::Upstream(m.to_owned());
        let mut certs = Vec::new();
        for pem in x509_parser::pem::Pem::iter_from_buffer(cert_pem.as_bytes()) {
            let pem = pem.map_err(|e| bad(&format!("certificate PEM: {e}")))?;
            certs.push(pem.contents);
        }
        let first = certs.first().ok_or_else(|| bad("no certificate in the certificate file"))?.clone();
        let (_, parsed) = x509_parser::parse_x509_certificate(&first).map_err(|e| bad(&format!("certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(bad("the upstream certificate is not a CA (basicConstraints cA=false)"));
        }
        let not_after = parsed.validity().not_after.timestamp();
        let key = KeyPair::from_pem(key_pem).map_err(|e| bad(&format!("private key: {e}")))?;
        if rcgen::PublicKeyData::subject_public_key_info(&key) != parsed.public_key().raw {
            return Err(bad("the private key does not match the upstream certificate"));
        }
        let root = certs.last().cloned().unwrap_or_else(|| first.clone());
        let intermediates = if certs.len() > 2 { certs[1..certs.len() - 1].to_vec() } else { Vec::new() };
        let intermediates = if certs.len() >= 2 { [vec![first.clone()], intermediates].concat() } else { Vec::new() };
        Ok(UpstreamCa { cert_der: first, key_pkcs8: key.serialize_der(), intermediates, root, not_after })
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, CaError> {
        let key = KeyPair::try_from(self.key_pkcs8.as_slice())?;
        Ok(Issuer::from_ca_cert_der(&self.cert_der.as_slice().into(), key)?)
    }
}

fn ca_params(trust_domain: &str, now: i64, ttl: i64) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tether");
    dn.push(DnType::CommonName, format!("{trust_domain} CA {now}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    params.not_before = unix_time(now - BACKDATE_SECONDS)?;
    params.not_after = unix_time(now + ttl)?;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// One JWT signing key (ES256).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JwtKey {
    pub kid: String,
    #[serde(serialize_with = "b64_ser", deserialize_with = "b64_de")]
    pkcs8: Vec<u8>,
    pub not_after: i64,
}

impl JwtKey {
    pub fn generate(now: i64, ttl: i64) -> Result<Self, CaError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|e| CaError::Jwt(e.to_string()))?;
        let mut kid = [0u8; 16];
        getrandom::fill(&mut kid).map_err(|e| CaError::Jwt(e.to_string()))?;
        Ok(JwtKey { kid: B64URL.encode(kid), pkcs8: pkcs8.as_ref().to_vec(), not_after: now + ttl })
    }

    fn pair(&self) -> Result<EcdsaKeyPair, CaError> {
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &self.pkcs8, &SystemRandom::new())
            .map_err(|e| CaError::Jwt(e.to_string()))
    }

    /// The public key as a JWK for the bundle.
    pub fn jwk(&self) -> Result<serde_json::Value, CaError> {
        let pair = self.pair()?;
        let point = pair.public_key().as_ref(); // 0x04 || X || Y
        Ok(serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": self.kid,
            "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..65]),
        }))
    }

    /// A compact JWS (ES256) over `claims`, signed by the `jsonwebtoken` crate.
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String, CaError> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, claims, &jsonwebtoken::EncodingKey::from_ec_der(&self.pkcs8))
            .map_err(|e| CaError::Jwt(e.to_string()))
    }
}

/// Something with a validity window that rotates.
pub trait Rotating: Sized {
    fn not_after(&self) -> i64;
}
impl Rotating for X509Authority {
    fn not_after(&self) -> i64 {
        self.not_after
    }
}
impl Rotating for JwtKey {
    fn not_after(&self) -> i64 {
        self.not_after
    }
}

/// Active, prepared and retired authorities of one kind.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Slots<T> {
    pub active: T,
    pub prepared: Option<T>,
    pub retired: Vec<T>,
}

impl<T: Rotating> Slots<T> {
    /// Advances the schedule; true when the published set changed.
    fn rotate(&mut self, now: i64, ttl: i64, make: impl FnOnce() -> Result<T, CaError>) -> Result<bool, CaError> {
        let mut changed = false;
        let end = self.active.not_after();
        let start = end - ttl;
        if self.prepared.is_none() && now >= start + ttl / 2 {
            self.prepared = Some(make()?);
            changed = true;
        }
        if now >= end - ttl / 6 {
            if let Some(next) = self.prepared.take() {
                let old = std::mem::replace(&mut self.active, next);
                self.retired.push(old);
                changed = true;
            }
        }
        let before = self.retired.len();
        self.retired.retain(|a| a.not_after() > now);
        Ok(changed || before != self.retired.len())
    }

    fn all(&self) -> impl Iterator<Item = &T> {
        std::iter::once(&self.active).chain(self.prepared.iter()).chain(self.retired.iter())
    }
}

/// The whole authority state, persisted by the store as one JSON document.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaState {
    pub trust_domain: String,
    pub ttl: i64,
    pub x509: Slots<X509Authority>,
    pub jwt: Slots<JwtKey>,
    /// `spiffe_sequence` of the bundle: bumped whenever its contents change.
    pub sequence: i64,
    /// Loaded from disk at start, never stored.
    #[serde(skip)]
    pub upstream: Option<UpstreamCa>,
}

/// What an issued X.509-SVID is for.
pub struct SvidRequest<'a> {
    pub spiffe_id: &'a SpiffeId,
    pub ttl: i64,
    pub dns_names: &'a [String],
}

impl CaState {
    pub fn new(trust_domain: &str, now: i64, ttl: i64) -> Result<Self, CaError> {
        Self::with_upstream(trust_domain, now, ttl, None)
    }

    pub fn with_upstream(
        trust_domain: &str,
        now: i64,
        ttl: i64,
        upstream: Option<UpstreamCa>,
    ) -> Result<Self, CaError> {
        Ok(CaState {
            trust_domain: trust_domain.into(),
            ttl,
            x509: Slots {
                active: X509Authority::generate(trust_domain, now, ttl, upstream.as_ref())?,
                prepared: None,
                retired: Vec::new(),
            },
            jwt: Slots { active: JwtKey::generate(now, ttl)?, prepared: None, retired: Vec::new() },
            sequence: 1,
            upstream,
        })
    }

    /// Applies the configured upstream CA (or its absence). If the active CA was not issued
    /// under it, a new one is activated now; the old stays in the bundle until it expires.
    pub fn set_upstream(&mut self, upstream: Option<UpstreamCa>, now: i64) -> Result<(), CaError> {
        let wanted = upstream.as_ref().map(|u| u.root.clone());
        self.upstream = upstream;
        if self.x509.active.upstream_root != wanted {
            let next = X509Authority::generate(&self.trust_domain, now, self.ttl, self.upstream.as_ref())?;
            let old = std::mem::replace(&mut self.x509.active, next);
            self.x509.retired.push(old);
            self.x509.prepared = None;
            self.sequence += 1;
        }
        Ok(())
    }

    /// Runs the rotation schedule; true when the bundle changed (and its sequence moved).
    pub fn rotate(&mut self, now: i64) -> Result<bool, CaError> {
        let (td, ttl) = (self.trust_domain.clone(), self.ttl);
        let upstream = self.upstream.clone();
        let x = self.x509.rotate(now, ttl, || X509Authority::generate(&td, now, ttl, upstream.as_ref()))?;
        let j = self.jwt.rotate(now, ttl, || JwtKey::generate(now, ttl))?;
        if x || j {
            self.sequence += 1;
        }
        Ok(x || j)
    }

    /// DER root certificates to trust: those of the active, prepared and not yet expired
    /// retired CAs (the upstream root, once, when there is one).
    pub fn x509_authorities(&self) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        for a in self.x509.all() {
            if !out.iter().any(|c| c.as_slice() == a.trust_anchor()) {
                out.push(a.trust_anchor().to_vec());
            }
        }
        out
    }

    /// The SPIFFE bundle (JWKS) document.
    pub fn bundle_jwks(&self, refresh_hint: i64) -> Result<serde_json::Value, CaError> {
        let mut keys = Vec::new();
        for root in self.x509_authorities() {
            keys.push(serde_json::json!({"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": [base64::engine::general_purpose::STANDARD.encode(&root)]}));
        }
        for k in self.jwt.all() {
            keys.push(k.jwk()?);
        }
        Ok(serde_json::json!({"keys": keys, "spiffe_sequence": self.sequence, "spiffe_refresh_hint": refresh_hint}))
    }

    /// JWT authorities only (the JWKS a Workload API client validates JWT-SVIDs with).
    pub fn jwt_jwks(&self) -> Result<serde_json::Value, CaError> {
        let keys = self.jwt.all().map(JwtKey::jwk).collect::<Result<Vec<_>, _>>()?;
        Ok(serde_json::json!({"keys": keys}))
    }

    /// Signs `csr_der` for `req`. The CSR's signature must verify (proof the requester holds
    /// the key); everything else in the certificate is the server's decision: exactly one URI
    /// SAN, cA=false, digitalSignature, server+client auth, lifetime capped by the CA's.
    pub fn sign_x509_svid(&self, csr_der: &[u8], req: &SvidRequest<'_>, now: i64) -> Result<Vec<Vec<u8>>, CaError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.into()).map_err(CaError::BadCsr)?;
        let ca = &self.x509.active;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tether");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages =
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment, KeyUsagePurpose::KeyAgreement];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let mut sans = vec![SanType::URI(req.spiffe_id.to_string().try_into()?)];
        for name in req.dns_names {
            sans.push(SanType::DnsName(name.clone().try_into()?));
        }
        params.subject_alt_names = sans;
        params.not_before = unix_time(now - BACKDATE_SECONDS)?;
        params.not_after = unix_time((now + req.ttl).min(ca.not_after))?;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, ca.issuer()?)?;
        let mut chain = vec![cert.der().to_vec()];
        if ca.upstream_root.is_some() {
            // Leaf, then Tether's intermediate, then the upstream's intermediates.
            chain.push(ca.cert_der.clone());
            chain.extend(ca.upstream_chain.iter().cloned());
        }
        Ok(chain)
    }

    /// A JWT-SVID for `sub` and `audience`, from the active key.
    pub fn mint_jwt(&self, sub: &SpiffeId, audience: &[String], ttl: i64, now: i64) -> Result<String, CaError> {
        let aud = if audience.len() == 1 { serde_json::json!(audience[0]) } else { serde_json::json!(audience) };
        let exp = (now + ttl).min(self.jwt.active.not_after);
        self.jwt.active.sign(&serde_json::json!({"sub": sub.to_string(), "aud": aud, "exp": exp, "iat": now}))
    }
}

#[cfg(test)]
mod tests {
    use x509_parser::prelude::*;

    use super::*;

    fn csr(id: &str) -> (Vec<u8>, KeyPair) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        (p.serialize_request(&key).unwrap().der().to_vec(), key)
    }

    #[test]
    fn issues_spec_conformant_leaves() {
        let now = 1_800_000_000;
        let ca = CaState::new("example.org", now, 86_400).unwrap();
        let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let (der, _) = csr("spiffe://example.org/ignored");
        let chain = ca.sign_x509_svid(&der, &SvidRequest { spiffe_id: &id, ttl: 3600, dns_names: &[] }, now).unwrap();
        let (_, cert) = X509Certificate::from_der(&chain[0]).unwrap();
        let uris: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .filter_map(|n| if let GeneralName::URI(u) = n { Some(u.to_string()) } else { None })
            .collect();
        assert_eq!(uris, vec!["spiffe://example.org/web"], "exactly one URI SAN, the server's choice");
        assert!(!cert.is_ca());
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign() && !ku.value.crl_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert_eq!(cert.validity().not_before.timestamp(), now - BACKDATE_SECONDS);
        assert_eq!(cert.validity().not_after.timestamp(), now + 3600);
        // Signed by the CA.
        let roots = ca.x509_authorities();
        let (_, root) = X509Certificate::from_der(&roots[0]).unwrap();
        cert.verify_signature(Some(root.public_key())).unwrap();
        assert!(root.is_ca());
    }

    #[test]
    fn upstream_ca_signs_intermediates_and_the_bundle_holds_its_root() {
        let now = 1_800_000_000;
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let root = ca_params("corp.example", now, 10 * 86_400).unwrap().self_signed(&root_key).unwrap();
        let upstream = UpstreamCa::from_pem(&root.pem(), &root_key.serialize_pem()).unwrap();
        let ca = CaState::with_upstream("example.org", now, 86_400, Some(upstream)).unwrap();
        assert_eq!(ca.x509_authorities(), vec![root.der().to_vec()], "the bundle trusts the upstream root");
        let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let (der, _) = csr("spiffe://example.org/web");
        let chain = ca.sign_x509_svid(&der, &SvidRequest { spiffe_id: &id, ttl: 3600, dns_names: &[] }, now).unwrap();
        assert_eq!(chain.len(), 2, "leaf + Tether's intermediate");
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
        let (_, mid) = X509Certificate::from_der(&chain[1]).unwrap();
        let (_, r) = X509Certificate::from_der(root.der()).unwrap();
        leaf.verify_signature(Some(mid.public_key())).unwrap();
        mid.verify_signature(Some(r.public_key())).unwrap();
        assert!(mid.is_ca());

        // A key that is not the certificate's, or a leaf certificate, is refused.
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let e = UpstreamCa::from_pem(&root.pem(), &other.serialize_pem()).unwrap_err().to_string();
        assert!(e.contains("does not match"), "{e}");
        let leaf_pem = tether_attestors::pem::encode("CERTIFICATE", &chain[0]);
        let e = UpstreamCa::from_pem(&leaf_pem, &root_key.serialize_pem()).unwrap_err().to_string();
        assert!(e.contains("not a CA"), "{e}");
    }

    #[test]
    fn garbage_and_forged_csrs_are_refused() {
        let ca = CaState::new("example.org", 1_800_000_000, 86_400).unwrap();
        let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let req = SvidRequest { spiffe_id: &id, ttl: 60, dns_names: &[] };
        assert!(matches!(ca.sign_x509_svid(b"not a csr", &req, 1_800_000_000), Err(CaError::BadCsr(_))));
        let (mut der, _) = csr("spiffe://example.org/web");
        let last = der.len() - 1;
        der[last] ^= 0xff; // break the signature
        assert!(matches!(ca.sign_x509_svid(&der, &req, 1_800_000_000), Err(CaError::BadCsr(_))));
    }

    #[test]
    fn rotation_prepares_at_half_activates_at_a_sixth_and_keeps_the_old() {
        let t0 = 1_800_000_000;
        let ttl = 600;
        let mut ca = CaState::new("example.org", t0, ttl).unwrap();
        let first = ca.x509.active.cert_der.clone();
        assert!(!ca.rotate(t0 + 100).unwrap());
        assert!(ca.rotate(t0 + 300).unwrap(), "prepared at half life");
        assert_eq!(ca.x509_authorities().len(), 2, "prepared one is published early");
        assert_eq!(ca.x509.active.cert_der, first);
        assert!(ca.rotate(t0 + 500).unwrap(), "activated when a sixth remains");
        assert_ne!(ca.x509.active.cert_der, first);
        assert!(ca.x509_authorities().contains(&first), "old CA kept until it expires");
        let seq = ca.sequence;
        assert!(ca.rotate(t0 + 601).unwrap(), "expired one dropped");
        assert!(!ca.x509_authorities().contains(&first));
        assert!(ca.sequence > seq);
    }

    #[test]
    fn jwts_are_es256_with_kid_and_verify() {
        let now = 1_800_000_000;
        let ca = CaState::new("example.org", now, 86_400).unwrap();
        let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let token = ca.mint_jwt(&id, &["db".into()], 300, now).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value = serde_json::from_slice(&B64URL.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], ca.jwt.active.kid);
        let claims: serde_json::Value = serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(
            (claims["sub"].as_str(), claims["aud"].as_str(), claims["exp"].as_i64()),
            (Some("spiffe://example.org/web"), Some("db"), Some(now + 300))
        );
        let jwks = ca.bundle_jwks(300).unwrap();
        assert!(jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["use"] == "jwt-svid" && k["kid"] == ca.jwt.active.kid));
        assert_eq!(jwks["spiffe_sequence"], 1);
    }
}
