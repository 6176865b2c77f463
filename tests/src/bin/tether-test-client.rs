//! A workload for the privileged tests: connects to a Unix socket and then does what the
//! scenario needs (exit, exec another binary with the connection still open, hold, fork, or
//! hand a Workload API connection to a forked child while the parent execs).

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
        // from a second thread with a credentials object of its own (prctl(PR_SET_KEEPCAPS)
        // makes one for the calling thread only): connect, then hold until killed
        Some("connect-thread-hold") => {
            let path = args[2].clone();
            std::thread::spawn(move || {
                // SAFETY: a plain prctl on this thread's credentials.
                assert_eq!(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) }, 0, "prctl");
                let _s = connect(&path);
                std::thread::sleep(Duration::from_secs(600));
            });
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
        // connect to the Workload API, fork; the parent execs args[4..] and the child asks
        // over the inherited connection (args[3]: `fetch`, one call after the exec, or
        // `stream`, a stream opened before the exec and read after it)
        Some("fork-exec") => fork_exec(&args[2], &args[3], &args[4..]),
        // one X.509-SVID fetch on a fresh connection: `ok <spiffe_id>` or `refused ...`
        Some("fetch") => {
            let conn = UnixStream::connect(&args[2]).expect("connect");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move { println!("{}", fetch_once(&mut client_over(conn).await).await) });
        }
        // open args[3] connections and keep them, then fetch on one more
        Some("flood") => {
            let n: usize = args[3].parse().expect("count");
            let _held: Vec<UnixStream> = (0..n).map(|_| UnixStream::connect(&args[2]).expect("connect")).collect();
            let conn = UnixStream::connect(&args[2]).expect("connect");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move { println!("{}", fetch_once(&mut client_over(conn).await).await) });
        }
        // sleep args[2] seconds (a victim's binary kept running)
        Some("hold") => std::thread::sleep(Duration::from_secs(args[2].parse().expect("seconds"))),
        _ => {
            eprintln!(
                "usage: tether-test-client connect-exit|connect-hold|connect-thread-hold|connect-exec|fork-hold|fetch SOCKET [PROGRAM ARGS]\n       tether-test-client fork-exec SOCKET fetch|stream PROGRAM [ARGS]\n       tether-test-client flood SOCKET N\n       tether-test-client hold SECONDS"
            );
            std::process::exit(2);
        }
    }
}

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0, "pipe2");
    // SAFETY: both fds are new and owned here.
    unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) }
}

/// The attack on a connection-scoped identity: the process that connected (and whose
/// credentials the agent saw at accept) execs something else — a setuid binary, a victim's
/// binary — while a child it forked keeps the connection and asks over it. Prints one line:
/// `ok <spiffe_id>` for an SVID, `refused <code> <message>`, or for `stream` first
/// `first <spiffe_id>` and then how the stream ended (`ended <code> <message>` or `more
/// <spiffe_id>` if the agent kept sending after the exec).
fn fork_exec(socket: &str, mode: &str, program: &[String]) {
    use std::io::Read;
    // Made while single-threaded, before any runtime exists: fork is safe here.
    let conn = UnixStream::connect(socket).expect("connect");
    // `exec`: the child tells the parent when to exec. `exec_done`: its write end is only in
    // the parent, close-on-exec, so the child reads end-of-file once the parent has exec'd.
    let (mut go_r, mut go_w) = pipe();
    let (mut done_r, done_w) = pipe();
    // SAFETY: single-threaded; the parent only reads a pipe and execs.
    let pid = unsafe { libc::fork() };
    if pid > 0 {
        drop(conn);
        drop(go_w);
        drop(done_r);
        let mut b = [0u8; 1];
        let _ = go_r.read(&mut b);
        let err = Command::new(&program[0]).args(&program[1..]).exec();
        panic!("exec failed: {err}");
    }
    drop(go_r);
    drop(done_w);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let mut client = client_over(conn).await;
        let wait_exec = |done_r: &mut std::fs::File| {
            let mut b = [0u8; 1];
            assert_eq!(done_r.read(&mut b).unwrap(), 0, "the parent wrote instead of exec'ing");
            // The kernel has replaced the parent's image; give the agent's exec tracer the same
            // moment the attacker would have.
            std::thread::sleep(Duration::from_millis(200));
        };
        match mode {
            "fetch" => {
                go_w.write_all(b"x").unwrap();
                wait_exec(&mut done_r);
                println!("{}", fetch_once(&mut client).await);
            }
            "stream" => {
                let mut stream = match client.fetch_x509svid(request(tether_proto::workload::X509svidRequest {})).await
                {
                    Ok(r) => r.into_inner(),
                    Err(s) => {
                        println!("refused {:?} {}", s.code(), s.message());
                        return;
                    }
                };
                match stream.message().await {
                    Ok(Some(m)) => println!("first {}", m.svids.first().map(|s| s.spiffe_id.as_str()).unwrap_or("")),
                    other => {
                        println!("refused first {other:?}");
                        return;
                    }
                }
                std::io::stdout().flush().unwrap();
                go_w.write_all(b"x").unwrap();
                wait_exec(&mut done_r);
                let next = tokio::time::timeout(Duration::from_secs(20), stream.message()).await;
                match next {
                    Ok(Ok(Some(m))) => {
                        println!("more {}", m.svids.first().map(|s| s.spiffe_id.as_str()).unwrap_or(""))
                    }
                    Ok(Ok(None)) => println!("ended eof"),
                    Ok(Err(s)) => println!("ended {:?} {}", s.code(), s.message()),
                    Err(_) => println!("open after 20 s"),
                }
            }
            other => panic!("unknown mode {other}"),
        }
    });
}

type Client = tether_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<tonic::transport::Channel>;

/// One FetchX509SVID answer: `ok <spiffe_id>` or `refused <code> <message>`.
async fn fetch_once(client: &mut Client) -> String {
    match client.fetch_x509svid(request(tether_proto::workload::X509svidRequest {})).await {
        Ok(resp) => match resp.into_inner().message().await {
            Ok(Some(m)) => format!("ok {}", m.svids.first().map(|s| s.spiffe_id.as_str()).unwrap_or("")),
            Ok(None) => "refused eof stream ended without a message".into(),
            Err(s) => format!("refused {:?} {}", s.code(), s.message()),
        },
        Err(s) => format!("refused {:?} {}", s.code(), s.message()),
    }
}

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("workload.spiffe.io", "true".parse().unwrap());
    req
}

/// A Workload API client over an already connected socket (used once: no reconnection).
async fn client_over(conn: UnixStream) -> Client {
    conn.set_nonblocking(true).unwrap();
    let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(conn)));
    let channel = tonic::transport::Endpoint::from_static("http://x.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let conn = slot.lock().unwrap().take();
            async move {
                let conn = conn.ok_or_else(|| std::io::Error::other("the inherited connection is gone"))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::from_std(conn)?))
            }
        }))
        .await
        .expect("HTTP/2 over the inherited connection");
    Client::new(channel)
}
