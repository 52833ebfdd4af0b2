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

/// The echo service's addresses (system resolver; a literal needs none).
pub async fn resolve(url: &EchoUrl) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = url.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, url.port)]);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", url.host))?
        .filter(SocketAddr::is_ipv4)
        .collect();
    if addrs.is_empty() {
        return Err(format!("{} has no IPv4 address", url.host));
    }
    Ok(addrs)
}

/// Opens a TCP connection to `to` from a socket marked with `mark`.
pub async fn connect_marked(
    to: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> Result<TcpStream, String> {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)
        .map_err(|e| format!("SO_MARK: {e}"))?;
    match tokio::time::timeout(timeout, socket.connect(to)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(format!("connect to {to} through the exit: {e}")),
        Err(_) => Err(format!(
            "connect to {to} through the exit: no answer within {} s",
            timeout.as_secs_f32()
        )),
    }
}

/// Connects to the echo service through the exit and closes again: proves the whole path.
pub async fn probe(url: &EchoUrl, mark: u32, timeout: Duration) -> Result<(), String> {
    let addrs = resolve(url).await?;
    let mut last = String::new();
    for addr in addrs {
        match connect_marked(addr, mark, timeout).await {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// GETs the echo service through the exit and returns the address it saw us come from.
pub async fn external_ip(url: &EchoUrl, mark: u32, timeout: Duration) -> Result<IpAddr, String> {
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
            .map_err(|e| format!("echo request: {e}"))?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(MAX_ANSWER as u64)
            .read_to_end(&mut answer)
            .await
            .map_err(|e| format!("echo answer: {e}"))?;
        Ok::<_, String>(answer)
    };
    let answer = tokio::time::timeout(timeout * 2, work)
        .await
        .map_err(|_| "the echo service did not answer in time".to_string())??;
    parse_answer(&answer)
}

/// The address in an HTTP answer: a plain-text body (`203.0.113.7`) or JSON with an `ip`
/// field (`{"ip":"203.0.113.7"}`).
pub fn parse_answer(answer: &[u8]) -> Result<IpAddr, String> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("the echo service did not answer HTTP")?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("the echo service answered {status:?}"));
    }
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    let body = body.trim();
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
    Err(format!(
        "the echo answer holds no address: {:?}",
        body.chars().take(80).collect::<String>()
    ))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() -> Result<(), String> {
        let ip = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n203.0.113.7\r\n")?;
        assert_eq!(ip.to_string(), "203.0.113.7");
        let ip = parse_answer(b"HTTP/1.1 200 OK\r\n\r\n{\"ip\":\"198.51.100.9\"}")?;
        assert_eq!(ip.to_string(), "198.51.100.9");
        let ip = parse_answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n192.0.2.33\n\r\n0\r\n\r\n",
        )?;
        assert_eq!(ip.to_string(), "192.0.2.33");
        assert!(parse_answer(b"HTTP/1.1 500 Oops\r\n\r\n1.2.3.4").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n\r\nhello").is_err());
        Ok(())
    }
}
