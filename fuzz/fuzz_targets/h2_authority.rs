//! The agent's HTTP/2 `:authority` rewriter (`tether_agent::h2_authority`): the first code to
//! see the bytes any local process writes to the Workload API socket.
//!
//! The first input byte chooses how the rest is cut into reads (0: one read), the rest is the
//! client's byte stream. Whatever the cut, the rewriter must: never panic; say the same thing
//! as when given the stream at once (output and refusal); never hold more than a frame plus a
//! header block between reads; and emit only the preface and whole frames no larger than
//! SETTINGS_MAX_FRAME_SIZE, whose header blocks decode on their own (literals only) to a
//! header list within the limit, with every `:authority` a valid one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_agent::h2_authority::{Rewriter, MAX_BLOCK, MAX_FRAME};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else { return };

    let mut whole = Vec::new();
    let whole_result = Rewriter::default().feed(stream, &mut whole);

    let mut rewriter = Rewriter::default();
    let mut pieces = Vec::new();
    let mut pieces_ok = true;
    let mut rest = stream;
    let mut state = u32::from(cut);
    while !rest.is_empty() {
        // A small LCG: read sizes from 1 to `cut` bytes, varying.
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = if cut == 0 { rest.len() } else { 1 + (state >> 16) as usize % usize::from(cut) };
        let (read, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        if rewriter.feed(read, &mut pieces).is_err() {
            pieces_ok = false;
            break;
        }
        assert!(
            rewriter.buffered() < FRAME_HEADER + MAX_FRAME + 5 + MAX_BLOCK,
            "{} bytes buffered between reads",
            rewriter.buffered()
        );
    }
    assert_eq!(pieces_ok, whole_result.is_ok(), "the cut changed the verdict");
    assert!(pieces == whole, "the cut changed the output");

    check_output(&whole);
});

/// The preface, then whole frames; header blocks literal-only, within the limit, with valid
/// authorities.
fn check_output(out: &[u8]) {
    if out.is_empty() {
        return;
    }
    let mut rest = out.strip_prefix(PREFACE).expect("output starts with the preface");
    // A header block being reassembled: (stream, block).
    let mut open: Option<(u32, Vec<u8>)> = None;
    while !rest.is_empty() {
        assert!(rest.len() >= FRAME_HEADER, "a partial frame header was emitted");
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        assert!(len <= MAX_FRAME, "emitted a {len}-byte frame");
        assert!(rest.len() >= FRAME_HEADER + len, "a partial frame was emitted");
        let (kind, flags) = (rest[3], rest[4]);
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
        let payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
        rest = &rest[FRAME_HEADER + len..];
        let block = match (kind, open.take()) {
            (HEADERS, None) => {
                assert_eq!(flags & PADDED, 0, "rewritten HEADERS are never padded");
                let skip = if flags & PRIORITY != 0 { 5 } else { 0 };
                assert!(payload.len() >= skip);
                (stream, payload[skip..].to_vec())
            }
            (CONTINUATION, Some((s, mut block))) => {
                assert_eq!(s, stream, "CONTINUATION emitted on another stream");
                block.extend_from_slice(payload);
                (s, block)
            }
            (HEADERS | CONTINUATION, _) => panic!("emitted a header block out of sequence (type {kind})"),
            (_, Some(_)) => panic!("emitted a frame of type {kind} inside a header block"),
            (_, None) => continue,
        };
        if flags & END_HEADERS == 0 {
            open = Some(block);
            continue;
        }
        // The rewriter re-encodes as literals: each block decodes without the client's state.
        let headers =
            loona_hpack::Decoder::new().decode(&block.1).expect("a rewritten header block decodes on its own");
        // RFC 7541 4.1: the size of a header list, as h2 limits it.
        let list: usize = headers.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
        assert!(list <= MAX_BLOCK, "emitted a header list of {list} bytes");
        for (name, value) in &headers {
            if name.as_slice() == b":authority" {
                let valid = std::str::from_utf8(value).is_ok_and(|s| s.parse::<http::uri::Authority>().is_ok());
                assert!(valid, "emitted an invalid :authority {value:?}");
            }
        }
    }
    assert!(open.is_none(), "emitted a header block without END_HEADERS");
}
