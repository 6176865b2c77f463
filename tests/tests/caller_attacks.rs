//! Taking another workload's identity from the same node, as an unprivileged local user
//! would try it, against the real agent: cgroup names chosen in a subtree systemd delegates
//! to the user, and a Workload API connection kept by a child while the process that opened
//! it execs a setuid or a victim's binary. Each attack is refused, nothing is issued to the
//! attacker, and the legitimate workload is still served.

use std::{
    os::unix::fs::{chown, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use sandbox::{cgroup2_root, require_root, CgroupGuard};
use tether_tests::{hosts::Workload, plane::Plane, wait_for};

const CLIENT: &str = env!("CARGO_BIN_EXE_tether-test-client");
const NOBODY: u32 = 65534;

fn rel(path: &Path) -> String {
    format!("/{}", path.strip_prefix(cgroup2_root().unwrap()).unwrap().display())
}

/// The plane's directory must be reachable by uid 65534 (the socket itself is 0777).
fn open_to_all(plane: &Plane) {
    std::fs::set_permissions(plane.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `setpriv` to uid/gid 65534 (no supplementary groups), then `argv`, started as root inside
/// `cgroup` (as systemd starts a user's manager in its own unit).
fn as_nobody(cgroup: &Path, argv: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"]).args(argv);
    let procs = std::fs::OpenOptions::new().write(true).open(cgroup.join("cgroup.procs")).unwrap();
    // SAFETY: write(2) on an fd opened before fork is async-signal-safe.
    unsafe {
        use std::os::{fd::AsRawFd, unix::process::CommandExt};
        cmd.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// What systemd does for `user@UID.service`: a unit cgroup made by root, then handed over
/// to the user (the directory and the files a delegate writes).
fn delegate(dir: &Path, uid: u32) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"] {
        chown(dir.join(f), Some(uid), Some(uid)).unwrap();
    }
}

/// The agent's `[selectors]`: the test cgroup is where containers and pods live, so the
/// names below it would count if names were all that counted.
fn roots(top: &CgroupGuard) -> String {
    let r = rel(top.path());
    format!("[selectors]\ncontainer_roots = [\"{r}\"]\nkubernetes_roots = [\"{r}\"]\n")
}

const POD: &str = "6f9b3b64-4c6e-4b55-9d1e-6d0b1c2a3e4f";
const CTR: &str = "4a1c2b3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

#[test]
fn names_in_a_user_delegated_cgroup_take_nothing_of_the_systems() {
    require_root().unwrap();
    let top = CgroupGuard::new("caller-names").unwrap();
    let mut plane = Plane::start_with_agent(1, &roots(&top));
    open_to_all(&plane);

    // The system's cgroups: a service, and a pod's container as the kubelet and containerd
    // (systemd driver) make them.
    let service = top.path().join("system.slice/payments.service");
    let pod = top.path().join(format!(
        "kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{CTR}.scope",
        POD.replace('-', "_")
    ));
    std::fs::create_dir_all(&service).unwrap();
    std::fs::create_dir_all(&pod).unwrap();

    plane.entry("spiffe://example.org/payments", &["systemd:id:payments.service"], &[]);
    plane.entry("spiffe://example.org/pod", &[&format!("k8s:pod-uid:{POD}")], &[]);
    plane.entry("spiffe://example.org/container", &[&format!("cgroup:container-id:{CTR}")], &[]);
    for id in ["payments", "pod", "container"] {
        plane.wait_issued(&format!("spiffe://example.org/{id}"));
    }

    // The attacker: uid 65534's manager unit, delegated as systemd does; it makes the same
    // names below it with plain mkdir and moves itself in.
    let manager = top.path().join(format!("user.slice/user-{NOBODY}.slice/user@{NOBODY}.service"));
    delegate(&manager, NOBODY);
    let socket = plane.socket();
    let socket = socket.to_str().unwrap();
    let spoofs = [
        "app.slice/payments.service".to_string(),
        format!(
            "kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{CTR}.scope",
            POD.replace('-', "_")
        ),
    ];
    for spoof in &spoofs {
        let script = format!(
            "set -e; mkdir -p {m}/{spoof}; echo $$ > {m}/{spoof}/cgroup.procs; exec {CLIENT} fetch {socket}",
            m = manager.display()
        );
        let out = output(&mut as_nobody(&manager, &["sh", "-c", &script]));
        assert!(
            out.starts_with("refused PermissionDenied no identity issued"),
            "uid 65534 in {spoof} was answered: {out}\nagent log:\n{}",
            plane.log("agent")
        );
    }
    // What the agent says of such a process: the unit is the user's, no system unit of that
    // name, no pod, no container.
    let holder = format!("{}/{}", manager.display(), spoofs[0]);
    let mut hold = as_nobody(Path::new(&holder), &[CLIENT, "hold", "60"]);
    let _hold = tether_tests::KillOnDrop(hold.spawn().unwrap());
    let mut ps = Command::new(tether_tests::agent_bin());
    ps.args(["ps", "--cgroup"]).arg(&manager).arg("--config").arg(plane.dir.path().join("agent.toml"));
    let listing = wait_for("ps to list the holder", || {
        let text = output(&mut ps);
        text.contains("user-unit").then_some(text)
    });
    assert!(listing.contains(&format!("systemd:user-unit:{NOBODY}:payments.service")), "{listing}");
    assert!(listing.contains(&format!("systemd:id:user@{NOBODY}.service")), "{listing}");
    assert!(!listing.contains("systemd:id:payments.service"), "{listing}");
    assert!(!listing.contains("k8s:") && !listing.contains("container-id"), "{listing}");
    let log = plane.log("agent");
    assert_eq!(log.matches("X.509-SVID issued").count(), 3, "something more was issued:\n{log}");

    // The legitimate workloads, in the cgroups the system made, are served.
    for (dir, id) in [(&service, "payments"), (&pod, "container")] {
        let mut cmd = Command::new(CLIENT);
        cmd.args(["fetch", socket]);
        place(&mut cmd, dir);
        let out = output(&mut cmd);
        assert!(out.starts_with("ok spiffe://example.org/"), "the workload in {} was refused: {out}", dir.display());
        if id == "payments" {
            assert_eq!(out.trim(), "ok spiffe://example.org/payments");
        }
    }
    plane.stop_server();
}

fn place(cmd: &mut Command, dir: &Path) {
    let procs = std::fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs")).unwrap();
    // SAFETY: as in as_nobody.
    unsafe {
        use std::os::{fd::AsRawFd, unix::process::CommandExt};
        cmd.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A copy of `from` at `to` with `tag` appended: the same program, its own sha256.
fn tagged_copy(from: &Path, to: &Path, tag: &str) -> PathBuf {
    let mut bytes = std::fs::read(from).unwrap();
    bytes.extend_from_slice(tag.as_bytes());
    std::fs::write(to, bytes).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).unwrap();
    to.to_path_buf()
}

#[test]
fn a_connection_handed_on_before_a_setuid_exec_gets_nothing() {
    require_root().unwrap();
    let plane = Plane::start(1);
    open_to_all(&plane);
    let cg = CgroupGuard::new("caller-setuid").unwrap();
    plane.entry("spiffe://example.org/root-only", &[&format!("cgroup:path:{}", rel(cg.path())), "unix:uid:0"], &[]);
    plane.wait_issued("spiffe://example.org/root-only");
    // A setuid-root program that just runs a while.
    let suid = tagged_copy(Path::new(CLIENT), &plane.dir.path().join("suid-client"), "suid");
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let socket = plane.socket();
    let socket = socket.to_str().unwrap();

    // uid 65534 connects, forks, and the parent execs the setuid binary (now euid 0 in the
    // entry's cgroup); the child asks over the inherited connection.
    let out = output(&mut as_nobody(
        cg.path(),
        &[CLIENT, "fork-exec", socket, "fetch", suid.to_str().unwrap(), "hold", "10"],
    ));
    // Refused either way: the exec came after the agent accepted the connection (it has since
    // exec'd), or before (its credentials at accept are not those it connected with); which
    // one is up to the scheduler.
    assert!(
        out.starts_with("refused PermissionDenied the process that opened this connection has since exec'd")
            || out.starts_with(
                "refused PermissionDenied caller could not be identified when it connected: its credentials changed"
            ),
        "the inherited connection was answered: {out}\nagent log:\n{}",
        plane.log("agent")
    );

    // The setuid program on its own connection is root in that cgroup: that is the entry's
    // workload, and it is served (identified afresh, as the docs tell workloads to reconnect
    // after exec).
    let out = output(&mut as_nobody(cg.path(), &[suid.to_str().unwrap(), "fetch", socket]));
    assert_eq!(out.trim(), "ok spiffe://example.org/root-only", "{}", plane.log("agent"));
}

#[test]
fn exec_of_a_victims_binary_lends_nothing_to_the_connection() {
    require_root().unwrap();
    let plane = Plane::start(1);
    open_to_all(&plane);
    let cg = CgroupGuard::new("caller-victim").unwrap();
    // The victim's entry trusts its binary alone.
    let victim = tagged_copy(Path::new(CLIENT), &plane.dir.path().join("victim"), "victim");
    let hash = tether_tests::sha256sum(&victim);
    plane.entry("spiffe://example.org/victim", &[&format!("unix:sha256:{hash}")], &[]);
    plane.wait_issued("spiffe://example.org/victim");
    let socket = plane.socket();
    let socket = socket.to_str().unwrap();

    // The attacker's own binary has no identity.
    let out = output(&mut as_nobody(cg.path(), &[CLIENT, "fetch", socket]));
    assert!(out.starts_with("refused PermissionDenied no identity issued"), "{out}");
    // It connects, forks, and execs the victim's binary (which just runs); its child asks.
    // Refused either way: the exec came after the agent accepted the connection (it has since
    // exec'd), or before (the credentials it connected with are no longer its own).
    let out = output(&mut as_nobody(
        cg.path(),
        &[CLIENT, "fork-exec", socket, "fetch", victim.to_str().unwrap(), "hold", "10"],
    ));
    assert!(
        out.starts_with("refused PermissionDenied the process that opened this connection has since exec'd")
            || out.starts_with(
                "refused PermissionDenied caller could not be identified when it connected: its credentials changed"
            ),
        "the victim's identity was lent: {out}\nagent log:\n{}",
        plane.log("agent")
    );
    // The victim, running its own code on its own connection, is served.
    let out = output(&mut as_nobody(cg.path(), &[victim.to_str().unwrap(), "fetch", socket]));
    assert_eq!(out.trim(), "ok spiffe://example.org/victim", "{}", plane.log("agent"));
}

#[test]
fn a_stream_ends_when_the_process_that_opened_it_execs() {
    require_root().unwrap();
    let plane = Plane::start(1);
    open_to_all(&plane);
    let cg = CgroupGuard::new("caller-stream").unwrap();
    plane.entry("spiffe://example.org/streamer", &[&format!("cgroup:path:{}", rel(cg.path()))], &[]);
    plane.wait_issued("spiffe://example.org/streamer");
    let socket = plane.socket();

    // The cgroup entry still matches the exec'd program: only the connection's identity can
    // end the stream.
    let mut cmd =
        as_nobody(cg.path(), &[CLIENT, "fork-exec", socket.to_str().unwrap(), "stream", CLIENT, "hold", "60"]);
    cmd.stdout(Stdio::piped());
    let w = Workload::start(cmd.spawn().unwrap());
    assert_eq!(w.wait_line("first"), "first spiffe://example.org/streamer");
    let started = std::time::Instant::now();
    let end = wait_for("the stream's end", || {
        w.lines().into_iter().find(|l| l.starts_with("ended") || l.starts_with("more") || l.starts_with("open"))
    });
    assert!(
        end.starts_with("ended PermissionDenied the process that opened this connection has since exec'd"),
        "{end}\nagent log:\n{}",
        plane.log("agent")
    );
    println!("stream ended {:?} after the exec", started.elapsed());
}

#[test]
fn one_uid_cannot_take_every_workload_api_connection() {
    require_root().unwrap();
    let plane = Plane::start_with_agent(1, "max_connections_per_uid = 8\n");
    open_to_all(&plane);
    let (idle, served) = (CgroupGuard::new("flooder").unwrap(), CgroupGuard::new("served").unwrap());
    plane.entry("spiffe://example.org/served", &[&format!("cgroup:path:{}", rel(served.path()))], &[]);
    plane.wait_issued("spiffe://example.org/served");
    let socket = plane.socket();
    let socket = socket.to_str().unwrap();

    // uid 65534 holds its 8 connections and asks on a ninth: told which limit, by name.
    let out = output(&mut as_nobody(idle.path(), &[CLIENT, "flood", socket, "8"]));
    assert_eq!(
        out.trim(),
        "refused ResourceExhausted uid 65534 already has 8 Workload API connections open, the most allowed \
         (max_connections_per_uid): close some",
        "{}",
        plane.log("agent")
    );
    // While it floods, another workload is served.
    let mut flood = as_nobody(idle.path(), &[CLIENT, "flood", socket, "8"]);
    flood.stdout(Stdio::piped());
    let flooding = Workload::start(flood.spawn().unwrap());
    let mut cmd = Command::new(CLIENT);
    cmd.args(["fetch", socket]);
    place(&mut cmd, served.path());
    assert_eq!(output(&mut cmd).trim(), "ok spiffe://example.org/served");
    flooding.wait_line("refused ResourceExhausted");
    drop(flooding);
    // Its connections closed, the uid connects again (and is told it has no identity).
    let out = wait_for("uid 65534's connections to be counted out", || {
        let out = output(&mut as_nobody(idle.path(), &[CLIENT, "fetch", socket]));
        out.starts_with("refused PermissionDenied").then_some(out)
    });
    assert!(out.contains("no identity issued"), "{out}");
}
