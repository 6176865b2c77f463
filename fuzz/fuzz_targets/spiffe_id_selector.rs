//! The identity vocabulary every API speaks (`tether_attestors`): SPIFFE IDs and trust domain
//! names, selectors (registration entries, node selectors, policy), the policy's SPIFFE ID
//! patterns, and hex (digests in selectors, PCR values). Each parser: never a panic, and what
//! it accepts round-trips through its display (and serde) to the same value, spelled as given.
//! A line break splits the input into a pattern and an ID to match against it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_agent::policy::SpiffePattern;
use tether_attestors::{hex, join_token, parse_trust_domain, Selector, SpiffeId, MAX_LEN};
use tether_fuzz::TRUST_DOMAIN;

fuzz_target!(|data: &[u8]| {
    // Every caller holds a &str (prost checks UTF-8 on the wire, TOML in files).
    let Ok(s) = std::str::from_utf8(data) else { return };

    match SpiffeId::parse(s) {
        Ok(id) => {
            assert_eq!(id.to_string(), s);
            assert!(s.len() <= MAX_LEN);
            assert_eq!(SpiffeId::parse(&id.to_string()).as_ref(), Ok(&id));
            assert_eq!(parse_trust_domain(id.trust_domain()).as_deref(), Ok(id.trust_domain()));
            assert!(id.is_trust_domain_id() == id.path().is_empty());
            let segments: Vec<&str> = id.path().split('/').skip(1).collect();
            assert_eq!(SpiffeId::from_parts(id.trust_domain(), &segments).as_ref(), Ok(&id));
            let json = serde_json::to_string(&id).expect("serialize");
            assert_eq!(serde_json::from_str::<SpiffeId>(&json).expect("deserialize"), id);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }

    if let Ok(td) = parse_trust_domain(s) {
        assert_eq!(td, s);
        assert!(SpiffeId::parse(&format!("spiffe://{td}")).is_ok_and(|id| id.is_trust_domain_id()));
    }

    if let Ok(sel) = Selector::parse(s) {
        assert_eq!(sel.to_string(), s);
        assert_eq!(Selector::parse(&sel.to_string()).as_ref(), Ok(&sel));
        let json = serde_json::to_string(&sel).expect("serialize");
        assert_eq!(serde_json::from_str::<Selector>(&json).expect("deserialize"), sel);
    }

    // The server names a join-token node after the token's digest: any token must do.
    assert!(join_token::default_node_id(TRUST_DOMAIN, s).is_ok(), "no node ID for token {s:?}");

    if let Some(bytes) = hex::decode(s) {
        assert_eq!(hex::encode(&bytes), s.to_ascii_lowercase(), "hex::decode accepted non-hex");
    }

    if let Ok(pattern) = SpiffePattern::parse(s) {
        assert_eq!(pattern.as_str(), s);
        // A pattern without `*` is a plain ID, and matches exactly itself.
        if !s.contains('*') {
            assert!(pattern.matches(s));
        }
    }
    if let Some((pattern, id)) = s.split_once('\n') {
        if let (Ok(pattern), Ok(id)) = (SpiffePattern::parse(pattern), SpiffeId::parse(id)) {
            let matched = pattern.matches(&id.to_string());
            if !pattern.as_str().contains('*') {
                assert_eq!(matched, pattern.as_str() == id.to_string());
            }
        }
    }
});
