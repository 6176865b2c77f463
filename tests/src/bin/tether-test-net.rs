//! A network workload for the enforcement tests, run inside test cgroups:
//!
//! - `listen <port> [<addr>]`: a TCP listener on 127.0.0.1 (or `addr`; port 0 = any port).
//!   Prints `port N` once, then
//!   `accept` for each connection, `data <line>` for each line received and `eof` when a
//!   peer closes.
//! - `listen-unbound`: as `listen`, on a socket that calls listen() without bind() (the
//!   kernel picks the port; no bind hook runs).
//! - `udp-send <port> <text>`: one unconnected `sendto` (never bound first, so no bind hook
//!   runs) to 127.0.0.1; prints `sent` or `error <errno>`.
//! - `udp-ask <port> <text> <ms> [<addr>]`: as `udp-send` (to `addr`, default 127.0.0.1),
//!   then prints `reply <port> <text>` for each datagram the same socket receives within `ms`
//!   milliseconds (the sender's port), then `done`.
//! - `connect-when-told <port>`: makes a TCP socket and prints `socket`; then for each line
//!   on stdin connects it to 127.0.0.1:port, printing `connected` (and exiting) or
//!   `connect-error <errno>`.
//! - `connect-from-child <port> [creator-exits]`: makes a TCP socket, forks; the child
//!   connects it to 127.0.0.1:port (after this process exited, with `creator-exits`) and
//!   prints `child connected` or `child connect-error <errno>`.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    os::fd::FromRawFd,
};

fn listen(port: u16, addr: &str) {
    match TcpListener::bind((addr, port)) {
        Ok(l) => serve(l),
        Err(e) => {
            println!("bind-error {}", e.raw_os_error().unwrap_or(0));
            std::process::exit(1);
        }
    }
}

fn listen_unbound() {
    match tether_tests::listener_without_bind() {
        Ok(l) => serve(l),
        Err(e) => {
            println!("listen-error {}", e.raw_os_error().unwrap_or(0));
            std::process::exit(1);
        }
    }
}

fn connect_when_told(port: u16) {
    // SAFETY: plain socket calls on a sockaddr_in built here.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        println!("socket-error {}", std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        std::process::exit(1);
    }
    println!("socket");
    for _ in std::io::stdin().lines() {
        match connect_fd(fd, port) {
            0 => {
                println!("connected");
                return;
            }
            e => println!("connect-error {e}"),
        }
    }
}

/// 127.0.0.1:`port`.
fn loopback(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([127, 0, 0, 1]) },
        sin_zero: [0; 8],
    }
}

/// Connects `fd` to 127.0.0.1:`port`: 0 or the errno.
fn connect_fd(fd: i32, port: u16) -> i32 {
    let addr = loopback(port);
    // SAFETY: a sockaddr_in built here, a plain connect.
    let rc = unsafe {
        libc::connect(fd, (&addr as *const libc::sockaddr_in).cast(), size_of::<libc::sockaddr_in>() as libc::socklen_t)
    };
    if rc == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// A socket made here, connected by a forked child once this process has exited (`exits`)
/// or while it still runs.
fn connect_from_child(port: u16, exits: bool) {
    use std::io::Write;
    // SAFETY: plain socket and process calls; the child only connects, prints and exits.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            println!("socket-error {}", std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            std::process::exit(1);
        }
        let parent = libc::getpid();
        let _ = std::io::stdout().flush();
        let child = libc::fork();
        if child == 0 {
            if exits {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while libc::getppid() == parent && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            match connect_fd(fd, port) {
                0 => println!("child connected"),
                e => println!("child connect-error {e}"),
            }
            let _ = std::io::stdout().flush();
            libc::_exit(0);
        }
        if !exits {
            let mut status = 0;
            libc::waitpid(child, &mut status, 0);
        }
    }
}

fn serve(listener: TcpListener) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    println!("port {port}");
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        println!("accept");
        std::thread::spawn(move || {
            for line in BufReader::new(conn).lines() {
                match line {
                    Ok(l) => println!("data {l}"),
                    Err(_) => return,
                }
            }
            println!("eof");
        });
    }
}

/// Sends `text` to `to:port` from a new unconnected UDP socket that never bound (std's
/// `UdpSocket` binds first, so the socket is made here); returns the socket.
fn udp_send(to: std::net::Ipv4Addr, port: u16, text: &str) -> std::net::UdpSocket {
    // SAFETY: a plain socket call; the fd is owned by the UdpSocket made from it.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        println!("error {}", std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        std::process::exit(1);
    }
    // SAFETY: a new fd nobody else owns.
    let socket = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
    if let Err(e) = socket.send_to(text.as_bytes(), (to, port)) {
        println!("error {}", e.raw_os_error().unwrap_or(0));
        std::process::exit(1);
    }
    println!("sent");
    socket
}

fn udp_ask(to: std::net::Ipv4Addr, port: u16, text: &str, ms: u64) {
    let socket = udp_send(to, port, text);
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    let _ = socket.set_read_timeout(Some(std::time::Duration::from_millis(50)));
    while std::time::Instant::now() < deadline {
        let mut buf = [0u8; 256];
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            println!("reply {} {}", from.port(), String::from_utf8_lossy(&buf[..n]));
        }
    }
    println!("done");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port = |i: usize| args.get(i).and_then(|p| p.parse::<u16>().ok());
    match (args.get(1).map(String::as_str), port(2)) {
        (Some("listen"), Some(p)) => listen(p, args.get(3).map(String::as_str).unwrap_or("127.0.0.1")),
        (Some("udp-send"), Some(p)) => {
            udp_send(std::net::Ipv4Addr::LOCALHOST, p, args.get(3).map(String::as_str).unwrap_or("x"));
        }
        (Some("udp-ask"), Some(p)) => udp_ask(
            args.get(5).and_then(|a| a.parse().ok()).unwrap_or(std::net::Ipv4Addr::LOCALHOST),
            p,
            args.get(3).map(String::as_str).unwrap_or("x"),
            args.get(4).and_then(|m| m.parse().ok()).unwrap_or(1000),
        ),
        (Some("listen-unbound"), _) => listen_unbound(),
        (Some("connect-when-told"), Some(p)) => connect_when_told(p),
        (Some("connect-from-child"), Some(p)) => {
            connect_from_child(p, args.get(3).is_some_and(|a| a == "creator-exits"))
        }
        _ => {
            eprintln!(
                "usage: tether-test-net listen <port> [<addr>] | listen-unbound | udp-send <port> <text> | \
                 udp-ask <port> <text> <ms> [<addr>] | \
                 connect-when-told <port> | connect-from-child <port> [creator-exits]"
            );
            std::process::exit(2);
        }
    }
}
