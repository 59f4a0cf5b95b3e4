//! The daemon's local control socket (`<data_dir>/control.sock`, mode 0600, created
//! under umask 0077): lets `confab user export|forget` and `confab backup` work while the
//! daemon holds the store's lock. Only the daemon's own user and root may use it (the
//! peer's uid is checked with SO_PEERCRED on every connection).
//! Protocol: one JSON request line, one JSON response line (a backup then streams).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::domain::UserRef;
use crate::engine::admin::{describe_forget, export_json, forget_user};
use crate::engine::Engine;
use crate::store::SledStore;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Export {
        user: String,
    },
    Forget {
        user: String,
    },
    /// A backup; the response line is followed by the backup file's bytes until the
    /// connection closes (see `ops::backup`).
    Backup,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// Export: the JSON document; forget: a sentence.
    pub result: serde_json::Value,
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// Runs a user request against the engine (in the daemon, or directly when none runs).
pub fn execute(engine: &Engine, req: &Request) -> Response {
    let fail = |e: String| Response {
        ok: false,
        result: serde_json::Value::String(e),
    };
    let parse = |u: &str| u.parse::<UserRef>().map_err(|e| e.to_string());
    match req {
        Request::Export { user } => match parse(user) {
            Ok(u) => match export_json(engine, &u) {
                Ok(doc) => Response {
                    ok: true,
                    result: doc,
                },
                Err(e) => fail(e.to_string()),
            },
            Err(e) => fail(e),
        },
        Request::Forget { user } => match parse(user) {
            Ok(u) => match forget_user(engine, &u) {
                Ok(report) => {
                    tracing::info!(target: "audit", "operator deleted a user's data from the CLI");
                    Response {
                        ok: true,
                        result: serde_json::Value::String(describe_forget(&report)),
                    }
                }
                Err(e) => fail(e.to_string()),
            },
            Err(e) => fail(e),
        },
        Request::Backup => fail("backup is not a user command".into()),
    }
}

/// Binds the control socket; the daemon calls it before it starts serving, so a socket
/// that cannot be bound stops start-up. The process umask (0077, set in `main`) makes
/// the socket owner-only from its creation; the chmod covers library callers.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    // A socket left by a killed daemon: we hold the store's lock, so it is stale. Only
    // a socket is removed; anything else there is the operator's and makes bind fail.
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Only the daemon's own user and root may use the socket.
fn peer_allowed(peer_uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    peer_uid == me || peer_uid == 0
}

/// Serves the control socket until `stop`.
pub async fn serve(
    engine: Arc<Engine>,
    store: Option<Arc<SledStore>>,
    listener: UnixListener,
    path: PathBuf,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    continue;
                }
            },
        };
        let engine = engine.clone();
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(engine, store, stream).await {
                tracing::warn!(error = %e, "control request failed");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

fn refusal(text: String) -> Response {
    Response {
        ok: false,
        result: serde_json::Value::String(text),
    }
}

async fn write_line(write: &mut OwnedWriteHalf, response: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

async fn handle(
    engine: Arc<Engine>,
    store: Option<Arc<SledStore>>,
    stream: UnixStream,
) -> std::io::Result<()> {
    let peer = stream.peer_cred().map(|c| c.uid()).ok();
    let (read, mut write) = stream.into_split();
    // The request line is read (bounded) before anything is answered, so a client
    // never writes into a closed connection.
    let mut line = String::new();
    BufReader::new(read.take(64 * 1024))
        .read_line(&mut line)
        .await?;
    if !peer.is_some_and(peer_allowed) {
        tracing::warn!(target: "security", peer_uid = ?peer, "control socket connection refused: not the daemon's user or root");
        let text = "permission denied: the control socket serves only the daemon's user and root";
        write_line(&mut write, &refusal(text.into())).await?;
        return write.shutdown().await;
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Backup) => match store {
            Some(store) => return stream_backup(store, write).await,
            None => refusal(crate::store::REDIS_BACKUP_UNSUPPORTED.into()),
        },
        Ok(req) => tokio::task::spawn_blocking(move || execute(&engine, &req))
            .await
            .unwrap_or_else(|e| refusal(e.to_string())),
        Err(e) => refusal(format!("bad request: {e}")),
    };
    write_line(&mut write, &response).await?;
    write.shutdown().await
}

/// A backup: one response line, then the backup bytes until the connection closes.
/// One batch of rows at a time is read (off the runtime) and written, so a slow reader
/// holds neither memory nor the store's writers.
async fn stream_backup(store: Arc<SledStore>, mut write: OwnedWriteHalf) -> std::io::Result<()> {
    let start = Response {
        ok: true,
        result: serde_json::json!({ "stream": 2 }),
    };
    write_line(&mut write, &start).await?;
    let mut chunks = crate::ops::backup::Chunks::new(store);
    loop {
        let (back, next) = tokio::task::spawn_blocking(move || {
            let next = chunks.next_chunk();
            (chunks, next)
        })
        .await
        .map_err(std::io::Error::other)?;
        chunks = back;
        match next.map_err(std::io::Error::other)? {
            Some(bytes) => write.write_all(&bytes).await?,
            None => break,
        }
    }
    write.shutdown().await
}

/// Connects to a running daemon; `Ok(None)` when no daemon listens.
async fn connect(path: &Path) -> std::io::Result<Option<UnixStream>> {
    match UnixStream::connect(path).await {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

async fn send(
    stream: UnixStream,
    req: &Request,
) -> std::io::Result<(Response, BufReader<OwnedReadHalf>)> {
    let (read, mut write) = stream.into_split();
    let mut body = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    body.push(b'\n');
    write.write_all(&body).await?;
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let resp: Response = serde_json::from_str(&line).map_err(std::io::Error::other)?;
    Ok((resp, reader))
}

/// Sends a user request to a running daemon; `Ok(None)` when no daemon listens.
pub async fn call(path: &Path, req: &Request) -> std::io::Result<Option<Response>> {
    match connect(path).await? {
        Some(stream) => Ok(Some(send(stream, req).await?.0)),
        None => Ok(None),
    }
}

/// Asks a running daemon for a backup and copies it into `sink` as it arrives;
/// `Ok(None)` when no daemon listens, `Ok(Some(Err(reason)))` when it refused.
pub async fn backup_into(
    path: &Path,
    sink: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> std::io::Result<Option<Result<u64, String>>> {
    let Some(stream) = connect(path).await? else {
        return Ok(None);
    };
    let (resp, mut reader) = send(stream, &Request::Backup).await?;
    if !resp.ok {
        return Ok(Some(Err(resp.result.to_string())));
    }
    let n = tokio::io::copy(&mut reader, sink).await?;
    sink.flush().await?;
    Ok(Some(Ok(n)))
}
