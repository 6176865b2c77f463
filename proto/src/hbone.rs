//! HBONE as Tether's node tunnels speak it: HTTP/2 `CONNECT` over mutual TLS 1.3 (ALPN
//! `h2`, port 15008), `:authority` the original destination `a.b.c.d:port` (what Istio's
//! ztunnel sends), each TLS side presenting a workload's X.509-SVID. The client names the
//! workload it expects in SNI ([`server_name`]), and proves once per connection which node
//! it speaks for ([`NodeProof`]).
//!
//! Everything here parses what arrives from the network, with bounded lengths, and is
//! fuzzed (`fuzz/fuzz_targets/hbone_request.rs`).

use std::net::{Ipv4Addr, SocketAddrV4};

use base64::Engine;
use sha2::{Digest, Sha256};

/// The tunnel's port (ztunnel's inbound HBONE port).
pub const DEFAULT_PORT: u16 = 15008;
/// The only ALPN protocol offered and accepted.
pub const ALPN: &[u8] = b"h2";
/// Request header: the sending node's SVID chain, base64 of concatenated DER, leaf first.
pub const NODE_SVID_HEADER: &str = "tether-node-svid";
/// Request header: base64 of the node key's ECDSA signature over the TLS exporter value
/// ([`EXPORTER_LABEL`], no context, [`EXPORTER_LEN`] bytes) of the stream's connection.
pub const NODE_PROOF_HEADER: &str = "tether-node-proof";
/// Response header of a refused stream: why (a short reason, for the sender's log).
pub const REFUSAL_HEADER: &str = "tether-refusal";
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tether-node-proof";
pub const EXPORTER_LEN: usize = 32;
/// The DNS suffix of [`server_name`]s.
pub const SERVER_NAME_SUFFIX: &str = ".id.hbone.tether";

/// Longest node SVID chain accepted (four certificates of 4 KiB, base64-encoded).
pub const MAX_CHAIN_B64: usize = 24 * 1024;
/// Longest signature accepted (an ASN.1 ECDSA P-384 signature is about 104 bytes).
pub const MAX_SIGNATURE_B64: usize = 256;
/// Most certificates in a node SVID chain.
pub const MAX_CHAIN_CERTS: usize = 4;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HboneError {
    #[error("method {0:?} is not CONNECT")]
    Method(String),
    #[error("a CONNECT request carries :authority only (no :scheme, no :path)")]
    Form,
    #[error(":authority {0:?} is not an IPv4 address and port")]
    Authority(String),
    #[error("server name {0:?} does not name a workload")]
    ServerName(String),
    #[error("header {name}: {what}")]
    Header { name: &'static str, what: &'static str },
}

/// `:authority` as a destination: a dotted-quad IPv4 address, `:`, and a decimal port
/// 1–65535 without sign or leading zeros. No names (a tunnel never resolves anything), no
/// IPv6, no userinfo.
pub fn parse_authority(s: &str) -> Result<SocketAddrV4, HboneError> {
    let bad = || HboneError::Authority(s.chars().take(64).collect());
    if s.len() > "255.255.255.255:65535".len() {
        return Err(bad());
    }
    let (ip, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) || port.starts_with('0') {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    // std's parser refuses leading zeros, too many or too few octets, and anything else.
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    Ok(SocketAddrV4::new(ip, port))
}

/// The destination of an HBONE request, from its pseudo-header fields: `CONNECT`, an
/// authority, no scheme or path (RFC 9113 §8.5).
pub fn check_connect(
    method: &str,
    scheme: Option<&str>,
    path: Option<&str>,
    authority: Option<&str>,
) -> Result<SocketAddrV4, HboneError> {
    if method != "CONNECT" {
        return Err(HboneError::Method(method.chars().take(16).collect()));
    }
    if scheme.is_some() || path.is_some_and(|p| !p.is_empty()) {
        return Err(HboneError::Form);
    }
    parse_authority(authority.ok_or(HboneError::Form)?)
}

/// The TLS server name a client sends to ask for the workload `spiffe_id` (SPIFFE IDs are
/// not DNS names): 32 hex digits of its SHA-256, then [`SERVER_NAME_SUFFIX`]. The client
/// still checks the certificate it gets carries exactly that SPIFFE ID.
pub fn server_name(spiffe_id: &str) -> String {
    let d = Sha256::digest(spiffe_id.as_bytes());
    let mut s = String::with_capacity(32 + SERVER_NAME_SUFFIX.len());
    for b in &d[..16] {
        s.push_str(&format!("{b:02x}"));
    }
    s.push_str(SERVER_NAME_SUFFIX);
    s
}

/// The 32-hex-digit label of a [`server_name`] (lowercase, as sent).
pub fn parse_server_name(name: &str) -> Result<&str, HboneError> {
    let bad = || HboneError::ServerName(name.chars().take(80).collect());
    let label = name.strip_suffix(SERVER_NAME_SUFFIX).ok_or_else(bad)?;
    if label.len() != 32 || !label.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad());
    }
    Ok(label)
}

/// A node's proof of which node a tunnel connection speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeProof {
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    pub signature: Vec<u8>,
}

impl NodeProof {
    /// The two header values.
    pub fn encode(&self) -> (String, String) {
        let b64 = base64::engine::general_purpose::STANDARD;
        (b64.encode(self.chain.concat()), b64.encode(&self.signature))
    }

