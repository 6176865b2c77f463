//! The server's configuration file (`tether_server::config::ServerConfig::parse`, behind
//! `tether-server run -c`) and its golden PCR policy files (`tpm::policy::Policy::parse_one`,
//! one per file in `policy_dir`, re-read at every attestation). Any text gives a value or an
//! error naming the key, never a panic; what is accepted keeps the promises the server relies
//! on.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tether_attestors::parse_trust_domain;
use tether_server::{
    config::ServerConfig,
    tpm::policy::{digest_len, Policy},
};

fuzz_target!(|data: &[u8]| {
    // Both loaders read their files as UTF-8 first.
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = ServerConfig::parse(text, Path::new("server.toml")) {
        assert!(parse_trust_domain(&c.trust_domain).is_ok());
        assert!(c.ca_ttl_seconds >= 60 && !c.server_names.is_empty());
        for ttl in [c.default_x509_svid_ttl_seconds, c.default_jwt_svid_ttl_seconds, c.node_svid_ttl_seconds] {
            assert!((1..=c.ca_ttl_seconds).contains(&ttl));
        }
        assert_eq!(c.upstream_ca_cert.is_some(), c.upstream_ca_key.is_some());
        let _ = c.admin_socket();
    }
    if let Ok((bank, set)) = Policy::parse_one(text, Path::new("golden.toml")) {
        let len = digest_len(&bank).expect("an accepted bank has a digest length");
        assert!(!set.name.is_empty());
        assert!(set.pcrs.iter().all(|(i, v)| *i <= 23 && v.len() == len));
    }
});
