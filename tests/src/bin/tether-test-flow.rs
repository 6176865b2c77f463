//! Network workloads for the agent-level enforcement tests (tests/enforcement.rs), run in test
//! cgroups inside test network namespaces. Every outcome is a line on stdout:
//!
//! - `serve PORT`: listens on 0.0.0.0:PORT; `listening`, then `accept` per connection and
//!   `data LINE` per line received.
//! - `serve-unbound`: as `serve`, on a socket that calls listen() without bind() (the kernel
//!   picks the port; no bind hook runs): `listening PORT`, then as `serve`.
//! - `send ADDR PORT TAG COUNT INTERVAL_MS`: connects (2 s timeout): `connected` or
//!   `connect-error ERRNO`; then COUNT lines (`TAG`, or `TAG-i` when COUNT > 1), `sent` after
//!   each, `write-error ERRNO` if one fails.
//! - `send-after MS ADDR PORT TAG`: sleeps MS milliseconds from its start, then as `send`
//!   with one line.
//! - `churn ADDR PORT MILLIS`: new connections (1 s timeout) with one line each, for MILLIS;
//!   `done ok N fail M`.
//! - `exec-after-connect ADDR PORT PROGRAM ARGS...`: connects, sends `before-exec`, then execs
//!   PROGRAM with the connection as fd 3.
//! - `socket KIND`: makes one socket of KIND (`tcp`, `udp`, `raw-udp`, `icmp`, `udplite`,
//!   `sctp`, `tcp6`): `created` or `socket-error ERRNO`.
//! - `icmp-echo ADDR TEXT`: an ICMP echo with TEXT as payload through a datagram ("ping")
//!   socket: `reply`, `no-reply` or `socket-error ERRNO`.
//! - `udp-fill N`: binds N UDP sockets to port 0 (each closed after): `done ok N fail M`.
//! - `socket-churn N`: N child processes (forked) each make one TCP socket, bind it to
//!   port 0 (a bind stamps the socket even for a process without identity) and exit:
//!   `done ok N fail M` (fail: socket() or bind() refused).
//! - `bind-hold PORT MILLIS`: binds a TCP listener on 0.0.0.0:PORT, says `bound` or
//!   `bind-error ERRNO`, holds it MILLIS ms.
//!
//! Tunnel workloads (tests/tunnel.rs); byte streams come from a fixed generator, so either
//! end knows the sha256 of what the other sent:
//! - `bulk-serve PORT REPLY_BYTES`: per connection, reads to EOF (`recv N SHA256`), then sends
//!   REPLY_BYTES (`sent N SHA256`) and closes.
//! - `bulk-send ADDR PORT BYTES`: connects (`peername ADDR:PORT` as getpeername() shows it),
//!   sends BYTES (`sent N SHA256`), half-closes, reads to EOF (`recv N SHA256`); `error ...`.
//! - `bulk-many ADDR PORT N BYTES REPLY_BYTES`: N connections at once (all connected before
//!   any sends), each a bulk-send checked against the expected hashes: `done ok N fail M`.
//! - `echo-serve PORT [PEER_SOCKET]`: echoes lines (`data LINE`); with PEER_SOCKET, asks the
//!   agent who each accepted connection comes from: `peer-id JSON`.
//! - `hold ADDR PORT INTERVAL_MS MILLIS`: one connection, a line every INTERVAL_MS echoed
//!   back (`echo I`), for MILLIS: `held N`, or `broken WHY after MS` as soon as it fails.
//! - `connect-time ADDR PORT`: one connect and one read: `connect-error ERRNO MS`, or
//!   `read-end WHAT MS` (what the first read saw: `eof`, `reset`, `data`).

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(if e.kind() == std::io::ErrorKind::TimedOut { libc::ETIMEDOUT } else { -1 })
}

fn connect(addr: &str, port: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let sa: SocketAddr =
        format!("{addr}:{port}").parse().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    TcpStream::connect_timeout(&sa, timeout)
}

/// A listener on 0.0.0.0:`port`, announced with `listening` (or `bind-error ERRNO`).
fn listening(port: &str) -> Option<TcpListener> {
    match TcpListener::bind(format!("0.0.0.0:{port}")) {
        Ok(l) => {
            say("listening");
            Some(l)
        }
        Err(e) => {
            say(&format!("bind-error {}", errno(&e)));
            None
        }
    }
}

fn serve(port: &str) {
    if let Some(listener) = listening(port) {
        accept_lines(listener);
    }
}

