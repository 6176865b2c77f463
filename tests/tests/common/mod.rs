//! What the TPM attestation tests share: a real server with an unauthenticated node API
//! client (`Forge`), a TPM the test drives itself (`Node`), and exact refusal checks.
//! Each test target uses part of it.
#![allow(dead_code)]

use prost::Message;
use sandbox::swtpm::Swtpm;
use tether_attestors::tpm::{
    binding::{self, BoundKey, KeyHash},
    device::{AttestationKey, Device, EkAlgorithm, Endorsement},
};
use tether_proto::{node, node::node_client::NodeClient, tpm as pb};
use tether_tests::plane::Plane;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub fn agents(plane: &Plane) -> String {
    plane.cli_ok(&["agent", "list"])
}

/// A server with `[tpm]` trusting the swtpm CAs and the policies in `policies`, plus
/// `tpm_extra` lines in that table; a node API client without a client certificate.
pub struct Forge {
    pub plane: Plane,
    _policies: tempfile::TempDir,
    pub client: NodeClient<Channel>,
}

impl Forge {
    pub async fn new(policies: tempfile::TempDir) -> Forge {
        Self::with(policies, "").await
    }

    pub async fn with(policies: tempfile::TempDir, tpm_extra: &str) -> Forge {
        let dir = policies.path().to_owned();
        let extra = tpm_extra.to_owned();
        let plane = tokio::task::spawn_blocking(move || {
            Plane::server_only(&format!(
                "[tpm]\nek_ca_dir = \"{}\"\npolicy_dir = \"{}\"\n{extra}",
                Swtpm::ca_dir().display(),
                dir.display()
            ))
        })
        .await
        .unwrap();
        let client = NodeClient::new(Self::channel(&plane, None).await);
        Forge { plane, _policies: policies, client }
    }

    /// A new TLS connection to the node API (server authentication only), from `source`
    /// (a loopback address) when given.
    pub async fn channel(plane: &Plane, source: Option<std::net::IpAddr>) -> Channel {
        let bundle = std::fs::read_to_string(plane.dir.path().join("server/bundle.pem")).unwrap();
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(bundle)).domain_name("localhost");
        Endpoint::from_shared(format!("https://127.0.0.1:{}", plane.port))
            .unwrap()
            .local_address(source)
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn begin(&mut self, hello: &pb::Hello) -> Result<(String, pb::Challenge), tonic::Status> {
        let c = self
            .client
            .begin_attestation(node::BeginAttestationRequest { attestor: "tpm".into(), payload: hello.encode_to_vec() })
            .await?
            .into_inner();
        Ok((c.challenge_id, pb::Challenge::decode(c.payload.as_slice()).unwrap()))
    }

    /// Answers challenge `challenge_id` with `ev`, asking for a node SVID for `csr`.
    pub async fn attest(
        &mut self,
        challenge_id: &str,
        ev: &pb::Evidence,
        csr: &[u8],
    ) -> Result<node::AttestResponse, tonic::Status> {
        Ok(self
            .client
            .attest(node::AttestRequest {
                attestor: "tpm".into(),
                payload: ev.encode_to_vec(),
                csr: csr.to_vec(),
                challenge_id: challenge_id.into(),
            })
            .await?
            .into_inner())
    }

    pub fn assert_nothing_issued(&self) {
        let list = agents(&self.plane);
        assert!(list.starts_with("Found 0 attested agents"), "{list}");
    }
}

/// A TPM as the test drives it: context, EK, AK, and the CSR (a fresh key) its answers are
/// for.
pub struct Node {
    pub dev: Device,
    pub ek: Endorsement,
    pub ak: AttestationKey,
    pub csr: Vec<u8>,
    _ak_dir: tempfile::TempDir,
}

impl Node {
    pub fn open(tpm: &Swtpm, alg: EkAlgorithm) -> Node {
        let ak_dir = tempfile::tempdir().unwrap();
        let mut dev = Device::open(&tpm.tcti()).unwrap();
        let ek = dev.endorsement(alg).unwrap();
        let ak = dev.attestation_key(&ek, ak_dir.path()).unwrap();
        let csr = tether_agent::svid::new_key().unwrap().csr_der;
        Node { dev, ek, ak, csr, _ak_dir: ak_dir }
    }

    pub fn hello(&self) -> pb::Hello {
        pb::Hello {
            ek_public: self.ek.public.clone(),
            ek_certificate: self.ek.certificate.clone(),
            ek_intermediates: vec![],
            ak_public: self.ak.public.clone(),
        }
    }

    pub fn key_hash(&self) -> KeyHash {
        BoundKey::Csr(&self.csr).key_hash().unwrap()
    }

    /// The qualifying data an honest answer to `c` carries: the nonce bound to this node's
    /// CSR key.
    pub fn bound(&self, c: &pb::Challenge) -> [u8; 32] {
        binding::qualifying_data(&c.nonce, &self.key_hash())
    }

    /// The honest answer: activated credential, and a quote bound to this node's CSR.
    pub fn answer(&mut self, c: &pb::Challenge) -> pb::Evidence {
        let secret = self.dev.activate_credential(&self.ek, &self.ak, &c.credential_blob, &c.encrypted_secret).unwrap();
        let mut ev = self.quote(c, &self.bound(c));
        ev.activated_secret = secret;
        ev
    }

    /// A quote of `c`'s PCR selection carrying `qualifying` as its qualifying data (the
    /// evidence claims this node's CSR key).
    pub fn quote(&mut self, c: &pb::Challenge, qualifying: &[u8]) -> pb::Evidence {
        let sel = c.pcrs.clone().unwrap();
        let q = self.dev.quote(&self.ak, qualifying, &sel.bank, &sel.pcrs).unwrap();
        pb::Evidence {
            activated_secret: vec![],
            quote: q.attest,
            signature: q.signature,
            pcr_values: q.pcrs.into_iter().map(|(bank, index, value)| pb::PcrValue { bank, index, value }).collect(),
            event_log: vec![],
            bound_key_sha256: self.key_hash().to_vec(),
        }
    }
}

/// `text` is `pattern`, where each `*` stands for any text (names and hashes that differ per
/// run); everything else must match exactly, start to end.
pub fn matches_pattern(text: &str, pattern: &str) -> bool {
    let pieces: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (pieces[0], pieces[pieces.len() - 1]);
    if pieces.len() == 1 {
        return text == pattern;
    }
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for piece in &pieces[1..pieces.len() - 1] {
        match rest.find(piece) {
            Some(i) => rest = &rest[i + piece.len()..],
            None => return false,
        }
    }
    true
}

/// Refused with exactly this code and message (`*`: any text).
pub fn refused(r: Result<impl std::fmt::Debug, tonic::Status>, code: tonic::Code, message: &str) {
    match r {
        Ok(v) => {
            let v: String = format!("{v:?}").chars().take(300).collect();
            panic!("accepted, expected the refusal {message:?}: {v}…")
        }
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(matches_pattern(s.message(), message), "expected {message:?}, got {:?}", s.message());
        }
    }
}

/// A golden policy of PCRs 0-7 all zero: a fresh swtpm's.
pub fn zero_policy() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let mut text = String::from("name = \"zeros\"\nbank = \"sha256\"\n[pcrs]\n");
    for i in 0..8 {
        text.push_str(&format!("{i} = \"{}\"\n", "00".repeat(32)));
    }
    std::fs::write(d.path().join("zeros.toml"), text).unwrap();
    d
}
