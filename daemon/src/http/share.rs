//! One TLS port, two services: the port's owner (the sentry proxy) listens, and a joiner
//! (the ghost relay) takes the connections whose first request starts with its own request
//! line prefix (`GET /<secret>/`); every other connection stays the owner's. A censor probing
//! the port sees the owner's site; only a client that knows the secret reaches the joiner.
//! Each service keeps its own certificate, chosen by the name the client asks for (SNI).
//!
//! Telling them apart costs at most the prefix's length of buffering per connection (a few
//! dozen bytes), read within the listener's header-read timeout; the bytes read are replayed
//! to whichever service gets the connection ([`Rewind`]).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, OnceLock, RwLock},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_rustls::rustls::sign::CertifiedKey;

use super::CertSlot;

/// A connection handed to the joiner.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

/// What joins the port: its request-line prefix, and what takes a connection of its.
pub struct Joiner {
    /// The start of the first request line that is the joiner's (`GET /<secret>/`).
    pub prefix: Vec<u8>,
    /// Takes over a connection (the bytes read so far replayed first); runs on the owner's
    /// connection task, so it spawns what lasts.
    pub take: Box<dyn Fn(BoxStream, SocketAddr) + Send + Sync>,
}

/// Why the joiner cannot join.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("the port {0} does not speak TLS (its owner listens in plain HTTP)")]
    NotTls(SocketAddr),
    #[error("the port {0} already has a joiner")]
    Taken(SocketAddr),
}

/// A port its owner serves over TLS and a joiner may share.
pub struct SharedPort {
    addr: SocketAddr,
    /// The owner's certificates, once it listens over TLS.
    slot: OnceLock<Arc<CertSlot>>,
    joiner: RwLock<Option<(String, Arc<Joiner>)>>,
}

impl SharedPort {
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            addr,
            slot: OnceLock::new(),
            joiner: RwLock::new(None),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether a service configured to listen on `addr` would listen on this port: the same
    /// port, on the same address or where either is the wildcard.
    pub fn covers(&self, addr: SocketAddr) -> bool {
        addr.port() == self.addr.port()
            && (addr.ip() == self.addr.ip()
                || addr.ip().is_unspecified()
                || self.addr.ip().is_unspecified())
    }

    /// The owner listens over TLS with these certificates.
    pub fn open(&self, slot: Arc<CertSlot>) {
        let _ = self.slot.set(slot);
    }

    /// Joins the port: connections starting with `joiner.prefix` go to it, and clients asking
    /// for `name` get `key`.
    pub fn join(
        &self,
        name: &str,
        key: Arc<CertifiedKey>,
        joiner: Joiner,
    ) -> Result<(), ShareError> {
        let slot = self.slot.get().ok_or(ShareError::NotTls(self.addr))?;
        let mut current = match self.joiner.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if current.is_some() {
            return Err(ShareError::Taken(self.addr));
        }
        slot.set_named(name, Some(key));
        *current = Some((name.to_string(), Arc::new(joiner)));
        Ok(())
    }

    /// A renewed certificate for the joiner's name (nothing when `name` is not the joiner's).
    pub fn set_certificate(&self, name: &str, key: Arc<CertifiedKey>) {
        let joined = match self.joiner.read() {
            Ok(g) => g.as_ref().is_some_and(|(n, _)| n == name),
            Err(p) => p.into_inner().as_ref().is_some_and(|(n, _)| n == name),
        };
        if let (true, Some(slot)) = (joined, self.slot.get()) {
            slot.set_named(name, Some(key));
        }
    }

    /// The joiner leaves: its connections and its name are the owner's again.
    pub fn leave(&self) {
        let mut current = match self.joiner.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let (Some((name, _)), Some(slot)) = (current.take(), self.slot.get()) {
            slot.set_named(&name, None);
        }
    }

    fn joiner(&self) -> Option<Arc<Joiner>> {
        match self.joiner.read() {
            Ok(g) => g.as_ref().map(|(_, j)| Arc::clone(j)),
            Err(p) => p.into_inner().as_ref().map(|(_, j)| Arc::clone(j)),
        }
    }

