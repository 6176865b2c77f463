//! TPMT_PUBLIC: the public area of an RSA or ECC key (EK, AK).

use std::fmt;

use super::{put_tpm2b, HashAlg, Reader, WireError, ALG_NULL, MAX_DIGEST, MAX_ECC_BYTES, MAX_RSA_BYTES};

const STRUCTURE: &str = "tpmt_public";

const ALG_RSA: u16 = 0x0001;
const ALG_ECC: u16 = 0x0023;

/// A parsed TPMT_PUBLIC. It keeps the exact bytes it was parsed from: the name is a hash over
/// them, so re-marshalling could never be trusted to reproduce it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Public {
    raw: Vec<u8>,
    name_alg: HashAlg,
    attributes: ObjectAttributes,
    auth_policy: Vec<u8>,
    symmetric: Option<SymDef>,
    scheme: Option<Scheme>,
    key: PublicKey,
    /// The TPM writes the default RSA exponent as 0; remembered so `marshal` reproduces it.
    default_exponent: bool,
}

/// The key material in `unique`, with the parameters that size it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// `exponent` is the effective one: the TPM's 0 ("default") is reported as 65537.
    Rsa {
        key_bits: u16,
        exponent: u32,
        modulus: Vec<u8>,
    },
    Ecc {
        curve: EccCurve,
        kdf: Option<Kdf>,
        x: Vec<u8>,
        y: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EccCurve {
    NistP256,
    NistP384,
}

impl EccCurve {
    pub const fn id(self) -> u16 {
        match self {
            EccCurve::NistP256 => 0x0003,
            EccCurve::NistP384 => 0x0004,
        }
    }

    /// Bytes in a coordinate (and in each of ECDSA's r and s).
    pub const fn field_len(self) -> usize {
        match self {
            EccCurve::NistP256 => 32,
            EccCurve::NistP384 => 48,
        }
    }
}

impl fmt::Display for EccCurve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EccCurve::NistP256 => "nist-p256",
            EccCurve::NistP384 => "nist-p384",
        })
    }
}

/// TPMT_SYM_DEF_OBJECT when not NULL: how the key protects its children and credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymDef {
    pub algorithm: SymAlg,
    pub key_bits: u16,
    /// TPM_ALG_ID of the mode; [`SymDef::CFB`] is the only one a storage key may use.
    pub mode: u16,
}

impl SymDef {
    pub const CFB: u16 = 0x0043;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymAlg {
    Aes,
    Sm4,
    Camellia,
}

impl SymAlg {
    fn from_id(id: u16) -> Option<Self> {
        match id {
            0x0006 => Some(SymAlg::Aes),
            0x0013 => Some(SymAlg::Sm4),
            0x0026 => Some(SymAlg::Camellia),
            _ => None,
        }
    }

    const fn id(self) -> u16 {
        match self {
            SymAlg::Aes => 0x0006,
            SymAlg::Sm4 => 0x0013,
            SymAlg::Camellia => 0x0026,
        }
    }
}

/// The key's scheme (TPMT_RSA_SCHEME / TPMT_ECC_SCHEME) when not NULL. A restricted signing
/// key signs only with its scheme, so for an AK this fixes the quote's signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    RsaSsa(HashAlg),
    RsaPss(HashAlg),
    RsaEs,
    Oaep(HashAlg),
    Ecdsa(HashAlg),
    Ecdh(HashAlg),
    EcSchnorr(HashAlg),
    EcDaa { hash: HashAlg, count: u16 },
}

impl Scheme {
    const fn id(self) -> u16 {
        match self {
            Scheme::RsaSsa(_) => 0x0014,
            Scheme::RsaEs => 0x0015,
            Scheme::RsaPss(_) => 0x0016,
            Scheme::Oaep(_) => 0x0017,
            Scheme::Ecdsa(_) => 0x0018,
            Scheme::Ecdh(_) => 0x0019,
            Scheme::EcDaa { .. } => 0x001A,
            Scheme::EcSchnorr(_) => 0x001C,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scheme::RsaSsa(h) => write!(f, "rsassa-{h}"),
            Scheme::RsaPss(h) => write!(f, "rsapss-{h}"),
            Scheme::RsaEs => f.write_str("rsaes"),
            Scheme::Oaep(h) => write!(f, "oaep-{h}"),
            Scheme::Ecdsa(h) => write!(f, "ecdsa-{h}"),
            Scheme::Ecdh(h) => write!(f, "ecdh-{h}"),
            Scheme::EcSchnorr(h) => write!(f, "ecschnorr-{h}"),
            Scheme::EcDaa { hash, .. } => write!(f, "ecdaa-{hash}"),
        }
    }
}

