//! Enforcement in the real kernel, driven through `ebpf::Enforcer` (no agent process): real
//! workloads in test-owned cgroups, identified by what the kernel recorded at their exec,
//! allowed or refused by the policy maps, observed at the client (EPERM, timeouts) and at
//! the receiver (what it accepted and read).

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use sandbox::{require_root, CgroupGuard, NetnsGuard};
use tether_agent::{
    cgroup::Cgroup,
    ebpf::{DropEvents, Enforcer, Monitor},
    process::{pidfd::PidFd, FileId},
};
use tether_common::{direction, drop_reason, CidrKey, DropEvent, FlowKey, IdentityKey, RuleRef};
use tether_tests::KillOnDrop;

const NET: &str = env!("CARGO_BIN_EXE_tether-test-net");
const TCP: u32 = 6;
const UDP: u32 = 17;

/// Removes everything pinned under the directory, also when the test fails (declared after
/// the cgroups so it runs before they are removed).
struct PinGuard(PathBuf);

impl PinGuard {
    fn new(test: &str) -> Self {
        let dir = PathBuf::from(format!("/sys/fs/bpf/{}-enforce-{test}-{}", sandbox::PREFIX, std::process::id()));
        let _ = Enforcer::detach_pinned(&dir); // a previous run's leftovers
        PinGuard(dir)
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.0.exists() {
            if let Err(e) = Enforcer::detach_pinned(&self.0) {
                eprintln!("enforce test: cleaning {}: {e:?}", self.0.display());
            }
        }
    }
}

/// What the kernel will record for a process of `exe` running as root in `cg`.
fn identity_key(cg: &CgroupGuard, exe: &str) -> IdentityKey {
    let exe = std::fs::canonicalize(exe).unwrap();
    IdentityKey {
        cgroup_id: cg.id().unwrap(),
        exe: FileId::from_metadata(&std::fs::metadata(exe).unwrap()).key(),
        euid: 0,
        egid: 0,
    }
}

fn bash() -> String {
    String::from_utf8(Command::new("bash").args(["-c", "command -v bash"]).output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_owned()
}

fn cgroup(guard: &CgroupGuard) -> Cgroup {
    Cgroup::open(guard.path()).unwrap()
}

/// A `tether-test-net listen` in a cgroup, and what it reported so far.
struct Server {
    child: KillOnDrop,
    port: u16,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Server {
    fn start(cg: &CgroupGuard) -> Server {
        Self::start_with(cg, Command::new(NET), "127.0.0.1")
    }

    /// A listener on `addr` inside a network namespace.
    fn start_in(cg: &CgroupGuard, ns: &NetnsGuard, addr: &str) -> Server {
        Self::start_with(cg, ns.command(NET), addr)
    }

    /// A listener that never called bind() (the kernel picked its port at listen()).
    fn start_unbound(cg: &CgroupGuard) -> Server {
        let mut cmd = Command::new(NET);
        cmd.arg("listen-unbound");
        Self::spawn(cg, cmd)
    }

    fn start_with(cg: &CgroupGuard, mut cmd: Command, addr: &str) -> Server {
        cmd.args(["listen", "0", addr]);
        Self::spawn(cg, cmd)
    }

    fn spawn(cg: &CgroupGuard, mut cmd: Command) -> Server {
        cmd.stdout(Stdio::piped());
        cg.place(&mut cmd).unwrap();
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines.recv_timeout(Duration::from_secs(10)).expect("listener started");
        let port = first.strip_prefix("port ").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{first}"));
        Server { child: KillOnDrop(child), port, lines, seen: Vec::new() }
    }

    /// Everything reported so far, after waiting `settle` for more.
    fn seen(&mut self, settle: Duration) -> &[String] {
        let deadline = Instant::now() + settle;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => break,
            }
        }
        &self.seen
    }

    fn accepts(&mut self, settle: Duration) -> usize {
        self.seen(settle).iter().filter(|l| *l == "accept").count()
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }
}

/// Runs a bash script in `cg` (bounded: a dropped SYN must not hang the test).
fn bash_in(cg: &CgroupGuard, script: &str) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.args(["10", "bash", "-c", script]);
    cg.run(&mut cmd).unwrap()
}

