//! Go programs the tests and benchmarks run beside Tether, built from source fetched through
//! the Go module proxy (never vendored, never prebuilt): the go-spiffe reference client
//! (`tests/go`, needed by `cargo xtask test`, so plain setup builds it) and SPIRE's server and
//! agent (`bench/go`, needed only by `cargo xtask bench spire`, which builds them on first
//! use). Versions are pinned by each module's go.mod and go.sum.
//!
//! Everything Go writes stays under target/: the module and build caches in target/go, the
//! binaries in target/peers/bin. A stamp beside each set of binaries records a hash of its
//! module (go.mod, go.sum, sources) and the Go version, so an unchanged set costs one
//! directory walk.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

/// The oldest Go that builds both modules (SPIRE 1.13.3's go.mod says 1.25.3).
const MIN_GO: (u32, u32) = (1, 25);

/// A Go module of this repository and what it builds.
pub struct GoBuild {
    /// Shown in messages.
    pub what: &'static str,
    /// The module directory, relative to the workspace.
    pub module: &'static str,
    /// Packages to build (one binary each).
    pub packages: &'static [&'static str],
    /// The binaries they produce, in target/peers/bin.
    pub binaries: &'static [&'static str],
    /// Which commands need it (for the error message).
    pub needed_by: &'static str,
    /// Linker flags: stripped, as release builds are (SPIRE's unix attestor hashes the
    /// workload's binary on every call, so a smaller client never favours Tether), and
    /// SPIRE's version stamped the way its Makefile stamps a release.
    pub ldflags: &'static str,
}

/// The go-spiffe v2.9.0 client: `cargo xtask test` runs it against the agent, and
/// `cargo xtask bench spire` runs it as the workload against both agents.
pub const GO_CLIENT: GoBuild = GoBuild {
    what: "the go-spiffe test client",
    module: "tests/go",
    packages: &["./spiffe-go-client"],
    binaries: &["spiffe-go-client"],
    needed_by: "cargo xtask test and cargo xtask bench spire",
    ldflags: "-s -w",
};

/// SPIRE v1.13.3 (server and agent), the peer of `cargo xtask bench spire`.
pub const SPIRE: GoBuild = GoBuild {
    what: "SPIRE server and agent",
    module: "bench/go",
    packages: &["github.com/spiffe/spire/cmd/spire-server", "github.com/spiffe/spire/cmd/spire-agent"],
    binaries: &["spire-server", "spire-agent"],
    needed_by: "cargo xtask bench spire",
    ldflags: "-s -w -X github.com/spiffe/spire/pkg/common/version.gittag=1.13.3",
};

pub fn bin_dir() -> PathBuf {
    crate::workspace().join("target/peers/bin")
}

fn go_dir() -> PathBuf {
    crate::workspace().join("target/go")
}

/// `go` from PATH, else where the Go distribution installs it.
pub fn find_go() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("go")).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path.into_iter().chain([PathBuf::from("/usr/local/go/bin/go")]).find(|p| p.is_file())
}

/// A `go` command confined to target/: its own module and build caches, no toolchain
/// downloads, no VCS stamping, writable module cache (so `cargo clean` can remove it).
fn go_command(go: &Path, dir: &Path) -> Command {
    let base = go_dir();
    let mut cmd = Command::new(go);
    cmd.current_dir(dir)
        .env("GOMODCACHE", base.join("mod"))
        .env("GOCACHE", base.join("cache"))
        .env("GOPATH", base.join("path"))
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-modcacherw -buildvcs=false -mod=readonly")
        .env("GOTELEMETRY", "off");
    cmd
}

