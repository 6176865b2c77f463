//! Mutual TLS 1.3 with workload X.509-SVIDs, verified as SPIFFE says: the chain to the
//! trust bundle's roots (rustls-webpki builds and checks it: signatures, validity,
//! CA constraints, key usage), then exactly one URI SAN holding a SPIFFE ID of the trust
//! domain. The server picks the workload certificate the client asked for by SNI
//! ([`tether_proto::hbone::server_name`]); the client checks it got exactly that identity.
//! The node proof: the sending node's SVID key signs the connection's TLS exporter value,
//! so a tunnel is bound to the node it comes from, not only to a workload certificate.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring as ring_provider, CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ClientHello, ResolvesServerCert,
    },
    sign::CertifiedKey,
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
};
use tether_attestors::SpiffeId;
use tether_proto::hbone::{self, NodeProof};
use x509_parser::prelude::*;

use crate::{identity::Bundle, svid::X509Svid};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("signing the node proof: {0}")]
    Sign(&'static str),
}

fn cert_err(what: impl std::fmt::Display) -> rustls::Error {
    rustls::Error::General(what.to_string())
}

/// ring, TLS 1.3 suites only (AES-128-GCM first, as the benchmark's peer is configured).
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = ring_provider::default_provider();
    p.cipher_suites = vec![
        ring_provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ring_provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ring_provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The SPIFFE ID of a leaf: exactly one URI SAN, a SPIFFE ID with a path, of `trust_domain`.
pub fn spiffe_id_of(der: &[u8], trust_domain: &str) -> Result<SpiffeId, rustls::Error> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| cert_err("unparsable certificate"))?;
    let san = cert.subject_alternative_name().map_err(|_| cert_err("malformed subjectAltName"))?;
    let uris: Vec<&str> = san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None })
                .collect()
        })
        .unwrap_or_default();
    let [uri] = uris.as_slice() else {
        return Err(cert_err(format!("an X.509-SVID has exactly one URI SAN, this one {}", uris.len())));
    };
    let id = SpiffeId::parse(uri).map_err(|e| cert_err(format!("URI SAN: {e}")))?;
    if id.trust_domain() != trust_domain || id.is_trust_domain_id() {
        return Err(cert_err(format!("{id} is not a workload of trust domain {trust_domain}")));
    }
    Ok(id)
}

/// A certificate's notAfter (unix seconds).
pub fn not_after(der: &[u8]) -> Option<i64> {
    X509Certificate::from_der(der).ok().map(|(_, c)| c.validity().not_after.timestamp())
}

/// The trust bundle's X.509 roots, replaced when the bundle changes.
pub struct Trust {
    trust_domain: String,
    anchors: RwLock<Arc<Vec<rustls::pki_types::TrustAnchor<'static>>>>,
    algs: WebPkiSupportedAlgorithms,
}

impl Trust {
    pub fn new(trust_domain: &str) -> Self {
        Trust {
            trust_domain: trust_domain.to_owned(),
            anchors: RwLock::default(),
            algs: provider().signature_verification_algorithms,
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn set_bundle(&self, bundle: &Bundle) {
        let anchors: Vec<_> = bundle
            .x509_authorities
            .iter()
            .filter_map(|der| {
                let cert = CertificateDer::from(der.as_slice());
                webpki::anchor_from_trusted_cert(&cert).ok().map(|a| a.to_owned())
            })
            .collect();
        *self.anchors.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(anchors);
    }

    /// Verifies an SVID chain for `usage` at `now` and returns its SPIFFE ID.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let anchors = self.anchors.read().unwrap_or_else(|p| p.into_inner()).clone();
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|e| cert_err(format!("leaf: {e}")))?;
        ee.verify_for_usage(self.algs.all, &anchors, intermediates, now, usage, None, None)
            .map_err(|e| cert_err(format!("chain: {e}")))?;
        spiffe_id_of(end_entity.as_ref(), &self.trust_domain)
    }

