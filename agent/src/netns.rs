//! This node's network namespaces and their IPv4 addresses, and the sockets a process holds:
//! what the enforcement side tells the kernel about the node (a packet from any of these
//! addresses that did not come over loopback is from another namespace of this node), and
//! how it finds sockets made before enforcement was attached.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

/// A network namespace: its inode (its identity) and a path that opens it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    pub inode: u64,
    pub path: PathBuf,
}

/// The network namespace of a process.
pub fn of_process(pid: u32) -> Option<Netns> {
    let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let inode = std::fs::metadata(&path).ok()?.ino();
    Some(Netns { inode, path })
}

/// The namespace a path names (`/run/netns/x`, `/proc/<pid>/ns/net`).
pub fn at(path: &Path) -> std::io::Result<Netns> {
    Ok(Netns { inode: std::fs::metadata(path)?.ino(), path: path.to_owned() })
}

/// Every network namespace some process of the machine is in, by inode.
pub fn all() -> BTreeMap<u64, Netns> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if let Some(ns) = of_process(pid) {
            out.entry(ns.inode).or_insert(ns);
        }
    }
    out
}

/// The IPv4 addresses configured in a namespace (read from a thread that joins it, so the
/// agent's own namespace is untouched).
pub fn addresses(ns: &Netns) -> std::io::Result<Vec<Ipv4Addr>> {
    let file = std::fs::File::open(&ns.path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid namespace fd affects only this (scoped) thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            ipv4_addresses()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("address reader panicked")))
    })
}

/// IPv4 addresses of the calling thread's network namespace.
fn ipv4_addresses() -> std::io::Result<Vec<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: a sockaddr whose family says how to read it.
            let family = unsafe { (*ifa.ifa_addr).sa_family };
            if i32::from(family) == libc::AF_INET {
                // SAFETY: AF_INET means a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

/// A socket of another process, duplicated into the agent (`pidfd_getfd`).
pub struct HeldSocket {
    pub fd: OwnedFd,
    /// The holder's descriptor number, for reports.
    pub number: u32,
}

/// The IPv4 sockets a process holds, duplicated from it through its pidfd (needs the
/// privilege to ptrace it: the agent runs as root).
pub fn inet_sockets(pid: u32, pidfd: &crate::process::pidfd::PidFd) -> Vec<HeldSocket> {
    use std::os::fd::AsFd;
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return out };
    for e in rd.flatten() {
        let Some(number) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let is_socket = std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: pidfd_getfd(2) on a valid pidfd; a returned fd is ours to own.
        let rc = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_fd().as_raw_fd(), number, 0) };
        if rc < 0 {
            continue;
        }
        // SAFETY: the kernel just gave us this descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(rc as i32) };
        if sockopt(&fd, libc::SO_DOMAIN) == Some(libc::AF_INET) {
            out.push(HeldSocket { fd, number });
        }
    }
    out
}

/// The TCP listeners of a network namespace (from `/proc/<pid>/net/tcp` of a process in
/// it): socket inode -> (bound address, port).
pub type Listeners = BTreeMap<u64, (Ipv4Addr, u16)>;

pub fn tcp_listeners(pid: u32) -> std::io::Result<Listeners> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))?;
    Ok(parse_tcp_listeners(&text))
}

/// Lines of /proc/net/tcp: `sl local rem st ... inode ...`; `st` 0A is LISTEN. Addresses
/// are the kernel's network-order value printed as a host-order integer.
fn parse_tcp_listeners(text: &str) -> Listeners {
    let mut out = BTreeMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(st), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else { continue };
        if *st != "0A" {
            continue;
        }
        let Some((addr, port)) = local.split_once(':') else { continue };
        let (Ok(addr), Ok(port), Ok(inode)) =
            (u32::from_str_radix(addr, 16), u16::from_str_radix(port, 16), inode.parse::<u64>())
        else {
            continue;
        };
        out.insert(inode, (Ipv4Addr::from(addr.to_ne_bytes()), port));
    }
    out
}

/// Inodes of the sockets a process holds.
pub fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?;
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// An integer socket option of `fd`.
pub fn sockopt(fd: &OwnedFd, option: i32) -> Option<i32> {
    let mut v: i32 = 0;
    let mut len = size_of::<i32>() as libc::socklen_t;
    // SAFETY: a valid fd and an int-sized buffer.
    let rc =
        unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, option, (&mut v as *mut i32).cast(), &mut len) };
    (rc == 0).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_listeners_are_parsed_from_proc() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0\n\
            1: 0100007F:3A99 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0\n\
            2: 00000000:20FB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0\n\
            3: garbage\n";
        let l = parse_tcp_listeners(text);
        assert_eq!(l.len(), 2);
        assert_eq!(l[&4242], (Ipv4Addr::LOCALHOST, 15001));
        assert_eq!(l[&77], (Ipv4Addr::UNSPECIFIED, 8443));
    }

    #[test]
    fn this_namespace_has_loopback_and_is_found() {
        let addrs = ipv4_addresses().unwrap();
        assert!(addrs.contains(&Ipv4Addr::LOCALHOST), "{addrs:?}");
        let ns = of_process(std::process::id()).unwrap();
        assert!(all().contains_key(&ns.inode));
    }
}
