#![no_std]
#![no_main]
// Atomic adds on shared map values (`client_policy`): the bpf target's core has no fetch_add.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod client_policy;
mod clock;
mod dns_filter;
mod encrypted_dns;
mod events;
mod guard;
mod multihop;
mod sni;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; this only satisfies no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
