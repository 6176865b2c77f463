//! Carries one stream: bytes between an application's TCP connection and an HTTP/2 stream,
//! both ways, with half-close (a TCP FIN becomes END_STREAM and back), h2 flow control
//! respected (nothing is buffered beyond the peer's window), until both directions ended,
//! either side reset, or the stream is closed from outside (revocation).

use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
    sync::watch,
};

use super::streams::Stream;

/// Reads from the application at most this much at a time.
const CHUNK: usize = 64 * 1024;

/// How a direction ended.
enum End {
    /// Its sender finished (FIN, or END_STREAM).
    Done,
    /// The peer reset the stream.
    PeerReset,
    /// The application reset (or broke) its connection.
    AppReset,
}

async fn tcp_to_h2(mut rd: OwnedReadHalf, send: &mut SendStream<Bytes>, s: &Stream, count_up: bool) -> End {
    loop {
        let mut buf = BytesMut::with_capacity(CHUNK);
        match rd.read_buf(&mut buf).await {
            Ok(0) => {
                return match send.send_data(Bytes::new(), true) {
                    Ok(()) => End::Done,
                    Err(_) => End::PeerReset,
                };
            }
            Ok(n) => {
                let counter = if count_up { &s.up } else { &s.down };
                counter.fetch_add(n as u64, Ordering::Relaxed);
                let mut data = buf.freeze();
                while !data.is_empty() {
                    send.reserve_capacity(data.len());
                    let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                        Some(Ok(c)) => c,
                        _ => return End::PeerReset,
                    };
                    if cap == 0 {
                        continue;
                    }
                    let chunk = data.split_to(cap.min(data.len()));
                    if send.send_data(chunk, false).is_err() {
                        return End::PeerReset;
                    }
                }
            }
            Err(_) => return End::AppReset,
        }
    }
}

async fn h2_to_tcp(mut recv: RecvStream, wr: &mut OwnedWriteHalf, s: &Stream, count_up: bool) -> End {
    loop {
        match recv.data().await {
            Some(Ok(data)) => {
                let n = data.len();
                if wr.write_all(&data).await.is_err() {
                    return End::AppReset;
                }
                let _ = recv.flow_control().release_capacity(n);
                let counter = if count_up { &s.up } else { &s.down };
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            Some(Err(_)) => return End::PeerReset,
            None => {
                let _ = wr.shutdown().await;
                return End::Done;
            }
        }
    }
}

/// Carries `s` until it ends and returns why. `client_side`: the TCP end is the client
/// application (bytes it writes count as `up`); else the server application.
pub async fn splice(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    recv: RecvStream,
    s: &Stream,
    mut close: watch::Receiver<Option<String>>,
    client_side: bool,
) -> String {
    let (rd, mut wr) = tcp.into_split();
    let up = tcp_to_h2(rd, &mut send, s, client_side);
    let down = h2_to_tcp(recv, &mut wr, s, !client_side);
    let both = async {
        tokio::pin!(up, down);
        let (mut a, mut b) = (None, None);
        loop {
            tokio::select! {
                r = &mut up, if a.is_none() => {
                    if !matches!(r, End::Done) { return r; }
                    a = Some(r);
                }
                r = &mut down, if b.is_none() => {
                    if !matches!(r, End::Done) { return r; }
                    b = Some(r);
                }
            }
            if a.is_some() && b.is_some() {
                return End::Done;
            }
        }
    };
    let closed = async {
        loop {
            if let Some(reason) = close.borrow_and_update().clone() {
                return reason;
            }
            if close.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    };
    let (reason, reset) = tokio::select! {
        end = both => match end {
            End::Done => ("closed".to_owned(), false),
            End::PeerReset => ("reset by peer".to_owned(), true),
            End::AppReset => ("reset by application".to_owned(), true),
        },
        reason = closed => (reason, true),
    };
    if reset {
        send.send_reset(h2::Reason::CANCEL);
        // The application sees a reset, never an orderly end it could take for complete:
        // no FIN (forget), and linger 0 makes the close a RST.
        let _ = wr.as_ref().set_zero_linger();
        wr.forget();
    }
    reason
}
