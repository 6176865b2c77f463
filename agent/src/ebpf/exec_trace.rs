//! Live exec events from `tp_btf/sched_process_exec`.

use aya::{
    maps::{Array, MapData, RingBuf},
    programs::BtfTracePoint,
    Btf as AyaBtf, Ebpf,
};
use tether_common::{maps, programs, ExecEvent, TraceFilter};
use tokio::io::unix::AsyncFd;

use super::{map_err, program_err, EbpfError};
use crate::{cgroup::Cgroup, exec::ExecRecord};

/// Attached exec program and the ring buffer it writes to. Dropping it detaches the program.
pub struct ExecTracer {
    events: AsyncFd<RingBuf<MapData>>,
    _ebpf: Ebpf,
}

impl ExecTracer {
    /// Attaches the exec program, reporting only processes in `scope`'s subtree, or every
    /// exec on the machine when `scope` is `None`. Observing is all it does: nothing is
    /// attached to any cgroup.
    pub fn start(mut ebpf: Ebpf, scope: Option<&Cgroup>) -> Result<Self, EbpfError> {
        let filter =
            scope.map_or_else(TraceFilter::default, |cg| TraceFilter { ancestor_id: cg.id, level: cg.level, _pad: 0 });
        let mut filter_map: Array<_, TraceFilter> =
            Array::try_from(ebpf.map_mut(maps::TRACE_FILTER).ok_or(EbpfError::Missing(maps::TRACE_FILTER))?)
                .map_err(map_err(maps::TRACE_FILTER, "open"))?;
        filter_map.set(0, filter, 0).map_err(map_err(maps::TRACE_FILTER, "set"))?;

        let btf = AyaBtf::from_sys_fs()?;
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(programs::EXEC)
            .ok_or(EbpfError::Missing(programs::EXEC))?
            .try_into()
            .map_err(program_err(programs::EXEC, "type"))?;
        prog.load("sched_process_exec", &btf).map_err(program_err(programs::EXEC, "load"))?;
        prog.attach().map_err(program_err(programs::EXEC, "attach"))?;

        let ring = RingBuf::try_from(ebpf.take_map(maps::EXEC_EVENTS).ok_or(EbpfError::Missing(maps::EXEC_EVENTS))?)
            .map_err(map_err(maps::EXEC_EVENTS, "open"))?;
        // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf.
        let events = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| EbpfError::Io { op: "registering the exec ring buffer with tokio", source: e.into() })?;
        Ok(ExecTracer { events, _ebpf: ebpf })
    }

    /// Waits for the next batch of exec events.
    pub async fn next_batch(&mut self) -> Result<Vec<ExecRecord>, EbpfError> {
        loop {
            let mut guard = self
                .events
                .readable_mut()
                .await
                .map_err(|source| EbpfError::Io { op: "polling the exec ring buffer", source })?;
            let ring = guard.get_inner_mut();
            let mut batch = Vec::new();
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<ExecEvent>() {
                    // SAFETY: the kernel wrote exactly one ExecEvent per record; the read is
                    // unaligned-safe and the length was checked.
                    let event = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const ExecEvent) };
                    batch.push(ExecRecord::from(&event));
                }
            }
            guard.clear_ready();
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}
