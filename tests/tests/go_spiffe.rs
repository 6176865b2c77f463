//! go-spiffe v2.9.0, the reference Go client, unchanged, against the Tether agent: workloads
//! in test cgroups use X509Source (SVID, bundle, rotation pushed on the open stream),
//! JWTSource (fetch, validation through the agent and locally with the JWT bundle) and
//! spiffetls (mutual TLS between two workloads, authorised by SPIFFE ID). The client is
//! `tests/go/spiffe-go-client`, built by `cargo xtask setup`; on failure it prints the stage
//! and go-spiffe's own error text, which the assertions show.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::Stdio,
};

use sandbox::{cgroup2_root, require_root, CgroupGuard};
use tether_tests::{plane::Plane, KillOnDrop};

fn go_client() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/peers/bin/spiffe-go-client");
    assert!(bin.exists(), "{} missing: `cargo xtask setup` builds the go-spiffe client (tests/go)", bin.display());
    bin
}

fn cgroup_selector(cg: &CgroupGuard) -> String {
    format!("cgroup:path:/{}", cg.path().strip_prefix(cgroup2_root().unwrap()).unwrap().display())
}

fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Runs the go-spiffe client in `cg` to completion: (success, JSON lines, everything it said).
fn go_in(plane: &Plane, cg: &CgroupGuard, args: &[&str]) -> (bool, Vec<serde_json::Value>, String) {
    let out = cg.run(plane.workload(&go_client()).args(args)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let said = format!("go-spiffe client {args:?} said:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), json_lines(&stdout), said)
}

#[test]
fn go_x509_source_gets_svid_and_bundle_and_sees_rotations_on_the_open_stream() {
    require_root().unwrap();
    let plane = Plane::start(1);
    let cg = CgroupGuard::new("go-x509").unwrap();
    let id = "spiffe://example.org/go/web";
    plane.entry(id, &[&cgroup_selector(&cg), "unix:uid:0"], &["--x509-ttl", "8"]);
    // go-spiffe retries PermissionDenied with a growing backoff: start once the SVID exists.
    plane.wait_issued(id);

    // TTL 8 s: the agent renews at about half life, so two rotations take about 8 s.
    let (ok, seen, said) = go_in(&plane, &cg, &["x509", "-rotations", "2", "-timeout", "45s"]);
    assert!(ok, "{said}\nagent log:\n{}", plane.log("agent"));
    assert_eq!(seen.len(), 3, "the SVID, then two rotations: {said}");
    for s in &seen {
        assert_eq!(s["spiffe_id"], id, "{said}");
        assert_eq!(s["verified"], id, "x509svid.Verify against the source's own bundle: {said}");
        assert_eq!(s["chain"], 1, "{said}");
        assert!(s["roots"].as_u64().unwrap() >= 1, "{said}");
        // The client logs every broken watch before re-opening it: none means the rotations
        // arrived on the stream opened at start.
        assert_eq!(s["stream_errors"], serde_json::json!([]), "{said}");
    }
    let serials: std::collections::BTreeSet<_> = seen.iter().map(|s| s["serial"].as_str().unwrap()).collect();
    assert_eq!(serials.len(), 3, "each update carried a new certificate: {said}");
    assert!(seen[1]["not_after"].as_i64() > seen[0]["not_after"].as_i64(), "{said}");
    assert!(seen[2]["not_after"].as_i64() > seen[1]["not_after"].as_i64(), "{said}");
}

#[test]
fn go_jwt_source_fetches_and_validates_through_the_agent_and_locally() {
    require_root().unwrap();
    let plane = Plane::start(1);
    let cg = CgroupGuard::new("go-jwt").unwrap();
    let id = "spiffe://example.org/go/billing";
    plane.entry(id, &[&cgroup_selector(&cg), "unix:uid:0"], &[]);
    plane.wait_issued(id);

    let (ok, seen, said) = go_in(&plane, &cg, &["jwt", "-audience", "ledger", "-other", "someone-else"]);
    assert!(ok, "{said}\nagent log:\n{}", plane.log("agent"));
    let v = &seen[0];
    assert_eq!(v["spiffe_id"], id, "{said}");
    assert_eq!(v["audience"], serde_json::json!(["ledger"]), "{said}");
    assert_eq!(v["validated"], id, "ValidateJWTSVID through the agent: {said}");
    assert_eq!(v["validated_audience"], serde_json::json!(["ledger"]), "{said}");
    assert_eq!(v["local"], id, "jwtsvid.ParseAndValidate with the JWT bundle: {said}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let exp = v["expiry"].as_i64().unwrap();
    assert!(exp > now && exp <= now + 300 + 5, "default JWT-SVID TTL 5 min: exp {exp}, now {now}");
    // The same token is refused for another audience (by the agent and locally) and when
    // its signature is altered.
    for refusal in ["agent_other_audience", "local_other_audience", "local_tampered"] {
        assert_ne!(v[refusal], "", "{refusal} was accepted: {said}");
    }
    assert!(v["local_other_audience"].as_str().unwrap().contains("audience"), "{said}");
}

/// The server workload: `serve` in `cg`, kept running; returns it and its address.
fn serve(
    plane: &Plane,
    cg: &CgroupGuard,
    allow: &str,
    conns: u32,
) -> (KillOnDrop, BufReader<std::process::ChildStdout>, String) {
    let mut cmd = plane.workload(&go_client());
    cmd.args(["serve", "-allow", allow, "-conns", &conns.to_string()]).stdout(Stdio::piped()).stderr(Stdio::piped());
    cg.place(&mut cmd).unwrap();
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|_| panic!("server did not start: {line}\nagent log:\n{}", plane.log("agent")));
    let addr = v["listening"].as_str().unwrap_or_else(|| panic!("go-spiffe server said: {line}")).to_owned();
    (child, out, addr)
}

#[test]
fn go_workloads_do_mutual_tls_with_spiffetls() {
    require_root().unwrap();
    let plane = Plane::start(1);
    let (web_cg, api_cg, other_cg) = (
        CgroupGuard::new("go-web").unwrap(),
        CgroupGuard::new("go-api").unwrap(),
        CgroupGuard::new("go-other").unwrap(),
    );
    let (web, api, other) =
        ("spiffe://example.org/go/web", "spiffe://example.org/go/api", "spiffe://example.org/go/other");
    plane.entry(web, &[&cgroup_selector(&web_cg)], &[]);
    plane.entry(api, &[&cgroup_selector(&api_cg)], &[]);
    plane.entry(other, &[&cgroup_selector(&other_cg)], &[]);
    for id in [web, api, other] {
        plane.wait_issued(id);
    }

    // web serves three connections and allows only api.
    let (mut server, mut server_out, addr) = serve(&plane, &web_cg, api, 3);

    // 1. api, expecting web: mutual TLS, each side sees the other's SPIFFE ID.
    let (ok, seen, said) = go_in(&plane, &api_cg, &["dial", "-addr", &addr, "-expect", web]);
    assert!(ok, "{said}\nagent log:\n{}", plane.log("agent"));
    assert_eq!(seen[0]["server"], web, "{said}");
    assert_eq!(seen[0]["reply"], format!("hello {api}, you said ping"), "{said}");

    // 2. api, expecting another server ID: go-spiffe's authoriser refuses web.
    let (ok, seen, said) = go_in(&plane, &api_cg, &["dial", "-addr", &addr, "-expect", "spiffe://example.org/go/db"]);
    assert!(!ok, "client accepted a server it was not told to trust: {said}");
    assert!(seen[0]["error"].as_str().unwrap().contains(&format!("unexpected ID \"{web}\"")), "{said}");

    // 3. other, expecting web: the server refuses it (only api is allowed).
    let (ok, _, said) = go_in(&plane, &other_cg, &["dial", "-addr", &addr, "-expect", web]);
    assert!(!ok, "server let a workload it does not allow talk to it: {said}");

    let status = server.0.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut server_out, &mut rest).unwrap();
    let lines = json_lines(&rest);
    assert!(status.success(), "go-spiffe server said:\n{rest}");
    assert_eq!(lines.len(), 3, "{rest}");
    assert_eq!(lines[0]["peer"], api, "the server saw the client's SPIFFE ID: {rest}");
    assert!(lines[1]["conn_error"].is_string(), "client 2 aborted the handshake: {rest}");
    assert!(
        lines[2]["conn_error"].as_str().unwrap_or_default().contains(&format!("unexpected ID \"{other}\"")),
        "the server's authoriser refused {other}: {rest}"
    );
}
