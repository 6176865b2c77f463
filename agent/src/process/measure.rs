//! Measurement: the sha256 of each distinct executable, computed once per kernel file
//! identity and read only through a handle that is provably the executed file.
//!
//! Reading a file can block for as long as its filesystem pleases, so measurement never runs
//! on a caller's thread: each file is hashed on a thread of its own, callers wait for it at
//! most a deadline (counted from when hashing began), and a file on FUSE or on a mount made
//! in a user namespace is not opened at all ([`super::mounts`]). A file whose hashing overran
//! gets no measurement until it finishes; at most [`PER_DEVICE`] files per device and
//! [`IN_FLIGHT`] in all are read at once, so a filesystem that never answers holds a few
//! threads, never the agent.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    fs::File,
    io::{self, Read},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tether_common::{measurement_state, FileKey, Measurement};

use super::{
    mounts::{self, Filesystem},
    pidfd::PidFd,
    FileId,
};

/// Files read at once from one device.
pub const PER_DEVICE: usize = 2;
/// Files read at once in all.
pub const IN_FLIGHT: usize = 16;

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
    /// On FUSE: the filesystem is a process (perhaps the caller's), which the agent does
    /// not wait on.
    Fuse { fstype: String },
    /// On a mount the agent's mount namespace does not have, made in a user namespace (or
    /// nowhere the agent can see): its owner controls what it serves.
    UserNamespaceMount,
    /// Hashing did not finish within the deadline (a filesystem not answering?). It goes on
    /// in the background; its result counts once it is in.
    Overdue { deadline_ms: u64 },
    /// Too many files are already being read from this device (or in all).
    Busy { device: String },
    /// Being hashed, deadline not reached: asked of a caller that does not wait
    /// ([`Wait::No`]); it should ask again later.
    Pending,
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
            Unmeasurable::Fuse { fstype } => write!(f, "on a FUSE filesystem ({fstype}): not opened"),
            Unmeasurable::UserNamespaceMount => {
                f.write_str("on a mount made in a user namespace (not in the agent's mounts): not opened")
            }
            Unmeasurable::Overdue { deadline_ms } => {
                write!(f, "hashing took longer than {deadline_ms} ms (filesystem not answering?); still trying")
            }
            Unmeasurable::Busy { device } => write!(f, "too many files being read from device {device} already"),
            Unmeasurable::Pending => f.write_str("being hashed"),
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
    /// Callers answered "overdue" because hashing had not finished within the deadline.
    pub overdue: u64,
}

/// One file being hashed: its result, once in.
struct Job {
    started: Instant,
    done: Mutex<Option<Outcome>>,
    cv: Condvar,
}

#[derive(Default)]
struct InFlight {
    jobs: HashMap<FileKey, Arc<Job>>,
    per_device: HashMap<u32, usize>,
}

struct Inner {
    max_bytes: u64,
    deadline: Duration,
    cache: Mutex<HashMap<FileKey, Outcome>>,
    stats: Mutex<MeasureStats>,
    in_flight: Mutex<InFlight>,
    /// Files already reported unmeasurable for a reason that repeats on every call.
    reported: Mutex<HashSet<FileKey>>,
    /// Counts finished measurements, for whoever waits for them without blocking.
    finished: tokio::sync::watch::Sender<u64>,
}

/// The measurement cache, keyed by the kernel's file identity (device, inode, ctime), and
/// the threads that fill it.
#[derive(Clone)]
pub struct Measurer(Arc<Inner>);

/// How long a caller of [`Measurer::measure_process`] waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Up to the deadline (a Workload API call).
    Deadline,
    /// Not at all: start hashing if need be and answer from the cache (the enforcement scan,
    /// which comes round again).
    No,
}

impl Measurer {
    pub fn new(max_bytes: u64) -> Self {
        Self::with_deadline(max_bytes, crate::config::DEFAULT_MEASURE_DEADLINE)
    }

    pub fn with_deadline(max_bytes: u64, deadline: Duration) -> Self {
        Measurer(Arc::new(Inner {
            max_bytes,
            deadline,
            cache: Mutex::default(),
            stats: Mutex::default(),
            in_flight: Mutex::default(),
            reported: Mutex::default(),
            finished: tokio::sync::watch::Sender::new(0),
        }))
    }

    /// Changes whenever a measurement finishes (the enforcement scan skips processes whose
    /// binary is still being hashed, and comes back when it is).
    pub fn finished(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.finished.subscribe()
    }

    pub fn stats(&self) -> MeasureStats {
        *self.0.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What is already known about `exe`, if anything.
    pub fn cached(&self, exe: &FileId) -> Option<Outcome> {
        self.0.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&exe.key()).cloned()
    }

