//! The harness itself: guards create real kernel objects and remove them, also on panic.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use sandbox::{require_root, CgroupGuard, NetnsGuard};

fn netns_exists(name: &str) -> bool {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().any(|l| l.split_whitespace().next() == Some(name))
}

#[test]
fn guards_clean_up_after_a_panic() {
    require_root().unwrap();
    let mut made: Option<(PathBuf, PathBuf, String)> = None;
    let mut sleeper_child = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cg = CgroupGuard::new("panic").unwrap();
        let child = cg.child("leaf").unwrap();
        // A process left running inside: the guard must end it to remove the cgroup.
        let mut sleeper = Command::new("sleep");
        sleeper.arg("600");
        child.place(&mut sleeper).unwrap();
        sleeper_child = Some(sleeper.spawn().unwrap());
        let ns = NetnsGuard::new("panic").unwrap();
        made = Some((cg.path().to_owned(), child.path().to_owned(), ns.name().to_owned()));
        assert!(cg.path().exists() && netns_exists(ns.name()));
        panic!("test body fails");
    }));
    assert!(result.is_err());
    let (cg, child, ns) = made.unwrap();
    assert!(!child.exists(), "child cgroup {} left behind", child.display());
    assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    assert!(!netns_exists(&ns), "netns {ns} left behind");
    let status = sleeper_child.unwrap().wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
}

#[test]
fn namespaces_joined_by_veth_reach_each_other_and_nothing_else() {
    require_root().unwrap();
    let a = NetnsGuard::new("a").unwrap();
    let b = NetnsGuard::new("b").unwrap();
    a.link("10.231.0.1/24", &b, "10.231.0.2/24").unwrap();

    let listener = b.run_in(|| TcpListener::bind("10.231.0.2:0")).unwrap().unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        (peer.ip().to_string(), buf)
    });
    a.run_in(|| {
        let mut s =
            TcpStream::connect_timeout(&format!("10.231.0.2:{port}").parse().unwrap(), Duration::from_secs(5)).unwrap();
        s.write_all(b"hello").unwrap();
    })
    .unwrap();
    let (peer, msg) = server.join().unwrap();
    assert_eq!(peer, "10.231.0.1", "the connection came over the veth from namespace a");
    assert_eq!(&msg, b"hello");

    // The pair lives only in the test namespaces: no host interface carries it. (No packet is
    // sent from the host to check: with a default route it would leave the machine.)
    let host = Command::new("ip").args(["-o", "addr"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&host.stdout).contains("10.231.0."),
        "veth address leaked into the host namespace"
    );
}
