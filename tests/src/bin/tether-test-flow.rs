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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    let n = |i: usize| a(i).parse::<u64>().unwrap_or(0);
    match a(0) {
        "serve" => serve(a(1)),
        "send" => send(a(1), a(2), a(3), n(4), Duration::from_millis(n(5))),
        "churn" => churn(a(1), a(2), n(3)),
        "exec-after-connect" => exec_after_connect(a(1), a(2), args.get(3..).unwrap_or_default()),
        other => {
            eprintln!("unknown mode {other:?}");
            std::process::exit(2);
        }
    }
}
