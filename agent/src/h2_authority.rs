//! Lets gRPC clients that send a Unix socket path as the HTTP/2 `:authority` talk to tonic.
//!
//! grpc-core based clients (Python's `grpcio`, hence the `spiffe` package on PyPI; also
//! grpc-java) put the socket path in `:authority` when dialling a Unix socket. That is not a
//! valid authority, and the h2 crate under tonic answers with RST_STREAM(PROTOCOL_ERROR)
//! (hyperium/h2#487, unmerged). SPIFFE clients must work unchanged, so the agent normalises the
//! header on the way in: this adapter sits between the accepted socket and tonic, parses the
//! client's HTTP/2 frames, decodes each header block with the client's HPACK state, replaces
//! an invalid `:authority` with `localhost`, and re-encodes the block as literals (never
//! indexed, so tonic's decoder state stays trivially in step). Everything else passes through
//! byte for byte; nothing is changed in the server-to-client direction.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The default SETTINGS_MAX_FRAME_SIZE, which tonic does not raise.
const MAX_FRAME: usize = 16_384;
/// Refuse header blocks larger than this (a client cannot make the agent buffer without end;
/// a Workload API call's headers are a few hundred bytes).
const MAX_BLOCK: usize = 64 << 10;

/// HPACK integer with an `n`-bit prefix whose high bits are `first`.
fn encode_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// Header fields as "literal without indexing, new name", no Huffman.
fn encode_literals(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        encode_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name);
        encode_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

fn valid_authority(v: &[u8]) -> bool {
    std::str::from_utf8(v).is_ok_and(|s| s.parse::<http::uri::Authority>().is_ok())
}

fn protocol_error(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("HTTP/2 from client: {msg}"))
}

/// The client-to-server half: raw bytes in, normalised bytes out.
pub struct Rewriter {
    decoder: loona_hpack::Decoder<'static>,
    preface_seen: bool,
    input: Vec<u8>,
    /// A HEADERS frame waiting for its CONTINUATIONs: (flags, stream id, priority, block).
    pending: Option<(u8, u32, Vec<u8>, Vec<u8>)>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Rewriter { decoder: loona_hpack::Decoder::new(), preface_seen: false, input: Vec::new(), pending: None }
    }
}

impl Rewriter {
    /// Consumes what it can of `input` (appended), appending normalised bytes to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        self.input.extend_from_slice(data);
        if !self.preface_seen {
            let n = self.input.len().min(PREFACE.len());
            if self.input[..n] != PREFACE[..n] {
                return Err(protocol_error("bad connection preface"));
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            out.extend_from_slice(PREFACE);
            self.input.drain(..PREFACE.len());
            self.preface_seen = true;
        }
        loop {
            if self.input.len() < FRAME_HEADER {
                return Ok(());
            }
            let len =
                (usize::from(self.input[0]) << 16) | (usize::from(self.input[1]) << 8) | usize::from(self.input[2]);
            // The server never raises SETTINGS_MAX_FRAME_SIZE: a larger frame is a protocol
            // error (RFC 9113 4.2), and refusing it bounds what one connection makes the agent
            // buffer to one frame.
            if len > MAX_FRAME {
                return Err(protocol_error(&format!(
                    "a frame of {len} bytes exceeds SETTINGS_MAX_FRAME_SIZE {MAX_FRAME}"
                )));
            }
            if self.input.len() < FRAME_HEADER + len {
                return Ok(());
            }
            let kind = self.input[3];
            let flags = self.input[4];
            let stream = u32::from_be_bytes([self.input[5], self.input[6], self.input[7], self.input[8]]) & 0x7fff_ffff;
            let frame: Vec<u8> = self.input.drain(..FRAME_HEADER + len).collect();
            let payload = &frame[FRAME_HEADER..];
            match (kind, self.pending.is_some()) {
                (HEADERS, false) => {
                    let mut p = payload;
                    let mut pad = 0;
                    if flags & PADDED != 0 {
                        pad = usize::from(*p.first().ok_or_else(|| protocol_error("empty padded frame"))?);
                        p = &p[1..];
                    }
                    let mut priority = Vec::new();
                    if flags & PRIORITY != 0 {
                        if p.len() < 5 {
                            return Err(protocol_error("short priority"));
                        }
                        priority = p[..5].to_vec();
                        p = &p[5..];
                    }
                    if pad > p.len() {
                        return Err(protocol_error("padding longer than frame"));
                    }
                    let block = p[..p.len() - pad].to_vec();
                    self.pending = Some((flags, stream, priority, block));
                    if flags & END_HEADERS != 0 {
                        self.flush_headers(out)?;
                    }
                }
                (CONTINUATION, true) => {
                    let pending = self.pending.as_mut().ok_or_else(|| protocol_error("stray CONTINUATION"))?;
                    if pending.1 != stream {
                        return Err(protocol_error("CONTINUATION on another stream"));
                    }
                    pending.3.extend_from_slice(payload);
                    if pending.3.len() > MAX_BLOCK {
                        return Err(protocol_error("header block too large"));
                    }
                    if flags & END_HEADERS != 0 {
                        self.flush_headers(out)?;
                    }
                }
                (_, true) => return Err(protocol_error("frame interleaved in a header block")),
                (CONTINUATION, false) => return Err(protocol_error("stray CONTINUATION")),
                _ => out.extend_from_slice(&frame),
            }
        }
    }

