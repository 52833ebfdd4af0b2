//! The WireGuard device and the host network around it, shared by the VPN server (`core`) and
//! the multihop exit (`multihop`): device backends (kernel or embedded boringtun) and the UAPI
//! they speak, the client subnet, the interface's address, forwarding and our nftables table.
//! Nothing here knows about clients or exits: those are the domains above.

pub mod device;
pub mod net;
pub mod subnet;
pub mod uapi;

pub use subnet::Subnet;

/// What can go wrong with the device and the host network around it.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    /// rtnetlink refused a request (addresses, MTU, link state).
    #[error("netlink: {0}")]
    Netlink(#[source] rtnetlink::Error),
    /// The kernel would not create the WireGuard link.
    #[error("{0}")]
    CreateLink(#[source] rtnetlink::Error),
    #[error("interface {iface}: {source}")]
    NoSuchInterface {
        iface: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("interface name {iface}: {source:?}")]
    InterfaceName {
        iface: String,
        #[source]
        source: wireguard_control::InvalidInterfaceName,
    },
    /// `[wireguard] backend = "kernel"` and the kernel cannot create the interface.
    #[error("wireguard.backend = \"kernel\" but the kernel cannot create {iface}: {source}")]
    KernelUnavailable {
        iface: String,
        #[source]
        source: Box<WgError>,
    },
    /// A link of that name exists and is not kernel WireGuard.
    #[error("{iface} exists and is not kernel WireGuard: {source}")]
    NotKernelWireguard {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    /// An interface of that name exists and is not a WireGuard device we can take over.
    #[error(
        "interface {iface} already exists and is not a WireGuard device this daemon can take over; remove it or choose another [wireguard] interface"
    )]
    InterfaceTaken { iface: String },
    /// The embedded (boringtun) device would not start.
    #[error("cannot create the WireGuard device {iface}: {source:?}")]
    CreateDevice {
        iface: String,
        #[source]
        source: boringtun::device::Error,
    },
    #[error("WireGuard device {iface} did not start")]
    DeviceStartTimeout { iface: String },
    /// A key that is not base64 of 32 bytes.
    #[error("invalid WireGuard key: {0}")]
    InvalidKey(#[source] wireguard_control::InvalidKey),
    #[error("invalid WireGuard key")]
    KeyNotBase64(#[source] base64::DecodeError),
    #[error("invalid WireGuard key length")]
    KeyLength,
    /// The UAPI control stream of the embedded device failed.
    #[error("WireGuard device {iface}: {source}")]
    Uapi {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("WireGuard device {iface}: control stream closed")]
    UapiClosed { iface: String },
    /// The device refused a UAPI operation.
    #[error("WireGuard device {iface}: errno {errno}")]
    UapiErrno { iface: String, errno: String },
    #[error("WireGuard device {iface}: no answer")]
    UapiNoAnswer { iface: String },
    /// A UAPI operation on a kernel device (which is configured over netlink).
    #[error("no control stream on a kernel device")]
    NoControlStream,
    #[error("cannot run nft: {0}")]
    NftSpawn(#[source] std::io::Error),
    #[error("nft: {0}")]
    NftIo(#[source] std::io::Error),
    /// `nft` refused the ruleset; its own explanation.
    #[error("nft refused the ruleset: {stderr}")]
    NftRefused { stderr: String },
    #[error("nft output: {0}")]
    NftOutput(#[source] serde_json::Error),
    /// The kernel's WireGuard interface (configuration, state) or a socket.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Daemon(#[from] crate::error::Error),
}
