//! Node tunnels through the real agents: three hosts (network namespaces on one bridge),
//! an agent each with enforcement and a tunnel, one server. Cross-node flows between
//! protected workloads are HTTP/2 CONNECT streams over mutual TLS with the workloads' SVIDs;
//! every outcome is asserted at the receiver (and on the wire).

use std::time::Instant;

use tether_tests::tunnels::{mesh, streams, tls_records, Capture, Mesh, ADDRS};

const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";

/// web (on a) may reach api (on b) on 8443 and 9443; both ends hold the rule.
const POLICY: &str = r#"
[[rule]]
name = "web-to-api"
from = { spiffe_id = "spiffe://example.org/web" }
to = { spiffe_id = "spiffe://example.org/api" }
ports = [8443, 8444, 9443]
"#;

fn field(line: &str, i: usize) -> &str {
    line.split_whitespace().nth(i).unwrap_or_default()
}

#[test]
fn bulk_both_ways_many_streams_source_identity_and_only_tls_on_the_wire() {
    let mut m: Mesh = mesh(["a", "b", "c"]);
    let web = m.hosts[0].root.child("web").unwrap();
    let api = m.hosts[1].root.child("api").unwrap();
    m.register(0, &web, WEB, &[]);
    m.register(1, &api, API, &[]);
    for h in &m.hosts {
        h.policy(POLICY);
    }
    for h in &mut m.hosts {
        h.start_agent();
    }
    const REPLY: u64 = 3 << 20;
    let bulk = m.hosts[1].spawn(&api, &["bulk-serve", "8443", &REPLY.to_string()]);
    bulk.wait_line("listening");
    let peers = m.hosts[1].spawn(&api, &["echo-serve", "9443", &m.peer_socket(1)]);
    peers.wait_line("listening");
    let small = m.hosts[1].spawn(&api, &["bulk-serve", "8444", "65536"]);
    small.wait_line("listening");
    m.hosts[1].wait_identity(API);
    m.wait_capture(0, 3);
    let warm = m.hosts[0].spawn(&web, &["echo-serve", "7000"]);
    warm.wait_line("listening");
    m.hosts[0].wait_identity(WEB);

    // Bulk both ways with half-close, byte-exact, while the link is captured.
    let capture = Capture::start(&m.hosts[0].ns, &m.links[0]);
    const SENT: u64 = 8 << 20;
    let out = m.hosts[0].run(&web, &["bulk-send", ADDRS[1], "8443", &SENT.to_string()]);
    let canary = m.hosts[0].run(&web, &["send", ADDRS[1], "9443", "tether-plaintext-canary", "1", "0"]);
    assert!(canary.contains("sent"), "{canary}");
    peers.wait_line("data tether-plaintext-canary");
    let packets = capture.finish();
    let line = |p: &str| out.lines().find(|l| l.starts_with(p)).unwrap_or_default().to_owned();
    assert_eq!(
        line("peername"),
        format!("peername {}:8443", ADDRS[1]),
        "getpeername shows what was dialled: {out}\nA:\n{}",
        m.hosts[0].log()
    );
    let (sent, recv) = (line("sent"), line("recv"));
    assert_eq!(field(&sent, 1), SENT.to_string(), "{out}");
    let at_api_recv = bulk.wait_line("recv");
    let at_api_sent = bulk.wait_line("sent");
    assert_eq!(at_api_recv, format!("recv {SENT} {}", field(&sent, 2)), "api received exactly what web sent");
    assert_eq!(recv, format!("recv {REPLY} {}", field(&at_api_sent, 2)), "web received exactly what api sent");

    // On the wire between the nodes: TCP to or from port 15008 only, TLS records only, and
    // never the application's bytes.
    let between: Vec<_> = packets
        .iter()
        .filter(|p| [p.src.ip(), p.dst.ip()].iter().all(|a| ADDRS.contains(&a.to_string().as_str())))
        .collect();
    assert!(between.len() > 100, "captured {} packets", between.len());
    for p in &between {
        assert!(p.src.port() == 15008 || p.dst.port() == 15008, "a packet not to the tunnel port: {p:?}");
        assert!(!p.payload.windows(23).any(|w| w == b"tether-plaintext-canary"), "application bytes on the wire");
    }
    let flows = streams(&packets);
    assert!(!flows.is_empty(), "no tunnel connection opened while capturing");
    let mut records = 0;
    for ((src, dst), bytes) in &flows {
        records += tls_records(bytes).unwrap_or_else(|e| panic!("{src} -> {dst}: {e}"));
    }
    assert!(records > 100, "{records} TLS records");

    // The destination learns who connected: the tunnel stream's source identity and node.
    let out = m.hosts[0].run(&web, &["send", ADDRS[1], "9443", "who-am-i", "1", "0"]);
    assert!(out.contains("sent"), "{out}");
    let who = peers.wait_line("peer-id");
    assert!(who.contains(&format!("\"spiffe_id\":\"{WEB}\"")) && who.contains("node/a"), "{who}");
    peers.wait_line("data who-am-i");

    // 100 streams at once between the two nodes.
    let started = Instant::now();
    let out = m.hosts[0].run(&web, &["bulk-many", ADDRS[1], "8444", "100", "65536", "65536"]);
    eprintln!("100 streams in {:?}", started.elapsed());
    assert!(out.contains("done ok 100 fail 0"), "{out}\nA:\n{}\nB:\n{}", m.hosts[0].log(), m.hosts[1].log());

    // Every stream is logged with identities, nodes, destination, bytes, duration, reason.
    let log = m.stream_log(1);
    let first = log.lines().find(|l| l.contains("\"event\":\"tunnel_stream\"")).unwrap_or_default();
    for key in [
        "\"src_spiffe_id\":\"spiffe://example.org/web\"",
        "\"dst_spiffe_id\":\"spiffe://example.org/api\"",
        "\"src_node\":\"spiffe://example.org/node/a\"",
        "\"original_dst\":\"10.78.0.2:8443\"",
        "\"bytes_up\":8388608",
        "\"close_reason\":\"closed\"",
    ] {
        assert!(log.contains(key), "{key} not in the stream log:\n{first}");
    }
    let metrics = std::fs::read_to_string(m.hosts[0].dir.join("data/tunnel-metrics.prom")).unwrap_or_default();
    assert!(metrics.contains("tether_tunnel_streams_total{direction=\"outbound\",reason=\"closed\"}"), "{metrics}");
}
