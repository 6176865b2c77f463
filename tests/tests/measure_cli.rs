//! `tether-agent measure DIR` writes the golden manifest an image builder would commit, and
//! `ps --manifest` pre-measures what it lists.

use std::{os::unix::fs::PermissionsExt, process::Command};

use tether_tests::sha256sum;

#[test]
fn measure_writes_a_manifest_of_the_executables() {
    let root = tempfile::tempdir().unwrap();
    for (path, exec) in [("usr/bin/tool", true), ("usr/lib/data.bin", false), ("opt/my app/run", true)] {
        let full = root.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(&full, path.as_bytes()).unwrap();
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 })).unwrap();
    }
    let manifest = root.path().join("golden.txt");
    let out = Command::new(tether_tests::agent_bin())
        .arg("measure")
        .arg(root.path())
        .arg("-o")
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&manifest).unwrap();
    let want = format!(
        "/opt/my app/run {}\n/usr/bin/tool {}\n",
        sha256sum(&root.path().join("opt/my app/run")),
        sha256sum(&root.path().join("usr/bin/tool"))
    );
    assert_eq!(text, want);
}

#[test]
fn a_broken_manifest_is_refused_with_file_and_line() {
    sandbox::require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("golden.txt");
    std::fs::write(&manifest, "/usr/bin/true 1234\n").unwrap();
    let cg = sandbox::CgroupGuard::new("manifest").unwrap();
    let out = Command::new(tether_tests::agent_bin())
        .args(["ps", "--cgroup"])
        .arg(cg.path())
        .arg("--manifest")
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:1:", manifest.display())) && stderr.contains("not a 64-digit hex"),
        "{stderr}"
    );
}