    fn flush_headers(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let Some((flags, stream, priority, block)) = self.pending.take() else { return Ok(()) };
        let mut headers = self.decoder.decode(&block).map_err(|e| protocol_error(&format!("HPACK: {e}")))?;
        for (name, value) in headers.iter_mut() {
            if name.as_slice() == b":authority" && !valid_authority(value) {
                *value = b"localhost".to_vec();
            }
        }
        let mut body = priority;
        body.extend(encode_literals(&headers));
        let first_flags = (flags & (END_STREAM | PRIORITY)) | if body.len() <= MAX_FRAME { END_HEADERS } else { 0 };
        let mut chunks = body.chunks(MAX_FRAME).peekable();
        let mut kind = HEADERS;
        let mut frame_flags = first_flags;
        while let Some(chunk) = chunks.next() {
            if kind == CONTINUATION {
                frame_flags = if chunks.peek().is_none() { END_HEADERS } else { 0 };
            }
            let len = chunk.len();
            out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, frame_flags]);
            out.extend_from_slice(&stream.to_be_bytes());
            out.extend_from_slice(chunk);
            kind = CONTINUATION;
        }
        if body.is_empty() {
            out.extend_from_slice(&[0, 0, 0, HEADERS, first_flags | END_HEADERS]);
            out.extend_from_slice(&stream.to_be_bytes());
        }
        Ok(())
    }
}

/// A stream whose reads pass through a [`Rewriter`]; writes are untouched.
pub struct FixAuthority<S> {
    inner: S,
    rewriter: Rewriter,
    ready: Vec<u8>,
    pos: usize,
}

