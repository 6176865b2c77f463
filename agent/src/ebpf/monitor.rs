//! The process monitor: exec/fork/exit/cgroup programs keeping a record per task, the
//! start-up seeding of processes that predate them, lookups by pidfd, the measurement map,
//! and (optionally) live exec events.

use std::{
    io::Read,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::Path,
};

use aya::{
    maps::{Array, HashMap, Map, MapData, RingBuf, SockMap},
    programs::{links::FdLink, BtfTracePoint, Iter},
    Btf as AyaBtf, Ebpf,
};
use tether_common::{maps, programs, ExecEvent, FileKey, Measurement, PeerQuery, ProcRecord, TraceFilter};
use tokio::io::unix::AsyncFd;

use super::{map_err, program_err, EbpfError, Loaded};
use crate::cgroup::Cgroup;

/// Which execs are reported as events (records are kept for all processes regardless).
#[derive(Clone, Copy, Debug)]
pub enum TraceScope<'a> {
    /// No events: records only.
    Off,
    /// Execs anywhere on the machine.
    All,
    /// Execs in this cgroup's subtree.
    Cgroup(&'a Cgroup),
}

/// Attached record-keeping programs. Dropping it detaches them (and frees the records).
/// Or, from [`Monitor::open_pinned`], a reader of the records that an [`super::Enforcer`]'s
/// pinned programs keep.
pub struct Monitor {
    records: OwnedFd,
    measurements: HashMap<MapData, FileKey, Measurement>,
    events: Option<RingBuf<MapData>>,
    /// The object with its attached programs (from [`Monitor::start`]).
    _loaded: Option<Loaded>,
    /// The caller check, until [`Monitor::take_peer_check`] (None if it could not be set up).
    peer: Option<PeerCheck>,
}

/// The record-keeping programs and the tracepoint each one attaches to.
pub(super) const PROCESS_PROGRAMS: [(&str, &str); 4] = [
    (programs::EXEC, "sched_process_exec"),
    (programs::FORK, "sched_process_fork"),
    (programs::EXIT, "sched_process_exit"),
    (programs::CGROUP_ATTACH, "cgroup_attach_task"),
];

/// Loads and attaches the record-keeping programs. With `pins` (a bpffs directory), each
/// link is pinned there under its program's name, replacing the link pinned before: the new
/// program is attached before the old link goes (tracing links cannot be updated in place),
/// so no exec, fork or exit goes unrecorded. Without, the links live as long as `ebpf`.
pub(super) fn attach_process_programs(ebpf: &mut Ebpf, btf: &AyaBtf, pins: Option<&Path>) -> Result<(), EbpfError> {
    for (name, tracepoint) in PROCESS_PROGRAMS {
        let prog: &mut BtfTracePoint =
            ebpf.program_mut(name).ok_or(EbpfError::Missing(name))?.try_into().map_err(program_err(name, "type"))?;
        prog.load(tracepoint, btf).map_err(program_err(name, "load"))?;
        let link_id = prog.attach().map_err(program_err(name, "attach"))?;
        if let Some(dir) = pins {
            let link: FdLink = prog.take_link(link_id).map_err(program_err(name, "take link"))?.into();
            // bpffs reserves names with dots.
            let staged = dir.join(format!("{name}_staged"));
            let _ = std::fs::remove_file(&staged); // left by an agent killed right here
            link.pin(&staged).map_err(|e| EbpfError::Io {
                op: "pinning a process program link",
                source: std::io::Error::other(e),
            })?;
            // rename(2) replaces the old pin in one step; the old link is released with it.
            std::fs::rename(&staged, dir.join(name))
                .map_err(|source| EbpfError::Io { op: "replacing a pinned process program link", source })?;
        }
    }
    Ok(())
}

