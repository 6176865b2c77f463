//! Against a live private swtpm: the TPM itself judges our MakeCredential, and fresh quotes
//! and EK certificates go through the verifier.

use tether_attestors::tpm::{
    credential::make_credential,
    verify::{check_ek_matches_certificate, verify_ek_certificate, AkVerifier, EkCaStore},
    wire::Public,
};

use super::swtpm::{Swtpm, EK_ECC, EK_RSA};

/// tpm2-tools' credential file: magic 0xBADCC0DE, version 1, TPM2B_ID_OBJECT and
/// TPM2B_ENCRYPTED_SECRET, each with its size (tpm2_makecredential writes the same).
fn tpm2_tools_credential_file(blob: &[u8], secret: &[u8]) -> Vec<u8> {
    let mut out = 0xBADC_C0DEu32.to_be_bytes().to_vec();
    out.extend_from_slice(&1u32.to_be_bytes());
    for part in [blob, secret] {
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

fn ak_ctx(ek: &str) -> String {
    format!("ak-{ek}.ctx")
}

/// Creates (once) an AK under `ek`; returns its TPMT_PUBLIC and name.
fn ak(tpm: &Swtpm, ek: &str, args: &[&str]) -> (Public, Vec<u8>) {
    let (ctx, name, public) = (ak_ctx(ek), format!("ak-{ek}.name"), format!("ak-{ek}.pub"));
    if !tpm.path(&ctx).exists() {
        let mut all = vec!["-C", ek, "-c", &ctx, "-n", &name, "-u", &public, "-f", "tpmt"];
        all.extend_from_slice(args);
        tpm.tool("tpm2_createak", &all);
        tpm.tool("tpm2_flushcontext", &["-t"]);
    }
    (Public::parse(&tpm.read(&public)).unwrap(), tpm.read(&name))
}

fn ek_public(tpm: &Swtpm, ek: &str) -> Public {
    let file = format!("ek-{ek}.pub");
    tpm.tool("tpm2_readpublic", &["-c", ek, "-f", "tpmt", "-o", &file]);
    Public::parse(&tpm.read(&file)).unwrap()
}

/// Makes a credential in Rust for `name` and returns what tpm2_activatecredential recovered
/// with the AK under `ek`, or its stderr when the TPM refused.
fn activate(tpm: &Swtpm, ek: &str, name: &[u8], secret: &[u8]) -> Result<Vec<u8>, String> {
    let made = make_credential(&ek_public(tpm, ek), name, secret).unwrap();
    std::fs::write(tpm.path("cred.in"), tpm2_tools_credential_file(&made.credential_blob, &made.encrypted_secret))
        .unwrap();
    let ctx = ak_ctx(ek);
    let mut args = vec!["-c", ctx.as_str(), "-C", ek, "-i", "cred.in", "-o", "cred.out"];
    let rsa_ek = ek == EK_RSA;
    if rsa_ek {
        // The RSA EK carries the default EK policy (PolicySecret on the endorsement hierarchy).
        tpm.tool("tpm2_startauthsession", &["--policy-session", "-S", "session.ctx"]);
        tpm.tool("tpm2_policysecret", &["-S", "session.ctx", "-c", "e"]);
        args.extend_from_slice(&["-P", "session:session.ctx"]);
    }
    let out = tpm.try_tool("tpm2_activatecredential", &args);
    if rsa_ek {
        tpm.tool("tpm2_flushcontext", &["session.ctx"]);
    }
    tpm.tool("tpm2_flushcontext", &["-t"]);
    if out.status.success() {
        Ok(tpm.read("cred.out"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn make_credential_is_activated_by_a_real_tpm() {
    let tpm = Swtpm::start();
    // RSA-2048 EK: SHA-256 name, AES-128-CFB, seed by RSA-OAEP.
    let (_, rsa_ak) = ak(&tpm, EK_RSA, &["-G", "rsa", "-g", "sha256", "-s", "rsassa"]);
    let secret: Vec<u8> = (1..=32).collect();
    assert_eq!(activate(&tpm, EK_RSA, &rsa_ak, &secret).unwrap(), secret);
    assert_eq!(activate(&tpm, EK_RSA, &rsa_ak, b"x").unwrap(), b"x");
    // ECC P-384 EK: SHA-384 name, AES-256-CFB, seed by ECDH + KDFe.
    let (_, ecc_ak) = ak(&tpm, EK_ECC, &["-G", "ecc256", "-g", "sha256", "-s", "ecdsa"]);
    let secret: Vec<u8> = (1..=48).collect();
    assert_eq!(activate(&tpm, EK_ECC, &ecc_ak, &secret).unwrap(), secret);
    // Bound to the AK's name: the TPM refuses a credential made for another name.
    let mut other = ecc_ak.clone();
    *other.last_mut().unwrap() ^= 1;
    let refused = activate(&tpm, EK_ECC, &other, b"secret").unwrap_err();
    assert!(refused.contains("integrity"), "{refused}");
}

#[test]
fn fresh_evidence_from_a_real_tpm_verifies() {
    let tpm = Swtpm::start();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let store = EkCaStore::load_dir(tpm.ca_dir()).unwrap();
    for (ek, nv) in [(EK_RSA, "0x01c00002"), (EK_ECC, "0x01c00016")] {
        tpm.tool("tpm2_nvread", &[nv, "-o", "ek.crt"]);
        let cert = verify_ek_certificate(&store, &tpm.read("ek.crt"), &[], now).unwrap();
        check_ek_matches_certificate(&ek_public(&tpm, ek), &cert).unwrap();
    }

    let (ak_public, _) = ak(&tpm, EK_RSA, &["-G", "rsa", "-g", "sha256", "-s", "rsassa"]);
    let verifier = AkVerifier::new(&ak_public, &ek_public(&tpm, EK_RSA)).unwrap();
    tpm.tool("tpm2_pcrextend", &["7:sha256=0000000000000000000000000000000000000000000000000000000000000001"]);
    let nonce = "00112233445566778899aabbccddeeff";
    tpm.tool(
        "tpm2_quote",
        &["-c", &ak_ctx(EK_RSA), "-l", "sha256:0,7", "-q", nonce, "-g", "sha256", "-m", "q.attest", "-s", "q.sig"],
    );
    tpm.tool("tpm2_pcrread", &["sha256:0,7", "-o", "q.values"]);
    let values = tpm.read("q.values");
    let mut pcrs = tether_attestors::tpm::verify::PcrValues::new();
    pcrs.insert_named("sha256", 0, values[..32].to_vec()).unwrap();
    pcrs.insert_named("sha256", 7, values[32..64].to_vec()).unwrap();
    let info = verifier.verify_quote(&tpm.read("q.attest"), &tpm.read("q.sig"), &super::unhex(nonce), &pcrs).unwrap();
    assert_eq!(info.selection.len(), 2);
}