fn serve_unbound() {
    match tether_tests::listener_without_bind() {
        Ok(listener) => {
            say(&format!("listening {}", listener.local_addr().map(|a| a.port()).unwrap_or(0)));
            accept_lines(listener);
        }
        Err(e) => say(&format!("listen-error {}", errno(&e))),
    }
}

fn accept_lines(listener: TcpListener) {
    for conn in listener.incoming().flatten() {
        say("accept");
        std::thread::spawn(move || {
            for line in BufReader::new(conn).lines().map_while(Result::ok) {
                say(&format!("data {line}"));
            }
        });
    }
}

fn send(addr: &str, port: &str, tag: &str, count: u64, interval: Duration) {
    let mut s = match connect(addr, port, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return say(&format!("connect-error {}", errno(&e))),
    };
    say("connected");
    for i in 0..count {
        let line = if count == 1 { format!("{tag}\n") } else { format!("{tag}-{i}\n") };
        if let Err(e) = s.write_all(line.as_bytes()) {
            return say(&format!("write-error {}", errno(&e)));
        }
        say("sent");
        std::thread::sleep(interval);
    }
    // Let the last bytes reach the receiver before the close.
    std::thread::sleep(Duration::from_millis(100));
}

fn churn(addr: &str, port: &str, millis: u64) {
    let (mut ok, mut fail) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(millis) {
        match connect(addr, port, Duration::from_secs(1)).and_then(|mut s| s.write_all(b"churn\n")) {
            Ok(()) => ok += 1,
            Err(_) => fail += 1,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    say(&format!("done ok {ok} fail {fail}"));
}

fn exec_after_connect(addr: &str, port: &str, argv: &[String]) {
    use std::{ffi::CString, os::fd::AsRawFd};
    let mut s = match connect(addr, port, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return say(&format!("connect-error {}", errno(&e))),
    };
    if s.write_all(b"before-exec\n").is_err() {
        return say("write-error");
    }
    say("sent before-exec");
    std::thread::sleep(Duration::from_millis(200));
    let args: Vec<CString> = argv.iter().filter_map(|a| CString::new(a.as_str()).ok()).collect();
    let Some(program) = args.first() else { return say("no program") };
    let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: dup2 onto fd 3 (not close-on-exec) and execv with NUL-terminated arguments.
    unsafe {
        libc::dup2(s.as_raw_fd(), 3);
        libc::execv(program.as_ptr(), ptrs.as_ptr());
    }
    say("exec-error");
}

/// One socket of a kind; the errno if refused.
fn make_socket(kind: &str) -> Result<i32, i32> {
    let (family, ty, proto) = match kind {
        "tcp" => (libc::AF_INET, libc::SOCK_STREAM, 0),
        "udp" => (libc::AF_INET, libc::SOCK_DGRAM, 0),
        "raw-udp" => (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP),
        "icmp" => (libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
        "udplite" => (libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE),
        "sctp" => (libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP),
        "tcp6" => (libc::AF_INET6, libc::SOCK_STREAM, 0),
        _ => return Err(-1),
    };
    // SAFETY: a plain socket(2) call.
    let fd = unsafe { libc::socket(family, ty, proto) };
    if fd < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1))
    } else {
        Ok(fd)
    }
}

fn socket(kind: &str) {
    match make_socket(kind) {
        Ok(_) => say("created"),
        Err(e) => say(&format!("socket-error {e}")),
    }
}

fn icmp_echo(addr: &str, text: &str) {
    let fd = match make_socket("icmp") {
        Ok(fd) => fd,
        Err(e) => return say(&format!("socket-error {e}")),
    };
    let Ok(ip) = addr.parse::<std::net::Ipv4Addr>() else { return say("bad address") };
    // type 8 (echo), code 0, checksum (the kernel fills it for ping sockets), id, seq 1.
    let mut packet = vec![8u8, 0, 0, 0, 0, 0, 0, 1];
    packet.extend_from_slice(text.as_bytes());
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip.octets()) },
        sin_zero: [0; 8],
    };
    let tv = libc::timeval { tv_sec: 1, tv_usec: 0 };
    // SAFETY: plain socket calls on buffers that live across them.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as u32,
        );
        if libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        ) < 0
        {
            return say(&format!("send-error {}", std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)));
        }
        let mut buf = [0u8; 512];
        let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
        say(if n > 0 { "reply" } else { "no-reply" });
    }
}

