//! Installs what building and testing Tether needs on Debian 12, as root. Idempotent and fast
//! when everything is already there.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

/// Debian packages, each with why it is needed.
const PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "rustc 1.96 that builds core for bpfel-unknown-none (rustup has no rust-src)"),
    ("rust-web-src", "the library source matching that rustc, for -Z build-std=core"),
    ("cargo-web", "the cargo matching that rustc, for the nested eBPF build"),
    ("rust-web-clippy", "clippy for the eBPF crate"),
    ("llvm-22-dev", "libLLVM for bpf-linker"),
    ("pkg-config", "native library discovery for -sys crates"),
    ("gcc", "cgo: SPIRE's SQLite driver in `bench spire` (and the host linker Rust uses)"),
    ("iproute2", "network namespaces and veth pairs in tests"),
    ("bash", "connect probes in tests (/dev/tcp)"),
    ("protobuf-compiler", "protoc, for the gRPC definitions in proto/"),
    ("libprotobuf-dev", "protobuf's well-known types (google/protobuf/struct.proto)"),
    ("libsqlite3-dev", "the server's embedded SQLite store"),
    ("openssl", "tests check SVIDs with `openssl verify`"),
    ("postgresql", "the server's PostgreSQL store is tested against a real server"),
    ("python3-venv", "a venv for the Python SPIFFE client the tests use"),
    ("qemu-system-x86", "a guest with another kernel, to prove the eBPF object is portable"),
    ("busybox-static", "the guest's userland"),
    ("swtpm", "a private software TPM per test (node attestation)"),
    ("swtpm-tools", "swtpm_setup manufactures TPMs with an EK certificate chain for tests"),
    ("tpm2-tools", "tpm2_quote/tpm2_checkquote, the baseline of the attestation benchmark"),
    ("libtss2-dev", "tpm2-tss 3.2, which tss-esapi 7.7 links (the agent's TPM client)"),
];

/// The guest kernel for the portability test: Debian 12's own 6.1 (a different struct
/// layout from the host's 6.18), unpacked from its package, never installed.
const GUEST_KERNEL_META: &str = "linux-image-cloud-amd64";

const BPF_LINKER_VERSION: &str = "0.13.0";

fn manual_steps() -> String {
    let pkgs: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
    format!(
        "install by hand:\n  apt-get install {}\n  LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker@{BPF_LINKER_VERSION} --locked --no-default-features --features llvm-22",
        pkgs.join(" ")
    )
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false)
}

pub fn run() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).filter(|p| !installed(p)).collect();
    let linker = bpf_linker_ok();
    let go_client = crate::peers::present(&crate::peers::GO_CLIENT);
    let system = missing.is_empty() && linker && guest_kernel_present();
    if system && python_client_present() && go_client {
        ensure_bpffs()?;
        println!("setup: all build and test dependencies present");
        return Ok(());
    }
    // Packages and the linker need a Debian host and root; the venv and the Go client do not.
    if !system && !Path::new("/etc/debian_version").exists() {
        bail!("setup: this is not a Debian host; {}", manual_steps());
    }
    if let (false, Err(e)) = (system, sandbox::require_root()) {
        bail!("setup: {e}; or {}", manual_steps());
    }
    if !missing.is_empty() {
        for (pkg, why) in PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
            println!("setup: installing {pkg}: {why}");
        }
        crate::run(Command::new("apt-get").args(["update", "-q"])).context("apt-get update")?;
        crate::run(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .context("apt-get install")?;
    }
    if !linker {
        println!("setup: building bpf-linker {BPF_LINKER_VERSION} against Debian's LLVM 22 (about a minute)");
        crate::run(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args([
                    "install",
                    &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )
        .context("installing bpf-linker")?;
        if !bpf_linker_ok() {
            bail!("setup: bpf-linker {BPF_LINKER_VERSION} installed but not on PATH; add ~/.cargo/bin to PATH");
        }
    }
    if !guest_kernel_present() {
        fetch_guest_kernel()?;
    }
    ensure_python_client()?;
    if !go_client {
        crate::peers::ensure(&crate::peers::GO_CLIENT)?;
    }
    ensure_bpffs()
}

/// The venv with the `spiffe` package from PyPI, an independent client the tests use.
pub const PY_SPIFFE: &str = "spiffe==0.3.2";

fn venv() -> std::path::PathBuf {
    crate::workspace().join("target/pyvenv")
}

fn python_client_present() -> bool {
    Command::new(venv().join("bin/python")).args(["-c", "import spiffe"]).output().is_ok_and(|o| o.status.success())
}

fn ensure_python_client() -> Result<()> {
    if python_client_present() {
        return Ok(());
    }
    println!("setup: creating {} with {PY_SPIFFE} from PyPI", venv().display());
    crate::run(Command::new("python3").args(["-m", "venv"]).arg(venv()))
        .context("python3 -m venv (install python3-venv)")?;
    crate::run(Command::new(venv().join("bin/pip")).args(["install", "-q", PY_SPIFFE]))
}

fn guest_kernels_dir() -> std::path::PathBuf {
    crate::workspace().join("target/vm-kernels")
}

fn guest_kernel_present() -> bool {
    std::fs::read_dir(guest_kernels_dir()).map(|mut d| d.next().is_some()).unwrap_or(false)
}

/// Downloads the current Debian 6.1 cloud kernel package and unpacks it (no install: the
/// host's boot configuration is not touched).
fn fetch_guest_kernel() -> Result<()> {
    let out = Command::new("apt-cache").args(["depends", GUEST_KERNEL_META]).output().context("apt-cache depends")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pkg = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .with_context(|| format!("no kernel package behind {GUEST_KERNEL_META} (apt-get update?)"))?
        .to_owned();
    println!("setup: unpacking guest kernel {pkg} into {}", guest_kernels_dir().display());
    let download = tempfile_dir()?;
    crate::run(Command::new("apt-get").args(["download", &pkg]).current_dir(&download))?;
    let deb = std::fs::read_dir(&download)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")?;
    let dest = guest_kernels_dir().join(&pkg);
    std::fs::create_dir_all(&dest)?;
    crate::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dest))?;
    std::fs::remove_dir_all(&download)?;
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("tether-setup-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Pinned programs and maps live in bpffs; mount it where the kernel expects it.
fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("bpf")) {
        return Ok(());
    }
    if sandbox::require_root().is_err() {
        println!("setup: bpffs is not mounted (needs root: mount -t bpf bpf /sys/fs/bpf)");
        return Ok(());
    }
    println!("setup: mounting bpffs at /sys/fs/bpf");
    crate::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
