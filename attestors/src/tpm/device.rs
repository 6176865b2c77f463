//! The agent's TPM: the only code that touches tss-esapi. It reads the EK and its
//! certificate, keeps one attestation key (created once under the EK, its wrapped blobs kept
//! on disk), activates the server's credential and quotes PCRs with the server's nonce. It
//! verifies nothing — that is the server's job, in pure Rust.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
};

use tss_esapi::{
    abstraction::{ak, ek, nv, AsymmetricAlgorithmSelection, DefaultKey},
    attributes::SessionAttributesBuilder,
    constants::{PropertyTag, SessionType},
    handles::{AuthHandle, KeyHandle, NvIndexTpmHandle, ObjectHandle, PcrHandle, PersistentTpmHandle, TpmHandle},
    interface_types::{
        algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm},
        ecc::EccCurve,
        key_bits::RsaKeyBits,
        resource_handles::NvAuth,
        session_handles::{AuthSession, PolicySession},
    },
    structures::{
        Data, Digest, DigestValues, EncryptedSecret, HashScheme, IdObject, PcrSelectionListBuilder, PcrSlot, Private,
        Public, SignatureScheme, SymmetricDefinition,
    },
    traits::{Marshall, UnMarshall},
    Context, TctiNameConf,
};

/// A TPM operation failed; `op` names it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("tpm {op}: {source}")]
    Tpm {
        op: &'static str,
        #[source]
        source: tss_esapi::Error,
    },
    #[error("tcti {0:?}: expected swtpm:host=H,port=P, mssim:host=H,port=P or device:/dev/tpmrmN ({1})")]
    Tcti(String, String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {0} endorsement key has no certificate in NV (index {1:#x})")]
    NoEkCertificate(&'static str, u32),
    #[error("the endorsement key's authorisation policy is not one this agent can satisfy")]
    EkPolicy,
    #[error("pcr {0} is not a PCR index (0-23)")]
    BadPcr(u32),
    #[error("unknown PCR bank {0:?} (sha1 or sha256)")]
    BadBank(String),
    #[error("the PCRs kept changing while quoting; try again")]
    PcrsUnstable,
}

fn tpm(op: &'static str) -> impl FnOnce(tss_esapi::Error) -> DeviceError {
    move |source| DeviceError::Tpm { op, source }
}

/// Which endorsement key identifies the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EkAlgorithm {
    /// RSA-2048 (TCG template L-1; persistent handle 0x81010001, certificate at NV 0x01c00002).
    Rsa,
    /// ECC NIST P-384 (high-range template; persistent handle 0x81010016, NV 0x01c00016).
    Ecc,
}

impl EkAlgorithm {
    fn persistent_handle(self) -> u32 {
        match self {
            EkAlgorithm::Rsa => 0x8101_0001,
            EkAlgorithm::Ecc => 0x8101_0016,
        }
    }
    fn certificate_index(self) -> u32 {
        match self {
            EkAlgorithm::Rsa => 0x01c0_0002,
            EkAlgorithm::Ecc => 0x01c0_0016,
        }
    }
    fn selection(self) -> AsymmetricAlgorithmSelection {
        match self {
            EkAlgorithm::Rsa => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            EkAlgorithm::Ecc => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP384),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            EkAlgorithm::Rsa => "rsa-2048",
            EkAlgorithm::Ecc => "ecc-p384",
        }
    }
}

/// Validates a TCTI string ourselves: tss-esapi 7.7 silently ignores keys it does not know
/// (`swtpm:path=/x` becomes localhost:2321), which would attest against the wrong TPM.
pub fn parse_tcti(tcti: &str) -> Result<TctiNameConf, DeviceError> {
    let bad = |why: &str| DeviceError::Tcti(tcti.to_owned(), why.to_owned());
    let (kind, rest) = tcti.split_once(':').unwrap_or((tcti, ""));
    match kind {
        "swtpm" | "mssim" => {
            let mut host = false;
            let mut port = false;
            for kv in rest.split(',').filter(|s| !s.is_empty()) {
                match kv.split_once('=') {
                    Some(("host", v)) if !v.is_empty() => host = true,
                    Some(("port", v)) if v.parse::<u16>().is_ok() => port = true,
                    _ => return Err(bad(&format!("unknown or malformed option {kv:?}"))),
                }
            }
            if !(host && port) {
                return Err(bad("host and port are required"));
            }
        }
        "device" => {
            if !rest.starts_with('/') {
                return Err(bad("an absolute device path is required"));
            }
        }
        _ => return Err(bad("unknown TCTI")),
    }
    TctiNameConf::from_str(tcti).map_err(|e| bad(&e.to_string()))
}

/// The endorsement key as the server needs it.
pub struct Endorsement {
    pub algorithm: EkAlgorithm,
    handle: KeyHandle,
    /// TPMT_PUBLIC.
    pub public: Vec<u8>,
    /// DER.
    pub certificate: Vec<u8>,
}

/// The attestation key, loaded.
pub struct AttestationKey {
    handle: KeyHandle,
    /// TPMT_PUBLIC.
    pub public: Vec<u8>,
    /// True when this start created it (the first attestation on this TPM, or a lost blob).
    pub created: bool,
}

/// A quote and the PCR values it covers, in the quote's order.
pub struct Quote {
    pub attest: Vec<u8>,
    pub signature: Vec<u8>,
    pub pcrs: Vec<(String, u32, Vec<u8>)>,
}

pub struct Device {
    ctx: Context,
}

fn hashing(bank: &str) -> Result<HashingAlgorithm, DeviceError> {
    match bank {
        "sha1" => Ok(HashingAlgorithm::Sha1),
        "sha256" => Ok(HashingAlgorithm::Sha256),
        other => Err(DeviceError::BadBank(other.to_owned())),
    }
}

fn slots(pcrs: &[u32]) -> Result<Vec<PcrSlot>, DeviceError> {
    pcrs.iter()
        .map(|&i| {
            if i > 23 {
                return Err(DeviceError::BadPcr(i));
            }
            PcrSlot::try_from(1u32 << i).map_err(|_| DeviceError::BadPcr(i))
        })
        .collect()
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), DeviceError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| DeviceError::Io { path: path.to_owned(), source };
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
    std::io::Write::write_all(&mut f, data).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

impl Device {
    pub fn open(tcti: &str) -> Result<Self, DeviceError> {
        let conf = parse_tcti(tcti)?;
        let ctx = Context::new(conf).map_err(tpm("open"))?;
        Ok(Device { ctx })
    }

    /// Manufacturer and vendor strings; `software` when they name a simulator (libtpms/swtpm
    /// and the IBM and Microsoft simulators report "SW  TPM" / "MSFT" / "IBM"+"SW").
    pub fn vendor(&mut self) -> Result<(String, bool), DeviceError> {
        let mut text = String::new();
        for tag in [
            PropertyTag::Manufacturer,
            PropertyTag::VendorString1,
            PropertyTag::VendorString2,
            PropertyTag::VendorString3,
            PropertyTag::VendorString4,
        ] {
            let v = self.ctx.get_tpm_property(tag).map_err(tpm("get capability"))?.unwrap_or(0);
            let part: String = v.to_be_bytes().iter().filter(|b| b.is_ascii_graphic()).map(|&b| b as char).collect();
            if !part.is_empty() {
                if !text.is_empty() {
                    text.push(' ');
                }
                text.push_str(&part);
            }
        }
        let software = text.contains("SW TPM") || text.starts_with("MSFT") || text.contains(" SW ");
        Ok((text, software))
    }

    /// The EK: the persistent one when the platform provisioned it, else re-created from the
    /// TCG template (same seed, same key); and its certificate from NV.
    pub fn endorsement(&mut self, algorithm: EkAlgorithm) -> Result<Endorsement, DeviceError> {
        let handle = match PersistentTpmHandle::new(algorithm.persistent_handle())
            .map_err(tpm("persistent handle"))
            .and_then(|h| {
                self.ctx
                    .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(h)))
                    .map_err(tpm("load persistent EK"))
            }) {
            Ok(h) => KeyHandle::from(h),
            Err(_) => ek::create_ek_object_2(&mut self.ctx, algorithm.selection(), DefaultKey)
                .map_err(tpm("create EK from template"))?,
        };
        let (public, _, _) = self.ctx.read_public(handle).map_err(tpm("read EK public"))?;
        let public = public.marshall().map_err(tpm("marshal EK public"))?;
        let index = algorithm.certificate_index();
        let nv_index = NvIndexTpmHandle::new(index).map_err(tpm("nv index"))?;
        let certificate = self
            .ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(nv_index)))
            .and_then(|h| {
                let auth = NvAuth::NvIndex(h.into());
                self.ctx.execute_with_nullauth_session(|c| nv::read_full(c, auth, nv_index))
            })
            .map_err(|_| DeviceError::NoEkCertificate(algorithm.name(), index))?;
        // NV areas are often larger than the DER they hold; keep exactly one DER object.
        let certificate = trim_der(certificate);
        Ok(Endorsement { algorithm, handle, public, certificate })
    }

    /// Loads the AK from `dir` (created once; the blobs are wrapped by the EK and useless on
    /// any other TPM), or creates it: RSA-2048, RSASSA-SHA256, restricted signing key.
    pub fn attestation_key(&mut self, ek: &Endorsement, dir: &Path) -> Result<AttestationKey, DeviceError> {
        let pub_path = dir.join("ak.pub");
        let priv_path = dir.join("ak.priv");
        if let (Ok(p), Ok(s)) = (std::fs::read(&pub_path), std::fs::read(&priv_path)) {
            let loaded = Public::unmarshall(&p)
                .ok()
                .zip(Private::try_from(s).ok())
                .and_then(|(public, private)| ak::load_ak(&mut self.ctx, ek.handle, None, private, public).ok());
            match loaded {
                Some(handle) => return Ok(AttestationKey { handle, public: p, created: false }),
                None => {
                    tracing::warn!(dir = %dir.display(), "stored attestation key does not load on this TPM; creating a new one")
                }
            }
        }
        let created = ak::create_ak(
            &mut self.ctx,
            ek.handle,
            HashingAlgorithm::Sha256,
            SignatureSchemeAlgorithm::RsaSsa,
            None,
            DefaultKey,
        )
        .map_err(tpm("create AK"))?;
        let public = created.out_public.marshall().map_err(tpm("marshal AK public"))?;
        std::fs::create_dir_all(dir).map_err(|source| DeviceError::Io { path: dir.to_owned(), source })?;
        write_private(&priv_path, created.out_private.value())?;
        write_private(&pub_path, &public)?;
        let handle = ak::load_ak(&mut self.ctx, ek.handle, None, created.out_private, created.out_public)
            .map_err(tpm("load AK"))?;
        Ok(AttestationKey { handle, public, created: true })
    }

    /// TPM2_ActivateCredential: recovers the server's secret only if the AK lives in the same
    /// TPM as the EK (and has the name the server bound the credential to).
    pub fn activate_credential(
        &mut self,
        ek: &Endorsement,
        ak: &AttestationKey,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, DeviceError> {
        let blob = IdObject::try_from(credential_blob.to_vec()).map_err(tpm("credential blob"))?;
        let secret = EncryptedSecret::try_from(encrypted_secret.to_vec()).map_err(tpm("encrypted secret"))?;
        let (ek_public, _, _) = self.ctx.read_public(ek.handle).map_err(tpm("read EK public"))?;
        let ek_session = if ek_public.object_attributes().user_with_auth() {
            AuthSession::Password
        } else {
            if ek_public.name_hashing_algorithm() != HashingAlgorithm::Sha256 {
                return Err(DeviceError::EkPolicy);
            }
            // The standard EK policy: PolicySecret(TPM_RH_ENDORSEMENT).
            let session = self
                .ctx
                .start_auth_session(
                    None,
                    None,
                    None,
                    SessionType::Policy,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
                .map_err(tpm("start EK policy session"))?
                .ok_or(DeviceError::EkPolicy)?;
            let (attrs, mask) = SessionAttributesBuilder::new().with_decrypt(true).with_encrypt(true).build();
            self.ctx.tr_sess_set_attributes(session, attrs, mask).map_err(tpm("session attributes"))?;
            let policy = PolicySession::try_from(session).map_err(tpm("policy session"))?;
            self.ctx
                .execute_with_nullauth_session(|c| {
                    c.policy_secret(
                        policy,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })
                .map_err(tpm("policy secret"))?;
            session
        };
        let result = self.ctx.execute_with_sessions((Some(AuthSession::Password), Some(ek_session), None), |c| {
            c.activate_credential(ak.handle, ek.handle, blob, secret)
        });
        if let AuthSession::PolicySession(p) = ek_session {
            let _ = self.ctx.flush_context(ObjectHandle::from(tss_esapi::handles::SessionHandle::from(p)));
        }
        Ok(result.map_err(tpm("activate credential"))?.value().to_vec())
    }

    /// Reads PCRs (the TPM returns at most eight per read; tss-esapi loops).
    pub fn read_pcrs(&mut self, bank: &str, pcrs: &[u32]) -> Result<Vec<(String, u32, Vec<u8>)>, DeviceError> {
        let alg = hashing(bank)?;
        let selection =
            PcrSelectionListBuilder::new().with_selection(alg, &slots(pcrs)?).build().map_err(tpm("pcr selection"))?;
        let data = self
            .ctx
            .execute_without_session(|c| tss_esapi::abstraction::pcr::read_all(c, selection))
            .map_err(tpm("pcr read"))?;
        let bank_data = data.pcr_bank(alg);
        let mut sorted = pcrs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        sorted
            .into_iter()
            .map(|i| {
                let slot = PcrSlot::try_from(1u32 << i).map_err(|_| DeviceError::BadPcr(i))?;
                let d = bank_data.and_then(|b| b.get_digest(slot)).ok_or(DeviceError::BadPcr(i))?;
                Ok((bank.to_owned(), i, d.value().to_vec()))
            })
            .collect()
    }

    /// A quote over `pcrs` of `bank` with `nonce` as qualifying data, and the values it covers.
    /// PCRs can be extended between the quote and the read: the digest is compared locally and
    /// the pair retried, so the server never gets values that do not match the quote.
    pub fn quote(&mut self, ak: &AttestationKey, nonce: &[u8], bank: &str, pcrs: &[u32]) -> Result<Quote, DeviceError> {
        let alg = hashing(bank)?;
        for _ in 0..5 {
            let before = self.read_pcrs(bank, pcrs)?;
            let selection = PcrSelectionListBuilder::new()
                .with_selection(alg, &slots(pcrs)?)
                .build()
                .map_err(tpm("pcr selection"))?;
            let qualifying = Data::try_from(nonce.to_vec()).map_err(tpm("nonce"))?;
            let (attest, signature) = self
                .ctx
                .execute_with_sessions((Some(AuthSession::Password), None, None), |c| {
                    c.quote(
                        ak.handle,
                        qualifying,
                        SignatureScheme::RsaSsa { hash_scheme: HashScheme::new(HashingAlgorithm::Sha256) },
                        selection,
                    )
                })
                .map_err(tpm("quote"))?;
            let after = self.read_pcrs(bank, pcrs)?;
            if before == after {
                return Ok(Quote {
                    attest: attest.marshall().map_err(tpm("marshal quote"))?,
                    signature: signature.marshall().map_err(tpm("marshal signature"))?,
                    pcrs: after,
                });
            }
        }
        Err(DeviceError::PcrsUnstable)
    }

    /// TPM2_PCR_Extend of `bank`'s PCR `index` with `digest` (tests and image tooling play
    /// measured boot with it: swtpm has no firmware measuring anything).
    pub fn extend(&mut self, bank: &str, index: u32, digest: &[u8]) -> Result<(), DeviceError> {
        let alg = hashing(bank)?;
        if index > 23 {
            return Err(DeviceError::BadPcr(index));
        }
        // ESYS_TR_PCR0..PCR31 are the PCR indices themselves.
        let handle = PcrHandle::try_from(index).map_err(|_| DeviceError::BadPcr(index))?;
        let mut values = DigestValues::new();
        values.set(alg, Digest::try_from(digest.to_vec()).map_err(tpm("digest"))?);
        self.ctx
            .execute_with_sessions((Some(AuthSession::Password), None, None), |c| c.pcr_extend(handle, values))
            .map_err(tpm("pcr extend"))
    }
}

/// The first DER TLV of `buf` (NV certificate areas are padded).
fn trim_der(mut buf: Vec<u8>) -> Vec<u8> {
    let len = match buf.get(1) {
        Some(&l) if l < 0x80 => Some(2 + l as usize),
        Some(&l) => {
            let n = (l & 0x7f) as usize;
            buf.get(2..2 + n).filter(|_| n <= 4).map(|b| 2 + n + b.iter().fold(0usize, |a, &x| (a << 8) | x as usize))
        }
        None => None,
    };
    if let Some(len) = len.filter(|&l| l <= buf.len()) {
        buf.truncate(len);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcti_strings_are_checked_before_tss_esapi_ignores_them() {
        assert!(parse_tcti("swtpm:host=127.0.0.1,port=2321").is_ok());
        assert!(parse_tcti("device:/dev/tpmrm0").is_ok());
        let e = parse_tcti("swtpm:path=/run/swtpm.sock").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("unknown or malformed option \"path=/run/swtpm.sock\""), "{e}");
        assert!(parse_tcti("swtpm:host=h").is_err());
        assert!(parse_tcti("device:tpm0").is_err());
        assert!(parse_tcti("tabrmd:").is_err());
    }

    #[test]
    fn trims_padded_der() {
        let mut v = vec![0x30, 0x82, 0x00, 0x03, 1, 2, 3];
        v.extend([0xff; 10]);
        assert_eq!(trim_der(v), vec![0x30, 0x82, 0x00, 0x03, 1, 2, 3]);
        assert_eq!(trim_der(vec![0x30, 0x01, 9, 0xff]), vec![0x30, 0x01, 9]);
    }
}
