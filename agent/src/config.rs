//! tether-agent configuration (`run`): one TOML file, unknown keys refused, each value
//! checked at start-up with an error naming the key.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use tether_attestors::parse_trust_domain;
use tether_attestors::tpm::device::EkAlgorithm;
use thiserror::Error;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub trust_domain: String,
    /// host:port of the server's node API.
    pub server_address: String,
    /// The name sent as TLS SNI to the node API. Not what authenticates the server: see
    /// `server_spiffe_id`. Default "localhost".
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The SPIFFE ID the node API's certificate must carry (and chain to the current bundle).
    /// Default `spiffe://<trust_domain>/tether/server`; the server refuses to register
    /// entries under `/tether/`, so no workload SVID can carry it.
    pub server_spiffe_id: Option<String>,
    /// PEM bundle to trust the server with on first contact.
    pub trust_bundle_path: PathBuf,
    /// One-time join token for the first attestation (later starts reuse the node SVID).
    pub join_token: Option<String>,
    /// Node SVID and key (0600) live here.
    pub data_dir: PathBuf,
    /// The Workload API socket.
    pub socket_path: PathBuf,
    /// Seconds between entry syncs. Default 5.
    #[serde(default = "default_sync")]
    pub sync_interval_seconds: u64,
    /// Executables larger than this are not hashed.
    #[serde(default = "default_max_measure")]
    pub max_measure_bytes: u64,
    /// How long a Workload API call waits for its binary's hash (milliseconds). Hashing goes
    /// on past it; the caller is answered without a `unix:sha256` selector meanwhile.
    /// Default 3000.
    #[serde(default = "default_measure_deadline")]
    pub measure_deadline_ms: u64,
    /// Workload API connections one uid may have open at once; more are closed at accept.
    /// Default 64.
    #[serde(default = "default_max_connections")]
    pub max_connections_per_uid: usize,
    /// Attest the node with its TPM (instead of a join token).
    pub tpm: Option<TpmConfig>,
    /// In-kernel enforcement on protected cgroups.
    pub enforcement: Option<EnforcementConfig>,
    /// Where container runtimes and the kubelet make their cgroups: container and
    /// Kubernetes selectors come only from there.
    #[serde(default)]
    pub selectors: SelectorConfig,
    /// Mutually authenticated tunnels to protected workloads on other nodes (needs
    /// `[enforcement]`: the kernel captures the connections).
    pub tunnel: Option<TunnelConfig>,
}

fn default_server_name() -> String {
    "localhost".into()
}
fn default_sync() -> u64 {
    5
}
fn default_max_connections() -> usize {
    64
}
fn default_measure_deadline() -> u64 {
    DEFAULT_MEASURE_DEADLINE.as_millis() as u64
}
fn default_max_measure() -> u64 {
    DEFAULT_MAX_MEASURE_BYTES
}

// ---- The sections: each module that uses one reads it from here, so `config` depends on no
// other part of the agent.

/// Default cap: executables above this are not hashed (configurable).
pub const DEFAULT_MAX_MEASURE_BYTES: u64 = 512 * 1024 * 1024;

/// Default time a caller waits for a measurement (configurable).
pub const DEFAULT_MEASURE_DEADLINE: Duration = Duration::from_secs(3);

/// `[tpm]` in the agent config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    /// `device:/dev/tpmrm0` (default) on real hosts, `swtpm:host=H,port=P` for a software TPM.
    #[serde(default = "default_tcti")]
    pub tcti: String,
    /// The endorsement key that identifies the node: "rsa" (default) or "ecc".
    #[serde(default = "default_ek")]
    pub ek: EkAlgorithm,
    /// Seconds between re-attestations (a fresh quote) besides the one at each node SVID
    /// renewal. Default 300.
    #[serde(default = "default_reattest_interval")]
    pub reattest_interval_seconds: u64,
    /// The platform's TCG event log, sent with each quote when readable.
    #[serde(default = "default_event_log")]
    pub event_log: PathBuf,
}

fn default_tcti() -> String {
    "device:/dev/tpmrm0".into()
}
fn default_ek() -> EkAlgorithm {
    EkAlgorithm::Rsa
}
fn default_reattest_interval() -> u64 {
    300
}
fn default_event_log() -> PathBuf {
    PathBuf::from("/sys/kernel/security/tpm0/binary_bios_measurements")
}

