//! A workload for the privileged tests: connects to a Unix socket and then does what the
//! scenario needs (exit, exec another binary with the connection still open, hold, fork).

use std::{
    io::Write,
    os::{fd::AsRawFd, unix::net::UnixStream, unix::process::CommandExt},
    process::Command,
    time::Duration,
};

fn connect(path: &str) -> UnixStream {
    let mut s = UnixStream::connect(path).expect("connect");
    s.write_all(b"c").expect("write");
    s
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        // connect, then exit at once
        Some("connect-exit") => {
            connect(&args[2]);
        }
        // connect, then hold the connection until killed
        Some("connect-hold") => {
            let _s = connect(&args[2]);
            std::thread::sleep(Duration::from_secs(600));
        }
        // connect, then exec args[3..] keeping the connection open across the exec
        Some("connect-exec") => {
            let s = connect(&args[2]);
            // SAFETY: clearing FD_CLOEXEC on our own open fd.
            unsafe { libc::fcntl(s.as_raw_fd(), libc::F_SETFD, 0) };
            std::mem::forget(s);
            let err = Command::new(&args[3]).args(&args[4..]).exec();
            panic!("exec failed: {err}");
        }
        // fork a child that never execs, start a thread; print "child_pid thread_tid"; hold
        Some("fork-hold") => {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                tx.send(unsafe { libc::gettid() }).unwrap();
                std::thread::sleep(Duration::from_secs(600));
            });
            let tid = rx.recv().unwrap();
            // SAFETY: the child only sleeps and exits.
            let child = unsafe { libc::fork() };
            if child == 0 {
                // SAFETY: async-signal-safe calls only.
                unsafe {
                    libc::sleep(600);
                    libc::_exit(0);
                }
            }
            println!("{child} {tid}");
            std::io::stdout().flush().unwrap();
            std::thread::sleep(Duration::from_secs(600));
        }
        _ => {
            eprintln!(
                "usage: tether-test-client connect-exit|connect-hold|connect-exec|fork-hold SOCKET [PROGRAM ARGS]"
            );
            std::process::exit(2);
        }
    }
}
