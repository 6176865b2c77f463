//! Whole-file tests: the documented examples, and what each kind of mistake is told.

use std::path::Path;

use super::*;

/// The example from the policy documentation; compile and explain tests use it too.
pub(crate) const EXAMPLE: &str = r#"# optional; defaults shown
[defaults]
require_node_attested = true   # rules apply only while the node is attested
require_golden_binary = false  # rules apply only to identities whose binary matches the golden manifest

[[rule]]
name = "web-to-db"
from = { spiffe_id = "spiffe://example.org/web" }
to = { spiffe_id = "spiffe://example.org/db" }
ports = [5432]
protocol = "tcp"          # "tcp" | "udp" | "any" (default "tcp")

[[rule]]
name = "prod-web-egress"
from = { namespace = "prod", labels = { app = "web" } }
to = { cidr = ["10.0.0.0/8", "192.168.1.7"] }
ports = ["443", "8000-8080"]
require_golden_binary = true

[[rule]]
name = "lb-in"
from = { cidr = ["192.168.0.0/16"] }       # remote plaintext sources allowed in
to = { spiffe_id_prefix = "spiffe://example.org/web/" }
ports = [8080]
"#;

pub(crate) fn example() -> Policy {
    Policy::parse(EXAMPLE, Path::new("policy.toml")).unwrap()
}

fn id(s: &str) -> IdentitySelector {
    IdentitySelector { spiffe_id: Some(s.into()), ..Default::default() }
}

fn net(a: [u8; 4], prefix: u8) -> Ipv4Net {
    Ipv4Net { addr: a, prefix }
}

#[test]
fn the_documented_example_parses() {
    let p = example();
    assert_eq!(p.defaults, Defaults { require_node_attested: true, require_golden_binary: false });
    assert_eq!(p.source, Path::new("policy.toml"));
    let want = vec![
        Rule {
            name: "web-to-db".into(),
            peers: Peers::Identity { from: id("spiffe://example.org/web"), to: id("spiffe://example.org/db") },
            protocol: Protocol::Tcp,
            ports: vec![PortRange { lo: 5432, hi: 5432 }],
            require_node_attested: true,
            require_golden_binary: false,
            line: 7,
        },
        Rule {
            name: "prod-web-egress".into(),
            peers: Peers::Egress {
                from: IdentitySelector {
                    namespace: Some("prod".into()),
                    labels: [("app".to_string(), "web".to_string())].into(),
                    ..Default::default()
                },
                to: vec![net([10, 0, 0, 0], 8), net([192, 168, 1, 7], 32)],
            },
            protocol: Protocol::Tcp,
            ports: vec![PortRange { lo: 443, hi: 443 }, PortRange { lo: 8000, hi: 8080 }],
            require_node_attested: true,
            require_golden_binary: true,
            line: 14,
        },
        Rule {
            name: "lb-in".into(),
            peers: Peers::Ingress {
                from: vec![net([192, 168, 0, 0], 16)],
                to: IdentitySelector {
                    spiffe_id_prefix: Some("spiffe://example.org/web/".into()),
                    ..Default::default()
                },
            },
            protocol: Protocol::Tcp,
            ports: vec![PortRange { lo: 8080, hi: 8080 }],
            require_node_attested: true,
            require_golden_binary: false,
            line: 21,
        },
    ];
    assert_eq!(p.rules, want);
    assert_eq!(check_summary(&p), "policy.toml: 3 rules OK (1 identity flow, 1 egress, 1 ingress)");
}

