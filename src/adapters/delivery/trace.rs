//! Trace spans of the delivery machinery (see `telemetry`): the root `update` span of
//! each update and one child span per platform call. Ids, names and outcomes only.

use std::future::Future;

use tracing::Instrument;

use super::{Delivery, Outbound, SendError, SendResult};

/// The span of one platform call (Bot API method, Discord REST call): a child of the
/// update's span with the platform, the method and how it ended — never text or URLs.
pub(super) fn send_span(platform: &'static str, method: &'static str) -> tracing::Span {
    tracing::debug_span!(
        "send",
        otel.name = %format_args!("{platform} {method}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        platform,
        method,
        outcome = tracing::field::Empty,
    )
}

/// Runs one platform call inside its [`send_span`] and records the outcome.
pub(super) async fn traced<P: Outbound, T>(
    method: &'static str,
    call: impl Future<Output = SendResult<T>>,
) -> SendResult<T> {
    let span = send_span(P::PROFILE.platform, method);
    let result = call.instrument(span.clone()).await;
    let outcome = match &result {
        Ok(_) => "sent",
        Err(SendError::RetryAfter(_)) => "retry_after",
        Err(SendError::Transient(_)) => "transient",
        Err(SendError::Permanent(_)) => "permanent",
        Err(SendError::Unreachable(_)) => "unreachable",
    };
    span.record("outcome", outcome);
    if result.is_err() {
        span.record("otel.status_code", "ERROR");
    }
    result
}

impl<P: Outbound> Delivery<P> {
    /// The root span of one update's trace (and its log lines): ids only, no text.
    /// Opened at receipt, so the trace also shows the wait in the conversation's queue.
    pub(super) fn update_span(&self, job: &P::Job, replayed: bool) -> tracing::Span {
        let update = P::inbound(job).update_id.as_deref().unwrap_or_default();
        tracing::info_span!(
            parent: None,
            "update",
            platform = P::PROFILE.platform,
            bot = %self.bot,
            update = %update,
            replayed,
        )
    }
}
