//! In-kernel enforcement through the real agent: two "hosts" (network namespaces joined by a
//! veth pair), each with its own agent protecting its own test cgroups, one server. Every flow
//! is asserted at the receiver, not only at the sender.

use std::{process::Command, time::Duration};

use sandbox::CgroupGuard;
use tether_tests::{
    hosts::{world, world_with, Host, HostOptions, WebDb, Workload, A_ADDR, B_ADDR},
    wait_for,
};

const POLICY_A: &str = r#"
[[rule]]
name = "web-to-db"
from = { spiffe_id = "spiffe://example.org/web" }
to = { spiffe_id = "spiffe://example.org/db" }
ports = [5432]

[[rule]]
name = "web-to-api"
from = { spiffe_id = "spiffe://example.org/web" }
to = { cidr = ["10.77.0.2"] }
ports = [8443]

[[rule]]
name = "api-host-to-db"
from = { cidr = ["10.77.0.2/32"] }
to = { spiffe_id = "spiffe://example.org/db" }
ports = [5432]
"#;

const POLICY_B: &str = r#"
[[rule]]
name = "api-to-db"
from = { spiffe_id = "spiffe://example.org/api" }
to = { cidr = ["10.77.0.1/32"] }
ports = [5432]

[[rule]]
name = "a-to-api"
from = { cidr = ["10.77.0.1/32"] }
to = { spiffe_id = "spiffe://example.org/api" }
ports = [8443]
"#;

