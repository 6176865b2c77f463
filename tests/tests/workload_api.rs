//! The identity plane end to end: a real server and agent, workloads in test cgroups
//! identified by the kernel, and independent SPIFFE clients.

use std::{path::Path, process::Command, time::Duration};

use sandbox::{cgroup2_root, require_root, CgroupGuard};
use tether_proto::workload;
use tether_tests::plane::Plane;

const SPIFFE_CLIENT: &str = env!("CARGO_BIN_EXE_tether-spiffe-client");

fn cgroup_selector(cg: &CgroupGuard) -> String {
    format!("cgroup:path:/{}", cg.path().strip_prefix(cgroup2_root().unwrap()).unwrap().display())
}

fn run_in(cg: &CgroupGuard, cmd: &mut Command) -> (bool, String, String) {
    let out = cg.run(cmd).unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Workload API connections the agent has accepted so far (it logs each at debug).
fn connections(plane: &Plane) -> usize {
    plane.log("agent").matches("workload API connection accepted").count()
}

fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[test]
fn rust_spiffe_client_gets_svids_sees_rotation_and_validates_jwt() {
    require_root().unwrap();
    let plane = Plane::start(1);
    let cg = CgroupGuard::new("wl-rust").unwrap();
    plane.entry("spiffe://example.org/web", &[&cgroup_selector(&cg), "unix:uid:0"], &["--x509-ttl", "8"]);
    // Started once the agent holds the SVID, so the client's first call succeeds (a refused
    // first call would make it reconnect, which is not what is measured here).
    plane.wait_issued("spiffe://example.org/web");

    // X.509: the SVID, then two rotations pushed on the open stream (TTL 8 s: renewed ~4 s
    // in). The crate's X509Source makes two connections whatever happens (one for its initial
    // sync, one for the stream it watches); a stream the agent ended on rotation would make
    // it reconnect, a third.
    let before = connections(&plane);
    let (ok, out, err) = run_in(&cg, plane.workload(Path::new(SPIFFE_CLIENT)).args(["x509", "2"]));
    assert!(ok, "spiffe client failed: {err}\nagent log:\n{}", plane.log("agent"));
    assert_eq!(connections(&plane) - before, 2, "a rotation came over a new connection:\n{}", plane.log("agent"));
    let seen = json_lines(&out);
    assert_eq!(seen.len(), 3, "{out}");
    for s in &seen {
        assert_eq!(s["spiffe_id"], "spiffe://example.org/web");
        assert_eq!(s["chain"], 1);
        assert!(s["roots"].as_u64().unwrap() >= 1);
    }
    assert_ne!(seen[0]["leaf"], seen[1]["leaf"], "the rotation delivered a new certificate");
    assert_ne!(seen[1]["leaf"], seen[2]["leaf"], "the second rotation delivered a new certificate");

    // JWT: fetched with an audience, validated by the Workload API.
    let (ok, out, err) = run_in(&cg, plane.workload(Path::new(SPIFFE_CLIENT)).args(["jwt", "db"]));
    assert!(ok, "{err}");
    let jwt = &json_lines(&out)[0];
    assert_eq!(jwt["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(jwt["validated"], "spiffe://example.org/web");
}

#[test]
fn svids_verify_with_openssl_against_the_bundle() {
    require_root().unwrap();
    let plane = Plane::start(1);
    let cg = CgroupGuard::new("wl-openssl").unwrap();
    plane.entry("spiffe://example.org/billing", &[&cgroup_selector(&cg)], &["--dns", "billing.internal"]);
    let dir = plane.dir.path().join("fetched");
    let mut cmd = Command::new(tether_tests::agent_bin());
    cmd.args(["api", "fetch", "x509", "--socket"]).arg(plane.socket()).arg("--write").arg(&dir);
    let mut ok = false;
    for _ in 0..50 {
        let (done, _, _) = run_in(&cg, &mut cmd);
        if done {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ok, "fetch failed; agent log:\n{}", plane.log("agent"));
    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.join("bundle.0.pem"))
        .arg(dir.join("svid.0.pem"))
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let text =
        Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(dir.join("svid.0.pem")).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("URI:spiffe://example.org/billing"), "{text}");
    assert!(text.contains("DNS:billing.internal"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    // A certificate from another authority does not verify against this bundle.
    let other = Plane::start(1);
    let other_bundle = other.dir.path().join("server/bundle.pem");
    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(other_bundle)
        .arg(dir.join("svid.0.pem"))
        .output()
        .unwrap();
    assert!(!verify.status.success());
}

/// A plain generated client: no interceptor adds the security header.
fn raw_client(
    plane: &Plane,
) -> tether_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<tonic::transport::Channel> {
    let rt = tokio::runtime::Handle::current();
    let socket = plane.socket();
    let channel = rt.block_on(async {
        tonic::transport::Endpoint::from_static("http://x.invalid")
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .unwrap()
    });
    tether_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel)
}

#[test]
fn error_codes_follow_the_standard() {
    require_root().unwrap();
    let plane = Plane::start(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _enter = rt.enter();
    let mut bare = raw_client(&plane);
    rt.block_on(async {
        // No security header: InvalidArgument.
        let err = bare.fetch_x509svid(workload::X509svidRequest {}).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        let mut with_header = tether_agent::api_client::connect(&plane.socket()).await.unwrap();
        // Empty audience: InvalidArgument.
        let err = with_header
            .fetch_jwtsvid(workload::JwtsvidRequest { audience: vec![], spiffe_id: String::new() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        // This test process matches no entry: PermissionDenied.
        let err = with_header.fetch_x509svid(workload::X509svidRequest {}).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        let err = with_header
            .fetch_jwtsvid(workload::JwtsvidRequest { audience: vec!["a".into()], spiffe_id: String::new() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        // WIT-SVID profile: Unimplemented.
        let err = with_header.fetch_witsvid(workload::WitsvidRequest { spiffe_id: String::new() }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    });
}

#[test]
fn bad_registrations_are_refused_and_store_nothing() {
    require_root().unwrap();
    let plane = Plane::start(5);
    // The number `entry show` reports; it must succeed and say it.
    let count = |p: &Plane| -> usize {
        let out = p.cli_ok(&["entry", "show"]);
        let first = out.lines().next().unwrap_or_default();
        first
            .strip_prefix("Found ")
            .and_then(|r| r.strip_suffix(" entries"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("entry show printed {out:?}"))
    };
    let before = count(&plane);
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/a/../b",
                "--parent-id",
                "spiffe://example.org/n",
                "--selector",
                "unix:uid:0",
            ],
            "'.' or '..'",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://Example.org/a",
                "--parent-id",
                "spiffe://example.org/n",
                "--selector",
                "unix:uid:0",
            ],
            "lowercase",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/a",
                "--parent-id",
                "spiffe://example.org/n",
                "--selector",
                "uid1000",
            ],
            "no type",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://other.org/a",
                "--parent-id",
                "spiffe://example.org/n",
                "--selector",
                "unix:uid:0",
            ],
            "not in trust domain",
        ),
    ];
    for (args, want) in cases {
        let mut full = vec!["entry", "create"];
        full.extend_from_slice(args);
        let out = plane.cli(&full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{args:?}: {err}");
    }
    plane.entry("spiffe://example.org/dup", &["unix:uid:7"], &[]);
    let out = plane.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/dup",
        "--parent-id",
        &plane.node_id,
        "--selector",
        "unix:uid:7",
    ]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "a duplicate entry must be refused ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count(&plane), before + 1, "only the one good entry was stored");

    // A used join token cannot attest a second agent.
    let reused = plane.dir.path().join("agent2.toml");
    let cfg = std::fs::read_to_string(plane.dir.path().join("agent.toml"))
        .unwrap()
        .replace(plane.dir.path().join("agent").to_str().unwrap(), plane.dir.path().join("agent2").to_str().unwrap())
        .replace("agent.sock", "agent2.sock");
    std::fs::write(&reused, cfg).unwrap();
    let out = Command::new(tether_tests::agent_bin()).arg("run").arg("-c").arg(&reused).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("join token unknown, already used or expired"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn agent_serves_through_a_server_outage_and_recovers() {
    require_root().unwrap();
    let mut plane = Plane::start(1);
    let cg = CgroupGuard::new("wl-outage").unwrap();
    plane.entry("spiffe://example.org/api", &[&cgroup_selector(&cg)], &[]);
    let fetch = |p: &Plane| run_in(&cg, p.workload(Path::new(SPIFFE_CLIENT)).arg("x509"));
    assert!(fetch(&plane).0, "before the outage");
    plane.stop_server();
    std::thread::sleep(Duration::from_secs(2)); // a few failed syncs
    let (ok, out, err) = fetch(&plane);
    assert!(ok, "cached SVID not served during the outage: {err}");
    assert_eq!(json_lines(&out)[0]["spiffe_id"], "spiffe://example.org/api");
    plane.start_server();
    // Recovery: an entry created after the restart reaches the agent.
    let cg2 = CgroupGuard::new("wl-outage2").unwrap();
    plane.entry("spiffe://example.org/late", &[&cgroup_selector(&cg2)], &[]);
    let (ok, out, err) = run_in(&cg2, plane.workload(Path::new(SPIFFE_CLIENT)).arg("x509"));
    assert!(ok, "{err}\n{}", plane.log("agent"));
    assert_eq!(json_lines(&out)[0]["spiffe_id"], "spiffe://example.org/late");
}

#[test]
fn python_spiffe_client_gets_svids_sees_rotation_and_validates_jwt() {
    require_root().unwrap();
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyvenv/bin/python");
    assert!(
        python.exists(),
        "{} missing: cargo xtask setup creates the venv with the spiffe package",
        python.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/spiffe_client.py");
    let plane = Plane::start(1);
    let cg = CgroupGuard::new("wl-python").unwrap();
    plane.entry("spiffe://example.org/py", &[&cgroup_selector(&cg), "unix:uid:0"], &["--x509-ttl", "8"]);
    // Unlike the Rust client, the Python one does not retry PermissionDenied: start it once
    // the agent holds the SVID.
    plane.wait_issued("spiffe://example.org/py");

    let before = connections(&plane);
    let (ok, out, err) = run_in(&cg, plane.workload(&python).arg(&script).args(["x509", "1"]));
    assert!(ok, "python client failed: {err}\n{out}\nagent log:\n{}", plane.log("agent"));
    // One gRPC channel, one connection: the update arrived on the open stream.
    assert_eq!(connections(&plane) - before, 1, "the rotation came over a new connection");
    let seen = json_lines(&out);
    assert_eq!(seen.len(), 2, "{out}");
    assert!(seen.iter().all(|s| s["spiffe_id"] == "spiffe://example.org/py"), "{out}");
    assert!(seen[0]["roots"].as_u64().unwrap() >= 1);
    assert_ne!(seen[0]["leaf"], seen[1]["leaf"], "rotation delivered a new certificate: {out}");

    let (ok, out, err) = run_in(&cg, plane.workload(&python).arg(&script).args(["jwt", "billing"]));
    assert!(ok, "{err}\n{out}");
    let v = &json_lines(&out)[0];
    assert_eq!(
        (v["spiffe_id"].as_str(), v["validated"].as_str(), v["local"].as_str()),
        (Some("spiffe://example.org/py"), Some("spiffe://example.org/py"), Some("spiffe://example.org/py"))
    );
}

#[test]
fn upstream_ca_from_disk_roots_the_bundle() {
    require_root().unwrap();
    let ca_dir = tempfile::tempdir().unwrap();
    let (cert, key) = (ca_dir.path().join("root.pem"), ca_dir.path().join("root.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "10",
            "-subj",
            "/CN=corp root",
        ])
        .args([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plane = Plane::start_with(
        1,
        &format!("upstream_ca_cert = \"{}\"\nupstream_ca_key = \"{}\"\n", cert.display(), key.display()),
    );
    let cg = CgroupGuard::new("wl-upstream").unwrap();
    plane.entry("spiffe://example.org/up", &[&cgroup_selector(&cg)], &[]);
    let dir = plane.dir.path().join("fetched");
    let mut cmd = Command::new(tether_tests::agent_bin());
    cmd.args(["api", "fetch", "x509", "--socket"]).arg(plane.socket()).arg("--write").arg(&dir);
    assert!((0..50).any(|_| {
        let ok = cg.run(&mut cmd).unwrap().status.success();
        if !ok {
            std::thread::sleep(Duration::from_millis(200));
        }
        ok
    }));
    // The bundle is the upstream root; the SVID chain carries Tether's intermediate.
    assert_eq!(
        std::fs::read_to_string(dir.join("bundle.0.pem")).unwrap().trim(),
        std::fs::read_to_string(&cert).unwrap().trim()
    );
    let chain = std::fs::read_to_string(dir.join("svid.0.pem")).unwrap();
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&cert)
        .arg("-untrusted")
        .arg(dir.join("svid.0.pem"))
        .arg(dir.join("svid.0.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
fn server_on_postgresql_serves_the_same_plane() {
    require_root().unwrap();
    let base = std::env::var("TETHER_TEST_POSTGRES").expect(
        "TETHER_TEST_POSTGRES not set: run the suite with `cargo xtask test`, which starts a private PostgreSQL",
    );
    // A database of its own, so runs never see each other's rows.
    let db = format!("tether_{}", std::process::id());
    let out = Command::new("psql").args([&base, "-c", &format!("CREATE DATABASE {db}")]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let conninfo = base.replace("dbname=postgres", &format!("dbname={db}"));
    let plane = Plane::start_with(1, &format!("postgres = \"{conninfo}\"\n"));
    let cg = CgroupGuard::new("wl-pg").unwrap();
    plane.entry("spiffe://example.org/pg", &[&cgroup_selector(&cg)], &[]);
    let (ok, out, err) = run_in(&cg, plane.workload(Path::new(SPIFFE_CLIENT)).arg("x509"));
    assert!(ok, "{err}\n{}", plane.log("server"));
    assert_eq!(json_lines(&out)[0]["spiffe_id"], "spiffe://example.org/pg");
    // The rows are in PostgreSQL, not in a SQLite file.
    let rows =
        Command::new("psql").args([conninfo.as_str(), "-At", "-c", "SELECT spiffe_id FROM entries"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&rows.stdout).trim(), "spiffe://example.org/pg");
    assert!(!plane.dir.path().join("server/tether.db").exists());
}

/// The rotation is pushed on the stream the caller opened: two messages on one HTTP/2 stream,
/// read with a plain generated client (no library that might reconnect behind our back).
#[test]
fn rotation_arrives_on_the_open_stream() {
    require_root().unwrap();
    let plane = Plane::start(1);
    // This test process is the workload: root, in whatever cgroup the test runs.
    plane.entry("spiffe://example.org/self", &["unix:uid:0"], &["--x509-ttl", "8"]);
    plane.wait_issued("spiffe://example.org/self");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = tether_agent::api_client::connect(&plane.socket()).await.unwrap();
        let mut stream = client.fetch_x509svid(workload::X509svidRequest {}).await.unwrap().into_inner();
        let mut leaves = Vec::new();
        for _ in 0..2 {
            let msg = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .expect("no message within 30 s on the open stream")
                .unwrap()
                .expect("the stream ended");
            assert_eq!(msg.svids[0].spiffe_id, "spiffe://example.org/self");
            leaves.push(msg.svids[0].x509_svid.clone());
        }
        assert_ne!(leaves[0], leaves[1], "the second message carries the rotated SVID");
    });
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).unwrap()
}

/// `token` with its header replaced (the signature left as it was).
fn with_header(token: &str, header: serde_json::Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!("{}.{}.{}", b64(header.to_string().as_bytes()), parts[1], parts[2])
}

/// ValidateJWTSVID refuses every kind of bad token with InvalidArgument and says why.
#[test]
fn validate_jwt_svid_refuses_forged_expired_and_foreign_tokens() {
    require_root().unwrap();
    let plane = Plane::start(1);
    let other = Plane::start_in("other.org", 1, "");
    // This test process is a workload of both planes (root, any cgroup); short-lived JWTs for
    // the expiry case.
    plane.entry("spiffe://example.org/self", &["unix:uid:0"], &[]);
    plane.entry("spiffe://example.org/short-lived", &["unix:uid:0"], &["--jwt-ttl", "2"]);
    other.entry("spiffe://other.org/self", &["unix:uid:0"], &[]);
    plane.wait_issued("spiffe://example.org/self");
    other.wait_issued("spiffe://other.org/self");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = tether_agent::api_client::connect(&plane.socket()).await.unwrap();
        let other_client = tether_agent::api_client::connect(&other.socket()).await.unwrap();
        let fetch = |c: &tether_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<_>, id: &str| {
            let mut c = c.clone();
            let spiffe_id = id.to_owned();
            async move {
                c.fetch_jwtsvid(workload::JwtsvidRequest { audience: vec!["db".into()], spiffe_id })
                    .await
                    .unwrap()
                    .into_inner()
                    .svids
                    .remove(0)
                    .svid
            }
        };
        let good = fetch(&client, "spiffe://example.org/self").await;
        let foreign = fetch(&other_client, "spiffe://other.org/self").await;
        let validate = |token: String, audience: &str| {
            let mut c = client.clone();
            let audience = audience.to_owned();
            async move { c.validate_jwtsvid(workload::ValidateJwtsvidRequest { audience, svid: token }).await }
        };
        // The control: the genuine token validates.
        let ok = validate(good.clone(), "db").await.expect("a genuine JWT-SVID must validate").into_inner();
        assert_eq!(ok.spiffe_id, "spiffe://example.org/self");

        let header: serde_json::Value = serde_json::from_slice(&unb64(good.split('.').next().unwrap())).unwrap();
        let kid = header["kid"].as_str().unwrap().to_owned();
        let parts: Vec<&str> = good.split('.').collect();
        let mut sig = unb64(parts[2]);
        sig[10] ^= 0x55;
        let tampered = format!("{}.{}.{}", parts[0], parts[1], b64(&sig));
        let cases: Vec<(&str, String, &str, &[&str])> = vec![
            ("tampered signature", tampered, "db", &["signature does not verify"]),
            (
                "unknown kid",
                with_header(&good, serde_json::json!({"alg": "ES256", "kid": "not-a-key", "typ": "JWT"})),
                "db",
                &["unknown kid", "not-a-key"],
            ),
            ("alg none", format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), parts[1]), "db", &["alg", "none"]),
            (
                "alg HS256",
                with_header(&good, serde_json::json!({"alg": "HS256", "kid": kid, "typ": "JWT"})),
                "db",
                &["alg", "HS256"],
            ),
            ("wrong audience", good.clone(), "payments", &["audience", "payments"]),
            ("another trust domain", foreign, "db", &["trust domain", "other.org"]),
            ("malformed", "not.a-token".into(), "db", &["malformed"]),
            ("malformed", "a.b.c".into(), "db", &["malformed"]),
        ];
        for (what, token, audience, reasons) in cases {
            let err = validate(token, audience).await.expect_err(what);
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
            for reason in reasons {
                assert!(err.message().contains(reason), "{what}: the refusal must name why ({reason:?}): {err:?}");
            }
        }
        // Expired: a 2 s token (valid when fetched), once its life is over.
        let short = fetch(&client, "spiffe://example.org/short-lived").await;
        tokio::time::sleep(Duration::from_millis(3100)).await;
        let err = validate(short, "db").await.expect_err("an expired JWT-SVID validated");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("expired"), "{err:?}");
    });
}

/// A node with 10,000 entries: every SVID is signed (in batches; one answer would pass
/// gRPC's message limit) and served.
#[test]
fn agent_with_ten_thousand_entries_syncs_and_holds_every_svid() {
    require_root().unwrap();
    // All the entries exist before the agent starts, so its first sync has every SVID due at
    // once: about 6 MB of signed chains, beyond gRPC's default 4 MiB message limit.
    let mut plane = Plane::server_only("");
    let token = plane.token(&plane.node_id);
    plane.write_agent_config(1, &format!("join_token = \"{token}\"\n"));
    let cg = CgroupGuard::new("wl-many").unwrap();
    plane.entry("spiffe://example.org/many/client", &[&cgroup_selector(&cg)], &[]);
    // 9,999 more through the admin API (the CLI would take a process each), selected by uid
    // and sha256 like real workloads.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut admin =
            tether_server::admin_client::connect(&plane.dir.path().join("server/admin.sock")).await.unwrap();
        for i in 0..9_999 {
            admin
                .create_entry(tether_proto::node::Entry {
                    spiffe_id: format!("spiffe://example.org/many/w{i}"),
                    parent_id: plane.node_id.clone(),
                    selectors: vec![format!("unix:uid:{}", 100_000 + i), format!("unix:sha256:{i:064x}")],
                    namespace: "default".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    });
    plane.start_agent();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while plane.log("agent").matches("X.509-SVID issued").count() < 10_000 {
        let log = plane.log("agent");
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 10,000 SVIDs issued; agent log tail:\n{}",
            log.matches("X.509-SVID issued").count(),
            log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!plane.log("agent").contains("sync with the server failed"), "{}", plane.log("agent"));
    let (ok, out, err) = run_in(&cg, plane.workload(Path::new(SPIFFE_CLIENT)).arg("x509"));
    assert!(ok, "{err}");
    assert_eq!(json_lines(&out)[0]["spiffe_id"], "spiffe://example.org/many/client");
}