/// `[enforcement]` in the agent config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnforcementConfig {
    /// cgroup v2 directories whose processes are protected (absolute, or relative to the
    /// cgroup2 mount). Never the root cgroup.
    pub protected_cgroups: Vec<PathBuf>,
    /// The policy file (see `policy`); re-read when it changes.
    pub policy: PathBuf,
    /// Where programs, links and maps are pinned. Default /sys/fs/bpf/tether/agent.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// JSON lines, one per reported drop. Default <data_dir>/audit.jsonl.
    pub audit_log: Option<PathBuf>,
    /// Drops from one source are reported at most this often (all are counted). Default 1000.
    #[serde(default = "default_audit_interval")]
    pub audit_interval_ms: u64,
    /// A golden manifest (`tether-agent measure`): identities whose binary is listed with its
    /// measured sha256 are "golden" for rules that require it.
    pub golden_manifest: Option<PathBuf>,
    /// The node's attestation lease in the kernel: protected flows stop this long after the
    /// agent last renewed it (it renews while the server accepts the node, every half
    /// second). A restart within the lease keeps every allowed flow; a dead agent, or a node
    /// the server refused, stops them when it runs out. Default 30.
    #[serde(default = "default_lease")]
    pub node_lease_seconds: u64,
    /// The network namespaces that make up this node (paths such as `/run/netns/x`): their
    /// addresses are this node's, so packets from them are judged by identity, never by
    /// address. Default: every network namespace of the machine. The namespaces of protected
    /// processes always count.
    #[serde(default)]
    pub node_network_namespaces: Vec<PathBuf>,
    /// How many processes holding sockets each protected cgroup may have at once in the
    /// kernel's exec table; past it, only that cgroup's new sockets fail (audited as
    /// `map_full`). Default: the table's size shared evenly.
    pub socket_processes_per_cgroup: Option<u64>,
    /// How often the protected cgroups are scanned, identities published and the lease
    /// renewed, in milliseconds. An exec in a protected cgroup also starts a scan at once (at
    /// most every 100 ms), so a new process's identity does not wait for this. Default 500;
    /// 50 to half the lease.
    #[serde(default = "default_scan_interval")]
    pub scan_interval_ms: u64,
}

fn default_scan_interval() -> u64 {
    500
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/tether/agent")
}
fn default_audit_interval() -> u64 {
    1000
}
fn default_lease() -> u64 {
    30
}

/// Where container runtimes and the kubelet make their cgroups (paths relative to the
/// cgroup2 root): `[selectors]` in the agent config.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SelectorConfig {
    /// Roots under which a container runtime's cgroups name containers. Default: docker and
    /// containerd with the systemd driver (`/system.slice`), docker with the cgroupfs driver
    /// (`/docker`), rootful podman (`/machine.slice`), and the Kubernetes roots.
    #[serde(default = "default_container_roots")]
    pub container_roots: Vec<String>,
    /// Roots the kubelet makes pod cgroups under. Default: `/kubepods.slice` (systemd
    /// driver), `/kubepods` (cgroupfs driver), `/kubelet.slice/kubelet-kubepods.slice`
    /// (a kubelet in a kind node).
    #[serde(default = "default_kubernetes_roots")]
    pub kubernetes_roots: Vec<String>,
}

fn default_kubernetes_roots() -> Vec<String> {
    ["/kubepods.slice", "/kubepods", "/kubelet.slice/kubelet-kubepods.slice"].map(String::from).to_vec()
}

fn default_container_roots() -> Vec<String> {
    let mut v: Vec<String> = ["/system.slice", "/docker", "/machine.slice"].map(String::from).to_vec();
    v.extend(default_kubernetes_roots());
    v
}

impl Default for SelectorConfig {
    fn default() -> Self {
        SelectorConfig { container_roots: default_container_roots(), kubernetes_roots: default_kubernetes_roots() }
    }
}