#[test]
fn flows_between_identities_and_hosts_follow_policy() {
    let mut w = world();
    let (web, db, rogue) =
        (w.a.root.child("web").unwrap(), w.a.root.child("db").unwrap(), w.a.root.child("rogue").unwrap());
    let api = w.b.root.child("api").unwrap();
    let outside_a = CgroupGuard::new("enf-outside-a").unwrap();
    let outside_b = CgroupGuard::new("enf-outside-b").unwrap();
    w.register(&w.a, &web, "spiffe://example.org/web");
    w.register(&w.a, &db, "spiffe://example.org/db");
    w.register(&w.b, &api, "spiffe://example.org/api");
    w.a.policy(POLICY_A);
    w.b.policy(POLICY_B);
    w.a.start_agent();
    w.b.start_agent();

    let db_5432 = w.a.spawn(&db, &["serve", "5432"]);
    let db_6000 = w.a.spawn(&db, &["serve", "6000"]);
    let api_8443 = w.b.spawn(&api, &["serve", "8443"]);
    for s in [&db_5432, &db_6000, &api_8443] {
        s.wait_line("listening");
    }
    w.a.wait_identity("spiffe://example.org/db");
    w.b.wait_identity("spiffe://example.org/api");

    // Each case: (host, cgroup, destination, expected at the sender, receiver, its marker).
    let send =
        |h: &Host, cg: &CgroupGuard, addr: &str, port: &str, tag: &str| h.run(cg, &["send", addr, port, tag, "1", "0"]);
    // web is started per case; make sure its identity is known first.
    let probe = w.a.spawn(&web, &["serve", "7000"]);
    probe.wait_line("listening");
    w.a.wait_identity("spiffe://example.org/web");

    // 1. Same node, allowed: web -> db:5432.
    let out = send(&w.a, &web, "127.0.0.1", "5432", "web-db");
    assert!(out.contains("sent"), "web -> db refused: {out}\n{}", w.a.log());
    db_5432.wait_line("data web-db");
    // 2. Same node, no identity: rogue -> db:5432 refused at connect; db sees nothing.
    let out = send(&w.a, &rogue, "127.0.0.1", "5432", "rogue-db");
    assert!(out.contains("connect-error 1"), "rogue must get EPERM: {out}");
    // 3. Same node, identity but no rule for that port: web -> db:6000.
    let out = send(&w.a, &web, "127.0.0.1", "6000", "web-db6000");
    assert!(out.contains("connect-error 1"), "web -> db:6000 must be refused: {out}");
    // 4. Same node, an unprotected process (not in the protected subtree) -> db:5432:
    //    it may send, but db's ingress drops it (no authenticated peer, no range allowed).
    let out = send(&w.a, &outside_a, "127.0.0.1", "5432", "outside-db");
    assert!(!out.contains("sent"), "an unauthenticated peer reached db: {out}");
    // 5. Cross node, allowed both ways: web(A) -> api(B):8443.
    let out = send(&w.a, &web, B_ADDR, "8443", "web-api");
    assert!(out.contains("sent"), "web -> api refused: {out}\nA: {}\nB: {}", w.a.log(), w.b.log());
    api_8443.wait_line("data web-api");
    // 6. Cross node: api(B) -> db(A):5432 (B's egress rule, A's range rule).
    let out = send(&w.b, &api, A_ADDR, "5432", "api-db");
    assert!(out.contains("sent"), "api -> db refused: {out}");
    db_5432.wait_line("data api-db");
    // 7. Cross node, unprotected sender on B -> db(A):6000: no range allows it at A.
    let out = send(&w.b, &outside_b, A_ADDR, "6000", "outside-b-db");
    assert!(!out.contains("sent"), "remote plaintext reached db:6000: {out}");
    // 8. Cross node, api -> a port of A its policy does not allow: refused at B.
    let out = send(&w.b, &api, A_ADDR, "6000", "api-db6000");
    assert!(out.contains("connect-error 1"), "{out}");

    // 9. IPv6 is not enforced yet, so a protected workload cannot make an IPv6 socket at all.
    let mut v6 = w.a.ns.command("python3");
    v6.args(["-c", "import socket\ntry:\n    socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n    print('created')\nexcept PermissionError:\n    print('refused')"]);
    let out = String::from_utf8_lossy(&web.run(&mut v6).unwrap().stdout).into_owned();
    assert_eq!(out.trim(), "refused", "an IPv6 socket would bypass enforcement");

    // At the receivers: exactly the allowed flows arrived.
    std::thread::sleep(Duration::from_millis(500));
    let got = |w: &Workload| w.lines().into_iter().filter(|l| l.starts_with("data ")).collect::<Vec<_>>();
    assert_eq!(got(&db_5432), vec!["data web-db", "data api-db"]);
    assert!(got(&db_6000).is_empty(), "{:?}", db_6000.lines());
    assert_eq!(got(&api_8443), vec!["data web-api"]);

    // Every drop is in the audit log with its reason, identities and 5-tuple.
    wait_for("audit lines", || {
        let audit = w.a.audit();
        (audit.contains("\"reason\":\"no_identity\"")
            && audit.contains("\"reason\":\"policy\"")
            && audit.contains("\"reason\":\"unauthenticated_peer\"")
            && audit.contains("\"reason\":\"ipv6_not_enforced\""))
        .then_some(audit)
    });
    let audit = w.a.audit();
    assert!(audit.contains("\"src_identity\":\"spiffe://example.org/web\"") && audit.contains(":6000\""), "{audit}");
    let metrics = std::fs::read_to_string(w.a.dir.join("data/metrics.prom")).unwrap();
    assert!(metrics.contains("tether_enforcement_drops_total{reason=\"policy\"}"), "{metrics}");

    // The CLI explains the same verdicts.
    let explain = |from: &str, to: &str| {
        Command::new(tether_tests::agent_bin())
            .args(["policy", "explain", "--policy"])
            .arg(w.a.dir.join("policy.toml"))
            .args(["--from", from, "--to", to])
            .output()
            .unwrap()
    };
    let ok = explain("spiffe://example.org/web", "spiffe://example.org/db:5432");
    assert!(ok.status.success() && String::from_utf8_lossy(&ok.stdout).contains("web-to-db"));
    let no = explain("spiffe://example.org/web", "spiffe://example.org/db:6000");
    assert!(!no.status.success() && String::from_utf8_lossy(&no.stdout).contains("denied"));
    drop(probe);
    w.a.kill_agent();
}

/// `POLICY_A`, plus web -> db:6000: the flow the reload test switches on and off.
fn policy_a_with_6000() -> String {
    format!(
        "{POLICY_A}\n[[rule]]\nname = \"web-to-db-6000\"\nfrom = {{ spiffe_id = \"spiffe://example.org/web\" }}\nto = {{ spiffe_id = \"spiffe://example.org/db\" }}\nports = [6000]\n"
    )
}