#[test]
fn defaults_and_optional_keys() {
    let text = r#"
[[rule]]
name = "dns"
from = { spiffe_id_pattern = "spiffe://example.org/**" }
to = { cidr = ["10.0.0.53"] }
protocol = "any"
require_node_attested = false

[[rule]]
name = "all-ports"
from = { spiffe_id = "spiffe://example.org/a" }
to = { spiffe_id = "spiffe://example.org/b" }
ports = []
protocol = "udp"
"#;
    let p = Policy::parse(text, Path::new("p.toml")).unwrap();
    assert_eq!(p.defaults, Defaults::default());
    assert_eq!((p.rules[0].protocol, p.rules[1].protocol), (Protocol::Any, Protocol::Udp));
    assert_eq!(p.rules[0].ports, vec![PortRange::ANY], "omitted ports are any port");
    assert_eq!(p.rules[1].ports, vec![PortRange::ANY], "empty ports are any port");
    assert!(!p.rules[0].require_node_attested && p.rules[1].require_node_attested);
    assert_eq!(check_summary(&p), "p.toml: 2 rules OK (1 identity flow, 1 egress, 0 ingress)");
    let empty = Policy::parse("", Path::new("empty.toml")).unwrap();
    assert_eq!(check_summary(&empty), "empty.toml: 0 rules OK (0 identity flows, 0 egress, 0 ingress)");
}

/// A rule wrapped around `body`, so each error case states only what it is about.
fn rule(body: &str) -> String {
    format!("[defaults]\nrequire_golden_binary = false\n\n[[rule]]\nname = \"r\"\n{body}\n")
}

fn error(text: &str) -> String {
    Policy::parse(text, Path::new("policy.toml")).unwrap_err().to_string()
}

const WEB: &str = "from = { spiffe_id = \"spiffe://example.org/web\" }";
const DB: &str = "to = { spiffe_id = \"spiffe://example.org/db\" }";

