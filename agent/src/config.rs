//! tether-agent configuration (`run`): one TOML file, unknown keys refused, each value
//! checked at start-up with an error naming the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tether_attestors::parse_trust_domain;
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
    pub tpm: Option<crate::tpm::TpmConfig>,
    /// In-kernel enforcement on protected cgroups.
    pub enforcement: Option<crate::enforcement::EnforcementConfig>,
    /// Where container runtimes and the kubelet make their cgroups: container and
    /// Kubernetes selectors come only from there.
    #[serde(default)]
    pub selectors: crate::process::selectors::SelectorConfig,
    /// Mutually authenticated tunnels to protected workloads on other nodes (needs
    /// `[enforcement]`: the kernel captures the connections).
    pub tunnel: Option<crate::tunnel::TunnelConfig>,
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
    crate::process::measure::DEFAULT_DEADLINE.as_millis() as u64
}
fn default_max_measure() -> u64 {
    crate::process::measure::DEFAULT_MAX_BYTES
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
        for bad in ["[]", "[\"/\"]", "[\"\"]"] {
            let text = format!("{base}[enforcement]\nprotected_cgroups = {bad}\npolicy = \"/p.toml\"\n");
            let e = AgentConfig::parse(&text, p).unwrap_err().to_string();
            assert!(e.contains("key `enforcement.protected_cgroups`"), "{bad}: {e}");
        }
    }
}
