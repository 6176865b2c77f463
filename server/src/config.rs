//! tether-server configuration: one TOML file, unknown keys refused, every value checked at
//! start-up with an error naming the key.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;
use tether_attestors::parse_trust_domain;
use thiserror::Error;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// e.g. "example.org"
    pub trust_domain: String,
    /// Holds the SQLite store (keys included): created 0700.
    pub data_dir: PathBuf,
    /// Node API (TLS). Default 127.0.0.1:8081.
    #[serde(default = "default_bind")]
    pub bind_address: SocketAddr,
    /// Admin API socket (root-only). Default <data_dir>/admin.sock.
    pub admin_socket: Option<PathBuf>,
    /// DNS names in the server's TLS certificate. Default ["localhost"].
    #[serde(default = "default_names")]
    pub server_names: Vec<String>,
    /// X.509 CA and JWT key lifetime. Default 86400 (24 h).
    #[serde(default = "default_ca_ttl")]
    pub ca_ttl_seconds: i64,
    /// Default X.509-SVID lifetime. Default 3600.
    #[serde(default = "default_x509_ttl")]
    pub default_x509_svid_ttl_seconds: i64,
    /// Default JWT-SVID lifetime. Default 300.
    #[serde(default = "default_jwt_ttl")]
    pub default_jwt_svid_ttl_seconds: i64,
    /// Node SVID lifetime. Default 3600.
    #[serde(default = "default_x509_ttl")]
    pub node_svid_ttl_seconds: i64,
    /// Store the registration data in PostgreSQL instead of the embedded SQLite file:
    /// a libpq-style connection string (`host=... port=... user=... dbname=...`).
    pub postgres: Option<String>,
    /// An upstream CA (PEM certificate, optionally followed by its chain to the root) whose
    /// key signs Tether's CAs as intermediates; the bundle then holds the upstream root.
    pub upstream_ca_cert: Option<PathBuf>,
    /// Its PKCS#8 private key (PEM).
    pub upstream_ca_key: Option<PathBuf>,
    /// TPM node attestation (EK chain, credential activation, quotes against golden PCRs).
    pub tpm: Option<crate::tpm::TpmConfig>,
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}
fn default_names() -> Vec<String> {
    vec!["localhost".into()]
}
fn default_ca_ttl() -> i64 {
    86_400
}
fn default_x509_ttl() -> i64 {
    3_600
}
fn default_jwt_ttl() -> i64 {
    300
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

impl ServerConfig {
    /// Reads the upstream CA, if configured; errors name the key.
    pub fn upstream(&self, path: &std::path::Path) -> Result<Option<crate::ca::UpstreamCa>, ConfigError> {
        let (Some(cert), Some(key)) = (&self.upstream_ca_cert, &self.upstream_ca_key) else { return Ok(None) };
        let read = |p: &PathBuf, key: &'static str| {
            std::fs::read_to_string(p).map_err(|e| ConfigError::Invalid {
                path: path.into(),
                key,
                message: format!("{}: {e}", p.display()),
            })
        };
        let (cert_pem, key_pem) = (read(cert, "upstream_ca_cert")?, read(key, "upstream_ca_key")?);
        crate::ca::UpstreamCa::from_pem(&cert_pem, &key_pem).map(Some).map_err(|e| ConfigError::Invalid {
            path: path.into(),
            key: "upstream_ca_cert",
            message: e.to_string(),
        })
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &std::path::Path) -> Result<Self, ConfigError> {
        let config: ServerConfig =
            toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        let invalid = |key, message: String| ConfigError::Invalid { path: path.into(), key, message };
        parse_trust_domain(&config.trust_domain).map_err(|e| invalid("trust_domain", e.to_string()))?;
        if config.ca_ttl_seconds < 60 {
            return Err(invalid("ca_ttl_seconds", "must be at least 60".into()));
        }
        for (key, ttl) in [
            ("default_x509_svid_ttl_seconds", config.default_x509_svid_ttl_seconds),
            ("default_jwt_svid_ttl_seconds", config.default_jwt_svid_ttl_seconds),
            ("node_svid_ttl_seconds", config.node_svid_ttl_seconds),
        ] {
            if ttl < 1 || ttl > config.ca_ttl_seconds {
                return Err(invalid(
                    key,
                    format!("{ttl} is not between 1 and ca_ttl_seconds ({})", config.ca_ttl_seconds),
                ));
            }
        }
        if config.upstream_ca_cert.is_some() != config.upstream_ca_key.is_some() {
            let key = if config.upstream_ca_cert.is_some() { "upstream_ca_key" } else { "upstream_ca_cert" };
            return Err(invalid(key, "upstream_ca_cert and upstream_ca_key go together".into()));
        }
        if let Some(tpm) = &config.tpm {
            if tpm.challenge_ttl_seconds == 0 {
                return Err(invalid("tpm.challenge_ttl_seconds", "must be at least 1".into()));
            }
            if tpm.max_evidence_age_seconds < 0 {
                return Err(invalid("tpm.max_evidence_age_seconds", "cannot be negative".into()));
            }
            for (key, value) in [
                ("tpm.max_pending_challenges", tpm.max_pending_challenges),
                ("tpm.max_pending_challenges_per_ek", tpm.max_pending_challenges_per_ek),
                ("tpm.max_pending_challenges_per_source", tpm.max_pending_challenges_per_source),
                ("tpm.max_pending_reattestations_per_node", tpm.max_pending_reattestations_per_node),
            ] {
                if value == 0 {
                    return Err(invalid(key, "must be at least 1 (0 would refuse every attestation)".into()));
                }
            }
        }
        if config.server_names.is_empty() {
            return Err(invalid("server_names", "needs at least one DNS name".into()));
        }
        Ok(config)
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket.clone().unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServerConfig, ConfigError> {
        ServerConfig::parse(text, std::path::Path::new("server.toml"))
    }

    #[test]
    fn defaults_and_errors_name_the_key() {
        let c = parse("trust_domain = \"example.org\"\ndata_dir = \"/var/lib/tether\"\n").unwrap();
        assert_eq!(c.default_jwt_svid_ttl_seconds, 300);
        assert_eq!(c.admin_socket(), PathBuf::from("/var/lib/tether/admin.sock"));
        let e = parse("trust_domain = \"Example.org\"\ndata_dir = \"/x\"\n").unwrap_err().to_string();
        assert!(e.starts_with("server.toml: key `trust_domain`"), "{e}");
        let e = parse("trust_domain = \"e.org\"\ndata_dir = \"/x\"\nbogus = 1\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `bogus`"), "{e}");
        let e = parse("trust_domain = \"e.org\"\ndata_dir = \"/x\"\ndefault_jwt_svid_ttl_seconds = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`default_jwt_svid_ttl_seconds`"), "{e}");
    }

    #[test]
    fn tpm_section() {
        let base = "trust_domain = \"e.org\"\ndata_dir = \"/x\"\n[tpm]\nek_ca_dir = \"/cas\"\npolicy_dir = \"/p\"\n";
        let c = parse(base).unwrap();
        let t = c.tpm.unwrap();
        assert_eq!((t.challenge_ttl_seconds, t.max_evidence_age_seconds), (60, 0));
        assert_eq!(
            (
                t.max_pending_challenges,
                t.max_pending_challenges_per_ek,
                t.max_pending_challenges_per_source,
                t.max_pending_reattestations_per_node
            ),
            (4096, 4, 64, 2)
        );
        let e = parse(&format!("{base}max_pending_challenges_per_source = 0\n")).unwrap_err().to_string();
        assert!(e.contains("key `tpm.max_pending_challenges_per_source`: must be at least 1"), "{e}");
        let e = parse(&format!("{base}challenge_ttl_seconds = 0\n")).unwrap_err().to_string();
        assert!(e.contains("key `tpm.challenge_ttl_seconds`"), "{e}");
        let e =
            parse("trust_domain = \"e.org\"\ndata_dir = \"/x\"\n[tpm]\nek_ca_dir = \"/c\"\n").unwrap_err().to_string();
        assert!(e.contains("missing field `policy_dir`"), "{e}");
    }
}
