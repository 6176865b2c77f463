//! Kernel-observed workload identity, end to end: real programs, real processes in test
//! cgroups, identified through pidfds and the kernel's records.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::{fd::AsFd, unix::net::UnixListener, unix::net::UnixStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use sandbox::{cgroup2_root, require_root, CgroupGuard};
use tether_agent::{
    config::DEFAULT_MAX_MEASURE_BYTES,
    ebpf,
    process::{
        caller::{CallerAttestor, IdentityError, ProcessIdentity, Resolver},
        measure::{Measurer, Outcome, Unmeasurable},
        pidfd::PidFd,
        FileId, Origin,
    },
};
use tether_common::measurement_state;
use tether_tests::{kill_and_reap, sha256sum, spawn_retrying, spawn_with_pid, wait_for, KillOnDrop};

const CLIENT: &str = env!("CARGO_BIN_EXE_tether-test-client");

struct World {
    dir: tempfile::TempDir,
    cg: CgroupGuard,
    resolver: Resolver,
}

fn world(name: &str, cap: u64) -> World {
    require_root().unwrap();
    let cg = CgroupGuard::new(name).unwrap();
    let monitor = ebpf::Monitor::start(ebpf::load().unwrap(), ebpf::TraceScope::Off).unwrap();
    let resolver = Resolver::new(monitor, Measurer::new(cap), cgroup2_root().unwrap());
    World { dir: tempfile::tempdir().unwrap(), cg, resolver }
}

impl World {
    /// A private copy of `src` (optionally with bytes appended, which changes its sha256 but
    /// not how it runs), so no other process on the machine shares its inode.
    fn binary(&self, name: &str, src: &str, extra: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        let mut content = std::fs::read(src).unwrap();
        content.extend_from_slice(extra);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        path
    }

    fn spawn(&self, cmd: &mut Command) -> KillOnDrop {
        self.cg.place(cmd).unwrap();
        KillOnDrop(spawn_retrying(cmd).unwrap())
    }

    fn identify(&self, pid: u32) -> Result<ProcessIdentity, IdentityError> {
        self.resolver.identify(&PidFd::open(pid).unwrap())
    }

    /// Identifies `pid` once its record shows it executing `exe` (exec is asynchronous to us).
    fn identify_running(&self, pid: u32, exe: &Path) -> ProcessIdentity {
        let want = FileId::from_metadata(&std::fs::metadata(exe).unwrap());
        wait_for("the process's kernel record", || self.identify(pid).ok().filter(|id| id.record.exe == Some(want)))
    }

    fn cgroup_rel(&self) -> String {
        format!("/{}", self.cg.path().strip_prefix(cgroup2_root().unwrap()).unwrap().display())
    }
}

fn strings(id: &ProcessIdentity) -> Vec<String> {
    id.selectors.iter().map(ToString::to_string).collect()
}

fn sha_selector(id: &ProcessIdentity) -> Option<String> {
    strings(id).into_iter().find(|s| s.starts_with("unix:sha256:"))
}

#[test]
fn exec_in_test_cgroup_gets_exactly_the_expected_selectors() {
    let w = world("identity", DEFAULT_MAX_MEASURE_BYTES);
    let bin = w.binary("workload", "/usr/bin/sleep", b"");
    let child = w.spawn(Command::new(&bin).arg("30"));
    let id = w.identify_running(child.0.id(), &bin);

    let mut want = vec![
        "unix:uid:0".to_string(),
        "unix:gid:0".into(),
        "unix:user:root".into(),
        "unix:group:root".into(),
        format!("unix:path:{}", bin.display()),
        format!("unix:sha256:{}", sha256sum(&bin)),
        format!("cgroup:path:{}", w.cgroup_rel()),
    ];
    want.sort();
    assert_eq!(strings(&id), want);
    assert_eq!(id.record.origin, Origin::Exec);
    assert_eq!(id.record.tgid, child.0.id());
    assert_eq!(id.record.ppid, std::process::id());
    assert_eq!(id.record.cgroup_id, w.cg.id().unwrap());
    // The kernel map now says "measured as H" for this file, for kernel hooks to read.
    let in_kernel = w.resolver.kernel_measurement(&id.record.exe.unwrap()).expect("measurement published");
    assert_eq!(in_kernel.state, measurement_state::MEASURED);
    assert_eq!(tether_agent::process::measure::hex(&in_kernel.sha256), sha256sum(&bin));
}

