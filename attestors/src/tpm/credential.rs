//! TPM2_MakeCredential in software (TPM 2.0 Part 1 §24 "Credential Protection").
//!
//! The server encrypts a secret to the EK, bound to the AK's name. Only the TPM holding that
//! EK can recover it, and only with TPM2_ActivateCredential on a loaded object of that name:
//! a node that returns the secret proves the AK lives in the same TPM as the certified EK.

use aes::{Aes128, Aes192, Aes256};
use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};
use ring::rand::{SecureRandom, SystemRandom};
use thiserror::Error;

use super::wire::{put_tpm2b, EccCurve, HashAlg, Public, PublicKey, SymAlg, SymDef};

/// Label of the seed (RSA-OAEP label and KDFe "Use"), NUL included as the TPM hashes it.
const IDENTITY: &str = "IDENTITY\0";

/// What TPM2_MakeCredential returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeCredential {
    /// TPM2B_ID_OBJECT contents: TPM2B_DIGEST(integrity HMAC) || encrypted identity.
    pub credential_blob: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET contents: the RSA-OAEP ciphertext of the seed, or the
    /// marshalled ephemeral TPMS_ECC_POINT.
    pub encrypted_secret: Vec<u8>,
}

#[derive(Debug, Error)]
pub enum CredentialError {
    /// The EK must be a restricted decryption (storage) key to activate credentials.
    #[error("ek is not a restricted decryption key (attributes {attributes:#010x})")]
    EkNotStorageKey { attributes: u32 },
    /// The EK's symmetric algorithm protects the credential; we implement AES-CFB.
    #[error("ek symmetric algorithm {found} is not supported (need aes-128/192/256-cfb)")]
    EkSymmetricUnsupported { found: String },
    #[error("ek public key is unusable: {reason}")]
    EkKeyInvalid { reason: &'static str },
    /// A name is a hash algorithm followed by a digest of its size.
    #[error("ak name of {len} bytes is not a tpm name")]
    AkNameInvalid { len: usize },
    /// TPM2_MakeCredential refuses credentials longer than the EK's name digest.
    #[error("secret of {len} bytes: must be 1 to {max} bytes (the ek's name digest size)")]
    SecretSize { len: usize, max: usize },
    #[error("rsa-oaep encryption of the seed to the ek failed")]
    RsaEncrypt(#[source] rsa::Error),
    #[error("ecdh with the ek's public point failed")]
    Ecdh,
    #[error("the system random number generator failed")]
    Random,
}

/// TPM2_MakeCredential: protects `secret` for the TPM holding `ek`, bound to `ak_name`.
pub fn make_credential(ek: &Public, ak_name: &[u8], secret: &[u8]) -> Result<MadeCredential, CredentialError> {
    let attributes = ek.attributes();
    if !attributes.restricted() || !attributes.decrypt() {
        return Err(CredentialError::EkNotStorageKey { attributes: attributes.0 });
    }
    let name_alg = ek.name_alg();
    let sym = ek_symmetric(ek.symmetric())?;
    if !is_name(ak_name) {
        return Err(CredentialError::AkNameInvalid { len: ak_name.len() });
    }
    if secret.is_empty() || secret.len() > name_alg.digest_len() {
        return Err(CredentialError::SecretSize { len: secret.len(), max: name_alg.digest_len() });
    }
    let rng = SystemRandom::new();
    let (seed, encrypted_secret) = match ek.key() {
        PublicKey::Rsa { exponent, modulus, .. } => {
            let mut seed = vec![0u8; name_alg.digest_len()];
            rng.fill(&mut seed).map_err(|_| CredentialError::Random)?;
            let encrypted = rsa_oaep(name_alg, modulus, *exponent, &seed)?;
            (seed, encrypted)
        }
        PublicKey::Ecc { curve, x, y, .. } => ecdh_seed(name_alg, *curve, x, y, &rng)?,
    };
    let credential_blob = protect(name_alg, sym, &seed, ak_name, secret)?;
    Ok(MadeCredential { credential_blob, encrypted_secret })
}

/// The credential proper, given the seed: encIdentity under a key derived from the seed and
/// the AK name, and an HMAC over it and the name (so a blob moved to another AK fails).
fn protect(
    name_alg: HashAlg,
    sym: SymDef,
    seed: &[u8],
    ak_name: &[u8],
    secret: &[u8],
) -> Result<Vec<u8>, CredentialError> {
    let mut enc_identity = Vec::with_capacity(2 + secret.len());
    put_tpm2b(&mut enc_identity, "tpm2b_digest", secret)
        .map_err(|_| CredentialError::SecretSize { len: secret.len(), max: name_alg.digest_len() })?;
    let sym_key = kdfa(name_alg, seed, "STORAGE", ak_name, &[], u32::from(sym.key_bits));
    aes_cfb_encrypt(&sym_key, &mut enc_identity)?;
    let hmac_key = kdfa(name_alg, seed, "INTEGRITY", &[], &[], digest_bits(name_alg));
    let mut ctx = ring::hmac::Context::with_key(&ring::hmac::Key::new(name_alg.hmac(), &hmac_key));
    ctx.update(&enc_identity);
    ctx.update(ak_name);
    let outer_hmac = ctx.sign();
    let mut blob = Vec::with_capacity(2 + outer_hmac.as_ref().len() + enc_identity.len());
    put_tpm2b(&mut blob, "tpm2b_id_object", outer_hmac.as_ref())
        .map_err(|_| CredentialError::EkKeyInvalid { reason: "hmac too long" })?;
    blob.extend_from_slice(&enc_identity);
    Ok(blob)
}

fn ek_symmetric(sym: Option<SymDef>) -> Result<SymDef, CredentialError> {
    match sym {
        Some(s) if s.algorithm == SymAlg::Aes && s.mode == SymDef::CFB && matches!(s.key_bits, 128 | 192 | 256) => {
            Ok(s)
        }
        Some(s) => Err(CredentialError::EkSymmetricUnsupported {
            found: format!("{:?}-{} mode {:#06x}", s.algorithm, s.key_bits, s.mode),
        }),
        None => Err(CredentialError::EkSymmetricUnsupported { found: "null".into() }),
    }
}

fn is_name(name: &[u8]) -> bool {
    match name {
        [hi, lo, digest @ ..] => {
            HashAlg::from_id(u16::from_be_bytes([*hi, *lo])).is_some_and(|h| h.digest_len() == digest.len())
        }
        _ => false,
    }
}

fn digest_bits(hash: HashAlg) -> u32 {
    // At most 64 bytes: cannot overflow.
    (hash.digest_len() * 8) as u32
}

/// AES in CFB mode with a zero IV, as the TPM protects credentials and duplicates.
fn aes_cfb_encrypt(key: &[u8], buf: &mut [u8]) -> Result<(), CredentialError> {
    const IV: [u8; 16] = [0; 16];
    let bad_key = |_| CredentialError::EkSymmetricUnsupported { found: format!("aes key of {} bytes", key.len()) };
    match key.len() {
        16 => cfb_mode::Encryptor::<Aes128>::new_from_slices(key, &IV).map_err(bad_key)?.encrypt(buf),
        24 => cfb_mode::Encryptor::<Aes192>::new_from_slices(key, &IV).map_err(bad_key)?.encrypt(buf),
        32 => cfb_mode::Encryptor::<Aes256>::new_from_slices(key, &IV).map_err(bad_key)?.encrypt(buf),
        _ => return Err(bad_key(cfb_mode::cipher::InvalidLength)),
    }
    Ok(())
}

fn rsa_oaep(hash: HashAlg, modulus: &[u8], exponent: u32, seed: &[u8]) -> Result<Vec<u8>, CredentialError> {
    use rsa::{BigUint, Oaep, RsaPublicKey};
    let key = RsaPublicKey::new(BigUint::from_bytes_be(modulus), BigUint::from(exponent))
        .map_err(CredentialError::RsaEncrypt)?;
    let padding = match hash {
        HashAlg::Sha1 => Oaep::new_with_label::<sha1::Sha1, _>(IDENTITY),
        HashAlg::Sha256 => Oaep::new_with_label::<sha2::Sha256, _>(IDENTITY),
        HashAlg::Sha384 => Oaep::new_with_label::<sha2::Sha384, _>(IDENTITY),
        HashAlg::Sha512 => Oaep::new_with_label::<sha2::Sha512, _>(IDENTITY),
    };
    key.encrypt(&mut rsa::rand_core::OsRng, padding, seed).map_err(CredentialError::RsaEncrypt)
}

/// One-pass ECDH with an ephemeral key: the seed is KDFe over the shared x-coordinate, and
/// the ephemeral public point is what the TPM needs to recompute it.
fn ecdh_seed(
    name_alg: HashAlg,
    curve: EccCurve,
    ek_x: &[u8],
    ek_y: &[u8],
    rng: &SystemRandom,
) -> Result<(Vec<u8>, Vec<u8>), CredentialError> {
    let alg = match curve {
        EccCurve::NistP256 => &ring::agreement::ECDH_P256,
        EccCurve::NistP384 => &ring::agreement::ECDH_P384,
    };
    let len = curve.field_len();
    if ek_x.len() > len || ek_y.len() > len {
        return Err(CredentialError::EkKeyInvalid { reason: "coordinate longer than the curve" });
    }
    let mut ek_point = Vec::with_capacity(1 + 2 * len);
    ek_point.push(0x04);
    for coordinate in [ek_x, ek_y] {
        ek_point.resize(ek_point.len() + len.saturating_sub(coordinate.len()), 0);
        ek_point.extend_from_slice(coordinate);
    }
    let ephemeral = ring::agreement::EphemeralPrivateKey::generate(alg, rng).map_err(|_| CredentialError::Random)?;
    let ephemeral_public = ephemeral.compute_public_key().map_err(|_| CredentialError::Random)?;
    // Uncompressed point: 0x04 || x || y.
    let (eph_x, eph_y) = match ephemeral_public.as_ref() {
        [0x04, xy @ ..] if xy.len() == 2 * len => xy.split_at(len),
        _ => return Err(CredentialError::Ecdh),
    };
    let peer = ring::agreement::UnparsedPublicKey::new(alg, &ek_point);
    // The TPM's Z is the x-coordinate of the shared point, which is what ring returns.
    // PartyVInfo is the EK's x exactly as its public area holds it: the TPM hashes that.
    let seed = ring::agreement::agree_ephemeral(ephemeral, &peer, |z| {
        kdfe(name_alg, z, IDENTITY, eph_x, ek_x, digest_bits(name_alg))
    })
    .map_err(|_| CredentialError::Ecdh)?;
    let mut point = Vec::with_capacity(4 + 2 * len);
    put_tpm2b(&mut point, "tpms_ecc_point", eph_x).map_err(|_| CredentialError::Ecdh)?;
    put_tpm2b(&mut point, "tpms_ecc_point", eph_y).map_err(|_| CredentialError::Ecdh)?;
    Ok((seed, point))
}

/// KDFa (SP 800-108 counter mode with HMAC), TPM 2.0 Part 1 §11.4.10.2. `label` is given
/// without its terminating NUL, which is always hashed.
pub fn kdfa(hash: HashAlg, key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let key = ring::hmac::Key::new(hash.hmac(), key);
    let out_len = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(out_len + hash.digest_len());
    let mut counter: u32 = 1;
    while out.len() < out_len {
        let mut ctx = ring::hmac::Context::with_key(&key);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter = counter.wrapping_add(1);
    }
    out.truncate(out_len);
    mask_top_bits(&mut out, bits);
    out
}

/// KDFe (SP 800-56A concatenation KDF), TPM 2.0 Part 1 §11.4.10.3. `label` must carry its
/// NUL, as the TPM hashes it.
pub fn kdfe(hash: HashAlg, z: &[u8], label: &str, party_u: &[u8], party_v: &[u8], bits: u32) -> Vec<u8> {
    let out_len = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(out_len + hash.digest_len());
    let mut counter: u32 = 1;
    while out.len() < out_len {
        let mut ctx = ring::digest::Context::new(hash.ring_digest());
        ctx.update(&counter.to_be_bytes());
        ctx.update(z);
        ctx.update(label.as_bytes());
        ctx.update(party_u);
        ctx.update(party_v);
        out.extend_from_slice(ctx.finish().as_ref());
        counter = counter.wrapping_add(1);
    }
    out.truncate(out_len);
    mask_top_bits(&mut out, bits);
    out
}

/// A length in bits that is not a whole number of bytes clears the unused high bits.
fn mask_top_bits(out: &mut [u8], bits: u32) {
    if !bits.is_multiple_of(8) {
        if let Some(first) = out.first_mut() {
            *first &= 0xff >> (8 - bits % 8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        crate::hex::decode(s).unwrap()
    }

    /// The TPM reference implementation's KDFa self-test vectors (KdfTestData.h in the TCG
    /// reference code and libtpms): 160 bits from a 20-byte key, per hash.
    #[test]
    fn kdfa_matches_the_tpm_reference_self_test() {
        let key = unhex("271fa08bbdc5060ec3dfa928ff9b73123a12da0c");
        let (u, v) = (unhex("ce244f395dca7391"), unhex("da504031ddf12e83"));
        for (hash, expected) in [
            (HashAlg::Sha1, "55b5a7184aa07423c47dae766c26a2377d7cf851"),
            (HashAlg::Sha256, "bb0259e1c8ba607e6a2cd704b69a902e9ade84c4"),
            (HashAlg::Sha384, "1dce70c9113eb2dba47bd9cfc72bf46f45b09312"),
            (HashAlg::Sha512, "8be2c1b85b78569b9fa759f5857c56d684810fd3"),
        ] {
            assert_eq!(kdfa(hash, &key, "KDFSELFTESTLABEL", &u, &v, 160), unhex(expected), "{hash}");
        }
    }

    #[test]
    fn kdf_lengths_and_bit_masking() {
        assert_eq!(kdfa(HashAlg::Sha256, b"k", "STORAGE", b"", b"", 256 + 128).len(), 48);
        assert_eq!(kdfe(HashAlg::Sha384, b"z", IDENTITY, b"", b"", 384).len(), 48);
        assert!(kdfa(HashAlg::Sha256, b"k", "L", b"", b"", 12)[0] < 0x10);
        assert!(kdfa(HashAlg::Sha256, b"k", "L", b"", b"", 0).is_empty());
    }

    /// Structure of the blob for a fixed seed: TPM2B_DIGEST(HMAC) || AES-CFB(size || secret),
    /// the HMAC covering the encrypted identity and the AK name.
    #[test]
    fn protect_layout_and_integrity() {
        let sym = SymDef { algorithm: SymAlg::Aes, key_bits: 128, mode: SymDef::CFB };
        let name = [&[0x00, 0x0b][..], &[9u8; 32]].concat();
        let seed = [3u8; 32];
        let blob = protect(HashAlg::Sha256, sym, &seed, &name, b"hello").unwrap();
        assert_eq!(blob, protect(HashAlg::Sha256, sym, &seed, &name, b"hello").unwrap());
        assert_eq!(blob.len(), 2 + 32 + 2 + 5);
        assert_eq!(&blob[..2], &[0, 32]);
        let (hmac, enc_identity) = blob[2..].split_at(32);
        let hmac_key = kdfa(HashAlg::Sha256, &seed, "INTEGRITY", &[], &[], 256);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &hmac_key);
        ring::hmac::verify(&key, &[enc_identity, &name].concat(), hmac).unwrap();
        let sym_key = kdfa(HashAlg::Sha256, &seed, "STORAGE", &name, &[], 128);
        let mut plain = enc_identity.to_vec();
        cfb_mode::Decryptor::<Aes128>::new_from_slices(&sym_key, &[0; 16]).unwrap().decrypt(&mut plain);
        assert_eq!(plain, [&[0, 5][..], b"hello"].concat());
        // Another name: another key and another HMAC.
        let other = [&[0x00, 0x0b][..], &[8u8; 32]].concat();
        assert_ne!(protect(HashAlg::Sha256, sym, &seed, &other, b"hello").unwrap(), blob);
    }

    #[test]
    fn refuses_what_a_tpm_would_refuse() {
        assert!(!is_name(&[0x00, 0x0b, 1, 2]));
        assert!(!is_name(&[]));
        assert!(is_name(&[&[0x00, 0x04][..], &[0; 20]].concat()));
        assert!(matches!(ek_symmetric(None), Err(CredentialError::EkSymmetricUnsupported { .. })));
        let cbc = SymDef { algorithm: SymAlg::Aes, key_bits: 128, mode: 0x0042 };
        assert!(matches!(ek_symmetric(Some(cbc)), Err(CredentialError::EkSymmetricUnsupported { .. })));
    }
}