/// The stream of exec events, taken out of the [`Monitor`] so it can be awaited on its own.
pub struct ExecEvents {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl Monitor {
    /// Attaches the exec, fork, exit and cgroup-migration programs, then seeds records for
    /// processes already running (in that order, so no process falls between the two).
    pub fn start(mut loaded: Loaded, scope: TraceScope<'_>) -> Result<Self, EbpfError> {
        let ebpf = &mut loaded.ebpf;
        let filter = match scope {
            TraceScope::Off => TraceFilter::default(),
            TraceScope::All => TraceFilter { enabled: 1, ..Default::default() },
            TraceScope::Cgroup(cg) => TraceFilter { ancestor_id: cg.id, level: cg.level, enabled: 1 },
        };
        let mut filter_map: Array<_, TraceFilter> =
            Array::try_from(ebpf.map_mut(maps::TRACE_FILTER).ok_or(EbpfError::Missing(maps::TRACE_FILTER))?)
                .map_err(map_err(maps::TRACE_FILTER, "open"))?;
        filter_map.set(0, filter, 0).map_err(map_err(maps::TRACE_FILTER, "set"))?;

        let btf = AyaBtf::from_sys_fs()?;
        attach_process_programs(ebpf, &btf, None)?;
        seed(ebpf, &btf)?;
        let peer = PeerCheck::start(&mut loaded, &btf);
        let ebpf = &mut loaded.ebpf;

        let records = match ebpf.map(maps::TASK_RECORDS) {
            Some(Map::Unsupported(data)) => data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| EbpfError::Io { op: "duplicating the task storage fd", source })?,
            _ => return Err(EbpfError::Missing(maps::TASK_RECORDS)),
        };
        let measurements =
            HashMap::try_from(ebpf.take_map(maps::MEASUREMENTS).ok_or(EbpfError::Missing(maps::MEASUREMENTS))?)
                .map_err(map_err(maps::MEASUREMENTS, "open"))?;
        let ring = RingBuf::try_from(ebpf.take_map(maps::EXEC_EVENTS).ok_or(EbpfError::Missing(maps::EXEC_EVENTS))?)
            .map_err(map_err(maps::EXEC_EVENTS, "open"))?;
        Ok(Monitor { records, measurements, events: Some(ring), _loaded: Some(loaded), peer })
    }

    /// Reads the records kept by the pinned programs of an [`super::Enforcer`] started on
    /// `pin_dir`: the same task storage its enforcement hooks read, so the agent's identity
    /// decisions and the kernel's agree. Attaches nothing; has no exec events.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, EbpfError> {
        let maps = pin_dir.join(super::enforce::LAYOUT);
        let open = |name: &'static str| MapData::from_pin(maps.join(name)).map_err(map_err(name, "open pinned"));
        let records = open(maps::TASK_RECORDS)?
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| EbpfError::Io { op: "duplicating the task storage fd", source })?;
        let measurements =
            HashMap::try_from(Map::HashMap(open(maps::MEASUREMENTS)?)).map_err(map_err(maps::MEASUREMENTS, "open"))?;
        // For the peer check only: its maps are the pinned ones (nothing new but the query
        // slot and a ring buffer), and nothing of it is attached.
        let mut loaded = super::load_with_pins(Some(&maps), &super::enforce::PINNED_MAPS)?;
        let peer = PeerCheck::start(&mut loaded, &AyaBtf::from_sys_fs()?);
        Ok(Monitor { records, measurements, events: None, _loaded: None, peer })
    }

    /// The kernel's record of the process `pidfd` refers to. `None` when it has none: it
    /// exited (records are deleted at exit), or it is a kernel thread. A pidfd cannot be
    /// recycled, so the answer is never about another process that reused the PID.
    pub fn lookup(&self, pidfd: BorrowedFd<'_>) -> Result<Option<ProcRecord>, EbpfError> {
        lookup_task_storage(self.records.as_fd(), pidfd)
    }

    /// The caller check (once), to be used under a lock of its own: a check walks every
    /// Unix socket, and record lookups should not wait for it.
    pub fn take_peer_check(&mut self) -> Option<PeerCheck> {
        self.peer.take()
    }

    /// Publishes a measurement so kernel hooks see it.
    pub fn set_measurement(&mut self, key: FileKey, m: Measurement) -> Result<(), EbpfError> {
        self.measurements.insert(key, m, 0).map_err(map_err(maps::MEASUREMENTS, "insert"))
    }

    /// What the kernel map holds for `key`.
    pub fn measurement(&self, key: &FileKey) -> Option<Measurement> {
        self.measurements.get(key, 0).ok()
    }

    /// The exec event stream (once). Needs a tokio runtime.
    pub fn take_events(&mut self) -> Result<ExecEvents, EbpfError> {
        let ring = self.events.take().ok_or(EbpfError::Missing("exec events (already taken, or a pinned monitor)"))?;
        ExecEvents::register(ring)
    }
}

