//! The exec tracer reports execs in a test cgroup's subtree with the kernel's view of the
//! process and binary, and nothing from outside it.

use std::{
    io::{BufRead, BufReader},
    os::unix::fs::MetadataExt,
    process::{Command, Stdio},
    time::Duration,
};

use sandbox::{require_root, CgroupGuard};
use tether_agent::{
    cgroup::Cgroup,
    ebpf,
    exec::{ExecRecord, FileId},
};

/// A private copy of `true`, so its inode is one no other process on the machine executes.
fn private_binary(dir: &tempfile::TempDir) -> (std::path::PathBuf, FileId) {
    let path = dir.path().join("tether-probe-true");
    std::fs::copy("/usr/bin/true", &path).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    (path, FileId::from_stat(meta.dev(), meta.ino()))
}

async fn collect(tracer: &mut ebpf::ExecTracer, quiet: Duration) -> Vec<ExecRecord> {
    let mut all = Vec::new();
    while let Ok(batch) = tokio::time::timeout(quiet, tracer.next_batch()).await {
        all.extend(batch.unwrap());
    }
    all
}

#[tokio::test]
async fn exec_in_cgroup_is_reported_with_cgroup_and_binary_identity() {
    require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (binary, file_id) = private_binary(&dir);
    let cg = CgroupGuard::new("exec").unwrap();
    let child_cg = cg.child("leaf").unwrap();
    let scope = Cgroup::open(cg.path()).unwrap();
    let mut tracer = ebpf::ExecTracer::start(ebpf::load().unwrap(), Some(&scope)).unwrap();

    // Inside the subtree (a child cgroup of the traced one), then outside it.
    let mut inside = Command::new(&binary);
    child_cg.place(&mut inside).unwrap();
    let mut inside = inside.spawn().unwrap();
    let inside_pid = inside.id();
    assert!(inside.wait().unwrap().success());
    let mut outside = Command::new(&binary).spawn().unwrap();
    let outside_pid = outside.id();
    assert!(outside.wait().unwrap().success());

    let events = collect(&mut tracer, Duration::from_millis(500)).await;
    let ours: Vec<_> = events.iter().filter(|e| e.exe == Some(file_id)).collect();
    assert_eq!(ours.len(), 1, "expected exactly the in-cgroup exec, got {events:#?}");
    let e = ours[0];
    assert_eq!(e.tgid, inside_pid);
    assert_eq!(e.pid, inside_pid);
    assert_eq!(e.cgroup_id, child_cg.id().unwrap());
    assert_eq!((e.uid, e.gid), (0, 0));
    assert_eq!(e.comm, "tether-probe-tr", "comm is the file name cut to 15 bytes");
    assert!(events.iter().all(|e| e.tgid != outside_pid), "exec outside the traced cgroup was reported: {events:#?}");
}

#[tokio::test]
async fn exec_records_real_uid_and_gid() {
    require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (binary, file_id) = private_binary(&dir);
    let cg = CgroupGuard::new("exec-uid").unwrap();
    let scope = Cgroup::open(cg.path()).unwrap();
    let mut tracer = ebpf::ExecTracer::start(ebpf::load().unwrap(), Some(&scope)).unwrap();

    let mut cmd = Command::new(&binary);
    std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    std::os::unix::process::CommandExt::gid(&mut cmd, 65533);
    cg.place(&mut cmd).unwrap();
    assert!(cmd.status().unwrap().success());

    let events = collect(&mut tracer, Duration::from_millis(500)).await;
    let e = events.iter().find(|e| e.exe == Some(file_id)).expect("exec not reported");
    assert_eq!((e.uid, e.gid), (65534, 65533));
}

/// The operator's view: `tether-agent trace-exec --cgroup PATH --json` prints the exec.
#[test]
fn trace_exec_command_prints_execs_in_its_cgroup() {
    require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (binary, file_id) = private_binary(&dir);
    let cg = CgroupGuard::new("exec-cli").unwrap();
    let mut agent = Command::new(tether_tests::agent_bin())
        .args(["trace-exec", "--json", "--cgroup"])
        .arg(cg.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = agent.stdout.take().unwrap();
    let stderr = agent.stderr.take().unwrap();
    let _agent = Kill(agent);

    // The agent logs "tracing execs" once the program is attached.
    let mut log = BufReader::new(stderr).lines();
    for line in log.by_ref() {
        let line = line.unwrap();
        if line.contains("tracing execs") {
            break;
        }
    }
    let mut cmd = Command::new(&binary);
    let pid = {
        let mut child = {
            cg.place(&mut cmd).unwrap();
            cmd.spawn().unwrap()
        };
        let pid = child.id();
        child.wait().unwrap();
        pid
    };
    let line = BufReader::new(stdout).lines().next().unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["tgid"], pid);
    assert_eq!(v["cgroup_id"], cg.id().unwrap());
    assert_eq!(v["exe"]["ino"], file_id.ino);
    assert_eq!(v["exe"]["dev_major"], file_id.dev_major);
}
