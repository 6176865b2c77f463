//! Socket hooks. For now one: `cgroup/connect4` refuses connect() from processes in denied
//! cgroups. Attached only to cgroups the agent's caller names (never the root cgroup).

use aya_ebpf::{
    helpers::bpf_get_current_cgroup_id,
    macros::{cgroup_sock_addr, map},
    maps::HashMap,
    programs::SockAddrContext,
};
use aya_log_ebpf::warn;

#[map]
static DENY_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: plain helper call.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is only tested for presence, never held across helper calls.
    if unsafe { DENY_CGROUPS.get(cgroup_id) }.is_some() {
        // Until the audit log exists, denials are reported through aya-log.
        warn!(&ctx, "connect4 denied: cgroup {}", cgroup_id);
        DENY
    } else {
        ALLOW
    }
}