impl ExecEvents {
    /// Awaits `ring` (EXEC_EVENTS) on the current tokio runtime.
    pub(super) fn register(ring: RingBuf<MapData>) -> Result<Self, EbpfError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(EbpfError::Io {
                op: "exec events need a tokio runtime",
                source: std::io::ErrorKind::Unsupported.into(),
            });
        }
        // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| EbpfError::Io { op: "registering the exec ring buffer with tokio", source: e.into() })?;
        Ok(ExecEvents { ring })
    }

    /// Waits for the next batch of exec events (in the [`TraceScope`] given at start): the
    /// record written at each exec, and the exec'ing thread's id.
    pub async fn next_batch(&mut self) -> Result<Vec<(ProcRecord, u32)>, EbpfError> {
        loop {
            let mut guard = self
                .ring
                .readable_mut()
                .await
                .map_err(|source| EbpfError::Io { op: "polling the exec ring buffer", source })?;
            let ring = guard.get_inner_mut();
            let mut batch = Vec::new();
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<ExecEvent>() {
                    // SAFETY: one ExecEvent per record, length checked, read unaligned.
                    let e = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const ExecEvent) };
                    batch.push((e.record, e.pid));
                }
            }
            guard.clear_ready();
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}

/// Runs the task iterator once: it gives a SEEDED record to every user task that has none.
pub(super) fn seed(ebpf: &mut Ebpf, btf: &AyaBtf) -> Result<(), EbpfError> {
    let name = programs::SEED_TASKS;
    let prog: &mut Iter =
        ebpf.program_mut(name).ok_or(EbpfError::Missing(name))?.try_into().map_err(program_err(name, "type"))?;
    prog.load("task", btf).map_err(program_err(name, "load"))?;
    run_iterator(ebpf, name)
}

/// Whether the process at the other end of an accepted Unix socket still holds the
/// credentials it connected with: the `iter/sockmap` program, attached once to a one-slot
/// sockmap (its link kept, so the program outlives the object it came from), the map and
/// the answer slot. A check puts the socket in the map, runs the iterator (one element: the
/// cost does not grow with the machine's sockets) and takes it out.
pub struct PeerCheck {
    link: OwnedFd,
    sockets: SockMap<MapData>,
    query: Array<MapData, PeerQuery>,
}

impl PeerCheck {
    /// Sets the check up from `loaded`; None (logged: every Workload API caller is then
    /// refused, fail closed) when this kernel cannot run it.
    fn start(loaded: &mut Loaded, btf: &AyaBtf) -> Option<Self> {
        match Self::load(loaded, btf) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::error!("the Workload API caller check cannot run here; every caller will be refused: {e}");
                None
            }
        }
    }

    fn load(loaded: &mut Loaded, btf: &AyaBtf) -> Result<Self, EbpfError> {
        if loaded.offsets.peer_valid == 0 {
            return Err(EbpfError::Missing(
                "kernel struct offsets for the caller check (sock.sk_peer_cred, pid.tasks, ...)",
            ));
        }
        let name = programs::PEER_CREDS;
        let ebpf = &mut loaded.ebpf;
        let prog: &mut Iter =
            ebpf.program_mut(name).ok_or(EbpfError::Missing(name))?.try_into().map_err(program_err(name, "type"))?;
        prog.load("sockmap", btf).map_err(program_err(name, "load"))?;
        let prog_fd = prog
            .fd()
            .map_err(program_err(name, "fd"))?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| EbpfError::Io { op: "duplicating the caller check's program fd", source })?;
        let map = ebpf.take_map(maps::PEER_SOCK).ok_or(EbpfError::Missing(maps::PEER_SOCK))?;
        let sockets = SockMap::try_from(map).map_err(map_err(maps::PEER_SOCK, "open"))?;
        let link = iter_link(prog_fd.as_fd(), sockets.fd().as_fd())
            .map_err(|source| EbpfError::Io { op: "attaching the caller check (BPF_LINK_CREATE)", source })?;
        let map = ebpf.take_map(maps::PEER_QUERY).ok_or(EbpfError::Missing(maps::PEER_QUERY))?;
        let query = Array::try_from(map).map_err(map_err(maps::PEER_QUERY, "open"))?;
        Ok(PeerCheck { link, sockets, query })
    }

    /// One of [`tether_common::peer_creds`] for the peer of `socket` (a connected Unix
    /// stream socket this process accepted); 0 if the program did not see it.
    pub fn check(&mut self, socket: BorrowedFd<'_>) -> Result<u32, EbpfError> {
        let cookie = socket_cookie(socket).map_err(|source| EbpfError::Io { op: "SO_COOKIE", source })?;
        self.query.set(0, PeerQuery { cookie, verdict: 0, _pad: 0 }, 0).map_err(map_err(maps::PEER_QUERY, "set"))?;
        self.sockets.set(0, &socket.as_raw_fd(), 0).map_err(map_err(maps::PEER_SOCK, "set"))?;
        let ran = iter_create(self.link.as_fd())
            .map_err(|source| EbpfError::Io { op: "creating the caller check's iterator", source })
            .and_then(|iter| {
                let mut sink = Vec::new();
                std::fs::File::from(iter)
                    .read_to_end(&mut sink)
                    .map_err(|source| EbpfError::Io { op: "running the caller check", source })
            });
        // Out of the map again before anything else reads the socket.
        let cleared = self.sockets.clear_index(&0).map_err(map_err(maps::PEER_SOCK, "clear"));
        ran?;
        cleared?;
        let answer = self.query.get(&0, 0).map_err(map_err(maps::PEER_QUERY, "get"))?;
        Ok(if answer.cookie == cookie { answer.verdict } else { 0 })
    }
}