impl SelectorConfig {
    /// Every root must be an absolute cgroup path with no empty, `.` or `..` component.
    pub fn validate(&self) -> Result<(), String> {
        for r in self.container_roots.iter().chain(&self.kubernetes_roots) {
            let ok =
                r.starts_with('/') && r.len() > 1 && r[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..");
            if !ok {
                return Err(format!("{r:?} is not an absolute cgroup path like /kubepods.slice"));
            }
        }
        Ok(())
    }
}

/// `[tunnel]` in the agent config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// The HBONE port other nodes connect to. Default 15008.
    #[serde(default = "default_port")]
    pub port: u16,
    /// The capture listener's port on 127.0.0.1 of the tunnel namespace. Default 15001.
    #[serde(default = "default_capture_port")]
    pub capture_port: u16,
    /// The network namespace of this node's workloads and tunnel (e.g. `/run/netns/x`).
    /// Default: the agent's own. Workloads of other namespaces are not captured.
    pub network_namespace: Option<PathBuf>,
    /// The address other nodes reach the tunnel at. Default: the namespace's first
    /// non-loopback IPv4 address.
    pub address: Option<Ipv4Addr>,
    /// How long to wait for another node's tunnel (and, inbound, for a local workload)
    /// before the connection is reset. Default 2000.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Live streams are checked against policy, identities and peers at least this often
    /// (and at once on every change). Default 1000.
    #[serde(default = "default_recheck")]
    pub recheck_interval_ms: u64,
    /// One JSON line per stream and per refusal. Default <data_dir>/tunnel-streams.jsonl.
    pub stream_log: Option<PathBuf>,
    /// The peer query socket (who is on the other end of a tunnelled connection).
    /// Default <data_dir>/tunnel-peers.sock.
    pub peer_socket: Option<PathBuf>,
    /// Worker threads of the tunnel's runtime. Default: the number of CPUs.
    pub worker_threads: Option<usize>,
    /// Connections to one (source, destination, node) the pool spreads concurrent streams
    /// over: a new one is made while every open one carries a stream, up to this many.
    /// One connection's TLS runs on one core; several let busy streams use several.
    /// Default: the number of CPUs, at most 8.
    pub connections_per_peer: Option<usize>,
}

fn default_port() -> u16 {
    tether_proto::hbone::DEFAULT_PORT
}
fn default_capture_port() -> u16 {
    15001
}
fn default_connect_timeout() -> u64 {
    2000
}
fn default_recheck() -> u64 {
    1000
}

