//! A FUSE filesystem for the privileged tests, spoken over /dev/fuse by hand (no libfuse):
//! one read-only file, `prog`, whose bytes are a given file's. It answers the first
//! `--answer-opens N` opens of `prog` and never answers any after — a filesystem that stops
//! responding, as a FUSE server run by an attacker can. It prints `ready` once mounted and
//! `open K` for each open it receives.
//!
//! `tether-test-fuse MOUNTPOINT SOURCE [--answer-opens N] [--userns -- PROGRAM ARGS]`:
//! with `--userns`, it first enters a new user and mount namespace (mapping the caller's uid
//! to 0, as an unprivileged user can), mounts there, and runs PROGRAM in that namespace
//! (its exit status is printed as `exit S`).

use std::{
    ffi::CString,
    fs::File,
    io::{Read, Write},
    os::fd::{AsRawFd, FromRawFd},
    process::Command,
};

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_STATFS: u32 = 17;
const FUSE_RELEASE: u32 = 18;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_OPENDIR: u32 = 27;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;

const ROOT: u64 = 1;
const PROG: u64 = 2;
/// FOPEN_KEEP_CACHE: pages read once stay cached for later opens.
const FOPEN_KEEP_CACHE: u32 = 2;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().unwrap())
}

/// `struct fuse_attr` (88 bytes).
fn attr(ino: u64, size: u64, mode: u32) -> Vec<u8> {
    let mut a = Vec::with_capacity(88);
    for v in [ino, size, size.div_ceil(512), 1, 1, 1] {
        a.extend_from_slice(&v.to_ne_bytes()); // ino size blocks atime mtime ctime
    }
    for v in [0u32, 0, 0, mode, 1, 0, 0, 0, 4096, 0] {
        a.extend_from_slice(&v.to_ne_bytes()); // *nsec mode nlink uid gid rdev blksize flags
    }
    a
}

/// Valid for an hour: the kernel does not ask again (lookups and attributes stay cached).
const VALID: u64 = 3600;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mountpoint, source) = (&args[1], &args[2]);
    let mut answer_opens = u64::MAX;
    let mut userns: Option<Vec<String>> = None;
    let mut i = 3;
    while i < args.len() {
        match args[i].as_str() {
            "--answer-opens" => {
                answer_opens = args[i + 1].parse().unwrap();
                i += 2;
            }
            "--userns" => {
                assert_eq!(args.get(i + 1).map(String::as_str), Some("--"));
                userns = Some(args[i + 2..].to_vec());
                break;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let content = std::fs::read(source).expect("reading the source file");
    let uid = if userns.is_some() { enter_userns() } else { 0 };

    let dev = File::options().read(true).write(true).open("/dev/fuse").expect("/dev/fuse");
    let opts = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={uid},default_permissions{}",
        dev.as_raw_fd(),
        if userns.is_some() { "" } else { ",allow_other" }
    );
    let (src, target, fstype, data) = (
        CString::new("tether-test-fuse").unwrap(),
        CString::new(mountpoint.as_str()).unwrap(),
        CString::new("fuse.tether-test").unwrap(),
        CString::new(opts).unwrap(),
    );
    // SAFETY: all pointers are valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_RDONLY,
            data.as_ptr().cast(),
        )
    };
    assert_eq!(rc, 0, "mount: {}", std::io::Error::last_os_error());

    // The server runs on its own thread; the main thread prints and, in a user namespace,
    // runs the program.
    let served = std::thread::spawn(move || serve(dev, &content, answer_opens));
    println!("ready");
    std::io::stdout().flush().unwrap();
    match userns {
        Some(program) => {
            let status = Command::new(&program[0]).args(&program[1..]).status().expect("running the program");
            println!("exit {}", status.code().unwrap_or(-1));
            std::io::stdout().flush().unwrap();
        }
        None => {
            let _ = served.join();
        }
    }
}

/// A new user namespace (the caller's uid and gid mapped to 0) and mount namespace; returns
/// the uid to mount as (0 inside).
fn enter_userns() -> u32 {
    // SAFETY: getuid/getgid/unshare have no memory-safety preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let rc = unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) };
    assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
    std::fs::write("/proc/self/setgroups", "deny").unwrap();
    std::fs::write("/proc/self/uid_map", format!("0 {uid} 1")).unwrap();
    std::fs::write("/proc/self/gid_map", format!("0 {gid} 1")).unwrap();
    let root = CString::new("/").unwrap();
    // SAFETY: valid string; no mount propagation back to the parent namespace.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "making mounts private: {}", std::io::Error::last_os_error());
    0
}

