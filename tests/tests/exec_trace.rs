//! The exec tracer reports execs in a test cgroup's subtree with the kernel's view of the
//! process and binary, and nothing from outside it.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    time::Duration,
};

use sandbox::{require_root, CgroupGuard};
use tether_agent::{
    cgroup::Cgroup,
    ebpf,
    process::{FileId, Record},
};

/// A private copy of `true`, so its inode is one no other process on the machine executes.
fn private_binary(dir: &tempfile::TempDir) -> (std::path::PathBuf, FileId) {
    let path = dir.path().join("tether-probe-true");
    std::fs::copy("/usr/bin/true", &path).unwrap();
    let id = FileId::from_metadata(&std::fs::metadata(&path).unwrap());
    (path, id)
}

/// Exec events until none arrives for `quiet`, with the exec'ing thread id.
async fn collect(events: &mut ebpf::ExecEvents, quiet: Duration) -> Vec<(Record, u32)> {
    let mut all = Vec::new();
    while let Ok(batch) = tokio::time::timeout(quiet, events.next_batch()).await {
        all.extend(batch.unwrap().iter().map(|(r, pid)| (Record::from(r), *pid)));
    }
    all
}

fn start(scope: &Cgroup) -> (ebpf::Monitor, ebpf::ExecEvents) {
    let mut monitor = ebpf::Monitor::start(ebpf::load().unwrap(), ebpf::TraceScope::Cgroup(scope)).unwrap();
    let events = monitor.take_events().unwrap();
    (monitor, events)
}

#[tokio::test]
async fn exec_in_cgroup_is_reported_with_cgroup_and_binary_identity() {
    require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (binary, file_id) = private_binary(&dir);
    let cg = CgroupGuard::new("exec").unwrap();
    let child_cg = cg.child("leaf").unwrap();
    let (_monitor, mut events) = start(&Cgroup::open(cg.path()).unwrap());

    // Inside the subtree (a child cgroup of the traced one), then outside it.
    let mut inside = Command::new(&binary);
    child_cg.place(&mut inside).unwrap();
    let mut inside = tether_tests::spawn_retrying(&mut inside).unwrap();
    let inside_pid = inside.id();
    assert!(inside.wait().unwrap().success());
    let mut outside = tether_tests::spawn_retrying(&mut Command::new(&binary)).unwrap();
    let outside_pid = outside.id();
    assert!(outside.wait().unwrap().success());

    let events = collect(&mut events, Duration::from_millis(500)).await;
    let ours: Vec<_> = events.iter().filter(|(e, _)| e.exe == Some(file_id)).collect();
    assert_eq!(ours.len(), 1, "expected exactly the in-cgroup exec, got {events:#?}");
    let (e, pid) = ours[0];
    assert_eq!(e.tgid, inside_pid);
    assert_eq!(*pid, inside_pid);
    assert_eq!(e.ppid, std::process::id());
    assert_eq!(e.cgroup_id, child_cg.id().unwrap());
    assert_eq!((e.uid, e.gid), (0, 0));
    assert_eq!(e.comm, "tether-probe-tr", "comm is the file name cut to 15 bytes");
    assert!(
        events.iter().all(|(e, _)| e.tgid != outside_pid),
        "exec outside the traced cgroup was reported: {events:#?}"
    );
}

#[tokio::test]
async fn exec_records_real_and_effective_ids() {
    require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (binary, file_id) = private_binary(&dir);
    let cg = CgroupGuard::new("exec-uid").unwrap();
    let (_monitor, mut events) = start(&Cgroup::open(cg.path()).unwrap());

    let mut cmd = Command::new(&binary);
    cmd.uid(65534).gid(65533);
    cg.place(&mut cmd).unwrap();
    assert!(tether_tests::spawn_retrying(&mut cmd).unwrap().wait().unwrap().success());

    let events = collect(&mut events, Duration::from_millis(500)).await;
    let (e, _) = events.iter().find(|(e, _)| e.exe == Some(file_id)).expect("exec not reported");
    assert_eq!((e.uid, e.gid, e.euid, e.egid), (65534, 65533, 65534, 65533));
}

/// The operator's view: `tether-agent trace-exec --cgroup PATH --json` prints the exec.
#[test]
fn trace_exec_command_prints_execs_in_its_cgroup() {
    require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (binary, file_id) = private_binary(&dir);
    let cg = CgroupGuard::new("exec-cli").unwrap();
    let agent = Command::new(tether_tests::agent_bin())
        .args(["trace-exec", "--json", "--cgroup"])
        .arg(cg.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut agent = tether_tests::KillOnDrop(agent);
    let stdout = agent.0.stdout.take().unwrap();
    let stderr = agent.0.stderr.take().unwrap();

    // The agent logs "tracing execs" once the programs are attached.
    for line in BufReader::new(stderr).lines() {
        if line.unwrap().contains("tracing execs") {
            break;
        }
    }
    let mut cmd = Command::new(&binary);
    cg.place(&mut cmd).unwrap();
    let mut child = tether_tests::spawn_retrying(&mut cmd).unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let line = BufReader::new(stdout).lines().next().unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["tgid"], pid);
    assert_eq!(v["origin"], "exec");
    assert_eq!(v["cgroup_id"], cg.id().unwrap());
    assert_eq!(v["exe"]["ino"], file_id.ino);
    assert_eq!(v["exe"]["dev_major"], file_id.dev_major);
}
