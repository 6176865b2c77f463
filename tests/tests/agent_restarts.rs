//! Restarts must not cost identities: an agent restarted while the server is away serves
//! what the node held until it expires and reconnects when the server returns; an agent
//! restarted after its CA has rotated away trusts the server with the bundle it was last
//! sent, not the stale bootstrap file.

use std::{path::Path, process::Command, time::Instant};

use sandbox::{cgroup2_root, require_root, swtpm::Swtpm, CgroupGuard};
use tether_tests::{plane::Plane, wait_for};

fn selector(cg: &CgroupGuard) -> String {
    format!("cgroup:path:/{}", cg.path().strip_prefix(cgroup2_root().unwrap()).unwrap().display())
}

/// The leaf certificate (PEM) the workload in `cg` receives, or why not.
fn fetch_leaf(plane: &Plane, cg: &CgroupGuard) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(tether_tests::agent_bin());
    cmd.args(["api", "fetch", "x509", "--socket"]).arg(plane.socket()).arg("--write").arg(dir.path());
    let out = cg.run(&mut cmd).unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(std::fs::read_to_string(dir.path().join("svid.0.pem")).unwrap())
}

/// [`wait_for`], printing the agent's and server's logs if it times out.
fn wait_logged<T>(plane: &Plane, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}\nagent log:\n{}\nserver log:\n{}",
                plane.log("agent"),
                plane.log("server")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_restart_while_the_server_is_down_serves_what_the_node_held() {
    require_root().unwrap();
    let mut plane = Plane::start(1);
    let cg = CgroupGuard::new("held").unwrap();
    plane.entry("spiffe://example.org/held", &[&selector(&cg)], &[]);
    plane.wait_issued("spiffe://example.org/held");
    let before = fetch_leaf(&plane, &cg).unwrap();

    // The server goes away; the agent is restarted.
    plane.stop_server();
    let started = Instant::now();
    plane.start_agent();
    let leaf = wait_logged(&plane, "the held SVID to be served", || fetch_leaf(&plane, &cg).ok());
    let up = started.elapsed();
    assert_eq!(leaf, before, "the SVID held before the restart is the one served");
    let log = plane.log("agent");
    assert!(log.contains("server unreachable at start") && log.contains("serving the SVIDs held before"), "{log}");
    println!("Workload API serving held SVIDs {up:?} after the agent started, server down");
    // The agent keeps trying and says so.
    wait_for("a retry", || plane.log("agent").contains("server still unreachable; next attempt in").then_some(()));

    // The server returns: the agent reconnects, and new registrations reach workloads.
    plane.start_server();
    wait_for("the agent to reach the server", || {
        plane.log("agent").contains("server reached: node attested").then_some(())
    });
    let late = CgroupGuard::new("after").unwrap();
    plane.entry("spiffe://example.org/after", &[&selector(&late)], &[]);
    plane.wait_issued("spiffe://example.org/after");
    assert!(fetch_leaf(&plane, &late).is_ok());
    // The held SVID was not re-issued just because the agent restarted.
    assert_eq!(fetch_leaf(&plane, &cg).unwrap(), before);
}

#[test]
fn a_node_the_server_refused_serves_nothing_after_a_restart() {
    require_root().unwrap();
    let mut plane = Plane::start(1);
    let cg = CgroupGuard::new("refused").unwrap();
    plane.entry("spiffe://example.org/refused", &[&selector(&cg)], &[]);
    plane.wait_issued("spiffe://example.org/refused");
    assert!(fetch_leaf(&plane, &cg).is_ok());
    // Evicted: the agent withdraws; then the server goes away and the agent restarts.
    plane.cli_ok(&["agent", "evict", "--spiffe-id", &plane.node_id.clone()]);
    wait_for("the withdrawal", || plane.log("agent").contains("NODE NOT ATTESTED").then_some(()));
    plane.stop_server();
    plane.start_agent();
    let err = fetch_leaf(&plane, &cg).unwrap_err();
    assert!(err.contains("this node is not attested"), "{err}");
}

/// Certificates of a PEM file, as their base64 bodies.
fn certs(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split("-----BEGIN CERTIFICATE-----").skip(1).map(|c| c.split("-----END").next().unwrap().to_owned()).collect()
}

#[test]
fn a_restart_after_two_ca_rotations_trusts_the_bundle_it_was_sent() {
    require_root().unwrap();
    let tpm = Swtpm::start();
    let policies = tempfile::tempdir().unwrap();
    let out = Command::new(tether_tests::agent_bin())
        .args(["tpm", "pcrs", "--tcti", &tpm.tcti(), "--name", "base"])
        .output()
        .unwrap();
    std::fs::write(policies.path().join("base.toml"), &out.stdout).unwrap();
    // Authorities of 60 s (the shortest the server allows): the next is published at 30 s
    // and active at 50 s; the first is gone at 60 s, the third active at 80 s.
    const TTL: u64 = 60;
    let mut plane = Plane::start_tpm_server(
        1,
        &tpm,
        policies.path(),
        "ecc",
        60,
        &format!(
            "ca_ttl_seconds = {TTL}\ndefault_x509_svid_ttl_seconds = 20\nnode_svid_ttl_seconds = 20\n\
             default_jwt_svid_ttl_seconds = 20\n"
        ),
        "",
    );
    // The agent's bootstrap bundle: the first authority only, as an operator copied it.
    let live = plane.dir.path().join("server/bundle.pem");
    let bootstrap = plane.dir.path().join("bootstrap.pem");
    std::fs::copy(&live, &bootstrap).unwrap();
    let config = plane.dir.path().join("agent.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(live.to_str().unwrap(), bootstrap.to_str().unwrap());
    std::fs::write(&config, text).unwrap();
    let cg = CgroupGuard::new("rotations").unwrap();
    plane.entry("spiffe://example.org/rotations", &[&selector(&cg)], &[]);
    plane.wait_issued("spiffe://example.org/rotations");

    // Two rotations: three authorities seen, the first gone, the third active.
    let first = certs(&bootstrap);
    let mut seen: Vec<String> = first.clone();
    let deadline = Instant::now() + std::time::Duration::from_secs(TTL * 2);
    loop {
        for c in certs(&live) {
            if !seen.contains(&c) {
                seen.push(c);
            }
        }
        let now_live = certs(&live);
        if seen.len() >= 3 && !now_live.iter().any(|c| first.contains(c)) {
            break;
        }
        assert!(Instant::now() < deadline, "no second rotation within {} s", TTL * 2);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    std::thread::sleep(std::time::Duration::from_secs(TTL / 3 + 2)); // the third becomes active
    assert!(fetch_leaf(&plane, &cg).is_ok(), "the running agent kept up:\n{}", plane.log("agent"));

    // Restarted: it attests with the bundle it was sent, and serves.
    plane.start_agent();
    wait_for("the restarted agent to attest", || plane.log("agent").contains("node attested").then_some(()));
    let log = plane.log("agent");
    assert!(!log.contains("unreachable"), "{log}");
    assert!(fetch_leaf(&plane, &cg).is_ok());

    // Without it (the bootstrap file alone), the same restart cannot trust the server.
    plane.stop_agent();
    std::fs::remove_file(plane.dir.path().join("agent/bundle.json")).unwrap();
    plane.start_agent();
    wait_for("the agent to give up on the first contact", || {
        plane.log("agent").contains("server unreachable at start").then_some(())
    });
    let log = plane.log("agent");
    assert!(log.contains("UnknownIssuer") || log.contains("unknown issuer"), "{log}");
}
