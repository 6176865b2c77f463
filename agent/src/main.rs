use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tether_agent::{
    cgroup::{cgroup2_root, Cgroup},
    ebpf,
    process::{
        caller::Resolver,
        manifest::{self, Manifest},
        measure::{self, Measurer, Outcome},
        ps::{ps, PsRow},
        Record,
    },
    telemetry,
};

/// Tether node agent: kernel-observed workload identity and in-kernel enforcement.
#[derive(Parser)]
#[command(name = "tether-agent", version)]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print exec events as the kernel records them, live.
    TraceExec {
        /// Only processes in this cgroup's subtree (absolute, or relative to the cgroup2 root).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the processes of a cgroup subtree with their kernel-observed selectors.
    Ps {
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(long)]
        json: bool,
        /// Executables larger than this are not hashed.
        #[arg(long, default_value_t = tether_agent::config::DEFAULT_MAX_MEASURE_BYTES)]
        max_measure_bytes: u64,
        /// Golden manifest (`path sha256` lines) to pre-measure and compare against.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// The agent's config: its `[selectors]` (the container runtimes' cgroup roots) are
        /// used, so `ps` shows the selectors the agent derives.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Write a golden manifest (`path sha256` lines) of the executables under a root file
    /// system, as an image builder would.
    Measure {
        /// Root of the file system (e.g. an unpacked image, or /).
        dir: PathBuf,
        /// Where to write the manifest (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[arg(long, default_value_t = tether_agent::config::DEFAULT_MAX_MEASURE_BYTES)]
        max_measure_bytes: u64,
    },
    /// Report which BPF program and map types this kernel accepts, and the path Tether uses.
    Probe,
    /// Run the agent: attest the node, keep SVIDs fresh, serve the SPIFFE Workload API.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Talk to a running agent's Workload API, as a workload would.
    #[command(subcommand)]
    Api(ApiCmd),
    /// The node's TPM: golden PCR values for image builders, what the server will see.
    #[command(subcommand)]
    Tpm(TpmCmd),
    /// Enforcement policy files: check one, or explain a flow's verdict.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// In-kernel enforcement outside a running agent.
    #[command(subcommand)]
    Enforce(EnforceCmd),
    /// Node tunnels: who is on the other end of a tunnelled connection.
    #[command(subcommand)]
    Tunnel(TunnelCmd),
}

#[derive(Subcommand)]
enum TunnelCmd {
    /// The source SPIFFE ID and node of a connection a workload accepted from the tunnel,
    /// named by its two addresses as the workload sees them (its peer's, then its own).
    Peer {
        /// The agent's peer query socket (default <data_dir>/tunnel-peers.sock).
        #[arg(long)]
        socket: PathBuf,
        /// The connection's peer address, IPv4:port (getpeername()).
        peer: String,
        /// The connection's local address, IPv4:port (getsockname()).
        local: String,
    },
}

