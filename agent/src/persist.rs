//! What the agent keeps across restarts, in its data directory (0700; files 0600, written
//! whole and renamed into place):
//! - `bundle.json`: the latest trust bundle the server sent. The next start trusts the
//!   server with it rather than with the bootstrap file, which goes stale as the CA rotates.
//! - `identities.json`: the node's entries and the workload SVIDs (keys included) it held,
//!   with the boot they were held in, so a restart while the server is away serves them until
//!   they expire. A TPM node serves them only within the same boot: after a reboot its state
//!   must be proved again first. Removed when the server refuses the node.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    path::Path,
};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use serde::{Deserialize, Serialize};
use tether_attestors::{Selector, SpiffeId};

use crate::{
    identity::{Bundle, LocalEntry},
    svid::X509Svid,
};

const BUNDLE: &str = "bundle.json";
const IDENTITIES: &str = "identities.json";

#[derive(Serialize, Deserialize)]
struct BundleFile {
    trust_domain: String,
    x509_authorities: Vec<String>,
    jwks: String,
    sequence: i64,
}

#[derive(Serialize, Deserialize)]
struct EntryFile {
    id: String,
    spiffe_id: String,
    selectors: Vec<String>,
    hint: String,
    revision: i64,
    namespace: String,
    labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
struct SvidFile {
    entry_id: String,
    chain: Vec<String>,
    key_pkcs8: String,
    renew_after: i64,
}

#[derive(Serialize, Deserialize)]
struct IdentitiesFile {
    boot_id: String,
    entries: Vec<EntryFile>,
    svids: Vec<SvidFile>,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

fn write_private(dir: &Path, name: &str, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    io::Write::write_all(&mut f, data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}

pub fn save_bundle(dir: &Path, b: &Bundle) -> io::Result<()> {
    let file = BundleFile {
        trust_domain: b.trust_domain.clone(),
        x509_authorities: b.x509_authorities.iter().map(|a| B64.encode(a)).collect(),
        jwks: B64.encode(&b.jwks),
        sequence: b.sequence,
    };
    write_private(dir, BUNDLE, &serde_json::to_vec(&file).map_err(io::Error::other)?)
}

/// The stored bundle, if there is one for `trust_domain` with at least one authority.
pub fn load_bundle(dir: &Path, trust_domain: &str) -> Option<Bundle> {
    let text = std::fs::read(dir.join(BUNDLE)).ok()?;
    let f: BundleFile = match serde_json::from_slice(&text) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("ignoring {}: {e}", dir.join(BUNDLE).display());
            return None;
        }
    };
    let authorities: Vec<Vec<u8>> = f.x509_authorities.iter().filter_map(|a| B64.decode(a).ok()).collect();
    (f.trust_domain == trust_domain && !authorities.is_empty()).then(|| Bundle {
        trust_domain: f.trust_domain,
        x509_authorities: authorities,
        jwks: B64.decode(&f.jwks).unwrap_or_default(),
        sequence: f.sequence,
    })
}

pub fn save_identities(dir: &Path, entries: &[LocalEntry], svids: &HashMap<String, X509Svid>) -> io::Result<()> {
    let file = IdentitiesFile {
        boot_id: boot_id(),
        entries: entries
            .iter()
            .map(|e| EntryFile {
                id: e.id.clone(),
                spiffe_id: e.spiffe_id.to_string(),
                selectors: e.selectors.iter().map(|s| s.to_string()).collect(),
                hint: e.hint.clone(),
                revision: e.revision,
                namespace: e.namespace.clone(),
                labels: e.labels.clone(),
            })
            .collect(),
        svids: svids
            .iter()
            .map(|(id, s)| SvidFile {
                entry_id: id.clone(),
                chain: s.chain.iter().map(|c| B64.encode(c)).collect(),
                key_pkcs8: B64.encode(&s.key_pkcs8),
                renew_after: s.renew_after,
            })
            .collect(),
    };
    write_private(dir, IDENTITIES, &serde_json::to_vec(&file).map_err(io::Error::other)?)
}

pub fn forget_identities(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(IDENTITIES));
}

/// The entries and unexpired SVIDs held before, if any; with `same_boot`, only if they were
/// held in this boot.
pub fn load_identities(dir: &Path, same_boot: bool) -> Option<(Vec<LocalEntry>, HashMap<String, X509Svid>)> {
    let path = dir.join(IDENTITIES);
    let text = std::fs::read(&path).ok()?;
    let f: IdentitiesFile = match serde_json::from_slice(&text) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("ignoring {}: {e}", path.display());
            return None;
        }
    };
    if same_boot && f.boot_id != boot_id() {
        tracing::info!("identities held before a reboot are not served: this node must attest first");
        return None;
    }
    let entries: Vec<LocalEntry> = f
        .entries
        .into_iter()
        .filter_map(|e| {
            Some(LocalEntry {
                id: e.id,
                spiffe_id: SpiffeId::parse(&e.spiffe_id).ok()?,
                selectors: e.selectors.iter().map(|s| Selector::parse(s)).collect::<Result<_, _>>().ok()?,
                hint: e.hint,
                revision: e.revision,
                namespace: e.namespace,
                labels: e.labels,
            })
        })
        .collect();
    let now = crate::svid::now();
    let svids = f
        .svids
        .into_iter()
        .filter_map(|s| {
            let chain: Vec<u8> = s.chain.iter().map(|c| B64.decode(c).ok()).collect::<Option<Vec<_>>>()?.concat();
            let key = B64.decode(&s.key_pkcs8).ok()?;
            let pair = rcgen::KeyPair::try_from(key.as_slice()).ok()?;
            let mut svid = X509Svid::received_at(&pair, &chain, now).ok()?;
            svid.renew_after = s.renew_after;
            (svid.not_after > now).then_some((s.entry_id, svid))
        })
        .filter(|(id, svid)| entries.iter().any(|e| &e.id == id && e.spiffe_id == svid.spiffe_id))
        .collect();
    Some((entries, svids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_round_trips_and_belongs_to_its_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        let b = Bundle {
            trust_domain: "example.org".into(),
            x509_authorities: vec![vec![1, 2, 3]],
            jwks: b"{}".to_vec(),
            sequence: 7,
        };
        save_bundle(dir.path(), &b).unwrap();
        assert_eq!(load_bundle(dir.path(), "example.org"), Some(b));
        assert_eq!(load_bundle(dir.path(), "other.org"), None);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(BUNDLE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join(BUNDLE), "{not json").unwrap();
        assert_eq!(load_bundle(dir.path(), "example.org"), None);
    }

    #[test]
    fn identities_of_another_boot_are_not_loaded_when_the_boot_matters() {
        let dir = tempfile::tempdir().unwrap();
        save_identities(dir.path(), &[], &HashMap::new()).unwrap();
        assert!(load_identities(dir.path(), true).is_some());
        let text = std::fs::read_to_string(dir.path().join(IDENTITIES)).unwrap().replace(&boot_id(), "another-boot");
        std::fs::write(dir.path().join(IDENTITIES), text).unwrap();
        assert!(load_identities(dir.path(), true).is_none());
        assert!(load_identities(dir.path(), false).is_some());
        forget_identities(dir.path());
        assert!(load_identities(dir.path(), false).is_none());
    }
}