/// TPMT_KDF_SCHEME of an ECC key when not NULL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kdf {
    /// TPM_ALG_ID: MGF1, KDF1_SP800_56A, KDF2 or KDF1_SP800_108.
    pub algorithm: u16,
    pub hash: HashAlg,
}

/// TPMA_OBJECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectAttributes(pub u32);

impl ObjectAttributes {
    pub const fn contains(self, attribute: Attribute) -> bool {
        self.0 & attribute.bit() != 0
    }
    pub const fn fixed_tpm(self) -> bool {
        self.contains(Attribute::FixedTpm)
    }
    pub const fn st_clear(self) -> bool {
        self.contains(Attribute::StClear)
    }
    pub const fn fixed_parent(self) -> bool {
        self.contains(Attribute::FixedParent)
    }
    pub const fn sensitive_data_origin(self) -> bool {
        self.contains(Attribute::SensitiveDataOrigin)
    }
    pub const fn user_with_auth(self) -> bool {
        self.contains(Attribute::UserWithAuth)
    }
    pub const fn admin_with_policy(self) -> bool {
        self.contains(Attribute::AdminWithPolicy)
    }
    pub const fn no_da(self) -> bool {
        self.contains(Attribute::NoDa)
    }
    pub const fn encrypted_duplication(self) -> bool {
        self.contains(Attribute::EncryptedDuplication)
    }
    pub const fn restricted(self) -> bool {
        self.contains(Attribute::Restricted)
    }
    pub const fn decrypt(self) -> bool {
        self.contains(Attribute::Decrypt)
    }
    pub const fn sign(self) -> bool {
        self.contains(Attribute::Sign)
    }
}

/// One TPMA_OBJECT bit, named as the specification names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Attribute {
    FixedTpm,
    StClear,
    FixedParent,
    SensitiveDataOrigin,
    UserWithAuth,
    AdminWithPolicy,
    NoDa,
    EncryptedDuplication,
    Restricted,
    Decrypt,
    Sign,
}