fn go_version(go: &Path) -> Result<String> {
    let out = go_command(go, &crate::workspace()).args(["env", "GOVERSION"]).output().context("running go env")?;
    if !out.status.success() {
        bail!("{} env GOVERSION failed: {}", go.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// (major, minor) of "go1.26.8".
fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.strip_prefix("go")?.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// FNV-1a over every input that changes the binaries: stable across Rust versions, unlike
/// std's hasher, and plenty for a cache key.
fn fnv(state: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *state = (*state ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
}

fn module_hash(b: &GoBuild, module: &Path, go_version: &str) -> Result<String> {
    let mut files = Vec::new();
    let mut dirs = vec![module.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "go")
                || p.file_name().is_some_and(|n| n == "go.mod" || n == "go.sum")
            {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    fnv(&mut h, go_version.as_bytes());
    fnv(&mut h, b.ldflags.as_bytes());
    for f in files {
        fnv(&mut h, f.strip_prefix(module).unwrap_or(&f).to_string_lossy().as_bytes());
        fnv(&mut h, &std::fs::read(&f)?);
    }
    Ok(format!("{h:016x}"))
}

fn stamp_path(b: &GoBuild) -> PathBuf {
    bin_dir().join(format!(".{}.stamp", b.binaries[0]))
}

/// True when every binary exists and was built from the module as it is now, with this Go.
pub fn present(b: &GoBuild) -> bool {
    let Some(go) = find_go() else { return false };
    let Ok(version) = go_version(&go) else { return false };
    let Ok(hash) = module_hash(b, &crate::workspace().join(b.module), &version) else { return false };
    b.binaries.iter().all(|n| bin_dir().join(n).is_file())
        && std::fs::read_to_string(stamp_path(b)).is_ok_and(|s| s.trim() == hash)
}

/// Builds `b` unless [`present`]; says clearly what is missing when Go or the module proxy
/// is not there.
pub fn ensure(b: &GoBuild) -> Result<()> {
    if present(b) {
        return Ok(());
    }
    let go = find_go().with_context(|| {
        format!(
            "setup: Go {}.{} or later is needed to build {} ({}), and no `go` was found on PATH or at /usr/local/go/bin/go: install the Go distribution and put it on PATH",
            MIN_GO.0, MIN_GO.1, b.what, b.needed_by
        )
    })?;
    let version = go_version(&go)?;
    match parse_version(&version) {
        Some(v) if v >= MIN_GO => {}
        _ => bail!(
            "setup: {} is {version}; building {} ({}) needs Go {}.{} or later",
            go.display(),
            b.what,
            b.needed_by,
            MIN_GO.0,
            MIN_GO.1
        ),
    }
    let module = crate::workspace().join(b.module);
    println!(
        "setup: building {} from {} with {version} (modules from the Go module proxy into target/go)",
        b.what, b.module
    );
    let started = Instant::now();
    // Download first, so a proxy that cannot be reached is told apart from a build error.
    let out = go_command(&go, &module).args(["mod", "download"]).output().context("running go mod download")?;
    if !out.status.success() {
        let proxy = go_command(&go, &module).args(["env", "GOPROXY"]).output().ok();
        let proxy = proxy.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default();
        bail!(
            "setup: could not download the Go modules of {} (needed by {}) from the Go module proxy (GOPROXY={proxy}); is it reachable?\n{}",
            b.module,
            b.needed_by,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::create_dir_all(bin_dir())?;
    let mut out_dir = bin_dir().into_os_string();
    out_dir.push("/");
    let status = go_command(&go, &module)
        .args(["build", "-trimpath", &format!("-ldflags={}", b.ldflags), "-o"])
        .arg(out_dir)
        .args(b.packages)
        .status()
        .context("running go build")?;
    if !status.success() {
        bail!("setup: go build of {} in {} failed", b.what, b.module);
    }
    std::fs::write(stamp_path(b), module_hash(b, &module, &version)?)?;
    println!("setup: built {} in {:.0} s", b.binaries.join(", "), started.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_versions_parse() {
        assert_eq!(parse_version("go1.26.8"), Some((1, 26)));
        assert_eq!(parse_version("go1.25"), Some((1, 25)));
        assert_eq!(parse_version("go1.25rc1"), Some((1, 25)));
        assert_eq!(parse_version("devel +abc"), None);
        assert!(parse_version("go1.24.9").unwrap() < MIN_GO);
    }
}
