//! The registration store: entries, join tokens, attested agents and the authority state,
//! in an embedded SQLite file. Every write is one transaction: a failed request leaves
//! nothing behind. (PostgreSQL is planned behind the same methods.)

use std::{collections::BTreeMap, path::Path, sync::Mutex};

use serde::{Deserialize, Serialize};
use tether_attestors::{Selector, SpiffeId};
use thiserror::Error;

use tether_attestors::{
    hex,
    tpm::verify::{check_clock, ClockState, QuoteInfo},
};

use crate::{ca::CaState, tpm::AkRecord};

mod tunnel;
pub use tunnel::{TunnelRecord, TunnelService};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(String),
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
    /// Evidence refused inside the transaction (e.g. a TPM clock older than recorded).
    #[error("{0}")]
    Refused(String),
    /// An ID under `/tether/` (see [`reserved`]).
    #[error("{0} is reserved: IDs under /tether/ name the server and the nodes it attests, and cannot be registered")]
    Reserved(String),
}

/// `spiffe://<td>/tether/...` is the server's own namespace: `/tether/server` is its TLS
/// identity and `/tether/agent/<attestor>/...` the node IDs it derives. An entry or a
/// chosen node ID there would let a workload or a node pose as the server or as another
/// node, so neither can be registered, and rows with one are ignored.
pub fn reserved(id: &SpiffeId) -> bool {
    id.path() == "/tether" || id.path().starts_with("/tether/")
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
        if reserved(&self.spiffe_id) {
            return Err(StoreError::Reserved(self.spiffe_id.to_string()));
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

/// A value bound to, or read from, a statement. The schema uses only TEXT and BIGINT, so
/// the same SQL runs on SQLite and PostgreSQL.
#[derive(Clone, Debug, PartialEq)]
enum Val {
    Text(String),
    Int(i64),
    Null,
}

impl From<&str> for Val {
    fn from(s: &str) -> Self {
        Val::Text(s.to_owned())
    }
}
impl From<String> for Val {
    fn from(s: String) -> Self {
        Val::Text(s)
    }
}
impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::Int(v)
    }
}
impl From<Option<String>> for Val {
    fn from(v: Option<String>) -> Self {
        v.map_or(Val::Null, Val::Text)
    }
}

impl Val {
    fn text(&self) -> Result<String, StoreError> {
        match self {
            Val::Text(s) => Ok(s.clone()),
            other => Err(StoreError::Corrupt(format!("expected text, found {other:?}"))),
        }
    }
    fn opt_text(&self) -> Option<String> {
        match self {
            Val::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
    fn int(&self) -> Result<i64, StoreError> {
        match self {
            Val::Int(v) => Ok(*v),
            other => Err(StoreError::Corrupt(format!("expected integer, found {other:?}"))),
        }
    }
}

type Row = Vec<Val>;

/// One open transaction on either database. Statements use `$1, $2, ...` placeholders.
enum Tx<'a> {
    Sqlite(rusqlite::Transaction<'a>),
    Postgres(postgres::Transaction<'a>),
}

fn sqlite_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
            StoreError::Duplicate(String::new())
        }
        _ => StoreError::Db(e.to_string()),
    }
}

fn pg_err(e: postgres::Error) -> StoreError {
    if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) {
        return StoreError::Duplicate(String::new());
    }
    StoreError::Db(e.to_string())
}

/// Binds `$1..$n` by name: SQLite numbers `$N` parameters by first appearance, not by N.
fn bind_sqlite(stmt: &mut rusqlite::CachedStatement<'_>, sql: &str, params: &[Val]) -> Result<(), StoreError> {
    for (i, p) in params.iter().enumerate() {
        let idx = stmt
            .parameter_index(&format!("${}", i + 1))
            .map_err(sqlite_err)?
            .ok_or_else(|| StoreError::Db(format!("no ${} in {sql}", i + 1)))?;
        match p {
            Val::Text(s) => stmt.raw_bind_parameter(idx, s),
            Val::Int(v) => stmt.raw_bind_parameter(idx, v),
            Val::Null => stmt.raw_bind_parameter(idx, rusqlite::types::Null),
        }
        .map_err(sqlite_err)?;
    }
    Ok(())
}

fn pg_params(params: &[Val]) -> Vec<Box<dyn postgres::types::ToSql + Sync>> {
    params
        .iter()
        .map(|p| -> Box<dyn postgres::types::ToSql + Sync> {
            match p {
                Val::Text(s) => Box::new(s.clone()),
                Val::Int(v) => Box::new(*v),
                Val::Null => Box::new(None::<String>),
            }
        })
        .collect()
}

