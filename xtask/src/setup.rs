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
    ("bpftool", "tests inspect pinned programs and links the way an operator would"),
    ("stunnel4", "the peer of the tunnel benchmark (B7): TLS tunnels as Debian ships them"),
    ("g++", "cargo-fuzz compiles libFuzzer (C++) for the fuzz smoke run"),
    ("python3", "IPv6 and raw-socket probes in the enforcement tests"),
    ("coreutils", "sleep, timeout, sha256sum, chown: test workloads and checks"),
    ("util-linux", "runuser (PostgreSQL refuses root), unshare, setpriv: unprivileged attackers in tests"),
    ("mount", "mounting bpffs"),
    ("libc-bin", "ldd: the portability guest gets the agent's shared libraries"),
    ("apt", "apt-get and apt-cache, which setup itself runs (Essential on Debian)"),
    ("dpkg", "dpkg-query and dpkg-deb, which setup itself runs (Essential on Debian)"),
    ("dash", "/bin/sh (Essential on Debian)"),
];

/// Where an external program that the tests, benchmarks, demo or setup run comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A Debian package; it must be in [`PACKAGES`] so setup installs it.
    Debian(&'static str),
    /// rustup's toolchain, which every machine of this kind starts with (cargo, rustc).
    Rustup,
    /// Built by setup itself (the step is named).
    Setup(&'static str),
}

/// Every program run by name anywhere in the workspace, and what provides it. A fresh machine
/// has only what setup installs: `every_program_the_workspace_runs_is_installed_by_setup`
/// finds each program the code names and fails unless it is listed here with a source setup
/// provides, and setup checks after installing that each one resolves.
pub const PROGRAMS: &[(&str, Source)] = &[
    ("apt-cache", Source::Debian("apt")),
    ("apt-get", Source::Debian("apt")),
    ("bash", Source::Debian("bash")),
    ("bpf-linker", Source::Setup("bpf-linker, built against Debian's LLVM 22")),
    ("bpftool", Source::Debian("bpftool")),
    ("c++", Source::Debian("g++")),
    ("cargo", Source::Rustup),
    ("/usr/bin/cargo", Source::Debian("cargo-web")),
    ("/usr/bin/cargo-clippy", Source::Debian("rust-web-clippy")),
    ("/usr/bin/rustc", Source::Debian("rustc-web")),
    ("/usr/bin/sleep", Source::Debian("coreutils")),
    ("/usr/bin/true", Source::Debian("coreutils")),
    ("/usr/sbin/ip", Source::Debian("iproute2")),
    ("/bin/sh", Source::Debian("dash")),
    ("/bin/bash", Source::Debian("bash")),
    ("/bin/busybox", Source::Debian("busybox-static")),
    ("chown", Source::Debian("coreutils")),
    ("dpkg-deb", Source::Debian("dpkg")),
    ("dpkg-query", Source::Debian("dpkg")),
    ("ip", Source::Debian("iproute2")),
    ("ldd", Source::Debian("libc-bin")),
    ("mount", Source::Debian("mount")),
    ("openssl", Source::Debian("openssl")),
    ("psql", Source::Debian("postgresql")),
    ("python3", Source::Debian("python3")),
    ("qemu-system-x86_64", Source::Debian("qemu-system-x86")),
    ("runuser", Source::Debian("util-linux")),
    ("rustc", Source::Rustup),
    ("sh", Source::Debian("dash")),
    ("sha256sum", Source::Debian("coreutils")),
    ("sleep", Source::Debian("coreutils")),
    ("stunnel4", Source::Debian("stunnel4")),
    ("swtpm", Source::Debian("swtpm")),
    ("swtpm_ioctl", Source::Debian("swtpm-tools")),
    ("swtpm_setup", Source::Debian("swtpm-tools")),
    ("timeout", Source::Debian("coreutils")),
    ("tpm2_activatecredential", Source::Debian("tpm2-tools")),
    ("tpm2_checkquote", Source::Debian("tpm2-tools")),
    ("tpm2_createak", Source::Debian("tpm2-tools")),
    ("tpm2_evictcontrol", Source::Debian("tpm2-tools")),
    ("tpm2_flushcontext", Source::Debian("tpm2-tools")),
    ("tpm2_nvread", Source::Debian("tpm2-tools")),
    ("tpm2_pcrextend", Source::Debian("tpm2-tools")),
    ("tpm2_pcrread", Source::Debian("tpm2-tools")),
    ("tpm2_policysecret", Source::Debian("tpm2-tools")),
    ("tpm2_print", Source::Debian("tpm2-tools")),
    ("tpm2_quote", Source::Debian("tpm2-tools")),
    ("tpm2_readpublic", Source::Debian("tpm2-tools")),
    ("tpm2_shutdown", Source::Debian("tpm2-tools")),
    ("tpm2_startauthsession", Source::Debian("tpm2-tools")),
    ("unshare", Source::Debian("util-linux")),
    ("setpriv", Source::Debian("util-linux")),
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
        programs_resolve()?;
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
    ensure_bpffs()?;
    programs_resolve()
}

/// Where `program` would be found: an absolute path as it is; a name on PATH, then in the
/// system directories root's PATH has.
fn resolve(program: &str) -> Option<std::path::PathBuf> {
    if program.starts_with('/') {
        return Path::new(program).is_file().then(|| program.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(Into::into))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Every program of [`PROGRAMS`] that setup provides can now be found: a package that does
/// not ship the program the table says it does fails here, not in a test an hour later.
fn programs_resolve() -> Result<()> {
    let missing: Vec<String> = PROGRAMS
        .iter()
        .filter(|(_, source)| !matches!(source, Source::Setup(_)))
        .filter(|(program, _)| resolve(program).is_none())
        .map(|(program, source)| format!("{program} ({source:?})"))
        .collect();
    if !missing.is_empty() {
        bail!("setup: installed, yet not found on PATH: {}", missing.join(", "));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::Path};

    use super::*;

    /// Directories whose code runs programs: every crate of the workspace, and the fuzz crate.
    const CODE_DIRS: &[&str] = &[
        "agent",
        "agent-ebpf",
        "attestors",
        "bench",
        "common",
        "fuzz/src",
        "fuzz/fuzz_targets",
        "proto",
        "sandbox",
        "server",
        "tests",
        "xtask",
    ];

    /// Where tests, benchmarks and tools also read system files by absolute path (a program's
    /// bytes copied as a test binary, busybox for the guest): those come from packages too.
    const HARNESS_DIRS: &[&str] = &["bench", "sandbox", "tests", "xtask"];

    fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && p.file_name().is_some_and(|n| n != "target") {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// The string literal that starts right after each occurrence of `open` (which ends in
    /// a double quote), when it is a plain program name.
    fn literals_after<'a>(text: &'a str, open: &str) -> Vec<&'a str> {
        let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.+-".contains(&b));
        text.match_indices(open)
            .filter_map(|(i, _)| {
                let rest = &text[i + open.len()..];
                rest.find('"').map(|end| &rest[..end])
            })
            .filter(|s| plain(s))
            .collect()
    }

    /// Every program the workspace's code names, with the files naming it.
    fn programs_named() -> BTreeMap<String, Vec<String>> {
        let ws = crate::workspace();
        let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for dir in CODE_DIRS {
            let mut files = Vec::new();
            rust_files(&ws.join(dir), &mut files);
            for file in files {
                let text = std::fs::read_to_string(&file).unwrap();
                let rel = file.strip_prefix(&ws).unwrap().display().to_string();
                let mut names: Vec<String> = Vec::new();
                // Command::new, NetnsGuard::command, Swtpm::tool with a literal program name.
                for open in ["Command::new(\"", ".command(\"", ".tool(\""] {
                    names.extend(literals_after(&text, open).into_iter().map(str::to_owned));
                }
                // tpm2-tools, also when a helper takes the name.
                names.extend(literals_after(&text, "\"tpm2_").into_iter().map(|rest| format!("tpm2_{rest}")));
                if HARNESS_DIRS.iter().any(|d| rel.starts_with(d)) {
                    for dir in ["/usr/bin/", "/usr/sbin/", "/bin/", "/sbin/"] {
                        let found = literals_after(&text, &format!("\"{dir}"));
                        names.extend(found.into_iter().map(|name| format!("{dir}{name}")));
                    }
                }
                for name in names {
                    found.entry(name).or_default().push(rel.clone());
                }
            }
        }
        for files in found.values_mut() {
            files.sort();
            files.dedup();
        }
        found
    }

    #[test]
    fn every_program_the_workspace_runs_is_installed_by_setup() {
        let named = programs_named();
        // The scanner itself works: these are run by name today.
        for known in ["bpftool", "openssl", "swtpm", "ip", "tpm2_quote", "psql"] {
            assert!(named.contains_key(known), "the scan no longer finds {known}: {named:?}");
        }
        let packages: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
        let mut problems = Vec::new();
        for (program, files) in &named {
            match PROGRAMS.iter().find(|(p, _)| p == program) {
                None => problems.push(format!(
                    "{program} (run in {}) is not in setup::PROGRAMS: add it with the package that provides it",
                    files.join(", ")
                )),
                Some((_, Source::Debian(pkg))) if !packages.contains(pkg) => problems
                    .push(format!("{program}: package {pkg} is not in setup::PACKAGES, so setup never installs it")),
                Some(_) => {}
            }
        }
        assert!(problems.is_empty(), "programs a fresh machine would not have:\n{}", problems.join("\n"));
    }

    #[test]
    fn the_scan_reads_the_forms_programs_are_named_in() {
        // Built at run time: the scan reads this file too, and these are examples, not programs.
        let text = [
            "Command::new(\"bpftool\").arg(x);",
            "ns.command(\"python3\");",
            "t.tool(\"tpm2_nvread\");",
            "tool(&t, d, \"tpm2_quote\", &[]);",
            "copy(\"/usr/bin/sleep\", p);",
            "Command::new(name);",
            "\"/usr/bin/true 1234\"",
        ]
        .concat()
        .replace("bpftool", "example-a")
        .replace("python3", "example-b")
        .replace("tpm2_nvread", "example-c");
        assert_eq!(literals_after(&text, "Command::new(\""), vec!["example-a"]);
        assert_eq!(literals_after(&text, ".command(\""), vec!["example-b"]);
        assert_eq!(literals_after(&text, ".tool(\""), vec!["example-c"]);
        assert_eq!(literals_after(&text, "\"tpm2_"), vec!["quote"]);
        assert_eq!(
            literals_after(&text, "\"/usr/bin/"),
            vec!["sleep"],
            "a path followed by more text is not a program"
        );
    }
}
