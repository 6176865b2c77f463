//! Worlds for the node tunnel tests: three "hosts" (network namespaces) on one bridge (in a
//! switch namespace of its own), each with an agent running enforcement and a tunnel, one
//! server; and a packet capture on a host's link, in process (an AF_PACKET socket in the
//! host's namespace), to check what crosses the wire.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use sandbox::{require_root, NetnsGuard};

use crate::{
    hosts::{Host, HostOptions},
    plane::Plane,
};

pub const ADDRS: [&str; 3] = ["10.78.0.1", "10.78.0.2", "10.78.0.3"];

pub struct Mesh {
    pub plane: Plane,
    pub hosts: Vec<Host>,
    /// Each host's link to the bridge, as named in its namespace.
    pub links: Vec<String>,
    pub switch: NetnsGuard,
}

/// The `[tunnel]` table for a host (appended after its `[enforcement]` table).
fn tunnel_table(ns: &NetnsGuard, addr: &str, extra: &str) -> String {
    format!(
        "\n[tunnel]\nnetwork_namespace = \"/run/netns/{}\"\naddress = \"{addr}\"\nconnect_timeout_ms = 1000\nrecheck_interval_ms = 500\n{extra}",
        ns.name()
    )
}

/// Server, three hosts a/b/c at [`ADDRS`] on one bridge; no entries, no agents started.
pub fn mesh(names: [&'static str; 3]) -> Mesh {
    require_root().unwrap();
    let plane = Plane::server_only("");
    let switch = NetnsGuard::new("tun-sw").unwrap();
    switch.exec(&["ip", "link", "add", "br0", "type", "bridge"]).unwrap();
    switch.exec(&["ip", "link", "set", "br0", "up"]).unwrap();
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let mut hosts = Vec::new();
    let mut links = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let ns = NetnsGuard::new(&format!("tun-{name}")).unwrap();
        let n = N.fetch_add(1, Ordering::Relaxed);
        let (sw_end, host_end) =
            (format!("ts{}s{n}", std::process::id() % 100000), format!("ts{}h{n}", std::process::id() % 100000));
        let status = std::process::Command::new("ip")
            .args(["link", "add", &sw_end, "netns", switch.name(), "type", "veth", "peer", "name", &host_end])
            .args(["netns", ns.name()])
            .status()
            .unwrap();
        assert!(status.success(), "creating a veth pair");
        switch.exec(&["ip", "link", "set", &sw_end, "master", "br0"]).unwrap();
        switch.exec(&["ip", "link", "set", &sw_end, "up"]).unwrap();
        ns.exec(&["ip", "addr", "add", &format!("{}/24", ADDRS[i]), "dev", &host_end]).unwrap();
        ns.exec(&["ip", "link", "set", &host_end, "up"]).unwrap();
        let opts = HostOptions { enforcement: tunnel_table(&ns, ADDRS[i], ""), ..HostOptions::default() };
        hosts.push(Host::with_options(name, &plane, ns, opts));
        links.push(host_end);
    }
    Mesh { plane, hosts, links, switch }
}

impl Mesh {
    /// `policy` on every host, then every host's agent.
    pub fn start_agents(&mut self, policy: &str) {
        for h in &self.hosts {
            h.policy(policy);
        }
        for h in &mut self.hosts {
            h.start_agent();
        }
    }

    /// An entry under `host`'s node for the network workload binary in `cg`; its id.
    pub fn register(&self, host: usize, cg: &sandbox::CgroupGuard, spiffe_id: &str, extra: &[&str]) -> String {
        let h = &self.hosts[host];
        let bin = crate::hosts::flow_bin();
        self.plane.entry_under(
            &h.node_id,
            spiffe_id,
            &[
                &format!("cgroup:path:{}", crate::hosts::rel(cg)),
                "unix:uid:0",
                &format!("unix:sha256:{}", crate::hosts::sha256(bin.to_str().unwrap())),
            ],
            extra,
        )
    }

    /// Waits until `host`'s kernel capture table holds at least `n` remote workloads.
    pub fn wait_capture(&self, host: usize, n: usize) {
        let h = &self.hosts[host];
        crate::wait_for(&format!("{} to capture {n} remote workloads", h.name), || {
            h.log()
                .lines()
                .filter(|l| l.contains("remote workloads in the capture table"))
                .filter_map(|l| l.split("services=").nth(1)?.split_whitespace().next()?.parse::<usize>().ok())
                .next_back()
                .filter(|got| *got >= n)
        });
    }

    /// The agent and stream logs of hosts a and b, for a failure message.
    pub fn logs(&self) -> String {
        format!(
            "A:\n{}\n{}\nB:\n{}\n{}",
            self.hosts[0].log(),
            self.stream_log(0),
            self.hosts[1].log(),
            self.stream_log(1)
        )
    }

