//! The WireGuard cross-platform userspace API (UAPI): a text protocol spoken by boringtun and
//! wireguard-go alike. Our embedded device gets it over a private socket pair rather than
//! `/var/run/wireguard/<iface>.sock`: boringtun's socket mode also takes SIGTERM from the
//! process (a signalfd), which would steal the daemon's own shutdown signal.
//!
//! A small client of our own rather than wireguard-control's userspace backend: that one
//! prints a line on stdout at every read against boringtun and reads boringtun's handshake age
//! as a Unix time.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD};

use super::WgError;

/// base64 (wg format) to the hex UAPI wants.
pub fn key_hex(b64: &str) -> Result<String, WgError> {
    let bytes = STANDARD.decode(b64).map_err(WgError::KeyNotBase64)?;
    if bytes.len() != 32 {
        return Err(WgError::KeyLength);
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn key_b64(hex: &str) -> Option<String> {
    if hex.len() != 64 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect();
    bytes.map(|b| STANDARD.encode(b))
}

/// One peer as the device reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerState {
    pub public_key: String,
    pub endpoint: Option<String>,
    /// Seconds since the last handshake; `None` = never.
    pub handshake_age_seconds: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub allowed_ips: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceState {
    pub listen_port: u16,
    pub public_key: Option<String>,
    pub peers: Vec<PeerState>,
}

fn exchange(stream: &UnixStream, iface: &str, request: &str) -> Result<Vec<String>, WgError> {
    let io = |source| WgError::Uapi {
        iface: iface.to_string(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    let mut writer = stream;
    writer.write_all(request.as_bytes()).map_err(io)?;
    // The answer ends with an empty line and nothing follows it until the next request, so
    // reading in large chunks up to that blank line never takes bytes of a later answer.
    let mut reader = stream;
    let mut answer = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut chunk).map_err(io)?;
        if n == 0 {
            return Err(WgError::UapiClosed {
                iface: iface.to_string(),
            });
        }
        answer.extend_from_slice(&chunk[..n]);
        if answer == b"\n" || answer.ends_with(b"\n\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&answer);
    let lines: Vec<String> = text
        .lines()
        .take_while(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    match lines.iter().find_map(|l| l.strip_prefix("errno=")) {
        Some("0") => Ok(lines),
        Some(errno) => Err(WgError::UapiErrno {
            iface: iface.to_string(),
            errno: errno.to_string(),
        }),
        None => Err(WgError::UapiNoAnswer {
            iface: iface.to_string(),
        }),
    }
}

/// Sends a `set` operation; `body` is the key=value lines after `set=1`.
pub fn set(stream: &UnixStream, iface: &str, body: &str) -> Result<(), WgError> {
    exchange(stream, iface, &format!("set=1\n{body}\n")).map(|_| ())
}

pub fn get(stream: &UnixStream, iface: &str) -> Result<DeviceState, WgError> {
    let lines = exchange(stream, iface, "get=1\n\n")?;
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut state = DeviceState::default();
    for line in lines {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "listen_port" => state.listen_port = value.parse().unwrap_or(0),
            "private_key" => {
                state.public_key = key_b64(value).and_then(|b64| {
                    let k = wireguard_control::Key::from_base64(&b64).ok()?;
                    Some(k.get_public().to_base64())
                });
            }
            "public_key" => state.peers.push(PeerState {
                public_key: key_b64(value).unwrap_or_default(),
                ..Default::default()
            }),
            _ => {
                let Some(peer) = state.peers.last_mut() else {
                    continue;
                };
                match key {
                    "endpoint" => peer.endpoint = Some(value.to_string()),
                    "rx_bytes" => peer.rx_bytes = value.parse().unwrap_or(0),
                    "tx_bytes" => peer.tx_bytes = value.parse().unwrap_or(0),
                    "allowed_ip" => peer.allowed_ips.push(value.to_string()),
                    "last_handshake_time_sec" => {
                        let secs: u64 = value.parse().unwrap_or(0);
                        // wireguard-go reports a Unix time (0 = never); boringtun the age in
                        // seconds, and only once there was a handshake (0 = just now; its
                        // nanoseconds tell the two zeros apart).
                        peer.handshake_age_seconds = if secs > 1_000_000_000 {
                            Some(now_unix.saturating_sub(secs))
                        } else {
                            Some(secs)
                        };
                    }
                    "last_handshake_time_nsec"
                        if value == "0" && peer.handshake_age_seconds == Some(0) =>
                    {
                        peer.handshake_age_seconds = None;
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() -> Result<(), WgError> {
        let k = wireguard_control::Key::generate_private().to_base64();
        let hex = key_hex(&k)?;
        assert_eq!(hex.len(), 64);
        assert_eq!(key_b64(&hex).as_deref(), Some(k.as_str()));
        assert!(key_hex("not a key").is_err());
        Ok(())
    }
}
