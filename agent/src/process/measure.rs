//! Measurement: the sha256 of each distinct executable, computed once per kernel file
//! identity and read only through a handle that is provably the executed file.

use std::{
    collections::HashMap,
    fmt,
    fs::File,
    io::{self, Read},
    sync::Mutex,
};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tether_common::{measurement_state, FileKey, Measurement};

use super::{pidfd::PidFd, FileId};

/// Default cap: executables above this are not hashed (configurable).
pub const DEFAULT_MAX_BYTES: u64 = 512 * 1024 * 1024;

/// Why an executable has no measurement. Each is logged; none yields a `unix:sha256`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum Unmeasurable {
    /// Larger than the configured cap.
    TooLarge { size: u64, cap: u64 },
    /// Unlinked since exec: no name on disk to match, and its ctime moved.
    Deleted,
    /// Same inode, but changed (ctime moved) since exec or while hashing: what could be
    /// read now is not what was executed.
    Changed,
    /// The process exited before its executable could be opened.
    ProcessGone,
    /// /proc/<pid>/exe is not the file the kernel recorded at exec.
    NotExecutedFile,
    /// Reading failed.
    Io { error: String },
}

impl fmt::Display for Unmeasurable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unmeasurable::TooLarge { size, cap } => write!(f, "{size} bytes is over the {cap}-byte measurement cap"),
            Unmeasurable::Deleted => f.write_str("deleted since exec"),
            Unmeasurable::Changed => f.write_str("changed since exec"),
            Unmeasurable::ProcessGone => f.write_str("process exited before measurement"),
            Unmeasurable::NotExecutedFile => f.write_str("/proc/<pid>/exe is not the executed file"),
            Unmeasurable::Io { error } => write!(f, "read failed: {error}"),
        }
    }
}

/// A measurement result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Outcome {
    Measured {
        #[serde(serialize_with = "hex_ser")]
        sha256: [u8; 32],
    },
    Unmeasurable(Unmeasurable),
}

fn hex_ser<S: serde::Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex(v))
}

pub use tether_attestors::hex::encode as hex;

impl Outcome {
    pub fn sha256(&self) -> Option<[u8; 32]> {
        match self {
            Outcome::Measured { sha256 } => Some(*sha256),
            Outcome::Unmeasurable(_) => None,
        }
    }

    /// The form kernel hooks read.
    pub fn to_kernel(&self) -> Measurement {
        match self {
            Outcome::Measured { sha256 } => {
                Measurement { sha256: *sha256, state: measurement_state::MEASURED, _pad: 0 }
            }
            Outcome::Unmeasurable(_) => {
                Measurement { sha256: [0; 32], state: measurement_state::UNMEASURABLE, _pad: 0 }
            }
        }
    }
}

/// Streams a file through sha256 in 128 KiB reads.
pub fn sha256_reader(mut r: impl Read) -> io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hasher.finalize().into())
}

/// Hashes an open file if its identity is exactly `expected` before and after reading.
pub fn measure_open_file(file: &File, expected: &FileId, cap: u64) -> Outcome {
    let check = |file: &File| -> Result<u64, Unmeasurable> {
        let meta = file.metadata().map_err(|e| Unmeasurable::Io { error: e.to_string() })?;
        let now = FileId::from_metadata(&meta);
        if !now.same_file(expected) {
            return Err(Unmeasurable::NotExecutedFile);
        }
        use std::os::unix::fs::MetadataExt;
        if meta.nlink() == 0 {
            return Err(Unmeasurable::Deleted);
        }
        if now != *expected {
            return Err(Unmeasurable::Changed);
        }
        Ok(meta.len())
    };
    let size = match check(file) {
        Ok(size) => size,
        Err(e) => return Outcome::Unmeasurable(e),
    };
    if size > cap {
        return Outcome::Unmeasurable(Unmeasurable::TooLarge { size, cap });
    }
    let sha256 = match sha256_reader(file) {
        Ok(h) => h,
        Err(e) => return Outcome::Unmeasurable(Unmeasurable::Io { error: e.to_string() }),
    };
    // A write while hashing moves ctime: then the digest may mix old and new content.
    match check(file) {
        Ok(_) => Outcome::Measured { sha256 },
        Err(e) => Outcome::Unmeasurable(e),
    }
}

/// Counters for benchmarks and metrics.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct MeasureStats {
    pub hashed: u64,
    pub cache_hits: u64,
    pub unmeasurable: u64,
}

/// The measurement cache, keyed by the kernel's file identity (device, inode, ctime).
pub struct Measurer {
    max_bytes: u64,
    cache: Mutex<HashMap<FileKey, Outcome>>,
    stats: Mutex<MeasureStats>,
}

impl Measurer {
    pub fn new(max_bytes: u64) -> Self {
        Measurer { max_bytes, cache: Mutex::default(), stats: Mutex::default() }
    }

