//! Probes through the exit: a TCP connection and a plain-HTTP GET of the echo service, from
//! a socket carrying the multihop mark, so they take exactly the path marked client traffic
//! takes (the fwmark rule, the exit's table, the exit interface).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

pub use crate::config::EchoUrl;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

/// The largest echo answer we read.
const MAX_ANSWER: usize = 64 * 1024;

/// Why a probe through the exit failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{host} has no IPv4 address")]
    NoIpv4Address { host: String },
    #[error("socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("SO_MARK: {0}")]
    Mark(#[source] nix::errno::Errno),
    /// The connection through the exit was refused or failed.
    #[error("connect to {to} through the exit: {source}")]
    Connect {
        to: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Nothing answered the connection through the exit in time.
    #[error("connect to {to} through the exit: no answer within {} s", .timeout.as_secs_f32())]
    ConnectTimeout { to: SocketAddr, timeout: Duration },
    #[error("echo request: {0}")]
    Request(#[source] std::io::Error),
    #[error("echo answer: {0}")]
    Answer(#[source] std::io::Error),
    #[error("the echo service did not answer in time")]
    AnswerTimeout,
    #[error("the echo service did not answer HTTP")]
    NotHttp,
    /// An HTTP status other than 200 (the status line).
    #[error("the echo service answered {status:?}")]
    Status { status: String },
    /// The answer's body (its first 80 characters) holds no address.
    #[error("the echo answer holds no address: {body:?}")]
    NoAddress { body: String },
}

/// The echo service's addresses (system resolver; a literal needs none).
pub async fn resolve(url: &EchoUrl) -> Result<Vec<SocketAddr>, ProbeError> {
    if let Ok(ip) = url.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, url.port)]);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|source| ProbeError::Resolve {
            host: url.host.clone(),
            source,
        })?
        .filter(SocketAddr::is_ipv4)
        .collect();
    if addrs.is_empty() {
        return Err(ProbeError::NoIpv4Address {
            host: url.host.clone(),
        });
    }
    Ok(addrs)
}

/// Opens a TCP connection to `to` from a socket marked with `mark`.
pub async fn connect_marked(
    to: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> Result<TcpStream, ProbeError> {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(ProbeError::Socket)?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)
        .map_err(ProbeError::Mark)?;
    match tokio::time::timeout(timeout, socket.connect(to)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ProbeError::Connect { to, source }),
        Err(_) => Err(ProbeError::ConnectTimeout { to, timeout }),
    }
}

/// One empty UDP datagram to `to` from a socket marked `mark`: traffic the exit's WireGuard
/// has to carry, so it starts a handshake when it has no session. Nothing is read back.
pub async fn nudge(to: SocketAddr, mark: u32) -> Result<(), ProbeError> {
    let bind = if to.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let socket = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(ProbeError::Socket)?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)
        .map_err(ProbeError::Mark)?;
    socket
        .send_to(&[], to)
        .await
        .map_err(|source| ProbeError::Connect { to, source })?;
    Ok(())
}

/// Connects to the echo service through the exit and closes again: proves the whole path.
/// When every address fails, the last one's error.
pub async fn probe(url: &EchoUrl, mark: u32, timeout: Duration) -> Result<(), ProbeError> {
    let mut last = None;
    for addr in resolve(url).await? {
        match connect_marked(addr, mark, timeout).await {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| ProbeError::NoIpv4Address {
        host: url.host.clone(),
    }))
}

