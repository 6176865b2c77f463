//! `cargo xtask demo`: the main job on embedded defaults. A server (SQLite) and an agent on
//! loopback; the node attests with its TPM (a private swtpm: EK certificate chain, credential
//! activation, a quote against golden PCR values); a workload in a demo cgroup is identified
//! by what the kernel recorded about it (cgroup, uid, the sha256 of the binary it executed)
//! and fetches its SVID with an unmodified SPIFFE client; the same client outside the cgroup
//! gets nothing. The demo cgroup is protected by in-kernel enforcement: a flow its policy
//! allows is delivered, a process without identity is refused at connect() by the kernel (the
//! audit line is shown). A changed boot measurement revokes the node: its workloads' SVIDs
//! and their flows stop.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use sandbox::{swtpm::Swtpm, CgroupGuard};

/// Ends a process this demo started, by its PID, also on error.
struct Started(Child, &'static str);

impl Drop for Started {
    fn drop(&mut self) {
        // SAFETY: kill on the PID of a child we spawned and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        eprintln!("demo: {} did not stop on SIGINT; killed", self.1);
    }
}

fn step(s: &str) {
    println!("\n==> {s}");
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn indent(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

pub fn run() -> Result<()> {
    crate::cargo(&["build", "-p", "tether-agent", "-p", "tether-server", "-p", "tether-tests", "--bins"])?;
    let bin = crate::workspace().join("target/debug");
    let bins = Bins {
        server: bin.join("tether-server"),
        agent: bin.join("tether-agent"),
        client: bin.join("tether-spiffe-client"),
        flow: bin.join("tether-test-flow"),
    };
    let dir = std::env::temp_dir().join(format!("tether-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pin_dir = std::path::PathBuf::from(format!("/sys/fs/bpf/tether-demo-{}", std::process::id()));
    let result = demo(&dir, &pin_dir, &bins);
    // Enforcement outlives the agent by design: the demo ends it itself.
    if pin_dir.exists() {
        let _ = Command::new(&bins.agent).args(["enforce", "stop", "--pin-dir"]).arg(&pin_dir).output();
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

struct Bins {
    server: std::path::PathBuf,
    agent: std::path::PathBuf,
    client: std::path::PathBuf,
    /// tether-test-flow: a small network workload (serve, send).
    flow: std::path::PathBuf,
}

fn demo(dir: &Path, pin_dir: &Path, bins: &Bins) -> Result<()> {
    let (server_bin, agent_bin, client_bin) = (bins.server.as_path(), bins.agent.as_path(), bins.client.as_path());
    step("a private software TPM (swtpm) manufactured with an EK certificate chain");
    let tpm = Swtpm::start();
    println!("    {} (manufacturer CAs in {})", tpm.tcti(), Swtpm::ca_dir().display());
    let policies = dir.join("golden-pcrs");
    std::fs::create_dir_all(&policies)?;
    step("tether-agent tpm pcrs --name demo-image: the image's golden PCR values, as an image builder commits them");
    let golden = output(Command::new(agent_bin).args(["tpm", "pcrs", "--tcti", &tpm.tcti(), "--name", "demo-image"]))?;
    std::fs::write(policies.join("demo-image.toml"), &golden)?;
    indent(golden.lines().take(9).collect::<Vec<_>>().join("\n").as_str());
    println!("    ...");

    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let server_cfg = dir.join("server.toml");
    std::fs::write(
        &server_cfg,
        format!(
            "trust_domain = \"demo.tether\"\ndata_dir = \"{}\"\nbind_address = \"127.0.0.1:{port}\"\n[tpm]\nek_ca_dir = \"{}\"\npolicy_dir = \"{}\"\n",
            dir.join("server").display(),
            Swtpm::ca_dir().display(),
            policies.display()
        ),
    )?;
    step(&format!("tether-server run (trust domain demo.tether, SQLite store in {})", dir.join("server").display()));
    let _server = Started(
        Command::new(server_bin)
            .arg("run")
            .arg("-c")
            .arg(&server_cfg)
            .stderr(std::fs::File::create(dir.join("server.log"))?)
            .spawn()?,
        "tether-server",
    );
    wait_for("the server", || {
        dir.join("server/admin.sock").exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    let cli = |args: &[&str]| output(Command::new(server_bin).arg("-c").arg(&server_cfg).args(args));

    // The demo cgroup: its processes are protected by in-kernel enforcement.
    let cg = CgroupGuard::new("demo")?;
    let (shop, db, intruder) = (cg.child("shop")?, cg.child("db")?, cg.child("intruder")?);
    let db_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[rule]]\nname = \"shop-to-db\"\nfrom = {{ spiffe_id = \"spiffe://demo.tether/shop\" }}\nto = {{ spiffe_id = \"spiffe://demo.tether/db\" }}\nports = [{db_port}]\n"
        ),
    )?;
    let socket = dir.join("agent.sock");
    let agent_cfg = dir.join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "trust_domain = \"demo.tether\"\nserver_address = \"127.0.0.1:{port}\"\ntrust_bundle_path = \"{}\"\ndata_dir = \"{}\"\nsocket_path = \"{}\"\nsync_interval_seconds = 1\n[tpm]\ntcti = \"{}\"\nreattest_interval_seconds = 2\n[enforcement]\nprotected_cgroups = [\"{}\"]\npolicy = \"{}\"\npin_dir = \"{}\"\n",
            dir.join("server/bundle.pem").display(),
            dir.join("agent").display(),
            socket.display(),
            tpm.tcti(),
            cg.path().display(),
            policy.display(),
            pin_dir.display(),
        ),
    )?;
    step("tether-agent run: loads the kernel programs, attests the node with its TPM, serves the Workload API, enforces on the demo cgroup");
    let _agent = Started(
        Command::new(agent_bin)
            .arg("run")
            .arg("-c")
            .arg(&agent_cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("agent.log"))?)
            .spawn()?,
        "tether-agent",
    );
    wait_for("the agent's socket", || socket.exists())?;
    for line in std::fs::read_to_string(dir.join("agent.log"))?.lines().filter(|l| {
        l.contains("kernel support")
            || l.contains("node attested")
            || l.contains("Workload API")
            || l.contains("SOFTWARE TPM")
            || l.contains("enforcing")
    }) {
        println!(
            "    agent | {}",
            line.split_once(" INFO ").or(line.split_once(" WARN ")).map_or(line, |(_, rest)| rest)
        );
    }
    let node_id = std::fs::read_to_string(dir.join("agent.log"))?
        .lines()
        .find_map(|l| l.split("node=").nth(1).and_then(|r| r.split_whitespace().next()).map(str::to_owned))
        .context("no node ID in the agent log")?;
    step("tether-server agent list: the node's ID derives from its EK; its selectors come from the evidence");
    indent(&cli(&["agent", "list"])?);

    let cg_rel = format!("/{}", cg.path().strip_prefix(sandbox::cgroup2_root()?)?.display());
    let sha =
        output(Command::new("sha256sum").arg(client_bin))?.split_whitespace().next().unwrap_or_default().to_owned();
    step(&format!("register spiffe://demo.tether/web for what the kernel will observe: cgroup {cg_rel}, uid 0, and the binary's sha256"));
    let entry = cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://demo.tether/web",
        "--parent-id",
        &node_id,
        "--selector",
        &format!("cgroup:path:{cg_rel}"),
        "--selector",
        "unix:uid:0",
        "--selector",
        &format!("unix:sha256:{sha}"),
    ])?;
    indent(&entry);

    let endpoint = format!("unix://{}", socket.display());
    step("the workload (the Rust `spiffe` crate, unchanged) runs in the demo cgroup and asks for its SVID");
    let mut got = None;
    for _ in 0..50 {
        let out = cg.run(Command::new(client_bin).arg("x509").env("SPIFFE_ENDPOINT_SOCKET", &endpoint))?;
        if out.status.success() {
            got = Some(String::from_utf8_lossy(&out.stdout).into_owned());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = got.context("the workload never received its SVID (see the agent log)")?;
    indent(&got);
    if !got.contains("spiffe://demo.tether/web") {
        bail!("unexpected SVID: {got}");
    }

    step("what the agent sees of that cgroup (tether-agent ps), with a long-running workload in it");
    let mut sleeper = Command::new(client_bin);
    sleeper.args(["x509", "1"]).env("SPIFFE_ENDPOINT_SOCKET", &endpoint).stdout(Stdio::null()).stderr(Stdio::null());
    cg.place(&mut sleeper)?;
    let _sleeper = Started(sleeper.spawn()?, "workload");
    std::thread::sleep(Duration::from_millis(500));
    indent(&output(Command::new(agent_bin).args(["ps", "--cgroup"]).arg(cg.path()).env("RUST_LOG", "error"))?);

    step("the same client outside the cgroup: the kernel says it is not that workload");
    let out = Command::new(client_bin)
        .arg("x509")
        .env("SPIFFE_ENDPOINT_SOCKET", &endpoint)
        .env("RUST_LOG", "off")
        .output()?;
    if out.status.success() {
        bail!("a process outside the demo cgroup received an SVID");
    }
    println!(
        "    refused, as it should be ({})",
        if String::from_utf8_lossy(&out.stderr).contains("ermission") { "PermissionDenied" } else { "no SVID" }
    );

    step("another binary in the same cgroup (tether-agent api fetch): its sha256 differs, so it is not spiffe://demo.tether/web");
    let fetched = dir.join("fetched");
    let mut fetch = Command::new(agent_bin);
    fetch.args(["api", "fetch", "x509", "--socket"]).arg(&socket).arg("--write").arg(&fetched);
    let out = cg.run(&mut fetch)?;
    if out.status.success() {
        bail!("a binary with another hash received the web SVID");
    }
    println!("    refused: {}", String::from_utf8_lossy(&out.stderr).trim().trim_start_matches("error: "));

    let agent_sha =
        output(Command::new("sha256sum").arg(agent_bin))?.split_whitespace().next().unwrap_or_default().to_owned();
    step("register spiffe://demo.tether/ops for that binary in the same cgroup, then verify its SVID with openssl");
    cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://demo.tether/ops",
        "--parent-id",
        &node_id,
        "--selector",
        &format!("cgroup:path:{cg_rel}"),
        "--selector",
        &format!("unix:sha256:{agent_sha}"),
    ])?;
    let mut fetched_ok = false;
    for _ in 0..50 {
        if cg.run(&mut fetch)?.status.success() {
            fetched_ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !fetched_ok {
        bail!("the ops SVID never arrived");
    }
    indent(&output(
        Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(fetched.join("svid.0.pem")),
    )?);
    indent(&output(
        Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(fetched.join("bundle.0.pem"))
            .arg(fetched.join("svid.0.pem")),
    )?);
    let flow = bins.flow.as_path();
    let flow_sha =
        output(Command::new("sha256sum").arg(flow))?.split_whitespace().next().unwrap_or_default().to_owned();
    step(&format!(
        "in-kernel enforcement: shop and db registered (their cgroups, uid 0, the flow binary's sha256); the policy allows shop -> db:{db_port}"
    ));
    for (name, sub) in [("shop", &shop), ("db", &db)] {
        cli(&[
            "entry",
            "create",
            "--spiffe-id",
            &format!("spiffe://demo.tether/{name}"),
            "--parent-id",
            &node_id,
            "--selector",
            &format!("cgroup:path:/{}", sub.path().strip_prefix(sandbox::cgroup2_root()?)?.display()),
            "--selector",
            "unix:uid:0",
            "--selector",
            &format!("unix:sha256:{flow_sha}"),
        ])?;
    }
    let mut serve = Command::new(flow);
    serve.args(["serve", &db_port.to_string()]).stdout(Stdio::piped()).stderr(Stdio::null());
    db.place(&mut serve)?;
    let mut db_child = serve.spawn()?;
    let db_out = db_child.stdout.take().context("db output")?;
    let _db = Started(db_child, "db");
    let (tx, db_lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(db_out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let send = |from: &CgroupGuard, tag: &str| -> Result<String> {
        let out = from.run(Command::new(flow).args(["send", "127.0.0.1", &db_port.to_string(), tag, "1", "0"]))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().replace('\n', " "))
    };
    // The agent publishes an identity within its scan interval once a process with it runs
    // (a connect before that is refused: fail closed): a long-running shop process first.
    let mut warm = Command::new(flow);
    warm.args(["serve", "0"]).stdout(Stdio::null()).stderr(Stdio::null());
    shop.place(&mut warm)?;
    let _warm = Started(warm.spawn()?, "shop");
    let mut delivered = false;
    for _ in 0..50 {
        if send(&shop, "order-42")?.contains("sent") {
            delivered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !delivered {
        let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
        let audit = std::fs::read_to_string(dir.join("agent/audit.jsonl")).unwrap_or_default();
        bail!("shop -> db was never allowed; audit:\n{audit}\nagent log:\n{log}");
    }
    let got = db_lines.recv_timeout(Duration::from_secs(5)).ok();
    let got = std::iter::successors(got, |_| db_lines.recv_timeout(Duration::from_millis(500)).ok())
        .find(|l| l.starts_with("data "))
        .context("db never received shop's data")?;
    println!("    shop -> db: delivered (db read {got:?})");
    let out = send(&intruder, "steal")?;
    println!("    intruder (no registration entry) -> db: {out} (EPERM from connect(), refused in the kernel)");
    if out.contains("sent") {
        bail!("a process without identity reached db");
    }
    let audit = dir.join("agent/audit.jsonl");
    wait_for("the audit line", || std::fs::read_to_string(&audit).is_ok_and(|a| a.contains("no_identity")))?;
    let line =
        std::fs::read_to_string(&audit)?.lines().find(|l| l.contains("no_identity")).unwrap_or_default().to_owned();
    println!("    audit: {line}");

    step("the node boots something else: PCR 7 is extended, and the next re-attestation fails");
    output(tpm.tool("tpm2_pcrextend").arg(format!("7:sha256={}", "ab".repeat(32))))?;
    wait_for("the agent to report the node unattested", || {
        std::fs::read_to_string(dir.join("agent.log")).is_ok_and(|l| l.contains("NODE NOT ATTESTED"))
    })?;
    let out = cg.run(&mut fetch)?;
    println!("    workload refused: {}", String::from_utf8_lossy(&out.stderr).trim().trim_start_matches("error: "));
    if out.status.success() {
        bail!("a workload on a node with drifted evidence still received an SVID");
    }
    let out = send(&shop, "after-revocation")?;
    println!("    shop -> db after the revocation: {out} (the node's lease in the kernel ended)");
    if out.contains("sent") {
        bail!("flows continued on a node whose attestation failed");
    }
    step("demo done: stopping the agent, the server and the TPM, ending enforcement, removing the demo cgroup");
    Ok(())
}
