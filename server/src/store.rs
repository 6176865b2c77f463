//! The registration store: entries, join tokens, attested agents and the authority state,
//! in an embedded SQLite file. Every write is one transaction: a failed request leaves
//! nothing behind. (PostgreSQL is planned behind the same methods.)

use std::{collections::BTreeMap, path::Path, sync::Mutex};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use tether_attestors::{Selector, SpiffeId};
use thiserror::Error;

use crate::ca::CaState;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("invalid entry: {0}")]
    Invalid(String),
    #[error("an entry with the same SPIFFE ID, parent and selectors exists: {0}")]
    Duplicate(String),
    #[error("no entry {0}")]
    NoEntry(String),
    #[error("join token unknown, already used or expired")]
    BadToken,
    #[error("no attested agent {0}")]
    NoAgent(String),
    #[error("node {0} is banned")]
    Banned(String),
    #[error("stored state is corrupt: {0}")]
    Corrupt(String),
}

/// A registration entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub spiffe_id: SpiffeId,
    pub parent_id: SpiffeId,
    pub selectors: Vec<Selector>,
    /// 0 = the server's default.
    pub x509_ttl: i64,
    pub jwt_ttl: i64,
    pub dns_names: Vec<String>,
    pub hint: String,
    pub admin: bool,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub revision: i64,
}

impl Entry {
    /// Checks everything a request can get wrong, naming it.
    pub fn validate(&mut self, trust_domain: &str) -> Result<(), StoreError> {
        let invalid = |m: String| Err(StoreError::Invalid(m));
        if self.spiffe_id.trust_domain() != trust_domain {
            return invalid(format!("{} is not in trust domain {trust_domain}", self.spiffe_id));
        }
        if self.spiffe_id.is_trust_domain_id() {
            return invalid(format!("{} has no path: workload IDs need one", self.spiffe_id));
        }
        if self.parent_id.trust_domain() != trust_domain {
            return invalid(format!("parent {} is not in trust domain {trust_domain}", self.parent_id));
        }
        if self.selectors.is_empty() {
            return invalid("at least one selector is required".into());
        }
        if self.x509_ttl < 0 || self.jwt_ttl < 0 {
            return invalid("TTLs cannot be negative".into());
        }
        for name in &self.dns_names {
            let ok = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
                });
            if !ok {
                return invalid(format!("DNS name {name:?} is not valid"));
            }
        }
        if self.labels.keys().any(|k| k.is_empty()) {
            return invalid("label keys cannot be empty".into());
        }
        self.selectors.sort();
        self.selectors.dedup();
        Ok(())
    }

    fn selectors_key(&self) -> String {
        self.selectors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
    }
}

/// An attested node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Agent {
    pub spiffe_id: SpiffeId,
    pub attestor: String,
    pub attested_at: i64,
    pub svid_expires_at: i64,
    pub selectors: Vec<String>,
}

