//! The node's TPM, driven from async code: tss-esapi calls block, so each operation runs on
//! a blocking thread with its own context.

use std::path::{Path, PathBuf};

use prost::Message;
use tether_attestors::tpm::{
    binding::{self, BindingError, BoundKey, KeyHash},
    device::{AttestationKey, Device, DeviceError, EkAlgorithm, Endorsement, Quote},
};
use tether_proto::tpm as pb;

use crate::config::TpmConfig;

#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("{0}")]
    Device(#[from] DeviceError),
    #[error("the TPM task panicked or was cancelled")]
    Gone,
    #[error("malformed challenge from the server: {0}")]
    Challenge(String),
    #[error("the key the quote must cover: {0}")]
    Binding(#[from] BindingError),
}

struct Loaded {
    dev: Device,
    ek: Endorsement,
    ak: AttestationKey,
}

/// The node's TPM. It is opened for each operation and closed after: a host's other TPM users
/// (and a single-client software TPM) are not locked out between attestations. Loading the
/// persistent AK costs a few milliseconds; no key is generated after the first start.
#[derive(Clone)]
pub struct NodeTpm {
    tcti: String,
    ek: EkAlgorithm,
    dir: PathBuf,
    event_log: PathBuf,
}

impl NodeTpm {
    /// Opens the TPM once to check it and to create the AK if this node has none yet.
    pub async fn open(config: &TpmConfig, dir: &Path) -> Result<Self, TpmError> {
        let tpm = NodeTpm {
            tcti: config.tcti.clone(),
            ek: config.ek,
            dir: dir.to_owned(),
            event_log: config.event_log.clone(),
        };
        let (vendor, software, created) = tpm
            .call(|l| {
                let (vendor, software) = l.dev.vendor()?;
                Ok((vendor, software, l.ak.created))
            })
            .await?;
        if software {
            tracing::warn!(
                tcti = %tpm.tcti,
                vendor = %vendor,
                "RUNNING ON A SOFTWARE TPM: its keys live in a file; node attestation proves nothing about this hardware"
            );
        } else {
            tracing::info!(vendor = %vendor, "TPM opened");
        }
        if created {
            tracing::info!(dir = %tpm.dir.display(), "attestation key created (kept for later starts)");
        }
        Ok(tpm)
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Loaded) -> Result<T, DeviceError> + Send + 'static,
    ) -> Result<T, TpmError> {
        let (tcti, ek, dir) = (self.tcti.clone(), self.ek, self.dir.clone());
        let job = move || {
            let mut dev = Device::open(&tcti)?;
            let ek = dev.endorsement(ek)?;
            let ak = dev.attestation_key(&ek, &dir)?;
            f(&mut Loaded { dev, ek, ak })
        };
        Ok(tokio::task::spawn_blocking(job).await.map_err(|_| TpmError::Gone)??)
    }

    /// The first message of an attestation (encoded `tpm.Hello`).
    pub async fn hello(&self) -> Result<Vec<u8>, TpmError> {
        self.call(|l| Ok(hello(&l.ek, &l.ak).encode_to_vec())).await
    }

    /// Answers a challenge (encoded `tpm.Challenge`) with evidence (encoded `tpm.Evidence`):
    /// the activated credential when the challenge carries one, and a quote over the PCRs it
    /// selects whose qualifying data binds its nonce to `bound` (the CSR the request sends,
    /// or the node SVID a re-attestation authenticates with).
    pub async fn answer(&self, challenge: &[u8], bound: BoundKey<'_>) -> Result<Vec<u8>, TpmError> {
        let c = pb::Challenge::decode(challenge).map_err(|e| TpmError::Challenge(e.to_string()))?;
        let key = bound.key_hash()?;
        let sel = c.pcrs.clone().unwrap_or_default();
        let event_log = std::fs::read(&self.event_log).unwrap_or_default();
        self.call(move |l| {
            let activated_secret = if c.credential_blob.is_empty() {
                Vec::new()
            } else {
                l.dev.activate_credential(&l.ek, &l.ak, &c.credential_blob, &c.encrypted_secret)?
            };
            let q = l.dev.quote(&l.ak, &binding::qualifying_data(&c.nonce, &key), &sel.bank, &sel.pcrs)?;
            Ok(evidence(q, activated_secret, event_log, key).encode_to_vec())
        })
        .await
    }
}

/// `tether-agent tpm pcrs`: the current values as a golden policy file an image builder can
/// commit to the server's policy directory.
pub fn policy_snippet(tcti: &str, name: &str, bank: &str, pcrs: &[u32]) -> Result<String, DeviceError> {
    let mut dev = Device::open(tcti)?;
    let (vendor, software) = dev.vendor()?;
    let values = dev.read_pcrs(bank, pcrs)?;
    let mut out = format!(
        "# Golden PCR values read from {vendor}{} via {tcti}.\n# Put this file in the server's [tpm] policy_dir.\nname = \"{name}\"\nbank = \"{bank}\"\n\n[pcrs]\n",
        if software { " (a SOFTWARE TPM)" } else { "" }
    );
    for (_, i, v) in values {
        out.push_str(&format!("{i} = \"{}\"\n", tether_attestors::hex::encode(&v)));
    }
    Ok(out)
}

/// `tether-agent tpm quote`: (encoded `tpm.Hello`, encoded `tpm.Evidence`) for `nonce` and
/// the CSR `csr` (DER), as an attestation makes them (the AK is loaded from, or created in,
/// `ak_dir`).
pub fn quote(
    tcti: &str,
    ek: EkAlgorithm,
    ak_dir: &Path,
    nonce: &[u8],
    csr: &[u8],
    bank: &str,
    pcrs: &[u32],
) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
    let key = BoundKey::Csr(csr).key_hash()?;
    let mut dev = Device::open(tcti)?;
    let ek = dev.endorsement(ek)?;
    let ak = dev.attestation_key(&ek, ak_dir)?;
    let q = dev.quote(&ak, &binding::qualifying_data(nonce, &key), bank, pcrs)?;
    Ok((hello(&ek, &ak).encode_to_vec(), evidence(q, vec![], vec![], key).encode_to_vec()))
}

fn hello(ek: &Endorsement, ak: &AttestationKey) -> pb::Hello {
    pb::Hello {
        ek_public: ek.public.clone(),
        ek_certificate: ek.certificate.clone(),
        ek_intermediates: vec![],
        ak_public: ak.public.clone(),
    }
}

fn evidence(q: Quote, activated_secret: Vec<u8>, event_log: Vec<u8>, key: KeyHash) -> pb::Evidence {
    pb::Evidence {
        activated_secret,
        quote: q.attest,
        signature: q.signature,
        pcr_values: q.pcrs.into_iter().map(|(bank, index, value)| pb::PcrValue { bank, index, value }).collect(),
        event_log,
        bound_key_sha256: key.to_vec(),
    }
}

/// `tether-agent tpm info`: what the server will see of this TPM.
pub fn info(tcti: &str, ek: EkAlgorithm) -> Result<String, DeviceError> {
    let mut dev = Device::open(tcti)?;
    let (vendor, software) = dev.vendor()?;
    let e = dev.endorsement(ek)?;
    Ok(format!(
        "vendor: {vendor}{}\nek: {}\nek certificate: {} bytes DER\nek hash: {}\n",
        if software { " (software TPM)" } else { "" },
        ek.name(),
        e.certificate.len(),
        tether_attestors::tpm::verify::ek_hash(&e.certificate).unwrap_or_else(|| "(certificate does not parse)".into())
    ))
}
