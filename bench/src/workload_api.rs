//! B5: the Workload API. FetchX509SVID (first message of the stream) and FetchJWTSVID
//! latency over the Unix socket at 1 and 16 concurrent callers, with 1,000 registered
//! workloads on the node, against a minimal tonic service on a Unix socket returning canned
//! responses of the same size (the transport's own floor); and the agent's memory per cached
//! SVID.

use std::{
    path::Path,
    pin::Pin,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use sandbox::{cgroup2_root, require_root, CgroupGuard};
use tether_proto::workload::{self, spiffe_workload_api_server::SpiffeWorkloadApi};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::{
    procs::{percentile, rss_kib, wait_for, Proc},
    report::Metric,
};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Calls per caller per round.
    #[arg(long, default_value_t = 200)]
    calls: usize,
    /// Registered workloads (entries) on the node.
    #[arg(long, default_value_t = 1000)]
    workloads: usize,
}

/// Canned responses: what the agent would send, with no identification or lookup.
#[derive(Clone)]
struct Floor {
    x509: workload::X509svidResponse,
    jwt: workload::JwtsvidResponse,
}

type S<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for Floor {
    type FetchX509SVIDStream = S<workload::X509svidResponse>;
    type FetchX509BundlesStream = S<workload::X509BundlesResponse>;
    type FetchJWTBundlesStream = S<workload::JwtBundlesResponse>;
    type FetchWITSVIDStream = S<workload::WitsvidResponse>;
    type FetchWITBundlesStream = S<workload::WitBundlesResponse>;
    async fn fetch_x509svid(
        &self,
        _: Request<workload::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let msg = self.x509.clone();
        // Like the agent's streams, stay open after the first message.
        Ok(Response::new(Box::pin(tokio_stream::once(Ok(msg)).chain(tokio_stream::pending()))))
    }
    async fn fetch_x509_bundles(
        &self,
        _: Request<workload::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn fetch_jwtsvid(
        &self,
        _: Request<workload::JwtsvidRequest>,
    ) -> Result<Response<workload::JwtsvidResponse>, Status> {
        Ok(Response::new(self.jwt.clone()))
    }
    async fn fetch_jwt_bundles(
        &self,
        _: Request<workload::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn validate_jwtsvid(
        &self,
        _: Request<workload::ValidateJwtsvidRequest>,
    ) -> Result<Response<workload::ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn fetch_witsvid(
        &self,
        _: Request<workload::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn fetch_wit_bundles(
        &self,
        _: Request<workload::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented(""))
    }
}

/// The client side, run inside the bench cgroup: per-call latencies in microseconds, one
/// JSON array on stdout.
pub async fn client(socket: &Path, method: &str, callers: usize, calls: usize) -> Result<()> {
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let mut c = tether_agent::api_client::connect(socket).await?;
        let method = method.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(calls);
            for _ in 0..calls {
                let t = Instant::now();
                if method == "x509" {
                    let mut s = c.fetch_x509svid(workload::X509svidRequest {}).await?.into_inner();
                    s.next().await.context("stream ended")??;
                } else {
                    c.fetch_jwtsvid(workload::JwtsvidRequest {
                        audience: vec!["bench".into()],
                        spiffe_id: String::new(),
                    })
                    .await?;
                }
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    println!("{}", serde_json::to_string(&all)?);
    Ok(())
}

pub fn run(args: &Args) -> Result<()> {
    require_root()?;
    let here = std::env::current_exe()?.parent().context("exe dir")?.to_path_buf();
    let (server_bin, agent_bin) = (here.join("tether-server"), here.join("tether-agent"));
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let server_cfg = dir.path().join("server.toml");
    std::fs::write(
        &server_cfg,
        format!(
            "trust_domain = \"bench.tether\"\ndata_dir = \"{}\"\nbind_address = \"127.0.0.1:{port}\"\n",
            dir.path().join("server").display()
        ),
    )?;
    let _server = Proc(
        Command::new(&server_bin)
            .arg("run")
            .arg("-c")
            .arg(&server_cfg)
            .stderr(Stdio::null())
            .spawn()
            .context("tether-server (built by cargo xtask bench)")?,
    );
    wait_for("the server", || {
        dir.path().join("server/admin.sock").exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    let cli = |args: &[&str]| -> Result<String> {
        let out = Command::new(&server_bin).arg("-c").arg(&server_cfg).args(args).output()?;
        if !out.status.success() {
            bail!("tether-server {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let token = cli(&["token", "generate", "--node-id", "spiffe://bench.tether/node"])?
        .trim()
        .trim_start_matches("Token: ")
        .to_owned();
    let socket = dir.path().join("agent.sock");
    let agent_cfg = dir.path().join("agent.toml");
    std::fs::write(&agent_cfg, format!(
        "trust_domain = \"bench.tether\"\nserver_address = \"127.0.0.1:{port}\"\ntrust_bundle_path = \"{}\"\njoin_token = \"{token}\"\ndata_dir = \"{}\"\nsocket_path = \"{}\"\nsync_interval_seconds = 1\n",
        dir.path().join("server/bundle.pem").display(), dir.path().join("agent").display(), socket.display()))?;
    let cg = CgroupGuard::new("bench-api")?;
    let rel = format!("/{}", cg.path().strip_prefix(cgroup2_root()?)?.display());
    cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://bench.tether/client",
        "--parent-id",
        "spiffe://bench.tether/node",
        "--selector",
        &format!("cgroup:path:{rel}"),
    ])?;

    let agent = Proc(
        Command::new(&agent_bin)
            .arg("run")
            .arg("-c")
            .arg(&agent_cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let agent_pid = agent.0.id();
    wait_for("the agent", || socket.exists())?;
    std::thread::sleep(Duration::from_secs(2));
    let rss_one = rss_kib(agent_pid);

    // The other registered workloads (their SVIDs are issued and cached too).
    let mut batch = Vec::new();
    for i in 0..args.workloads.saturating_sub(1) {
        batch.push(format!("spiffe://bench.tether/w/{i}"));
    }
    for (i, id) in batch.iter().enumerate() {
        let uid = 100_000 + i;
        cli(&[
            "entry",
            "create",
            "--spiffe-id",
            id,
            "--parent-id",
            "spiffe://bench.tether/node",
            "--selector",
            &format!("unix:uid:{uid}"),
            "--selector",
            &format!("unix:path:{id}"),
        ])?;
    }
    let log_wait = Instant::now();
    wait_for("the agent to cache every SVID", || {
        rss_kib(agent_pid) > rss_one && log_wait.elapsed() > Duration::from_secs(5)
    })?;
    std::thread::sleep(Duration::from_secs(3));
    let rss_all = rss_kib(agent_pid);

    // The floor: canned responses of the size the agent sends, on another socket.
    let rt = tokio::runtime::Runtime::new()?;
    let floor_socket = dir.path().join("floor.sock");
    // Canned responses of the sizes the agent sends (a P-256 leaf, its key, one root).
    let floor = Floor {
        x509: workload::X509svidResponse {
            svids: vec![workload::X509svid {
                spiffe_id: "spiffe://bench.tether/client".into(),
                x509_svid: vec![7; 560],
                x509_svid_key: vec![7; 138],
                bundle: vec![7; 560],
                hint: String::new(),
            }],
            crl: vec![],
            federated_bundles: Default::default(),
        },
        jwt: workload::JwtsvidResponse {
            svids: vec![workload::Jwtsvid {
                spiffe_id: "spiffe://bench.tether/client".into(),
                svid: "x".repeat(300),
                hint: String::new(),
            }],
        },
    };
    let _ = std::fs::remove_file(&floor_socket);
    let listener = {
        let _g = rt.enter();
        tokio::net::UnixListener::bind(&floor_socket)?
    };
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(tether_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(floor))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );

    let run_client = |sock: &Path, method: &str, callers: usize| -> Result<Vec<f64>> {
        let out = cg.run(
            Command::new(std::env::current_exe()?)
                .args([
                    "api-client",
                    "--method",
                    method,
                    "--callers",
                    &callers.to_string(),
                    "--calls",
                    &args.calls.to_string(),
                    "--socket",
                ])
                .arg(sock),
        )?;
        if !out.status.success() {
            bail!("client failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    println!("B5 Workload API: {} registered workloads, {} rounds, {} calls per caller, floor = minimal tonic UDS service with canned responses", args.workloads, args.rounds, args.calls);
    for method in ["x509", "jwt"] {
        for callers in [1usize, 16] {
            let mut p50 = Metric::new("workload-api", format!("{method}_c{callers}_p50_latency_vs_floor"), "us");
            let mut p99 = Metric::new("workload-api", format!("{method}_c{callers}_p99_latency_vs_floor"), "us");
            run_client(&socket, method, callers)?; // warm-up (JWT cache, page cache)
            for _ in 0..args.rounds {
                let f = run_client(&floor_socket, method, callers)?;
                let a = run_client(&socket, method, callers)?;
                p50.push(percentile(&f, 0.5), percentile(&a, 0.5));
                p99.push(percentile(&f, 0.99), percentile(&a, 0.99));
            }
            p50.print();
            p99.print();
        }
    }
    let per_svid = (rss_all.saturating_sub(rss_one)) as f64 * 1024.0 / (args.workloads.saturating_sub(1).max(1)) as f64;
    println!("workload-api rss_per_cached_svid        {per_svid:>10.0} bytes (agent RSS {rss_one} KiB with 1 entry, {rss_all} KiB with {})", args.workloads);
    println!(
        "{}",
        serde_json::json!({"bench": "workload-api", "metric": "rss_bytes_per_cached_svid", "unit": "bytes", "value": per_svid, "rounds": 1})
    );
    drop(agent);
    Ok(())
}
