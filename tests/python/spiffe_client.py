"""A workload using the `spiffe` package from PyPI, unchanged, against a Tether agent.

Reads SPIFFE_ENDPOINT_SOCKET like any workload. Prints JSON lines for the test to check.
  x509 ROTATIONS   the default X.509-SVID, then after each of ROTATIONS stream updates
  jwt AUDIENCE     a JWT-SVID, validated by the Workload API and locally with the JWT bundle
"""
import json
import sys
import threading

from cryptography.hazmat.primitives import serialization
from spiffe import JwtSvid, WorkloadApiClient


def leaf_fingerprint(svid):
    der = svid.leaf.public_bytes(serialization.Encoding.DER)
    return "%x" % (hash(der) & 0xFFFFFFFFFFFF)


def x509(rotations):
    client = WorkloadApiClient(default_timeout=20)
    svid = client.fetch_x509_svid()
    bundles = client.fetch_x509_bundles()
    bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    print(json.dumps({"spiffe_id": str(svid.spiffe_id), "leaf": svid.leaf.serial_number, "roots": len(bundle.x509_authorities)}), flush=True)
    if rotations == 0:
        return
    seen = []
    done = threading.Event()

    def on_success(ctx):
        seen.append(ctx.default_svid.leaf.serial_number)
        # The first message is the current state; every later one is an update.
        if len(seen) > rotations:
            done.set()

    def on_error(err):
        print(json.dumps({"error": str(err)}), flush=True)
        done.set()

    handler = client.stream_x509_contexts(on_success=on_success, on_error=on_error)
    if not done.wait(40):
        print(json.dumps({"error": "no rotation within 40 s", "seen": seen}), flush=True)
        sys.exit(1)
    handler.cancel()
    for serial in seen[1:]:
        print(json.dumps({"spiffe_id": str(svid.spiffe_id), "leaf": serial}), flush=True)


def jwt(audience):
    client = WorkloadApiClient(default_timeout=20)
    svid = client.fetch_jwt_svid(audience={audience})
    validated = client.validate_jwt_svid(svid.token, audience)
    bundles = client.fetch_jwt_bundles()
    bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    local = JwtSvid.parse_and_validate(svid.token, bundle, {audience})
    print(json.dumps({"spiffe_id": str(svid.spiffe_id), "validated": str(validated.spiffe_id), "local": str(local.spiffe_id)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "x509":
        x509(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    else:
        jwt(sys.argv[2])