#[test]
fn every_error_names_file_line_and_key() {
    let cases: Vec<(String, &str)> = vec![
        (
            // The brief's example, in its own position.
            format!(
                "{}\n[[rule]]\nname = \"prod-web-egress\"\n{WEB}\nto = {{ cidr = [\"10.0.0.0/33\"] }}\n",
                rule(&format!("{WEB}\n{DB}"))
            ),
            "policy.toml:12: rule[1] \"prod-web-egress\": key `to.cidr[0]`: \"10.0.0.0/33\" is not an IPv4 CIDR",
        ),
        (
            rule(&format!("{WEB}\nto = {{ cidr = [\"fd00::/8\"] }}")),
            "policy.toml:7: rule[0] \"r\": key `to.cidr[0]`: \"fd00::/8\" is IPv6; only IPv4 is enforced yet",
        ),
        (
            rule(&format!("{WEB}\nto = {{ cidr = [] }}")),
            "policy.toml:7: rule[0] \"r\": key `to.cidr`: is empty; list at least one network",
        ),
        (
            rule(&format!("{WEB}\nto = {{ cidr = [\"10.0.0.0/8\"], namespace = \"prod\" }}")),
            "policy.toml:7: rule[0] \"r\": key `to.namespace`: cannot be combined with `cidr`: a selector names either identities or networks",
        ),
        (
            rule("from = { cidr = [\"10.0.0.0/8\"] }\nto = { cidr = [\"192.168.0.0/16\"] }"),
            "policy.toml:7: rule[0] \"r\": key `to`: `from` and `to` are both networks: a rule needs an identity on at least one side, or it protects nothing",
        ),
        (
            rule(&format!("from = {{}}\n{DB}")),
            "policy.toml:6: rule[0] \"r\": key `from`: selects nothing: give spiffe_id, spiffe_id_prefix, spiffe_id_pattern, namespace, labels or cidr",
        ),
        (
            rule(&format!("from = {{ labels = {{}} }}\n{DB}")),
            "policy.toml:6: rule[0] \"r\": key `from`: selects nothing: give spiffe_id, spiffe_id_prefix, spiffe_id_pattern, namespace, labels or cidr",
        ),
        (
            rule(&format!("from = {{ spiffe_id = \"spiffe://example.org/web/\" }}\n{DB}")),
            "policy.toml:6: rule[0] \"r\": key `from.spiffe_id`: SPIFFE ID \"spiffe://example.org/web/\" ends with '/'",
        ),
        (
            rule(&format!("from = {{ spiffe_id_prefix = \"example.org/web\" }}\n{DB}")),
            "policy.toml:6: rule[0] \"r\": key `from.spiffe_id_prefix`: SPIFFE ID \"example.org/web\" does not start with spiffe://",
        ),
        (
            rule(&format!("from = {{ spiffe_id_pattern = \"spiffe://example.org/web**\" }}\n{DB}")),
            "policy.toml:6: rule[0] \"r\": key `from.spiffe_id_pattern`: \"spiffe://example.org/web**\": `**` must be a whole path segment",
        ),
        (
            rule(&format!("from = {{ namespace = \"\" }}\n{DB}")),
            "policy.toml:6: rule[0] \"r\": key `from.namespace`: must not be empty",
        ),
        (
            rule(&format!("from = {{ labels = {{ \"\" = \"x\" }} }}\n{DB}")),
            "policy.toml:6: rule[0] \"r\": key `from.labels.`: label names must not be empty",
        ),
        (
            rule(&format!("from = {{ labels = {{ app = 3 }} }}\n{DB}")),
            "policy.toml:6: rule[0] \"r\": key `from.labels.app`: invalid type: integer `3`, expected a string",
        ),
        (
            rule(&format!("{WEB}\n{DB}\nports = [80, 0]")),
            "policy.toml:8: rule[0] \"r\": key `ports[1]`: port 0 is not a port",
        ),
        (
            rule(&format!("{WEB}\n{DB}\nports = [\"9000-8000\"]")),
            "policy.toml:8: rule[0] \"r\": key `ports[0]`: \"9000-8000\" is an empty range (low end above high end)",
        ),
        (
            rule(&format!("{WEB}\n{DB}\nports = [70000]")),
            "policy.toml:8: rule[0] \"r\": key `ports[0]`: 70000 is not a port (1-65535)",
        ),
        (
            rule(&format!("{WEB}\n{DB}\nports = [true]")),
            "policy.toml:8: rule[0] \"r\": key `ports[0]`: invalid type: boolean `true`, expected a port number or a \"lo-hi\" string",
        ),
        (
            rule(&format!("{WEB}\n{DB}\nports = 80")),
            "policy.toml:8: rule[0] \"r\": key `ports`: invalid type: integer `80`, expected a sequence",
        ),
        (
            rule(&format!("{WEB}\n{DB}\nprotocol = \"icmp\"")),
            "policy.toml:8: rule[0] \"r\": key `protocol`: \"icmp\" is not \"tcp\", \"udp\" or \"any\"",
        ),
        (
            rule(&format!("{WEB}\n{DB}\nport = [80]")),
            "policy.toml:8: rule[0] \"r\": key `port`: unknown field `port`, expected one of `name`, `from`, `to`, `ports`, `protocol`, `require_node_attested`, `require_golden_binary`",
        ),
        (
            rule(&format!("from = {{ spiffe_id = \"spiffe://example.org/web\", namespce = \"x\" }}\n{DB}")),
            "policy.toml:6: rule[0] \"r\": key `from.namespce`: unknown field `namespce`, expected one of `spiffe_id`, `spiffe_id_prefix`, `spiffe_id_pattern`, `namespace`, `labels`, `cidr`",
        ),
        (rule(DB), "policy.toml:4: rule[0] \"r\": key `from`: is required"),
        (rule(WEB), "policy.toml:4: rule[0] \"r\": key `to`: is required"),
        (
            format!("[[rule]]\n{WEB}\n{DB}\n"),
            "policy.toml:1: rule[0]: key `name`: is required",
        ),
        (format!("[[rule]]\nname = \" \"\n{WEB}\n{DB}\n"), "policy.toml:2: rule[0]: key `name`: must not be empty"),
        (
            format!("[[rule]]\nname = \"a\\nb\"\n{WEB}\n{DB}\n"),
            "policy.toml:2: rule[0] \"a\\nb\": key `name`: must not contain control characters",
        ),
        (
            format!("{}\n[[rule]]\nname = \"r\"\n{WEB}\n{DB}\n", rule(&format!("{WEB}\n{DB}"))),
            "policy.toml:10: rule[1] \"r\": key `name`: duplicate name; rule[0] at line 5 has it already",
        ),
        (
            "[defaults]\nrequire_node_attested = \"yes\"\n".into(),
            "policy.toml:2: key `defaults.require_node_attested`: invalid type: string \"yes\", expected a boolean",
        ),
        (
            "[defaults]\nrequire_golden = true\n".into(),
            "policy.toml:2: key `defaults.require_golden`: unknown field `require_golden`, expected `require_node_attested` or `require_golden_binary`",
        ),
        (
            "[[rules]]\nname = \"a\"\n".into(),
            "policy.toml:1: key `rules`: unknown field `rules`, expected `defaults` or `rule`",
        ),
        ("[[rule]]\nname = \n".into(), "policy.toml:2:8: string values must be quoted, expected literal string"),
    ];
    for (text, want) in cases {
        assert_eq!(error(&text), want, "\n{text}");
    }
}