impl Tx<'_> {
    fn rows(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>, StoreError> {
        match self {
            Tx::Sqlite(tx) => {
                let mut stmt = tx.prepare_cached(sql).map_err(sqlite_err)?;
                bind_sqlite(&mut stmt, sql, params)?;
                let ncols = stmt.column_count();
                let mut out = Vec::new();
                let mut rows = stmt.raw_query();
                while let Some(row) = rows.next().map_err(sqlite_err)? {
                    let mut vals = Vec::with_capacity(ncols);
                    for i in 0..ncols {
                        vals.push(match row.get::<_, rusqlite::types::Value>(i).map_err(sqlite_err)? {
                            rusqlite::types::Value::Text(s) => Val::Text(s),
                            rusqlite::types::Value::Integer(v) => Val::Int(v),
                            _ => Val::Null,
                        });
                    }
                    out.push(vals);
                }
                Ok(out)
            }
            Tx::Postgres(tx) => {
                let boxed = pg_params(params);
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = boxed.iter().map(|b| b.as_ref()).collect();
                let rows = tx.query(sql, &refs).map_err(pg_err)?;
                rows.iter()
                    .map(|row| {
                        (0..row.len())
                            .map(|i| {
                                Ok(match *row.columns()[i].type_() {
                                    postgres::types::Type::INT8 => {
                                        row.try_get::<_, Option<i64>>(i).map_err(pg_err)?.map_or(Val::Null, Val::Int)
                                    }
                                    postgres::types::Type::INT4 => row
                                        .try_get::<_, Option<i32>>(i)
                                        .map_err(pg_err)?
                                        .map_or(Val::Null, |v| Val::Int(v.into())),
                                    _ => row
                                        .try_get::<_, Option<String>>(i)
                                        .map_err(pg_err)?
                                        .map_or(Val::Null, Val::Text),
                                })
                            })
                            .collect()
                    })
                    .collect()
            }
        }
    }

    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64, StoreError> {
        match self {
            Tx::Sqlite(tx) => {
                let mut stmt = tx.prepare_cached(sql).map_err(sqlite_err)?;
                bind_sqlite(&mut stmt, sql, params)?;
                Ok(stmt.raw_execute().map_err(sqlite_err)? as u64)
            }
            Tx::Postgres(tx) => {
                let boxed = pg_params(params);
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = boxed.iter().map(|b| b.as_ref()).collect();
                tx.execute(sql, &refs).map_err(pg_err)
            }
        }
    }
}

enum Backend {
    Sqlite(Mutex<rusqlite::Connection>),
    Postgres(Mutex<postgres::Client>),
}

/// The registration store, on SQLite (embedded, default) or PostgreSQL.
pub struct Store {
    backend: Backend,
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    hex::encode(&b)
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS entries (id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, parent_id TEXT NOT NULL, selectors_key TEXT NOT NULL, body TEXT NOT NULL, UNIQUE (spiffe_id, parent_id, selectors_key))",
    "CREATE INDEX IF NOT EXISTS entries_parent ON entries(parent_id)",
    "CREATE TABLE IF NOT EXISTS join_tokens (digest TEXT PRIMARY KEY, expires_at BIGINT NOT NULL, node_id TEXT, used_at BIGINT)",
    "CREATE TABLE IF NOT EXISTS agents (spiffe_id TEXT PRIMARY KEY, attestor TEXT NOT NULL, attested_at BIGINT NOT NULL, svid_expires_at BIGINT NOT NULL, selectors TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS bans (spiffe_id TEXT PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS tpm_nodes (spiffe_id TEXT PRIMARY KEY, ek_hash TEXT NOT NULL UNIQUE, ak_public TEXT NOT NULL, ak_qualified_name TEXT NOT NULL, reset_count BIGINT NOT NULL, restart_count BIGINT NOT NULL, clock BIGINT NOT NULL, quoted_at BIGINT NOT NULL, revoked_reason TEXT)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS revision (id BIGINT PRIMARY KEY CHECK (id = 1), value BIGINT NOT NULL)",
    "INSERT INTO revision VALUES (1, 0) ON CONFLICT DO NOTHING",
    // Node tunnels (store/tunnel.rs): addresses and services as JSON arrays.
    "CREATE TABLE IF NOT EXISTS tunnel_nodes (spiffe_id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, addresses TEXT NOT NULL, services TEXT NOT NULL, updated_at BIGINT NOT NULL)",
];

