//! Telegram webhook intake (SPEC §14): one local HTTP server for every Telegram bot of
//! the process, each bot at `<path of webhook_url>/telegram/<bot>`. A request must carry
//! `X-Telegram-Bot-Api-Secret-Token` (compared in constant time; 401 otherwise, nothing
//! stored). Its update goes through the polled updates' translation and
//! `Delivery::take_in` (with `must_store`), and the request is answered 200 only once
//! the update is in the inbox and flushed; a store failure answers 500 (Telegram redelivers), full queues 503
//! (Telegram retries later, like a paused poll). A body that is no update is counted and
//! answered 200: Telegram would redeliver a non-2xx answer forever.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::Router;
use teloxide::payloads::SetWebhookSetters;
use teloxide::requests::Requester;
use teloxide::types::{AllowedUpdate, Update};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::TelegramAdapter;
use crate::adapters::delivery::Admission;
use crate::adapters::events::{WebhookRefusal, WebhookRefused};
use crate::config::{Secret, WebhookConfig};
use crate::events::Event;

/// The header Telegram sets to the `secret_token` given to setWebhook.
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";
/// Telegram updates are a few KB; anything far larger is not one.
pub const MAX_BODY: usize = 1 << 20;

/// A running webhook server.
pub struct Server {
    /// The address actually bound.
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

struct Hooks {
    secret: Secret,
    /// Local path → its bot's adapter.
    bots: HashMap<String, Arc<TelegramAdapter>>,
    tracker: TaskTracker,
}

/// Binds `hook.bind` (a failure stops start-up) and serves every adapter's path until
/// `stop`; then it accepts nothing more and lets requests in flight finish.
pub async fn start(
    hook: &WebhookConfig,
    adapters: &[Arc<TelegramAdapter>],
    tracker: TaskTracker,
    stop: CancellationToken,
) -> anyhow::Result<Server> {
    let secret = hook
        .secret
        .clone()
        .context("telegram webhook mode without a secret token")?;
    let bots = adapters
        .iter()
        .map(|a| (hook.path(a.name()), a.clone()))
        .collect();
    let listener = tokio::net::TcpListener::bind(hook.bind)
        .await
        .with_context(|| format!("binding the Telegram webhook on {}", hook.bind))?;
    let addr = listener.local_addr().context("Telegram webhook address")?;
    let state = Arc::new(Hooks {
        secret,
        bots,
        tracker,
    });
    let app = Router::new().fallback(handle).with_state(state);
    let task = tokio::spawn(crate::ops::http::serve(listener, app, stop));
    tracing::info!(%addr, "telegram webhook listening");
    Ok(Server { addr, task })
}

async fn handle(State(hooks): State<Arc<Hooks>>, req: Request) -> StatusCode {
    let Some(adapter) = hooks.bots.get(req.uri().path()) else {
        return StatusCode::NOT_FOUND;
    };
    if req.method() != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED;
    }
    let given = req
        .headers()
        .get(SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !same_secret(given, hooks.secret.expose().as_bytes()) {
        let why = WebhookRefusal::Unauthorized;
        WebhookRefused {
            bot: adapter.name(),
            why,
        }
        .emit(adapter.delivery.stats());
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(body) = axum::body::to_bytes(req.into_body(), MAX_BODY).await else {
        return StatusCode::PAYLOAD_TOO_LARGE;
    };
    adapter.receive(&body, &hooks.tracker).await
}

/// Compares without an early exit on the first differing byte (the length is not secret).
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

impl TelegramAdapter {
    /// One webhook request's body: translated and admitted like a polled update; the
    /// answer tells Telegram whether it may forget the update.
    async fn receive(&self, body: &[u8], tracker: &TaskTracker) -> StatusCode {
        let Ok(update) = serde_json::from_slice::<Update>(body) else {
            let why = WebhookRefusal::Malformed;
            WebhookRefused {
                bot: &self.name,
                why,
            }
            .emit(self.delivery.stats());
            return StatusCode::OK;
        };
        // Like a paused poll: Telegram keeps the update and sends it again later.
        if self.delivery.saturated() {
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        match self.take(update, tracker, true) {
            Some(Admission::NotStored) => return StatusCode::INTERNAL_SERVER_ERROR,
            Some(Admission::Queued) => {}
            // Refused with a busy notice, or nothing for us: Telegram may forget it.
            Some(Admission::Refused) | None => return StatusCode::OK,
        }
        if let Err(e) = self.delivery.inbox().flush().await {
            tracing::error!(error.kind = crate::events::ErrorKind::StoreIo.as_str(), error = %e, "store flush failed; not acknowledging the update");
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
        StatusCode::OK
    }

    /// Webhook mode's intake task: registers the webhook (retrying with backoff until
    /// Telegram takes it), then reads as connected until `stop`. The server is started
    /// once for all bots by [`start`]; the webhook stays registered at shutdown so
    /// Telegram keeps the updates for the next instance.
    pub(super) async fn run_webhook(&self, hook: &WebhookConfig, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        while !stop.is_cancelled() {
            match self.set_webhook(hook).await {
                Ok(()) => {
                    tracing::info!(bot = %self.name, "telegram webhook registered");
                    self.connected.store(true, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    tracing::warn!(bot = %self.name, error = %e, retry_in = ?backoff, "setWebhook failed");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        let mut prune = tokio::time::interval(Duration::from_secs(300));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = prune.tick() => self.delivery.out().throttle.prune(),
            }
        }
        self.connected.store(false, Ordering::Relaxed);
        tracing::info!(bot = %self.name, "telegram webhook intake stopped");
    }

    /// setWebhook with the bot's URL, the secret and the update kinds we handle; pending
    /// updates are kept. Errors are redacted (the token is in the request URL).
    async fn set_webhook(&self, hook: &WebhookConfig) -> Result<(), String> {
        let url = url::Url::parse(&hook.url_for(&self.name))
            .map_err(|e| format!("telegram.webhook_url: {e}"))?;
        let secret = hook.secret.as_ref().ok_or("no webhook secret")?;
        self.bot
            .set_webhook(url)
            .secret_token(secret.expose())
            .allowed_updates(ALLOWED)
            .drop_pending_updates(false)
            .await
            .map(|_| ())
            .map_err(|e| self.scrub(&e))
    }
}

/// The update kinds the adapter handles (polling asks for the same).
pub(super) const ALLOWED: [AllowedUpdate; 2] =
    [AllowedUpdate::Message, AllowedUpdate::CallbackQuery];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc-_1", b"abc-_1"));
        assert!(!same_secret(b"abc-_2", b"abc-_1"));
        assert!(!same_secret(b"abc", b"abc-_1"));
        assert!(!same_secret(b"", b"abc"));
    }
}
