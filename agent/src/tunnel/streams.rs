//! Every tunnel stream this node carries, while it lives and when it ends: who to whom
//! (SPIFFE IDs and nodes), the original destination, bytes each way, duration, why it
//! closed. One JSON line per stream (and per refusal) in the stream log, counts in
//! `tunnel-metrics.prom`, and a handle to close each one when it is no longer allowed.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    net::SocketAddrV4,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Instant, SystemTime},
};

use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    /// A local workload to a remote one.
    Outbound,
    /// A remote workload to a local one.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Who a stream connects, fixed when it opens.
#[derive(Clone, Debug)]
pub struct Parties {
    pub direction: Direction,
    pub src_id: String,
    pub dst_id: String,
    pub src_node: String,
    pub dst_node: String,
    /// What the client application dialled.
    pub orig_dst: SocketAddrV4,
    /// Kernel identity numbers (source, destination) the stream was allowed for.
    pub src_number: u32,
    pub dst_number: u32,
    /// Inbound: (the tunnel's socket to the workload, the workload's address) as the
    /// workload sees its connection (peer, local): what a peer query names.
    pub local_tuple: Option<(SocketAddrV4, SocketAddrV4)>,
}

pub struct Stream {
    pub id: u64,
    pub parties: Parties,
    started: Instant,
    started_unix: f64,
    /// Bytes from the client application to the server application, and back.
    pub up: AtomicU64,
    pub down: AtomicU64,
    close: watch::Sender<Option<String>>,
}

impl Stream {
    /// Asks the stream to close (it ends with this reason unless it already ended).
    pub fn close(&self, reason: String) {
        self.close.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }
}

#[derive(Default)]
struct Counts {
    /// (direction, close reason class) -> streams.
    closed: BTreeMap<(Direction, &'static str), u64>,
    /// (direction, refusal reason) -> refused stream requests.
    refused: BTreeMap<(Direction, String), u64>,
    bytes: BTreeMap<(Direction, &'static str), u64>,
    connections: BTreeMap<&'static str, u64>,
}

pub struct Streams {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Stream>>>,
    counts: Mutex<Counts>,
    log: Mutex<Option<std::fs::File>>,
    metrics: PathBuf,
    written: Mutex<String>,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The class of a close reason, for metrics (reasons themselves carry details).
fn class(reason: &str) -> &'static str {
    match reason.split(':').next().unwrap_or_default() {
        "closed" => "closed",
        "reset by peer" => "reset_by_peer",
        "reset by application" => "reset_by_application",
        "revoked" => "revoked",
        "tunnel lost" => "tunnel_lost",
        _ => "error",
    }
}

impl Streams {
    pub fn new(log: PathBuf, metrics: PathBuf) -> Self {
        if let Some(dir) = log.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let file = match std::fs::OpenOptions::new().create(true).append(true).open(&log) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!(path = %log.display(), "tunnel stream log unavailable: {e}");
                None
            }
        };
        Streams {
            next: AtomicU64::new(1),
            live: Mutex::default(),
            counts: Mutex::default(),
            log: Mutex::new(file),
            metrics,
            written: Mutex::default(),
        }
    }