    fn remember(&self, exe: &FileId, outcome: &Outcome) {
        let mut stats = self.0.stats.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Outcome::Measured { .. } => stats.hashed += 1,
            Outcome::Unmeasurable(_) => stats.unmeasurable += 1,
        }
        // Only definitive answers are cached: a process that exited says nothing about its
        // file, and an I/O error may pass.
        if matches!(outcome, Outcome::Measured { .. } | Outcome::Unmeasurable(Unmeasurable::TooLarge { .. })) {
            self.0.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(exe.key(), outcome.clone());
        }
    }

    /// Logs an unmeasurable file: at warn the first time per file (debug after, and for
    /// processes that merely exited).
    fn report(&self, pid: u32, exe: &FileId, why: &Unmeasurable) {
        if matches!(why, Unmeasurable::ProcessGone) {
            tracing::debug!(pid, exe = %exe, "executable not measured: {why}");
            return;
        }
        let mut reported = self.0.reported.lock().unwrap_or_else(|p| p.into_inner());
        if reported.len() > 4096 {
            reported.clear();
        }
        if reported.insert(exe.key()) {
            tracing::warn!(pid, exe = %exe, "executable not measured (no unix:sha256 selector): {why}");
        } else {
            tracing::debug!(pid, exe = %exe, "executable not measured: {why}");
        }
    }

    /// Measures the executable of the process behind `pidfd` (PID `pid`), recorded by the
    /// kernel as `exe`. Files on FUSE or on user-namespace mounts are never opened. Others
    /// are hashed on a thread of their own; the file is opened through /proc/<pid>/exe, and
    /// the open counts only if the pidfd's process is still alive afterwards (so the PID was
    /// not reused in between) and the opened file is exactly `exe` (device, inode, ctime).
    pub fn measure_process(&self, pidfd: &PidFd, pid: u32, exe: &FileId, wait: Wait) -> Outcome {
        if let Some(hit) = self.cached(exe) {
            self.0.stats.lock().unwrap_or_else(|p| p.into_inner()).cache_hits += 1;
            return hit;
        }
        let fs = mounts::filesystem_of(exe.dev_major, exe.dev_minor, pid);
        if !pidfd.is_alive() {
            return Outcome::Unmeasurable(Unmeasurable::ProcessGone);
        }
        let refused = match fs {
            Filesystem::Kernel { .. } => None,
            Filesystem::Fuse { fstype } => Some(Unmeasurable::Fuse { fstype }),
            Filesystem::UserNamespace => Some(Unmeasurable::UserNamespaceMount),
        };
        if let Some(why) = refused {
            self.report(pid, exe, &why);
            return Outcome::Unmeasurable(why);
        }
        let job = match self.job(pidfd, pid, exe) {
            Ok(job) => job,
            Err(why) => {
                self.report(pid, exe, &why);
                return Outcome::Unmeasurable(why);
            }
        };
        let until = match wait {
            Wait::Deadline => job.started + self.0.deadline,
            Wait::No => Instant::now(),
        };
        let mut done = job.done.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(outcome) = done.as_ref() {
                return outcome.clone();
            }
            let now = Instant::now();
            if now >= until {
                break;
            }
            done = job.cv.wait_timeout(done, until - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        drop(done);
        if Instant::now() < job.started + self.0.deadline {
            return Outcome::Unmeasurable(Unmeasurable::Pending);
        }
        let why = Unmeasurable::Overdue { deadline_ms: self.0.deadline.as_millis() as u64 };
        self.0.stats.lock().unwrap_or_else(|p| p.into_inner()).overdue += 1;
        self.report(pid, exe, &why);
        Outcome::Unmeasurable(why)
    }

    /// The job hashing `exe`: the one in flight, or a new one on a thread of its own if the
    /// device and the agent have room.
    fn job(&self, pidfd: &PidFd, pid: u32, exe: &FileId) -> Result<Arc<Job>, Unmeasurable> {
        let key = exe.key();
        let mut in_flight = self.0.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(job) = in_flight.jobs.get(&key) {
            return Ok(job.clone());
        }
        let device = in_flight.per_device.get(&key.dev).copied().unwrap_or(0);
        if device >= PER_DEVICE || in_flight.jobs.len() >= IN_FLIGHT {
            return Err(Unmeasurable::Busy { device: format!("{}:{}", exe.dev_major, exe.dev_minor) });
        }
        let pidfd = pidfd.try_clone().map_err(|e| Unmeasurable::Io { error: e.to_string() })?;
        let job = Arc::new(Job { started: Instant::now(), done: Mutex::new(None), cv: Condvar::new() });
        in_flight.jobs.insert(key, job.clone());
        *in_flight.per_device.entry(key.dev).or_default() += 1;
        drop(in_flight);
        let (me, file, theirs) = (self.clone(), *exe, job.clone());
        let spawned = std::thread::Builder::new().name("measure".into()).spawn(move || {
            let outcome = me.hash_now(&pidfd, pid, &file);
            if let Outcome::Unmeasurable(why) = &outcome {
                me.report(pid, &file, why);
            }
            me.remember(&file, &outcome);
            me.finish(&file, &theirs, outcome);
        });
        if let Err(e) = spawned {
            let why = Unmeasurable::Io { error: format!("no thread to hash on: {e}") };
            self.finish(exe, &job, Outcome::Unmeasurable(why.clone()));
            return Err(why);
        }
        Ok(job)
    }

    fn finish(&self, exe: &FileId, job: &Job, outcome: Outcome) {
        let key = exe.key();
        let mut in_flight = self.0.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        in_flight.jobs.remove(&key);
        if let Some(n) = in_flight.per_device.get_mut(&key.dev) {
            *n -= 1;
            if *n == 0 {
                in_flight.per_device.remove(&key.dev);
            }
        }
        drop(in_flight);
        // The cache is already filled (remember came first); now tell everyone.
        self.0.finished.send_modify(|n| *n += 1);
        *job.done.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
        job.cv.notify_all();
    }

    /// Opens and hashes on the calling thread (a measurement thread).
    fn hash_now(&self, pidfd: &PidFd, pid: u32, exe: &FileId) -> Outcome {
        let opened = File::open(format!("/proc/{pid}/exe"));
        if !pidfd.is_alive() {
            return Outcome::Unmeasurable(Unmeasurable::ProcessGone);
        }
        match opened {
            Ok(file) => measure_open_file(&file, exe, self.0.max_bytes),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) || e.raw_os_error() == Some(libc::ESRCH) => {
                Outcome::Unmeasurable(Unmeasurable::ProcessGone)
            }
            Err(e) => Outcome::Unmeasurable(Unmeasurable::Io { error: e.to_string() }),
        }
    }

    /// Measures a file by path (golden manifest seeding, `tether-agent measure`: files the
    /// operator names). The key is the file as opened.
    pub fn measure_path(&self, path: &std::path::Path) -> io::Result<(FileId, Outcome)> {
        let file = File::open(path)?;
        let id = FileId::from_metadata(&file.metadata()?);
        if let Some(hit) = self.cached(&id) {
            return Ok((id, hit));
        }
        let outcome = measure_open_file(&file, &id, self.0.max_bytes);
        self.remember(&id, &outcome);
        Ok((id, outcome))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::config::DEFAULT_MAX_MEASURE_BYTES;

    fn temp_file(content: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        std::fs::File::create(&path).unwrap().write_all(content).unwrap();
        (dir, path)
    }

    #[test]
    fn hashing_goes_on_past_the_deadline_and_lands_in_the_cache() {
        let pid = std::process::id();
        let me = PidFd::open(pid).unwrap();
        let exe = FileId::from_metadata(&std::fs::metadata("/proc/self/exe").unwrap());
        let expected = sha256_reader(File::open("/proc/self/exe").unwrap()).unwrap();

        // A caller that does not wait hears "pending" (unless hashing this test binary, many
        // megabytes, beat the thread that asked).
        let m = Measurer::with_deadline(DEFAULT_MAX_MEASURE_BYTES, Duration::from_secs(60));
        let finished = m.finished();
        match m.measure_process(&me, pid, &exe, Wait::No) {
            Outcome::Unmeasurable(Unmeasurable::Pending) => {}
            Outcome::Measured { sha256 } => assert_eq!(sha256, expected),
            other => panic!("{other:?}"),
        }
        // A caller that waits gets the digest, from the same job.
        assert_eq!(m.measure_process(&me, pid, &exe, Wait::Deadline), Outcome::Measured { sha256: expected });
        assert_eq!(*finished.borrow(), 1, "one job, one finish");
        assert_eq!(m.stats().hashed, 1);

        // A deadline of zero: the caller is told "overdue" at once, and the hash lands anyway.
        let m = Measurer::with_deadline(DEFAULT_MAX_MEASURE_BYTES, Duration::ZERO);
        let mut finished = m.finished();
        match m.measure_process(&me, pid, &exe, Wait::Deadline) {
            Outcome::Unmeasurable(Unmeasurable::Overdue { deadline_ms: 0 }) => assert_eq!(m.stats().overdue, 1),
            Outcome::Measured { sha256 } => assert_eq!(sha256, expected),
            other => panic!("{other:?}"),
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), finished.wait_for(|n| *n == 1)).await.unwrap().unwrap();
        });
        assert_eq!(m.cached(&exe), Some(Outcome::Measured { sha256: expected }));
        assert_eq!(m.measure_process(&me, pid, &exe, Wait::Deadline), Outcome::Measured { sha256: expected });
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
        let m = Measurer::new(DEFAULT_MAX_MEASURE_BYTES);
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
            measure_open_file(&file, &recorded, DEFAULT_MAX_MEASURE_BYTES),
            Outcome::Unmeasurable(Unmeasurable::Changed)
        );
        let now = FileId::from_metadata(&file.metadata().unwrap());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            measure_open_file(&file, &now, DEFAULT_MAX_MEASURE_BYTES),
            Outcome::Unmeasurable(Unmeasurable::Deleted)
        );
        let other = FileId { ino: now.ino + 1, ..now };
        assert_eq!(
            measure_open_file(&file, &other, DEFAULT_MAX_MEASURE_BYTES),
            Outcome::Unmeasurable(Unmeasurable::NotExecutedFile)
        );
    }
}