    /// From the two header values: bounded, base64, and a chain of whole DER structures.
    pub fn decode(svid: &[u8], proof: &[u8]) -> Result<NodeProof, HboneError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let header = |name, what| HboneError::Header { name, what };
        if svid.len() > MAX_CHAIN_B64 {
            return Err(header(NODE_SVID_HEADER, "too long"));
        }
        if proof.len() > MAX_SIGNATURE_B64 {
            return Err(header(NODE_PROOF_HEADER, "too long"));
        }
        let der = b64.decode(svid).map_err(|_| header(NODE_SVID_HEADER, "not base64"))?;
        let signature = b64.decode(proof).map_err(|_| header(NODE_PROOF_HEADER, "not base64"))?;
        if signature.is_empty() {
            return Err(header(NODE_PROOF_HEADER, "empty"));
        }
        let chain = split_der(&der).ok_or(header(NODE_SVID_HEADER, "not a chain of DER certificates"))?;
        if chain.is_empty() || chain.len() > MAX_CHAIN_CERTS {
            return Err(header(NODE_SVID_HEADER, "not 1 to 4 certificates"));
        }
        Ok(NodeProof { chain, signature })
    }
}

/// Concatenated DER SEQUENCEs, split by their own (definite, minimal-form) lengths. The
/// content is not looked at: the certificates are verified afterwards.
fn split_der(mut der: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        if der.first() != Some(&0x30) {
            return None;
        }
        let (len, header): (usize, usize) = match *der.get(1)? {
            n if n < 0x80 => (usize::from(n), 2),
            0x81 => (Some(usize::from(*der.get(2)?)).filter(|n| *n >= 0x80)?, 3),
            0x82 => {
                let n = usize::from(*der.get(2)?) << 8 | usize::from(*der.get(3)?);
                (Some(n).filter(|n| *n >= 0x100)?, 4)
            }
            0x83 => {
                let n = usize::from(*der.get(2)?) << 16 | usize::from(*der.get(3)?) << 8 | usize::from(*der.get(4)?);
                (Some(n).filter(|n| *n >= 0x1_0000)?, 5)
            }
            _ => return None,
        };
        let end = header.checked_add(len)?;
        let cert = der.get(..end)?;
        out.push(cert.to_vec());
        der = &der[end..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_are_ipv4_and_port_and_nothing_else() {
        assert_eq!(parse_authority("10.77.0.2:8443"), Ok("10.77.0.2:8443".parse().unwrap()));
        assert_eq!(parse_authority("0.0.0.0:1"), Ok("0.0.0.0:1".parse().unwrap()));
        for bad in [
            "",
            ":",
            "10.0.0.1",
            "10.0.0.1:",
            "10.0.0.1:0",
            "10.0.0.1:08443",
            "10.0.0.1:+80",
            "10.0.0.1:65536",
            "10.0.0.1:123456",
            "010.0.0.1:80",
            "10.0.0:80",
            "[::1]:80",
            "db.internal:5432",
            "u@10.0.0.1:80",
            "10.0.0.1:80:80",
            " 10.0.0.1:80",
            "10.0.0.1:80 ",
            "256.0.0.1:80",
        ] {
            assert!(parse_authority(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn only_connect_with_authority_only() {
        assert!(check_connect("CONNECT", None, None, Some("10.0.0.1:80")).is_ok());
        assert_eq!(check_connect("GET", None, None, Some("10.0.0.1:80")), Err(HboneError::Method("GET".into())));
        assert_eq!(check_connect("CONNECT", Some("https"), None, Some("10.0.0.1:80")), Err(HboneError::Form));
        assert_eq!(check_connect("CONNECT", None, Some("/x"), Some("10.0.0.1:80")), Err(HboneError::Form));
        assert_eq!(check_connect("CONNECT", None, None, None), Err(HboneError::Form));
    }

    #[test]
    fn server_names_round_trip_and_are_strict() {
        let n = server_name("spiffe://example.org/api");
        assert!(n.ends_with(SERVER_NAME_SUFFIX) && n.len() == 32 + SERVER_NAME_SUFFIX.len(), "{n}");
        assert_eq!(parse_server_name(&n).unwrap(), &n[..32]);
        assert_ne!(server_name("spiffe://example.org/api"), server_name("spiffe://example.org/web"));
        for bad in ["localhost", &n.to_uppercase(), &n[1..], &format!("x{n}"), SERVER_NAME_SUFFIX] {
            assert!(parse_server_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn node_proofs_round_trip_and_refuse_garbage() {
        let chain = vec![vec![0x30, 0x03, 1, 2, 3], {
            let mut c = vec![0x30, 0x81, 0x80];
            c.extend(std::iter::repeat_n(7u8, 0x80));
            c
        }];
        let p = NodeProof { chain: chain.clone(), signature: vec![9; 70] };
        let (a, b) = p.encode();
        assert_eq!(NodeProof::decode(a.as_bytes(), b.as_bytes()).unwrap(), p);
        let b64 = base64::engine::general_purpose::STANDARD;
        for der in [
            vec![0x31, 0x00],
            vec![0x30, 0x05, 1],
            vec![0x30, 0x81, 0x05, 0, 0, 0, 0, 0],
            vec![0x30, 0x84, 0, 0, 0, 1, 0],
        ] {
            assert!(NodeProof::decode(b64.encode(&der).as_bytes(), b.as_bytes()).is_err(), "{der:?}");
        }
        assert!(NodeProof::decode(a.as_bytes(), b"").is_err());
        assert!(NodeProof::decode(b"!!!", b.as_bytes()).is_err());
        assert!(NodeProof::decode(&vec![b'A'; MAX_CHAIN_B64 + 4], b.as_bytes()).is_err());
        let five = b64.encode([0x30, 0x00].repeat(5));
        assert!(NodeProof::decode(five.as_bytes(), b.as_bytes()).is_err(), "more than four certificates");
    }
}
