//! HTTP behind and in front of the sentry: a plain upstream site in a namespace, and requests
//! from a chosen source address.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::atomic::Ordering,
    time::Duration,
};

use serde_json::Value;

use crate::{NetNs, http::dechunk};

/// One HTTP/1.1 answer as a client sees it.
#[derive(Clone, Debug)]
pub struct HttpReply {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends one request (`target` = "METHOD /path") from source address `from` (an address
/// inside `ns`, IPv4 or IPv6; for addresses the namespace only routes locally, set
/// `net.ipv6.ip_nonlocal_bind`) to `to` (`ip:port` or `[ipv6]:port`), with `Connection:
/// close`; `extra_headers` are full lines without CRLF. Connecting gives up after `timeout` (a
/// source dropped in XDP never connects): then `Err`.
pub fn http_from(
    ns: &NetNs,
    from: &str,
    to: &str,
    target: &str,
    extra_headers: &[String],
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<HttpReply> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
        sockopt,
    };
    use std::os::fd::AsRawFd;
    let from: std::net::IpAddr = from.parse().expect("source address");
    let to: SocketAddr = to.parse().expect("ip:port");
    let mut request = format!(
        "{target} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in extra_headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    ns.run(move || -> std::io::Result<HttpReply> {
        let family = if to.is_ipv6() {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        let tv =
            nix::sys::time::TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros() as i64);
        // Linux bounds a blocking connect() by the send timeout.
        setsockopt(&fd, sockopt::SendTimeout, &tv)?;
        setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
        bind(
            fd.as_raw_fd(),
            &SockaddrStorage::from(SocketAddr::new(from, 0)),
        )?;
        connect(fd.as_raw_fd(), &SockaddrStorage::from(to))?;
        let mut stream = TcpStream::from(fd);
        stream.write_all(&bytes)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).to_string();
        let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no HTTP head: {text:?}"),
            )
        })?;
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let body = if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        };
        Ok(HttpReply {
            status,
            headers,
            body,
        })
    })
}

/// A plain HTTP/1.1 site inside a namespace: answers every request with 200 and a body
/// naming the path (and echoing `X-Forwarded-For` and `X-Forwarded-Proto`), and counts
/// requests; `log` has each request as `<path> xff=<X-Forwarded-For>`. Stops on drop.
pub struct UpstreamSite {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UpstreamSite {
    pub const BODY_PREFIX: &'static str = "hello from upstream";

    pub fn start(ns: &NetNs, addr: &str) -> Self {
        let addr: SocketAddr = addr.parse().unwrap();
        let listener = ns.run(move || std::net::TcpListener::bind(addr).expect("bind upstream"));
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, r, l) = (stop.clone(), requests.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (r, l) = (r.clone(), l.clone());
                        std::thread::spawn(move || serve_upstream(stream, &r, &l));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self {
            stop,
            requests,
            log,
            thread: Some(thread),
        }
    }
}

fn serve_upstream(
    stream: TcpStream,
    requests: &std::sync::atomic::AtomicU64,
    log: &std::sync::Mutex<Vec<String>>,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let (mut length, mut xff, mut proto, mut close) =
            (0usize, String::new(), String::new(), false);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    "x-forwarded-for" => xff = v.trim().to_string(),
                    "x-forwarded-proto" => proto = v.trim().to_string(),
                    "connection" => close = v.trim().eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if let Ok(mut log) = log.lock() {
            log.push(format!("{path} xff={xff}"));
        }
        requests.fetch_add(1, Ordering::Relaxed);
        let text = format!(
            "{} {path} xff={xff} proto={proto} body={}",
            UpstreamSite::BODY_PREFIX,
            body.len()
        );
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if reader.get_mut().write_all(reply.as_bytes()).is_err() || close {
            return;
        }
    }
}

impl Drop for UpstreamSite {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