fn udp_fill(n: u64) {
    let (mut ok, mut fail) = (0u64, 0u64);
    for _ in 0..n {
        match std::net::UdpSocket::bind("0.0.0.0:0") {
            Ok(_) => ok += 1,
            Err(_) => fail += 1,
        }
    }
    say(&format!("done ok {ok} fail {fail}"));
}

fn socket_churn(n: u64) {
    let (mut ok, mut fail) = (0u64, 0u64);
    for _ in 0..n {
        // SAFETY: the child only calls socket(2), bind(2) and _exit, async-signal-safe.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: as above; an all-zero sockaddr_in is 0.0.0.0:0 once the family is set.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if fd < 0 {
                    libc::_exit(1);
                }
                let mut addr: libc::sockaddr_in = std::mem::zeroed();
                addr.sin_family = libc::AF_INET as libc::sa_family_t;
                let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                let bound = libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), len);
                libc::_exit(if bound < 0 { 1 } else { 0 });
            }
        }
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            ok += 1;
        } else {
            fail += 1;
        }
    }
    say(&format!("done ok {ok} fail {fail}"));
}

fn bind_hold(port: &str, millis: u64) {
    match TcpListener::bind(format!("0.0.0.0:{port}")) {
        Ok(_l) => {
            say("bound");
            std::thread::sleep(Duration::from_millis(millis));
        }
        Err(e) => say(&format!("bind-error {}", errno(&e))),
    }
}

/// The byte stream both ends agree on (xorshift64), `n` bytes.
struct Gen(u64);

impl Gen {
    fn new() -> Gen {
        Gen(0x9e37_79b9_7f4a_7c15)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `n` generated bytes; their sha256.
fn write_gen(s: &mut impl Write, n: u64) -> std::io::Result<String> {
    use sha2::Digest;
    let mut g = Gen::new();
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        g.fill(&mut buf[..k]);
        h.update(&buf[..k]);
        s.write_all(&buf[..k])?;
        left -= k as u64;
    }
    Ok(hex(&h.finalize()))
}

/// Reads to EOF: (bytes, sha256).
fn read_all(s: &mut TcpStream) -> std::io::Result<(u64, String)> {
    use sha2::Digest;
    use std::io::Read;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = s.read(&mut buf)?;
        if k == 0 {
            return Ok((n, hex(&h.finalize())));
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

/// The sha256 of `n` generated bytes.
fn gen_sha(n: u64) -> String {
    write_gen(&mut std::io::sink(), n).expect("writing to a sink cannot fail")
}

fn bulk_serve(port: &str, reply: u64) {
    let Some(listener) = listening(port) else { return };
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut conn = conn;
            match read_all(&mut conn) {
                Ok((n, sha)) => say(&format!("recv {n} {sha}")),
                Err(e) => return say(&format!("error read {}", errno(&e))),
            }
            match write_gen(&mut conn, reply) {
                Ok(sha) => say(&format!("sent {reply} {sha}")),
                Err(e) => say(&format!("error write {}", errno(&e))),
            }
        });
    }
}

/// One bulk exchange; (sent sha, received bytes, received sha).
fn bulk_once(s: &mut TcpStream, bytes: u64) -> std::io::Result<(String, u64, String)> {
    let sent = write_gen(s, bytes)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let (n, sha) = read_all(s)?;
    Ok((sent, n, sha))
}

fn bulk_send(addr: &str, port: &str, bytes: u64) {
    let mut s = match connect(addr, port, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return say(&format!("connect-error {}", errno(&e))),
    };
    if let Ok(p) = s.peer_addr() {
        say(&format!("peername {p}"));
    }
    match bulk_once(&mut s, bytes) {
        Ok((sent, n, sha)) => {
            say(&format!("sent {bytes} {sent}"));
            say(&format!("recv {n} {sha}"));
        }
        Err(e) => say(&format!("error {}", errno(&e))),
    }
}

fn bulk_many(addr: &str, port: &str, n: u64, bytes: u64, reply: u64) {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n as usize));
    let want = gen_sha(reply);
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (addr, port, barrier, want) = (addr.to_owned(), port.to_owned(), barrier.clone(), want.clone());
            std::thread::spawn(move || {
                let conn = connect(&addr, &port, Duration::from_secs(10));
                // Every connection is open before any sends: n streams at once.
                barrier.wait();
                let mut s = conn.ok()?;
                let (_, got, sha) = bulk_once(&mut s, bytes).ok()?;
                (got == reply && sha == want).then_some(())
            })
        })
        .collect();
    let ok = threads.into_iter().map(|t| t.join().ok().flatten().is_some()).filter(|x| *x).count() as u64;
    say(&format!("done ok {ok} fail {}", n - ok));
}