/// Runs `f` where the synchronous PostgreSQL client may block: outside any async runtime, or
/// on a multi-threaded runtime's worker after telling it so.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl Store {
    /// Opens (creating) an SQLite store file; `:memory:` for tests.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = rusqlite::Connection::open(path).map_err(sqlite_err)?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;")
            .map_err(sqlite_err)?;
        for stmt in SCHEMA {
            conn.execute(stmt, []).map_err(sqlite_err)?;
        }
        Ok(Store { backend: Backend::Sqlite(Mutex::new(conn)) })
    }

    /// Connects to PostgreSQL (`host=... port=... user=... dbname=...`) and creates the
    /// schema if needed.
    pub fn connect_postgres(conninfo: &str) -> Result<Self, StoreError> {
        blocking(|| {
            let mut client = postgres::Client::connect(conninfo, postgres::NoTls).map_err(pg_err)?;
            for stmt in SCHEMA {
                client.batch_execute(stmt).map_err(pg_err)?;
            }
            Ok(Store { backend: Backend::Postgres(Mutex::new(client)) })
        })
    }

    /// Runs `f` in one transaction, committed only if it returns Ok.
    fn with_tx<T>(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(sqlite_err)?;
                let mut tx = Tx::Sqlite(tx);
                let out = f(&mut tx)?;
                let Tx::Sqlite(tx) = tx else { unreachable!() };
                tx.commit().map_err(sqlite_err)?;
                Ok(out)
            }
            Backend::Postgres(client) => blocking(|| {
                let mut client = client.lock().unwrap_or_else(|p| p.into_inner());
                let tx = client.transaction().map_err(pg_err)?;
                let mut tx = Tx::Postgres(tx);
                let out = f(&mut tx)?;
                let Tx::Postgres(tx) = tx else { unreachable!() };
                tx.commit().map_err(pg_err)?;
                Ok(out)
            }),
        }
    }

    fn next_revision(tx: &mut Tx<'_>) -> Result<i64, StoreError> {
        let rows = tx.rows("UPDATE revision SET value = value + 1 WHERE id = 1 RETURNING value", &[])?;
        rows.first().and_then(|r| r.first()).ok_or_else(|| StoreError::Corrupt("no revision row".into()))?.int()
    }

    fn write_entry(tx: &mut Tx<'_>, e: &Entry, insert: bool) -> Result<(), StoreError> {
        let body = serde_json::to_string(e).map_err(|x| StoreError::Corrupt(x.to_string()))?;
        let sql = if insert {
            "INSERT INTO entries (id, spiffe_id, parent_id, selectors_key, body) VALUES ($1, $2, $3, $4, $5)"
        } else {
            "UPDATE entries SET spiffe_id = $2, parent_id = $3, selectors_key = $4, body = $5 WHERE id = $1"
        };
        let params = [
            e.id.as_str().into(),
            e.spiffe_id.to_string().into(),
            e.parent_id.to_string().into(),
            e.selectors_key().into(),
            body.into(),
        ];
        match tx.exec(sql, &params) {
            Ok(0) => Err(StoreError::NoEntry(e.id.clone())),
            Ok(_) => Ok(()),
            Err(StoreError::Duplicate(_)) => Err(StoreError::Duplicate(e.spiffe_id.to_string())),
            Err(x) => Err(x),
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
        self.with_tx(|tx| match tx.exec("DELETE FROM entries WHERE id = $1", &[id.into()])? {
            0 => Err(StoreError::NoEntry(id.into())),
            _ => {
                Self::next_revision(tx)?;
                Ok(())
            }
        })
    }

    fn parse_all_entries(rows: Vec<Row>) -> Result<Vec<Entry>, StoreError> {
        rows.iter()
            .map(|r| serde_json::from_str(&r[0].text()?).map_err(|x| StoreError::Corrupt(x.to_string())))
            .collect()
    }

    /// Entries as the APIs see them: a row with a reserved SPIFFE ID (written before the
    /// reservation, or behind the server's back) is ignored; the server names each at
    /// start-up ([`Store::reserved_entries`]).
    fn parse_entries(rows: Vec<Row>) -> Result<Vec<Entry>, StoreError> {
        Ok(Self::parse_all_entries(rows)?.into_iter().filter(|e| !reserved(&e.spiffe_id)).collect())
    }

    /// The rows [`Store::parse_entries`] ignores, for the start-up audit.
    pub fn reserved_entries(&self) -> Result<Vec<Entry>, StoreError> {
        let rows = self.with_tx(|tx| tx.rows("SELECT body FROM entries ORDER BY spiffe_id, id", &[]))?;
        Ok(Self::parse_all_entries(rows)?.into_iter().filter(|e| reserved(&e.spiffe_id)).collect())
    }

    pub fn get_entry(&self, id: &str) -> Result<Entry, StoreError> {
        let rows = self.with_tx(|tx| tx.rows("SELECT body FROM entries WHERE id = $1", &[id.into()]))?;
        Self::parse_entries(rows)?.pop().ok_or_else(|| StoreError::NoEntry(id.into()))
    }

    /// All entries, optionally only those with this SPIFFE ID and/or parent.
    pub fn list_entries(&self, spiffe_id: Option<&str>, parent_id: Option<&str>) -> Result<Vec<Entry>, StoreError> {
        let params = [spiffe_id.map(str::to_owned).into(), parent_id.map(str::to_owned).into()];
        let rows = self.with_tx(|tx| {
            tx.rows(
                "SELECT body FROM entries WHERE (CAST($1 AS TEXT) IS NULL OR spiffe_id = $1) AND (CAST($2 AS TEXT) IS NULL OR parent_id = $2) ORDER BY spiffe_id, id",
                &params,
            )
        })?;
        Self::parse_entries(rows)
    }

    pub fn create_join_token(
        &self,
        digest: &str,
        expires_at: i64,
        node_id: Option<&SpiffeId>,
    ) -> Result<(), StoreError> {
        if let Some(id) = node_id.filter(|id| reserved(id)) {
            return Err(StoreError::Reserved(id.to_string()));
        }
        self.with_tx(|tx| {
            tx.exec(
                "INSERT INTO join_tokens (digest, expires_at, node_id) VALUES ($1, $2, $3)",
                &[digest.into(), expires_at.into(), node_id.map(ToString::to_string).into()],
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
            // Claiming the token is one statement, so two agents racing with it cannot both win.
            let claimed = tx.rows(
                "UPDATE join_tokens SET used_at = $2 WHERE digest = $1 AND used_at IS NULL AND expires_at > $2 RETURNING node_id",
                &[digest.into(), now.into()],
            )?;
            let Some(row) = claimed.first() else { return Err(StoreError::BadToken) };
            let id = match row[0].opt_text() {
                Some(s) => SpiffeId::parse(&s).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                None => default_id,
            };
            // A node ID chosen before /tether/ was reserved (the derived default lives there).
            if row[0].opt_text().is_some() && reserved(&id) {
                return Err(StoreError::Reserved(id.to_string()));
            }
            if !tx.rows("SELECT spiffe_id FROM bans WHERE spiffe_id = $1", &[id.to_string().into()])?.is_empty() {
                return Err(StoreError::Banned(id.to_string()));
            }
            let (out, svid_expires_at) = issue(&id)?;
            let selectors = serde_json::to_string(&[format!("join_token:{}", digest.get(..32).unwrap_or(digest))]).unwrap_or_default();
            tx.exec(
                "INSERT INTO agents (spiffe_id, attestor, attested_at, svid_expires_at, selectors) VALUES ($1, 'join_token', $2, $3, $4)
                 ON CONFLICT (spiffe_id) DO UPDATE SET attestor = excluded.attestor, attested_at = excluded.attested_at,
                 svid_expires_at = excluded.svid_expires_at, selectors = excluded.selectors",
                &[id.to_string().into(), now.into(), svid_expires_at.into(), selectors.into()],
            )?;
            Ok((id, out))
        })
    }

    pub fn get_agent(&self, id: &SpiffeId) -> Result<Agent, StoreError> {
        let rows = self.with_tx(|tx| {
            tx.rows(
                "SELECT spiffe_id, attestor, attested_at, svid_expires_at, selectors FROM agents WHERE spiffe_id = $1",
                &[id.to_string().into()],
            )
        })?;
        rows.first().map(row_agent).ok_or_else(|| StoreError::NoAgent(id.to_string()))?
    }

    pub fn renew_agent(&self, id: &SpiffeId, svid_expires_at: i64) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            match tx.exec(
                "UPDATE agents SET svid_expires_at = $2 WHERE spiffe_id = $1",
                &[id.to_string().into(), svid_expires_at.into()],
            )? {
                0 => Err(StoreError::NoAgent(id.to_string())),
                _ => Ok(()),
            }
        })
    }

    pub fn list_agents(&self) -> Result<Vec<Agent>, StoreError> {
        let rows = self.with_tx(|tx| {
            tx.rows(
                "SELECT spiffe_id, attestor, attested_at, svid_expires_at, selectors FROM agents ORDER BY spiffe_id",
                &[],
            )
        })?;
        rows.iter().map(row_agent).collect()
    }

    /// Removes an agent: its node SVID is no longer accepted and it must attest again.
    /// With `ban`, it never can again.
    pub fn evict_agent(&self, id: &SpiffeId, ban: bool) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            let n = tx.exec("DELETE FROM agents WHERE spiffe_id = $1", &[id.to_string().into()])?;
            if ban {
                tx.exec("INSERT INTO bans VALUES ($1) ON CONFLICT DO NOTHING", &[id.to_string().into()])?;
            } else if n == 0 {
                return Err(StoreError::NoAgent(id.to_string()));
            }
            Ok(())
        })
    }

    pub fn load_ca(&self) -> Result<Option<CaState>, StoreError> {
        let rows = self.with_tx(|tx| tx.rows("SELECT value FROM meta WHERE key = 'ca'", &[]))?;
        rows.first()
            .map(|r| serde_json::from_str(&r[0].text()?).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    pub fn save_ca(&self, ca: &CaState) -> Result<(), StoreError> {
        let v = serde_json::to_string(ca).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.with_tx(|tx| {
            tx.exec("INSERT INTO meta (key, value) VALUES ('ca', $1) ON CONFLICT (key) DO UPDATE SET value = excluded.value", &[v.into()])?;
            Ok(())
        })
    }
}

/// What the store keeps of a TPM-attested node beyond its agent row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpmNode {
    pub ek_hash: String,
    pub ak: AkRecord,
    pub clock: ClockState,
    pub quoted_at: i64,
    /// Why its last evidence was refused (it is then no longer an agent).
    pub revoked_reason: Option<String>,
}

