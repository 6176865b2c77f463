//! Which filesystem an executable lives on, decided without touching the file: a FUSE
//! filesystem is served by a process (maybe the caller's own), and a mount made in a user
//! namespace by whoever owns that namespace. The agent neither opens nor stats files on
//! either, so neither can stall it or answer for it.

use std::os::{fd::AsRawFd, unix::fs::MetadataExt};

/// Where a file's device is mounted, as far as measurement is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filesystem {
    /// Mounted in the agent's mount namespace (or a namespace of the initial user namespace)
    /// by something other than FUSE: read with a deadline.
    Kernel { fstype: String },
    /// FUSE (`fuse`, `fuseblk`, `fuse.*`): never opened.
    Fuse { fstype: String },
    /// Not mounted where root made the mounts: found only in a mount namespace owned by a
    /// user namespace, or nowhere the agent can see. Never opened.
    UserNamespace,
}

/// The filesystem type of the mount with device `major:minor` in a mountinfo text.
pub fn fstype_in(mountinfo: &str, major: u32, minor: u32) -> Option<String> {
    let dev = format!("{major}:{minor}");
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split(' ');
        (fields.nth(2)? == dev).then_some(())?;
        // After the optional fields comes " - fstype source options".
        let (_, rest) = line.split_once(" - ")?;
        rest.split(' ').next().map(str::to_owned)
    })
}

fn classify(fstype: String) -> Filesystem {
    if fstype == "fuse" || fstype == "fuseblk" || fstype.starts_with("fuse.") {
        Filesystem::Fuse { fstype }
    } else {
        Filesystem::Kernel { fstype }
    }
}

/// NS_GET_USERNS: the user namespace owning a namespace.
const NS_GET_USERNS: libc::c_ulong = 0xb701;

/// The inode of the user namespace that owns process `pid`'s mount namespace.
fn mount_ns_owner(pid: u32) -> Option<u64> {
    let mnt = std::fs::File::open(format!("/proc/{pid}/ns/mnt")).ok()?;
    // SAFETY: ioctl on an fd we own; it returns a new fd or -1.
    let fd = unsafe { libc::ioctl(mnt.as_raw_fd(), NS_GET_USERNS) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh fd we now own.
    let owner = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    owner.metadata().ok().map(|m| m.ino())
}

/// The filesystem of device `major:minor`, which process `pid` executed from: looked up in
/// the agent's mounts, then in the process's if its mount namespace belongs to the agent's
/// user namespace (a container runtime's private mounts). The caller must check afterwards
/// that `pid` is still the process it means (its pidfd is alive).
pub fn filesystem_of(major: u32, minor: u32, pid: u32) -> Filesystem {
    if let Some(fstype) = std::fs::read_to_string("/proc/self/mountinfo").ok().and_then(|m| fstype_in(&m, major, minor))
    {
        return classify(fstype);
    }
    let ours = std::fs::metadata("/proc/self/ns/user").map(|m| m.ino()).ok();
    if ours.is_some() && mount_ns_owner(pid) == ours {
        if let Some(fstype) =
            std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok().and_then(|m| fstype_in(&m, major, minor))
        {
            return classify(fstype);
        }
    }
    Filesystem::UserNamespace
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
35 22 0:31 / /tmp/fuse rw,nosuid,nodev,relatime shared:17 - fuse.sshfs host:/ rw,user_id=0,group_id=0
36 22 0:32 / /mnt/plain rw,relatime - fuse /dev/fuse rw
37 22 0:33 / /var/lib/docker/overlay2/x/merged rw,relatime - overlay overlay rw,lowerdir=/a
";

    #[test]
    fn the_device_names_the_mount_and_its_type() {
        assert_eq!(fstype_in(MOUNTINFO, 254, 0).as_deref(), Some("ext4"));
        assert_eq!(fstype_in(MOUNTINFO, 0, 31).as_deref(), Some("fuse.sshfs"));
        assert_eq!(fstype_in(MOUNTINFO, 0, 33).as_deref(), Some("overlay"));
        assert_eq!(fstype_in(MOUNTINFO, 0, 3), None);
        assert_eq!(fstype_in(MOUNTINFO, 25, 40), None, "254:0 must not match a prefix");
    }

    #[test]
    fn fuse_in_any_spelling_is_fuse() {
        for t in ["fuse", "fuseblk", "fuse.sshfs", "fuse.fuse-overlayfs"] {
            assert!(matches!(classify(t.into()), Filesystem::Fuse { .. }), "{t}");
        }
        for t in ["ext4", "overlay", "tmpfs", "fusectl", "virtiofs"] {
            assert!(matches!(classify(t.into()), Filesystem::Kernel { .. }), "{t}");
        }
    }

    #[test]
    fn the_agents_own_root_is_a_kernel_filesystem() {
        let meta = std::fs::metadata("/proc/self/exe").unwrap();
        let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
        assert!(matches!(filesystem_of(major, minor, std::process::id()), Filesystem::Kernel { .. }));
    }
}
