//! Stalling the agent through the files it measures: a binary served by FUSE (a process,
//! perhaps the attacker's own), one on a mount made in an unprivileged user namespace, and
//! one behind a filesystem that stops answering. None of them may delay anyone else's
//! identity; none gets a `unix:sha256` selector.

use std::{
    ffi::CString,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use sandbox::{cgroup2_root, require_root, CgroupGuard};
use tether_tests::{hosts::Workload, plane::Plane};

const CLIENT: &str = env!("CARGO_BIN_EXE_tether-test-client");
const FUSE: &str = env!("CARGO_BIN_EXE_tether-test-fuse");

fn rel(cg: &CgroupGuard) -> String {
    format!("cgroup:path:/{}", cg.path().strip_prefix(cgroup2_root().unwrap()).unwrap().display())
}

/// Mount points in a directory of their own, lazily unmounted (deepest first) on drop.
struct Mounts {
    dir: tempfile::TempDir,
    mounted: Vec<PathBuf>,
}

impl Mounts {
    fn new() -> Mounts {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Mounts { dir, mounted: Vec::new() }
    }

    fn dir(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// The test FUSE server on `name`, answering `answer_opens` opens of its file (a copy of
    /// the test client); its output lines are collected. Killed (by PID) on drop.
    fn fuse(&mut self, name: &str, answer_opens: u32) -> Workload {
        let at = self.dir(name);
        let mut cmd = Command::new(FUSE);
        cmd.arg(&at).arg(CLIENT).args(["--answer-opens", &answer_opens.to_string()]).stdout(Stdio::piped());
        let server = Workload::start(cmd.spawn().unwrap());
        server.wait_line("ready");
        self.mounted.push(at);
        server
    }

    /// A read-only overlay of `lower` (and an empty directory) on `name`.
    fn overlay(&mut self, name: &str, lower: &Path) -> PathBuf {
        let (empty, at) = (self.dir(&format!("{name}-empty")), self.dir(name));
        let c = |s: &str| CString::new(s).unwrap();
        let opts = c(&format!("lowerdir={}:{}", lower.display(), empty.display()));
        let target = c(at.to_str().unwrap());
        // SAFETY: valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(c("overlay").as_ptr(), target.as_ptr(), c("overlay").as_ptr(), 0, opts.as_ptr().cast())
        };
        assert_eq!(rc, 0, "overlay mount: {}", std::io::Error::last_os_error());
        self.mounted.push(at.clone());
        at
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for at in self.mounted.iter().rev() {
            let c = CString::new(at.to_str().unwrap()).unwrap();
            // SAFETY: a valid path; MNT_DETACH never blocks on the filesystem.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn fetch_in(cg: &CgroupGuard, program: &Path, socket: &Path) -> String {
    let mut cmd = Command::new(program);
    cmd.arg("fetch").arg(socket);
    let out = cg.run(&mut cmd).unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).trim().to_owned()
}

#[test]
fn binaries_on_fuse_or_a_user_namespace_mount_are_never_opened() {
    require_root().unwrap();
    let plane = Plane::start_with_agent(1, "measure_deadline_ms = 5000\n");
    std::fs::set_permissions(plane.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut mounts = Mounts::new();
    let (on_fuse, in_userns) = (CgroupGuard::new("on-fuse").unwrap(), CgroupGuard::new("in-userns").unwrap());
    plane.entry("spiffe://example.org/on-fuse", &[&rel(&on_fuse)], &[]);
    plane.entry("spiffe://example.org/in-userns", &[&rel(&in_userns)], &[]);
    plane.wait_issued("spiffe://example.org/on-fuse");
    plane.wait_issued("spiffe://example.org/in-userns");

    // A FUSE mount the agent can see: the exec is its one open; the agent adds none (a
    // second open would never be answered, and the call would wait out the deadline).
    let server = mounts.fuse("fuse", 1);
    let prog = mounts.dir.path().join("fuse/prog");
    let started = std::time::Instant::now();
    let out = fetch_in(&on_fuse, &prog, &plane.socket());
    let took = started.elapsed();
    assert_eq!(out, "ok spiffe://example.org/on-fuse", "{}", plane.log("agent"));
    assert_eq!(server.count("open"), 1, "the agent opened the FUSE file: {:?}", server.lines());
    let log = plane.log("agent");
    assert!(log.contains("on a FUSE filesystem (fuse.tether-test): not opened"), "{log}");
    println!("FUSE binary identified in {took:?}");

    // uid 65534 mounts its own FUSE in its own user namespace and runs the file from there.
    let at = mounts.dir("userns");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups", FUSE])
        .arg(&at)
        .arg(CLIENT)
        .args(["--answer-opens", "1", "--userns", "--"])
        .arg(at.join("prog"))
        .arg("fetch")
        .arg(plane.socket());
    let out = in_userns.run(&mut cmd).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        ["ready", "open 1", "ok spiffe://example.org/in-userns", "exit 0"],
        "{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        plane.log("agent")
    );
    let log = plane.log("agent");
    assert!(log.contains("mount made in a user namespace"), "{log}");
    assert!(!log.contains("hashing took longer"), "{log}");
}

#[test]
fn a_filesystem_that_stops_answering_delays_no_one_else() {
    require_root().unwrap();
    let plane = Plane::start_with_agent(1, "measure_deadline_ms = 5000\n");
    let mut mounts = Mounts::new();
    let (slow, other) = (CgroupGuard::new("slow-fs").unwrap(), CgroupGuard::new("other").unwrap());
    plane.entry("spiffe://example.org/slow", &[&rel(&slow)], &[]);
    plane.entry("spiffe://example.org/other", &[&rel(&other)], &[]);
    plane.wait_issued("spiffe://example.org/slow");
    plane.wait_issued("spiffe://example.org/other");

    // An overlay (a filesystem the agent does read) over a FUSE server that answers the
    // exec's open and then stops answering.
    let server = mounts.fuse("fuse", 1);
    let merged = mounts.overlay("merged", &mounts.dir.path().join("fuse"));
    let mut cmd = Command::new(merged.join("prog"));
    cmd.arg("fetch").arg(plane.socket()).stdout(Stdio::piped());
    slow.place(&mut cmd).unwrap();
    let stalled = Workload::start(cmd.spawn().unwrap());
    // The agent's measurement has opened the file, and will wait for ever.
    server.wait_line("open 2");

    // Meanwhile: another workload is answered, and a new registration is issued and served.
    let out = fetch_in(&other, Path::new(CLIENT), &plane.socket());
    assert_eq!(out, "ok spiffe://example.org/other");
    let late = CgroupGuard::new("late").unwrap();
    plane.entry("spiffe://example.org/late", &[&rel(&late)], &[]);
    plane.wait_issued("spiffe://example.org/late");
    assert_eq!(fetch_in(&late, Path::new(CLIENT), &plane.socket()), "ok spiffe://example.org/late");
    assert!(stalled.lines().is_empty(), "the stalled caller was answered before the others: {:?}", stalled.lines());

    // The stalled caller is answered once the deadline passes, without a measurement.
    let answer = stalled.wait_line("");
    assert_eq!(answer, "ok spiffe://example.org/slow", "{}", plane.log("agent"));
    let log = plane.log("agent");
    assert!(log.contains("hashing took longer than 5000 ms"), "{log}");
}