fn unhex(s: &str) -> Result<Vec<u8>, StoreError> {
    hex::decode(s).ok_or_else(|| StoreError::Corrupt("an AK column is not hex".into()))
}

fn row_tpm(r: &Row) -> Result<TpmNode, StoreError> {
    let int32 = |v: &Val| v.int().and_then(|i| u32::try_from(i).map_err(|_| StoreError::Corrupt("counter".into())));
    Ok(TpmNode {
        ek_hash: r[0].text()?,
        ak: AkRecord { public: unhex(&r[1].text()?)?, qualified_name: unhex(&r[2].text()?)? },
        clock: ClockState {
            reset_count: int32(&r[3])?,
            restart_count: int32(&r[4])?,
            clock: u64::try_from(r[5].int()?).map_err(|_| StoreError::Corrupt("clock".into()))?,
        },
        quoted_at: r[6].int()?,
        revoked_reason: r[7].opt_text(),
    })
}

/// A TPM node as a first attestation registers it.
#[derive(Clone, Copy)]
pub struct TpmRegistration<'a> {
    pub id: &'a SpiffeId,
    pub ek_hash: &'a str,
    pub ak: &'a AkRecord,
    pub quote: &'a QuoteInfo,
    pub selectors: &'a [String],
}

/// reset_count, restart_count, clock of a quote, as stored.
fn clock_values(q: &QuoteInfo) -> [Val; 3] {
    [
        i64::from(q.reset_count).into(),
        i64::from(q.restart_count).into(),
        i64::try_from(q.clock).unwrap_or(i64::MAX).into(),
    ]
}

