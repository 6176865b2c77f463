//! Pending TPM challenges: who may hold how many, and which one gives way.
//!
//! A challenge is server state until it is answered or expires, and anyone with a public EK
//! certificate can ask for a first-attestation one. One table for everything let ~70
//! requests a second hold all 4,096 slots, and every attested node's re-attestation (renewal
//! included) was then refused. So the two kinds live apart:
//!
//! - **First attestation** (unauthenticated): at most `per_ek` per EK — a new one evicts
//!   that EK's oldest, the oldest one asked from the same address first, so a node that lost
//!   its challenge can always ask again and an outsider replaying its public certificate from
//!   one address only churns its own; at most `per_source` per source address (IPv4 address,
//!   IPv6 /64), refused beyond; at most `max_pending` in all, refused beyond.
//! - **Re-attestation** (mTLS, an attested node): keyed by the node's SPIFFE ID, at most
//!   `per_node` each, a new one evicting that node's oldest. Only the node can fill its own
//!   row, and nothing of the first-attestation table can touch it.
//!
//! Each challenge is taken out when it is answered, whatever the verdict: it answers once.
//! Stateless sealed challenges would need a table of spent ones to be replay-proof, so they
//! would not be simpler; this table is bounded and counted by scanning (a few thousand rows).

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

/// The address a first-attestation request came from, as its limit counts it: an IPv4
/// address, or the /64 of an IPv6 one (one host usually holds a whole /64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
    /// The transport gave no address (not TCP): all such requests share one limit.
    Unknown,
}

impl From<Option<SocketAddr>> for Source {
    fn from(addr: Option<SocketAddr>) -> Self {
        match addr.map(|a| a.ip().to_canonical()) {
            Some(IpAddr::V4(v4)) => Source::V4(v4.octets()),
            Some(IpAddr::V6(v6)) => {
                let mut prefix = [0; 8];
                prefix.copy_from_slice(&v6.octets()[..8]);
                Source::V6Prefix(prefix)
            }
            None => Source::Unknown,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(o) => write!(f, "{}", std::net::Ipv4Addr::from(*o)),
            Source::V6Prefix(p) => {
                let mut o = [0; 16];
                o[..8].copy_from_slice(p);
                write!(f, "{}/64", std::net::Ipv6Addr::from(o))
            }
            Source::Unknown => f.write_str("an unknown address"),
        }
    }
}

/// The bounds, from `[tpm]` in the server config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub ttl: Duration,
    pub max_pending: usize,
    pub per_ek: usize,
    pub per_source: usize,
    pub per_node: usize,
}

/// A first-attestation challenge refused; the config key names the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// `max_pending_challenges_per_source`.
    Source { source: Source, limit: usize },
    /// `max_pending_challenges`.
    Server { limit: usize },
}

/// A challenge that made room for a newer one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evicted {
    pub id: String,
    pub source: Source,
}

struct First<T> {
    ek: String,
    source: Source,
    /// Insertion order: the oldest has the smallest.
    seq: u64,
    expires: Instant,
    value: T,
}

struct Again<T> {
    id: String,
    expires: Instant,
    value: T,
}

pub struct Challenges<T> {
    limits: Limits,
    seq: u64,
    first: HashMap<String, First<T>>,
    again: HashMap<String, VecDeque<Again<T>>>,
}