/// GETs the echo service through the exit and returns the address it saw us come from.
pub async fn external_ip(
    url: &EchoUrl,
    mark: u32,
    timeout: Duration,
) -> Result<IpAddr, ProbeError> {
    let addrs = resolve(url).await?;
    let addr = addrs[0];
    let work = async {
        let mut stream = connect_marked(addr, mark, timeout).await?;
        let host = if url.host.contains(':') {
            format!("[{}]", url.host)
        } else {
            url.host.clone()
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: phantomd\r\nAccept: text/plain, application/json\r\nConnection: close\r\n\r\n",
            url.path
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(ProbeError::Request)?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(MAX_ANSWER as u64)
            .read_to_end(&mut answer)
            .await
            .map_err(ProbeError::Answer)?;
        Ok::<_, ProbeError>(answer)
    };
    let answer = tokio::time::timeout(timeout * 2, work)
        .await
        .map_err(|_| ProbeError::AnswerTimeout)??;
    parse_answer(&answer)
}

/// The address in an HTTP answer: a plain-text body (`203.0.113.7`) or JSON with an `ip`
/// field (`{"ip":"203.0.113.7"}`). The answer is taken apart as bytes (head, chunks) and only
/// the body is read as text: a chunk size counts bytes, and a multi-byte character may span
/// two chunks.
pub fn parse_answer(answer: &[u8]) -> Result<IpAddr, ProbeError> {
    let split = find(answer, b"\r\n\r\n").ok_or(ProbeError::NotHttp)?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let body = &answer[split + 4..];
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(ProbeError::Status {
            status: status.to_string(),
        });
    }
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    let text = String::from_utf8_lossy(&body);
    let body = text.trim();
    if let Ok(ip) = body.parse::<IpAddr>() {
        return Ok(ip);
    }
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(body)
        && let Some(ip) = value
            .get("ip")
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse().ok())
    {
        return Ok(ip);
    }
    Err(ProbeError::NoAddress {
        body: body.chars().take(80).collect(),
    })
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The body of a chunked answer, chunk sizes counted in bytes; stops at the last chunk, a
/// malformed size or a chunk cut short.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = find(body, b"\r\n") {
        let size = std::str::from_utf8(&body[..line_end]).unwrap_or("");
        // A size may carry extensions after ';' (RFC 9112 7.1.1).
        let size = size.split(';').next().unwrap_or("").trim();
        let n = usize::from_str_radix(size, 16).unwrap_or(0);
        let rest = &body[line_end + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        body = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() -> Result<(), ProbeError> {
        let ip = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n203.0.113.7\r\n")?;
        assert_eq!(ip.to_string(), "203.0.113.7");
        let ip = parse_answer(b"HTTP/1.1 200 OK\r\n\r\n{\"ip\":\"198.51.100.9\"}")?;
        assert_eq!(ip.to_string(), "198.51.100.9");
        let ip = parse_answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n192.0.2.33\n\r\n0\r\n\r\n",
        )?;
        assert_eq!(ip.to_string(), "192.0.2.33");
        assert!(parse_answer(b"HTTP/1.1 500 Oops\r\n\r\n1.2.3.4").is_err());
        assert!(parse_answer(b"no head end").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n\r\nhello").is_err());
        Ok(())
    }

    /// A two-byte character split across two chunks: the first chunk ends after its first
    /// byte. Sliced as `&str` at the chunk size this panicked; as bytes the body is whole.
    #[test]
    fn a_character_split_across_chunks_is_joined_not_a_panic() {
        // "é" is 0xC3 0xA9; the JSON body is {"ip":"192.0.2.33","n":"é"}.
        let body = "{\"ip\":\"192.0.2.33\",\"n\":\"\u{e9}\"}".as_bytes();
        let cut = body.iter().position(|b| *b == 0xc3).unwrap_or(0) + 1;
        let (first, second) = body.split_at(cut);
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut answer = head.to_vec();
        for chunk in [first, second] {
            answer.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            answer.extend_from_slice(chunk);
            answer.extend_from_slice(b"\r\n");
        }
        answer.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(dechunk(&answer[head.len()..]), body);
        let ip = parse_answer(&answer).map(|ip| ip.to_string());
        assert_eq!(ip.ok().as_deref(), Some("192.0.2.33"));
        // The same cut with a size that runs past the data, and invalid UTF-8: no panic.
        let _ = parse_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n\xc3\r\n");
        let _ = parse_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n\xc3\r\n1\r\n\xff\r\n0\r\n\r\n");
    }
}