const TPM_COLUMNS: &str =
    "ek_hash, ak_public, ak_qualified_name, reset_count, restart_count, clock, quoted_at, revoked_reason";

impl Store {
    /// Fails closed: a database error counts as banned.
    pub fn is_banned(&self, id: &SpiffeId) -> bool {
        self.with_tx(|tx| tx.rows("SELECT spiffe_id FROM bans WHERE spiffe_id = $1", &[id.to_string().into()]))
            .map(|r| !r.is_empty())
            .unwrap_or(true)
    }

    fn tpm_where(tx: &mut Tx<'_>, column: &str, value: &str) -> Result<Option<TpmNode>, StoreError> {
        let rows = tx.rows(&format!("SELECT {TPM_COLUMNS} FROM tpm_nodes WHERE {column} = $1"), &[value.into()])?;
        rows.first().map(row_tpm).transpose()
    }

    /// The stored TPM state where `column` is `value`, if any, after refusing `quote` unless
    /// its clock comes after that state's.
    fn tpm_before(
        tx: &mut Tx<'_>,
        column: &str,
        value: &str,
        quote: &QuoteInfo,
    ) -> Result<Option<TpmNode>, StoreError> {
        let prev = Self::tpm_where(tx, column, value)?;
        if let Some(p) = &prev {
            check_clock(&p.clock, quote).map_err(|e| StoreError::Refused(format!("TPM clock: {e}")))?;
        }
        Ok(prev)
    }

    /// The TPM state recorded for an EK (by hash), attested now or before.
    pub fn tpm_by_ek(&self, ek_hash: &str) -> Result<Option<TpmNode>, StoreError> {
        self.with_tx(|tx| Self::tpm_where(tx, "ek_hash", ek_hash))
    }

    pub fn tpm_node(&self, id: &SpiffeId) -> Result<Option<TpmNode>, StoreError> {
        self.with_tx(|tx| Self::tpm_where(tx, "spiffe_id", &id.to_string()))
    }