fn echo_serve(port: &str, peer_socket: Option<&str>) {
    let Some(listener) = listening(port) else { return };
    for conn in listener.incoming().flatten() {
        say("accept");
        if let (Some(sock), Ok(peer), Ok(local)) = (peer_socket, conn.peer_addr(), conn.local_addr()) {
            // Who is this? The agent knows the tunnel stream behind the connection.
            let answer = std::os::unix::net::UnixStream::connect(sock).and_then(|mut u| {
                u.write_all(format!("{peer} {local}\n").as_bytes())?;
                let mut line = String::new();
                BufReader::new(u).read_line(&mut line)?;
                Ok(line)
            });
            match answer {
                Ok(line) => say(&format!("peer-id {}", line.trim())),
                Err(e) => say(&format!("peer-id-error {e}")),
            }
        }
        std::thread::spawn(move || {
            let mut w = match conn.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            for line in BufReader::new(conn).lines().map_while(Result::ok) {
                say(&format!("data {line}"));
                if w.write_all(format!("{line}\n").as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
}

fn hold(addr: &str, port: &str, interval: Duration, millis: u64) {
    let start = Instant::now();
    let s = match connect(addr, port, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return say(&format!("connect-error {}", errno(&e))),
    };
    say("connected");
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let (mut w, mut r) = match s.try_clone() {
        Ok(w) => (w, BufReader::new(s)),
        Err(e) => return say(&format!("broken clone {} after 0", errno(&e))),
    };
    let mut i = 0u64;
    while start.elapsed() < Duration::from_millis(millis) {
        let ms = start.elapsed().as_millis();
        if let Err(e) = w.write_all(format!("ping-{i}\n").as_bytes()) {
            return say(&format!("broken write-{} after {ms}", errno(&e)));
        }
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return say(&format!("broken eof after {}", start.elapsed().as_millis())),
            Ok(_) if line.trim() == format!("ping-{i}") => say(&format!("echo {i}")),
            Ok(_) => return say(&format!("broken garbled after {}", start.elapsed().as_millis())),
            Err(e) => return say(&format!("broken read-{} after {}", errno(&e), start.elapsed().as_millis())),
        }
        i += 1;
        std::thread::sleep(interval);
    }
    say(&format!("held {i}"));
}

fn connect_time(addr: &str, port: &str) {
    use std::io::Read;
    let start = Instant::now();
    let mut s = match connect(addr, port, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => return say(&format!("connect-error {} {}", errno(&e), start.elapsed().as_millis())),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(b"hello\n");
    let mut buf = [0u8; 64];
    let what = match s.read(&mut buf) {
        Ok(0) => "eof".to_owned(),
        Ok(_) => "data".to_owned(),
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => "reset".to_owned(),
        Err(e) => format!("error-{}", errno(&e)),
    };
    say(&format!("read-end {what} {}", start.elapsed().as_millis()));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    let n = |i: usize| a(i).parse::<u64>().unwrap_or(0);
    match a(0) {
        "serve" => serve(a(1)),
        "serve-unbound" => serve_unbound(),
        "send" => send(a(1), a(2), a(3), n(4), Duration::from_millis(n(5))),
        "send-after" => {
            std::thread::sleep(Duration::from_millis(n(1)));
            send(a(2), a(3), a(4), 1, Duration::ZERO)
        }
        "churn" => churn(a(1), a(2), n(3)),
        "exec-after-connect" => exec_after_connect(a(1), a(2), args.get(3..).unwrap_or_default()),
        "socket" => socket(a(1)),
        "icmp-echo" => icmp_echo(a(1), a(2)),
        "udp-fill" => udp_fill(n(1)),
        "socket-churn" => socket_churn(n(1)),
        "bind-hold" => bind_hold(a(1), n(2)),
        "bulk-serve" => bulk_serve(a(1), n(2)),
        "bulk-send" => bulk_send(a(1), a(2), n(3)),
        "bulk-many" => bulk_many(a(1), a(2), n(3), n(4), n(5)),
        "echo-serve" => echo_serve(a(1), args.get(2).map(String::as_str)),
        "hold" => hold(a(1), a(2), Duration::from_millis(n(3)), n(4)),
        "connect-time" => connect_time(a(1), a(2)),
        other => {
            eprintln!("unknown mode {other:?}");
            std::process::exit(2);
        }
    }
}
