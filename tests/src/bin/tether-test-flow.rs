//! Network workloads for the agent-level enforcement tests (tests/enforcement.rs), run in test
//! cgroups inside test network namespaces. Every outcome is a line on stdout:
//!
//! - `serve PORT`: listens on 0.0.0.0:PORT; `listening`, then `accept` per connection and
//!   `data LINE` per line received.
//! - `send ADDR PORT TAG COUNT INTERVAL_MS`: connects (2 s timeout): `connected` or
//!   `connect-error ERRNO`; then COUNT lines (`TAG`, or `TAG-i` when COUNT > 1), `sent` after
//!   each, `write-error ERRNO` if one fails.
//! - `churn ADDR PORT MILLIS`: new connections (1 s timeout) with one line each, for MILLIS;
//!   `done ok N fail M`.
//! - `exec-after-connect ADDR PORT PROGRAM ARGS...`: connects, sends `before-exec`, then execs
//!   PROGRAM with the connection as fd 3.
//! - `socket KIND`: makes one socket of KIND (`tcp`, `udp`, `raw-udp`, `icmp`, `udplite`,
//!   `sctp`, `tcp6`): `created` or `socket-error ERRNO`.
//! - `icmp-echo ADDR TEXT`: an ICMP echo with TEXT as payload through a datagram ("ping")
//!   socket: `reply`, `no-reply` or `socket-error ERRNO`.
//! - `udp-fill N`: binds N UDP sockets to port 0 (each closed after): `done ok N fail M`.
//! - `socket-churn N`: N child processes (forked) each make one TCP socket and exit:
//!   `done ok N fail M` (fail: socket() refused).
//! - `bind-hold PORT MILLIS`: binds a TCP listener on 0.0.0.0:PORT, says `bound` or
//!   `bind-error ERRNO`, holds it MILLIS ms.

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

fn serve(port: &str) {
    let listener = match TcpListener::bind(format!("0.0.0.0:{port}")) {
        Ok(l) => l,
        Err(e) => return say(&format!("bind-error {}", errno(&e))),
    };
    say("listening");
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
        // SAFETY: the child only calls socket(2) and _exit, async-signal-safe.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: as above.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                libc::_exit(if fd < 0 { 1 } else { 0 });
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    let n = |i: usize| a(i).parse::<u64>().unwrap_or(0);
    match a(0) {
        "serve" => serve(a(1)),
        "send" => send(a(1), a(2), a(3), n(4), Duration::from_millis(n(5))),
        "churn" => churn(a(1), a(2), n(3)),
        "exec-after-connect" => exec_after_connect(a(1), a(2), args.get(3..).unwrap_or_default()),
        "socket" => socket(a(1)),
        "icmp-echo" => icmp_echo(a(1), a(2)),
        "udp-fill" => udp_fill(n(1)),
        "socket-churn" => socket_churn(n(1)),
        "bind-hold" => bind_hold(a(1), n(2)),
        other => {
            eprintln!("unknown mode {other:?}");
            std::process::exit(2);
        }
    }
}