    /// Registers a TPM-attested node in one transaction: ban check, the clock check again
    /// (two attestations of one TPM may race), its TPM state, its agent row; `issue` runs
    /// inside and nothing is stored if it fails.
    pub fn attest_with_tpm<T>(
        &self,
        node: &TpmRegistration<'_>,
        now: i64,
        issue: impl FnOnce() -> Result<(T, i64), StoreError>,
    ) -> Result<T, StoreError> {
        let TpmRegistration { id, ek_hash, ak, quote, selectors } = *node;
        self.with_tx(|tx| {
            if !tx.rows("SELECT spiffe_id FROM bans WHERE spiffe_id = $1", &[id.to_string().into()])?.is_empty() {
                return Err(StoreError::Banned(id.to_string()));
            }
            Self::tpm_before(tx, "ek_hash", ek_hash, quote)?;
            let (out, svid_expires_at) = issue()?;
            let [reset, restart, clock] = clock_values(quote);
            tx.exec(
                "INSERT INTO tpm_nodes (spiffe_id, ek_hash, ak_public, ak_qualified_name, reset_count, restart_count, clock, quoted_at, revoked_reason)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL)
                 ON CONFLICT (spiffe_id) DO UPDATE SET ak_public = excluded.ak_public, ak_qualified_name = excluded.ak_qualified_name,
                 reset_count = excluded.reset_count, restart_count = excluded.restart_count, clock = excluded.clock,
                 quoted_at = excluded.quoted_at, revoked_reason = NULL",
                &[
                    id.to_string().into(),
                    ek_hash.into(),
                    hex::encode(&ak.public).into(),
                    hex::encode(&ak.qualified_name).into(),
                    reset,
                    restart,
                    clock,
                    now.into(),
                ],
            )?;
            let selectors = serde_json::to_string(selectors).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.exec(
                "INSERT INTO agents (spiffe_id, attestor, attested_at, svid_expires_at, selectors) VALUES ($1, 'tpm', $2, $3, $4)
                 ON CONFLICT (spiffe_id) DO UPDATE SET attestor = excluded.attestor, attested_at = excluded.attested_at,
                 svid_expires_at = excluded.svid_expires_at, selectors = excluded.selectors",
                &[id.to_string().into(), now.into(), svid_expires_at.into(), selectors.into()],
            )?;
            Ok(out)
        })
    }

    /// A re-attestation passed: the newer clock, and the selectors (the golden set matched
    /// can change during a rollout). Refused if the clock is not newer than the stored one.
    pub fn record_quote(
        &self,
        id: &SpiffeId,
        quote: &QuoteInfo,
        selectors: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            Self::tpm_before(tx, "spiffe_id", &id.to_string(), quote)?.ok_or_else(|| StoreError::NoAgent(id.to_string()))?;
            let [reset, restart, clock] = clock_values(quote);
            tx.exec(
                "UPDATE tpm_nodes SET reset_count = $2, restart_count = $3, clock = $4, quoted_at = $5 WHERE spiffe_id = $1",
                &[id.to_string().into(), reset, restart, clock, now.into()],
            )?;
            let selectors = serde_json::to_string(selectors).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            match tx.exec("UPDATE agents SET selectors = $2 WHERE spiffe_id = $1", &[id.to_string().into(), selectors.into()])? {
                0 => Err(StoreError::NoAgent(id.to_string())),
                _ => Ok(()),
            }
        })
    }

    /// Evidence failed: the node is no longer an agent (its node SVID is refused, nothing is
    /// issued under it) until it attests again with evidence that passes.
    pub fn revoke_tpm(&self, id: &SpiffeId, reason: &str) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            tx.exec("DELETE FROM agents WHERE spiffe_id = $1", &[id.to_string().into()])?;
            tx.exec(
                "UPDATE tpm_nodes SET revoked_reason = $2 WHERE spiffe_id = $1",
                &[id.to_string().into(), reason.into()],
            )?;
            Ok(())
        })
    }
}

