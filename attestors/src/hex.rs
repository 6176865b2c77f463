//! Lowercase hex, the one encoding of digests, IDs and key material the agent, the server and
//! their stores share.

use std::fmt::Write;

pub fn encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `None` unless `s` is an even number of hex digits (either case).
pub fn decode(s: &str) -> Option<Vec<u8>> {
    // Checked here: `from_str_radix` also takes a sign ("+f" is 15).
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips_and_refuses_non_hex() {
        assert_eq!(super::encode(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(super::decode("00AB10"), Some(vec![0, 0xab, 0x10]));
        assert_eq!(super::decode("abc"), None);
        assert_eq!(super::decode("zz"), None);
        // Found by the spiffe_id_selector fuzz target: a sign passed for a digit.
        assert_eq!(super::decode("3ed2+27e5b97"), None);
        assert_eq!(super::decode("+f+f"), None);
        assert_eq!(super::decode(""), Some(vec![]));
    }
}
