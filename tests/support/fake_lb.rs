//! A tiny HTTP load balancer for webhook tests: one public endpoint on 127.0.0.1:0 that
//! forwards each POST (path, secret header, body) to the next backend in turn and
//! answers with the backend's status; a backend that cannot be reached (dead, killed)
//! gives 502, so the fake Bot API redelivers, as Telegram does behind a real one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::Router;

const SECRET_HEADER: &str = "X-Telegram-Bot-Api-Secret-Token";

/// One forwarded request: the update id in its body (if any), the backend it went to
/// (index in [`FakeLb::start`]'s list) and the status returned to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub update_id: Option<i64>,
    pub backend: usize,
    pub status: u16,
}

struct Inner {
    backends: Vec<SocketAddr>,
    next: AtomicUsize,
    log: Mutex<Vec<Forward>>,
    client: reqwest::Client,
}

pub struct FakeLb {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeLb {
    /// Listens on a free loopback port; requests go to `backends` round-robin.
    pub async fn start(backends: Vec<SocketAddr>) -> FakeLb {
        let inner = Arc::new(Inner {
            backends,
            next: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
        });
        let app = Router::new().fallback(forward).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the load balancer");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeLb { addr, inner, task }
    }

    /// Every request forwarded so far, in the order they were answered.
    pub fn log(&self) -> Vec<Forward> {
        lock(&self.inner.log).clone()
    }

    /// Update ids that `backend` acknowledged (answered 2xx).
    pub fn acked_by(&self, backend: usize) -> Vec<i64> {
        self.log()
            .iter()
            .filter(|f| f.backend == backend && (200..300).contains(&f.status))
            .filter_map(|f| f.update_id)
            .collect()
    }
}

impl Drop for FakeLb {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    State(inner): State<Arc<Inner>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let n = inner.backends.len().max(1);
    let backend = inner.next.fetch_add(1, Ordering::Relaxed) % n;
    let update_id = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("update_id").and_then(|id| id.as_i64()));
    let status = match inner.backends.get(backend) {
        Some(addr) => {
            let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let mut req = inner
                .client
                .post(format!("http://{addr}{path}"))
                .header("content-type", "application/json")
                .body(body);
            if let Some(secret) = headers.get(SECRET_HEADER) {
                req = req.header(SECRET_HEADER, secret.as_bytes());
            }
            match req.send().await {
                Ok(resp) => resp.status().as_u16(),
                Err(_) => 502,
            }
        }
        None => 502,
    };
    lock(&inner.log).push(Forward {
        update_id,
        backend,
        status,
    });
    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY)
}
