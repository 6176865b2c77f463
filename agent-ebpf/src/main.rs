//! Tether's kernel programs. One module per concern; each entry point is a thin wrapper
//! around a `try_*` function returning `Result`.
#![no_std]
#![no_main]
// BPF's atomic add, for a counter several CPUs move (core has no atomic RMW for this target).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod enforce;
mod process;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it only satisfies no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
