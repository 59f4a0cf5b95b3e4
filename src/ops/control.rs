//! The daemon's local control socket (`<data_dir>/control.sock`, mode 0600): lets
//! `confab user export|forget` work while the daemon holds the store's lock.
//! Protocol: one JSON request line, one JSON response line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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
    /// A consistent backup; the response line is followed by `result.bytes` raw bytes.
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

/// Runs a request against the engine and store (in the daemon, or directly when none
/// runs). A backup also returns its bytes.
pub fn execute(engine: &Engine, store: &SledStore, req: &Request) -> (Response, Option<Vec<u8>>) {
    if let Request::Backup = req {
        return match store.snapshot() {
            Ok(rows) => {
                let bytes = crate::ops::backup::encode(&rows, store.backup_auth().as_ref());
                let resp = Response {
                    ok: true,
                    result: serde_json::json!({ "bytes": bytes.len(), "rows": rows.len() }),
                };
                (resp, Some(bytes))
            }
            Err(e) => (
                Response {
                    ok: false,
                    result: serde_json::Value::String(e.to_string()),
                },
                None,
            ),
        };
    }
    (execute_user(engine, req), None)
}

fn execute_user(engine: &Engine, req: &Request) -> Response {
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

/// Serves the control socket until `stop`.
pub async fn serve(
    engine: Arc<Engine>,
    store: Arc<SledStore>,
    path: PathBuf,
    stop: CancellationToken,
) -> std::io::Result<()> {
    // A socket left by a killed daemon: we hold the store's lock, so it is stale.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
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
    Ok(())
}

async fn handle(
    engine: Arc<Engine>,
    store: Arc<SledStore>,
    stream: UnixStream,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let (response, payload) = match serde_json::from_str::<Request>(&line) {
        Ok(req) => tokio::task::spawn_blocking(move || execute(&engine, &store, &req))
            .await
            .unwrap_or_else(|e| {
                let resp = Response {
                    ok: false,
                    result: serde_json::Value::String(e.to_string()),
                };
                (resp, None)
            }),
        Err(e) => (
            Response {
                ok: false,
                result: serde_json::Value::String(format!("bad request: {e}")),
            },
            None,
        ),
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await?;
    if let Some(bytes) = payload {
        write.write_all(&bytes).await?;
    }
    write.shutdown().await
}

/// Sends a request to a running daemon; `Ok(None)` when no daemon listens.
pub async fn call(
    path: &Path,
    req: &Request,
) -> std::io::Result<Option<(Response, Option<Vec<u8>>)>> {
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let (read, mut write) = stream.into_split();
    let mut body = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    body.push(b'\n');
    write.write_all(&body).await?;
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let resp: Response = serde_json::from_str(&line).map_err(std::io::Error::other)?;
    let payload = match (
        req,
        resp.ok,
        resp.result.get("bytes").and_then(|b| b.as_u64()),
    ) {
        (Request::Backup, true, Some(n)) => {
            let mut bytes = vec![0u8; n as usize];
            tokio::io::AsyncReadExt::read_exact(&mut reader, &mut bytes).await?;
            Some(bytes)
        }
        _ => None,
    };
    Ok(Some((resp, payload)))
}