impl Attribute {
    pub const fn bit(self) -> u32 {
        match self {
            Attribute::FixedTpm => 1 << 1,
            Attribute::StClear => 1 << 2,
            Attribute::FixedParent => 1 << 4,
            Attribute::SensitiveDataOrigin => 1 << 5,
            Attribute::UserWithAuth => 1 << 6,
            Attribute::AdminWithPolicy => 1 << 7,
            Attribute::NoDa => 1 << 10,
            Attribute::EncryptedDuplication => 1 << 11,
            Attribute::Restricted => 1 << 16,
            Attribute::Decrypt => 1 << 17,
            Attribute::Sign => 1 << 18,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Attribute::FixedTpm => "fixedTPM",
            Attribute::StClear => "stClear",
            Attribute::FixedParent => "fixedParent",
            Attribute::SensitiveDataOrigin => "sensitiveDataOrigin",
            Attribute::UserWithAuth => "userWithAuth",
            Attribute::AdminWithPolicy => "adminWithPolicy",
            Attribute::NoDa => "noDA",
            Attribute::EncryptedDuplication => "encryptedDuplication",
            Attribute::Restricted => "restricted",
            Attribute::Decrypt => "decrypt",
            Attribute::Sign => "sign",
        }
    }
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Public {
    /// Parses a TPMT_PUBLIC (no TPM2B size in front); trailing bytes are an error.
    pub fn parse(input: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(STRUCTURE, input);
        let type_at = r.offset();
        let object_type = r.u16("type")?;
        if object_type != ALG_RSA && object_type != ALG_ECC {
            return Err(r.unsupported("type", type_at, object_type.into()));
        }
        let name_alg = r.hash_alg("nameAlg")?;
        let attributes = ObjectAttributes(r.u32("objectAttributes")?);
        let auth_policy = r.tpm2b("authPolicy", MAX_DIGEST)?.to_vec();
        let symmetric = parse_symmetric(&mut r)?;
        let mut default_exponent = false;
        let (scheme, key) = if object_type == ALG_RSA {
            let scheme = parse_scheme(&mut r, true)?;
            let key_bits = r.u16("keyBits")?;
            let raw_exponent = r.u32("exponent")?;
            default_exponent = raw_exponent == 0;
            let exponent = if default_exponent { 65537 } else { raw_exponent };
            let modulus = r.tpm2b("unique.rsa", MAX_RSA_BYTES)?.to_vec();
            (scheme, PublicKey::Rsa { key_bits, exponent, modulus })
        } else {
            let scheme = parse_scheme(&mut r, false)?;
            let curve_at = r.offset();
            let curve = match r.u16("curveID")? {
                0x0003 => EccCurve::NistP256,
                0x0004 => EccCurve::NistP384,
                other => return Err(r.unsupported("curveID", curve_at, other.into())),
            };
            let kdf = parse_kdf(&mut r)?;
            let x = r.tpm2b("unique.ecc.x", MAX_ECC_BYTES)?.to_vec();
            let y = r.tpm2b("unique.ecc.y", MAX_ECC_BYTES)?.to_vec();
            (scheme, PublicKey::Ecc { curve, kdf, x, y })
        };
        r.finish()?;
        Ok(Public { raw: input.to_vec(), name_alg, attributes, auth_policy, symmetric, scheme, key, default_exponent })
    }

    /// The TPMT_PUBLIC bytes exactly as parsed.
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    pub fn name_alg(&self) -> HashAlg {
        self.name_alg
    }

    pub fn attributes(&self) -> ObjectAttributes {
        self.attributes
    }

    pub fn auth_policy(&self) -> &[u8] {
        &self.auth_policy
    }

    pub fn symmetric(&self) -> Option<SymDef> {
        self.symmetric
    }

    pub fn scheme(&self) -> Option<Scheme> {
        self.scheme
    }

    pub fn key(&self) -> &PublicKey {
        &self.key
    }

    /// TPM2B_NAME contents: nameAlg || H_nameAlg(TPMT_PUBLIC).
    pub fn name(&self) -> Vec<u8> {
        let mut name = self.name_alg.id().to_be_bytes().to_vec();
        name.extend_from_slice(&self.name_alg.digest(&self.raw));
        name
    }

    /// The qualified name of this object as a child of the object (or hierarchy) whose
    /// qualified name is `parent`: nameAlg || H_nameAlg(QN(parent) || name). A quote carries
    /// the signer's qualified name, which binds the AK to the EK it was created under.
    pub fn qualified_name(&self, parent: &[u8]) -> Vec<u8> {
        let mut qn = self.name_alg.id().to_be_bytes().to_vec();
        qn.extend_from_slice(&self.name_alg.digest_parts(&[parent, &self.name()]));
        qn
    }

    /// Marshals the public area from its fields, for tests and fixtures; [`Public::as_bytes`]
    /// is what the TPM produced.
    pub fn marshal(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::with_capacity(self.raw.len());
        let object_type = match self.key {
            PublicKey::Rsa { .. } => ALG_RSA,
            PublicKey::Ecc { .. } => ALG_ECC,
        };
        out.extend_from_slice(&object_type.to_be_bytes());
        out.extend_from_slice(&self.name_alg.id().to_be_bytes());
        out.extend_from_slice(&self.attributes.0.to_be_bytes());
        put_tpm2b(&mut out, STRUCTURE, &self.auth_policy)?;
        match self.symmetric {
            None => out.extend_from_slice(&ALG_NULL.to_be_bytes()),
            Some(s) => {
                for v in [s.algorithm.id(), s.key_bits, s.mode] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
        }
        marshal_scheme(&mut out, self.scheme);
        match &self.key {
            PublicKey::Rsa { key_bits, exponent, modulus } => {
                out.extend_from_slice(&key_bits.to_be_bytes());
                let e = if self.default_exponent { 0 } else { *exponent };
                out.extend_from_slice(&e.to_be_bytes());
                put_tpm2b(&mut out, STRUCTURE, modulus)?;
            }
            PublicKey::Ecc { curve, kdf, x, y } => {
                out.extend_from_slice(&curve.id().to_be_bytes());
                match kdf {
                    None => out.extend_from_slice(&ALG_NULL.to_be_bytes()),
                    Some(k) => {
                        out.extend_from_slice(&k.algorithm.to_be_bytes());
                        out.extend_from_slice(&k.hash.id().to_be_bytes());
                    }
                }
                put_tpm2b(&mut out, STRUCTURE, x)?;
                put_tpm2b(&mut out, STRUCTURE, y)?;
            }
        }
        Ok(out)
    }
}

fn parse_symmetric(r: &mut Reader<'_>) -> Result<Option<SymDef>, WireError> {
    let at = r.offset();
    let alg = r.u16("symmetric.algorithm")?;
    if alg == ALG_NULL {
        return Ok(None);
    }
    let algorithm = SymAlg::from_id(alg).ok_or_else(|| r.unsupported("symmetric.algorithm", at, alg.into()))?;
    let key_bits = r.u16("symmetric.keyBits")?;
    let mode = r.u16("symmetric.mode")?;
    Ok(Some(SymDef { algorithm, key_bits, mode }))
}

fn parse_scheme(r: &mut Reader<'_>, rsa: bool) -> Result<Option<Scheme>, WireError> {
    let at = r.offset();
    let alg = r.u16("scheme.scheme")?;
    let scheme = match (rsa, alg) {
        (_, ALG_NULL) => return Ok(None),
        (true, 0x0014) => Scheme::RsaSsa(r.hash_alg("scheme.hashAlg")?),
        (true, 0x0015) => Scheme::RsaEs,
        (true, 0x0016) => Scheme::RsaPss(r.hash_alg("scheme.hashAlg")?),
        (true, 0x0017) => Scheme::Oaep(r.hash_alg("scheme.hashAlg")?),
        (false, 0x0018) => Scheme::Ecdsa(r.hash_alg("scheme.hashAlg")?),
        (false, 0x0019) => Scheme::Ecdh(r.hash_alg("scheme.hashAlg")?),
        (false, 0x001A) => Scheme::EcDaa { hash: r.hash_alg("scheme.hashAlg")?, count: r.u16("scheme.count")? },
        (false, 0x001C) => Scheme::EcSchnorr(r.hash_alg("scheme.hashAlg")?),
        _ => return Err(r.unsupported("scheme.scheme", at, alg.into())),
    };
    Ok(Some(scheme))
}

fn marshal_scheme(out: &mut Vec<u8>, scheme: Option<Scheme>) {
    let Some(scheme) = scheme else {
        out.extend_from_slice(&ALG_NULL.to_be_bytes());
        return;
    };
    out.extend_from_slice(&scheme.id().to_be_bytes());
    match scheme {
        Scheme::RsaEs => {}
        Scheme::RsaSsa(h)
        | Scheme::RsaPss(h)
        | Scheme::Oaep(h)
        | Scheme::Ecdsa(h)
        | Scheme::Ecdh(h)
        | Scheme::EcSchnorr(h) => out.extend_from_slice(&h.id().to_be_bytes()),
        Scheme::EcDaa { hash, count } => {
            out.extend_from_slice(&hash.id().to_be_bytes());
            out.extend_from_slice(&count.to_be_bytes());
        }
    }
}

fn parse_kdf(r: &mut Reader<'_>) -> Result<Option<Kdf>, WireError> {
    let at = r.offset();
    let algorithm = r.u16("kdf.scheme")?;
    match algorithm {
        ALG_NULL => Ok(None),
        // MGF1, KDF1_SP800_56A, KDF2, KDF1_SP800_108
        0x0007 | 0x0020 | 0x0021 | 0x0022 => Ok(Some(Kdf { algorithm, hash: r.hash_alg("kdf.hashAlg")? })),
        other => Err(r.unsupported("kdf.scheme", at, other.into())),
    }
}
