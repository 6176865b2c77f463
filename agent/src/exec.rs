//! Exec events in user-space form.

use std::fmt;

use serde::Serialize;
use tether_common::ExecEvent;

/// A file's identity as the kernel sees it: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct FileId {
    pub dev_major: u32,
    pub dev_minor: u32,
    pub ino: u64,
}

impl FileId {
    /// From the kernel's `s_dev` encoding (`major << 20 | minor`), not userspace's `st_dev`.
    pub fn from_kernel(dev: u32, ino: u64) -> Self {
        FileId { dev_major: dev >> 20, dev_minor: dev & 0xfffff, ino }
    }

    /// From `stat()`'s `st_dev` (glibc encoding) and `st_ino`.
    pub fn from_stat(st_dev: u64, st_ino: u64) -> Self {
        FileId { dev_major: libc::major(st_dev), dev_minor: libc::minor(st_dev), ino: st_ino }
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.dev_major, self.dev_minor, self.ino)
    }
}

/// One exec, as recorded by the kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExecRecord {
    pub ktime_ns: u64,
    pub tgid: u32,
    pub pid: u32,
    pub cgroup_id: u64,
    pub uid: u32,
    pub gid: u32,
    /// None when the kernel offsets were unknown or a read failed: never a guess.
    pub exe: Option<FileId>,
    pub comm: String,
}

impl From<&ExecEvent> for ExecRecord {
    fn from(e: &ExecEvent) -> Self {
        let comm_len = e.comm.iter().position(|&b| b == 0).unwrap_or(e.comm.len());
        ExecRecord {
            ktime_ns: e.ktime_ns,
            tgid: e.tgid,
            pid: e.pid,
            cgroup_id: e.cgroup_id,
            uid: e.uid,
            gid: e.gid,
            exe: (e.exe_valid != 0).then(|| FileId::from_kernel(e.exe_dev, e.exe_ino)),
            comm: String::from_utf8_lossy(&e.comm[..comm_len]).into_owned(),
        }
    }
}

impl fmt::Display for ExecRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exec tgid={} pid={} cgroup={} uid={} gid={} exe=",
            self.tgid, self.pid, self.cgroup_id, self.uid, self.gid
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

    #[test]
    fn kernel_and_stat_device_encodings_agree() {
        // 8:1 (sda1) is 0x801 in st_dev and 8<<20|1 in the kernel.
        let st_dev = libc::makedev(8, 1);
        assert_eq!(FileId::from_stat(st_dev, 42), FileId::from_kernel(8 << 20 | 1, 42));
        // Minors above 255 use the extended encoding in st_dev.
        let st_dev = libc::makedev(259, 300);
        assert_eq!(FileId::from_stat(st_dev, 7), FileId::from_kernel(259 << 20 | 300, 7));
    }

    #[test]
    fn unreadable_exe_is_unknown_not_zero() {
        let event = ExecEvent {
            ktime_ns: 1,
            cgroup_id: 2,
            exe_ino: 0,
            exe_dev: 0,
            tgid: 3,
            pid: 3,
            uid: 0,
            gid: 0,
            exe_valid: 0,
            comm: *b"true\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        let record = ExecRecord::from(&event);
        assert_eq!(record.exe, None);
        assert_eq!(record.comm, "true");
        assert!(record.to_string().contains("exe=unknown"));
    }
}
