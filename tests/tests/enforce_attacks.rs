//! The enforcement datapath under attack: each way around it that was found in the first
//! datapath, played against the real agent by an attacker as unprivileged as the attack
//! allows, and asserted at the receiver. Two hosts (network namespaces joined by veth), an
//! agent on host A, one server.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use sandbox::CgroupGuard;
use tether_tests::{
    hosts::{flow_bin, world, world_with, Host, HostOptions, WebDb, Workload, A_ADDR},
    wait_for,
};

const NOBODY: &str = "65534";

/// `tether-test-flow ARGS` in `cg` inside host `h`'s namespace, as uid/gid 65534.
fn run_as_nobody(h: &Host, cg: &CgroupGuard, args: &[&str]) -> String {
    let mut cmd = h.ns.command("setpriv");
    cmd.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"]).arg(flow_bin()).args(args);
    String::from_utf8_lossy(&cg.run(&mut cmd).unwrap().stdout).into_owned()
}

/// `PROGRAM PROGRAM_ARGS tether-test-flow ARGS` in `cg` inside `h`'s namespace, kept
/// running (as root).
fn spawn_via(h: &Host, cg: &CgroupGuard, program: &str, program_args: &[&str], args: &[&str]) -> Workload {
    let mut cmd = h.ns.command(program);
    cmd.args(program_args).arg(flow_bin()).args(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    cg.place(&mut cmd).unwrap();
    Workload::start(tether_tests::spawn_retrying(&mut cmd).unwrap())
}

fn data(w: &Workload) -> Vec<String> {
    w.lines().into_iter().filter(|l| l.starts_with("data ")).collect()
}

/// Policy: web may reach db on 5432.
const WEB_TO_DB: &str = r#"
[[rule]]
name = "web-to-db"
from = { spiffe_id = "spiffe://example.org/web" }
to = { spiffe_id = "spiffe://example.org/db" }
ports = [5432]
"#;

fn wait_audit(h: &Host, needle: &str) -> String {
    wait_for(&format!("an audit line with {needle}"), || {
        h.audit().lines().find(|l| l.contains(needle)).map(str::to_owned)
    })
}

/// Finding 1: an address rule meant for another host admitted an unprotected process of db's
/// own node connecting to the node's own address. Same-node traffic is judged by identity.
#[test]
fn address_rules_never_admit_processes_of_this_node() {
    let mut w = world();
    let db = w.a.root.child("db").unwrap();
    w.register(&w.a, &db, "spiffe://example.org/db");
    w.a.policy(
        r#"
[[rule]]
name = "hosts-to-db"
from = { cidr = ["10.77.0.0/24"] }
to = { spiffe_id = "spiffe://example.org/db" }
ports = [5432]
"#,
    );
    w.a.start_agent();
    let server = w.a.spawn(&db, &["serve", "5432"]);
    server.wait_line("listening");
    w.a.wait_identity("spiffe://example.org/db");

    // An unprivileged process of host A, outside every protected cgroup, to A's own address
    // (inside the allowed range) and to loopback.
    let outside_a = CgroupGuard::new("atk-outside-a").unwrap();
    for addr in [A_ADDR, "127.0.0.1"] {
        let out = run_as_nobody(&w.a, &outside_a, &["send", addr, "5432", "local-attacker", "1", "0"]);
        assert!(!out.contains("sent"), "a process of db's node reached it via {addr}: {out}");
    }
    // The range does admit another host (control).
    let outside_b = CgroupGuard::new("atk-outside-b").unwrap();
    let out = w.b.run(&outside_b, &["send", A_ADDR, "5432", "from-b", "1", "0"]);
    assert!(out.contains("sent"), "{out}");
    server.wait_line("data from-b");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(data(&server), vec!["data from-b"], "only the other host's data arrived");
    let line = wait_audit(&w.a, "\"reason\":\"unauthenticated_peer\"");
    assert!(line.contains("\"dst_identity\":\"spiffe://example.org/db\""), "{line}");
}

/// Finding 2: BOUND was keyed by port: (a) a process without identity squatted db's port from
/// its own namespace, (b) a workload in another namespace with db's port number lent db its
/// policy. The kernel's own lookup of the receiving socket in the caller's namespace decides.
#[test]
fn ports_cannot_be_squatted_from_another_namespace() {
    let mut w = world();
    let cache = w.a.root.child("cache").unwrap();
    let rogue = w.a.root.child("rogue").unwrap();
    w.register(&w.a, &cache, "spiffe://example.org/cache");
    let policy = format!(
        "{WEB_TO_DB}\n[[rule]]\nname = \"web-to-cache\"\nfrom = {{ spiffe_id = \"spiffe://example.org/web\" }}\nto = {{ spiffe_id = \"spiffe://example.org/cache\" }}\nports = [6000]\n"
    );
    let WebDb { web, db, server, warm: _warm } = w.web_and_db(&policy);
    let db_6000 = w.a.spawn(&db, &["serve", "6000"]);
    db_6000.wait_line("listening");

    // (a) uid 65534, no identity, in a protected cgroup: its own user and network namespace,
    // db's port bound there and held.
    let squatter = {
        let mut cmd = w.a.ns.command("setpriv");
        cmd.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "unshare", "-rn"])
            .arg(flow_bin())
            .args(["bind-hold", "5432", "3000"])
            .stdout(Stdio::piped());
        rogue.place(&mut cmd).unwrap();
        Workload::start(cmd.spawn().unwrap())
    };
    let bound = squatter.wait_line("b");
    assert_eq!(bound, "bound", "the squatter could not even bind in its own namespace");
    let out = w.a.run(&web, &["send", "127.0.0.1", "5432", "while-squatted", "1", "0"]);
    assert!(out.contains("sent"), "web -> db refused while another namespace held the port: {out}");
    server.wait_line("data while-squatted");
    drop(squatter);
    let out = w.a.run(&web, &["send", "127.0.0.1", "5432", "after-squatter", "1", "0"]);
    assert!(out.contains("sent"), "web -> db refused after the squatter left: {out}");
    server.wait_line("data after-squatter");

    // (b) cache, in a namespace of its own on this node, serves port 6000 too.
    let cache_srv = spawn_via(&w.a, &cache, "unshare", &["-n"], &["serve", "6000"]);
    cache_srv.wait_line("listening");
    w.a.wait_identity("spiffe://example.org/cache");
    let out = w.a.run(&web, &["send", "127.0.0.1", "6000", "cache-rule-to-db", "1", "0"]);
    assert!(out.contains("connect-error 1"), "web reached db:6000 on cache's rule: {out}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(data(&db_6000).is_empty(), "{:?}", db_6000.lines());
}

