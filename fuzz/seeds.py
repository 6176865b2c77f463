#!/usr/bin/env python3
"""Rebuilds the seed corpus of every target seeds.sh does not (those fed from the TPM fixtures).

Realistic inputs only, a few per target: the documented and demo configs and policies (taken
from docs/ and the code, so they stay in step), keys, CSRs and certificates made as the agent
and the server make them (python3-cryptography), node API messages encoded with protoc, and
the HTTP/2 bytes a real gRPC client (grpcio, in the venv `cargo xtask setup` makes) sends to
the Workload API socket. Each target's directory is replaced whole. Run from anywhere:
  fuzz/seeds.py [target ...]
"""
import base64
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CORPUS = os.path.join(HERE, "corpus")
TD = "example.org"


def put(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(CORPUS, target, name), "wb") as f:
        f.write(data)


def read(*path):
    with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
        return f.read()


def toml_blocks(doc):
    """The ```toml blocks of a markdown page, dedented (some sit in list items)."""
    return [textwrap.dedent(b) for b in re.findall(r"```toml\n(.*?)```", read(doc), re.S)]


# --- files --------------------------------------------------------------------------------

def agent_policy():
    t = "agent_policy"
    for i, block in enumerate(b for b in toml_blocks("docs/enforce-flows-in-the-kernel.md") if "[[rule]]" in b):
        put(t, f"docs_{i}.toml", block)
    put(t, "tests_example.toml", re.search(r'EXAMPLE: &str = r#"(.*?)"#;', read("agent/src/policy/tests.rs"), re.S)[1])
    # xtask/src/demo.rs writes this one, with a port it picked.
    put(t, "demo.toml", '[[rule]]\nname = "shop-to-db"\nfrom = { spiffe_id = "spiffe://demo.tether/shop" }\n'
        'to = { spiffe_id = "spiffe://demo.tether/db" }\nports = [40123]\n')
    put(t, "patterns.toml", textwrap.dedent("""\
        [defaults]
        require_node_attested = false

        [[rule]]
        name = "any-web-to-db"
        from = { spiffe_id_pattern = "spiffe://example.org/**/web" }
        to = { spiffe_id_pattern = "spiffe://example.org/d*" }
        protocol = "any"

        [[rule]]
        name = "dns-out"
        from = { spiffe_id_prefix = "spiffe://example.org/web", namespace = "prod" }
        to = { cidr = ["10.0.0.53/32", "0.0.0.0/0"] }
        ports = [53, "1-1023"]
        protocol = "udp"
        require_golden_binary = true
        """))


def agent_config():
    t = "agent_config"
    docs = toml_blocks("docs/run-a-trust-domain.md")
    agent = next(b for b in docs if "server_address" in b)
    put(t, "run_a_trust_domain.toml", agent)
    base = agent.replace('join_token = "<token from step 2>"      # used once; later starts reuse the node SVID\n', "")
    tpm = next(b for b in toml_blocks("docs/attest-nodes-with-a-tpm.md") if "tcti" in b)
    put(t, "tpm.toml", base + tpm)
    enforcement = next(b for b in toml_blocks("docs/enforce-flows-in-the-kernel.md") if "[enforcement]" in b)
    put(t, "enforcement.toml", agent + enforcement)
    # xtask/src/demo.rs writes this one, with its temporary paths.
    put(t, "demo.toml", textwrap.dedent("""\
        trust_domain = "demo.tether"
        server_address = "127.0.0.1:40121"
        trust_bundle_path = "/tmp/tether-demo/server/bundle.pem"
        data_dir = "/tmp/tether-demo/agent"
        socket_path = "/tmp/tether-demo/agent.sock"
        sync_interval_seconds = 1
        [tpm]
        tcti = "swtpm:host=127.0.0.1,port=40125"
        reattest_interval_seconds = 2
        [enforcement]
        protected_cgroups = ["/sys/fs/cgroup/tether-demo"]
        policy = "/tmp/tether-demo/policy.toml"
        pin_dir = "/sys/fs/bpf/tether-demo"
        [selectors]
        container_roots = ["/system.slice", "/docker"]
        kubernetes_roots = ["/kubepods.slice"]
        """))


