//! How the agent knows it speaks to its server: the node API's certificate must chain to the
//! trust bundle *and* carry the server's SPIFFE ID (`spiffe://<td>/tether/server`). A DNS
//! name proves nothing here: the same CA signs workload SVIDs, whose DNS names operators
//! choose, so a workload holding an SVID for `localhost` could otherwise pose as the server
//! (take join tokens, serve a forged bundle, relay a TPM attestation).

use std::sync::Arc;

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    server::ParsedCertificate,
    ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
};
use tether_attestors::SpiffeId;

/// The one URI SAN of an X.509-SVID, if the certificate has exactly one.
pub fn svid_id(cert_der: &[u8]) -> Result<String, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| format!("unparsable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("no subjectAltName (not an SVID)")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err("no URI SAN (not an SVID)".into()),
        _ => Err(format!("{} URI SANs (an SVID has one)", uris.len())),
    }
}

/// Accepts a server certificate that chains to `roots` and names exactly `expected`.
#[derive(Debug)]
pub struct ServerIdVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerIdVerifier {
    pub fn new(roots: RootCertStore, expected: &SpiffeId, provider: &CryptoProvider) -> Self {
        ServerIdVerifier {
            roots: Arc::new(roots),
            expected: expected.to_string(),
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for ServerIdVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let id = svid_id(end_entity).map_err(|why| Error::General(format!("server certificate: {why}")))?;
        if id != self.expected {
            tracing::warn!(presented = %id, expected = %self.expected, "node API server refused: wrong SPIFFE ID");
            // General, not InvalidCertificate(Other): its text is what reaches the log.
            return Err(Error::General(WrongServer { presented: id, expected: self.expected.clone() }.to_string()));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server presented another SPIFFE ID than the one configured.
#[derive(Debug, thiserror::Error)]
#[error("the server's certificate names {presented}, not {expected}: not the Tether server")]
pub struct WrongServer {
    pub presented: String,
    pub expected: String,
}

/// A TLS client config for the node API: roots from `roots_der`, the server checked by
/// SPIFFE ID, the node SVID (chain, PKCS#8 key) as client certificate when there is one.
pub fn client_config(
    roots_der: &[Vec<u8>],
    expected: &SpiffeId,
    identity: Option<(&[Vec<u8>], &[u8])>,
) -> Result<ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for der in roots_der {
        roots.add(CertificateDer::from(der.clone()))?;
    }
    let verifier = Arc::new(ServerIdVerifier::new(roots, expected, &provider));
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(
            chain.iter().map(|c| CertificateDer::from(c.clone())).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

    fn ca() -> (rcgen::Certificate, KeyPair, CertificateParams) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        (p.self_signed(&key).unwrap(), key, p)
    }

    fn leaf(ca: &(rcgen::Certificate, KeyPair, CertificateParams), sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        let issuer = rcgen::Issuer::from_params(&ca.2, &ca.1);
        p.signed_by(&key, &issuer).unwrap().der().to_vec()
    }

    fn verify(roots: &[&rcgen::Certificate], cert: &[u8]) -> Result<ServerCertVerified, Error> {
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r.der().clone()).unwrap();
        }
        let provider = rustls::crypto::ring::default_provider();
        let expected: SpiffeId = "spiffe://example.org/tether/server".parse().unwrap();
        ServerIdVerifier::new(store, &expected, &provider).verify_server_cert(
            &CertificateDer::from(cert.to_vec()),
            &[],
            &ServerName::try_from("localhost").unwrap(),
            &[],
            UnixTime::now(),
        )
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn only_the_servers_id_under_the_bundle_passes() {
        let (ours, theirs) = (ca(), ca());
        let good = leaf(
            &ours,
            vec![uri("spiffe://example.org/tether/server"), SanType::DnsName("localhost".try_into().unwrap())],
        );
        assert!(verify(&[&ours.0], &good).is_ok());
        // A workload's SVID with the server's DNS name: the ID is what counts.
        let workload =
            leaf(&ours, vec![uri("spiffe://example.org/web"), SanType::DnsName("localhost".try_into().unwrap())]);
        let e = verify(&[&ours.0], &workload).unwrap_err().to_string();
        assert!(e.contains("names spiffe://example.org/web, not spiffe://example.org/tether/server"), "{e}");
        // The right ID from another authority.
        let forged = leaf(&theirs, vec![uri("spiffe://example.org/tether/server")]);
        assert!(verify(&[&ours.0], &forged).is_err());
        // No ID, or two.
        let none = leaf(&ours, vec![SanType::DnsName("localhost".try_into().unwrap())]);
        assert!(verify(&[&ours.0], &none).unwrap_err().to_string().contains("no URI SAN"));
        let two = leaf(&ours, vec![uri("spiffe://example.org/tether/server"), uri("spiffe://example.org/x")]);
        assert!(verify(&[&ours.0], &two).unwrap_err().to_string().contains("2 URI SANs"));
    }
}