    pub fn stats(&self) -> MeasureStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What is already known about `exe`, if anything.
    pub fn cached(&self, exe: &FileId) -> Option<Outcome> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&exe.key()).cloned()
    }

    fn remember(&self, exe: &FileId, outcome: &Outcome) {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Outcome::Measured { .. } => stats.hashed += 1,
            Outcome::Unmeasurable(_) => stats.unmeasurable += 1,
        }
        // Only definitive answers are cached: a process that exited says nothing about its
        // file, and an I/O error may pass.
        if matches!(outcome, Outcome::Measured { .. } | Outcome::Unmeasurable(Unmeasurable::TooLarge { .. })) {
            self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(exe.key(), outcome.clone());
        }
    }

    /// Measures the executable of the process behind `pidfd` (PID `pid`), recorded by the
    /// kernel as `exe`. The file is opened through /proc/<pid>/exe; the open counts only if
    /// the pidfd's process is still alive afterwards (so the PID was not reused in between)
    /// and the opened file is exactly `exe` (device, inode, ctime).
    pub fn measure_process(&self, pidfd: &PidFd, pid: u32, exe: &FileId) -> Outcome {
        if let Some(hit) = self.cached(exe) {
            self.stats.lock().unwrap_or_else(|p| p.into_inner()).cache_hits += 1;
            return hit;
        }
        let opened = File::open(format!("/proc/{pid}/exe"));
        if !pidfd.is_alive() {
            return Outcome::Unmeasurable(Unmeasurable::ProcessGone);
        }
        let outcome = match opened {
            Ok(file) => measure_open_file(&file, exe, self.max_bytes),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) || e.raw_os_error() == Some(libc::ESRCH) => {
                Outcome::Unmeasurable(Unmeasurable::ProcessGone)
            }
            Err(e) => Outcome::Unmeasurable(Unmeasurable::Io { error: e.to_string() }),
        };
        match &outcome {
            Outcome::Unmeasurable(why @ Unmeasurable::ProcessGone) => {
                tracing::debug!(pid, exe = %exe, "executable not measured: {why}")
            }
            Outcome::Unmeasurable(why) => tracing::warn!(pid, exe = %exe, "executable not measured: {why}"),
            Outcome::Measured { .. } => {}
        }
        self.remember(exe, &outcome);
        outcome
    }

    /// Measures a file by path (golden manifest seeding). The key is the file as opened.
    pub fn measure_path(&self, path: &std::path::Path) -> io::Result<(FileId, Outcome)> {
        let file = File::open(path)?;
        let id = FileId::from_metadata(&file.metadata()?);
        if let Some(hit) = self.cached(&id) {
            return Ok((id, hit));
        }
        let outcome = measure_open_file(&file, &id, self.max_bytes);
        self.remember(&id, &outcome);
        Ok((id, outcome))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn temp_file(content: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        std::fs::File::create(&path).unwrap().write_all(content).unwrap();
        (dir, path)
    }

    #[test]
    fn known_digest() {
        // sha256("abc")
        assert_eq!(
            hex(&sha256_reader(&b"abc"[..]).unwrap()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn measures_once_per_identity() {
        let (_d, path) = temp_file(b"abc");
        let m = Measurer::new(DEFAULT_MAX_BYTES);
        let (id, first) = m.measure_path(&path).unwrap();
        let (_, second) = m.measure_path(&path).unwrap();
        assert_eq!(first, second);
        assert_eq!(m.cached(&id), Some(first));
        assert_eq!(m.stats().hashed, 1);
    }

    #[test]
    fn over_the_cap_is_unmeasurable_not_truncated() {
        let (_d, path) = temp_file(&[7u8; 4096]);
        let m = Measurer::new(1000);
        let (_, outcome) = m.measure_path(&path).unwrap();
        assert_eq!(outcome, Outcome::Unmeasurable(Unmeasurable::TooLarge { size: 4096, cap: 1000 }));
        assert_eq!(outcome.to_kernel().state, measurement_state::UNMEASURABLE);
    }

    #[test]
    fn changed_or_deleted_files_are_refused() {
        let (_d, path) = temp_file(b"v1");
        let file = File::open(&path).unwrap();
        let recorded = FileId::from_metadata(&file.metadata().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"v2").unwrap();
        assert_eq!(
            measure_open_file(&file, &recorded, DEFAULT_MAX_BYTES),
            Outcome::Unmeasurable(Unmeasurable::Changed)
        );
        let now = FileId::from_metadata(&file.metadata().unwrap());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(measure_open_file(&file, &now, DEFAULT_MAX_BYTES), Outcome::Unmeasurable(Unmeasurable::Deleted));
        let other = FileId { ino: now.ino + 1, ..now };
        assert_eq!(
            measure_open_file(&file, &other, DEFAULT_MAX_BYTES),
            Outcome::Unmeasurable(Unmeasurable::NotExecutedFile)
        );
    }
}
