//! The server's WireGuard interface: kernel WireGuard when the module is there, otherwise a
//! userspace device embedded in the daemon (boringtun). Both are configured from the client
//! store; the daemon never writes a `wg0.conf`.

use std::{
    net::Ipv4Addr,
    os::{fd::IntoRawFd, unix::net::UnixStream},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::{info, warn};
use wireguard_control::{Backend, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

use super::{
    WgError,
    uapi::{self, DeviceState, PeerState},
};
use crate::{config::WireguardBackend, error::Error};

/// The one peer of a client-side device (the multihop exit): where it is and what it carries.
#[derive(Clone, Debug, PartialEq)]
pub struct UplinkPeer {
    pub public_key: String,
    pub preshared_key: Option<String>,
    pub endpoint: std::net::SocketAddr,
    pub allowed_ips: Vec<(std::net::IpAddr, u8)>,
    pub persistent_keepalive: Option<u16>,
}

/// A peer as the interface should hold it.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerSpec {
    pub public_key: String,
    pub preshared_key: String,
    pub ip: Ipv4Addr,
    /// Where the peer was last seen (remembered across restarts): the device can start a
    /// handshake towards it instead of waiting for the peer to come.
    pub endpoint: Option<std::net::SocketAddr>,
}

/// How long a start waits for the TUN device of a killed predecessor to go.
const TUN_RELEASE_WAIT: Duration = Duration::from_secs(2);

/// The port of the datagrams that start handshakes (RFC 863 discard): nothing answers there
/// but the peer's own stack, and the payload is empty.
const DISCARD_PORT: u16 = 9;

enum Kind {
    Kernel,
    /// boringtun runs on its own thread: creating a device blocks SIGINT/SIGTERM on the
    /// creating thread, which must not be one of the daemon's.
    Embedded {
        /// Our end of the device's control stream; closing it stops the device.
        control: std::sync::Mutex<UnixStream>,
        stop: mpsc::Sender<()>,
        thread: Option<JoinHandle<()>>,
    },
}

pub struct WireGuardDevice {
    iface: String,
    kind: Kind,
}

impl WireGuardDevice {
    /// Creates the interface (or takes over a kernel one of that name).
    pub async fn create(iface: &str, backend: WireguardBackend) -> Result<Self, WgError> {
        if backend != WireguardBackend::Userspace {
            match create_kernel_link(iface).await {
                Ok(()) => {
                    info!(interface = iface, "WireGuard: kernel backend");
                    return Ok(Self {
                        iface: iface.into(),
                        kind: Kind::Kernel,
                    });
                }
                Err(e) if backend == WireguardBackend::Kernel => {
                    return Err(WgError::KernelUnavailable {
                        iface: iface.to_string(),
                        source: Box::new(e),
                    });
                }
                Err(e) => {
                    info!(error = %e, "no kernel WireGuard; using the embedded userspace device")
                }
            }
        }
        Self::create_embedded(iface)
    }

    fn create_embedded(iface: &str) -> Result<Self, WgError> {
        // The TUN device of a daemon just killed (`kill -9`, then a start at once) goes only
        // a moment after the kernel has closed its descriptors: wait that moment out before
        // calling the name taken.
        let gone_by = Instant::now() + TUN_RELEASE_WAIT;
        while nix::net::if_::if_nametoindex(iface).is_ok() {
            if Instant::now() >= gone_by {
                return Err(WgError::InterfaceTaken {
                    iface: iface.to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (control, device_end) = UnixStream::pair()?;
        let device_fd = device_end.into_raw_fd();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), boringtun::device::Error>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let name = iface.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("wg-{iface}"))
            .spawn(move || {
                let config = boringtun::device::DeviceConfig {
                    n_threads: 2,
                    use_connected_socket: true,
                    use_multi_queue: false,
                    // boringtun takes ownership of this end of the pair.
                    uapi_fd: device_fd,
                };
                match boringtun::device::DeviceHandle::new(&name, config) {
                    Ok(handle) => {
                        let _ = ready_tx.send(Ok(()));
                        let _ = stop_rx.recv();
                        drop(handle);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                let _ = thread.join();
                return Err(WgError::CreateDevice {
                    iface: iface.to_string(),
                    source,
                });
            }
            Err(_) => {
                return Err(WgError::DeviceStartTimeout {
                    iface: iface.to_string(),
                });
            }
        }
        info!(
            interface = iface,
            "WireGuard: embedded userspace backend (boringtun)"
        );
        Ok(Self {
            iface: iface.into(),
            kind: Kind::Embedded {
                control: std::sync::Mutex::new(control),
                stop: stop_tx,
                thread: Some(thread),
            },
        })
    }

    /// `kernel` or `userspace`.
    pub fn backend(&self) -> &'static str {
        match self.kind {
            Kind::Kernel => "kernel",
            Kind::Embedded { .. } => "userspace",
        }
    }

    /// Sets the key and port and replaces every peer.
    pub fn configure(
        &self,
        private_key: &str,
        port: u16,
        peers: &[PeerSpec],
    ) -> Result<(), WgError> {
        match self.kind {
            Kind::Kernel => {
                // An interface kept across a restart keeps its peers' sessions: peers it has
                // are updated in place (the same key and port change nothing, and the live
                // endpoint is fresher than the stored one), the others added, strangers
                // removed. A new interface gets every peer with its remembered endpoint.
                let name = self.iface_name()?;
                let existing: std::collections::HashSet<String> =
                    wireguard_control::Device::get(&name, Backend::Kernel)?
                        .peers
                        .iter()
                        .map(|p| p.config.public_key.to_base64())
                        .collect();
                let mut update = DeviceUpdate::new()
                    .set_private_key(Key::from_base64(private_key).map_err(WgError::InvalidKey)?)
                    .set_listen_port(port);
                if existing.is_empty() {
                    update = update.replace_peers();
                }
                for p in peers {
                    if existing.contains(&p.public_key) {
                        update = update.add_peer(kernel_peer(&PeerSpec {
                            endpoint: None,
                            ..p.clone()
                        })?);
                    } else {
                        update = update.add_peer(kernel_peer(p)?);
                    }
                }
                let wanted: std::collections::HashSet<&str> =
                    peers.iter().map(|p| p.public_key.as_str()).collect();
                for key in existing.iter().filter(|k| !wanted.contains(k.as_str())) {
                    update = update
                        .remove_peer_by_key(&Key::from_base64(key).map_err(WgError::InvalidKey)?);
                }
                update.apply(&name, Backend::Kernel).map_err(WgError::Io)
            }
            Kind::Embedded { .. } => {
                let mut body = format!(
                    "private_key={}\nlisten_port={port}\nreplace_peers=true\n",
                    uapi::key_hex(private_key)?
                );
                for p in endpointless_first(peers) {
                    body.push_str(&uapi_peer(p)?);
                }
                uapi::set(&*self.control()?, &self.iface, &body)
            }
        }
    }

    /// Configures a client-side device: key, port (0 = any) and exactly one peer, which is
    /// removed and added again when the device already has it (boringtun cannot modify a
    /// peer), so the session starts afresh with a new handshake.
    pub fn configure_uplink(
        &self,
        private_key: &str,
        listen_port: u16,
        peer: &UplinkPeer,
    ) -> Result<(), WgError> {
        match self.kind {
            Kind::Kernel => {
                let key = Key::from_base64(&peer.public_key).map_err(WgError::InvalidKey)?;
                // Removing first drops the old session, as on the embedded device.
                DeviceUpdate::new()
                    .remove_peer_by_key(&key)
                    .apply(&self.iface_name()?, Backend::Kernel)
                    .map_err(WgError::Io)?;
                let mut builder = PeerConfigBuilder::new(&key)
                    .set_endpoint(peer.endpoint)
                    .replace_allowed_ips()
                    .set_persistent_keepalive_interval(peer.persistent_keepalive.unwrap_or(0));
                if let Some(psk) = &peer.preshared_key {
                    builder = builder
                        .set_preshared_key(Key::from_base64(psk).map_err(WgError::InvalidKey)?);
                }
                for (ip, cidr) in &peer.allowed_ips {
                    builder = builder.add_allowed_ip(*ip, *cidr);
                }
                DeviceUpdate::new()
                    .set_private_key(Key::from_base64(private_key).map_err(WgError::InvalidKey)?)
                    .set_listen_port(listen_port)
                    .replace_peers()
                    .add_peer(builder)
                    .apply(&self.iface_name()?, Backend::Kernel)
                    .map_err(WgError::Io)
            }
            Kind::Embedded { .. } => {
                let public_hex = uapi::key_hex(&peer.public_key)?;
                // Two transactions: boringtun ignores a re-add of a key removed in the same one.
                uapi::set(
                    &*self.control()?,
                    &self.iface,
                    &format!(
                        "private_key={}\nlisten_port={listen_port}\nreplace_peers=true\n",
                        uapi::key_hex(private_key)?
                    ),
                )?;
                let mut body = format!("public_key={public_hex}\n");
                if let Some(psk) = &peer.preshared_key {
                    body.push_str(&format!("preshared_key={}\n", uapi::key_hex(psk)?));
                }
                body.push_str(&format!(
                    "endpoint={}\nreplace_allowed_ips=true\n",
                    peer.endpoint
                ));
                for (ip, cidr) in &peer.allowed_ips {
                    body.push_str(&format!("allowed_ip={ip}/{cidr}\n"));
                }
                body.push_str(&format!(
                    "persistent_keepalive_interval={}\n",
                    peer.persistent_keepalive.unwrap_or(0)
                ));
                uapi::set(&*self.control()?, &self.iface, &body)
            }
        }
    }

    /// Adds a peer the interface does not have yet (boringtun cannot modify an existing one).
    pub fn add_peer(&self, peer: &PeerSpec) -> Result<(), WgError> {
        match self.kind {
            Kind::Kernel => DeviceUpdate::new()
                .add_peer(kernel_peer(peer)?)
                .apply(&self.iface_name()?, Backend::Kernel)
                .map_err(WgError::Io),
            Kind::Embedded { .. } => uapi::set(&*self.control()?, &self.iface, &uapi_peer(peer)?),
        }
    }

    /// Gives existing peers new allowed IPs. The kernel updates them in place (sessions
    /// survive); boringtun cannot modify a peer (it panics its control thread), so there each
    /// peer is removed and added again and its client re-handshakes within seconds.
    pub fn set_allowed_ips(&self, peers: &[PeerSpec]) -> Result<(), WgError> {
        match self.kind {
            Kind::Kernel => {
                let mut update = DeviceUpdate::new();
                for p in peers {
                    update = update.add_peer(
                        PeerConfigBuilder::new(
                            &Key::from_base64(&p.public_key).map_err(WgError::InvalidKey)?,
                        )
                        .replace_allowed_ips()
                        .add_allowed_ip(p.ip.into(), 32),
                    );
                }
                update
                    .apply(&self.iface_name()?, Backend::Kernel)
                    .map_err(WgError::Io)
            }
            Kind::Embedded { .. } => {
                if peers.is_empty() {
                    return Ok(());
                }
                // One transaction, so no packet finds the peer absent (`uapi_peer` sets
                // `remove` back to false for the section that adds it again).
                let mut body = String::new();
                for p in endpointless_first(peers) {
                    body.push_str(&format!(
                        "public_key={}\nremove=true\n{}",
                        uapi::key_hex(&p.public_key)?,
                        uapi_peer(p)?
                    ));
                }
                uapi::set(&*self.control()?, &self.iface, &body)
            }
        }
    }

    /// Renews those of `peers` that the device still shows silent at the endpoint given (no
    /// session, same endpoint): each is removed and added again, so it starts with no
    /// handshake in progress (a device retries an unanswered initiation only after 5 s).
    /// Returns the peers renewed. A client that reached the device meanwhile (its own
    /// handshake, or a new endpoint) keeps its session: renewing it would drop a session the
    /// client goes on using until its 15 s re-handshake. So the check reads the device and the
    /// renewal follows at once: the text is prepared beforehand, nothing else is read in
    /// between, and on the embedded device both go over one held control stream, in one
    /// transaction that never leaves the peer absent.
    pub fn renew_silent_peers(&self, peers: &[PeerSpec]) -> Result<Vec<PeerSpec>, WgError> {
        if peers.is_empty() {
            return Ok(Vec::new());
        }
        let still_silent = |state: &DeviceState, p: &PeerSpec| {
            let endpoint = p.endpoint.map(|e| e.to_string());
            endpoint.is_some()
                && state.peers.iter().any(|s| {
                    s.public_key == p.public_key
                        && s.handshake_age_seconds.is_none()
                        && s.endpoint == endpoint
                })
        };
        match self.kind {
            Kind::Kernel => {
                let keys = peers
                    .iter()
                    .map(|p| Key::from_base64(&p.public_key).map_err(WgError::InvalidKey))
                    .collect::<Result<Vec<_>, _>>()?;
                let name = self.iface_name()?;
                let state = self.state()?;
                let mut removes = DeviceUpdate::new();
                let mut adds = DeviceUpdate::new();
                let mut renewed = Vec::new();
                for (p, key) in peers.iter().zip(keys) {
                    if still_silent(&state, p) {
                        removes = removes.remove_peer_by_key(&key);
                        adds = adds.add_peer(kernel_peer(p)?);
                        renewed.push(p.clone());
                    }
                }
                if !renewed.is_empty() {
                    removes.apply(&name, Backend::Kernel).map_err(WgError::Io)?;
                    adds.apply(&name, Backend::Kernel).map_err(WgError::Io)?;
                }
                Ok(renewed)
            }
            Kind::Embedded { .. } => {
                // Remove and add in one transaction: boringtun carries `remove=true` over to
                // the next section of the same key unless it is set back to false.
                let texts = peers
                    .iter()
                    .map(|p| {
                        Ok(format!(
                            "public_key={}\nremove=true\n{}",
                            uapi::key_hex(&p.public_key)?,
                            uapi_peer(p)?
                        ))
                    })
                    .collect::<Result<Vec<String>, WgError>>()?;
                let control = self.control()?;
                let state = uapi::get(&control, &self.iface)?;
                let mut body = String::new();
                let mut renewed = Vec::new();
                for (p, text) in peers.iter().zip(&texts) {
                    if still_silent(&state, p) {
                        body.push_str(text);
                        renewed.push(p.clone());
                    }
                }
                if !body.is_empty() {
                    uapi::set(&control, &self.iface, &body)?;
                }
                Ok(renewed)
            }
        }
    }

    pub fn remove_peer(&self, public_key: &str) -> Result<(), WgError> {
        match self.kind {
            Kind::Kernel => DeviceUpdate::new()
                .remove_peer_by_key(&Key::from_base64(public_key).map_err(WgError::InvalidKey)?)
                .apply(&self.iface_name()?, Backend::Kernel)
                .map_err(WgError::Io),
            Kind::Embedded { .. } => uapi::set(
                &*self.control()?,
                &self.iface,
                &format!("public_key={}\nremove=true\n", uapi::key_hex(public_key)?),
            ),
        }
    }

    /// Makes the device start a handshake with every peer in `peers` that has an endpoint,
    /// now rather than when the peer's own timers fire: one empty UDP datagram to the discard
    /// port of each peer's tunnel address, sent out of this interface. A WireGuard device
    /// (kernel or boringtun) that has a packet for a peer without a session initiates a
    /// handshake to the peer's endpoint and sends the packet once it completes; the
    /// peer's answer confirms the new session on both sides. The datagrams go in batches of
    /// `HANDSHAKE_BATCH` every `HANDSHAKE_BATCH_GAP`: the answers all come back to the
    /// device's one listening socket, whose receive buffer holds a few hundred datagrams, so a
    /// thousand at once would lose most answers. Blocks until the last batch is out (about
    /// 10 ms per 50 peers); returns how many were sent.
    pub fn start_handshakes(&self, peers: &[PeerSpec]) -> Result<usize, WgError> {
        start_handshakes(&self.iface, peers)
    }

    /// Live state: port, peers with handshake age and traffic.
    pub fn state(&self) -> Result<DeviceState, WgError> {
        match self.kind {
            Kind::Kernel => {
                let dev = wireguard_control::Device::get(&self.iface_name()?, Backend::Kernel)?;
                let now = std::time::SystemTime::now();
                Ok(DeviceState {
                    listen_port: dev.listen_port.unwrap_or(0),
                    public_key: dev.public_key.map(|k| k.to_base64()),
                    peers: dev
                        .peers
                        .iter()
                        .map(|p| PeerState {
                            public_key: p.config.public_key.to_base64(),
                            endpoint: p.config.endpoint.map(|e| e.to_string()),
                            handshake_age_seconds: p
                                .stats
                                .last_handshake_time
                                .and_then(|t| now.duration_since(t).ok())
                                .map(|d| d.as_secs()),
                            rx_bytes: p.stats.rx_bytes,
                            tx_bytes: p.stats.tx_bytes,
                            allowed_ips: p
                                .config
                                .allowed_ips
                                .iter()
                                .map(|a| format!("{}/{}", a.address, a.cidr))
                                .collect(),
                        })
                        .collect(),
                })
            }
            Kind::Embedded { .. } => uapi::get(&*self.control()?, &self.iface),
        }
    }

    fn control(&self) -> Result<std::sync::MutexGuard<'_, UnixStream>, WgError> {
        match &self.kind {
            Kind::Embedded { control, .. } => control
                .lock()
                .map_err(|_| Error::LockPoisoned("WireGuard control").into()),
            Kind::Kernel => Err(WgError::NoControlStream),
        }
    }

    fn iface_name(&self) -> Result<InterfaceName, WgError> {
        interface_name(&self.iface)
    }

    /// Lets go of a kernel interface without removing it: it keeps its peers and sessions
    /// (and forwards their traffic) until the next start takes it over. An embedded device
    /// cannot outlive the process; it is shut down as by `shutdown`.
    pub fn leave(self) {
        match self.kind {
            Kind::Kernel => info!(
                interface = %self.iface,
                "WireGuard: kernel interface kept with its peers and sessions"
            ),
            Kind::Embedded { .. } => self.shutdown(),
        }
    }

    /// Removes the interface (the embedded device takes a couple of seconds to stop).
    pub fn shutdown(mut self) {
        match &mut self.kind {
            Kind::Kernel => {
                if let Ok(name) = self.iface_name()
                    && let Ok(dev) = wireguard_control::Device::get(&name, Backend::Kernel)
                    && let Err(e) = dev.delete()
                {
                    warn!(error = %e, "cannot delete the WireGuard interface");
                }
            }
            Kind::Embedded {
                control,
                stop,
                thread,
            } => {
                // Closing the control stream makes boringtun's workers exit.
                if let Ok(c) = control.get_mut() {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
                let _ = stop.send(());
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
                // The interface goes when the last worker lets go of the TUN device.
                let deadline = Instant::now() + Duration::from_secs(10);
                while nix::net::if_::if_nametoindex(self.iface.as_str()).is_ok()
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// Handshakes started per batch, and the pause between batches: 5,000 a second, about what
/// the embedded device answers on this class of machine (docs/core.md, "Restarts").
const HANDSHAKE_BATCH: usize = 50;
const HANDSHAKE_BATCH_GAP: Duration = Duration::from_millis(10);

/// [`WireGuardDevice::start_handshakes`] by interface name, for a thread of its own.
pub fn start_handshakes(iface: &str, peers: &[PeerSpec]) -> Result<usize, WgError> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Out of this interface whatever the routing rules say (multihop's among them).
    socket.bind_device(Some(iface.as_bytes()))?;
    let mut sent = 0;
    let with_endpoint: Vec<&PeerSpec> = peers.iter().filter(|p| p.endpoint.is_some()).collect();
    for (i, batch) in with_endpoint.chunks(HANDSHAKE_BATCH).enumerate() {
        if i > 0 {
            std::thread::sleep(HANDSHAKE_BATCH_GAP);
        }
        for p in batch {
            let to = std::net::SocketAddrV4::new(p.ip, DISCARD_PORT);
            socket.send_to(&[], &to.into()).map_err(WgError::Io)?;
            sent += 1;
        }
    }
    Ok(sent)
}

fn interface_name(iface: &str) -> Result<InterfaceName, WgError> {
    iface.parse().map_err(|source| WgError::InterfaceName {
        iface: iface.to_string(),
        source,
    })
}

/// The peers in the order one UAPI transaction needs: boringtun keeps a section's `endpoint`
/// (and `remove`) for the next section when that one sets none, so the peers without an
/// endpoint go first, where there is none to inherit.
fn endpointless_first(peers: &[PeerSpec]) -> impl Iterator<Item = &PeerSpec> {
    let (without, with): (Vec<&PeerSpec>, Vec<&PeerSpec>) =
        peers.iter().partition(|p| p.endpoint.is_none());
    without.into_iter().chain(with)
}

/// One peer's section of a UAPI `set`, `remove` set back to false (see `endpointless_first`).
fn uapi_peer(p: &PeerSpec) -> Result<String, WgError> {
    let mut text = format!(
        "public_key={}\nremove=false\npreshared_key={}\nreplace_allowed_ips=true\nallowed_ip={}/32\n",
        uapi::key_hex(&p.public_key)?,
        uapi::key_hex(&p.preshared_key)?,
        p.ip
    );
    if let Some(endpoint) = p.endpoint {
        text.push_str(&format!("endpoint={endpoint}\n"));
    }
    Ok(text)
}

fn kernel_peer(p: &PeerSpec) -> Result<PeerConfigBuilder, WgError> {
    let mut builder =
        PeerConfigBuilder::new(&Key::from_base64(&p.public_key).map_err(WgError::InvalidKey)?)
            .set_preshared_key(Key::from_base64(&p.preshared_key).map_err(WgError::InvalidKey)?)
            .replace_allowed_ips()
            .add_allowed_ip(p.ip.into(), 32);
    if let Some(endpoint) = p.endpoint {
        builder = builder.set_endpoint(endpoint);
    }
    Ok(builder)
}

async fn create_kernel_link(iface: &str) -> Result<(), WgError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(conn);
    let result = handle
        .link()
        .add(rtnetlink::LinkWireguard::new(iface).build())
        .execute()
        .await;
    task.abort();
    match result {
        Ok(()) => Ok(()),
        // An existing kernel WireGuard link of that name (a restart) is ours to reuse.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {
            wireguard_control::Device::get(&interface_name(iface)?, Backend::Kernel)
                .map(|_| ())
                .map_err(|source| WgError::NotKernelWireguard {
                    iface: iface.to_string(),
                    source,
                })
        }
        Err(e) => Err(WgError::CreateLink(e)),
    }
}
