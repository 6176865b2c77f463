//! Golden PCR policies: a directory with one TOML file per allowed set of PCR values, so an
//! image rollout is staged by adding the new image's file before the nodes reboot into it and
//! removing the old one after. `tether-agent tpm pcrs --name N` prints such a file.
//!
//! ```toml
//! name = "image-2026-11"
//! bank = "sha256"
//! [pcrs]
//! 0 = "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969"
//! 7 = "..."
//! ```
//! An empty `[pcrs]` table allows any values (an explicit, visible choice).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use serde::Deserialize;
use tether_attestors::hex;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("reading golden PCR policies from {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML errors carry the line and the key.
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: key `{key}`: {message}")]
    Invalid { path: PathBuf, key: String, message: String },
    #[error("{dir}: no golden PCR policy (*.toml): every TPM attestation would be refused")]
    Empty { dir: PathBuf },
    #[error("{path}: policy name {name:?} is also used by {other}")]
    DuplicateName { path: PathBuf, name: String, other: PathBuf },
    #[error("policies use different PCR banks ({0} and {1}); quotes cover one bank")]
    MixedBanks(String, String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: String,
    #[serde(default = "sha256")]
    bank: String,
    #[serde(default)]
    pcrs: BTreeMap<String, String>,
}

fn sha256() -> String {
    "sha256".into()
}

/// One allowed set: every listed PCR must hold exactly this value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoldenSet {
    pub name: String,
    pub pcrs: BTreeMap<u32, Vec<u8>>,
    pub path: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub bank: String,
    pub sets: Vec<GoldenSet>,
}

/// Why evidence is outside the policy: for each set, the first PCR that differs.
#[derive(Debug, thiserror::Error)]
#[error("PCR values match no golden policy ({})", .0.join("; "))]
pub struct OutsidePolicy(pub Vec<String>);

pub fn digest_len(bank: &str) -> Option<usize> {
    match bank {
        "sha1" => Some(20),
        "sha256" => Some(32),
        _ => None,
    }
}

impl Policy {
    pub fn load_dir(dir: &Path) -> Result<Policy, PolicyError> {
        let read = |source| PolicyError::Read { path: dir.to_owned(), source };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        let mut sets: Vec<GoldenSet> = Vec::new();
        let mut bank: Option<String> = None;
        for path in files {
            let text =
                std::fs::read_to_string(&path).map_err(|source| PolicyError::Read { path: path.clone(), source })?;
            let (b, set) = Self::parse_one(&text, &path)?;
            if let Some(other) = sets.iter().find(|s| s.name == set.name) {
                return Err(PolicyError::DuplicateName { path, name: set.name, other: other.path.clone() });
            }
            match &bank {
                Some(prev) if *prev != b => return Err(PolicyError::MixedBanks(prev.clone(), b)),
                _ => bank = Some(b),
            }
            sets.push(set);
        }
        let Some(bank) = bank else { return Err(PolicyError::Empty { dir: dir.to_owned() }) };
        Ok(Policy { bank, sets })
    }

