//! `cargo xtask demo`: the kernel observes a workload's execs in a demo cgroup.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use sandbox::CgroupGuard;

/// Ends the agent this demo started, by its PID, also on error.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill on the PID of a child we spawned and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        if self.0.wait().is_err() {
            let _ = self.0.kill();
        }
    }
}

pub fn run() -> Result<()> {
    crate::cargo(&["build", "-p", "tether-agent"])?;
    let bin = crate::workspace().join("target/debug/tether-agent");
    let cg = CgroupGuard::new("demo")?;
    println!("\n==> demo cgroup {} (created for this demo; removed at the end)", cg.path().display());
    println!("==> starting: tether-agent trace-exec --cgroup {}", cg.path().display());
    let mut child = Command::new(&bin)
        .args(["trace-exec", "--cgroup"])
        .arg(cg.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tether-agent")?;
    let stdout = child.stdout.take().context("agent stdout")?;
    let stderr = child.stderr.take().context("agent stderr")?;
    let _agent = Agent(child);

    // The agent's log (stderr) is shown as is; wait until it says the program is attached.
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("    agent log | {line}");
            if line.contains("tracing execs") {
                let _ = ready_tx.send(());
            }
        }
    });
    if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
        bail!("the agent did not start tracing within 30 s (see its log above)");
    }
    let (event_tx, event_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = event_tx.send(line);
        }
    });

    let script = "echo 'workload: hello from inside the demo cgroup'; id -un >/dev/null; ls / >/dev/null";
    println!("==> running a workload in the demo cgroup: sh -c \"{script}\"");
    let out = cg.run(Command::new("/bin/sh").args(["-c", script]))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("==> and one exec outside it (/bin/true), which the filtered tracer must not show");
    Command::new("/bin/true").status()?;

    println!("==> what the kernel recorded (tgid, cgroup id, uid/gid, executable dev:ino, comm):");
    let mut seen = 0;
    while let Ok(line) = event_rx.recv_timeout(Duration::from_millis(800)) {
        println!("    {line}");
        seen += 1;
    }
    println!("==> cgroup id of the demo cgroup: {}", cg.id()?);
    if seen < 3 {
        bail!("expected the workload's 3 execs (sh, id, ls), saw {seen}");
    }
    println!("==> demo done: {seen} execs observed; stopping the agent and removing the cgroup");
    Ok(())
}
