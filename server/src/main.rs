use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tether_proto::{admin, node};
use tether_server::{admin_client, config::ServerConfig, run};

/// Tether server: the trust domain's authority, registration store and APIs.
#[derive(Parser)]
#[command(name = "tether-server", version)]
struct Cli {
    /// Admin API socket (default: from --config, else /var/lib/tether/server/admin.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Server config (TOML); also tells the CLI where the admin socket is.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Run,
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCmd),
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// The trust bundle.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// Attested agents.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// TPM evidence, offline.
    #[command(subcommand)]
    Tpm(TpmCmd),
}

#[derive(Subcommand)]
enum TpmCmd {
    /// Check a node's quote as an attestation would (AK under the EK, signature, nonce bound to
    /// the CSR's key, PCR digest, golden policy), from the files `tether-agent tpm quote`
    /// writes. The EK certificate chain and credential activation need the live exchange and
    /// are not checked.
    CheckQuote {
        /// The encoded tpm.Hello (EK and AK public areas).
        #[arg(long)]
        hello: PathBuf,
        /// The encoded tpm.Evidence (quote, signature, PCR values).
        #[arg(long)]
        evidence: PathBuf,
        /// The server's nonce, hex.
        #[arg(long)]
        nonce: String,
        /// The CSR (PKCS#10 DER, e.g. `openssl req -outform der`) whose key the quote must cover: its qualifying data is
        /// SHA-256(nonce ‖ SHA-256(the CSR's SubjectPublicKeyInfo)).
        #[arg(long)]
        csr: PathBuf,
        /// Golden PCR policies (one TOML file per allowed set).
        #[arg(long)]
        policy_dir: PathBuf,
    },
}

#[derive(Args)]
struct EntryFields {
    #[arg(long)]
    spiffe_id: String,
    #[arg(long)]
    parent_id: String,
    /// type:value, repeatable (e.g. unix:uid:1000).
    #[arg(long = "selector", required = true)]
    selectors: Vec<String>,
    #[arg(long, default_value_t = 0)]
    x509_ttl: i64,
    #[arg(long, default_value_t = 0)]
    jwt_ttl: i64,
    #[arg(long = "dns")]
    dns_names: Vec<String>,
    #[arg(long, default_value = "")]
    hint: String,
    #[arg(long)]
    admin: bool,
    #[arg(long, default_value = "default")]
    namespace: String,
    /// key=value, repeatable.
    #[arg(long = "label")]
    labels: Vec<String>,
}

#[derive(Subcommand)]
enum EntryCmd {
    Create(EntryFields),
    Update {
        #[arg(long)]
        id: String,
        #[command(flatten)]
        fields: EntryFields,
    },
    Delete {
        #[arg(long)]
        id: String,
    },
    Show {
        #[arg(long)]
        spiffe_id: Option<String>,
        #[arg(long)]
        parent_id: Option<String>,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    Generate {
        #[arg(long, default_value_t = 600)]
        ttl: i64,
        /// The SPIFFE ID the node attesting with this token receives.
        #[arg(long)]
        node_id: Option<String>,
    },
}

#[derive(Subcommand)]
enum BundleCmd {
    Show {
        /// pem (X.509 authorities) or spiffe (the JWKS bundle document).
        #[arg(long, default_value = "pem")]
        format: String,
    },
}

#[derive(Subcommand)]
enum AgentCmd {
    List,
    Evict {
        /// The node's SPIFFE ID, or `tpm:ek-hash:<sha256>` for a TPM node (its ID derives
        /// from the EK, so banning it bans the EK).
        #[arg(long)]
        spiffe_id: String,
        /// Never let this node attest again.
        #[arg(long)]
        ban: bool,
    },
}

fn entry_proto(id: String, f: EntryFields) -> Result<node::Entry> {
    let labels = f
        .labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--label {l:?}: expected key=value"))
        })
        .collect::<Result<_>>()?;
    Ok(node::Entry {
        id,
        spiffe_id: f.spiffe_id,
        parent_id: f.parent_id,
        selectors: f.selectors,
        x509_ttl_seconds: f.x509_ttl,
        jwt_ttl_seconds: f.jwt_ttl,
        dns_names: f.dns_names,
        hint: f.hint,
        admin: f.admin,
        namespace: f.namespace,
        labels,
        revision: 0,
    })
}