def server_config():
    t = "server_config"
    server = next(b for b in toml_blocks("docs/run-a-trust-domain.md") if "bind_address" in b)
    put(t, "run_a_trust_domain.toml", server)
    tpm = next(b for b in toml_blocks("docs/attest-nodes-with-a-tpm.md") if "ek_ca_dir" in b)
    put(t, "tpm.toml", server + tpm)
    put(t, "demo.toml", 'trust_domain = "demo.tether"\ndata_dir = "/tmp/tether-demo/server"\n'
        'bind_address = "127.0.0.1:40121"\n[tpm]\nek_ca_dir = "/tmp/swtpm/ca"\npolicy_dir = "/tmp/tether-demo/golden-pcrs"\n')
    put(t, "ttls_upstream_postgres.toml", textwrap.dedent("""\
        trust_domain = "example.org"
        data_dir = "/var/lib/tether/server"
        server_names = ["tether.example.org", "localhost"]
        ca_ttl_seconds = 172800
        default_x509_svid_ttl_seconds = 1800
        default_jwt_svid_ttl_seconds = 120
        node_svid_ttl_seconds = 7200
        postgres = "host=db.internal user=tether dbname=tether"
        upstream_ca_cert = "/etc/tether/corp-ca.pem"
        upstream_ca_key = "/etc/tether/corp-ca.key"
        """))
    # Golden PCR policies as `tether-agent tpm pcrs` prints them, from the fixture quote's PCRs.
    pcrs = [l.split(":", 1) for l in read("attestors/tests/fixtures/tpm/quote_rsa.pcrs").split()]
    for bank in ("sha256", "sha1"):
        values = "".join(f'{i} = "{v}"\n' for b, iv in pcrs if b == bank for i, v in [iv.split("=")])
        put(t, f"golden_{bank}.toml", "# Golden PCR values read from IBM (a SOFTWARE TPM) via swtpm:port=2321.\n"
            f"# Put this file in the server's [tpm] policy_dir.\nname = \"image-2026-11\"\nbank = \"{bank}\"\n\n"
            f"[pcrs]\n{values}")
    put(t, "golden_any.toml", 'name = "any-image"\n[pcrs]\n')


def spiffe_id_selector():
    t = "spiffe_id_selector"
    seeds = {
        "id": "spiffe://example.org/billing",
        "id_node": "spiffe://example.org/node/web-1",
        "id_td": "spiffe://example.org",
        "id_join_token": "spiffe://example.org/tether/agent/join_token/5f3c2a9e0b1d4c6f8a7e2d1c0b9a8f7e",
        "trust_domain": "demo.tether",
        "selector_systemd": "systemd:id:billing.service",
        "selector_sha256": "unix:sha256:3e287e57770de15677579228044a2abe6ca7c39d61de4b8a47fd6b7209dd0bab",
        "selector_uid": "unix:uid:1000",
        "selector_k8s": "k8s:pod-uid:7c1e5b0a-3f2d-4e6a-9b8c-1d2e3f4a5b6c",
        "selector_tpm_policy": "tpm:policy:image-2026-11",
        "hex": "3e287e57770de15677579228044a2abe6ca7c39d61de4b8a47fd6b7209dd0bab",
        "pattern": "spiffe://example.org/**/db",
        "pattern_and_id": "spiffe://example.org/*/web-*\nspiffe://example.org/prod/web-1",
        "plain_pattern_and_id": "spiffe://example.org/web\nspiffe://example.org/web",
    }
    for name, s in seeds.items():
        put(t, name, s)


# --- keys, CSRs, certificates, tokens -----------------------------------------------------

NOW = datetime.datetime(2027, 1, 15, tzinfo=datetime.timezone.utc)


def csr(key, algorithm, san=None, cn="rcgen self signed cert"):
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]), critical=False)
    return b.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


