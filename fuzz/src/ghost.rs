//! `ghost_upgrade`: what a client sends the ghost relay once TLS is done: the WebSocket
//! upgrade request (path secret, the JWT in `Sec-WebSocket-Protocol`), then WebSocket frames.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use futures_util::StreamExt;
use phantom_daemon::{
    ghost::relay::{RelaySettings, Stats, frame_ends_tunnel, upgrade_stream},
    source::SourcePrefix,
};
use tokio::{io::AsyncReadExt, sync::Semaphore};

const SECRET: &str = "s3cr3t-path";
const WIREGUARD_PORT: u16 = 51820;

fn settings() -> RelaySettings {
    RelaySettings {
        listen: SocketAddr::from(([127, 0, 0, 1], 443)),
        secret: SECRET.into(),
        wireguard_port: WIREGUARD_PORT,
        tunnels_per_secret: 4,
        source_prefix: SourcePrefix::DEFAULT,
    }
}

/// The upgrade request the stock client (wstunnel) sends, with `jwt` as its token.
fn request(jwt: &str) -> Vec<u8> {
    format!(
        "GET /{SECRET}/events HTTP/1.1\r\nHost: relay.example\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: v1, authorization.bearer.{jwt}\r\n\r\n"
    )
    .into_bytes()
}

/// A token the relay accepts: UDP to the local WireGuard port.
fn good_jwt() -> String {
    let claims =
        format!(r#"{{"p":{{"Udp":{{"timeout":null}}}},"r":"127.0.0.1","rp":{WIREGUARD_PORT}}}"#);
    format!("eyJhbGciOiJIUzI1NiJ9.{}.c2ln", B64.encode(claims))
}

/// Input: a mode byte, then
/// - 0: the client's bytes as they come (request, then frames);
/// - 1: a JWT, sent in the stock client's upgrade request;
/// - 2: the frames sent after the stock client's accepted upgrade.
///
/// The upgrade is refused or accepted (mode 2 always accepted), never panics; an accepted
/// tunnel reads frames until one ends it, each classified as the relay does.
pub fn ghost_upgrade(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let input = match mode % 3 {
        0 => rest.to_vec(),
        1 => request(&String::from_utf8_lossy(rest)),
        _ => {
            let mut input = request(&good_jwt());
            input.extend_from_slice(rest);
            input
        }
    };
    let settings = settings();
    crate::runtime().block_on(async {
        let quota = Arc::new(Semaphore::new(settings.tunnels_per_secret));
        // The client sends frames only once it has the upgrade's answer: its request comes in
        // a read of its own (tungstenite refuses bytes after a request in the same read).
        let split = input
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(input.len(), |at| at + 4);
        let (request, frames) = input.split_at(split);
        let stream = tokio::io::join(request.chain(frames), tokio::io::sink());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let upgraded = upgrade_stream(stream, &settings, &quota, deadline).await;
        let (mut ws, _place) = match upgraded {
            Ok(tunnel) => tunnel,
            Err(reason) => {
                assert!(
                    mode % 3 != 2,
                    "the stock client's upgrade refused: {reason:?}"
                );
                assert!(!reason.as_str().is_empty());
                return;
            }
        };
        assert_eq!(quota.available_permits(), settings.tunnels_per_secret - 1);
        let stats = Stats::default();
        loop {
            let frame = ws.next().await;
            if frame_ends_tunnel(frame, &stats).is_some() {
                break;
            }
        }
    });
}