pub struct Store {
    conn: Mutex<Connection>,
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    selectors_key TEXT NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (spiffe_id, parent_id, selectors_key)
);
CREATE INDEX IF NOT EXISTS entries_parent ON entries(parent_id);
CREATE TABLE IF NOT EXISTS join_tokens (
    digest TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL,
    node_id TEXT,
    used_at INTEGER
);
CREATE TABLE IF NOT EXISTS agents (
    spiffe_id TEXT PRIMARY KEY,
    attestor TEXT NOT NULL,
    attested_at INTEGER NOT NULL,
    svid_expires_at INTEGER NOT NULL,
    selectors TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS bans (spiffe_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revision (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
INSERT OR IGNORE INTO revision VALUES (1, 0);
";

impl Store {
    /// Opens (creating) the store file; `:memory:` for tests.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store { conn: Mutex::new(conn) })
    }

    fn with_tx<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    fn next_revision(tx: &rusqlite::Transaction<'_>) -> Result<i64, StoreError> {
        tx.execute("UPDATE revision SET value = value + 1 WHERE id = 1", [])?;
        Ok(tx.query_row("SELECT value FROM revision WHERE id = 1", [], |r| r.get(0))?)
    }

    fn write_entry(tx: &rusqlite::Transaction<'_>, e: &Entry, insert: bool) -> Result<(), StoreError> {
        let body = serde_json::to_string(e).map_err(|x| StoreError::Corrupt(x.to_string()))?;
        let sql = if insert {
            "INSERT INTO entries (id, spiffe_id, parent_id, selectors_key, body) VALUES (?1, ?2, ?3, ?4, ?5)"
        } else {
            "UPDATE entries SET spiffe_id = ?2, parent_id = ?3, selectors_key = ?4, body = ?5 WHERE id = ?1"
        };
        match tx.execute(sql, params![e.id, e.spiffe_id.to_string(), e.parent_id.to_string(), e.selectors_key(), body])
        {
            Ok(0) => Err(StoreError::NoEntry(e.id.clone())),
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(StoreError::Duplicate(e.spiffe_id.to_string()))
            }
            Err(x) => Err(x.into()),
        }
    }

    pub fn create_entry(&self, mut e: Entry, trust_domain: &str) -> Result<Entry, StoreError> {
        e.validate(trust_domain)?;
        e.id = random_id();
        self.with_tx(|tx| {
            e.revision = Self::next_revision(tx)?;
            Self::write_entry(tx, &e, true)?;
            Ok(e)
        })
    }

    /// Creates many entries in one transaction: all of them, or (on any error) none.
    pub fn create_entries(&self, entries: Vec<Entry>, trust_domain: &str) -> Result<Vec<Entry>, StoreError> {
        let mut checked = Vec::with_capacity(entries.len());
        for mut e in entries {
            e.validate(trust_domain)?;
            e.id = random_id();
            checked.push(e);
        }
        self.with_tx(|tx| {
            for e in checked.iter_mut() {
                e.revision = Self::next_revision(tx)?;
                Self::write_entry(tx, e, true)?;
            }
            Ok(checked)
        })
    }

    pub fn update_entry(&self, mut e: Entry, trust_domain: &str) -> Result<Entry, StoreError> {
        e.validate(trust_domain)?;
        self.with_tx(|tx| {
            e.revision = Self::next_revision(tx)?;
            Self::write_entry(tx, &e, false)?;
            Ok(e)
        })
    }

    pub fn delete_entry(&self, id: &str) -> Result<(), StoreError> {
        self.with_tx(|tx| match tx.execute("DELETE FROM entries WHERE id = ?1", [id])? {
            0 => Err(StoreError::NoEntry(id.into())),
            _ => {
                Self::next_revision(tx)?;
                Ok(())
            }
        })
    }

    fn parse_entries(rows: Vec<String>) -> Result<Vec<Entry>, StoreError> {
        rows.iter().map(|b| serde_json::from_str(b).map_err(|x| StoreError::Corrupt(x.to_string()))).collect()
    }

    pub fn get_entry(&self, id: &str) -> Result<Entry, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let body: Option<String> =
            conn.query_row("SELECT body FROM entries WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        let body = body.ok_or_else(|| StoreError::NoEntry(id.into()))?;
        serde_json::from_str(&body).map_err(|x| StoreError::Corrupt(x.to_string()))
    }

    /// All entries, optionally only those with this SPIFFE ID and/or parent.
    pub fn list_entries(&self, spiffe_id: Option<&str>, parent_id: Option<&str>) -> Result<Vec<Entry>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn.prepare(
            "SELECT body FROM entries WHERE (?1 IS NULL OR spiffe_id = ?1) AND (?2 IS NULL OR parent_id = ?2) ORDER BY spiffe_id, id",
        )?;
        let rows =
            stmt.query_map(params![spiffe_id, parent_id], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
        Self::parse_entries(rows)
    }

    pub fn create_join_token(
        &self,
        digest: &str,
        expires_at: i64,
        node_id: Option<&SpiffeId>,
    ) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO join_tokens (digest, expires_at, node_id) VALUES (?1, ?2, ?3)",
                params![digest, expires_at, node_id.map(ToString::to_string)],
            )?;
            Ok(())
        })
    }

    /// Consumes a join token and registers the node, in one transaction: `issue` runs inside
    /// it (signing the node SVID); if it fails, the token stays unused and nothing is stored.
    pub fn attest_with_token<T>(
        &self,
        digest: &str,
        now: i64,
        default_id: SpiffeId,
        issue: impl FnOnce(&SpiffeId) -> Result<(T, i64), StoreError>,
    ) -> Result<(SpiffeId, T), StoreError> {
        self.with_tx(|tx| {
            let row: Option<(i64, Option<String>, Option<i64>)> = tx
                .query_row("SELECT expires_at, node_id, used_at FROM join_tokens WHERE digest = ?1", [digest], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
            let Some((expires_at, node_id, None)) = row else { return Err(StoreError::BadToken) };
            if expires_at <= now {
                return Err(StoreError::BadToken);
            }
            let id = match node_id {
                Some(s) => SpiffeId::parse(&s).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                None => default_id,
            };
            let banned: Option<String> = tx.query_row("SELECT spiffe_id FROM bans WHERE spiffe_id = ?1", [id.to_string()], |r| r.get(0)).optional()?;
            if banned.is_some() {
                return Err(StoreError::Banned(id.to_string()));
            }
            let (out, svid_expires_at) = issue(&id)?;
            tx.execute("UPDATE join_tokens SET used_at = ?2 WHERE digest = ?1", params![digest, now])?;
            let selectors = serde_json::to_string(&[format!("join_token:{}", digest.get(..32).unwrap_or(digest))]).unwrap_or_default();
            tx.execute(
                "INSERT INTO agents (spiffe_id, attestor, attested_at, svid_expires_at, selectors) VALUES (?1, 'join_token', ?2, ?3, ?4)
                 ON CONFLICT(spiffe_id) DO UPDATE SET attestor = excluded.attestor, attested_at = excluded.attested_at,
                 svid_expires_at = excluded.svid_expires_at, selectors = excluded.selectors",
                params![id.to_string(), now, svid_expires_at, selectors],
            )?;
            Ok((id, out))
        })
    }

    pub fn get_agent(&self, id: &SpiffeId) -> Result<Agent, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.query_row(
            "SELECT spiffe_id, attestor, attested_at, svid_expires_at, selectors FROM agents WHERE spiffe_id = ?1",
            [id.to_string()],
            row_agent,
        )
        .optional()?
        .ok_or_else(|| StoreError::NoAgent(id.to_string()))?
    }

    pub fn renew_agent(&self, id: &SpiffeId, svid_expires_at: i64) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            match tx.execute(
                "UPDATE agents SET svid_expires_at = ?2 WHERE spiffe_id = ?1",
                params![id.to_string(), svid_expires_at],
            )? {
                0 => Err(StoreError::NoAgent(id.to_string())),
                _ => Ok(()),
            }
        })
    }

    pub fn list_agents(&self) -> Result<Vec<Agent>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn.prepare(
            "SELECT spiffe_id, attestor, attested_at, svid_expires_at, selectors FROM agents ORDER BY spiffe_id",
        )?;
        let rows = stmt.query_map([], row_agent)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().collect()
    }

    /// Removes an agent: its node SVID is no longer accepted and it must attest again.
    /// With `ban`, it never can again.
    pub fn evict_agent(&self, id: &SpiffeId, ban: bool) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            let n = tx.execute("DELETE FROM agents WHERE spiffe_id = ?1", [id.to_string()])?;
            if ban {
                tx.execute("INSERT OR IGNORE INTO bans VALUES (?1)", [id.to_string()])?;
            } else if n == 0 {
                return Err(StoreError::NoAgent(id.to_string()));
            }
            Ok(())
        })
    }

    pub fn load_ca(&self) -> Result<Option<CaState>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let v: Option<String> =
            conn.query_row("SELECT value FROM meta WHERE key = 'ca'", [], |r| r.get(0)).optional()?;
        v.map(|s| serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(e.to_string()))).transpose()
    }

    pub fn save_ca(&self, ca: &CaState) -> Result<(), StoreError> {
        let v = serde_json::to_string(ca).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('ca', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [v],
            )?;
            Ok(())
        })
    }
}

