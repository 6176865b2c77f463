//! Floors, a separate object the agent never loads: the cgroup hooks enforcement uses, each
//! with a program that only allows (what the hook set costs by itself, before any of Tether's
//! logic), and a connect4 that only refuses (the cheapest in-kernel refusal, the baseline of
//! the denial path). `cargo xtask bench enforce` attaches them to its own cgroups, never
//! together with the real programs. One more connect4 refuses and says so through aya-log:
//! the test that kernel-side logs reach the agent's tracing uses it.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::bpf_get_current_cgroup_id,
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use aya_log_ebpf::warn;

#[cgroup_sock(sock_create)]
pub fn floor_sock_create(_ctx: SockContext) -> i32 {
    1
}

#[cgroup_sock(post_bind4)]
pub fn floor_post_bind4(_ctx: SockContext) -> i32 {
    1
}

#[cgroup_skb(egress)]
pub fn floor_egress(_ctx: SkBuffContext) -> i32 {
    1
}

#[cgroup_skb(ingress)]
pub fn floor_ingress(_ctx: SkBuffContext) -> i32 {
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn floor_sendmsg4(_ctx: SockAddrContext) -> i32 {
    1
}

#[cgroup_sock_addr(connect4)]
pub fn floor_connect4(_ctx: SockAddrContext) -> i32 {
    1
}

/// Refuses every connect() (EPERM), doing nothing else.
#[cgroup_sock_addr(connect4)]
pub fn deny_connect4(_ctx: SockAddrContext) -> i32 {
    0
}

/// Refuses every connect() and logs it (kernel-side log forwarding test).
#[cgroup_sock_addr(connect4)]
pub fn deny_connect4_logged(ctx: SockAddrContext) -> i32 {
    // SAFETY: plain helper call.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    warn!(&ctx, "connect4 denied: cgroup {}", cgroup_id);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