    /// One policy file's text: (its bank, its set). `path` is only used in messages and kept
    /// in the set. Public for the fuzz target; [`Policy::load_dir`] is the way in.
    pub fn parse_one(text: &str, path: &Path) -> Result<(String, GoldenSet), PolicyError> {
        let f: File = toml::from_str(text).map_err(|source| PolicyError::Parse { path: path.to_owned(), source })?;
        let invalid = |key: String, message: String| PolicyError::Invalid { path: path.to_owned(), key, message };
        if f.name.is_empty() || !f.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(invalid("name".into(), format!("{:?}: use letters, digits, '-', '_', '.'", f.name)));
        }
        let len = digest_len(&f.bank)
            .ok_or_else(|| invalid("bank".into(), format!("{:?}: expected \"sha1\" or \"sha256\"", f.bank)))?;
        let mut pcrs = BTreeMap::new();
        for (k, v) in f.pcrs {
            let key = format!("pcrs.{k}");
            let index: u32 = k
                .parse()
                .ok()
                .filter(|i| *i <= 23)
                .ok_or_else(|| invalid(key.clone(), "PCR index must be 0-23".into()))?;
            let value = hex::decode(&v)
                .filter(|b| b.len() == len)
                .ok_or_else(|| invalid(key, format!("expected {} hex digits ({} digest)", len * 2, f.bank)))?;
            pcrs.insert(index, value);
        }
        Ok((f.bank, GoldenSet { name: f.name, pcrs, path: path.to_owned() }))
    }

    /// The PCRs a quote must cover: every PCR any set constrains.
    pub fn selection(&self) -> Vec<u32> {
        self.sets.iter().flat_map(|s| s.pcrs.keys().copied()).collect::<BTreeSet<_>>().into_iter().collect()
    }

    /// Names of the sets the (already quote-verified) values satisfy, or why none does.
    pub fn evaluate(&self, values: &BTreeMap<u32, Vec<u8>>) -> Result<Vec<String>, OutsidePolicy> {
        let mut reasons = Vec::new();
        let mut matched = Vec::new();
        for set in &self.sets {
            let miss = set.pcrs.iter().find(|(i, want)| values.get(i) != Some(want));
            match miss {
                None => matched.push(set.name.clone()),
                Some((i, want)) => reasons.push(format!(
                    "{}: PCR {i} is {} (expected {})",
                    set.name,
                    values.get(i).map(|v| hex::encode(v)).unwrap_or_else(|| "missing".into()),
                    hex::encode(want)
                )),
            }
        }
        if matched.is_empty() {
            Err(OutsidePolicy(reasons))
        } else {
            Ok(matched)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (n, t) in files {
            std::fs::write(d.path().join(n), t).unwrap();
        }
        d
    }

    const A: &str = "name = \"img-a\"\n[pcrs]\n0 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n7 = \"1111111111111111111111111111111111111111111111111111111111111111\"\n";
    const B: &str = "name = \"img-b\"\nbank = \"sha256\"\n[pcrs]\n7 = \"2222222222222222222222222222222222222222222222222222222222222222\"\n";

    #[test]
    fn staged_rollout_accepts_either_image_and_names_the_match() {
        let d = dir_with(&[("a.toml", A), ("b.toml", B), ("README", "not a policy")]);
        let p = Policy::load_dir(d.path()).unwrap();
        assert_eq!(p.selection(), vec![0, 7]);
        let mut v = BTreeMap::from([(0, vec![0; 32]), (7, vec![0x11; 32])]);
        assert_eq!(p.evaluate(&v).unwrap(), vec!["img-a"]);
        v.insert(7, vec![0x22; 32]);
        assert_eq!(p.evaluate(&v).unwrap(), vec!["img-b"]);
        v.insert(7, vec![0x33; 32]);
        let e = p.evaluate(&v).unwrap_err().to_string();
        assert!(e.contains("img-a: PCR 7 is 3333") && e.contains("img-b: PCR 7 is 3333"), "{e}");
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let d = dir_with(&[("bad.toml", "name = \"x\"\n[pcrs]\n7 = \"abc\"\n")]);
        let e = Policy::load_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("bad.toml: key `pcrs.7`: expected 64 hex digits"), "{e}");
        let d = dir_with(&[("bad.toml", "name = \"x\"\n\n[pcrs]\n24 = \"00\"\n")]);
        let e = Policy::load_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("key `pcrs.24`: PCR index must be 0-23"), "{e}");
        let d = dir_with(&[("bad.toml", "name = \"x\"\nbnak = \"sha1\"\n")]);
        let e = Policy::load_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("bad.toml") && e.contains("line 2") && e.contains("unknown field `bnak`"), "{e}");
        let d = dir_with(&[("a.toml", A), ("b.toml", A)]);
        assert!(Policy::load_dir(d.path()).unwrap_err().to_string().contains("also used by"));
        let d = dir_with(&[]);
        assert!(matches!(Policy::load_dir(d.path()), Err(PolicyError::Empty { .. })));
        let d = dir_with(&[("a.toml", A), ("c.toml", "name = \"c\"\nbank = \"sha1\"\n")]);
        assert!(matches!(Policy::load_dir(d.path()), Err(PolicyError::MixedBanks(..))));
    }
}
