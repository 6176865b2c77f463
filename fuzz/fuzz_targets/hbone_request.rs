//! What a tunnel listener takes from the network before any policy check: the CONNECT
//! request's pseudo-headers (method, scheme, path, authority), the node proof headers
//! (base64, a DER chain split by its own lengths) and the TLS server name. Fields are
//! separated by NUL bytes: method, scheme, path, authority, node SVID header, node proof
//! header, server name (a missing field is absent).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::hbone::{check_connect, parse_authority, parse_server_name, NodeProof};

fn text(f: Option<&[u8]>) -> Option<&str> {
    f.and_then(|b| std::str::from_utf8(b).ok())
}

fuzz_target!(|data: &[u8]| {
    let mut fields = data.split(|b| *b == 0);
    let mut next = || fields.next();
    let (method, scheme, path, authority) = (next(), next(), next(), next());
    let (svid, proof, name) = (next(), next(), next());
    let method = text(method).unwrap_or("CONNECT");
    let scheme = text(scheme).filter(|s| !s.is_empty());
    let path = text(path);
    let authority = text(authority);
    if let Ok(addr) = check_connect(method, scheme, path, authority) {
        // Whatever passes is a well-formed address that prints back to what was parsed.
        assert_eq!(parse_authority(&addr.to_string()), Ok(addr));
    }
    if let Ok(p) = NodeProof::decode(svid.unwrap_or_default(), proof.unwrap_or_default()) {
        let (a, b) = p.encode();
        assert_eq!(NodeProof::decode(a.as_bytes(), b.as_bytes()).as_ref(), Ok(&p));
    }
    if let Some(name) = text(name) {
        let _ = parse_server_name(name);
    }
});
