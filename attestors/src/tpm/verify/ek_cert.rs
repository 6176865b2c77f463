//! EK certificates: the chain from the TPM's EK certificate to a manufacturer CA we trust.

use std::{collections::HashMap, path::Path};

use x509_parser::{
    certificate::X509Certificate,
    extensions::{GeneralName, ParsedExtension},
    oid_registry::{Oid, OID_EC_P256, OID_NIST_EC_P384},
    pem::Pem,
    prelude::FromDer,
    public_key::PublicKey as SpkiKey,
    x509::X509Name,
};

use super::VerifyError;
use crate::tpm::wire::{EccCurve, Public, PublicKey};

/// More intermediates than any manufacturer chain has; bounds the work a node can cause.
const MAX_INTERMEDIATES: usize = 8;
/// A certificate larger than this is not an EK or CA certificate.
const MAX_CERT_BYTES: usize = 16 * 1024;

/// Trusted manufacturer CA certificates (roots or intermediates: every one is an anchor).
#[derive(Debug, Clone, Default)]
pub struct EkCaStore {
    cas: Vec<TrustedCa>,
    /// Subject DER → indices in `cas`, so a chain step parses only its candidates.
    by_subject: HashMap<Vec<u8>, Vec<usize>>,
}

#[derive(Debug, Clone)]
struct TrustedCa {
    der: Vec<u8>,
}

/// A verified EK certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkCertificate {
    /// The node's EK hash: see [`ek_hash`].
    pub ek_hash: String,
    /// SHA-256 of the certificate's DER (without any NV padding).
    pub sha256: [u8; 32],
    pub subject: String,
    /// The issuer named in the EK certificate.
    pub leaf_issuer: String,
    /// Subject of the trusted CA the chain ends at.
    pub anchor_subject: String,
    /// Serial number, hex.
    pub serial: String,
    /// TPM manufacturer, model and firmware version from the TCG subjectAltName
    /// (2.23.133.2.1/2/3), when the certificate carries them.
    pub tpm_manufacturer: Option<String>,
    pub tpm_model: Option<String>,
    pub tpm_version: Option<String>,
    pub public_key: EkCertKey,
}

/// The certified key, normalised for comparison with the EK's public area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EkCertKey {
    /// Big-endian, leading zeros stripped.
    Rsa { modulus: Vec<u8>, exponent: Vec<u8> },
    /// Coordinates of the uncompressed point, each padded to the field length.
    Ecc { curve: EccCurve, x: Vec<u8>, y: Vec<u8> },
}