#[test]
fn non_root_workload_gets_its_effective_ids() {
    let w = world("identity-uid", DEFAULT_MAX_MEASURE_BYTES);
    let bin = w.binary("workload", "/usr/bin/sleep", b"");
    let mut cmd = Command::new(&bin);
    cmd.arg("30");
    std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    std::os::unix::process::CommandExt::gid(&mut cmd, 65534);
    let child = w.spawn(&mut cmd);
    let s = strings(&w.identify_running(child.0.id(), &bin));
    assert!(s.contains(&"unix:uid:65534".to_string()) && s.contains(&"unix:user:nobody".to_string()), "{s:?}");
    assert!(s.contains(&"unix:gid:65534".to_string()), "{s:?}");
}

/// A caller connects and exits; an impostor is then given its PID. Neither may be
/// identified as the other, although a PID-based lookup (SO_PEERCRED) now names the
/// impostor as the first connection's peer.
#[test]
fn pid_reuse_never_transfers_identity() {
    let w = world("pid-reuse", DEFAULT_MAX_MEASURE_BYTES);
    let sock = w.dir.path().join("api.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let victim_bin = w.binary("victim", CLIENT, b"");
    let impostor_bin = w.binary("impostor", CLIENT, b"\0impostor");
    assert_ne!(sha256sum(&victim_bin), sha256sum(&impostor_bin));

    let mut victim = Command::new(&victim_bin);
    victim.args(["connect-exit", sock.to_str().unwrap()]);
    let mut victim = w.spawn(&mut victim);
    let victim_pid = victim.0.id();
    let (mut from_victim, _) = listener.accept().unwrap();
    let mut byte = [0u8; 1];
    from_victim.read_exact(&mut byte).unwrap();
    assert!(victim.0.wait().unwrap().success(), "victim exits and is reaped: its PID is free");

    let impostor_pid = spawn_with_pid(
        victim_pid,
        &[impostor_bin.to_str().unwrap(), "connect-hold", sock.to_str().unwrap()],
        w.cg.path(),
    )
    .expect("give the impostor the victim's PID");
    struct Reap(u32);
    impl Drop for Reap {
        fn drop(&mut self) {
            kill_and_reap(self.0);
        }
    }
    let _impostor = Reap(impostor_pid);
    assert_eq!(impostor_pid, victim_pid);
    let (from_impostor, _) = listener.accept().unwrap();

    // The attack is real: the PID recorded for the victim's connection now names the impostor.
    let cred = peer_cred_pid(&from_victim);
    assert_eq!(cred, victim_pid);
    assert!(Path::new(&format!("/proc/{cred}")).exists(), "the victim's PID is alive again (as the impostor)");

    // The victim's connection has no identity (its process is gone) ...
    let err = w.resolver.attest_caller(from_victim.as_fd()).expect_err("identity for a dead caller");
    assert!(matches!(err, IdentityError::PeerPidfd(_) | IdentityError::Exited), "{err}");
    // ... and the impostor is only ever itself.
    let id = wait_for("the process's kernel record", || w.resolver.attest_caller(from_impostor.as_fd()).ok());
    assert_eq!(sha_selector(&id), Some(format!("unix:sha256:{}", sha256sum(&impostor_bin))));
    assert_eq!(id.path.as_deref(), Some(impostor_bin.as_path()));
}

fn peer_cred_pid(s: &UnixStream) -> u32 {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid buffer of the given size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    cred.pid as u32
}

/// The resolver answers about a peer as it is now: after an exec, what it runs now, never its
/// former binary. (The Workload API compares that with what it fixed when it accepted the
/// connection, and refuses a peer that has exec'd: see `caller_attacks.rs`.)
#[test]
fn the_resolver_reports_what_a_peer_runs_now() {
    let w = world("exec-after-connect", DEFAULT_MAX_MEASURE_BYTES);
    let sock = w.dir.path().join("api.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let client = w.binary("client", CLIENT, b"");
    let after = w.binary("after", "/usr/bin/sleep", b"");
    let mut cmd = Command::new(&client);
    cmd.args(["connect-exec", sock.to_str().unwrap(), after.to_str().unwrap(), "30"]);
    let _child = w.spawn(&mut cmd);
    let (mut conn, _) = listener.accept().unwrap();
    let mut byte = [0u8; 1];
    conn.read_exact(&mut byte).unwrap();

    let after_id = FileId::from_metadata(&std::fs::metadata(&after).unwrap());
    let id = wait_for("the process's kernel record", || {
        w.resolver.attest_caller(conn.as_fd()).ok().filter(|id| id.record.exe == Some(after_id))
    });
    assert_eq!(sha_selector(&id), Some(format!("unix:sha256:{}", sha256sum(&after))));
    assert!(!strings(&id).iter().any(|s| s.contains(&sha256sum(&client))), "former binary's identity kept");
    assert_eq!(id.record.origin, Origin::Exec);
}

#[test]
fn binary_swap_changes_the_next_exec_and_keeps_running_processes() {
    let w = world("swap", DEFAULT_MAX_MEASURE_BYTES);
    let bin = w.binary("svc", "/usr/bin/sleep", b"");
    let v1 = sha256sum(&bin);
    let first = w.spawn(Command::new(&bin).arg("30"));
    let id1 = w.identify_running(first.0.id(), &bin);
    assert_eq!(sha_selector(&id1), Some(format!("unix:sha256:{v1}")));

    // Rename a new version over it, as package managers do.
    let staged = w.binary("svc.new", "/usr/bin/sleep", b"\0v2");
    std::fs::rename(&staged, &bin).unwrap();
    let v2 = sha256sum(&bin);
    assert_ne!(v1, v2);
    let second = w.spawn(Command::new(&bin).arg("30"));
    let id2 = w.identify_running(second.0.id(), &bin);
    assert_eq!(sha_selector(&id2), Some(format!("unix:sha256:{v2}")));
    // The first process still runs the old file: same hash, and no longer that path.
    let again = w.identify(first.0.id()).unwrap();
    assert_eq!(sha_selector(&again), Some(format!("unix:sha256:{v1}")));
    assert_eq!(again.path, None, "the path now names another file");

    // Rewrite in place (same inode; the kernel refuses writes while it is being executed).
    drop(second);
    let mut content = std::fs::read("/usr/bin/sleep").unwrap();
    content.extend_from_slice(b"\0v3");
    std::fs::OpenOptions::new().write(true).truncate(true).open(&bin).unwrap().write_all(&content).unwrap();
    let v3 = sha256sum(&bin);
    let third = w.spawn(Command::new(&bin).arg("30"));
    let id3 = w.identify_running(third.0.id(), &bin);
    assert_eq!(id3.record.exe.unwrap().ino, id2.record.exe.unwrap().ino, "same inode, rewritten");
    assert_eq!(sha_selector(&id3), Some(format!("unix:sha256:{v3}")));
}

#[test]
fn forked_children_and_threads_inherit_the_record() {
    let w = world("fork", DEFAULT_MAX_MEASURE_BYTES);
    let bin = w.binary("forker", CLIENT, b"");
    let mut cmd = Command::new(&bin);
    cmd.arg("fork-hold").stdout(Stdio::piped());
    let mut parent = w.spawn(&mut cmd);
    let mut line = String::new();
    BufReader::new(parent.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let mut it = line.split_whitespace().map(|s| s.parse::<u32>().unwrap());
    let (child_pid, thread_tid) = (it.next().unwrap(), it.next().unwrap());
    struct Reap(u32);
    impl Drop for Reap {
        fn drop(&mut self) {
            // The forked child is the test client's, not ours: end it by its PID, which this
            // test learned from the process it started.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let _child = Reap(child_pid);

    let parent_id = w.identify_running(parent.0.id(), &bin);
    let child = w.identify(child_pid).unwrap();
    assert_eq!(child.record.origin, Origin::Forked);
    assert_eq!(child.record.tgid, child_pid);
    assert_eq!(child.record.ppid, parent.0.id());
    assert_eq!(child.record.exe, parent_id.record.exe);
    assert_eq!(sha_selector(&child), sha_selector(&parent_id));

    let thread = PidFd::open_thread(thread_tid).unwrap();
    let monitor_view = w.resolver.identify(&thread);
    // A thread's pidfd resolves to its own task's record, which names its process.
    let t = monitor_view.unwrap();
    assert_eq!(t.record.tgid, parent.0.id());
    assert_eq!(t.record.exe, parent_id.record.exe);
}

#[test]
fn processes_started_before_the_agent_are_seeded() {
    require_root().unwrap();
    let cg = CgroupGuard::new("seeded").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("early");
    std::fs::copy("/usr/bin/sleep", &bin).unwrap();
    let mut cmd = Command::new(&bin);
    cmd.arg("30");
    cg.place(&mut cmd).unwrap();
    let early = KillOnDrop(spawn_retrying(&mut cmd).unwrap());
    std::thread::sleep(Duration::from_millis(50)); // let it exec before the programs exist

    let monitor = ebpf::Monitor::start(ebpf::load().unwrap(), ebpf::TraceScope::Off).unwrap();
    let resolver = Resolver::new(monitor, Measurer::new(DEFAULT_MAX_MEASURE_BYTES), cgroup2_root().unwrap());
    let id = resolver.identify(&PidFd::open(early.0.id()).unwrap()).unwrap();
    assert_eq!(id.record.origin, Origin::Seeded);
    assert_eq!(id.record.exe, Some(FileId::from_metadata(&std::fs::metadata(&bin).unwrap())));
    assert_eq!(id.record.cgroup_id, cg.id().unwrap());
    assert!(strings(&id).contains(&format!("unix:sha256:{}", sha256sum(&bin))));
}

#[test]
fn moving_to_another_cgroup_updates_the_record() {
    let w = world("migrate", DEFAULT_MAX_MEASURE_BYTES);
    let other = w.cg.child("other").unwrap();
    let bin = w.binary("mover", "/usr/bin/sleep", b"");
    let child = w.spawn(Command::new(&bin).arg("30"));
    assert_eq!(w.identify_running(child.0.id(), &bin).record.cgroup_id, w.cg.id().unwrap());
    std::fs::write(other.path().join("cgroup.procs"), child.0.id().to_string()).unwrap();
    let id = w.identify(child.0.id()).unwrap();
    assert_eq!(id.record.cgroup_id, other.id().unwrap());
    assert_eq!(id.cgroup.as_deref(), Some(format!("{}/other", w.cgroup_rel()).as_str()));
}

#[test]
fn unmeasurable_binaries_get_no_sha256_selector() {
    // Over the cap.
    let w = world("unmeasurable", 4096);
    let big = w.binary("big", "/usr/bin/sleep", b"");
    let child = w.spawn(Command::new(&big).arg("30"));
    let id = w.identify_running(child.0.id(), &big);
    assert_eq!(sha_selector(&id), None);
    assert!(
        matches!(id.measurement, Some(Outcome::Unmeasurable(Unmeasurable::TooLarge { .. }))),
        "{:?}",
        id.measurement
    );
    assert!(strings(&id).contains(&"unix:uid:0".to_string()), "the other selectors remain");

    // Deleted before it could be hashed.
    let w = world("deleted", DEFAULT_MAX_MEASURE_BYTES);
    let gone = w.binary("gone", "/usr/bin/sleep", b"");
    let child = w.spawn(Command::new(&gone).arg("30"));
    let want = FileId::from_metadata(&std::fs::metadata(&gone).unwrap());
    wait_for("the process's kernel record", || {
        let pidfd = PidFd::open(child.0.id()).ok()?;
        let monitor_has_it = w.resolver.identify(&pidfd).ok()?.record.exe == Some(want);
        monitor_has_it.then_some(())
    });
    // identify() above measured it already; a fresh resolver has not.
    let fresh = world("deleted-fresh", DEFAULT_MAX_MEASURE_BYTES);
    std::fs::remove_file(&gone).unwrap();
    let id = fresh.identify(child.0.id()).unwrap();
    assert_eq!(sha_selector(&id), None);
    assert_eq!(id.measurement, Some(Outcome::Unmeasurable(Unmeasurable::Deleted)));
    let in_kernel = fresh.resolver.kernel_measurement(&id.record.exe.unwrap()).expect("published");
    assert_eq!(in_kernel.state, measurement_state::UNMEASURABLE);
    assert_eq!(id.path, None);
}

#[test]
fn ps_command_lists_processes_with_selectors() {
    let w = world("ps", DEFAULT_MAX_MEASURE_BYTES);
    let bin = w.binary("listed", "/usr/bin/sleep", b"");
    let child = w.spawn(Command::new(&bin).arg("30"));
    w.identify_running(child.0.id(), &bin);
    let out =
        Command::new(tether_tests::agent_bin()).args(["ps", "--json", "--cgroup"]).arg(w.cg.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["pid"], child.0.id());
    let selectors: Vec<&str> = rows[0]["selectors"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(selectors.contains(&format!("unix:sha256:{}", sha256sum(&bin)).as_str()), "{selectors:?}");
    // ps loaded its own programs after the process started: the record is a seeded one.
    assert_eq!(rows[0]["record"]["origin"], "seeded");
    assert_eq!(rows[0]["measurement"]["state"], "measured");
}

/// How the Workload API's accept judges the peer of `stream`: `Ok(())` or the refusal.
fn accept_verdict(w: &World, stream: UnixStream) -> Result<(), String> {
    use tonic::transport::server::Connected;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _in_runtime = rt.enter();
    stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::UnixStream::from_std(stream).unwrap();
    let limits = tether_agent::workload_api::ConnLimits::new(64);
    let conn = tether_agent::workload_api::Conn::accept(stream, &w.resolver, &limits).expect("not closed at once");
    conn.connect_info().0.map(|_| ()).map_err(|s| s.message().to_owned())
}

/// A Workload API connection's caller is fixed at accept, from the kernel's record then. A
/// process that connects and then execs another program keeping its uid and gid (a victim's
/// binary), before the agent accepts, has the new program's record by the accept: it is
/// told apart by the credentials the kernel kept on the socket at connect (every exec makes
/// new ones), and refused. A caller still running what connected is accepted however late
/// the accept, including one whose connecting thread has credentials of its own.
#[test]
fn an_exec_between_connect_and_accept_lends_nothing() {
    let w = world("caller-exec-before-accept", DEFAULT_MAX_MEASURE_BYTES);
    let path = w.dir.path().join("api.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let socket = path.to_str().unwrap();
    let victim = w.binary("victim", CLIENT, b"victim");

    // Connect, then exec the victim's binary; accept only once the exec has happened.
    let attacker = w.spawn(Command::new(CLIENT).args(["connect-exec", socket, victim.to_str().unwrap(), "hold", "30"]));
    w.identify_running(attacker.0.id(), &victim);
    let (stream, _) = listener.accept().unwrap();
    let refused = accept_verdict(&w, stream).expect_err("the exec'd process was taken for what connected");
    assert!(refused.contains("its credentials changed between its connect and the accept"), "{refused}");

    // Connected and still running the same program: accepted after a delay.
    let holder = w.spawn(Command::new(CLIENT).args(["connect-hold", socket]));
    let (stream, _) = listener.accept().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    accept_verdict(&w, stream).expect("a caller unchanged since its connect");
    drop(holder);

    // Connected from a thread whose credentials are its own (not the leader's).
    let threaded = w.spawn(Command::new(CLIENT).args(["connect-thread-hold", socket]));
    let (stream, _) = listener.accept().unwrap();
    accept_verdict(&w, stream).expect("a caller whose connecting thread has credentials of its own");
    drop(threaded);
}
