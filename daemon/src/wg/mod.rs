//! The WireGuard device and the host network around it, shared by the VPN server (`core`) and
//! the multihop exit (`multihop`): device backends (kernel or embedded boringtun) and the UAPI
//! they speak, the client subnet, the interface's address, forwarding and our nftables table.
//! Nothing here knows about clients or exits: those are the domains above.

pub mod device;
pub mod net;
pub mod subnet;
pub mod uapi;

pub use subnet::Subnet;