#[test]
fn restart_under_attack_and_reload_under_traffic() {
    let mut w = world();
    let rogue = w.a.root.child("rogue").unwrap();
    let WebDb { web, db: _db, server, warm: _warm } = w.web_and_db(POLICY_A);
    let db_6000 = w.a.spawn(&_db, &["serve", "6000"]);
    db_6000.wait_line("listening");
    // A long-lived allowed flow (one line every 20 ms) and new allowed connections in a loop,
    // against an unattested process flooding db with connects.
    let flow = w.a.spawn(&web, &["send", "127.0.0.1", "5432", "long", "100000", "20"]);
    flow.wait_line("connected");
    let churn = w.a.spawn(&web, &["churn", "127.0.0.1", "5432", "12000"]);
    let flood = w.a.spawn(&rogue, &["churn", "127.0.0.1", "5432", "12000"]);
    std::thread::sleep(Duration::from_secs(1));

    // kill -9 the agent: the kernel keeps enforcing what it had, with no agent at all.
    w.a.kill_agent();
    std::thread::sleep(Duration::from_secs(2));
    w.a.start_agent();
    // The new agent's own log (the first one's is another file) says it took over.
    wait_for("the new agent to take the pins over", || w.a.log().contains("enforcement policy in force").then_some(()));

    // Reload under traffic: alternate a policy that allows web -> db:6000 with one that does
    // not, and check after each reload that exactly that flow follows it, at the receiver.
    let with_6000 = policy_a_with_6000();
    let mut allowed_tags = Vec::new();
    for i in 0..6 {
        let allow = i % 2 == 0;
        let applied = w.a.log().matches("enforcement policy in force").count();
        w.a.policy(if allow { &with_6000 } else { POLICY_A });
        wait_for(&format!("reload {i} to be applied"), || {
            (w.a.log().matches("enforcement policy in force").count() > applied).then_some(())
        });
        let tag = format!("reload-{i}");
        let out = w.a.run(&web, &["send", "127.0.0.1", "6000", &tag, "1", "0"]);
        if allow {
            assert!(out.contains("sent"), "reload {i} allows web -> db:6000, yet: {out}\n{}", w.a.log());
            db_6000.wait_line(&format!("data {tag}"));
            allowed_tags.push(format!("data {tag}"));
        } else {
            assert!(out.contains("connect-error 1"), "reload {i} refuses web -> db:6000, yet: {out}");
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let got: Vec<String> = db_6000.lines().into_iter().filter(|l| l.starts_with("data ")).collect();
    assert_eq!(got, allowed_tags, "db:6000 received exactly the flows the policy in force allowed");

    wait_for("the flood and churn to finish", || (flood.count("done") == 1 && churn.count("done") == 1).then_some(()));
    let flood_result = flood.wait_line("done");
    let churn_result = churn.wait_line("done");
    assert!(flood_result.contains(" ok 0 "), "an unattested process got through: {flood_result}");
    assert!(churn_result.contains(" fail 0"), "allowed connections were refused: {churn_result}\n{}", w.a.log());
    // The long-lived flow was never cut: every line it sent arrived, in order.
    let sent = flow.count("sent");
    assert!(flow.count("write-error") == 0, "the long flow broke: {:?}", flow.lines());
    let received: Vec<String> = server.lines().into_iter().filter(|l| l.starts_with("data long-")).collect();
    assert!(received.len() + 2 >= sent && sent > 100, "sent {sent}, received {}", received.len());
    // Nothing from the flood reached db: every accepted connection is web's (the long flow
    // and each churn connection).
    let churn_ok: usize = churn_result.split_whitespace().nth(2).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(churn_ok > 10, "{churn_result}");
    assert_eq!(server.count("accept"), churn_ok + 1, "accepted connections other than web's");
}

#[test]
fn former_identities_do_not_survive_exec_or_pid_reuse() {
    let mut w = world();
    let WebDb { web, db: _db, server, warm: _warm } = w.web_and_db(POLICY_A);

    // Exec after connect: web connects (allowed), writes, then execs a shell that keeps the
    // socket and writes again. The shell is not web: its bytes must not arrive.
    let out =
        w.a.run(&web, &["exec-after-connect", "127.0.0.1", "5432", "/bin/sh", "-c", "echo after-exec >&3; sleep 0.3"]);
    assert!(out.contains("sent before-exec"), "{out}");
    server.wait_line("data before-exec");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!server.lines().iter().any(|l| l.contains("after-exec")), "{:?}", server.lines());

    // PID reuse: a web process exits; an impostor (a shell, in the same cgroup) is created
    // with exactly its PID and tries to connect. It is not web.
    let victim = w.a.spawn(&web, &["serve", "7002"]);
    victim.wait_line("listening");
    let pid = victim._child.0.id();
    drop(victim);
    let out_file = w.a.dir.join("impostor.out");
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/5432 && echo impostor >&3 && echo ok > {0} || echo refused > {0}",
        out_file.display()
    );
    let impostor = tether_tests::spawn_with_pid(
        pid,
        &["/usr/sbin/ip", "netns", "exec", w.a.ns.name(), "/bin/bash", "-c", &script],
        web.path(),
    )
    .unwrap();
    wait_for("the impostor to finish", || std::fs::read_to_string(&out_file).ok().filter(|s| !s.is_empty()));
    tether_tests::kill_and_reap(impostor);
    assert_eq!(std::fs::read_to_string(&out_file).unwrap().trim(), "refused");
    assert!(!server.lines().iter().any(|l| l.contains("impostor")));
}