fn print_entry(e: &node::Entry) {
    println!("Entry ID      : {}", e.id);
    println!("SPIFFE ID     : {}", e.spiffe_id);
    println!("Parent ID     : {}", e.parent_id);
    for s in &e.selectors {
        println!("Selector      : {s}");
    }
    println!(
        "X509-SVID TTL : {}",
        if e.x509_ttl_seconds > 0 { e.x509_ttl_seconds.to_string() } else { "default".into() }
    );
    println!(
        "JWT-SVID TTL  : {}",
        if e.jwt_ttl_seconds > 0 { e.jwt_ttl_seconds.to_string() } else { "default".into() }
    );
    for d in &e.dns_names {
        println!("DNS name      : {d}");
    }
    if !e.hint.is_empty() {
        println!("Hint          : {}", e.hint);
    }
    println!("Namespace     : {}", e.namespace);
    for (k, v) in &e.labels {
        println!("Label         : {k}={v}");
    }
    println!();
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
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let config = cli.config.as_deref().map(ServerConfig::load).transpose()?;
    if let Command::Tpm(TpmCmd::CheckQuote { hello, evidence, nonce, csr, policy_dir }) = &cli.command {
        let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let nonce = tether_attestors::hex::decode(nonce).context("--nonce is not hex")?;
        let matched =
            tether_server::tpm::check_offline(&read(hello)?, &read(evidence)?, &nonce, &read(csr)?, policy_dir)?;
        println!("quote verified; golden sets matched: {}", matched.join(", "));
        return Ok(());
    }
    if let Command::Run = cli.command {
        let config = config.context("run needs --config FILE")?;
        let state = run::open_state(config)?;
        return run::serve(state, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    }
    let socket = cli
        .socket
        .or_else(|| config.as_ref().map(ServerConfig::admin_socket))
        .unwrap_or_else(|| PathBuf::from("/var/lib/tether/server/admin.sock"));
    let mut client = admin_client::connect(&socket)
        .await
        .with_context(|| format!("connecting to the admin socket {}", socket.display()))?;
    let status = |s: tonic::Status| anyhow::anyhow!("{}: {}", s.code().description(), s.message());
    match cli.command {
        Command::Run | Command::Tpm(_) => unreachable!("handled above"),
        Command::Entry(EntryCmd::Create(f)) => {
            print_entry(&client.create_entry(entry_proto(String::new(), f)?).await.map_err(status)?.into_inner())
        }
        Command::Entry(EntryCmd::Update { id, fields }) => {
            print_entry(&client.update_entry(entry_proto(id, fields)?).await.map_err(status)?.into_inner())
        }
        Command::Entry(EntryCmd::Delete { id }) => {
            client.delete_entry(admin::EntryId { id: id.clone() }).await.map_err(status)?;
            println!("Deleted entry {id}");
        }
        Command::Entry(EntryCmd::Show { spiffe_id, parent_id }) => {
            let r = client
                .list_entries(admin::ListEntriesRequest {
                    spiffe_id: spiffe_id.unwrap_or_default(),
                    parent_id: parent_id.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("Found {} entries", r.entries.len());
            r.entries.iter().for_each(print_entry);
        }
        Command::Token(TokenCmd::Generate { ttl, node_id }) => {
            let t = client
                .create_join_token(admin::CreateJoinTokenRequest {
                    ttl_seconds: ttl,
                    node_id: node_id.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("Token: {}", t.token);
        }
        Command::Bundle(BundleCmd::Show { format }) => {
            let b = client.get_bundle(admin::Empty {}).await.map_err(status)?.into_inner();
            match format.as_str() {
                "pem" => {
                    print!("{}", tether_attestors::pem::certificates(b.x509_authorities.iter().map(Vec::as_slice)))
                }
                "spiffe" => println!("{}", String::from_utf8_lossy(&b.jwks)),
                other => anyhow::bail!("--format {other:?}: expected pem or spiffe"),
            }
        }
        Command::Agent(AgentCmd::List) => {
            let r = client.list_agents(admin::Empty {}).await.map_err(status)?.into_inner();
            println!("Found {} attested agents", r.agents.len());
            for a in r.agents {
                println!(
                    "SPIFFE ID : {}\nAttestor  : {}\nSelectors : {}\nSVID exp. : {}\n",
                    a.spiffe_id,
                    a.attestor,
                    a.selectors.join(", "),
                    a.svid_expires_at_unix
                );
            }
        }
        Command::Agent(AgentCmd::Evict { spiffe_id, ban }) => {
            client.evict_agent(admin::AgentId { spiffe_id: spiffe_id.clone(), ban }).await.map_err(status)?;
            println!("Evicted {spiffe_id}{}", if ban { " and banned it" } else { "" });
        }
    }
    Ok(())
}
