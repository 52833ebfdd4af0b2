//! The accept step shared by the daemon's TCP front ends (the sentry proxy, the ghost relay).

use std::{net::SocketAddr, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::warn;

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