#[test]
fn too_many_rules() {
    let one = format!("[[rule]]\nname = \"r\"\n{WEB}\n{DB}\n");
    let text = one.repeat(MAX_RULES + 1);
    assert_eq!(
        error(&text),
        format!("policy.toml:{}: rule[{MAX_RULES}] \"r\": more than {MAX_RULES} rules", 4 * MAX_RULES + 1)
    );
}

#[test]
fn reading_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, EXAMPLE).unwrap();
    assert_eq!(Policy::load(&path).unwrap().rules, example().rules);

    std::fs::write(&path, b"[[rule]]\nname = \"\xff\"\n").unwrap();
    assert_eq!(Policy::load(&path).unwrap_err().to_string(), format!("{}: not valid UTF-8 (byte 17)", path.display()));

    let missing = dir.path().join("absent.toml");
    assert_eq!(Policy::load(&missing).unwrap_err().to_string(), format!("reading {}", missing.display()));

    assert_eq!(parse_bytes(b"\xc3").unwrap_err().to_string(), "<fuzz>: not valid UTF-8 (byte 0)");
    assert_eq!(parse_bytes(EXAMPLE.as_bytes()).unwrap().rules.len(), 3);
}

#[test]
fn odd_inputs_are_located_errors() {
    // An empty file is a policy with no rules: everything is denied (it fails closed).
    assert!(parse_bytes(b"").unwrap().rules.is_empty());
    let cases: &[(&[u8], &str)] = &[
        (b"[[rule]]", "<fuzz>:1: rule[0]: key `name`: is required"),
        (b"rule = 3", "<fuzz>:1: key `rule`: invalid type: integer `3`, expected a sequence"),
        (b"rule = [1]", "<fuzz>:1: rule[0]: invalid type: integer `1`, expected struct RawRule"),
        (b"[rule]\nname = \"x\"", "<fuzz>:1: key `rule`: invalid type: map, expected a sequence"),
        (b"defaults = []", "<fuzz>:1: key `defaults`: invalid length 0, expected struct RawDefaults with 2 elements"),
        (
            b"[[rule]]\nname = \"x\"\nfrom = \"spiffe://a/b\"",
            "<fuzz>:3: rule[0] \"x\": key `from`: invalid type: string \"spiffe://a/b\", expected struct RawSelector",
        ),
        (
            b"[[rule]]\nname = \"x\"\nfrom = { spiffe_id = \"spiffe://a/b\" }\nto = { cidr = [\"1.2.3.4/\"] }",
            "<fuzz>:4: rule[0] \"x\": key `to.cidr[0]`: \"1.2.3.4/\" is not an IPv4 CIDR",
        ),
        (
            b"[[rule]]\nname = \"x\"\nports = [-1, 9223372036854775807]",
            "<fuzz>:1: rule[0] \"x\": key `from`: is required",
        ),
        (b"\n\n\xe2\x82\xac = 1", "<fuzz>:3:1: invalid unquoted key, expected letters, numbers, `-`, `_`"),
        (b"a.b.c.d = 1\n[[rule]]\n[[rule]]", "<fuzz>:1: key `a`: unknown field `a`, expected `defaults` or `rule`"),
        (b"\xff\xfe", "<fuzz>: not valid UTF-8 (byte 0)"),
    ];
    for (input, want) in cases {
        let err = parse_bytes(input).expect_err(&String::from_utf8_lossy(input)).to_string();
        assert_eq!(&err, want, "{:?}", String::from_utf8_lossy(input));
    }
}
