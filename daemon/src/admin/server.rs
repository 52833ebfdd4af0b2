//! The Unix-socket server behind `phantom-api`: newline-delimited JSON, one reply per request,
//! in order. Only root, the daemon's own user and members of the admin group get in.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, watch},
};
use tracing::{debug, info, warn};

use super::{
    audit::{AuditLog, Entry},
    metrics::AdminMetrics,
    registry::{Outcome, Registry},
};
use crate::{
    error::Error,
    protocol::{MAX_FRAME_BYTES, Request, Response, codes},
};

pub struct AdminServer {
    listener: UnixListener,
    path: PathBuf,
    registry: Arc<Registry>,
    metrics: AdminMetrics,
    admin_gid: Option<u32>,
    limit: Arc<Semaphore>,
    idle_timeout: Duration,
    audit: Option<Arc<AuditLog>>,
}

/// Who may talk to the socket.
#[derive(Debug, Clone, Copy)]
struct Access {
    own_uid: u32,
    admin_gid: Option<u32>,
}

impl AdminServer {
    /// Binds the socket. A stale socket file from a crashed daemon is replaced; a live one
    /// (another daemon answering) is an error rather than stolen.
    pub async fn bind(
        path: &Path,
        group: &str,
        max_connections: usize,
        idle_timeout: Duration,
        registry: Arc<Registry>,
        metrics: AdminMetrics,
    ) -> Result<Self, Error> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        if path.exists() {
            if UnixStream::connect(path).await.is_ok() {
                return Err(Error::SocketInUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
        }
        let listener = UnixListener::bind(path).map_err(|e| Error::io(path, e))?;
        let admin_gid = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw());
        if let Some(gid) = admin_gid {
            nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
                .map_err(|e| Error::io(path, e.into()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| Error::io(path, e))?;
        info!(socket = %path.display(), group, group_exists = admin_gid.is_some(), "admin socket listening");
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            registry,
            metrics,
            admin_gid,
            limit: Arc::new(Semaphore::new(max_connections)),
            idle_timeout,
            audit: None,
        })
    }

    /// Records every state-changing action in `audit` (token `"socket"`).
    pub fn with_audit(mut self, audit: Arc<AuditLog>) -> Self {
        self.audit = Some(audit);
        self
    }

    /// Serves until `shutdown` turns true, then removes the socket file.
    pub async fn serve(self, mut shutdown: watch::Receiver<bool>) {
        let access = Access {
            own_uid: nix::unistd::geteuid().as_raw(),
            admin_gid: self.admin_gid,
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                accepted = self.listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            warn!(error = %e, "admin accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = Arc::clone(&self.limit).acquire_owned().await else { break };
                    let registry = Arc::clone(&self.registry);
                    let audit = self.audit.clone();
                    let metrics = self.metrics.clone();
                    let idle = self.idle_timeout;
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_connection(stream, access, registry, audit, metrics, idle, shutdown).await {
                            debug!(error = %e, "admin connection ended with an error");
                        }
                        drop(permit);
                    });
                }
            }
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            warn!(socket = %self.path.display(), error = %e, "cannot remove the admin socket");
        }
    }
}

fn peer_allowed(stream: &UnixStream, access: Access) -> bool {
    let Ok(cred) = stream.peer_cred() else {
        return false;
    };
    let uid = cred.uid();
    if uid == 0 || uid == access.own_uid {
        return true;
    }
    let Some(admin_gid) = access.admin_gid else {
        return false;
    };
    if cred.gid() == admin_gid {
        return true;
    }
    // SO_PEERCRED carries only the primary group; supplementary ones come from /proc.
    cred.pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .is_some_and(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .is_some_and(|groups| {
                    groups
                        .split_whitespace()
                        .filter_map(|g| g.parse::<u32>().ok())
                        .any(|g| g == admin_gid)
                })
        })
}

/// One frame as `read_frame` cut it. Public (hidden) for the fuzz crate only.
#[doc(hidden)]
pub enum Frame {
    Line(Vec<u8>),
    TooLarge,
    Eof,
}

/// Reads one newline-terminated frame without ever buffering more than the limit. Public
/// (hidden) for the fuzz crate only.
#[doc(hidden)]
pub async fn read_frame<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<Frame> {
    let mut frame = Vec::new();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            // A last request without its newline still counts.
            return Ok(if frame.is_empty() {
                Frame::Eof
            } else {
                Frame::Line(frame)
            });
        }
        if let Some(pos) = available.iter().position(|b| *b == b'\n') {
            if frame.len() + pos > MAX_FRAME_BYTES {
                return Ok(Frame::TooLarge);
            }
            frame.extend_from_slice(&available[..pos]);
            reader.consume(pos + 1);
            return Ok(Frame::Line(frame));
        }
        let n = available.len();
        if frame.len() + n > MAX_FRAME_BYTES {
            return Ok(Frame::TooLarge);
        }
        frame.extend_from_slice(available);
        reader.consume(n);
    }
}

fn bad_request(code: &str, message: impl Into<String>) -> Box<Response> {
    Box::new(Response::fail("", "", code, message))
}

