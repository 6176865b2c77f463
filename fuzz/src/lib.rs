//! Fixtures the fuzz targets verify against: the committed swtpm output, so fuzzed inputs
//! meet the same keys, names and nonces real evidence does.

use std::sync::LazyLock;

use tether_attestors::tpm::{
    verify::{AkVerifier, EkCaStore},
    wire::Public,
};

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../attestors/tests/fixtures/tpm/", $name)).as_slice()
    };
}

pub const QUOTE_RSA: &[u8] = fixture!("quote_rsa.attest");
pub const QUOTE_RSA_SIG: &[u8] = fixture!("quote_rsa.sig");
pub const QUOTE_RSA_NONCE: &[u8] = fixture!("quote_rsa.nonce");
pub const QUOTE_ECC: &[u8] = fixture!("quote_ecc.attest");
pub const QUOTE_ECC_SIG: &[u8] = fixture!("quote_ecc.sig");
pub const AK_RSA_NAME: &[u8] = fixture!("ak_rsa.name");

/// After the fixture CA's notBefore, long before its notAfter (9999).
pub const NOW: i64 = 4_000_000_000;

fn public(bytes: &[u8]) -> Public {
    Public::parse(bytes).expect("fixture public parses")
}

pub static EK_RSA: LazyLock<Public> = LazyLock::new(|| public(fixture!("ek_rsa.pub")));
pub static EK_ECC: LazyLock<Public> = LazyLock::new(|| public(fixture!("ek_ecc.pub")));

/// The RSA AK under the RSA EK, prepared once.
pub static AK_RSA: LazyLock<AkVerifier> =
    LazyLock::new(|| AkVerifier::new(&public(fixture!("ak_rsa.pub")), &EK_RSA).expect("fixture ak"));
/// The ECC AK under the ECC EK.
pub static AK_ECC: LazyLock<AkVerifier> =
    LazyLock::new(|| AkVerifier::new(&public(fixture!("ak_ecc.pub")), &EK_ECC).expect("fixture ak"));

pub static CA_STORE: LazyLock<EkCaStore> = LazyLock::new(|| {
    let bundle = [fixture!("ca/root.pem"), fixture!("ca/intermediate.pem")].concat();
    EkCaStore::from_pem(&bundle).expect("fixture cas")
});

/// The server's trust domain in the targets that meet the CA; the seeds use it.
pub const TRUST_DOMAIN: &str = "example.org";

/// The server's clock in those targets: 2027-01-15, inside the CA's life.
pub const SERVER_NOW: i64 = 1_800_000_000;

/// A server CA (X.509 and JWT authorities), generated once per process.
pub static CA: LazyLock<tether_server::ca::CaState> =
    LazyLock::new(|| tether_server::ca::CaState::new(TRUST_DOMAIN, SERVER_NOW, 10 * 365 * 86_400).expect("ca"));

/// What an agent holds after syncing with that server: its bundle, JWT authorities included.
pub fn agent_snapshot() -> tether_agent::identity::Snapshot {
    let bundle = tether_agent::identity::Bundle {
        trust_domain: TRUST_DOMAIN.into(),
        x509_authorities: CA.x509_authorities(),
        jwks: CA.jwt_jwks().expect("jwks").to_string().into_bytes(),
        sequence: CA.sequence,
    };
    tether_agent::identity::Snapshot::new(Vec::new(), Default::default(), bundle, true)
}
