//! The floor under any UDP resolver on this machine, for the `resolver` table: a server that
//! answers each query with its own bytes flagged as an answer (NOERROR, no records), through
//! the same `recvmmsg`/`sendmmsg` batches of 64 as the daemon's UDP worker, and does no DNS
//! work at all: no parse, no cache, no copy. Its CPU per query is what the kernel charges a
//! server for one datagram in and one out; no server that reads and writes datagrams through
//! sockets can do better per CPU-second than this one on the same machine and run.
//!
//! It runs as a child of the bench (the bench's own binary, with `ENV` naming the address),
//! inside the bench's namespace, so its CPU is read from /proc like the other servers'.

use std::os::fd::AsRawFd;

/// Set to an address (`127.0.0.5:53`), the bench binary serves as the floor there and nothing
/// else.
pub const ENV: &str = "PHANTOM_BENCH_UDP_FLOOR";

const BATCH: usize = 64;
const MAX_QUERY: usize = 4096;

/// Serves until killed.
pub fn serve(addr: &str) -> ! {
    let addr: std::net::SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{ENV}={addr}: {e}");
            std::process::exit(2);
        }
    };
    let sock = match std::net::UdpSocket::bind(addr) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot bind {addr}: {e}");
            std::process::exit(2);
        }
    };
    // The daemon's receive buffer, so neither drops more under the same load.
    let size: libc::c_int = 4 << 20;
    // SAFETY: a valid socket and a c_int option of the stated length.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
    let fd = sock.as_raw_fd();
    let mut bufs = vec![0u8; BATCH * MAX_QUERY];
    // SAFETY: all-zero is a valid sockaddr_storage, iovec and mmsghdr; every pointer is set
    // below before use.
    let mut addrs: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut iovs: Vec<libc::iovec> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    loop {
        for i in 0..BATCH {
            iovs[i].iov_base = bufs[i * MAX_QUERY..].as_mut_ptr().cast();
            iovs[i].iov_len = MAX_QUERY;
            hdrs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_len = 0;
        }
        // SAFETY: BATCH initialised headers whose buffers outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue;
        }
        let n = n as usize;
        for i in 0..n {
            let len = hdrs[i].msg_len as usize;
            let query = &mut bufs[i * MAX_QUERY..i * MAX_QUERY + len.max(4)];
            // QR set, opcode and RD kept; RA set, rcode NOERROR.
            query[2] |= 0x80;
            query[3] = 0x80;
            // The same buffer goes back, as long as the query was.
            iovs[i].iov_len = len;
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: the first `n` headers point at buffers and addresses that live here.
            let m = unsafe { libc::sendmmsg(fd, hdrs[sent..n].as_mut_ptr(), (n - sent) as u32, 0) };
            sent += if m <= 0 { 1 } else { m as usize };
        }
    }
}
