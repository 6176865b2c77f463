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

fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[test]
fn rust_spiffe_client_gets_svids_sees_rotation_and_validates_jwt() {
    require_root().unwrap();
    let plane = Plane::start(1);
    let cg = CgroupGuard::new("wl-rust").unwrap();
    plane.entry("spiffe://example.org/web", &[&cgroup_selector(&cg), "unix:uid:0"], &["--x509-ttl", "8"]);

    // X.509: the SVID, then one rotation pushed on the open stream (TTL 8 s: renewed ~4 s in).
    let (ok, out, err) = run_in(&cg, plane.workload(Path::new(SPIFFE_CLIENT)).args(["x509", "1"]));
    assert!(ok, "spiffe client failed: {err}\nagent log:\n{}", plane.log("agent"));
    let seen = json_lines(&out);
    assert_eq!(seen.len(), 2, "{out}");
    for s in &seen {
        assert_eq!(s["spiffe_id"], "spiffe://example.org/web");
        assert_eq!(s["chain"], 1);
        assert!(s["roots"].as_u64().unwrap() >= 1);
    }
    assert_ne!(seen[0]["leaf"], seen[1]["leaf"], "the rotation delivered a new certificate");

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
    let count = |p: &Plane| {
        let out = p.cli(&["entry", "show"]);
        String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_owned()
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
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count(&plane), before.replace('0', "1"), "only the one good entry was stored");

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

    let (ok, out, err) = run_in(&cg, plane.workload(&python).arg(&script).args(["x509", "1"]));
    assert!(ok, "python client failed: {err}\n{out}\nagent log:\n{}", plane.log("agent"));
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

#[test]
fn agent_with_ten_thousand_entries_syncs_and_holds_every_svid() {
    require_root().unwrap();
    // All the entries exist before the agent starts, so its first sync has every SVID due at
    // once: about 6 MB of signed chains, beyond gRPC's default 4 MiB message limit.
    let mut plane = Plane::server_only("");
    let token = plane.cli(&["token", "generate", "--node-id", &plane.node_id.clone()]);
    let token = String::from_utf8_lossy(&token.stdout).trim().trim_start_matches("Token: ").to_owned();
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
