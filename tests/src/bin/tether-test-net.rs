//! A network workload for the enforcement tests, run inside test cgroups:
//!
//! - `listen <port> [<addr>]`: a TCP listener on 127.0.0.1 (or `addr`; port 0 = any port).
//!   Prints `port N` once, then
//!   `accept` for each connection, `data <line>` for each line received and `eof` when a
//!   peer closes.
//! - `udp-send <port> <text>`: one unconnected `sendto` (never bound first, so no bind hook
//!   runs) to 127.0.0.1; prints `sent` or `error <errno>`.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
};

fn listen(port: u16, addr: &str) {
    let listener = match TcpListener::bind((addr, port)) {
        Ok(l) => l,
        Err(e) => {
            println!("bind-error {}", e.raw_os_error().unwrap_or(0));
            std::process::exit(1);
        }
    };
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

fn udp_send(port: u16, text: &str) {
    // SAFETY: plain socket calls on a sockaddr_in built here.
    let rc = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            -1
        } else {
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([127, 0, 0, 1]) },
                sin_zero: [0; 8],
            };
            libc::sendto(
                fd,
                text.as_ptr().cast(),
                text.len(),
                0,
                &addr as *const libc::sockaddr_in as *const libc::sockaddr,
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) as i32
        }
    };
    if rc < 0 {
        println!("error {}", std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        std::process::exit(1);
    }
    println!("sent");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port = |i: usize| args.get(i).and_then(|p| p.parse::<u16>().ok());
    match (args.get(1).map(String::as_str), port(2)) {
        (Some("listen"), Some(p)) => listen(p, args.get(3).map(String::as_str).unwrap_or("127.0.0.1")),
        (Some("udp-send"), Some(p)) => udp_send(p, args.get(3).map(String::as_str).unwrap_or("x")),
        _ => {
            eprintln!("usage: tether-test-net listen <port> [<addr>] | udp-send <port> <text>");
            std::process::exit(2);
        }
    }
}