def p256():
    return ec.generate_private_key(ec.SECP256R1())


def agent_csr():
    """What the agent's `svid::new_key` sends: P-256, rcgen's default subject, no extensions."""
    return csr(p256(), hashes.SHA256())


def cert(subject_key, issuer_key, issuer_name, subject_name, ca, uri=None, dns=None, days=1):
    b = (x509.CertificateBuilder().subject_name(subject_name).issuer_name(issuer_name)
         .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - datetime.timedelta(seconds=10)).not_valid_after(NOW + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    names = [x509.UniformResourceIdentifier(uri)] if uri else []
    names += [x509.DNSName(d) for d in dns or []]
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(issuer_key, None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()).public_bytes(
        serialization.Encoding.DER)


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tether"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def csr_seeds():
    t = "csr"
    put(t, "agent_p256", agent_csr())
    put(t, "p256_uri_san", csr(p256(), hashes.SHA256(), san=f"spiffe://{TD}/web"))
    put(t, "p384_sha384", csr(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()))
    # What `openssl req` makes for a P-384 key: its default digest is SHA-256.
    put(t, "p384_sha256", csr(ec.generate_private_key(ec.SECP384R1()), hashes.SHA256()))
    put(t, "rsa2048", csr(rsa.generate_private_key(public_exponent=65537, key_size=2048), hashes.SHA256()))
    put(t, "ed25519", csr(ed25519.Ed25519PrivateKey.generate(), None))


def x509_seeds():
    t = "x509_svid"
    root_key, mid_key, leaf_key = p256(), p256(), p256()
    root = cert(root_key, root_key, name(f"{TD} CA 1800000000"), name(f"{TD} CA 1800000000"), True, uri=f"spiffe://{TD}", days=3650)
    put(t, "node_svid", cert(leaf_key, root_key, name(f"{TD} CA 1800000000"), name("node"), False,
                             uri=f"spiffe://{TD}/tether/agent/join_token/5f3c2a9e0b1d4c6f8a7e2d1c0b9a8f7e"))
    # With an upstream CA: leaf, Tether's intermediate, the upstream's.
    mid = cert(mid_key, root_key, name(f"{TD} CA 1800000000"), name(f"{TD} CA 1800000001"), True, uri=f"spiffe://{TD}")
    leaf = cert(leaf_key, mid_key, name(f"{TD} CA 1800000001"), x509.Name([]), False, uri=f"spiffe://{TD}/web",
                dns=["web.internal"])
    put(t, "workload_chain", leaf + mid + root)
    put(t, "no_spiffe_id", cert(leaf_key, root_key, name("corp root"), name("web"), False, dns=["web.internal"]))


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt_seeds():
    t = "jwt_svid"
    key = p256()
    header = {"alg": "ES256", "kid": "qL3sbVfJ8iTq0mUeVjGx7g", "typ": "JWT"}
    claims = {"sub": f"spiffe://{TD}/web", "aud": "db", "exp": 4102444800, "iat": 1800000000}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    token = f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
    put(t, "token", b"\0" + token.encode())
    none = b64(json.dumps({"alg": "none"}).encode())
    put(t, "token_alg_none", b"\0" + f"{none}.{signing_input.split('.')[1]}.".encode())
    # Mode 1: header NUL claims, signed by the target with a key of the bundle (kid "fuzz").
    def signed(header, claims):
        return b"\1" + json.dumps(header).encode() + b"\0" + json.dumps(claims).encode()
    good = {"alg": "ES256", "kid": "fuzz", "typ": "JWT"}
    put(t, "signed_valid", signed(good, claims))
    put(t, "signed_aud_list", signed({"alg": "ES256", "kid": "fuzz", "typ": "JOSE"},
                                      dict(claims, aud=["payments", "db"])))
    put(t, "signed_other_td", signed(good, dict(claims, sub="spiffe://other.org/web")))
    put(t, "signed_expired", signed({"alg": "ES256", "kid": "fuzz"}, dict(claims, exp=1700000000)))
    put(t, "signed_hs256", signed({"alg": "HS256", "kid": "fuzz"}, claims))


# --- node API -----------------------------------------------------------------------------

def protoc(message, text, proto="tether/node.proto"):
    inc = os.path.join(ROOT, "proto", "proto")
    return subprocess.run(["protoc", f"--encode={message}", "-I", inc, "-I", "/usr/include", os.path.join(inc, proto)],
                          input=text.encode(), capture_output=True, check=True).stdout


def pb_bytes(b):
    return '"' + "".join(f"\\x{c:02x}" for c in b) + '"'


def node_api():
    t = "node_api"
    csr1, csr2 = agent_csr(), agent_csr()
    token = "9b1f0c3a5d7e2f4a6c8e0b2d4f6a8c0e1b3d5f7a9c1e3b5d7f9a1c3e5b7d9f1a"
    enc = lambda kind, msg, text: bytes([kind]) + protoc(f"tether.node.v1.{msg}", text)
    put(t, "attest_join_token", enc(0, "AttestRequest", f'attestor: "join_token" payload: "{token}" csr: {pb_bytes(csr1)}'))
    evidence_path = os.path.join(CORPUS, "attestation_messages", "evidence_rsa")
    evidence = open(evidence_path, "rb").read()
    put(t, "attest_tpm", enc(0, "AttestRequest",
                             f'attestor: "tpm" payload: {pb_bytes(evidence)} csr: {pb_bytes(csr1)} challenge_id: "c-1"'))
    put(t, "renew", enc(1, "RenewRequest", f"csr: {pb_bytes(csr1)}"))
    put(t, "renew_tpm", enc(1, "RenewRequest", f'csr: {pb_bytes(csr1)} challenge_id: "c-2" evidence: {pb_bytes(evidence)}'))
    put(t, "sign", enc(2, "SignRequest", f'csrs {{ entry_id: "e-web" csr: {pb_bytes(csr1)} }} '
                                          f'csrs {{ entry_id: "e-db" csr: {pb_bytes(csr2)} }}'))
    put(t, "reattest", enc(3, "ReattestRequest", f'challenge_id: "c-3" evidence: {pb_bytes(evidence)}'))
    put(t, "mint_jwt", enc(4, "MintJwtRequest", 'entry_id: "e-web" audience: "db" audience: "payments"'))
    put(t, "entry", enc(5, "Entry", textwrap.dedent(f"""\
        spiffe_id: "spiffe://{TD}/billing" parent_id: "spiffe://{TD}/node/web-1"
        selectors: "systemd:id:billing.service"
        selectors: "unix:sha256:3e287e57770de15677579228044a2abe6ca7c39d61de4b8a47fd6b7209dd0bab"
        dns_names: "billing.internal" labels {{ key: "team" value: "payments" }}
        x509_ttl_seconds: 3600 namespace: "prod" hint: "billing"
        """)))
    put(t, "entry_node_alias", enc(5, "Entry", f'spiffe_id: "spiffe://{TD}/nodes/image-2026-11" '
                                               f'parent_id: "spiffe://{TD}/tether/server" '
                                               'selectors: "tpm:policy:image-2026-11" admin: true'))
    hello = open(os.path.join(CORPUS, "attestation_messages", "hello_ecc"), "rb").read()
    put(t, "begin_attestation_tpm", enc(6, "BeginAttestationRequest", f'attestor: "tpm" payload: {pb_bytes(hello)}'))


# --- HTTP/2 -------------------------------------------------------------------------------

CAPTURE = r'''
import os, socket, sys, threading
path, out = sys.argv[1], sys.argv[2]
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(1)
got = bytearray()
def serve():
    c, _ = srv.accept()
    c.sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))  # the server's SETTINGS
    c.settimeout(2.5)
    acked = False
    while True:
        try:
            b = c.recv(65536)
        except socket.timeout:
            break
        if not b:
            break
        got.extend(b)
        if not acked and len(got) > 24 + 9:
            c.sendall(bytes([0, 0, 0, 4, 1, 0, 0, 0, 0]))  # SETTINGS ACK
            acked = True
    c.close()
t = threading.Thread(target=serve)
t.start()
from spiffe import WorkloadApiClient
client = WorkloadApiClient(socket_path="unix://" + path, default_timeout=1)
# Two calls on one connection: the second's headers refer to the client's HPACK table.
for call in (client.fetch_x509_svid, client.fetch_jwt_bundles):
    try:
        call()
    except Exception:
        pass  # no answer comes: only the request matters
t.join()
open(out, "wb").write(bytes(got))
'''


def grpcio_capture():
    """The bytes the `spiffe` package (grpcio) sends for FetchX509SVID then FetchJWTBundles."""
    python = os.path.join(ROOT, "target", "pyvenv", "bin", "python")
    if not os.path.exists(python):
        sys.exit(f"{python} missing: `cargo xtask setup` creates the venv with the spiffe package")
    with tempfile.TemporaryDirectory() as d:
        # A path like the agent's default socket, which grpcio sends as the authority.
        os.makedirs(os.path.join(d, "run", "tether"))
        sock, out = os.path.join(d, "run", "tether", "agent.sock"), os.path.join(d, "capture")
        subprocess.run([python, "-c", CAPTURE, sock, out], check=True, timeout=60)
        data = open(out, "rb").read()
    assert data.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") and len(data) > 200, data
    return data


def frame(kind, flags, stream, payload):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def literal(name, value, indexed=True):
    """HPACK literal with a new name, no Huffman (lengths < 127)."""
    return bytes([0x40 if indexed else 0x00, len(name)]) + name + bytes([len(value)]) + value


def h2_authority():
    t = "h2_authority"
    capture = grpcio_capture()
    # First byte: how the stream is cut into reads (0: at once; n: 1 to n bytes each).
    put(t, "grpcio_whole", b"\0" + capture)
    put(t, "grpcio_reads_of_1_to_7", b"\7" + capture)
    put(t, "grpcio_reads_of_1_to_200", bytes([200]) + capture)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    block = (literal(b":method", b"POST") + literal(b":scheme", b"http")
             + literal(b":path", b"/SpiffeWorkloadAPI/FetchX509SVID") + literal(b":authority", b"localhost:8080")
             + literal(b"workload.spiffe.io", b"true"))
    half = len(block) // 2
    # Padded HEADERS with a priority, then a CONTINUATION; DATA; the same headers from the
    # dynamic table (indices 62-66); a table size update to 0.
    stream = (preface + frame(4, 0, 0, b"") + frame(1, 0x08 | 0x20, 1, b"\3" + b"\0\0\0\0\x10" + block[:half] + b"\0\0\0")
              + frame(9, 0x4, 1, block[half:]) + frame(0, 0x1, 1, b"\0\0\0\0\0")
              + frame(1, 0x4 | 0x1, 3, bytes([0xc2, 0xc1, 0xc0, 0xbf, 0xbe]))
              + frame(1, 0x4 | 0x1, 5, b"\x20" + literal(b":authority", b"%2Frun%2Ftether%2Fagent.sock", False)))
    put(t, "handmade_continuation_padding_table", b"\0" + stream)
    put(t, "handmade_reads_of_1_to_3", b"\3" + stream)


TARGETS = {
    "agent_policy": agent_policy,
    "agent_config": agent_config,
    "server_config": server_config,
    "spiffe_id_selector": spiffe_id_selector,
    "csr": csr_seeds,
    "x509_svid": x509_seeds,
    "jwt_svid": jwt_seeds,
    "node_api": node_api,
    "h2_authority": h2_authority,
}


def main():
    for target in sys.argv[1:] or TARGETS:
        d = os.path.join(CORPUS, target)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        TARGETS[target]()
        print(f"{target}: {len(os.listdir(d))} seeds")


if __name__ == "__main__":
    main()
