//! An independent SPIFFE client (the Rust `spiffe` crate, unchanged) used by the tests as a
//! workload: it finds the agent through SPIFFE_ENDPOINT_SOCKET like any workload would and
//! prints what it received as JSON lines.

use std::time::Duration;

use spiffe::{JwtSource, WorkloadApiClient, X509Source};

fn sha(bytes: &[u8]) -> String {
    // A short fingerprint so rotations are visible without printing certificates.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        // x509 [ROTATIONS]: the SVID now, then after each of ROTATIONS updates.
        Some("x509") => {
            let rotations: u32 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(0);
            let source = tokio::time::timeout(Duration::from_secs(20), X509Source::new()).await??;
            let mut updates = source.updated();
            for i in 0..=rotations {
                if i > 0 {
                    tokio::time::timeout(Duration::from_secs(30), updates.changed()).await??;
                }
                let svid = source.svid()?;
                let bundles = source.bundle_set()?;
                let td = svid.spiffe_id().trust_domain();
                let roots = bundles.get(td).map(|b| b.authorities().len()).unwrap_or(0);
                println!(
                    "{{\"spiffe_id\":\"{}\",\"leaf\":\"{}\",\"chain\":{},\"roots\":{}}}",
                    svid.spiffe_id(),
                    sha(svid.leaf().as_bytes()),
                    svid.cert_chain().len(),
                    roots
                );
            }
        }
        // jwt AUDIENCE: fetch a JWT-SVID, then have the Workload API validate it.
        Some("jwt") => {
            let audience = args.get(2).ok_or("jwt needs an audience")?;
            let source = tokio::time::timeout(Duration::from_secs(20), JwtSource::new()).await??;
            let svid = source.fetch_jwt_svid([audience.as_str()]).await?;
            let client = WorkloadApiClient::connect_env().await?;
            let validated = client.validate_jwt_token(audience, svid.token()).await?;
            println!(
                "{{\"spiffe_id\":\"{}\",\"validated\":\"{}\",\"token\":\"{}\"}}",
                svid.spiffe_id(),
                validated.spiffe_id(),
                svid.token()
            );
        }
        _ => return Err("usage: tether-spiffe-client x509 [ROTATIONS] | jwt AUDIENCE".into()),
    }
    Ok(())
}
