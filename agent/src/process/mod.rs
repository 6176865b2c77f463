//! Processes as the kernel recorded them, and what the agent derives from that record:
//! measurements, selectors, and the identity of a Workload API caller.

pub mod caller;
pub mod manifest;
pub mod measure;
pub mod mounts;
pub mod pidfd;
pub mod ps;
pub mod selectors;

use std::fmt;

use serde::Serialize;
use tether_common::{record_flags, FileKey, ProcRecord};

/// A file's identity as the kernel sees it: device, inode, and ctime as change indicator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct FileId {
    pub dev_major: u32,
    pub dev_minor: u32,
    pub ino: u64,
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
}

impl FileId {
    /// From the kernel's encoding (`s_dev` is `major << 20 | minor`).
    pub fn from_key(k: &FileKey) -> Self {
        FileId {
            dev_major: k.dev >> 20,
            dev_minor: k.dev & 0xfffff,
            ino: k.ino,
            ctime_sec: k.ctime_sec,
            ctime_nsec: k.ctime_nsec,
        }
    }

    /// From `stat()`: glibc's `st_dev` encoding differs from the kernel's.
    pub fn from_metadata(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev_major: libc::major(m.dev()),
            dev_minor: libc::minor(m.dev()),
            ino: m.ino(),
            ctime_sec: m.ctime(),
            ctime_nsec: m.ctime_nsec() as u32,
        }
    }

    pub fn key(&self) -> FileKey {
        FileKey {
            ino: self.ino,
            ctime_sec: self.ctime_sec,
            ctime_nsec: self.ctime_nsec,
            dev: self.dev_major << 20 | self.dev_minor,
        }
    }

    /// Same file (device and inode), whatever its ctime.
    pub fn same_file(&self, other: &FileId) -> bool {
        (self.dev_major, self.dev_minor, self.ino) == (other.dev_major, other.dev_minor, other.ino)
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.dev_major, self.dev_minor, self.ino)
    }
}

/// How the record came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// Written at the process's exec.
    Exec,
    /// Copied from the parent at fork; no exec since.
    Forked,
    /// The process predates the programs: read from its task by the start-up iterator.
    Seeded,
}

/// The kernel's record of a process, in user-space form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Record {
    pub tgid: u32,
    pub ppid: u32,
    pub start_boottime_ns: u64,
    pub exec_ktime_ns: u64,
    pub cgroup_id: u64,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    /// None when the kernel could not read it: never a guess.
    pub exe: Option<FileId>,
    pub origin: Origin,
    pub comm: String,
}

impl From<&ProcRecord> for Record {
    fn from(r: &ProcRecord) -> Self {
        let comm_len = r.comm.iter().position(|&b| b == 0).unwrap_or(r.comm.len());
        let origin = if r.flags & record_flags::SEEDED != 0 {
            Origin::Seeded
        } else if r.flags & record_flags::FORKED != 0 {
            Origin::Forked
        } else {
            Origin::Exec
        };
        Record {
            tgid: r.tgid,
            ppid: r.ppid,
            start_boottime_ns: r.start_boottime_ns,
            exec_ktime_ns: r.exec_ktime_ns,
            cgroup_id: r.cgroup_id,
            uid: r.uid,
            euid: r.euid,
            gid: r.gid,
            egid: r.egid,
            exe: (r.flags & record_flags::EXE_VALID != 0).then(|| FileId::from_key(&r.exe)),
            origin,
            comm: String::from_utf8_lossy(&r.comm[..comm_len]).into_owned(),
        }
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tgid={} ppid={} cgroup={} uid={} gid={} exe=",
            self.tgid, self.ppid, self.cgroup_id, self.euid, self.egid
        )?;
        match self.exe {
            Some(id) => write!(f, "{id}")?,
            None => f.write_str("unknown")?,
        }
        write!(f, " comm={}", self.comm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(flags: u32) -> ProcRecord {
        ProcRecord {
            exe: FileKey { ino: 42, ctime_sec: 1, ctime_nsec: 2, dev: 8 << 20 | 1 },
            start_boottime_ns: 1,
            exec_ktime_ns: 2,
            cgroup_id: 3,
            tgid: 4,
            ppid: 1,
            uid: 0,
            euid: 0,
            gid: 0,
            egid: 0,
            flags,
            _pad: 0,
            comm: *b"true\0\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    #[test]
    fn kernel_and_stat_device_encodings_agree() {
        let k = FileId::from_key(&raw(record_flags::EXE_VALID).exe);
        assert_eq!((k.dev_major, k.dev_minor), (8, 1));
        assert_eq!(k.key(), raw(0).exe);
        // Minors above 255 use glibc's extended st_dev encoding.
        let st_dev = libc::makedev(259, 300);
        assert_eq!((libc::major(st_dev), libc::minor(st_dev)), (259, 300));
    }

    #[test]
    fn unreadable_exe_is_unknown_not_zero() {
        let r = Record::from(&raw(0));
        assert_eq!(r.exe, None);
        assert_eq!(r.comm, "true");
        assert!(r.to_string().contains("exe=unknown"));
    }

    #[test]
    fn origin_follows_flags() {
        assert_eq!(Record::from(&raw(record_flags::EXE_VALID)).origin, Origin::Exec);
        assert_eq!(Record::from(&raw(record_flags::EXE_VALID | record_flags::FORKED)).origin, Origin::Forked);
        assert_eq!(Record::from(&raw(record_flags::SEEDED | record_flags::FORKED)).origin, Origin::Seeded);
    }
}