impl EkCaStore {
    /// Every file in `dir` (not recursing) holds PEM certificates or one DER certificate.
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<Self, VerifyError> {
        let dir = dir.as_ref();
        let io = |source| VerifyError::CaFile { path: dir.to_path_buf(), source };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.is_file() {
                paths.push(path);
            }
        }
        // Deterministic order: errors and duplicates resolve the same way on every host.
        paths.sort();
        let mut store = EkCaStore::default();
        for path in paths {
            let data = std::fs::read(&path).map_err(|source| VerifyError::CaFile { path: path.clone(), source })?;
            let origin = path.display().to_string();
            for der in certificates_in(&data)
                .map_err(|reason| VerifyError::CaCertificate { origin: origin.clone(), reason })?
            {
                store.add(der, &origin)?;
            }
        }
        if store.cas.is_empty() {
            return Err(VerifyError::CaStoreEmpty { origin: dir.display().to_string() });
        }
        Ok(store)
    }

    /// DER certificates, e.g. from configuration; errors name them by position.
    pub fn from_ders<I, D>(ders: I) -> Result<Self, VerifyError>
    where
        I: IntoIterator<Item = D>,
        D: AsRef<[u8]>,
    {
        let mut store = EkCaStore::default();
        for (i, der) in ders.into_iter().enumerate() {
            store.add(der.as_ref().to_vec(), &format!("certificate #{i}"))?;
        }
        if store.cas.is_empty() {
            return Err(VerifyError::CaStoreEmpty { origin: "the given certificates".into() });
        }
        Ok(store)
    }

    /// PEM certificates (a bundle), e.g. embedded in configuration.
    pub fn from_pem(pem: &[u8]) -> Result<Self, VerifyError> {
        let origin = "pem bundle";
        let mut store = EkCaStore::default();
        for der in
            certificates_in(pem).map_err(|reason| VerifyError::CaCertificate { origin: origin.into(), reason })?
        {
            store.add(der, origin)?;
        }
        if store.cas.is_empty() {
            return Err(VerifyError::CaStoreEmpty { origin: origin.into() });
        }
        Ok(store)
    }

    pub fn len(&self) -> usize {
        self.cas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cas.is_empty()
    }

    fn add(&mut self, der: Vec<u8>, origin: &str) -> Result<(), VerifyError> {
        let bad = |reason: String| VerifyError::CaCertificate { origin: origin.to_owned(), reason };
        let (rest, cert) = X509Certificate::from_der(&der).map_err(|e| bad(e.to_string()))?;
        if !rest.is_empty() {
            return Err(bad(format!("{} bytes after the certificate", rest.len())));
        }
        if !is_ca(&cert) {
            return Err(bad(format!("{} is not a ca (basicConstraints ca:false or missing)", cert.subject())));
        }
        let subject = cert.subject().as_raw().to_vec();
        if self.cas.iter().any(|ca| ca.der == der) {
            return Ok(());
        }
        self.by_subject.entry(subject).or_default().push(self.cas.len());
        self.cas.push(TrustedCa { der });
        Ok(())
    }

    fn candidates<'s>(&'s self, issuer: &X509Name<'_>) -> impl Iterator<Item = &'s TrustedCa> + 's {
        let indices = self.by_subject.get(issuer.as_raw()).map(Vec::as_slice).unwrap_or(&[]);
        indices.iter().filter_map(|i| self.cas.get(*i))
    }
}

fn certificates_in(data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    // PEM may follow explanatory text (as `openssl x509 -text` writes it); DER never holds
    // this marker at all.
    if !data.windows(10).any(|w| w == b"-----BEGIN") {
        return Ok(vec![data.to_vec()]);
    }
    let mut out = Vec::new();
    for pem in Pem::iter_from_buffer(data) {
        let pem = pem.map_err(|e| format!("pem: {e}"))?;
        if pem.label == "CERTIFICATE" {
            out.push(pem.contents);
        }
    }
    if out.is_empty() {
        return Err("no CERTIFICATE block".into());
    }
    Ok(out)
}

/// Verifies the EK certificate up to a CA in `store`, through the node's `intermediates`
/// (untrusted: each must be a CA whose signature checks out). `now_unix` is injected so
/// tests and replays of stored evidence can fix the clock.
pub fn verify_ek_certificate(
    store: &EkCaStore,
    leaf_der: &[u8],
    intermediates: &[Vec<u8>],
    now_unix: i64,
) -> Result<EkCertificate, VerifyError> {
    let (leaf_der, leaf) = parse_leaf(leaf_der)?;
    if intermediates.len() > MAX_INTERMEDIATES {
        return Err(VerifyError::ChainTooLong { max: MAX_INTERMEDIATES });
    }
    let mut pool = Vec::with_capacity(intermediates.len());
    for (index, der) in intermediates.iter().enumerate() {
        let bad = |reason: String| VerifyError::IntermediateMalformed { index, reason };
        if der.len() > MAX_CERT_BYTES {
            return Err(bad(format!("{} bytes", der.len())));
        }
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
        if !rest.is_empty() {
            return Err(bad(format!("{} bytes after the certificate", rest.len())));
        }
        pool.push(Some(cert));
    }

    check_certificate(&leaf, now_unix)?;
    let mut current = leaf.clone();
    // Intermediate CAs between the leaf and the current issuer, for pathLenConstraint.
    let mut below = 0u32;
    loop {
        let mut signature_failed = false;
        for ca in store.candidates(current.issuer()) {
            let Ok((_, ca)) = X509Certificate::from_der(&ca.der) else { continue };
            if current.verify_signature(Some(ca.public_key())).is_ok() {
                check_issuer(&ca, below)?;
                return certificate_info(leaf_der, &leaf, &ca);
            }
            signature_failed = true;
        }
        let mut next = None;
        for slot in pool.iter_mut() {
            let Some(candidate) = slot else { continue };
            if candidate.subject().as_raw() != current.issuer().as_raw() {
                continue;
            }
            if current.verify_signature(Some(candidate.public_key())).is_ok() {
                next = slot.take();
                break;
            }
            signature_failed = true;
        }
        let Some(issuer) = next else {
            if signature_failed {
                return Err(VerifyError::CertificateSignature { subject: current.subject().to_string() });
            }
            return Err(VerifyError::UnknownEkCa { issuer: current.issuer().to_string() });
        };
        check_issuer(&issuer, below)?;
        check_certificate(&issuer, now_unix)?;
        below += 1;
        current = issuer;
    }
}

