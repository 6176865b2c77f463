//! aya-log messages written by the kernel programs arrive in the agent's tracing output.

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use sandbox::{require_root, CgroupGuard};
use tether_agent::{cgroup::Cgroup, ebpf};
use tether_tests::bash_connect;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn kernel_side_log_reaches_tracing() {
    require_root().unwrap();
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).init();

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cg = CgroupGuard::new("logs").unwrap();
    let denied = cg.child("denied").unwrap();
    let _hook = ebpf::Floor::deny_connect_logged(&[Cgroup::open(denied.path()).unwrap()]).unwrap();
    assert!(!denied.run(&mut bash_connect(port)).unwrap().status.success());

    let want = format!("connect4 denied: cgroup {}", denied.id().unwrap());
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
        if text.contains(&want) {
            assert!(text.contains("WARN"), "kernel warn! should arrive at warn level: {text}");
            return;
        }
    }
    panic!("kernel log line {want:?} never reached tracing: {}", String::from_utf8_lossy(&captured.0.lock().unwrap()));
}
