//! Golden manifests: `path sha256` lines, as an image builder writes them for a root file
//! system, and as the agent reads them to pre-measure (and later check) known executables.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use thiserror::Error;

use super::measure::{hex, Measurer, Outcome};

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{file}:{line}: {message}")]
pub struct ManifestError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// Expected sha256 per absolute path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    pub entries: BTreeMap<PathBuf, [u8; 32]>,
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Manifest {
    /// Parses manifest text; `file` names it in errors. Blank lines and `#` comments are
    /// skipped; the digest is the last space-separated field, so paths may contain spaces.
    pub fn parse(text: &str, file: &str) -> Result<Self, ManifestError> {
        let mut entries = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let err = |message: String| ManifestError { file: file.into(), line: i + 1, message };
            let line = raw.trim_end();
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let (path, digest) = line.rsplit_once(' ').ok_or_else(|| err("expected `path sha256`".into()))?;
            let digest =
                parse_hex32(digest.trim()).ok_or_else(|| err(format!("{digest:?} is not a 64-digit hex sha256")))?;
            let path = path.trim_end();
            if !path.starts_with('/') {
                return Err(err(format!("path {path:?} is not absolute")));
            }
            if entries.insert(PathBuf::from(path), digest).is_some() {
                return Err(err(format!("{path} is listed twice")));
            }
        }
        Ok(Manifest { entries })
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (path, digest) in &self.entries {
            let _ = writeln!(out, "{} {}", path.display(), hex(digest));
        }
        out
    }

    pub fn expected(&self, path: &Path) -> Option<&[u8; 32]> {
        self.entries.get(path)
    }
}

/// Executables (regular files with an exec bit) under `root`, not crossing into other file
/// systems (/proc, /sys, bind mounts) and not following symlinks.
pub fn executables(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let root_dev = std::fs::symlink_metadata(root)?.dev();
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.dev() != root_dev {
                continue;
            }
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The manifest path of `file` found under `root` (`/usr/bin/x` for `<root>/usr/bin/x`).
pub fn manifest_path(root: &Path, file: &Path) -> Option<PathBuf> {
    let rel = file.strip_prefix(root).ok()?;
    let s = rel.to_str()?;
    (!s.contains('\n')).then(|| Path::new("/").join(rel))
}

/// Outcome of pre-measuring a manifest's files on this host.
#[derive(Debug, Default)]
pub struct SeedReport {
    pub matched: usize,
    pub mismatched: Vec<PathBuf>,
    pub missing: Vec<PathBuf>,
    pub unmeasurable: Vec<PathBuf>,
}

/// Measures every file a manifest lists (under `root`, `/` on a host) so that their first
/// exec is a cache hit. The manifest says what the files should be; only hashing them says
/// what they are, so the cache holds the real digests and differences are reported.
pub fn seed(measurer: &Measurer, manifest: &Manifest, root: &Path) -> SeedReport {
    let mut report = SeedReport::default();
    for (path, expected) in &manifest.entries {
        let on_disk = root.join(path.strip_prefix("/").unwrap_or(path));
        match measurer.measure_path(&on_disk) {
            Ok((_, Outcome::Measured { sha256 })) if &sha256 == expected => report.matched += 1,
            Ok((_, Outcome::Measured { .. })) => {
                tracing::warn!(path = %path.display(), "file differs from the golden manifest");
                report.mismatched.push(path.clone());
            }
            Ok((_, Outcome::Unmeasurable(why))) => {
                tracing::warn!(path = %path.display(), "manifest file not measured: {why}");
                report.unmeasurable.push(path.clone());
            }
            Err(_) => report.missing.push(path.clone()),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn round_trips_and_allows_spaces() {
        let text = format!("# built by image-builder\n/usr/bin/true {H}\n\n/opt/my app/run {H}\n");
        let m = Manifest::parse(&text, "golden.txt").unwrap();
        assert_eq!(m.entries.len(), 2);
        assert!(m.expected(Path::new("/opt/my app/run")).is_some());
        assert_eq!(Manifest::parse(&m.render(), "x").unwrap(), m);
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = Manifest::parse(&format!("/a {H}\nrelative {H}\n"), "g.txt").unwrap_err();
        assert_eq!(e.to_string(), "g.txt:2: path \"relative\" is not absolute");
        let e = Manifest::parse("/a deadbeef\n", "g.txt").unwrap_err();
        assert_eq!((e.line, e.message.contains("not a 64-digit hex")), (1, true));
        let e = Manifest::parse(&format!("/a {H}\n/a {H}\n"), "g.txt").unwrap_err();
        assert_eq!(e.message, "/a is listed twice");
        assert!(Manifest::parse("/a\n", "g.txt").is_err());
    }

    #[test]
    fn walks_executables_and_seeds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("usr/bin")).unwrap();
        let bin = dir.path().join("usr/bin/tool");
        std::fs::write(&bin, b"abc").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("usr/bin/data"), b"x").unwrap();
        std::os::unix::fs::symlink(&bin, dir.path().join("usr/bin/link")).unwrap();
        let found = executables(dir.path()).unwrap();
        assert_eq!(found, vec![bin.clone()]);
        assert_eq!(manifest_path(dir.path(), &bin).unwrap(), Path::new("/usr/bin/tool"));

        let manifest = Manifest::parse(&format!("/usr/bin/tool {H}\n/usr/bin/gone {H}\n"), "m").unwrap();
        let measurer = Measurer::new(1 << 20);
        let report = seed(&measurer, &manifest, dir.path());
        assert_eq!((report.matched, report.missing.len()), (1, 1));
        std::fs::write(&bin, b"abd").unwrap();
        let report = seed(&measurer, &manifest, dir.path());
        assert_eq!(report.mismatched, vec![PathBuf::from("/usr/bin/tool")]);
    }
}