    pub fn stream_log(&self, host: usize) -> String {
        std::fs::read_to_string(self.hosts[host].dir.join("data/tunnel-streams.jsonl")).unwrap_or_default()
    }

    pub fn peer_socket(&self, host: usize) -> String {
        self.hosts[host].dir.join("data/tunnel-peers.sock").display().to_string()
    }
}

/// One captured IPv4 TCP packet on a link.
#[derive(Clone, Debug)]
pub struct Packet {
    pub src: std::net::SocketAddrV4,
    pub dst: std::net::SocketAddrV4,
    pub seq: u32,
    pub syn: bool,
    pub payload: Vec<u8>,
}

/// The byte streams of the TCP connections whose SYN was captured, one per direction:
/// ((src, dst), bytes in sequence order; retransmissions counted once).
pub fn streams(packets: &[Packet]) -> Vec<((std::net::SocketAddrV4, std::net::SocketAddrV4), Vec<u8>)> {
    let mut out = Vec::new();
    let starts: Vec<&Packet> = packets.iter().filter(|p| p.syn).collect();
    for start in starts {
        let key = (start.src, start.dst);
        let isn = start.seq.wrapping_add(1);
        let mut segs: std::collections::BTreeMap<u32, &[u8]> = std::collections::BTreeMap::new();
        for p in packets.iter().filter(|p| (p.src, p.dst) == key && !p.payload.is_empty()) {
            segs.entry(p.seq.wrapping_sub(isn)).or_insert(&p.payload);
        }
        let mut bytes = Vec::new();
        for (off, data) in segs {
            let off = off as usize;
            if off > bytes.len() {
                break; // a hole: keep what is contiguous
            }
            let skip = bytes.len() - off;
            if skip < data.len() {
                bytes.extend_from_slice(&data[skip..]);
            }
        }
        out.push((key, bytes));
    }
    out
}

/// Whether `bytes` is a sequence of whole TLS records (a truncated last one allowed):
/// content type 20-23, version 3.x, length.
pub fn tls_records(bytes: &[u8]) -> Result<usize, String> {
    let mut i = 0;
    let mut n = 0;
    while i + 5 <= bytes.len() {
        let h = &bytes[i..i + 5];
        if !(0x14..=0x17).contains(&h[0]) || h[1] != 3 {
            return Err(format!("not a TLS record at offset {i}: {:02x?}", h));
        }
        i += 5 + usize::from(u16::from_be_bytes([h[3], h[4]]));
        n += 1;
    }
    Ok(n)
}

/// Everything IPv4/TCP crossing a link, read in the link's namespace while this lives.
pub struct Capture {
    stop: Arc<AtomicBool>,
    packets: Arc<Mutex<Vec<Packet>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Capture {
    pub fn start(ns: &NetnsGuard, link: &str) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let packets = Arc::new(Mutex::new(Vec::new()));
        let (s, p, link) = (stop.clone(), packets.clone(), link.to_owned());
        let path = std::path::PathBuf::from("/run/netns").join(ns.name());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let nsf = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on a valid namespace fd; this thread only.
            assert_eq!(unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket calls on buffers that outlive them.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            // SAFETY: the fd was just created and is ours.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = std::ffi::CString::new(link).unwrap();
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(ifindex != 0, "no such link");
            // SAFETY: all-zero is a valid sockaddr_ll; the fields are set below.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: a valid sockaddr_ll.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind AF_PACKET");
            // Large enough that a bulk transfer is not dropped by the capture itself.
            let size: libc::c_int = 256 << 20;
            // SAFETY: a valid int option (root may exceed rmem_max with the FORCE variant).
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as u32,
                )
            };
            let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
            // SAFETY: a valid timeval.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    size_of::<libc::timeval>() as u32,
                )
            };
            let _ = ready_tx.send(());
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                // SAFETY: a valid buffer.
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n <= 0 {
                    continue;
                }
                if let Some(pkt) = parse(&buf[..n as usize]) {
                    p.lock().unwrap().push(pkt);
                }
            }
        });
        ready_rx.recv().unwrap();
        Capture { stop, packets, thread: Some(thread) }
    }

    /// Stops and returns every packet seen.
    pub fn finish(mut self) -> Vec<Packet> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.packets.lock().unwrap().clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// An Ethernet frame carrying IPv4 TCP.
fn parse(frame: &[u8]) -> Option<Packet> {
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    if ip[0] >> 4 != 4 || ip[9] != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let tcp = ip.get(ihl..total)?;
    let doff = usize::from(tcp.get(12)? >> 4) * 4;
    let a = |o: usize| std::net::Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
    let port = |o: usize| u16::from_be_bytes([tcp[o], tcp[o + 1]]);
    Some(Packet {
        src: std::net::SocketAddrV4::new(a(12), port(0)),
        dst: std::net::SocketAddrV4::new(a(16), port(2)),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        syn: tcp[13] & 0x02 != 0,
        payload: tcp.get(doff..)?.to_vec(),
    })
}
