//! The agent's configuration file (`tether_agent::config::AgentConfig::parse`, behind
//! `tether-agent run -c`): TOML with unknown keys refused, then every value checked. Any text
//! gives a config or an error naming the key, never a panic; what is accepted keeps the
//! promises the agent relies on later.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tether_agent::config::AgentConfig;
use tether_attestors::parse_trust_domain;

fuzz_target!(|data: &[u8]| {
    // `AgentConfig::load` reads the file as UTF-8 first.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = AgentConfig::parse(text, Path::new("agent.toml")) else { return };
    assert!(parse_trust_domain(&config.trust_domain).is_ok());
    assert!(config.socket_path.is_absolute());
    assert!(config.max_connections_per_uid > 0 && config.sync_interval_seconds > 0);
    assert!(config.tpm.is_none() || config.join_token.is_none());
    if let Some(e) = &config.enforcement {
        assert!(!e.protected_cgroups.is_empty());
        assert!(e.protected_cgroups.iter().all(|p| !p.as_os_str().is_empty() && p != Path::new("/")));
    }
    assert!(config.endpoint().starts_with("unix:///"));
});
