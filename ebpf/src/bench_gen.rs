//! `bench_xdp_tx`: the benchmark's traffic generator. Run through BPF_PROG_TEST_RUN in
//! live-frames mode it transmits every frame it is handed, which floods a veth peer at a rate
//! a socket sender cannot reach. Built as its own object; the daemon never loads it.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn bench_xdp_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// The cheapest possible receiver: the floor any drop path sits on in the flood benchmark.
#[xdp]
pub fn bench_xdp_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}