impl<S> FixAuthority<S> {
    pub fn new(inner: S) -> Self {
        FixAuthority { inner, rewriter: Rewriter::default(), ready: Vec::new(), pos: 0 }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pos < this.ready.len() {
                let n = (this.ready.len() - this.pos).min(buf.remaining());
                buf.put_slice(&this.ready[this.pos..this.pos + n]);
                this.pos += n;
                if this.pos == this.ready.len() {
                    this.ready.clear();
                    this.pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut raw);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())), // EOF
                Poll::Ready(Ok(())) => {
                    let filled = rb.filled().to_vec();
                    this.rewriter.feed(&filled, &mut this.ready)?;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;

    /// (frame type, flags, decoded headers) of every frame after the preface.
    fn decode_all(bytes: &[u8]) -> Vec<(u8, u8, Headers)> {
        let mut rest = &bytes[PREFACE.len()..];
        let mut dec = loona_hpack::Decoder::new();
        let mut out = Vec::new();
        while rest.len() >= FRAME_HEADER {
            let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
            let headers = if kind == HEADERS { dec.decode(payload).unwrap() } else { vec![] };
            out.push((kind, flags, headers));
            rest = &rest[FRAME_HEADER + len..];
        }
        out
    }

    #[test]
    fn replaces_a_socket_path_authority_and_keeps_everything_else() {
        let mut enc = loona_hpack::Encoder::new();
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", b"%2Frun%2Fagent.sock"),
            (b"workload.spiffe.io", b"true"),
        ];
        let block = enc.encode(headers.iter().copied());
        // The same headers again: the client's encoder now refers to its dynamic table.
        let block2 = enc.encode(headers.iter().copied());
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
                                             // First block split across HEADERS + CONTINUATION, padded.
        let (a, b) = block.split_at(block.len() / 2);
        let mut padded = vec![3u8];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, PADDED, 1, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0")); // DATA
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &block2));

        // Fed one byte at a time, to exercise every partial state.
        let mut rw = Rewriter::default();
        let mut out = Vec::new();
        for byte in &input {
            rw.feed(std::slice::from_ref(byte), &mut out).unwrap();
        }
        let frames = decode_all(&out);
        assert_eq!(frames.iter().map(|f| f.0).collect::<Vec<_>>(), vec![0x4, HEADERS, 0x0, HEADERS]);
        for (i, flags) in [(1, END_HEADERS), (3, END_HEADERS | END_STREAM)] {
            let (_, f, h) = &frames[i];
            assert_eq!(*f, flags);
            let auth = h.iter().find(|(n, _)| n == b":authority").unwrap();
            assert_eq!(auth.1, b"localhost");
            assert!(h.iter().any(|(n, v)| n == b"workload.spiffe.io" && v == b"true"));
            assert!(h.iter().any(|(n, v)| n == b":path" && v == b"/SpiffeWorkloadAPI/FetchX509SVID"));
        }
        assert_eq!(frames[2].1, END_STREAM, "DATA passes through untouched");
    }

    #[test]
    fn valid_authorities_are_kept_and_garbage_is_refused() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([(&b":authority"[..], &b"localhost:8080"[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let mut out = Vec::new();
        Rewriter::default().feed(&input, &mut out).unwrap();
        assert_eq!(decode_all(&out)[0].2[0].1, b"localhost:8080");

        assert!(Rewriter::default().feed(b"GET / HTTP/1.1\r\n", &mut Vec::new()).is_err());
        let mut bad = PREFACE.to_vec();
        bad.extend(frame(CONTINUATION, END_HEADERS, 1, b"x"));
        assert!(Rewriter::default().feed(&bad, &mut Vec::new()).is_err());
        let mut bad = PREFACE.to_vec();
        bad.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]));
        assert!(Rewriter::default().feed(&bad, &mut Vec::new()).is_err());
    }

    #[test]
    fn a_client_cannot_make_the_agent_buffer_more_than_a_frame() {
        // A frame header announcing 16 MiB is refused at once, before its payload arrives.
        let mut big = PREFACE.to_vec();
        big.extend_from_slice(&[0xff, 0xff, 0xff, 0x0, 0x0, 0, 0, 0, 1]);
        let err = Rewriter::default().feed(&big, &mut Vec::new()).unwrap_err().to_string();
        assert!(err.contains("exceeds SETTINGS_MAX_FRAME_SIZE 16384"), "{err}");
        // A header block continued past 64 KiB is refused.
        let mut r = Rewriter::default();
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0u8; 16_000]));
        r.feed(&input, &mut Vec::new()).unwrap();
        let mut failed = false;
        for _ in 0..8 {
            if r.feed(&frame(CONTINUATION, 0, 1, &[0u8; 16_000]), &mut Vec::new()).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "a 64 KiB+ header block was buffered");
    }
}