/// connect() from bash in `cg`: Ok, or bash's error text.
fn connect_from(cg: &CgroupGuard, port: u16) -> Result<(), String> {
    let out = bash_in(cg, &format!("exec 3<>/dev/tcp/127.0.0.1/{port}"));
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn assert_eperm(r: Result<(), String>, what: &str) {
    match r {
        Err(e) if e.contains("Operation not permitted") => {}
        other => panic!("{what}: expected EPERM, got {other:?}"),
    }
}

/// connect() from this (unprotected) process.
fn connect_here(port: u16) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(1500))
}

fn flow(src: u32, dst: u32, dport: u16, proto: u32) -> (FlowKey, RuleRef) {
    (FlowKey { src, dst, dport, _pad: 0, proto }, RuleRef { rule: src * 1000 + dst })
}

/// `identity` may reach (egress) or be reached from (ingress) `addr/bits`.
fn cidr(identity: u32, proto: u32, port: u16, addr: [u8; 4], bits: u32) -> (CidrKey, RuleRef) {
    (CidrKey { prefixlen: 64 + bits, identity, proto: proto as u16, port, addr }, RuleRef { rule: 9000 + identity })
}

/// Drop events until one matches `pred` (10 s at most), all of them returned.
async fn events_until(events: &mut DropEvents, pred: impl Fn(&DropEvent) -> bool) -> Vec<DropEvent> {
    let mut all = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !all.iter().any(&pred) {
        match tokio::time::timeout_at(deadline, events.next_batch()).await {
            Ok(batch) => all.extend(batch.unwrap()),
            Err(_) => panic!("no matching drop event; got {all:?}"),
        }
    }
    all
}

/// What the kernel says is attached to a cgroup, asked through bpftool (independent of aya).
fn attached_program_ids(cg: &Path) -> Vec<u32> {
    let out = Command::new("bpftool").args(["-j", "cgroup", "show"]).arg(cg).output().unwrap();
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    let mut ids: Vec<u32> =
        v.as_array().into_iter().flatten().filter_map(|p| p["id"].as_u64()).map(|id| id as u32).collect();
    ids.sort();
    ids
}

/// Test-owned cgroups: `root` is protected (children inherit its programs); each workload
/// runs in its own child cgroup, which is part of its identity.
struct World {
    client: CgroupGuard,
    anon: CgroupGuard,
    srv_a: CgroupGuard,
    srv_b: CgroupGuard,
    // Dropped last: children first.
    root: CgroupGuard,
}

const CLIENT: u32 = 1;
const CLIENT_NET: u32 = 2;
const SRV_A: u32 = 10;
const SRV_B: u32 = 11;

impl World {
    fn new(name: &str) -> World {
        require_root().unwrap();
        let root = CgroupGuard::new(name).unwrap();
        World {
            client: root.child("client").unwrap(),
            anon: root.child("anon").unwrap(),
            srv_a: root.child("srv-a").unwrap(),
            srv_b: root.child("srv-b").unwrap(),
            root,
        }
    }

    /// bash in `client` is CLIENT, the net helper there CLIENT_NET, the servers SRV_A/SRV_B;
    /// nothing in `anon` has an identity.
    fn identities(&self) -> Vec<(IdentityKey, u32)> {
        vec![
            (identity_key(&self.client, &bash()), CLIENT),
            (identity_key(&self.client, NET), CLIENT_NET),
            (identity_key(&self.srv_a, NET), SRV_A),
            (identity_key(&self.srv_b, NET), SRV_B),
        ]
    }

    fn enforcer(&self, pins: &PinGuard) -> Enforcer {
        let mut e = Enforcer::start(&pins.0, &[cgroup(&self.root)]).unwrap();
        e.set_identities(&self.identities()).unwrap();
        e.set_lease(Duration::from_secs(600)).unwrap();
        e
    }
}