    fn line(&self, value: serde_json::Value) {
        tracing::info!(target: "tether_agent::tunnel", "{value}");
        if let Some(f) = self.log.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let _ = writeln!(f, "{value}");
        }
    }

    /// A stream opens; the receiver says when (and why) to close it.
    pub fn open(&self, parties: Parties) -> (Arc<Stream>, watch::Receiver<Option<String>>) {
        let (tx, rx) = watch::channel(None);
        let s = Arc::new(Stream {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            parties,
            started: Instant::now(),
            started_unix: unix_now(),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            close: tx,
        });
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(s.id, s.clone());
        (s, rx)
    }

    /// A stream ended: logged and counted.
    pub fn finish(&self, s: &Stream, reason: &str) {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&s.id);
        let (up, down) = (s.up.load(Ordering::Relaxed), s.down.load(Ordering::Relaxed));
        let p = &s.parties;
        {
            let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            *c.closed.entry((p.direction, class(reason))).or_default() += 1;
            *c.bytes.entry((p.direction, "up")).or_default() += up;
            *c.bytes.entry((p.direction, "down")).or_default() += down;
        }
        self.line(serde_json::json!({
            "time": unix_now(),
            "event": "tunnel_stream",
            "stream": s.id,
            "direction": p.direction.as_str(),
            "src_spiffe_id": p.src_id,
            "dst_spiffe_id": p.dst_id,
            "src_node": p.src_node,
            "dst_node": p.dst_node,
            "original_dst": p.orig_dst.to_string(),
            "bytes_up": up,
            "bytes_down": down,
            "started": s.started_unix,
            "duration_s": s.started.elapsed().as_secs_f64(),
            "close_reason": reason,
        }));
    }

    /// A stream opened but never carried (its request was refused after all): forgotten
    /// without a stream line (the refusal is logged).
    pub fn discard(&self, s: &Stream) {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&s.id);
    }

    /// A stream request refused before it carried anything.
    pub fn refuse(&self, direction: Direction, reason: &str, details: serde_json::Value) {
        let key = reason.split(':').next().unwrap_or_default().to_owned();
        *self.counts.lock().unwrap_or_else(|p| p.into_inner()).refused.entry((direction, key)).or_default() += 1;
        let mut v = serde_json::json!({
            "time": unix_now(),
            "event": "tunnel_refused",
            "direction": direction.as_str(),
            "reason": reason,
        });
        if let (Some(obj), serde_json::Value::Object(more)) = (v.as_object_mut(), details) {
            obj.extend(more);
        }
        self.line(v);
    }

    /// A TLS connection between nodes opened (`outbound`/`inbound`) or failed.
    pub fn connection(&self, what: &'static str) {
        *self.counts.lock().unwrap_or_else(|p| p.into_inner()).connections.entry(what).or_default() += 1;
    }

    pub fn live(&self) -> Vec<Arc<Stream>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Closes every live stream `verdict` refuses now (with its reason).
    pub fn recheck(&self, verdict: impl Fn(&Parties) -> Option<String>) -> usize {
        let mut n = 0;
        for s in self.live() {
            if let Some(why) = verdict(&s.parties) {
                s.close(format!("revoked: {why}"));
                n += 1;
            }
        }
        n
    }

    /// The inbound stream whose connection to a workload is (peer, local) as the workload
    /// sees it.
    pub fn by_tuple(&self, peer: SocketAddrV4, local: SocketAddrV4) -> Option<Arc<Stream>> {
        self.live().into_iter().find(|s| s.parties.local_tuple == Some((peer, local)))
    }

    /// `tunnel-metrics.prom`, rewritten when a count changed.
    pub fn write_metrics(&self) {
        let live = self.live();
        let mut text = String::from(
            "# HELP tether_tunnel_streams_total Tunnel streams ended, by direction and close reason.\n\
             # TYPE tether_tunnel_streams_total counter\n",
        );
        let c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for ((d, r), n) in &c.closed {
            text.push_str(&format!("tether_tunnel_streams_total{{direction=\"{}\",reason=\"{r}\"}} {n}\n", d.as_str()));
        }
        text.push_str("# HELP tether_tunnel_refused_total Tunnel stream requests refused, by direction and reason.\n# TYPE tether_tunnel_refused_total counter\n");
        for ((d, r), n) in &c.refused {
            text.push_str(&format!("tether_tunnel_refused_total{{direction=\"{}\",reason=\"{r}\"}} {n}\n", d.as_str()));
        }
        text.push_str("# HELP tether_tunnel_bytes_total Application bytes carried by ended streams.\n# TYPE tether_tunnel_bytes_total counter\n");
        for ((d, w), n) in &c.bytes {
            text.push_str(&format!("tether_tunnel_bytes_total{{direction=\"{}\",way=\"{w}\"}} {n}\n", d.as_str()));
        }
        text.push_str("# HELP tether_tunnel_connections_total TLS connections between nodes.\n# TYPE tether_tunnel_connections_total counter\n");
        for (w, n) in &c.connections {
            text.push_str(&format!("tether_tunnel_connections_total{{event=\"{w}\"}} {n}\n"));
        }
        drop(c);
        for d in [Direction::Outbound, Direction::Inbound] {
            let n = live.iter().filter(|s| s.parties.direction == d).count();
            text.push_str(&format!("tether_tunnel_streams_active{{direction=\"{}\"}} {n}\n", d.as_str()));
        }
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if *written == text {
            return;
        }
        let tmp = self.metrics.with_extension("tmp");
        if std::fs::write(&tmp, &text).and_then(|_| std::fs::rename(&tmp, &self.metrics)).is_ok() {
            *written = text;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_logged_counted_and_closed_once() {
        let dir = tempfile::tempdir().unwrap();
        let streams = Streams::new(dir.path().join("s.jsonl"), dir.path().join("m.prom"));
        let parties = Parties {
            direction: Direction::Inbound,
            src_id: "spiffe://td/web".into(),
            dst_id: "spiffe://td/api".into(),
            src_node: "spiffe://td/node/a".into(),
            dst_node: "spiffe://td/node/b".into(),
            orig_dst: "10.0.0.2:8443".parse().unwrap(),
            src_number: 1,
            dst_number: 2,
            local_tuple: Some(("10.0.0.2:40000".parse().unwrap(), "10.0.0.2:8443".parse().unwrap())),
        };
        let (s, mut rx) = streams.open(parties);
        assert!(streams.by_tuple("10.0.0.2:40000".parse().unwrap(), "10.0.0.2:8443".parse().unwrap()).is_some());
        assert_eq!(streams.recheck(|p| (p.src_id == "spiffe://td/web").then(|| "policy".into())), 1);
        s.close("second reason".into());
        assert_eq!(rx.borrow_and_update().as_deref(), Some("revoked: policy"), "the first reason stays");
        s.up.store(10, Ordering::Relaxed);
        streams.finish(&s, "revoked: policy");
        streams.refuse(Direction::Outbound, "policy: no rule", serde_json::json!({"src_spiffe_id": "x"}));
        streams.write_metrics();
        let log = std::fs::read_to_string(dir.path().join("s.jsonl")).unwrap();
        assert!(log.contains("\"close_reason\":\"revoked: policy\"") && log.contains("\"bytes_up\":10"), "{log}");
        assert!(log.contains("\"event\":\"tunnel_refused\"") && log.contains("\"src_spiffe_id\":\"x\""), "{log}");
        let m = std::fs::read_to_string(dir.path().join("m.prom")).unwrap();
        assert!(m.contains("tether_tunnel_streams_total{direction=\"inbound\",reason=\"revoked\"} 1"), "{m}");
        assert!(m.contains("tether_tunnel_refused_total{direction=\"outbound\",reason=\"policy\"} 1"), "{m}");
        assert!(m.contains("tether_tunnel_streams_active{direction=\"inbound\"} 0"), "{m}");
    }
}
