//! The eBPF object built here loads and works on a different kernel: Debian 12's 6.1, booted
//! in a KVM guest with the agent in its initramfs. That kernel lays out `struct inode`
//! differently (a timespec64 `i_ctime` instead of 6.11+'s `i_ctime_sec`/`i_ctime_nsec`), so
//! a build-time offset would read garbage there; the agent reads offsets from the guest's
//! own BTF at load time.

use std::time::Duration;

use tether_tests::vm::{boot, guest_kernels, shared_libs, write, Cpio};

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t cgroup2 none /sys/fs/cgroup
mount -t tmpfs tmp /tmp
mount -t securityfs none /sys/kernel/security
export RUST_LOG=warn
echo "VM-KERNEL $(uname -r)"
echo "VM-PROBE $(/tether-agent probe | tr -d '\n ')"
mkdir /sys/fs/cgroup/t
cp /bin/busybox /tmp/sleep
cp /bin/busybox /tmp/true
echo "VM-STAT $(stat -c '%i %Z' /tmp/sleep) $(stat -c '%i' /tmp/true)"
sh -c 'echo $$ > /sys/fs/cgroup/t/cgroup.procs; exec /tmp/sleep 60' &
sleep 1
/tether-agent ps --json --cgroup /sys/fs/cgroup/t | sed 's/^/VM-PS /'
/tether-agent trace-exec --json --cgroup /sys/fs/cgroup/t > /tmp/trace.json 2> /tmp/trace.log &
i=0; while ! grep -q "tracing execs" /tmp/trace.log && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
sh -c 'echo $$ > /sys/fs/cgroup/t/cgroup.procs; exec /tmp/true'
sleep 1
sed 's/^/VM-TRACE /' /tmp/trace.json
grep -i error /tmp/trace.log | sed 's/^/VM-ERR /'
echo VM-DONE
poweroff -f
"#;

#[test]
fn the_same_object_works_on_debian_6_1() {
    sandbox::require_root().unwrap();
    let kernels = guest_kernels();
    let kernel = kernels.iter().find(|k| k.to_string_lossy().contains("6.1.")).unwrap_or_else(|| {
        panic!("no 6.1 guest kernel under {} (cargo xtask setup unpacks it)", tether_tests::vm::kernels_dir().display())
    });
    let agent = tether_tests::agent_bin();
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("bin/busybox", 0o755, &std::fs::read("/bin/busybox").expect("busybox-static (cargo xtask setup)"));
    cpio.file("tether-agent", 0o755, &std::fs::read(&agent).unwrap());
    for lib in shared_libs(&agent).unwrap() {
        cpio.host_file(&lib, 0o755).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let initramfs = write(dir.path(), "initramfs.cpio", &cpio.finish()).unwrap();
    let console = boot(kernel, &initramfs, Duration::from_secs(240)).unwrap();
    let lines: Vec<&str> = console.lines().map(|l| l.trim_end_matches('\r')).collect();
    // Console lines may carry the firmware's terminal escapes in front.
    let field =
        |prefix: &str| lines.iter().filter_map(|l| l.find(prefix).map(|i| &l[i + prefix.len()..])).collect::<Vec<_>>();
    assert!(lines.iter().any(|l| l.ends_with("VM-DONE")), "guest did not finish:\n{console}");
    assert!(field("VM-KERNEL ").first().is_some_and(|k| k.starts_with("6.1.")), "{console}");
    assert!(field("VM-ERR ").is_empty(), "agent errors in the guest:\n{console}");

    let stat = field("VM-STAT ");
    let mut it = stat.first().unwrap().split_whitespace().map(|v| v.parse::<u64>().unwrap());
    let (ino, ctime, true_ino) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());

    // The guest kernel has trampolines and `lsm=...,bpf` on its command line: the probe must
    // choose the BPF LSM path there (the host's kernel refuses trampolines).
    let probe: serde_json::Value = serde_json::from_str(field("VM-PROBE ")[0]).unwrap();
    assert_eq!(probe["tp_btf"], true, "{console}");
    assert_eq!(probe["path"], "bpf-lsm", "{console}");

    // ps: the process started before the agent, seeded from its task, exe read through the
    // 6.1 layout and proven right by a successful (identity-checked) measurement.
    let ps: Vec<serde_json::Value> = field("VM-PS ").iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(ps.len(), 1, "{console}");
    assert_eq!(ps[0]["record"]["origin"], "seeded");
    assert_eq!(ps[0]["record"]["exe"]["ino"], ino);
    assert_eq!(ps[0]["record"]["exe"]["ctime_sec"], ctime);
    assert_eq!(ps[0]["measurement"]["state"], "measured", "{console}");

    // trace-exec: an exec observed live on the guest kernel.
    let trace: Vec<serde_json::Value> = field("VM-TRACE ").iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(trace.iter().any(|e| e["exe"]["ino"] == true_ino && e["origin"] == "exec"), "{console}");
}