    /// A node proof: the node SVID chain verified (client usage) and its key's signature
    /// over `exporter`. Returns the node's SPIFFE ID.
    pub fn verify_node_proof(
        &self,
        proof: &NodeProof,
        exporter: &[u8],
        now: UnixTime,
    ) -> Result<SpiffeId, rustls::Error> {
        let certs: Vec<CertificateDer<'_>> = proof.chain.iter().map(|c| CertificateDer::from(c.as_slice())).collect();
        let (leaf, rest) = certs.split_first().ok_or_else(|| cert_err("empty node chain"))?;
        let node = self.verify(leaf, rest, now, webpki::KeyUsage::client_auth())?;
        let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| cert_err(format!("leaf: {e}")))?;
        ee.verify_signature(webpki::ring::ECDSA_P256_SHA256, exporter, &proof.signature)
            .or_else(|_| ee.verify_signature(webpki::ring::ECDSA_P384_SHA384, exporter, &proof.signature))
            .map_err(|e| cert_err(format!("node proof signature: {e}")))?;
        Ok(node)
    }
}

/// The node's proof for a connection whose exporter value is `exporter`.
pub fn node_proof(node: &X509Svid, exporter: &[u8]) -> Result<NodeProof, TlsError> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(node.key_pkcs8.clone()));
    let key = provider().key_provider.load_private_key(key)?;
    let signer = key
        .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
        .ok_or(TlsError::Sign("the node key is not an ECDSA P-256 key"))?;
    let signature = signer.sign(exporter)?;
    Ok(NodeProof { chain: node.chain.clone(), signature })
}

fn tls13(
    verifier_algs: &WebPkiSupportedAlgorithms,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, verifier_algs)
}

/// The server side's check of client certificates (workload SVIDs of the trust domain).
#[derive(Debug)]
struct ClientVerifier(Arc<Trust>);

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verify(end_entity, intermediates, now, webpki::KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13(&self.0.algs, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algs.supported_schemes()
    }
}

/// The client side's check of the server certificate: exactly the workload it asked for.
#[derive(Debug)]
struct ServerVerifier {
    trust: Arc<Trust>,
    expected: String,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self.trust.verify(end_entity, intermediates, now, webpki::KeyUsage::server_auth())?;
        if id.to_string() != self.expected {
            return Err(cert_err(format!("the tunnel presented {id}, expected {}", self.expected)));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13(&self.trust.algs, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.algs.supported_schemes()
    }
}

/// A workload's certificate and key as rustls serves them.
pub fn certified_key(svid: &X509Svid) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = svid.chain.iter().map(|c| CertificateDer::from(c.clone())).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key_pkcs8.clone()));
    let signing = provider().key_provider.load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// SNI label -> (SPIFFE ID, its certificate and key).
type ByLabel = HashMap<String, (String, Arc<CertifiedKey>)>;

/// The workload certificates this node serves, by the SNI label that asks for each.
#[derive(Debug, Default)]
pub struct Resolver {
    by_label: RwLock<Arc<ByLabel>>,
}

impl Resolver {
    /// The newest SVID of each SPIFFE ID in `svids`.
    pub fn set(&self, svids: &[&X509Svid]) {
        let mut newest: HashMap<String, &X509Svid> = HashMap::new();
        for s in svids {
            let id = s.spiffe_id.to_string();
            if newest.get(&id).is_none_or(|cur| cur.not_after < s.not_after) {
                newest.insert(id, s);
            }
        }
        let mut map = HashMap::new();
        for (id, svid) in newest {
            match certified_key(svid) {
                Ok(key) => {
                    let name = hbone::server_name(&id);
                    map.insert(name[..32].to_owned(), (id, key));
                }
                Err(e) => tracing::warn!(spiffe_id = %id, "SVID not servable over the tunnel: {e}"),
            }
        }
        *self.by_label.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
    }

    /// The SPIFFE ID a server name asks for (among the workloads served now).
    pub fn identity_for(&self, server_name: &str) -> Option<String> {
        let label = hbone::parse_server_name(server_name).ok()?;
        self.by_label.read().unwrap_or_else(|p| p.into_inner()).get(label).map(|(id, _)| id.clone())
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let label = hbone::parse_server_name(hello.server_name()?).ok()?;
        self.by_label.read().unwrap_or_else(|p| p.into_inner()).get(label).map(|(_, k)| k.clone())
    }
}

/// The tunnel listener's TLS: TLS 1.3 only, ALPN h2, client certificates required.
pub fn server_config(trust: Arc<Trust>, resolver: Arc<Resolver>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(ClientVerifier(trust)))
        .with_cert_resolver(resolver);
    c.alpn_protocols = vec![hbone::ALPN.to_vec()];
    // Resumption tickets would let a client skip presenting its certificate later: off.
    c.send_tls13_tickets = 0;
    Ok(Arc::new(c))
}