/// Finding 3: the port table could be filled by a process without identity, after which no
/// workload could bind. There is no port table now; the one table processes do fill (the exec
/// table, one entry per process holding sockets) has a quota per protected cgroup, so churn
/// in one fails only that cgroup.
#[test]
fn tables_cannot_be_filled_to_deny_other_workloads() {
    let mut w = world_with(HostOptions { extra_roots: 1, enforcement: "socket_processes_per_cgroup = 64\n".into() });
    let rogue = w.a.root.child("rogue").unwrap();
    let WebDb { web, db, server, warm: _warm } = w.web_and_db(WEB_TO_DB);

    // 16,383 UDP binds by a process without identity, in db's protected subtree.
    let out = w.a.run(&rogue, &["udp-fill", "16383"]);
    assert!(out.starts_with("done ok 16383 fail 0"), "{out}");
    // db binds again, web still reaches it.
    drop(server);
    let server = w.a.spawn(&db, &["serve", "5432"]);
    server.wait_line("listening");
    let out = w.a.run(&web, &["send", "127.0.0.1", "5432", "after-fill", "1", "0"]);
    assert!(out.contains("sent"), "{out}");
    server.wait_line("data after-fill");

    // Churn in the other protected cgroup: 200 processes, each with a bound socket (bind
    // stamps even without identity), against a quota of 64. Past it, that cgroup's binds
    // fail; web's sockets do not.
    let churner = w.a.extra_roots[0].child("churn").unwrap();
    let out = w.a.run(&churner, &["socket-churn", "200"]);
    let fail: u64 = out.split_whitespace().nth(4).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(fail >= 100, "the quota did not stop the churn: {out}");
    let out = w.a.run(&web, &["send", "127.0.0.1", "5432", "after-churn", "1", "0"]);
    assert!(out.contains("sent"), "another cgroup's churn denied web: {out}");
    server.wait_line("data after-churn");
    wait_audit(&w.a, "\"reason\":\"map_full\"");
}

