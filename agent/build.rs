//! Builds the kernel programs (`agent-ebpf`) for `bpfel-unknown-none` and hands the object to
//! the agent, which embeds it. A nested cargo does it with Debian's rustc 1.96 and its library
//! source (rustup here has no rust-src), as ../shared/TOOLCHAIN.md records; `cargo xtask setup`
//! installs both and bpf-linker.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir.parent().context("agent/ has no parent")?.to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    for dir in ["agent-ebpf/src", "agent-ebpf/Cargo.toml", "common/src", "common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=TETHER_EBPF_OBJECT");

    // A prebuilt object may be supplied (e.g. packaging); otherwise build it.
    let (object, floor) = match env::var_os("TETHER_EBPF_OBJECT") {
        Some(path) => {
            let path = PathBuf::from(path);
            let floor = path.with_file_name("tether-floor-ebpf");
            (path, floor)
        }
        None => {
            let dir = build_ebpf(&workspace, &out_dir)?;
            (dir.join("tether-agent-ebpf"), dir.join("tether-floor-ebpf"))
        }
    };
    for (from, to) in [(object, "tether.bpf.o"), (floor, "tether-floor.bpf.o")] {
        let dest = out_dir.join(to);
        std::fs::copy(&from, &dest).with_context(|| format!("copying {} to {}", from.display(), dest.display()))?;
    }
    Ok(())
}

/// Builds every object of agent-ebpf (the agent's, and the benchmark floors) and returns the
/// directory holding them.
fn build_ebpf(workspace: &Path, out_dir: &Path) -> Result<PathBuf> {
    for tool in [DEBIAN_RUSTC, DEBIAN_CARGO] {
        if !Path::new(tool).exists() {
            bail!("{tool} not found: the eBPF programs need Debian's rustc-web and cargo-web; run `cargo xtask setup`");
        }
    }
    // Shared by every profile and by clippy runs so the kernel side builds once:
    // <target>/<profile>/build/<pkg>/out -> <target>/ebpf
    let target_dir = out_dir.ancestors().nth(4).context("unexpected OUT_DIR layout")?.join("ebpf");

    let mut path = env::var_os("PATH").unwrap_or_default();
    if let Some(home) =
        env::var_os("CARGO_HOME").or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo").into()))
    {
        let bin = Path::new(&home).join("bin");
        path = env::join_paths(std::iter::once(bin).chain(env::split_paths(&path)))?;
    }

    let mut cmd = Command::new(DEBIAN_CARGO);
    // The outer cargo's environment (clippy wrappers, rustflags, jobserver, target settings)
    // must not leak into the nested build of another target.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || key.starts_with("RUSTC")
            || key == "RUSTDOC"
            || key == "RUSTFLAGS"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.current_dir(workspace)
        .env("PATH", path)
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        // Debug info is what makes bpf-linker emit BTF, which aya needs for maps and globals.
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf")
        .args([
            "build",
            "--package",
            "tether-agent-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(&target_dir);
    let status = cmd.status().context("running the nested eBPF cargo build")?;
    if !status.success() {
        bail!("building agent-ebpf failed ({status}); if bpf-linker is missing run `cargo xtask setup`");
    }
    Ok(target_dir.join("bpfel-unknown-none/release"))
}