impl TunnelConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }

    /// See [`TunnelConfig::connections_per_peer`].
    pub fn connections_per_peer(&self) -> usize {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        self.connections_per_peer.unwrap_or(cpus.min(8)).max(1)
    }

    /// The network namespace of the tunnel (the agent's own when none is named).
    pub fn netns_path(&self) -> PathBuf {
        self.network_namespace.clone().unwrap_or_else(|| PathBuf::from("/proc/self/ns/net"))
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: key `{key}`: {message}")]
    Invalid { path: PathBuf, key: &'static str, message: String },
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let c: AgentConfig = toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        let invalid = |key, message: String| ConfigError::Invalid { path: path.into(), key, message };
        parse_trust_domain(&c.trust_domain).map_err(|e| invalid("trust_domain", e.to_string()))?;
        if !c.socket_path.is_absolute() {
            return Err(invalid("socket_path", "must be an absolute path".into()));
        }
        if c.max_connections_per_uid == 0 {
            return Err(invalid("max_connections_per_uid", "must be at least 1".into()));
        }
        if c.sync_interval_seconds == 0 {
            return Err(invalid("sync_interval_seconds", "must be at least 1".into()));
        }
        if let Some(t) = &c.tpm {
            tether_attestors::tpm::device::parse_tcti(&t.tcti).map_err(|e| invalid("tpm.tcti", e.to_string()))?;
            if t.reattest_interval_seconds == 0 {
                return Err(invalid("tpm.reattest_interval_seconds", "must be at least 1".into()));
            }
            if c.join_token.is_some() {
                return Err(invalid("join_token", "a node attests with either [tpm] or a join token, not both".into()));
            }
        }
        if let Some(e) = &c.enforcement {
            if e.protected_cgroups.is_empty() {
                return Err(invalid("enforcement.protected_cgroups", "name at least one cgroup".into()));
            }
            if e.protected_cgroups.iter().any(|p| p.as_os_str().is_empty() || p == Path::new("/")) {
                return Err(invalid("enforcement.protected_cgroups", "never the root cgroup".into()));
            }
            // The lease is renewed by the scan: at least two chances before it runs out.
            if e.scan_interval_ms < 50
                || e.scan_interval_ms.saturating_mul(2) > e.node_lease_seconds.saturating_mul(1000)
            {
                return Err(invalid(
                    "enforcement.scan_interval_ms",
                    format!(
                        "{} is out of range: at least 50, at most half of node_lease_seconds ({} ms)",
                        e.scan_interval_ms,
                        e.node_lease_seconds.saturating_mul(1000) / 2
                    ),
                ));
            }
        }
        c.selectors.validate().map_err(|m| invalid("selectors", m))?;
        let server_id = c.server_id().map_err(|e| invalid("server_spiffe_id", e.to_string()))?;
        if server_id.trust_domain() != c.trust_domain {
            return Err(invalid(
                "server_spiffe_id",
                format!("{server_id} is not in the trust domain {}", c.trust_domain),
            ));
        }
        if c.tunnel.is_some() && c.enforcement.is_none() {
            return Err(invalid("tunnel", "needs [enforcement]: the kernel captures the connections".into()));
        }
        if c.server_address.parse::<std::net::SocketAddr>().is_err() && !c.server_address.contains(':') {
            return Err(invalid("server_address", format!("{:?} is not host:port", c.server_address)));
        }
        Ok(c)
    }

    /// The SPIFFE ID the node API server must present.
    pub fn server_id(&self) -> Result<tether_attestors::SpiffeId, tether_attestors::SpiffeIdError> {
        match &self.server_spiffe_id {
            Some(id) => id.parse(),
            None => tether_attestors::SpiffeId::from_parts(&self.trust_domain, &["tether", "server"]),
        }
    }

    /// The value for SPIFFE_ENDPOINT_SOCKET.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket_path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key() {
        let base = "trust_domain = \"e.org\"\nserver_address = \"127.0.0.1:8081\"\ntrust_bundle_path = \"/b.pem\"\ndata_dir = \"/d\"\n";
        let ok = AgentConfig::parse(&format!("{base}socket_path = \"/run/tether/api.sock\"\n"), Path::new("a.toml"))
            .unwrap();
        assert_eq!(ok.endpoint(), "unix:///run/tether/api.sock");
        let e = AgentConfig::parse(&format!("{base}socket_path = \"rel.sock\"\n"), Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "a.toml: key `socket_path`: must be an absolute path");
        let e = AgentConfig::parse(&format!("{base}socket_path = \"/s\"\nsurprise = 1\n"), Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `surprise`"), "{e}");
    }

    #[test]
    fn tpm_section_is_checked() {
        let base = "trust_domain = \"e.org\"\nserver_address = \"127.0.0.1:8081\"\ntrust_bundle_path = \"/b.pem\"\ndata_dir = \"/d\"\nsocket_path = \"/s\"\n";
        let p = Path::new("a.toml");
        let c = AgentConfig::parse(&format!("{base}[tpm]\n"), p).unwrap();
        let t = c.tpm.unwrap();
        assert_eq!((t.tcti.as_str(), t.reattest_interval_seconds), ("device:/dev/tpmrm0", 300));
        let e = AgentConfig::parse(&format!("{base}[tpm]\ntcti = \"swtpm:path=/x\"\n"), p).unwrap_err().to_string();
        assert!(e.starts_with("a.toml: key `tpm.tcti`: tcti \"swtpm:path=/x\""), "{e}");
        let e = AgentConfig::parse(&format!("join_token = \"t\"\n{base}[tpm]\n"), p).unwrap_err().to_string();
        assert!(e.contains("key `join_token`"), "{e}");
        let e = AgentConfig::parse(&format!("{base}[tpm]\nek = \"dsa\"\n"), p).unwrap_err().to_string();
        assert!(e.contains("unknown variant `dsa`"), "{e}");
    }

    #[test]
    fn enforcement_never_protects_the_root_cgroup() {
        let base = "trust_domain = \"e.org\"\nserver_address = \"127.0.0.1:8081\"\ntrust_bundle_path = \"/b.pem\"\ndata_dir = \"/d\"\nsocket_path = \"/s\"\n";
        let p = Path::new("a.toml");
        let ok = AgentConfig::parse(
            &format!("{base}[enforcement]\nprotected_cgroups = [\"app\"]\npolicy = \"/p.toml\"\n"),
            p,
        )
        .unwrap();
        let e = ok.enforcement.unwrap();
        assert_eq!((e.pin_dir.to_str(), e.audit_interval_ms), (Some("/sys/fs/bpf/tether/agent"), 1000));
        assert_eq!(e.scan_interval_ms, 500);
        for bad in ["10", "20000"] {
            let text = format!(
                "{base}[enforcement]\nprotected_cgroups = [\"app\"]\npolicy = \"/p.toml\"\nscan_interval_ms = {bad}\n"
            );
            let e = AgentConfig::parse(&text, p).unwrap_err().to_string();
            assert!(e.contains("key `enforcement.scan_interval_ms`") && e.contains("out of range"), "{bad}: {e}");
        }
        for bad in ["[]", "[\"/\"]", "[\"\"]"] {
            let text = format!("{base}[enforcement]\nprotected_cgroups = {bad}\npolicy = \"/p.toml\"\n");
            let e = AgentConfig::parse(&text, p).unwrap_err().to_string();
            assert!(e.contains("key `enforcement.protected_cgroups`"), "{bad}: {e}");
        }
    }
}