/// The NV index holding an EK certificate may be larger than the certificate: accept zero
/// padding after the DER, nothing else.
fn parse_leaf(der: &[u8]) -> Result<(&[u8], X509Certificate<'_>), VerifyError> {
    let bad = |reason: String| VerifyError::EkCertificateMalformed { reason };
    if der.len() > MAX_CERT_BYTES {
        return Err(bad(format!("{} bytes", der.len())));
    }
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
    if rest.iter().any(|b| *b != 0) {
        return Err(bad(format!("{} bytes after the certificate", rest.len())));
    }
    let used = der.len() - rest.len();
    Ok((der.get(..used).unwrap_or(der), cert))
}

/// Validity, and critical extensions we cannot interpret (RFC 5280 §4.2: such a
/// certificate must be rejected). The TCG's critical subjectAltName parses, so it passes.
fn check_certificate(cert: &X509Certificate<'_>, now: i64) -> Result<(), VerifyError> {
    let validity = cert.validity();
    if now < validity.not_before.timestamp() {
        return Err(VerifyError::CertificateNotYetValid {
            subject: cert.subject().to_string(),
            not_before: validity.not_before.timestamp(),
        });
    }
    if now > validity.not_after.timestamp() {
        return Err(VerifyError::CertificateExpired {
            subject: cert.subject().to_string(),
            not_after: validity.not_after.timestamp(),
        });
    }
    for ext in cert.extensions().iter().filter(|e| e.critical) {
        if matches!(
            ext.parsed_extension(),
            ParsedExtension::UnsupportedExtension { .. } | ParsedExtension::ParseError { .. }
        ) {
            return Err(VerifyError::UnhandledCriticalExtension {
                subject: cert.subject().to_string(),
                oid: ext.oid.to_id_string(),
            });
        }
    }
    Ok(())
}

fn is_ca(cert: &X509Certificate<'_>) -> bool {
    matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

/// An issuer must be a CA allowed to sign certificates, with room for the CAs below it.
fn check_issuer(cert: &X509Certificate<'_>, below: u32) -> Result<(), VerifyError> {
    let not_ca = |reason| VerifyError::IssuerNotCa { subject: cert.subject().to_string(), reason };
    let bc = match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => bc.value,
        _ => return Err(not_ca("basicConstraints ca is not set")),
    };
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => return Err(not_ca("keyUsage lacks keyCertSign")),
        Err(_) => return Err(not_ca("keyUsage does not parse")),
        _ => {}
    }
    if bc.path_len_constraint.is_some_and(|max| below > max) {
        return Err(not_ca("pathLenConstraint exceeded"));
    }
    Ok(())
}