fn row_agent(r: &Row) -> Result<Agent, StoreError> {
    Ok(Agent {
        spiffe_id: SpiffeId::parse(&r[0].text()?).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        attestor: r[1].text()?,
        attested_at: r[2].int()?,
        svid_expires_at: r[3].int()?,
        selectors: serde_json::from_str(&r[4].text()?).map_err(|e| StoreError::Corrupt(e.to_string()))?,
    })
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

    /// SQLite in memory, and PostgreSQL (a fresh schema) when `TETHER_TEST_POSTGRES` names a
    /// server: `cargo xtask test` starts one on loopback and always sets it.
    fn stores() -> Vec<(&'static str, Store)> {
        let mut out = vec![("sqlite", Store::open(Path::new(":memory:")).unwrap())];
        match std::env::var("TETHER_TEST_POSTGRES") {
            Ok(base) => {
                let schema = format!("t_{}", random_id());
                let mut admin = postgres::Client::connect(&base, postgres::NoTls).unwrap();
                admin.batch_execute(&format!("CREATE SCHEMA {schema}")).unwrap();
                out.push((
                    "postgres",
                    Store::connect_postgres(&format!("{base} options='-c search_path={schema}'")).unwrap(),
                ));
            }
            Err(_) => {
                eprintln!("store tests: PostgreSQL skipped (TETHER_TEST_POSTGRES is not set; cargo xtask test sets it)")
            }
        }
        out
    }

    fn entry_crud_and_duplicates(s: &Store) {
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
        s.create_entry(entry("spiffe://td/other", "spiffe://td/node2", &["unix:uid:0"]), "td").unwrap();
        assert_eq!(s.list_entries(None, Some("spiffe://td/node")).unwrap().len(), 1, "the parent filter filters");
        assert_eq!(s.list_entries(Some("spiffe://td/other"), None).unwrap().len(), 1);
        assert_eq!(s.list_entries(None, None).unwrap().len(), 2);
        s.delete_entry(&e.id).unwrap();
        assert!(matches!(s.delete_entry(&e.id), Err(StoreError::NoEntry(_))));
    }

    fn batch_creation_is_all_or_nothing(s: &Store) {
        let good = entry("spiffe://td/a", "spiffe://td/n", &["unix:uid:1"]);
        let dup = entry("spiffe://td/a", "spiffe://td/n", &["unix:uid:1"]);
        assert!(matches!(s.create_entries(vec![good.clone(), dup], "td"), Err(StoreError::Duplicate(_))));
        assert!(s.list_entries(None, None).unwrap().is_empty());
        assert_eq!(
            s.create_entries(vec![good, entry("spiffe://td/b", "spiffe://td/n", &["unix:uid:2"])], "td").unwrap().len(),
            2
        );
    }

    fn invalid_entries_name_the_problem(s: &Store) {
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

    fn reserved_ids_are_refused_and_old_rows_ignored(s: &Store) {
        for id in ["spiffe://td/tether/server", "spiffe://td/tether/agent/tpm/ab", "spiffe://td/tether"] {
            let err = s.create_entry(entry(id, "spiffe://td/tether/server", &["unix:uid:0"]), "td").unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("{id} is reserved: IDs under /tether/ name the server and the nodes it attests, and cannot be registered")
            );
            let err = s.create_join_token("d", 1000, Some(&SpiffeId::parse(id).unwrap())).unwrap_err();
            assert!(matches!(err, StoreError::Reserved(_)), "{err}");
        }
        // Parents there are fine (node IDs, the server for node aliases); so are look-alikes.
        let ok = s.create_entry(entry("spiffe://td/tetherx/a", "spiffe://td/tether/server", &["unix:uid:0"]), "td");
        let ok = ok.unwrap();
        let mut moved = ok.clone();
        moved.spiffe_id = SpiffeId::parse("spiffe://td/tether/agent/x").unwrap();
        assert!(matches!(s.update_entry(moved, "td"), Err(StoreError::Reserved(_))));
        // A row written before the reservation: not served, but named for the audit.
        let mut old = entry("spiffe://td/tether/server", "spiffe://td/tether/agent/tpm/ab", &["unix:uid:0"]);
        old.id = "old".into();
        s.with_tx(|tx| Store::write_entry(tx, &old, true)).unwrap();
        assert_eq!(s.list_entries(None, None).unwrap(), vec![ok.clone()]);
        assert!(s.list_entries(None, Some("spiffe://td/tether/agent/tpm/ab")).unwrap().is_empty());
        assert!(matches!(s.get_entry("old"), Err(StoreError::NoEntry(_))));
        assert_eq!(s.reserved_entries().unwrap(), vec![old]);
        // It can still be deleted by its ID.
        s.delete_entry("old").unwrap();
        assert!(s.reserved_entries().unwrap().is_empty());
        // A join token naming such a node ID, stored before the reservation, attests nothing
        // (and stays unused); the server's own derived IDs there are fine.
        let server = SpiffeId::parse("spiffe://td/tether/server").unwrap();
        s.with_tx(|tx| {
            tx.exec(
                "INSERT INTO join_tokens (digest, expires_at, node_id) VALUES ($1, $2, $3)",
                &["old-token".into(), 1000.into(), server.to_string().into()],
            )
        })
        .unwrap();
        let derived = SpiffeId::parse("spiffe://td/tether/agent/join_token/ab").unwrap();
        let r = s.attest_with_token("old-token", 1, derived.clone(), |_| Ok(((), 9)));
        assert!(matches!(r, Err(StoreError::Reserved(_))), "{r:?}");
        assert!(s.list_agents().unwrap().is_empty());
        s.create_join_token("new-token", 1000, None).unwrap();
        assert_eq!(s.attest_with_token("new-token", 1, derived.clone(), |_| Ok(((), 9))).unwrap().0, derived);
    }

    fn join_tokens_are_one_time_and_expire_and_failures_burn_nothing(s: &Store) {
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

    fn banned_nodes_cannot_attest_again(s: &Store) {
        let id = SpiffeId::parse("spiffe://td/node/a").unwrap();
        s.create_join_token("d1", 1000, Some(&id)).unwrap();
        s.attest_with_token("d1", 1, SpiffeId::parse("spiffe://td/x").unwrap(), |_| Ok(((), 9))).unwrap();
        s.evict_agent(&id, true).unwrap();
        assert!(matches!(s.get_agent(&id), Err(StoreError::NoAgent(_))));
        s.create_join_token("d2", 1000, Some(&id)).unwrap();
        assert!(matches!(s.attest_with_token("d2", 1, id.clone(), |_| Ok(((), 9))), Err(StoreError::Banned(_))));
    }
    fn tpm_nodes_keep_their_clock_and_lose_service_on_revocation(s: &Store) {
        use tether_attestors::tpm::wire::PcrSelection;
        let id = SpiffeId::parse("spiffe://td/tether/agent/tpm/ab").unwrap();
        let ak = AkRecord { public: vec![1, 2, 3], qualified_name: vec![0, 11, 9] };
        let quote = |reset, clock| QuoteInfo {
            clock,
            reset_count: reset,
            restart_count: 0,
            safe: true,
            firmware_version: 0,
            selection: PcrSelection::new(),
        };
        let sel = vec!["tpm:ek-hash:ab".to_owned(), "tpm:policy:v1".to_owned()];
        let attest = |q: QuoteInfo, now: i64| {
            s.attest_with_tpm(
                &TpmRegistration { id: &id, ek_hash: "ab", ak: &ak, quote: &q, selectors: &sel },
                now,
                || Ok(((), 99)),
            )
        };
        attest(quote(2, 100), 10).unwrap();
        let node = s.tpm_node(&id).unwrap().unwrap();
        assert_eq!((node.ak.clone(), node.clock.clock, node.quoted_at), (ak.clone(), 100, 10));
        assert_eq!(s.tpm_by_ek("ab").unwrap().unwrap().clock.reset_count, 2);
        assert_eq!(s.get_agent(&id).unwrap().attestor, "tpm");
        // An older quote is refused inside the transaction, and changes nothing.
        let e = s.record_quote(&id, &quote(2, 50), &sel, 20).unwrap_err().to_string();
        assert!(e.contains("TPM clock"), "{e}");
        let e = attest(quote(1, 500), 20).unwrap_err();
        assert!(matches!(e, StoreError::Refused(_)), "{e}");
        assert_eq!(s.tpm_node(&id).unwrap().unwrap().quoted_at, 10);
        // A newer one moves it and updates the node's selectors.
        let sel2 = vec!["tpm:ek-hash:ab".to_owned(), "tpm:policy:v2".to_owned()];
        s.record_quote(&id, &quote(3, 5), &sel2, 30).unwrap();
        assert_eq!(s.get_agent(&id).unwrap().selectors, sel2);
        // Revoked: no longer an agent, the reason kept; a ban is seen by is_banned.
        s.revoke_tpm(&id, "PCR 7 drifted").unwrap();
        assert!(matches!(s.get_agent(&id), Err(StoreError::NoAgent(_))));
        assert_eq!(s.tpm_node(&id).unwrap().unwrap().revoked_reason.as_deref(), Some("PCR 7 drifted"));
        assert!(!s.is_banned(&id));
        s.evict_agent(&id, true).unwrap();
        assert!(s.is_banned(&id));
        let e = attest(quote(9, 1), 40).unwrap_err();
        assert!(matches!(e, StoreError::Banned(_)), "{e}");
    }

    use super::tunnel::tests::tunnels_are_listed_only_for_attested_nodes_and_addresses_are_unique;

    /// A `#[test]` running `$name(&Store)` on every backend.
    macro_rules! on_every_backend {
        ($($name:ident),*) => {$(
            #[test]
            fn $name() {
                for (backend, store) in stores() {
                    eprintln!("{}: {backend}", stringify!($name));
                    super::$name(&store);
                }
            }
        )*};
    }

    mod every_backend {
        use super::stores;
        on_every_backend!(
            entry_crud_and_duplicates,
            batch_creation_is_all_or_nothing,
            invalid_entries_name_the_problem,
            reserved_ids_are_refused_and_old_rows_ignored,
            join_tokens_are_one_time_and_expire_and_failures_burn_nothing,
            banned_nodes_cannot_attest_again,
            tpm_nodes_keep_their_clock_and_lose_service_on_revocation
        );
        on_every_backend!(tunnels_are_listed_only_for_attested_nodes_and_addresses_are_unique);
    }
}
