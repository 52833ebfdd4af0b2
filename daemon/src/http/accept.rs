//! The accept step of every public TCP listener: accept until shutdown, back off after a
//! failed accept, and (for the HTTP listeners) admit through the listener's gate.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, warn};

use super::{Gate, Pass};
use crate::error::Error;

/// Binds a listener's address; the error names the listener (`what`) and the address.
pub async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { what, addr, source })
}

/// How long to wait after a failed accept before trying again.
const ACCEPT_BACK_OFF: Duration = Duration::from_millis(50);

/// The next connection on `listener`, or `None` once `shutdown` changes. A failed accept (out
/// of descriptors and the like) is logged as `what` and followed by a short back-off instead
/// of a spin.
pub async fn next_connection(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return None,
            accepted = listener.accept() => match accepted {
                Ok(a) => return Some(a),
                Err(e) => {
                    warn!(error = %e, "{what} accept failed");
                    tokio::time::sleep(ACCEPT_BACK_OFF).await;
                }
            },
        }
    }
}

/// The next connection `gate` admits, or `None` once `shutdown` changes. A connection over a
/// cap is closed at once, before any byte of it is read (the gate counts it).
pub async fn next_admitted(
    listener: &TcpListener,
    gate: &Arc<Gate>,
    shutdown: &mut watch::Receiver<bool>,
    what: &str,
) -> Option<(TcpStream, SocketAddr, Pass)> {
    loop {
        let (stream, peer) = next_connection(listener, shutdown, what).await?;
        match gate.admit(peer.ip()) {
            Ok(pass) => return Some((stream, peer, pass)),
            Err(refusal) => {
                debug!(
                    reason = refusal.as_str(),
                    "{what} connection refused at accept"
                );
                drop(stream);
            }
        }
    }
}