/// A TCP listener made with listen() and no bind() while its process had no identity yet is
/// stamped by no hook (socket() stamps only for a process with an identity, and no bind()
/// ran), so nothing could ever reach it. When the identity is published, the agent stamps
/// it as its holder's: allowed clients reach it; a process without identity still does not.
#[test]
fn a_listener_made_before_its_identity_serves_once_it_has_one() {
    let mut w = world();
    let policy = format!(
        "{POLICY_A}\n[[rule]]\nname = \"web-to-late\"\nfrom = {{ spiffe_id = \"spiffe://example.org/web\" }}\nto = {{ spiffe_id = \"spiffe://example.org/late\" }}\n"
    );
    let WebDb { web, db: _db, server: _server, warm: _warm } = w.web_and_db(&policy);
    let (late, rogue) = (w.a.root.child("late").unwrap(), w.a.root.child("rogue").unwrap());
    let listener = w.a.spawn(&late, &["serve-unbound"]);
    let port = listener.wait_line("listening ").trim_start_matches("listening ").to_owned();
    // No identity yet: nothing may reach it (web's connect finds no protected listener there,
    // and no address rule allows the port).
    let out = w.a.run(&web, &["send", "127.0.0.1", &port, "too-early", "1", "0"]);
    assert!(out.contains("connect-error 1"), "reached a listener without identity: {out}");

    w.register(&w.a, &late, "spiffe://example.org/late");
    w.a.wait_identity("spiffe://example.org/late");
    let out = wait_for("web to reach the listener once it has an identity", || {
        let out = w.a.run(&web, &["send", "127.0.0.1", &port, "web-late", "1", "0"]);
        out.contains("sent").then_some(out)
    });
    assert!(out.contains("connected"), "{out}");
    listener.wait_line("data web-late");
    assert!(w.a.audit().contains("\"event\":\"listener_made_before_identity\""), "{}", w.a.audit());
    // Stamped as its holder's, not opened: a process without identity is still refused.
    let out = w.a.run(&rogue, &["send", "127.0.0.1", &port, "rogue-late", "1", "0"]);
    assert!(out.contains("connect-error 1"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let got: Vec<String> = listener.lines().into_iter().filter(|l| l.starts_with("data ")).collect();
    assert_eq!(got, vec!["data web-late"]);
}

/// A process's identity is published when it execs, not at the agent's next scan: with scans
/// 10 s apart, a new web process that connects 300 ms after it started is allowed (at the
/// next scan it would have been refused, `no_identity`) — in a cgroup made after the agent's
/// last scan, as a new container's would be.
#[test]
fn a_new_process_is_identified_when_it_execs() {
    let mut w = world_with(HostOptions { enforcement: "scan_interval_ms = 10000\n".into(), ..Default::default() });
    let (web, db) = (w.a.root.child("web").unwrap(), w.a.root.child("db").unwrap());
    w.register(&w.a, &web, "spiffe://example.org/web");
    w.register(&w.a, &db, "spiffe://example.org/db");
    w.a.policy(POLICY_A);
    w.a.start_agent();
    // Let the agent's first scan (at start) pass, so only an exec can start the next one soon.
    std::thread::sleep(Duration::from_secs(1));
    let server = w.a.spawn(&db, &["serve", "5432"]);
    server.wait_line("listening");
    w.a.wait_identity("spiffe://example.org/db");
    // web's cgroup is made anew (same path, so the entry still selects it; a new cgroup id no
    // scan has seen).
    drop(web);
    let web = w.a.root.child("web").unwrap();
    let started = std::time::Instant::now();
    let out = w.a.run(&web, &["send-after", "300", "127.0.0.1", "5432", "fresh-web"]);
    assert!(out.contains("sent"), "a new web process was refused 300 ms after it started: {out}\n{}", w.a.log());
    server.wait_line("data fresh-web");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}