/// `BPF_LINK_CREATE` for a map iterator program over `map` (aya keeps a link's fd to itself).
fn iter_link(prog: BorrowedFd<'_>, map: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        iter_info: u64,
        iter_info_len: u32,
        _pad: u32,
    }
    /// `union bpf_iter_link_info`'s `map` member.
    #[repr(C)]
    struct IterLinkInfo {
        map_fd: u32,
    }
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_TRACE_ITER: u32 = 28;
    let info = IterLinkInfo { map_fd: map.as_raw_fd() as u32 };
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: 0,
        attach_type: BPF_TRACE_ITER,
        flags: 0,
        iter_info: &info as *const IterLinkInfo as u64,
        iter_info_len: size_of::<IterLinkInfo>() as u32,
        _pad: 0,
    };
    raw_fd(BPF_LINK_CREATE, &attr)
}

/// `BPF_ITER_CREATE`: a new run of the iterator behind `link`, read to run it.
fn iter_create(link: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct IterCreateAttr {
        link_fd: u32,
        flags: u32,
    }
    const BPF_ITER_CREATE: libc::c_long = 33;
    raw_fd(BPF_ITER_CREATE, &IterCreateAttr { link_fd: link.as_raw_fd() as u32, flags: 0 })
}

/// A bpf(2) command that returns a new fd.
fn raw_fd<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<OwnedFd> {
    let rc = super::enforce::sys_bpf(cmd, attr)?;
    // SAFETY: the kernel just returned this descriptor; it is ours.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(rc as i32) })
}

/// The socket's cookie (`SO_COOKIE`), what the kernel names it by.
fn socket_cookie(socket: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len point to valid storage of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Runs a loaded iterator program once over everything it iterates (its own link, made and
/// dropped here).
fn run_iterator(ebpf: &mut Ebpf, name: &'static str) -> Result<(), EbpfError> {
    let prog: &mut Iter =
        ebpf.program_mut(name).ok_or(EbpfError::Missing(name))?.try_into().map_err(program_err(name, "type"))?;
    let link_id = prog.attach().map_err(program_err(name, "attach"))?;
    let link = prog.take_link(link_id).map_err(program_err(name, "take link"))?;
    let mut file = link
        .into_file()
        .map_err(|e| EbpfError::Io { op: "creating an iterator", source: std::io::Error::other(e.to_string()) })?;
    // The programs write nothing to the seq file; reading to EOF runs them over everything.
    let mut sink = Vec::new();
    file.read_to_end(&mut sink).map_err(|source| EbpfError::Io { op: "running an iterator", source })?;
    Ok(())
}

/// `BPF_MAP_LOOKUP_ELEM` on task storage with a pidfd as key (aya 0.14 has no wrapper).
fn lookup_task_storage(map: BorrowedFd<'_>, pidfd: BorrowedFd<'_>) -> Result<Option<ProcRecord>, EbpfError> {
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    let key: i32 = pidfd.as_raw_fd();
    let mut value = std::mem::MaybeUninit::<ProcRecord>::zeroed();
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const i32 as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: attr points to a valid key and a value buffer of the map's value size.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_ELEM, &attr as *const MapElemAttr, size_of::<MapElemAttr>())
    };
    if rc == 0 {
        // SAFETY: the kernel filled the whole value.
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // ENOENT: no record; ESRCH/EBADF: the pidfd's process is gone.
        Some(libc::ENOENT) | Some(libc::ESRCH) => Ok(None),
        _ => Err(EbpfError::Io { op: "looking up a task record by pidfd", source: err }),
    }
}