    /// The owner's side of an accepted (and decrypted) connection: `Some` to serve it (the
    /// bytes read replayed), `None` when the joiner took it or it ended before telling. The
    /// caller bounds the wait (the header-read timeout).
    pub async fn divert<S: Stream + 'static>(
        &self,
        mut stream: S,
        peer: SocketAddr,
    ) -> Option<Rewind<S>> {
        let Some(joiner) = self.joiner() else {
            return Some(Rewind::new(Vec::new(), stream));
        };
        let want = joiner.prefix.len();
        let mut read = Vec::with_capacity(want);
        let mut chunk = [0u8; 64];
        while read.len() < want {
            let n = stream
                .read(&mut chunk[..(want - read.len()).min(64)])
                .await
                .ok()?;
            if n == 0 {
                return None;
            }
            read.extend_from_slice(&chunk[..n]);
            // Stop at the first byte that differs: a short request of the owner's is not kept
            // waiting for bytes that will never come.
            if read.iter().zip(&joiner.prefix).any(|(a, b)| a != b) {
                return Some(Rewind::new(read, stream));
            }
        }
        if constant_time_eq(&read, &joiner.prefix) {
            (joiner.take)(Box::new(Rewind::new(read, stream)), peer);
            None
        } else {
            Some(Rewind::new(read, stream))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A stream with bytes already read from it put back in front.
pub struct Rewind<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(head: Vec<u8>, inner: S) -> Self {
        Self { head, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            if self.at == self.head.len() {
                self.head = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;

    fn port_with_joiner(taken: Arc<AtomicUsize>) -> Arc<SharedPort> {
        let port = SharedPort::new("0.0.0.0:443".parse().unwrap());
        let pem = rcgen::generate_simple_self_signed(vec!["a.example".to_string()]).unwrap();
        let key =
            super::super::certified_key(&pem.cert.pem(), &pem.signing_key.serialize_pem()).unwrap();
        assert!(matches!(
            port.join(
                "b.example",
                Arc::clone(&key),
                Joiner {
                    prefix: Vec::new(),
                    take: Box::new(|_, _| {})
                }
            ),
            Err(ShareError::NotTls(_))
        ));
        port.open(CertSlot::new(Arc::clone(&key)));
        port.join(
            "b.example",
            key,
            Joiner {
                prefix: b"GET /s3cret/".to_vec(),
                take: Box::new(move |_, _| {
                    taken.fetch_add(1, Ordering::Relaxed);
                }),
            },
        )
        .unwrap();
        port
    }

    async fn divert(port: &SharedPort, sent: &[u8]) -> Option<Vec<u8>> {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(sent).await.unwrap();
        drop(client);
        let mut owner = port
            .divert(server, "192.0.2.9:1000".parse().unwrap())
            .await?;
        let mut all = Vec::new();
        owner.read_to_end(&mut all).await.unwrap();
        Some(all)
    }

    #[tokio::test]
    async fn the_secret_prefix_goes_to_the_joiner_and_everything_else_to_the_owner_intact() {
        let taken = Arc::new(AtomicUsize::new(0));
        let port = port_with_joiner(Arc::clone(&taken));
        let ordinary = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(divert(&port, ordinary).await.unwrap(), ordinary);
        let near = b"GET /s3cretX/events HTTP/1.1\r\n\r\n";
        assert_eq!(divert(&port, near).await.unwrap(), near);
        // Shorter than the prefix and matching so far, then the end: nobody's.
        assert!(divert(&port, b"GET /s3c").await.is_none());
        assert_eq!(taken.load(Ordering::Relaxed), 0);
        assert!(
            divert(&port, b"GET /s3cret/events HTTP/1.1\r\n\r\n")
                .await
                .is_none()
        );
        assert_eq!(taken.load(Ordering::Relaxed), 1);
        port.leave();
        let secret = b"GET /s3cret/events HTTP/1.1\r\n\r\n";
        assert_eq!(divert(&port, secret).await.unwrap(), secret);
    }

    #[test]
    fn covers_the_same_port_on_overlapping_addresses() {
        let port = SharedPort::new("0.0.0.0:443".parse().unwrap());
        assert!(port.covers("192.0.2.1:443".parse().unwrap()));
        assert!(!port.covers("192.0.2.1:8443".parse().unwrap()));
        let port = SharedPort::new("192.0.2.1:443".parse().unwrap());
        assert!(port.covers("0.0.0.0:443".parse().unwrap()));
        assert!(!port.covers("192.0.2.2:443".parse().unwrap()));
    }
}
