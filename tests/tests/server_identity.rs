//! The agent authenticates its server by SPIFFE ID, not by DNS name: the same CA signs
//! workload SVIDs, and operators choose their DNS names.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use sandbox::{cgroup2_root, require_root, CgroupGuard};
use tether_tests::{
    plane::{free_port, Plane},
    wait_for, KillOnDrop,
};

/// A second agent's config in `dir`, for the node API at `port`, trusting the plane's bundle.
fn agent_config(plane: &Plane, dir: &Path, port: u16, token: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1:{port}\"\ntrust_bundle_path = \"{}\"\ndata_dir = \"{}\"\nsocket_path = \"{}\"\nsync_interval_seconds = 1\njoin_token = \"{token}\"\n",
            plane.dir.path().join("server/bundle.pem").display(),
            dir.join("data").display(),
            dir.join("agent.sock").display()
        ),
    )
    .unwrap();
    path
}

fn start_agent(config: &Path, log: &Path) -> KillOnDrop {
    let log_file = std::fs::File::create(log).unwrap();
    KillOnDrop(
        Command::new(tether_tests::agent_bin())
            .arg("run")
            .arg("-c")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap(),
    )
}

#[test]
fn a_workload_svid_with_the_servers_dns_name_cannot_pose_as_the_server() {
    require_root().unwrap();
    let plane = Plane::start(1);
    // A workload whose SVID carries the DNS name the agents use for the server.
    let cg = CgroupGuard::new("rogue").unwrap();
    let selector = format!("cgroup:path:/{}", cg.path().strip_prefix(cgroup2_root().unwrap()).unwrap().display());
    plane.entry("spiffe://example.org/rogue", &[&selector], &["--dns", "localhost"]);
    plane.wait_issued("spiffe://example.org/rogue");
    let svid = plane.dir.path().join("rogue-svid");
    let mut fetch = Command::new(tether_tests::agent_bin());
    fetch.args(["api", "fetch", "x509", "--socket"]).arg(plane.socket()).arg("--write").arg(&svid);
    assert!(cg.run(&mut fetch).unwrap().status.success());

    // It serves TLS with that SVID (chain valid under the bundle, name "localhost").
    let port = free_port();
    let rogue_out = plane.dir.path().join("rogue.out");
    let _rogue = KillOnDrop(
        Command::new("openssl")
            .args(["s_server", "-accept", &format!("127.0.0.1:{port}"), "-alpn", "h2", "-cert"])
            .arg(svid.join("svid.0.pem"))
            .arg("-key")
            .arg(svid.join("svid.0.key"))
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&rogue_out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the rogue TLS server", || std::net::TcpStream::connect(("127.0.0.1", port)).ok());

    // A new node's agent pointed at it: refused at the handshake, its join token never sent.
    let token = plane.token("spiffe://example.org/node/new");
    let dir = plane.dir.path().join("new-node");
    let config = agent_config(&plane, &dir, port, &token);
    let log = dir.join("agent.log");
    let agent = start_agent(&config, &log);
    let text = wait_for("the agent to refuse the rogue server", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("not the Tether server").then_some(text)
    });
    drop(agent);
    assert!(
        text.contains(
            "the server's certificate names spiffe://example.org/rogue, not spiffe://example.org/tether/server"
        ),
        "{text}"
    );
    let seen = std::fs::read_to_string(&rogue_out).unwrap_or_default();
    assert!(!seen.contains(&token), "the join token reached the rogue server: {seen}");
    assert!(!dir.join("data/node-svid.der").exists(), "the agent took an SVID from the rogue server");

    // The same agent, the same token, pointed at the real server: attested.
    let config = agent_config(&plane, &dir, plane.port, &token);
    let _agent = start_agent(&config, &log);
    wait_for("the agent to attest to the real server", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("node attested").then_some(())
    });
}
