//! cgroup v2 facts the agent needs: where the v2 hierarchy is mounted and the id of a cgroup
//! (what `bpf_get_current_cgroup_id` returns: the inode number of its directory).

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("no cgroup2 file system in /proc/mounts: Tether needs the unified hierarchy")]
    NoCgroup2,
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not inside the cgroup2 hierarchy mounted at {root}")]
    OutsideHierarchy { path: PathBuf, root: PathBuf },
}

/// Mount point of the cgroup2 hierarchy, from a `/proc/mounts`-formatted text. On hybrid
/// systems (v1 controllers beside v2) it is e.g. `/sys/fs/cgroup/unified`.
pub fn cgroup2_root_from(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let oct: String = chars.clone().take(3).collect();
            if let Ok(v) = u8::from_str_radix(&oct, 8) {
                out.push(v as char);
                for _ in 0..3 {
                    chars.next();
                }
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// Mount point of this machine's cgroup2 hierarchy.
pub fn cgroup2_root() -> Result<PathBuf, CgroupError> {
    let mounts = std::fs::read_to_string("/proc/mounts")
        .map_err(|source| CgroupError::Io { path: "/proc/mounts".into(), source })?;
    cgroup2_root_from(&mounts).ok_or(CgroupError::NoCgroup2)
}

/// A cgroup as the kernel identifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    /// Absolute path of its directory.
    pub path: PathBuf,
    /// Kernel cgroup id (inode number of the directory in cgroupfs).
    pub id: u64,
    /// Depth below the root cgroup (root = 0), as `bpf_get_current_ancestor_cgroup_id` counts.
    pub level: u32,
}

impl Cgroup {
    /// Resolves a cgroup given as an absolute path or a path relative to the cgroup2 root.
    pub fn open(path: &Path) -> Result<Self, CgroupError> {
        let root = cgroup2_root()?;
        let joined = if path.is_absolute() { path.to_path_buf() } else { root.join(path) };
        let io = |source| CgroupError::Io { path: joined.clone(), source };
        let canonical = joined.canonicalize().map_err(io)?;
        let root = root.canonicalize().map_err(|source| CgroupError::Io { path: root.clone(), source })?;
        let rel = canonical
            .strip_prefix(&root)
            .map_err(|_| CgroupError::OutsideHierarchy { path: canonical.clone(), root: root.clone() })?;
        // A directory inside cgroupfs is a cgroup only if the kernel gave it cgroup.procs.
        std::fs::metadata(canonical.join("cgroup.procs"))
            .map_err(|_| CgroupError::OutsideHierarchy { path: canonical.clone(), root: root.clone() })?;
        let id =
            std::fs::metadata(&canonical).map_err(|source| CgroupError::Io { path: canonical.clone(), source })?.ino();
        Ok(Cgroup { level: rel.components().count() as u32, path: canonical, id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_unified_and_hybrid_layouts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_root_from(hybrid), Some("/sys/fs/cgroup/unified".into()));
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(cgroup2_root_from(unified), Some("/sys/fs/cgroup".into()));
        assert_eq!(cgroup2_root_from("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"), None);
        let escaped = "none /mnt/my\\040cgroups cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_root_from(escaped), Some("/mnt/my cgroups".into()));
    }

    #[test]
    fn root_cgroup_is_level_zero() {
        let root = cgroup2_root().unwrap();
        let cg = Cgroup::open(&root).unwrap();
        assert_eq!(cg.level, 0);
        assert_eq!(cg.id, 1, "the root cgroup's kernfs id is 1");
    }

    #[test]
    fn refuses_paths_outside_the_hierarchy() {
        let err = Cgroup::open(Path::new("/tmp")).unwrap_err();
        assert!(matches!(err, CgroupError::OutsideHierarchy { .. }), "{err}");
    }
}