/// Finding 4: raw and ICMP datagram sockets passed every hook. They, and every protocol the
/// hooks do not judge, are refused at socket() in protected cgroups.
#[test]
fn raw_icmp_and_unjudged_protocols_are_refused_at_creation() {
    let mut w = world();
    w.a.policy("");
    w.a.start_agent();
    let rogue = w.a.root.child("rogue").unwrap();
    let outside = CgroupGuard::new("atk-outside").unwrap();
    // Let unprivileged users make ICMP datagram sockets in A, as many distributions do.
    w.a.ns.run_in(|| std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")).unwrap().unwrap();

    // Controls, outside the protected cgroups: the kernel allows each of these.
    assert_eq!(run_as_nobody(&w.a, &outside, &["icmp-echo", "10.77.0.2", "payload"]).trim(), "reply");
    assert_eq!(w.a.run(&outside, &["socket", "raw-udp"]).trim(), "created");
    assert_eq!(w.a.run(&outside, &["socket", "udplite"]).trim(), "created");

    // Protected: an unprivileged ICMP echo, a root raw socket, UDP-Lite, IPv6.
    let eperm = format!("socket-error {}", libc::EPERM);
    assert_eq!(run_as_nobody(&w.a, &rogue, &["icmp-echo", "10.77.0.2", "payload"]).trim(), eperm);
    assert_eq!(w.a.run(&rogue, &["socket", "raw-udp"]).trim(), eperm);
    assert_eq!(w.a.run(&rogue, &["socket", "udplite"]).trim(), eperm);
    assert_eq!(w.a.run(&rogue, &["socket", "tcp6"]).trim(), eperm);
    assert_eq!(w.a.run(&rogue, &["socket", "tcp"]).trim(), "created", "TCP sockets are made (judged when used)");
    for reason in ["icmp_socket", "raw_socket", "protocol_not_enforced", "ipv6_not_enforced"] {
        wait_audit(&w.a, &format!("\"reason\":\"{reason}\""));
    }
}

/// Finding 5: a listener bound before the agent attached was open to everyone. It carries
/// nothing until judged; the agent finds it at start-up and stamps it as its holder's.
#[test]
fn a_listener_bound_before_the_agent_is_judged() {
    let mut w = world();
    let (web, db) = (w.a.root.child("web").unwrap(), w.a.root.child("db").unwrap());
    w.register(&w.a, &web, "spiffe://example.org/web");
    w.register(&w.a, &db, "spiffe://example.org/db");
    // db listens first; the policy allows nothing to it.
    let server = w.a.spawn(&db, &["serve", "5432"]);
    server.wait_line("listening");
    w.a.policy("");
    w.a.start_agent();
    w.a.wait_identity("spiffe://example.org/db");
    let line = wait_audit(&w.a, "socket_made_before_enforcement");
    assert!(line.contains("\"listening\":true") && line.contains("stamped as its holder"), "{line}");

    let outside_a = CgroupGuard::new("atk-pre-a").unwrap();
    let out = run_as_nobody(&w.a, &outside_a, &["send", "127.0.0.1", "5432", "local", "1", "0"]);
    assert!(!out.contains("sent"), "{out}");
    let outside_b = CgroupGuard::new("atk-pre-b").unwrap();
    let out = w.b.run(&outside_b, &["send", A_ADDR, "5432", "remote", "1", "0"]);
    assert!(!out.contains("sent"), "{out}");

    // The stamped listener is judged like any other: allowed, web gets in.
    let warm = w.a.spawn(&web, &["serve", "7001"]);
    warm.wait_line("listening");
    w.a.wait_identity("spiffe://example.org/web");
    let loads = w.a.log().matches("enforcement policy in force").count();
    w.a.policy(WEB_TO_DB);
    wait_for("the policy", || (w.a.log().matches("enforcement policy in force").count() > loads).then_some(()));
    let out = w.a.run(&web, &["send", "127.0.0.1", "5432", "web", "1", "0"]);
    assert!(out.contains("sent"), "{out}");
    server.wait_line("data web");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(data(&server), vec!["data web"]);
}

/// Lines of `flow` received so far, waiting `settle` first.
fn received_after(server: &Workload, settle: Duration) -> usize {
    std::thread::sleep(settle);
    server.lines().iter().filter(|l| l.starts_with("data long-")).count()
}

/// The long flow has stopped: nothing more arrives over two seconds.
fn assert_flow_stopped(server: &Workload, what: &str) {
    let a = received_after(server, Duration::from_millis(500));
    let b = received_after(server, Duration::from_secs(2));
    assert_eq!(a, b, "{what}: the established flow kept delivering");
}

fn assert_flow_runs(server: &Workload, what: &str) {
    let a = received_after(server, Duration::ZERO);
    let b = received_after(server, Duration::from_secs(1));
    assert!(b > a + 5, "{what}: the established flow stopped ({a} -> {b})");
}

/// Finding 6a: killed agent, node evicted and banned on the server: enforcement ran on with
/// the node attested. The kernel's lease runs out without the agent.
#[test]
fn a_dead_agent_lets_the_lease_run_out() {
    let mut w = world_with(HostOptions { enforcement: "node_lease_seconds = 4\n".into(), ..Default::default() });
    let WebDb { web, server, db: _db, warm: _warm } = w.web_and_db(WEB_TO_DB);
    let flow = w.a.spawn(&web, &["send", "127.0.0.1", "5432", "long", "100000", "100"]);
    flow.wait_line("connected");
    assert_flow_runs(&server, "before");
    w.a.kill_agent();
    let killed = Instant::now();
    w.plane.cli_ok(&["agent", "evict", "--spiffe-id", &w.a.node_id, "--ban"]);
    // Within the lease the flow goes on (a restart would keep it)...
    assert_flow_runs(&server, "within the lease");
    // ...and once it has run out, nothing passes.
    std::thread::sleep(Duration::from_secs(4).saturating_sub(killed.elapsed()) + Duration::from_millis(500));
    assert_flow_stopped(&server, "lease run out");
    let out = w.a.run(&web, &["send", "127.0.0.1", "5432", "after-lease", "1", "0"]);
    assert!(out.contains("connect-error 1"), "{out}");
}

/// Finding 6b: a running agent whose (join-token) node the server evicted kept enforcing as
/// attested. Any refusal of the node ends the lease at once.
#[test]
fn an_evicted_node_loses_its_flows_at_once() {
    let mut w = world_with(HostOptions { enforcement: "node_lease_seconds = 300\n".into(), ..Default::default() });
    let WebDb { web, server, db: _db, warm: _warm } = w.web_and_db(WEB_TO_DB);
    let flow = w.a.spawn(&web, &["send", "127.0.0.1", "5432", "long", "100000", "100"]);
    flow.wait_line("connected");
    assert_flow_runs(&server, "before");
    w.plane.cli_ok(&["agent", "evict", "--spiffe-id", &w.a.node_id]);
    wait_for("the agent to see the eviction", || w.a.log().contains("NODE NOT ATTESTED").then_some(()));
    assert_flow_stopped(&server, "node evicted (lease 300 s: only its end explains this)");
    let out = w.a.run(&web, &["send", "127.0.0.1", "5432", "after-eviction", "1", "0"]);
    assert!(out.contains("connect-error 1"), "{out}");
    wait_audit(&w.a, "\"reason\":\"node_unattested\"");
}

/// Finding 6c: an agent restarted on a banned node took the pins over, failed to attest and
/// exited, leaving the node attested. It ends the lease before it exits.
#[test]
fn an_agent_restarted_on_a_banned_node_ends_the_lease() {
    let mut w = world_with(HostOptions { enforcement: "node_lease_seconds = 300\n".into(), ..Default::default() });
    let WebDb { web, server, db: _db, warm: _warm } = w.web_and_db(WEB_TO_DB);
    let flow = w.a.spawn(&web, &["send", "127.0.0.1", "5432", "long", "100000", "100"]);
    flow.wait_line("connected");
    w.a.kill_agent();
    w.plane.cli_ok(&["agent", "evict", "--spiffe-id", &w.a.node_id, "--ban"]);
    assert_flow_runs(&server, "no agent, lease still held");
    // The node SVID on disk is refused, the token is used: attestation fails.
    let status = w.a.run_agent_to_exit();
    assert!(!status.success(), "the agent attested a banned node");
    assert_flow_stopped(&server, "restart on a banned node (lease 300 s)");
    let out = w.a.run(&web, &["send", "127.0.0.1", "5432", "after-ban", "1", "0"]);
    assert!(out.contains("connect-error 1"), "{out}");
}

/// A removed rule and a withdrawn identity stop established flows too (verdicts are kept per
/// connection with the epoch they were decided at; every change moves the epoch).
#[test]
fn policy_changes_and_withdrawn_identities_cut_established_flows() {
    let mut w = world();
    let WebDb { web, server, db: _db, warm: _warm } = w.web_and_db(WEB_TO_DB);
    let flow = w.a.spawn(&web, &["send", "127.0.0.1", "5432", "long", "100000", "100"]);
    flow.wait_line("connected");
    assert_flow_runs(&server, "allowed");
    // The rule goes: the flow stops. It comes back: the same connection carries on.
    let loads = w.a.log().matches("enforcement policy in force").count();
    w.a.policy("");
    wait_for("the reload", || (w.a.log().matches("enforcement policy in force").count() > loads).then_some(()));
    assert_flow_stopped(&server, "rule removed");
    let loads = w.a.log().matches("enforcement policy in force").count();
    w.a.policy(WEB_TO_DB);
    wait_for("the reload", || (w.a.log().matches("enforcement policy in force").count() > loads).then_some(()));
    wait_for("the flow to resume", || (received_after(&server, Duration::from_millis(200)) > 0).then_some(()));
    assert_flow_runs(&server, "rule restored");

    // web's entry is deleted on the server: its identity is withdrawn, the flow stops.
    let show = w.plane.cli_ok(&["entry", "show", "--spiffe-id", "spiffe://example.org/web"]);
    let id = show.lines().find_map(|l| l.strip_prefix("Entry ID      : ")).unwrap().to_owned();
    w.plane.cli_ok(&["entry", "delete", "--id", &id]);
    assert_flow_stopped(&server, "identity withdrawn");
    wait_audit(&w.a, "\"reason\":\"no_identity\"");
}

/// Closing an allowed connection drops nothing: the first datapath dropped the closing
/// packets (their peer entry was gone) and both ends retransmitted.
#[test]
fn allowed_connections_close_cleanly() {
    let mut w = world();
    let WebDb { web, server, db: _db, warm: _warm } = w.web_and_db(WEB_TO_DB);
    let churn = w.a.spawn(&web, &["churn", "127.0.0.1", "5432", "2000"]);
    let done = churn.wait_line("done");
    assert!(done.contains(" fail 0"), "{done}");
    std::thread::sleep(Duration::from_millis(500));
    let accepted = server.count("accept");
    assert!(accepted > 20, "{done}");
    // The metrics are rewritten within the agent's scan interval.
    std::thread::sleep(Duration::from_secs(1));
    let metrics = std::fs::read_to_string(w.a.dir.join("data/metrics.prom")).unwrap_or_default();
    assert!(metrics.contains("tether_enforcement_drops_total"), "{metrics}");
    for line in metrics.lines().filter(|l| l.starts_with("tether_enforcement_drops_total")) {
        assert!(line.ends_with(" 0"), "an allowed flow had packets dropped: {line}\n{metrics}");
    }
}