fn row_agent(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Agent, StoreError>> {
    let id: String = r.get(0)?;
    let selectors: String = r.get(4)?;
    Ok((|| {
        Ok(Agent {
            spiffe_id: SpiffeId::parse(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            attestor: r.get(1)?,
            attested_at: r.get(2)?,
            svid_expires_at: r.get(3)?,
            selectors: serde_json::from_str(&selectors).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        })
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, parent: &str, sel: &[&str]) -> Entry {
        Entry {
            id: String::new(),
            spiffe_id: SpiffeId::parse(id).unwrap(),
            parent_id: SpiffeId::parse(parent).unwrap(),
            selectors: sel.iter().map(|s| Selector::parse(s).unwrap()).collect(),
            x509_ttl: 0,
            jwt_ttl: 0,
            dns_names: vec![],
            hint: String::new(),
            admin: false,
            namespace: "default".into(),
            labels: BTreeMap::new(),
            revision: 0,
        }
    }

    fn store() -> Store {
        Store::open(Path::new(":memory:")).unwrap()
    }

    #[test]
    fn entry_crud_and_duplicates() {
        let s = store();
        let e = s.create_entry(entry("spiffe://td/web", "spiffe://td/node", &["unix:uid:0"]), "td").unwrap();
        assert_eq!(s.get_entry(&e.id).unwrap(), e);
        // Same ID, parent and selectors (in any order): refused, and nothing written.
        let dup = s.create_entry(entry("spiffe://td/web", "spiffe://td/node", &["unix:uid:0", "unix:uid:0"]), "td");
        assert!(matches!(dup, Err(StoreError::Duplicate(_))), "{dup:?}");
        assert_eq!(s.list_entries(None, None).unwrap().len(), 1);
        let mut changed = e.clone();
        changed.hint = "internal".into();
        let updated = s.update_entry(changed, "td").unwrap();
        assert!(updated.revision > e.revision);
        assert_eq!(s.list_entries(None, Some("spiffe://td/node")).unwrap()[0].hint, "internal");
        s.delete_entry(&e.id).unwrap();
        assert!(matches!(s.delete_entry(&e.id), Err(StoreError::NoEntry(_))));
    }

    #[test]
    fn batch_creation_is_all_or_nothing() {
        let s = store();
        let good = entry("spiffe://td/a", "spiffe://td/n", &["unix:uid:1"]);
        let dup = entry("spiffe://td/a", "spiffe://td/n", &["unix:uid:1"]);
        assert!(matches!(s.create_entries(vec![good.clone(), dup], "td"), Err(StoreError::Duplicate(_))));
        assert!(s.list_entries(None, None).unwrap().is_empty());
        assert_eq!(
            s.create_entries(vec![good, entry("spiffe://td/b", "spiffe://td/n", &["unix:uid:2"])], "td").unwrap().len(),
            2
        );
    }

    #[test]
    fn invalid_entries_name_the_problem() {
        let s = store();
        let cases = [
            (entry("spiffe://other/web", "spiffe://td/n", &["unix:uid:0"]), "not in trust domain td"),
            (entry("spiffe://td", "spiffe://td/n", &["unix:uid:0"]), "has no path"),
            (entry("spiffe://td/web", "spiffe://td/n", &[]), "at least one selector"),
        ];
        for (e, want) in cases {
            let err = s.create_entry(e, "td").unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        let mut e = entry("spiffe://td/web", "spiffe://td/n", &["unix:uid:0"]);
        e.dns_names = vec!["bad name".into()];
        assert!(s.create_entry(e, "td").unwrap_err().to_string().contains("DNS name"));
        assert!(s.list_entries(None, None).unwrap().is_empty());
    }

    #[test]
    fn join_tokens_are_one_time_and_expire_and_failures_burn_nothing() {
        let s = store();
        let id = SpiffeId::parse("spiffe://td/node/a").unwrap();
        s.create_join_token("d1", 1000, None).unwrap();
        // Issuing fails inside the transaction: the token survives.
        let failed: Result<(SpiffeId, ()), _> =
            s.attest_with_token("d1", 10, id.clone(), |_| Err(StoreError::Invalid("csr".into())));
        assert!(failed.is_err());
        assert!(s.list_agents().unwrap().is_empty());
        let (got, ()) = s.attest_with_token("d1", 10, id.clone(), |_| Ok(((), 500))).unwrap();
        assert_eq!(got, id);
        assert!(
            matches!(s.attest_with_token("d1", 11, id.clone(), |_| Ok(((), 500))), Err(StoreError::BadToken)),
            "reuse"
        );
        s.create_join_token("d2", 1000, None).unwrap();
        assert!(
            matches!(s.attest_with_token("d2", 1000, id.clone(), |_| Ok(((), 1))), Err(StoreError::BadToken)),
            "expired"
        );
        assert!(matches!(s.attest_with_token("nope", 1, id.clone(), |_| Ok(((), 1))), Err(StoreError::BadToken)));
        assert_eq!(s.list_agents().unwrap().len(), 1);
    }

    #[test]
    fn banned_nodes_cannot_attest_again() {
        let s = store();
        let id = SpiffeId::parse("spiffe://td/node/a").unwrap();
        s.create_join_token("d1", 1000, Some(&id)).unwrap();
        s.attest_with_token("d1", 1, SpiffeId::parse("spiffe://td/x").unwrap(), |_| Ok(((), 9))).unwrap();
        s.evict_agent(&id, true).unwrap();
        assert!(matches!(s.get_agent(&id), Err(StoreError::NoAgent(_))));
        s.create_join_token("d2", 1000, Some(&id)).unwrap();
        assert!(matches!(s.attest_with_token("d2", 1, id.clone(), |_| Ok(((), 9))), Err(StoreError::Banned(_))));
    }
}