/// Boxed error: a reply is large and this path is the cold one. Public (hidden) for the fuzz
/// crate only.
#[doc(hidden)]
pub fn parse_request(frame: &[u8]) -> Result<Request, Box<Response>> {
    let value: serde_json::Value = serde_json::from_slice(frame).map_err(|e| {
        bad_request(
            codes::INVALID_JSON,
            format!("request is not valid JSON: {e}"),
        )
    })?;
    let obj = value
        .as_object()
        .ok_or_else(|| bad_request(codes::INVALID_REQUEST, "request must be a JSON object"))?;
    let field = |name: &str| -> Result<String, Box<Response>> {
        match obj.get(name) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            _ => Err(bad_request(
                codes::INVALID_REQUEST,
                format!("request needs a non-empty string field {name:?}"),
            )),
        }
    };
    let module = field("module")?;
    let action = field("action")?;
    let params = match obj.get("params") {
        None | Some(serde_json::Value::Null) => serde_json::Map::new(),
        Some(serde_json::Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(Box::new(Response::fail(
                &module,
                &action,
                codes::INVALID_REQUEST,
                "\"params\" must be a JSON object",
            )));
        }
    };
    Ok(Request {
        module,
        action,
        params,
    })
}

async fn write_reply(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    reply: &Response,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    writer.write_all(&bytes).await?;
    writer.flush().await
}

/// Answers once with an error that ends the connection, and counts it.
async fn refuse(
    metrics: &AdminMetrics,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    code: &str,
    message: String,
) -> std::io::Result<()> {
    metrics.record(Outcome {
        target: None,
        success: false,
    });
    write_reply(write, &Response::fail("", "", code, message)).await
}

async fn serve_connection(
    stream: UnixStream,
    access: Access,
    registry: Arc<Registry>,
    audit: Option<Arc<AuditLog>>,
    metrics: AdminMetrics,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let allowed = peer_allowed(&stream, access);
    let (read, mut write) = stream.into_split();
    if !allowed {
        return refuse(
            &metrics,
            &mut write,
            codes::PERMISSION_DENIED,
            "only root and members of the admin group may use this socket".into(),
        )
        .await;
    }
    let mut reader = BufReader::with_capacity(64 * 1024, read);
    loop {
        let frame = tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            frame = tokio::time::timeout(idle, read_frame(&mut reader)) => match frame {
                Err(_) => return Ok(()),
                Ok(frame) => frame?,
            },
        };
        let line = match frame {
            Frame::Eof => return Ok(()),
            Frame::TooLarge => {
                return refuse(
                    &metrics,
                    &mut write,
                    codes::FRAME_TOO_LARGE,
                    format!("request exceeds {MAX_FRAME_BYTES} bytes; closing the connection"),
                )
                .await;
            }
            Frame::Line(line) => line,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply = match parse_request(&line) {
            Ok(request) => {
                let audited = match &audit {
                    Some(log)
                        if registry.is_read_only(&request.module, &request.action)
                            == Some(false) =>
                    {
                        Some((Arc::clone(log), request.params.clone()))
                    }
                    _ => None,
                };
                let (reply, outcome) = registry.dispatch(request).await;
                metrics.record(outcome);
                if let (Some((log, params)), Some((module, action))) = (audited, outcome.target) {
                    let code = reply.code.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        log.record(&Entry {
                            transport: "socket",
                            token: "socket",
                            module,
                            action,
                            params: &params,
                            code: code.as_deref(),
                        })
                    })
                    .await;
                }
                reply
            }
            Err(reply) => {
                metrics.record(Outcome {
                    target: None,
                    success: false,
                });
                *reply
            }
        };
        write_reply(&mut write, &reply).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(input: &[u8]) -> Vec<String> {
        let mut reader = BufReader::with_capacity(7, input);
        let mut out = Vec::new();
        loop {
            match read_frame(&mut reader).await {
                Ok(Frame::Line(l)) => out.push(String::from_utf8_lossy(&l).into_owned()),
                Ok(Frame::TooLarge) => out.push("<too large>".into()),
                Ok(Frame::Eof) | Err(_) => break,
            }
            if out.last().is_some_and(|l| l == "<too large>") {
                break;
            }
        }
        out
    }

    #[tokio::test]
    async fn splits_frames_across_buffer_boundaries() {
        assert_eq!(
            frames(b"{\"a\":1}\n{\"b\":22}\nlast").await,
            vec!["{\"a\":1}", "{\"b\":22}", "last"]
        );
    }

    #[tokio::test]
    async fn refuses_oversized_frames() {
        let mut big = vec![b'x'; MAX_FRAME_BYTES + 1];
        big.push(b'\n');
        assert_eq!(frames(&big).await, vec!["<too large>"]);
    }

    #[test]
    fn parse_rejects_non_requests() {
        for bad in [
            &b"not json"[..],
            b"[]",
            b"{}",
            b"{\"module\":\"core\"}",
            b"{\"module\":1,\"action\":\"x\"}",
            b"{\"module\":\"a\",\"action\":\"b\",\"params\":[1]}",
        ] {
            assert!(parse_request(bad).is_err());
        }
        assert!(parse_request(b"{\"module\":\"a\",\"action\":\"b\"}").is_ok());
    }
}