fn certificate_info(
    der: &[u8],
    leaf: &X509Certificate<'_>,
    anchor: &X509Certificate<'_>,
) -> Result<EkCertificate, VerifyError> {
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
    let (mut manufacturer, mut model, mut version) = (None, None, None);
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            let GeneralName::DirectoryName(dn) = name else { continue };
            for attr in dn.iter_attributes() {
                let value = attr.as_str().ok().map(str::to_owned);
                match attr.attr_type().to_id_string().as_str() {
                    "2.23.133.2.1" => manufacturer = value,
                    "2.23.133.2.2" => model = value,
                    "2.23.133.2.3" => version = value,
                    _ => {}
                }
            }
        }
    }
    Ok(EkCertificate {
        ek_hash: spki_hash(leaf),
        sha256,
        subject: leaf.subject().to_string(),
        leaf_issuer: leaf.issuer().to_string(),
        anchor_subject: anchor.subject().to_string(),
        serial: hex(leaf.raw_serial()),
        tpm_manufacturer: manufacturer,
        tpm_model: model,
        tpm_version: version,
        public_key: certified_key(leaf)?,
    })
}

fn spki_hash(cert: &X509Certificate<'_>) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw).as_ref())
}

/// SHA-256 of an EK certificate's SubjectPublicKeyInfo, hex: a node's `tpm:ek-hash` and the
/// last segment of its SPIFFE ID. `openssl x509 -pubkey -noout | openssl pkey -pubin -outform
/// der | sha256sum` gives the same. `None` if the certificate does not parse.
pub fn ek_hash(cert_der: &[u8]) -> Option<String> {
    X509Certificate::from_der(cert_der).ok().map(|(_, c)| spki_hash(&c))
}

fn certified_key(cert: &X509Certificate<'_>) -> Result<EkCertKey, VerifyError> {
    let unsupported = |reason: &'static str| VerifyError::EkCertificateKey { reason };
    let spki = cert.public_key();
    match spki.parsed() {
        Ok(SpkiKey::RSA(rsa)) => Ok(EkCertKey::Rsa {
            modulus: strip_zeros(rsa.modulus).to_vec(),
            exponent: strip_zeros(rsa.exponent).to_vec(),
        }),
        Ok(SpkiKey::EC(point)) => {
            let curve_oid: Option<Oid<'_>> = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
            let curve = match curve_oid {
                Some(oid) if oid == OID_EC_P256 => EccCurve::NistP256,
                Some(oid) if oid == OID_NIST_EC_P384 => EccCurve::NistP384,
                _ => return Err(unsupported("ec key on a curve other than nist p-256 or p-384")),
            };
            let len = curve.field_len();
            match point.data() {
                [0x04, xy @ ..] if xy.len() == 2 * len => {
                    let (x, y) = xy.split_at(len);
                    Ok(EkCertKey::Ecc { curve, x: x.to_vec(), y: y.to_vec() })
                }
                _ => Err(unsupported("ec point is not uncompressed on its curve")),
            }
        }
        Ok(_) => Err(unsupported("neither rsa nor ec")),
        Err(_) => Err(unsupported("subjectPublicKeyInfo does not parse")),
    }
}

/// The EK in the TPM is the key the manufacturer certified.
pub fn check_ek_matches_certificate(ek: &Public, cert: &EkCertificate) -> Result<(), VerifyError> {
    let matches = match (ek.key(), &cert.public_key) {
        (PublicKey::Rsa { exponent, modulus, .. }, EkCertKey::Rsa { modulus: m, exponent: e }) => {
            strip_zeros(modulus) == m.as_slice() && strip_zeros(&exponent.to_be_bytes()) == e.as_slice()
        }
        (PublicKey::Ecc { curve, x, y, .. }, EkCertKey::Ecc { curve: c, x: cx, y: cy }) => {
            curve == c && strip_zeros(x) == strip_zeros(cx) && strip_zeros(y) == strip_zeros(cy)
        }
        _ => false,
    };
    if matches {
        Ok(())
    } else {
        Err(VerifyError::EkCertificateMismatch)
    }
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    b.get(first..).unwrap_or(&[])
}

pub(super) use crate::hex::encode as hex;