/// A client TLS config presenting `svid` and expecting exactly `expected`.
pub fn client_config(
    trust: Arc<Trust>,
    svid: &X509Svid,
    expected: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = svid.chain.iter().map(|c| CertificateDer::from(c.clone())).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key_pkcs8.clone()));
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier { trust, expected: expected.to_owned() }))
        .with_client_auth_cert(chain, key)?;
    c.alpn_protocols = vec![hbone::ALPN.to_vec()];
    c.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and leaves made with rcgen, as the server makes SVIDs.
    type Ca = rcgen::CertifiedIssuer<'static, rcgen::KeyPair>;

    fn ca(td: &str) -> Ca {
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![rcgen::SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
        rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap()
    }

    fn leaf(ca: &Ca, uris: &[&str], days: (i64, i64)) -> X509Svid {
        let (der, key) = leaf_der(ca, uris, days);
        X509Svid::new(&key, &der).unwrap()
    }

    fn leaf_der(ca: &Ca, uris: &[&str], days: (i64, i64)) -> (Vec<u8>, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = uris.iter().map(|u| rcgen::SanType::URI(u.to_string().try_into().unwrap())).collect();
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let now = ::time::OffsetDateTime::now_utc();
        p.not_before = now + ::time::Duration::days(days.0);
        p.not_after = now + ::time::Duration::days(days.1);
        let cert = p.signed_by(&key, ca).unwrap();
        (cert.der().to_vec(), key)
    }

    fn trust(ca: &Ca) -> Trust {
        let t = Trust::new("example.org");
        t.set_bundle(&Bundle { x509_authorities: vec![ca.der().to_vec()], ..Bundle::default() });
        t
    }

    fn check(t: &Trust, (der, _): &(Vec<u8>, rcgen::KeyPair)) -> Result<SpiffeId, rustls::Error> {
        let leaf = CertificateDer::from(der.clone());
        t.verify(&leaf, &[], UnixTime::now(), webpki::KeyUsage::client_auth())
    }

    #[test]
    fn svids_are_verified_to_the_bundle_and_by_their_one_spiffe_id() {
        let good = ca("example.org");
        let t = trust(&good);
        let ok = leaf_der(&good, &["spiffe://example.org/web"], (-1, 1));
        assert_eq!(check(&t, &ok).unwrap().to_string(), "spiffe://example.org/web");
        // Another CA (even naming the same trust domain) is not in the bundle.
        let other = ca("example.org");
        let e = check(&t, &leaf_der(&other, &["spiffe://example.org/web"], (-1, 1))).unwrap_err();
        assert!(e.to_string().contains("chain"), "{e}");
        let e = check(&t, &leaf_der(&good, &["spiffe://example.org/web"], (-3, -1))).unwrap_err();
        assert!(e.to_string().contains("chain"), "expired: {e}");
        let e = check(&t, &leaf_der(&good, &["spiffe://other.org/web"], (-1, 1))).unwrap_err();
        assert!(e.to_string().contains("not a workload of trust domain"), "{e}");
        let e =
            check(&t, &leaf_der(&good, &["spiffe://example.org/a", "spiffe://example.org/b"], (-1, 1))).unwrap_err();
        assert!(e.to_string().contains("exactly one URI SAN"), "{e}");
        let e = check(&t, &leaf_der(&good, &["https://example.org/web"], (-1, 1))).unwrap_err();
        assert!(e.to_string().contains("URI SAN"), "{e}");
    }

    #[test]
    fn node_proofs_bind_the_node_key_to_the_exporter_value() {
        let good = ca("example.org");
        let t = trust(&good);
        let node = leaf(&good, &["spiffe://example.org/node/a"], (-1, 1));
        let proof = node_proof(&node, b"exporter value of this connection").unwrap();
        let id = t.verify_node_proof(&proof, b"exporter value of this connection", UnixTime::now()).unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/node/a");
        // Replayed on another connection (another exporter value): refused.
        let e = t.verify_node_proof(&proof, b"exporter value of another one", UnixTime::now()).unwrap_err();
        assert!(e.to_string().contains("signature"), "{e}");
        // Signed by another key than the certificate's.
        let other = leaf(&good, &["spiffe://example.org/node/b"], (-1, 1));
        let forged = NodeProof { chain: node.chain.clone(), signature: node_proof(&other, b"x").unwrap().signature };
        assert!(t.verify_node_proof(&forged, b"x", UnixTime::now()).is_err());
    }
}
