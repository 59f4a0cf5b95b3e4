//! The call stage: the LLM call (one per user at a time), the context-length retry,
//! and billing of failed attempts.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use super::{stop, Answer, MessageCtx, Step};
use crate::domain::{Rejection, Reply, ReplyKind, UserRef};
use crate::engine::events::{ContextTooLong, LlmFailed};
use crate::engine::limits::utc_day;
use crate::engine::{now_unix, roll_day, Engine, MSG_BUSY, MSG_LLM_FAILED, MSG_LLM_UNAVAILABLE};
use crate::events::Event;
use crate::llm::events::{BusyCause, LlmBusy};
use crate::llm::{ChatMessage, ChatRequest, ChatResponse, ChatRole, LlmError};
use crate::store::StoreError;

impl Engine {
    /// Call: asks the LLM. `None` means "try again with a shorter history": the model
    /// said the context is too long (our count is cl100k's; the model's differs), so
    /// the history budget is halved, once. Failed attempts that may have been paid for
    /// count against the user's budget.
    #[tracing::instrument(level = "debug", name = "call", skip_all)]
    pub(super) async fn call(&self, m: &mut MessageCtx<'_>) -> Step<Option<Answer>> {
        let mut messages = Vec::with_capacity(m.history.len() + 2);
        messages.push(ChatMessage::new(ChatRole::System, m.system.to_string()));
        messages.append(&mut m.history);
        let mut question = ChatMessage::new(ChatRole::User, m.text);
        question.images = m.images.clone();
        messages.push(question);
        let request = ChatRequest {
            model: m.sampling.model.clone(),
            messages,
            temperature: m.sampling.temperature,
            max_tokens: m.sampling.max_tokens,
        };
        let partial = m.partial.filter(|_| m.sampling.stream);
        let estimate = m.prompt_estimate();
        let (result, wasted) = self.call_llm(&m.user, request, partial, estimate).await;
        if result.is_err() && wasted > 0 {
            self.charge(&m.user, wasted)?;
        }
        match result {
            Ok(resp) => {
                let prompt_tokens = Some(resp.prompt_tokens).filter(|n| *n > 0);
                let prompt_tokens = prompt_tokens.unwrap_or(estimate);
                let reply_tokens = self.reply_tokens(resp.completion_tokens, &resp.text);
                Ok(Some(Answer {
                    text: resp.text,
                    reply_tokens,
                    cost: prompt_tokens + reply_tokens + wasted,
                    kind: ReplyKind::Answer,
                }))
            }
            Err(LlmError::ContextLength) if !m.tried_shorter && m.history_tokens > 0 => {
                let history_tokens = m.history_tokens;
                ContextTooLong { history_tokens }.emit(&self.stats);
                m.tried_shorter = true;
                m.history_budget = (m.history_tokens / 2) as usize;
                Ok(None)
            }
            Err(LlmError::CircuitOpen) => stop(Reply::notice(
                Rejection::LlmUnavailable,
                MSG_LLM_UNAVAILABLE,
            )),
            Err(LlmError::Busy) => stop(Reply::notice(Rejection::Busy, MSG_BUSY)),
            Err(error) => {
                LlmFailed { error: &error }.emit(&self.stats);
                stop(Reply::notice(Rejection::LlmFailed, MSG_LLM_FAILED))
            }
        }
    }

    /// One LLM call for `user` (at most one in flight per user; waiting for it is bounded
    /// like waiting for an LLM slot). Returns the result and the tokens spent on attempts
    /// that failed — the prompt of each failed attempt, plus whatever a broken stream
    /// had already produced — which the caller charges to the user.
    async fn call_llm(
        &self,
        user: &UserRef,
        request: ChatRequest,
        partial: Option<&watch::Sender<String>>,
        prompt_estimate: u64,
    ) -> (Result<ChatResponse, LlmError>, u64) {
        let wait = Duration::from_secs(self.config().llm.queue_timeout_secs);
        let mine = tokio::time::timeout(wait, self.coord.user_calls.acquire(user.to_string()));
        let Ok(Ok(_mine)) = mine.await else {
            let cause = BusyCause::UserCall;
            LlmBusy { cause }.emit(&self.llm.stats);
            return (Err(LlmError::Busy), 0);
        };
        match partial {
            None => {
                let billed = self.llm.complete_billed(request).await;
                let wasted = billed.billable_failures as u64 * prompt_estimate;
                (billed.result, wasted)
            }
            Some(p) => self.stream_call(request, p, prompt_estimate).await,
        }
    }

    async fn stream_call(
        &self,
        request: ChatRequest,
        partial: &watch::Sender<String>,
        prompt_estimate: u64,
    ) -> (Result<ChatResponse, LlmError>, u64) {
        let billed = self.llm.stream(request).await;
        let mut wasted = billed.billable_failures as u64 * prompt_estimate;
        let mut deltas = match billed.result {
            Ok(d) => d,
            Err(e) => return (Err(e), wasted),
        };
        let mut text = String::new();
        while let Some(item) = deltas.next().await {
            match item {
                Ok(delta) => {
                    text.push_str(&delta);
                    partial.send_replace(text.clone());
                }
                Err(e) => {
                    // The endpoint generated (and bills) what it streamed before failing.
                    wasted += prompt_estimate + self.tokenizer.count(&text) as u64;
                    return (Err(e), wasted);
                }
            }
        }
        if text.trim().is_empty() {
            wasted += prompt_estimate;
            return (
                Err(LlmError::BadResponse("empty streamed answer".into())),
                wasted,
            );
        }
        let response = ChatResponse {
            text,
            prompt_tokens: 0,
            completion_tokens: 0,
        };
        (Ok(response), wasted)
    }

    /// A reply's tokens: as the endpoint reported them, else counted by us (0 = not said).
    pub(super) fn reply_tokens(&self, reported: u64, text: &str) -> u64 {
        match reported {
            0 => self.tokenizer.count(text) as u64,
            n => n,
        }
    }

    /// Adds tokens to the user's usage today without storing any turn.
    fn charge(&self, user: &UserRef, tokens: u64) -> Result<(), StoreError> {
        let today = utc_day(now_unix());
        self.store.update_user(user, &mut |r| {
            roll_day(r, today);
            r.usage.tokens += tokens;
            r.usage.total_tokens += tokens;
        })?;
        Ok(())
    }
}