impl<T> Challenges<T> {
    pub fn new(limits: Limits) -> Self {
        Challenges { limits, seq: 0, first: HashMap::new(), again: HashMap::new() }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Drops expired first-attestation challenges. (Each table is purged by its own inserts:
    /// a flood of first attestations never walks the attested nodes' rows.)
    fn purge_first(&mut self, now: Instant) {
        self.first.retain(|_, c| c.expires > now);
    }

    fn purge_again(&mut self, now: Instant) {
        self.again.retain(|_, row| {
            row.retain(|c| c.expires > now);
            !row.is_empty()
        });
    }

    /// Parks a first-attestation challenge `id` for `ek`, asked from `source`. Nothing
    /// changes when it is refused.
    pub fn insert_first(
        &mut self,
        now: Instant,
        id: String,
        ek: &str,
        source: Source,
        value: T,
    ) -> Result<Option<Evicted>, Refused> {
        self.purge_first(now);
        // The EK's oldest, preferring one asked from this address.
        let victim = {
            let of_ek: Vec<(&String, &First<T>)> = self.first.iter().filter(|(_, c)| c.ek == ek).collect();
            if of_ek.len() < self.limits.per_ek {
                None
            } else {
                let oldest = |same: bool| {
                    of_ek.iter().filter(|(_, c)| !same || c.source == source).min_by_key(|(_, c)| c.seq).copied()
                };
                oldest(true).or_else(|| oldest(false)).map(|(id, c)| (id.clone(), c.source))
            }
        };
        let freed_here = victim.as_ref().is_some_and(|(_, s)| *s == source);
        let from_source = self.first.values().filter(|c| c.source == source).count();
        if from_source - usize::from(freed_here) >= self.limits.per_source {
            return Err(Refused::Source { source, limit: self.limits.per_source });
        }
        if self.first.len() - usize::from(victim.is_some()) >= self.limits.max_pending {
            return Err(Refused::Server { limit: self.limits.max_pending });
        }
        let evicted = victim.map(|(id, source)| {
            self.first.remove(&id);
            Evicted { id, source }
        });
        self.seq += 1;
        let expires = now + self.limits.ttl;
        self.first.insert(id, First { ek: ek.to_owned(), source, seq: self.seq, expires, value });
        Ok(evicted)
    }

    /// Parks a re-attestation challenge `id` for the attested node `node`; returns the id of
    /// that node's oldest if it made room.
    pub fn insert_again(&mut self, now: Instant, id: String, node: &str, value: T) -> Option<String> {
        self.purge_again(now);
        let row = self.again.entry(node.to_owned()).or_default();
        let evicted = if row.len() >= self.limits.per_node { row.pop_front().map(|c| c.id) } else { None };
        row.push_back(Again { id, expires: now + self.limits.ttl, value });
        evicted
    }

    /// Takes a first-attestation challenge out (answered once, whatever the verdict).
    pub fn take_first(&mut self, now: Instant, id: &str) -> Option<T> {
        self.first.remove(id).filter(|c| c.expires > now).map(|c| c.value)
    }

    /// Takes `node`'s re-attestation challenge `id` out; another node's is not found.
    pub fn take_again(&mut self, now: Instant, node: &str, id: &str) -> Option<T> {
        let row = self.again.get_mut(node)?;
        let found = row.iter().position(|c| c.id == id).and_then(|i| row.remove(i));
        if row.is_empty() {
            self.again.remove(node);
        }
        found.filter(|c| c.expires > now).map(|c| c.value)
    }

    /// (first-attestation, re-attestation) challenges held, expired ones included.
    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.first.len(), self.again.values().map(VecDeque::len).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits =
        Limits { ttl: Duration::from_secs(60), max_pending: 10, per_ek: 3, per_source: 5, per_node: 2 };

    fn addr(s: &str) -> Source {
        Source::from(Some(SocketAddr::new(s.parse().unwrap(), 4242)))
    }

    fn first(t: &mut Challenges<u32>, now: Instant, id: &str, ek: &str, from: &str) -> Result<Option<String>, Refused> {
        t.insert_first(now, id.into(), ek, addr(from), 0).map(|e| e.map(|e| e.id))
    }

    #[test]
    fn sources_are_addresses_and_ipv6_prefixes() {
        assert_eq!(addr("10.0.0.1").to_string(), "10.0.0.1");
        assert_eq!(addr("::ffff:10.0.0.1"), addr("10.0.0.1"), "IPv4-mapped is the IPv4 address");
        assert_eq!(addr("2001:db8:1:2::5"), addr("2001:db8:1:2:ffff::9"), "one /64 is one source");
        assert_ne!(addr("2001:db8:1:2::5"), addr("2001:db8:1:3::5"));
        assert_eq!(addr("2001:db8:1:2::5").to_string(), "2001:db8:1:2::/64");
        assert_eq!(Source::from(None).to_string(), "an unknown address");
    }

    #[test]
    fn an_ek_over_its_limit_evicts_its_own_oldest_only() {
        let mut t = Challenges::new(LIMITS);
        let now = Instant::now();
        first(&mut t, now, "other", "ek-b", "10.0.0.9").unwrap();
        for i in 0..3 {
            assert_eq!(first(&mut t, now, &format!("a{i}"), "ek-a", "10.0.0.1").unwrap(), None);
        }
        assert_eq!(first(&mut t, now, "a3", "ek-a", "10.0.0.1").unwrap(), Some("a0".into()));
        assert_eq!(first(&mut t, now, "a4", "ek-a", "10.0.0.1").unwrap(), Some("a1".into()));
        assert_eq!(t.take_first(now, "a0"), None, "evicted");
        assert_eq!(t.take_first(now, "a1"), None, "evicted");
        assert!(t.take_first(now, "other").is_some(), "another EK's challenge is untouched");
        for id in ["a2", "a3", "a4"] {
            assert!(t.take_first(now, id).is_some(), "{id}");
        }
    }

    #[test]
    fn eviction_prefers_the_oldest_from_the_same_address() {
        let mut t = Challenges::new(LIMITS);
        let now = Instant::now();
        // The node's own challenge is the EK's oldest; a flood of its public certificate from
        // another address evicts the flood's own.
        first(&mut t, now, "node", "ek-a", "10.0.0.1").unwrap();
        first(&mut t, now, "f0", "ek-a", "10.6.6.6").unwrap();
        first(&mut t, now, "f1", "ek-a", "10.6.6.6").unwrap();
        for i in 2..50 {
            let evicted = first(&mut t, now, &format!("f{i}"), "ek-a", "10.6.6.6").unwrap();
            assert_eq!(evicted, Some(format!("f{}", i - 2)));
        }
        assert!(t.take_first(now, "node").is_some());
        // With none of its own to give way, a new address takes the EK's oldest.
        let mut t = Challenges::new(LIMITS);
        for (id, from) in [("x", "10.0.0.1"), ("y", "10.0.0.2"), ("z", "10.0.0.2")] {
            first(&mut t, now, id, "ek-a", from).unwrap();
        }
        assert_eq!(first(&mut t, now, "w", "ek-a", "10.0.0.3").unwrap(), Some("x".into()));
    }

    #[test]
    fn a_source_over_its_limit_is_refused_and_nothing_changes() {
        let mut t = Challenges::new(LIMITS);
        let now = Instant::now();
        for (id, ek) in [("s0", "ek0"), ("s1", "ek0"), ("s2", "ek0"), ("s3", "ek3"), ("s4", "ek4")] {
            first(&mut t, now, id, ek, "10.0.0.1").unwrap();
        }
        let refused = first(&mut t, now, "s5", "ek5", "10.0.0.1").unwrap_err();
        assert_eq!(refused, Refused::Source { source: addr("10.0.0.1"), limit: 5 });
        assert_eq!(
            first(&mut t, now, "s3b", "ek3", "10.0.0.1").unwrap_err(),
            refused,
            "ek3 has room: it would add one"
        );
        assert_eq!(t.len(), (5, 0));
        // Another address is not affected; nor is a new challenge for an EK whose oldest
        // from this address gives way (the count stays).
        first(&mut t, now, "o", "ek9", "10.0.0.2").unwrap();
        assert_eq!(first(&mut t, now, "s0b", "ek0", "10.0.0.1").unwrap(), Some("s0".into()));
        // But an EK whose challenges are another address's would add one here: refused, and
        // the other address keeps its challenges.
        for id in ["p0", "p1", "p2"] {
            first(&mut t, now, id, "ekp", "10.0.0.3").unwrap();
        }
        assert!(matches!(first(&mut t, now, "p3", "ekp", "10.0.0.1"), Err(Refused::Source { .. })));
        assert!(t.take_first(now, "p0").is_some());
    }

    #[test]
    fn the_server_limit_holds_across_sources() {
        let mut t = Challenges::new(LIMITS);
        let now = Instant::now();
        for i in 0..3 {
            first(&mut t, now, &format!("e{i}"), "ek-e", "10.0.0.99").unwrap();
        }
        for i in 3..10 {
            first(&mut t, now, &format!("c{i}"), &format!("ek{i}"), &format!("10.0.0.{i}")).unwrap();
        }
        assert_eq!(first(&mut t, now, "c10", "ek10", "10.0.1.1").unwrap_err(), Refused::Server { limit: 10 });
        // A challenge that evicts its EK's oldest keeps the total: allowed.
        assert_eq!(first(&mut t, now, "e3", "ek-e", "10.0.0.99").unwrap(), Some("e0".into()));
        assert_eq!(t.len(), (10, 0));
    }

    #[test]
    fn expired_challenges_free_their_places_and_cannot_be_answered() {
        let mut t = Challenges::new(LIMITS);
        let now = Instant::now();
        for i in 0..5 {
            first(&mut t, now, &format!("s{i}"), &format!("ek{i}"), "10.0.0.1").unwrap();
        }
        t.insert_again(now, "r0".into(), "node", 0);
        let later = now + LIMITS.ttl;
        assert_eq!(t.take_first(later, "s0"), None, "expired");
        assert_eq!(t.take_again(later, "node", "r0"), None, "expired");
        first(&mut t, later, "n", "ek-n", "10.0.0.1").unwrap();
        assert_eq!(t.len(), (1, 0), "s1..s4 purged, r0 taken");
    }

    #[test]
    fn reattestation_challenges_are_per_node_and_never_refused() {
        let mut t = Challenges::new(LIMITS);
        let now = Instant::now();
        // The first-attestation table is full from every side.
        for i in 0..10 {
            first(&mut t, now, &format!("c{i}"), &format!("ek{i}"), &format!("10.0.0.{i}")).unwrap();
        }
        assert_eq!(t.insert_again(now, "a1".into(), "node-a", 1), None);
        assert_eq!(t.insert_again(now, "a2".into(), "node-a", 2), None);
        assert_eq!(t.insert_again(now, "b1".into(), "node-b", 3), None);
        assert_eq!(t.insert_again(now, "a3".into(), "node-a", 4), Some("a1".into()), "node-a's own oldest");
        assert_eq!(t.take_again(now, "node-a", "a1"), None);
        assert_eq!(t.take_again(now, "node-a", "b1"), None, "another node's challenge is not found");
        assert_eq!(t.take_again(now, "node-b", "b1"), Some(3));
        assert_eq!(t.take_again(now, "node-b", "b1"), None, "answered once");
        assert_eq!(t.take_first(now, "a2"), None, "the kinds do not mix");
        assert_eq!(t.take_again(now, "node-a", "a2"), Some(2));
        assert_eq!(t.len(), (10, 1));
    }
}
