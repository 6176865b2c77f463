//! The floor programs the benchmarks compare against do what they claim: the deny-only
//! connect4 (the B3 baseline) refuses with EPERM and its SYN never reaches the listener, the
//! allow-only hook set lets everything through; neither attaches to the root cgroup.

use std::{net::TcpListener, time::Duration};

use sandbox::{require_root, CgroupGuard};
use tether_agent::{cgroup::Cgroup, ebpf::Floor};
use tether_tests::bash_connect;

#[test]
fn the_refusal_floor_refuses_and_the_allow_floor_allows() {
    require_root().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let cg = CgroupGuard::new("floor").unwrap();
    let allowed = cg.child("allowed").unwrap();
    let denied = cg.child("denied").unwrap();
    let _allow = Floor::allow_all(&[Cgroup::open(allowed.path()).unwrap()]).unwrap();
    let _deny = Floor::deny_connect(&[Cgroup::open(denied.path()).unwrap()]).unwrap();

    let out = allowed.run(&mut bash_connect(port)).unwrap();
    assert!(out.status.success(), "allowed connect failed: {}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_millis(100));
    assert!(listener.accept().is_ok(), "allowed connection did not arrive");

    let out = denied.run(&mut bash_connect(port)).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Operation not permitted"), "expected EPERM, got: {stderr}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(listener.accept().is_err(), "a denied connection reached the listener");

    // Outside the hooked cgroups nothing changes.
    let out = bash_connect(port).output().unwrap();
    assert!(out.status.success());
}

#[test]
fn floors_refuse_the_root_cgroup() {
    require_root().unwrap();
    let root = Cgroup::open(&sandbox::cgroup2_root().unwrap()).unwrap();
    for err in [Floor::allow_all(std::slice::from_ref(&root)).err(), Floor::deny_connect(&[root]).err()] {
        let err = err.expect("attached to the root cgroup");
        assert!(err.to_string().contains("root cgroup"), "{err}");
    }
}
