//! connect4 attached to a test cgroup: processes in denied cgroups get EPERM from connect(),
//! and the refused SYN never reaches the listener.

use std::{net::TcpListener, time::Duration};

use sandbox::{require_root, CgroupGuard};
use tether_agent::{cgroup::Cgroup, ebpf};
use tether_tests::bash_connect;

#[tokio::test]
async fn denied_cgroup_gets_eperm_and_listener_sees_nothing() {
    require_root().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let cg = CgroupGuard::new("connect").unwrap();
    let allowed = cg.child("allowed").unwrap();
    let denied = cg.child("denied").unwrap();
    let mut hook = ebpf::ConnectHook::attach(ebpf::load().unwrap(), &Cgroup::open(cg.path()).unwrap()).unwrap();
    hook.deny(&Cgroup::open(denied.path()).unwrap()).unwrap();

    let out = allowed.run(&mut bash_connect(port)).unwrap();
    assert!(out.status.success(), "allowed connect failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(listener.accept().is_ok(), "allowed connection did not arrive");

    let out = denied.run(&mut bash_connect(port)).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Operation not permitted"), "expected EPERM, got: {stderr}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(listener.accept().is_err(), "a denied connection reached the listener");

    // Outside the hooked cgroup nothing changes.
    let out = bash_connect(port).output().unwrap();
    assert!(out.status.success());
}

#[test]
fn refuses_to_attach_to_the_root_cgroup() {
    require_root().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let root = Cgroup::open(&sandbox::cgroup2_root().unwrap()).unwrap();
    let err = ebpf::ConnectHook::attach(ebpf::load().unwrap(), &root).err().expect("attached to the root cgroup");
    assert!(err.to_string().contains("root cgroup"), "{err}");
}