fn reply(dev: &File, unique: u64, error: i32, body: &[u8]) {
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&error.to_ne_bytes());
    out.extend_from_slice(&unique.to_ne_bytes());
    out.extend_from_slice(body);
    // SAFETY: writing our buffer to our fd; a reply to an interrupted request may fail.
    unsafe { libc::write(dev.as_raw_fd(), out.as_ptr().cast(), out.len()) };
}

fn serve(dev: File, content: &[u8], answer_opens: u64) {
    let mut buf = vec![0u8; 1 << 20 | 4096];
    let mut opens = 0u64;
    // SAFETY: a second handle on the same fd for reading, never closed separately.
    let mut reader = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(dev.as_raw_fd()) });
    loop {
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(_) => return, // unmounted
        };
        let req = &buf[..n];
        let (opcode, unique, node) = (u32_at(req, 4), u64_at(req, 8), u64_at(req, 16));
        let body = &req[40..];
        match opcode {
            FUSE_INIT => {
                let mut out = Vec::new();
                for v in [7u32, 31, u32_at(body, 8), 0] {
                    out.extend_from_slice(&v.to_ne_bytes()); // major minor max_readahead flags
                }
                out.extend_from_slice(&16u16.to_ne_bytes()); // max_background
                out.extend_from_slice(&12u16.to_ne_bytes()); // congestion_threshold
                out.extend_from_slice(&(128u32 * 1024).to_ne_bytes()); // max_write
                out.extend_from_slice(&1u32.to_ne_bytes()); // time_gran
                out.resize(64, 0);
                reply(&dev, unique, 0, &out);
            }
            FUSE_LOOKUP => {
                let name = body.split(|b| *b == 0).next().unwrap_or_default();
                if node == ROOT && name == b"prog" {
                    let mut out = Vec::new();
                    for v in [PROG, 0, VALID, VALID] {
                        out.extend_from_slice(&v.to_ne_bytes()); // nodeid generation entry_valid attr_valid
                    }
                    out.extend_from_slice(&[0; 8]);
                    out.extend_from_slice(&attr(PROG, content.len() as u64, 0o100755));
                    reply(&dev, unique, 0, &out);
                } else {
                    reply(&dev, unique, -libc::ENOENT, &[]);
                }
            }
            FUSE_GETATTR => {
                let a = if node == ROOT { attr(ROOT, 0, 0o40755) } else { attr(PROG, content.len() as u64, 0o100755) };
                let mut out = Vec::new();
                out.extend_from_slice(&VALID.to_ne_bytes());
                out.extend_from_slice(&[0; 8]);
                out.extend_from_slice(&a);
                reply(&dev, unique, 0, &out);
            }
            FUSE_OPEN | FUSE_OPENDIR => {
                if opcode == FUSE_OPEN {
                    opens += 1;
                    println!("open {opens}");
                    std::io::stdout().flush().unwrap();
                    if opens > answer_opens {
                        continue; // never answered
                    }
                }
                let mut out = Vec::new();
                out.extend_from_slice(&0u64.to_ne_bytes());
                out.extend_from_slice(&FOPEN_KEEP_CACHE.to_ne_bytes());
                out.extend_from_slice(&[0; 4]);
                reply(&dev, unique, 0, &out);
            }
            FUSE_READ => {
                let (offset, size) = (u64_at(body, 8) as usize, u32_at(body, 16) as usize);
                let start = offset.min(content.len());
                let end = (start + size).min(content.len());
                reply(&dev, unique, 0, &content[start..end]);
            }
            FUSE_STATFS => reply(&dev, unique, 0, &[0; 80]),
            FUSE_RELEASE | FUSE_RELEASEDIR | FUSE_FLUSH => reply(&dev, unique, 0, &[]),
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => {}
            FUSE_DESTROY => {
                reply(&dev, unique, 0, &[]);
                return;
            }
            _ => reply(&dev, unique, -libc::ENOSYS, &[]),
        }
    }
}