/// (a) identity to identity through FLOWS, (b) no identity, (e) generation flips, plus UDP
/// sendmsg, node attestation and the audit rate limit.
#[tokio::test]
async fn identities_policy_and_generations() {
    let w = World::new("enforce-policy");
    let pins = PinGuard::new("policy");
    let mut e = w.enforcer(&pins);
    let mut events = e.take_drop_events().unwrap();
    let mut a = Server::start(&w.srv_a);
    let mut b = Server::start(&w.srv_b);

    // Policy 1: CLIENT may reach A (on A's port), not B.
    e.load_policy(&[flow(CLIENT, SRV_A, a.port, TCP)], &[], &[]).unwrap();
    connect_from(&w.client, a.port).expect("CLIENT -> A is allowed");
    assert_eperm(connect_from(&w.client, b.port), "CLIENT -> B");
    assert_eq!(a.accepts(Duration::from_millis(300)), 1, "A accepted the allowed connection");
    assert_eq!(b.accepts(Duration::ZERO), 0, "B saw the refused connection");
    let ev = events_until(&mut events, |e| e.reason == drop_reason::POLICY).await;
    let ev = ev.iter().find(|e| e.reason == drop_reason::POLICY).unwrap();
    assert_eq!((ev.src_identity, ev.dst_identity), (CLIENT, SRV_B));
    assert_eq!(u16::from_be(ev.tuple.dport), b.port);

    // (b) A process with no identity may not connect at all.
    assert_eperm(connect_from(&w.anon, a.port), "no identity -> A");
    events_until(&mut events, |e| e.reason == drop_reason::NO_IDENTITY && e.cgroup_id == w.anon.id().unwrap()).await;
    assert_eq!(a.accepts(Duration::from_millis(200)), 1);

    // (e) Policy 2 swaps the verdicts in one generation flip.
    e.load_policy(&[flow(CLIENT, SRV_B, 0, TCP)], &[], &[]).unwrap();
    assert_eperm(connect_from(&w.client, a.port), "CLIENT -> A under policy 2");
    connect_from(&w.client, b.port).expect("CLIENT -> B under policy 2");
    assert_eq!(b.accepts(Duration::from_millis(300)), 1);
    assert_eq!(a.accepts(Duration::ZERO), 1);
    // And back: the generation that was live before is rewritten, not reused stale.
    e.load_policy(&[flow(CLIENT, SRV_A, 0, TCP)], &[], &[]).unwrap();
    connect_from(&w.client, a.port).expect("CLIENT -> A under policy 3");
    assert_eperm(connect_from(&w.client, b.port), "CLIENT -> B under policy 3");

    // UDP, unconnected sendto (cgroup/sendmsg4): by destination address and port.
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let sink_port = sink.local_addr().unwrap().port();
    let udp_send = |port: u16| {
        let mut cmd = Command::new(NET);
        cmd.args(["udp-send", &port.to_string(), "hello"]);
        String::from_utf8_lossy(&w.client.run(&mut cmd).unwrap().stdout).trim().to_owned()
    };
    assert_eq!(udp_send(sink_port), format!("error {}", libc::EPERM), "no egress rule yet");
    e.load_policy(&[flow(CLIENT, SRV_A, 0, TCP)], &[cidr(CLIENT_NET, UDP, sink_port, [127, 0, 0, 1], 32)], &[])
        .unwrap();
    assert_eq!(udp_send(sink_port), "sent");
    let mut buf = [0u8; 16];
    let (n, _) = sink.recv_from(&mut buf).expect("the allowed datagram arrived");
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(udp_send(sink_port.wrapping_add(1)), format!("error {}", libc::EPERM), "another port");

    // That socket never bound, so what reaches its port can only be a reply: it is taken
    // from the destination it was allowed to send to, and not from another local socket (a
    // process without identity that read the port from /proc/net/udp).
    let mut cmd = Command::new(NET);
    cmd.args(["udp-ask", &sink_port.to_string(), "query", "1500"]).stdout(Stdio::piped());
    w.client.place(&mut cmd).unwrap();
    let mut asker = KillOnDrop(cmd.spawn().unwrap());
    let (n, asker_addr) = sink.recv_from(&mut buf).expect("the query arrived");
    assert_eq!(&buf[..n], b"query");
    let intruder = UdpSocket::bind("127.0.0.1:0").unwrap();
    intruder.send_to(b"forged", asker_addr).unwrap();
    sink.send_to(b"answer", asker_addr).unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(asker.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(out.contains(&format!("reply {sink_port} answer")), "the reply was not received: {out}");
    assert!(!out.contains("forged"), "a datagram from a local process without identity was received: {out}");
    let ev = events_until(&mut events, |e| {
        e.reason == drop_reason::UNAUTHENTICATED_PEER && u16::from_be(e.tuple.dport) == asker_addr.port()
    })
    .await;
    let ev = ev.iter().rev().find(|e| e.reason == drop_reason::UNAUTHENTICATED_PEER).unwrap();
    assert_eq!(u16::from_be(ev.tuple.sport), intruder.local_addr().unwrap().port());
    assert_eq!((ev.direction, ev.dst_identity), (direction::INGRESS, CLIENT_NET));

    // An unattested node lets nothing through, whatever the policy: no new connection, and
    // established ones stop carrying data.
    let mut cmd = Command::new("timeout");
    cmd.args([
        "10",
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/127.0.0.1/{} && echo one >&3 && sleep 1 && echo two >&3 && sleep 0.5", a.port),
    ]);
    w.client.place(&mut cmd).unwrap();
    let mut held = KillOnDrop(cmd.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.seen(Duration::from_millis(50)).contains(&"data one".to_string()) {
        assert!(Instant::now() < deadline, "the first line never arrived");
    }
    e.set_lease(Duration::ZERO).unwrap();
    assert_eperm(connect_from(&w.client, a.port), "unattested");
    events_until(&mut events, |e| e.reason == drop_reason::NODE_UNATTESTED).await;
    assert!(held.0.wait().unwrap().success());
    assert!(!a.seen(Duration::from_millis(200)).contains(&"data two".to_string()), "sent while unattested");
    e.set_lease(Duration::from_secs(600)).unwrap();
    connect_from(&w.client, a.port).expect("attested again");

    // Audit rate limit: one event per source per interval; every drop is counted.
    e.set_audit_interval(Duration::from_millis(800)).unwrap();
    while tokio::time::timeout(Duration::from_millis(100), events.next_batch()).await.is_ok() {}
    let before = e.drop_counts().unwrap()[drop_reason::NO_IDENTITY as usize];
    for _ in 0..3 {
        assert_eperm(connect_from(&w.anon, a.port), "anon, rate limited");
    }
    let first = events_until(&mut events, |e| e.reason == drop_reason::NO_IDENTITY).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(batch) = tokio::time::timeout(Duration::from_millis(100), events.next_batch()).await {
        assert!(batch.unwrap().iter().all(|e| e.reason != drop_reason::NO_IDENTITY), "not rate limited");
    }
    assert_eq!(first.iter().filter(|e| e.reason == drop_reason::NO_IDENTITY).count(), 1);
    assert_eq!(e.drop_counts().unwrap()[drop_reason::NO_IDENTITY as usize], before + 3);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eperm(connect_from(&w.anon, a.port), "anon, after the interval");
    let next = events_until(&mut events, |e| e.reason == drop_reason::NO_IDENTITY).await;
    let next = next.iter().find(|e| e.reason == drop_reason::NO_IDENTITY).unwrap();
    assert_eq!(next.suppressed, 2, "the two drops held back are reported with the next event");

    drop((a, b));
    e.detach_all(&pins.0.clone()).unwrap();
    assert!(!pins.0.exists());
}

/// Sockets are stamped when a process with an identity makes them, else when first used:
/// a socket made while its process had no identity is refused at connect (allocating
/// nothing), and judged by the identity the process holds at a later connect; a listener
/// that never called bind() (no bind hook runs) judges its handshakes like any other.
#[tokio::test]
async fn sockets_made_before_an_identity_and_unbound_listeners_are_judged() {
    let w = World::new("enforce-lazy");
    let pins = PinGuard::new("lazy");
    let mut e = w.enforcer(&pins);
    let without_client_net: Vec<_> = w.identities().into_iter().filter(|(_, id)| *id != CLIENT_NET).collect();
    e.set_identities(&without_client_net).unwrap();
    let mut a = Server::start(&w.srv_a);
    e.load_policy(&[flow(CLIENT_NET, SRV_A, a.port, TCP)], &[], &[]).unwrap();

    let mut cmd = Command::new(NET);
    cmd.args(["connect-when-told", &a.port.to_string()]).stdin(Stdio::piped()).stdout(Stdio::piped());
    w.client.place(&mut cmd).unwrap();
    let mut child = cmd.spawn().unwrap();
    let mut told = child.stdin.take().unwrap();
    let mut said = BufReader::new(child.stdout.take().unwrap()).lines();
    let _child = KillOnDrop(child);
    let mut next = || said.next().expect("the client said nothing more").unwrap();
    assert_eq!(next(), "socket");
    writeln!(told, "go").unwrap();
    assert_eq!(next(), format!("connect-error {}", libc::EPERM), "connect without an identity");
    e.set_identities(&w.identities()).unwrap();
    writeln!(told, "go").unwrap();
    assert_eq!(next(), "connected", "the same socket, once its process has an identity");
    assert_eq!(a.accepts(Duration::from_millis(300)), 1);

    let mut u = Server::start_unbound(&w.srv_a);
    e.load_policy(&[flow(CLIENT, SRV_A, 0, TCP)], &[], &[]).unwrap();
    assert!(connect_here(u.port).is_err(), "an unprotected peer completed a handshake with the unbound listener");
    assert_eq!(u.accepts(Duration::from_millis(300)), 0, "the unbound listener accepted an unprotected peer");
    connect_from(&w.client, u.port).expect("CLIENT -> the unbound listener is allowed");
    assert_eq!(u.accepts(Duration::from_millis(300)), 1);

    drop((a, u));
    e.detach_all(&pins.0.clone()).unwrap();
}

/// A socket outlives its creator only to drain: a child that inherited it connects while
/// the creator runs, and is refused (`stale_socket`) once the creator has exited.
#[tokio::test]
async fn a_socket_whose_creator_exited_starts_no_connection() {
    let w = World::new("enforce-orphan");
    let pins = PinGuard::new("orphan");
    let mut e = w.enforcer(&pins);
    let mut events = e.take_drop_events().unwrap();
    let mut a = Server::start(&w.srv_a);
    e.load_policy(&[flow(CLIENT_NET, SRV_A, a.port, TCP)], &[], &[]).unwrap();
    let port = a.port.to_string();
    let from_child = |mode: &[&str]| {
        let mut cmd = Command::new(NET);
        cmd.args(["connect-from-child", &port]).args(mode);
        String::from_utf8_lossy(&w.client.run(&mut cmd).unwrap().stdout).trim().to_owned()
    };
    assert_eq!(from_child(&[]), "child connected", "the creator still runs");
    assert_eq!(a.accepts(Duration::from_millis(300)), 1);
    assert_eq!(from_child(&["creator-exits"]), format!("child connect-error {}", libc::EPERM));
    events_until(&mut events, |e| e.reason == drop_reason::STALE_SOCKET).await;
    assert_eq!(a.accepts(Duration::from_millis(300)), 1, "the orphaned socket's connection arrived");

    drop(a);
    e.detach_all(&pins.0.clone()).unwrap();
}

/// (c) A connection made under one identity does not carry traffic after its process execs.
#[tokio::test]
async fn exec_after_connect_loses_the_connection() {
    let w = World::new("enforce-exec");
    let pins = PinGuard::new("exec");
    let mut e = w.enforcer(&pins);
    let mut events = e.take_drop_events().unwrap();
    let mut a = Server::start(&w.srv_a);
    e.load_policy(&[flow(CLIENT, SRV_A, a.port, TCP)], &[], &[]).unwrap();

    // Control: a client that exits with the connection open. Its exit closes the socket
    // after the exit tracepoint ran; the FIN still gets through.
    let out = bash_in(&w.client, &format!("exec 3<>/dev/tcp/127.0.0.1/{} && echo bye >&3", a.port));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.seen(Duration::from_millis(50)).contains(&"eof".to_string()) {
        assert!(Instant::now() < deadline, "no EOF after the client exited: {:?}", a.seen);
    }
    assert!(a.seen.contains(&"data bye".to_string()));

    // bash connects (allowed), writes, then execs sh with the socket kept as fd 3.
    let out = bash_in(
        &w.client,
        &format!(
            "exec 3<>/dev/tcp/127.0.0.1/{} && echo before >&3 && sleep 0.5 && exec sh -c 'echo after >&3; sleep 1.5'",
            a.port
        ),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen = a.seen(Duration::from_millis(500)).to_vec();
    assert!(seen.contains(&"data before".to_string()), "{seen:?}");
    assert!(!seen.contains(&"data after".to_string()), "the exec'd image's write arrived: {seen:?}");
    assert_eq!(seen.iter().filter(|l| *l == "eof").count(), 1, "the exec'd image's close arrived: {seen:?}");
    let ev = events_until(&mut events, |e| e.reason == drop_reason::STALE_SOCKET).await;
    let ev = ev.iter().find(|e| e.reason == drop_reason::STALE_SOCKET).unwrap();
    assert_eq!(ev.src_identity, CLIENT);
    assert_eq!(u16::from_be(ev.tuple.dport), a.port);
    assert!(e.drop_counts().unwrap()[drop_reason::STALE_SOCKET as usize] >= 1);

    drop(a);
    e.detach_all(&pins.0.clone()).unwrap();
}

/// (d) A protected listener receives nothing from peers that are not same-node identities,
/// unless an INGRESS range allows their address and they are on another host.
#[tokio::test]
async fn ingress_from_unprotected_peers() {
    let w = World::new("enforce-ingress");
    let pins = PinGuard::new("ingress");
    let mut e = w.enforcer(&pins);
    let mut events = e.take_drop_events().unwrap();
    let mut a = Server::start(&w.srv_a);
    e.load_policy(&[flow(CLIENT, SRV_A, 0, TCP)], &[], &[]).unwrap();

    // This test process is in no protected cgroup: it has no PEERS entry.
    let err = connect_here(a.port).expect_err("an unauthenticated peer reached A");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "the SYN is dropped, not reset: {err}");
    assert_eq!(a.accepts(Duration::from_millis(200)), 0);
    let ev = events_until(&mut events, |e| e.reason == drop_reason::UNAUTHENTICATED_PEER).await;
    let ev = ev.iter().find(|e| e.reason == drop_reason::UNAUTHENTICATED_PEER).unwrap();
    assert_eq!((ev.src_identity, ev.dst_identity), (0, SRV_A));
    assert_eq!(ev.tuple.saddr, u32::from_ne_bytes([127, 0, 0, 1]));

    // A same-node identity is let in through FLOWS (the kernel finds its socket).
    connect_from(&w.client, a.port).expect("CLIENT -> A");
    assert_eq!(a.accepts(Duration::from_millis(300)), 1);

    // An INGRESS rule for 127.0.0.1 does not let the unprotected peer in: a process of this
    // node is judged by identity only, whatever address it comes from.
    e.load_policy(&[flow(CLIENT, SRV_A, 0, TCP)], &[], &[cidr(SRV_A, TCP, 0, [127, 0, 0, 1], 32)]).unwrap();
    assert!(connect_here(a.port).is_err(), "an address rule admitted a process of this node");
    assert_eq!(a.accepts(Duration::from_millis(200)), 1);

    // A peer on another host (a namespace joined by veth) is let in by a range that covers
    // its address, and not by one that does not.
    let (node, remote) = (NetnsGuard::new("ing-node").unwrap(), NetnsGuard::new("ing-remote").unwrap());
    node.link("10.78.0.1/24", &remote, "10.78.0.2/24").unwrap();
    let mut r = Server::start_in(&w.srv_a, &node, "10.78.0.1");
    let from_remote = |port: u16| {
        remote
            .run_in(|| {
                TcpStream::connect_timeout(&SocketAddr::from(([10, 78, 0, 1], port)), Duration::from_millis(1500))
            })
            .unwrap()
    };
    e.load_policy(&[], &[], &[cidr(SRV_A, TCP, 0, [10, 78, 0, 2], 32)]).unwrap();
    let _conn = from_remote(r.port).expect("allowed by the ingress range");
    assert_eq!(r.accepts(Duration::from_millis(300)), 1);
    e.load_policy(&[], &[], &[cidr(SRV_A, TCP, 0, [192, 168, 0, 0], 16)]).unwrap();
    assert!(from_remote(r.port).is_err(), "a range that does not cover the peer let it in");
    assert_eq!(r.accepts(Duration::from_millis(200)), 1);
    // And once that address is one of this node's (another namespace of the same node), the
    // range no longer admits it either.
    e.load_policy(&[], &[], &[cidr(SRV_A, TCP, 0, [10, 78, 0, 2], 32)]).unwrap();
    e.set_local_addrs(&["10.78.0.2".parse().unwrap()]).unwrap();
    assert!(from_remote(r.port).is_err(), "an address of this node was admitted by a range");
    assert_eq!(r.accepts(Duration::from_millis(200)), 1);
    // An unbound UDP client's replies from another namespace of this node are taken when its
    // egress rules allow that source (as a connected socket's replies would be), and not from
    // another port of that address.
    let sink = remote.run_in(|| UdpSocket::bind("10.78.0.2:0")).unwrap().unwrap();
    let intruder = remote.run_in(|| UdpSocket::bind("10.78.0.2:0")).unwrap().unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let sink_port = sink.local_addr().unwrap().port();
    e.load_policy(&[], &[cidr(CLIENT_NET, UDP, sink_port, [10, 78, 0, 2], 32)], &[]).unwrap();
    let mut cmd = node.command(NET);
    cmd.args(["udp-ask", &sink_port.to_string(), "query", "1500", "10.78.0.2"]).stdout(Stdio::piped());
    w.client.place(&mut cmd).unwrap();
    let mut asker = KillOnDrop(cmd.spawn().unwrap());
    let mut buf = [0u8; 16];
    let (n, asker_addr) = sink.recv_from(&mut buf).expect("the query reached the other namespace");
    assert_eq!(&buf[..n], b"query");
    intruder.send_to(b"forged", asker_addr).unwrap();
    sink.send_to(b"answer", asker_addr).unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(asker.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(out.contains(&format!("reply {sink_port} answer")), "the reply from another namespace was dropped: {out}");
    assert!(!out.contains("forged"), "a datagram from a port the client may not reach was received: {out}");
    e.set_local_addrs(&[]).unwrap();
    drop(r);

    // A listener without identity in a protected cgroup is reached by no one: not taken for
    // an unprotected listener, nor for whoever held its port before.
    let mut anon = Server::start(&w.anon);
    e.load_policy(&[], &[], &[cidr(SRV_A, TCP, 0, [127, 0, 0, 1], 32)]).unwrap();
    assert!(connect_here(anon.port).is_err(), "reached a listener without identity");
    assert_eperm(connect_from(&w.client, anon.port), "CLIENT -> listener without identity");
    assert_eq!(anon.accepts(Duration::from_millis(200)), 0);
    let ev =
        events_until(&mut events, |e| e.reason == drop_reason::NO_IDENTITY && e.direction == direction::INGRESS).await;
    let ev = ev.iter().find(|e| e.reason == drop_reason::NO_IDENTITY && e.direction == direction::INGRESS).unwrap();
    assert_eq!(u16::from_be(ev.tuple.dport), anon.port);
    drop(anon);

    drop(a);
    e.detach_all(&pins.0.clone()).unwrap();
}

/// (f) The agent dies: enforcement stays (maps and links are pinned; records keep being
/// written). A new agent takes it over without detaching anything, then tears it down.
#[tokio::test]
async fn takeover_after_the_agent_dies() {
    let w = World::new("enforce-takeover");
    let pins = PinGuard::new("takeover");
    let mut e = w.enforcer(&pins);
    let mut a = Server::start(&w.srv_a);
    let mut b = Server::start(&w.srv_b);
    e.load_policy(&[flow(CLIENT, SRV_A, a.port, TCP)], &[], &[]).unwrap();
    connect_from(&w.client, a.port).expect("CLIENT -> A");
    assert_eperm(connect_from(&w.client, b.port), "CLIENT -> B");
    let first = e.pinned_links().unwrap();
    // Dropped without detaching: every fd of the first agent is closed, as on kill -9.
    drop(e);
    // Seven hooks but getpeername4, which only a node with tunnel capture attaches.
    assert_eq!(first.len(), 4 + 6, "4 process links and 6 cgroup links pinned: {first:?}");

    // No agent: the policy still holds, and a process started now is still identified (the
    // pinned exec program keeps writing records).
    connect_from(&w.client, a.port).expect("CLIENT -> A with no agent");
    assert_eperm(connect_from(&w.client, b.port), "CLIENT -> B with no agent");
    assert_eperm(connect_from(&w.anon, a.port), "no identity, with no agent");
    assert_eq!(a.accepts(Duration::from_millis(300)), 2);
    assert_eq!(b.accepts(Duration::ZERO), 0);
    // The pinned task storage is what a pinned monitor reads.
    let monitor = Monitor::open_pinned(&pins.0).unwrap();
    let record = monitor.lookup(PidFd::open(a.pid()).unwrap().as_fd()).unwrap().expect("A's record");
    assert_eq!(record.exe, identity_key(&w.srv_a, NET).exe);
    assert_eq!(record.cgroup_id, w.srv_a.id().unwrap());

    // The next agent takes over: same links, new programs.
    let e = Enforcer::start(&pins.0, &[cgroup(&w.root)]).unwrap();
    let second = e.pinned_links().unwrap();
    assert_eq!(second.len(), first.len());
    let cgroup_links = |v: &[tether_agent::ebpf::PinnedLinkStatus]| {
        v.iter().filter(|l| !l.path.to_string_lossy().contains("/process/")).cloned().collect::<Vec<_>>()
    };
    for (old, new) in cgroup_links(&first).iter().zip(cgroup_links(&second).iter()) {
        assert_eq!(old.path, new.path);
        assert_eq!(
            old.link_id,
            new.link_id,
            "{}: the link itself was kept (updated, not replaced)",
            old.path.display()
        );
        assert_ne!(old.program_id, new.program_id, "{}: the link runs the new program", old.path.display());
    }
    let mut new_ids: Vec<u32> = cgroup_links(&second).iter().map(|l| l.program_id).collect();
    new_ids.sort();
    assert_eq!(attached_program_ids(w.root.path()), new_ids, "exactly the new programs are attached (bpftool)");
    // Tracing links cannot be updated: they were replaced by new ones.
    for (old, new) in first.iter().zip(second.iter()).filter(|(o, _)| o.path.to_string_lossy().contains("/process/")) {
        assert_ne!(old.program_id, new.program_id);
    }

    // Still enforcing, with the identities and policy the first agent wrote.
    connect_from(&w.client, a.port).expect("CLIENT -> A after takeover");
    assert_eperm(connect_from(&w.client, b.port), "CLIENT -> B after takeover");
    assert_eq!(a.accepts(Duration::from_millis(300)), 3);

    e.detach_all(&pins.0.clone()).unwrap();
    assert!(!pins.0.exists(), "pins left behind");
    assert_eq!(attached_program_ids(w.root.path()), Vec::<u32>::new(), "programs left attached");
    drop(monitor);
    connect_from(&w.client, b.port).expect("nothing enforced after detach");
    assert_eq!(b.accepts(Duration::from_millis(300)), 1);
}

#[test]
fn refuses_to_attach_to_the_root_cgroup() {
    require_root().unwrap();
    let pins = PinGuard::new("root");
    let root = Cgroup::open(&sandbox::cgroup2_root().unwrap()).unwrap();
    let err = Enforcer::start(&pins.0, &[root]).err().expect("attached to the root cgroup");
    assert!(err.to_string().contains("root cgroup"), "{err}");
}