#[derive(Subcommand)]
enum EnforceCmd {
    /// End enforcement: detach every program a (dead or stopped) agent pinned under the
    /// directory and remove its maps. Protected workloads' flows are then unchecked.
    Stop {
        /// The agent's `[enforcement] pin_dir`.
        #[arg(long, default_value = "/sys/fs/bpf/tether/agent")]
        pin_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Parse and validate a policy file; errors name the file, line and key.
    Check { file: PathBuf },
    /// Which rule allows a flow, or why none does.
    Explain {
        #[arg(long)]
        policy: PathBuf,
        /// A SPIFFE ID (a protected workload) or an IPv4 address (the network).
        #[arg(long)]
        from: String,
        /// A SPIFFE ID or IPv4 address, optionally with :PORT.
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp"])]
        proto: String,
        /// Namespace of --from / --to (default "default").
        #[arg(long)]
        from_namespace: Option<String>,
        #[arg(long)]
        to_namespace: Option<String>,
        /// KEY=VALUE labels of --from / --to (repeatable).
        #[arg(long)]
        from_label: Vec<String>,
        #[arg(long)]
        to_label: Vec<String>,
        /// Treat both ends' binaries as matching the golden manifest.
        #[arg(long)]
        golden: bool,
        /// Explain as if the node's attestation had failed.
        #[arg(long)]
        node_unattested: bool,
    },
}

#[derive(Subcommand)]
enum TpmCmd {
    /// Print the current PCR values as a golden policy file for the server's policy_dir.
    Pcrs {
        /// device:/dev/tpmrm0 or swtpm:host=H,port=P.
        #[arg(long, default_value = "device:/dev/tpmrm0")]
        tcti: String,
        /// The policy's name (it becomes the node selector tpm:policy:NAME).
        #[arg(long, default_value = "golden")]
        name: String,
        #[arg(long, default_value = "sha256", value_parser = ["sha1", "sha256"])]
        bank: String,
        /// PCR indices, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [0u32, 1, 2, 3, 4, 5, 6, 7])]
        pcrs: Vec<u32>,
    },
    /// Quote the PCRs with a nonce bound to a CSR's key, as the agent does for the server, and
    /// write the hello (EK and AK public areas) and the evidence as the node API's messages,
    /// for `tether-server tpm check-quote`.
    Quote {
        #[arg(long, default_value = "device:/dev/tpmrm0")]
        tcti: String,
        #[arg(long, default_value = "rsa", value_parser = ["rsa", "ecc"])]
        ek: String,
        /// The attestation key's directory (the agent's <data_dir>/tpm; created there on
        /// first use, as the agent does).
        #[arg(long)]
        ak_dir: PathBuf,
        /// Hex.
        #[arg(long)]
        nonce: String,
        /// The CSR (PKCS#10 DER, e.g. `openssl req -outform der`) whose key the quote covers:
        /// its qualifying data is SHA-256(nonce ‖ SHA-256(the CSR's SubjectPublicKeyInfo)).
        #[arg(long)]
        csr: PathBuf,
        #[arg(long, default_value = "sha256", value_parser = ["sha1", "sha256"])]
        bank: String,
        #[arg(long, value_delimiter = ',', default_values_t = [0u32, 1, 2, 3, 4, 5, 6, 7])]
        pcrs: Vec<u32>,
        /// Where to write the encoded tpm.Hello.
        #[arg(long)]
        hello: PathBuf,
        /// Where to write the encoded tpm.Evidence.
        #[arg(long)]
        evidence: PathBuf,
    },
    /// Vendor, endorsement key and its hash (the node's tpm:ek-hash and SPIFFE ID suffix).
    Info {
        #[arg(long, default_value = "device:/dev/tpmrm0")]
        tcti: String,
        #[arg(long, default_value = "rsa", value_parser = ["rsa", "ecc"])]
        ek: String,
    },
}

#[derive(Subcommand)]
enum ApiCmd {
    /// Fetch from the Workload API.
    Fetch {
        /// x509, jwt or bundle.
        #[arg(value_parser = ["x509", "jwt", "bundle"])]
        what: String,
        /// Default: $SPIFFE_ENDPOINT_SOCKET, else /run/tether/agent.sock.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Audience for jwt (repeatable).
        #[arg(long)]
        audience: Vec<String>,
        /// Write svid.N.pem, svid.N.key and bundle.N.pem here (x509).
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() {
    // Errors are for people: the message chain, no backtrace.
    if let Err(e) = real_main().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main() -> Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_json);
    match cli.command {
        Command::Probe => {
            println!("{}", serde_json::to_string_pretty(&ebpf::probe_kernel())?);
            Ok(())
        }
        Command::TraceExec { cgroup, json } => trace_exec(cgroup, json).await,
        Command::Ps { cgroup, json, max_measure_bytes, manifest, config } => {
            let selectors = match config {
                Some(path) => tether_agent::config::AgentConfig::load(&path)?.selectors,
                None => Default::default(),
            };
            ps_command(&cgroup, json, max_measure_bytes, manifest.as_deref(), selectors)
        }
        Command::Measure { dir, output, max_measure_bytes } => {
            measure_command(&dir, output.as_deref(), max_measure_bytes)
        }
        Command::Run { config } => run_agent(&config).await,
        Command::Api(ApiCmd::Fetch { what, socket, audience, write }) => {
            api_fetch(&what, socket, &audience, write.as_deref()).await
        }
        Command::Tunnel(TunnelCmd::Peer { socket, peer, local }) => {
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
            let mut conn = tokio::net::UnixStream::connect(&socket)
                .await
                .with_context(|| format!("connecting to {}", socket.display()))?;
            conn.write_all(format!("{peer} {local}\n").as_bytes()).await?;
            let mut line = String::new();
            tokio::io::BufReader::new(conn).read_line(&mut line).await?;
            print!("{line}");
            let answer: serde_json::Value = serde_json::from_str(&line).context("the agent's answer")?;
            if answer.get("spiffe_id").is_none() {
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Policy(PolicyCmd::Check { file }) => {
            let policy = tether_agent::policy::Policy::load(&file)?;
            println!("{}", tether_agent::policy::check_summary(&policy));
            Ok(())
        }
        Command::Policy(PolicyCmd::Explain {
            policy,
            from,
            to,
            proto,
            from_namespace,
            to_namespace,
            from_label,
            to_label,
            golden,
            node_unattested,
        }) => {
            use tether_agent::policy::{self, Endpoint, Proto};
            let policy = policy::Policy::load(&policy)?;
            let endpoint = |s: &str, ns: Option<String>, labels: &[String]| -> Result<(Endpoint, Option<u16>)> {
                let (mut e, port) = Endpoint::parse(s).map_err(|e| anyhow::anyhow!("{s}: {e}"))?;
                if let Endpoint::Identity(id) = &mut e {
                    if let Some(ns) = ns {
                        id.namespace = ns;
                    }
                    for l in labels {
                        let (k, v) = l.split_once('=').with_context(|| format!("label {l:?} is not KEY=VALUE"))?;
                        id.labels.insert(k.into(), v.into());
                    }
                    id.golden = golden;
                }
                Ok((e, port))
            };
            let (from, _) = endpoint(&from, from_namespace, &from_label)?;
            let (to, port) = endpoint(&to, to_namespace, &to_label)?;
            let proto = if proto == "udp" { Proto::Udp } else { Proto::Tcp };
            let ctx = policy::Context { node_attested: !node_unattested };
            let answer = policy::explain(&policy, &from, &to, port, proto, &ctx);
            println!("{answer}");
            if !answer.allowed {
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Enforce(EnforceCmd::Stop { pin_dir }) => {
            ebpf::Enforcer::detach_pinned(&pin_dir)
                .with_context(|| format!("detaching the enforcement pinned under {}", pin_dir.display()))?;
            println!("enforcement under {} detached", pin_dir.display());
            Ok(())
        }
        Command::Tpm(TpmCmd::Pcrs { tcti, name, bank, pcrs }) => {
            print!("{}", tether_agent::tpm::policy_snippet(&tcti, &name, &bank, &pcrs)?);
            Ok(())
        }
        Command::Tpm(TpmCmd::Quote { tcti, ek, ak_dir, nonce, csr, bank, pcrs, hello, evidence }) => {
            use tether_attestors::tpm::device::EkAlgorithm;
            let ek = if ek == "ecc" { EkAlgorithm::Ecc } else { EkAlgorithm::Rsa };
            let nonce = tether_attestors::hex::decode(&nonce).context("--nonce is not hex")?;
            let csr = std::fs::read(&csr).with_context(|| format!("reading {}", csr.display()))?;
            let (h, e) = tether_agent::tpm::quote(&tcti, ek, &ak_dir, &nonce, &csr, &bank, &pcrs)?;
            std::fs::write(&hello, h).with_context(|| format!("writing {}", hello.display()))?;
            std::fs::write(&evidence, e).with_context(|| format!("writing {}", evidence.display()))?;
            Ok(())
        }
        Command::Tpm(TpmCmd::Info { tcti, ek }) => {
            use tether_attestors::tpm::device::EkAlgorithm;
            let ek = if ek == "ecc" { EkAlgorithm::Ecc } else { EkAlgorithm::Rsa };
            print!("{}", tether_agent::tpm::info(&tcti, ek)?);
            Ok(())
        }
    }
}

fn log_kernel_support() {
    let support = ebpf::probe_kernel();
    tracing::info!(
        kernel = %support.kernel,
        tp_btf = support.tp_btf,
        fentry = support.fentry,
        cgroup_sock_addr = support.cgroup_sock_addr,
        task_storage = support.task_storage,
        bpf_lsm = support.bpf_lsm,
        "kernel support probed; using {}",
        support.path
    );
}

fn open_cgroup(path: &Path) -> Result<Cgroup> {
    Cgroup::open(path).with_context(|| format!("--cgroup {}", path.display()))
}

async fn trace_exec(cgroup: Option<PathBuf>, json: bool) -> Result<()> {
    log_kernel_support();
    let scope = cgroup.as_deref().map(open_cgroup).transpose()?;
    let trace = scope.as_ref().map_or(ebpf::TraceScope::All, ebpf::TraceScope::Cgroup);
    let mut monitor = ebpf::Monitor::start(ebpf::load()?, trace)?;
    let mut events = monitor.take_events()?;
    match &scope {
        Some(cg) => tracing::info!(cgroup = %cg.path.display(), cgroup_id = cg.id, "tracing execs"),
        None => tracing::info!("tracing every exec on this machine"),
    }
    loop {
        let batch = tokio::select! {
            batch = events.next_batch() => batch?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        for (raw, pid) in batch {
            let record = Record::from(&raw);
            if json {
                let mut v = serde_json::to_value(&record)?;
                v["pid"] = pid.into();
                println!("{v}");
            } else {
                println!("exec pid={pid} {record}");
            }
        }
    }
}

fn ps_command(
    cgroup: &Path,
    json: bool,
    max_bytes: u64,
    manifest_path: Option<&Path>,
    selectors: tether_agent::config::SelectorConfig,
) -> Result<()> {
    let cg = open_cgroup(cgroup)?;
    let monitor = ebpf::Monitor::start(ebpf::load()?, ebpf::TraceScope::Off)?;
    let measurer = Measurer::new(max_bytes);
    if let Some(path) = manifest_path {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let golden = Manifest::parse(&text, &path.display().to_string())?;
        let report = manifest::seed(&measurer, &golden, Path::new("/"));
        tracing::info!(
            matched = report.matched,
            mismatched = report.mismatched.len(),
            missing = report.missing.len(),
            "golden manifest pre-measured"
        );
    }
    let resolver = Resolver::with_selectors(monitor, measurer, cgroup2_root()?, selectors);
    let rows = ps(&resolver, &cg.path);
    let mut out = std::io::stdout().lock();
    for row in &rows {
        if json {
            writeln!(out, "{}", serde_json::to_string(row)?)?;
            continue;
        }
        match row {
            PsRow::Identified(id) => {
                let measured = match &id.measurement {
                    Some(Outcome::Measured { sha256 }) => format!("sha256 {}…", &measure::hex(sha256)[..16]),
                    Some(Outcome::Unmeasurable(why)) => format!("unmeasured: {why}"),
                    None => "no executable recorded".into(),
                };
                writeln!(
                    out,
                    "{:>7} {:<15} {:?} {} [{}]",
                    id.pid, id.record.comm, id.record.origin, id.record, measured
                )?;
                for s in &id.selectors {
                    writeln!(out, "        {s}")?;
                }
            }
            PsRow::Failed { pid, error } => writeln!(out, "{pid:>7} (not identified: {error})")?,
        }
    }
    Ok(())
}

fn measure_command(dir: &Path, output: Option<&Path>, max_bytes: u64) -> Result<()> {
    let files = manifest::executables(dir).with_context(|| format!("walking {}", dir.display()))?;
    let bar = indicatif::ProgressBar::new(files.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} executables, {elapsed} ({eta} left) {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let measurer = Measurer::new(max_bytes);
    let mut golden = Manifest::default();
    for file in &files {
        bar.inc(1);
        let Some(path) = manifest::manifest_path(dir, file) else {
            tracing::warn!(file = %file.display(), "skipped: path cannot be written in a manifest");
            continue;
        };
        match measurer.measure_path(file) {
            Ok((_, Outcome::Measured { sha256 })) => {
                golden.entries.insert(path, sha256);
            }
            Ok((_, Outcome::Unmeasurable(why))) => tracing::warn!(file = %file.display(), "skipped: {why}"),
            Err(e) => tracing::warn!(file = %file.display(), "skipped: {e}"),
        }
    }
    bar.finish_with_message("done");
    let text = golden.render();
    match output {
        Some(path) => std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?,
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    tracing::info!(executables = golden.entries.len(), "manifest written");
    Ok(())
}

async fn run_agent(config_path: &Path) -> Result<()> {
    use tether_agent::{config::AgentConfig, manager::Manager, workload_api};
    use tether_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;

    let config = AgentConfig::load(config_path)?;
    log_kernel_support();
    // Enforcement first: it fails closed (pinned, re-adopted) before anything else runs.
    let enforcement = match &config.enforcement {
        Some(e) => Some(
            tether_agent::enforcement::Enforcement::start(e.clone(), &config.data_dir, &cgroup2_root()?)
                .context("starting enforcement")?,
        ),
        None => None,
    };
    // Tunnels: enforcement and the tunnel exchange views (remote workloads one way, the
    // policy in force the other).
    let (mesh_enforcement, mesh_tunnel) = tether_agent::mesh::channels();
    let mut enforcement = enforcement;
    if let (Some(e), Some(_)) = (&mut enforcement, &config.tunnel) {
        e.with_mesh(mesh_enforcement);
    }
    // One resolver for the Workload API and enforcement, over the records the enforcement
    // hooks read when enforcement runs.
    let monitor = match &enforcement {
        Some(e) => e.monitor().context("opening the pinned process records")?,
        None => ebpf::Monitor::start(ebpf::load()?, ebpf::TraceScope::Off)?,
    };
    let resolver = std::sync::Arc::new(Resolver::with_selectors(
        monitor,
        Measurer::with_deadline(config.max_measure_bytes, std::time::Duration::from_millis(config.measure_deadline_ms)),
        cgroup2_root()?,
        config.selectors.clone(),
    ));
    let manager = match Manager::start(config.clone()).await {
        Ok(m) => m,
        Err(e) => {
            // The node is not attested: the kernel must not keep the lease a previous agent
            // left (flows of protected workloads stop now, not when it runs out).
            if let Some(mut enf) = enforcement {
                if let Err(err) = enf.end_lease() {
                    tracing::error!("ending the node's lease: {err}");
                }
            }
            return Err(anyhow::Error::new(e).context("node attestation"));
        }
    };
    if let Some(e) = enforcement {
        let every = std::time::Duration::from_millis(config.enforcement.as_ref().map_or(500, |c| c.scan_interval_ms));
        tokio::spawn(tether_agent::enforcement::run(e, resolver.clone(), manager.subscribe(), every));
    }
    let _tunnel = match (&config.tunnel, &config.enforcement) {
        (Some(t), Some(e)) => Some(
            tether_agent::tunnel::start(t.clone(), &config, manager.clone(), mesh_tunnel, &e.pin_dir)
                .await
                .context("starting the tunnel")?,
        ),
        _ => None,
    };
    let listener =
        workload_api::bind(&config.socket_path).with_context(|| format!("binding {}", config.socket_path.display()))?;
    tracing::info!(SPIFFE_ENDPOINT_SOCKET = %config.endpoint(), "Workload API listening");
    println!("SPIFFE_ENDPOINT_SOCKET={}", config.endpoint());
    let incoming = workload_api::incoming(
        listener,
        resolver.clone(),
        workload_api::ConnLimits::new(config.max_connections_per_uid),
    );
    tonic::transport::Server::builder()
        // Bounds per connection: concurrent calls and streams.
        .concurrency_limit_per_connection(workload_api::MAX_CALLS_PER_CONNECTION)
        .max_concurrent_streams(Some(workload_api::MAX_CALLS_PER_CONNECTION as u32))
        .add_service(SpiffeWorkloadApiServer::new(workload_api::WorkloadApi::new(resolver, manager)))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    let _ = std::fs::remove_file(&config.socket_path);
    Ok(())
}

async fn api_fetch(what: &str, socket: Option<PathBuf>, audience: &[String], write: Option<&Path>) -> Result<()> {
    use tether_proto::workload;
    use tokio_stream::StreamExt;
    let socket = socket
        .or_else(|| {
            std::env::var("SPIFFE_ENDPOINT_SOCKET").ok().map(|s| PathBuf::from(s.trim_start_matches("unix://")))
        })
        .unwrap_or_else(|| PathBuf::from("/run/tether/agent.sock"));
    let mut client = tether_agent::api_client::connect(&socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let status = |s: tonic::Status| anyhow::anyhow!("{}: {}", s.code().description(), s.message());
    match what {
        "x509" => {
            let mut stream = client.fetch_x509svid(workload::X509svidRequest {}).await.map_err(status)?.into_inner();
            let resp = stream.next().await.context("stream ended")?.map_err(status)?;
            println!("Received {} svid(s)", resp.svids.len());
            for (i, svid) in resp.svids.iter().enumerate() {
                let chain = tether_agent::svid::split_chain(&svid.x509_svid)?;
                let leaf = x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| anyhow::anyhow!("leaf: {e}"))?.1;
                println!(
                    "SPIFFE ID : {}\nHint      : {}\nNot after : {}\n",
                    svid.spiffe_id,
                    svid.hint,
                    leaf.validity().not_after
                );
                if let Some(dir) = write {
                    use tether_attestors::pem;
                    std::fs::create_dir_all(dir)?;
                    std::fs::write(
                        dir.join(format!("svid.{i}.pem")),
                        pem::certificates(chain.iter().map(Vec::as_slice)),
                    )?;
                    std::fs::write(dir.join(format!("svid.{i}.key")), pem::encode("PRIVATE KEY", &svid.x509_svid_key))?;
                    let bundle = tether_agent::svid::split_chain(&svid.bundle)?;
                    std::fs::write(
                        dir.join(format!("bundle.{i}.pem")),
                        pem::certificates(bundle.iter().map(Vec::as_slice)),
                    )?;
                }
            }
        }
        "jwt" => {
            let resp = client
                .fetch_jwtsvid(workload::JwtsvidRequest { audience: audience.to_vec(), spiffe_id: String::new() })
                .await
                .map_err(status)?
                .into_inner();
            for svid in resp.svids {
                println!("{}\n{}\n", svid.spiffe_id, svid.svid);
            }
        }
        _ => {
            let mut stream =
                client.fetch_x509_bundles(workload::X509BundlesRequest {}).await.map_err(status)?.into_inner();
            let resp = stream.next().await.context("stream ended")?.map_err(status)?;
            for (td, der) in resp.bundles {
                println!("# {td}");
                print!(
                    "{}",
                    tether_attestors::pem::certificates(
                        tether_agent::svid::split_chain(&der)?.iter().map(Vec::as_slice)
                    )
                );
            }
        }
    }
    Ok(())
}
