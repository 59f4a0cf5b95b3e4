//! The stages around the LLM call: context (system prompt, token counts, history),
//! cache (lookup), record (cache entry, both turns, usage; durable before the reply).

use super::{Answer, Internal, MessageCtx, Sampling, Step, Stop};
use crate::config::CacheScope;
use crate::domain::{Platform, Reply, ReplyKind};
use crate::engine::events::{CacheHit, CacheMiss, InternalCause, InternalError, StoreWritten};
use crate::engine::limits::utc_day;
use crate::engine::prompt::PromptFor;
use crate::engine::{cache, now_unix, roll_day, Engine};
use crate::events::Event;
use crate::llm::{ChatMessage, ChatRole};
use crate::store::UserRecord;
use crate::store::{CacheEntry, Exchange, Handled, HandledEntry, Role, StoreError, Turn};

/// Lowercase hex of a hash.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Engine {
    /// Context: renders the bot's system prompt, counts the prompt's and the
    /// question's tokens, and sets what the history may take.
    #[tracing::instrument(level = "debug", name = "context", skip_all)]
    pub(super) fn context(&self, m: &mut MessageCtx<'_>) -> Step {
        let (cfg, bot) = (m.cfg, m.bot);
        let prompt = PromptFor {
            template: &bot.prompt,
            bot_name: &bot.name,
            user_name: &m.inbound.user_name,
            platform: m.inbound.platform.name(),
            now: chrono::Utc::now(),
        };
        (m.system, m.system_tokens) = m
            .prompts
            .render_counted(&prompt, |text| self.system_tokens(text))
            .map_err(|e| Stop::Internal(Internal::Prompt(e.to_string())))?;
        m.user_tokens = self.tokenizer.count(m.text);
        m.history_budget = cfg
            .memory
            .max_context_tokens
            .saturating_sub(m.system_tokens + m.user_tokens);
        m.sampling = Sampling {
            model: bot
                .llm
                .model
                .clone()
                .unwrap_or_else(|| cfg.llm.model.clone()),
            temperature: bot.llm.temperature.or(cfg.llm.temperature),
            max_tokens: bot.llm.max_tokens.or(cfg.llm.max_tokens),
            stream: bot.stream && m.partial.is_some(),
        };
        Ok(())
    }

    /// Context, continued: loads the newest turns that fit the history budget and
    /// derives the cache key from everything the LLM would see.
    #[tracing::instrument(level = "debug", name = "history", skip_all)]
    pub(super) fn history(&self, m: &mut MessageCtx<'_>) -> Step {
        let turns = self
            .store
            .recent_turns(&m.inbound.conversation(), m.history_budget)?;
        m.history_tokens = turns.iter().map(|t| t.tokens as u64).sum();
        m.history = turns
            .into_iter()
            .map(|t| {
                let role = match t.role {
                    Role::User => ChatRole::User,
                    Role::Assistant => ChatRole::Assistant,
                };
                ChatMessage::new(role, t.text)
            })
            .collect();
        let cache = &m.cfg.cache;
        // An image's hash is part of the question: identical images can hit.
        let question = match &m.image_sha {
            Some(sha) => format!("{}\n[image sha256:{}]", m.text, hex(sha)),
            None => m.text.to_string(),
        };
        m.cache_key = cache.enabled.then(|| {
            let scope_user = (cache.scope == CacheScope::User).then_some(&m.user);
            cache::key(&cache::KeyInput {
                model: &m.sampling.model,
                temperature: m.sampling.temperature,
                max_tokens: m.sampling.max_tokens,
                system: &m.system,
                context: &m.history,
                question: &question,
                user: scope_user,
            })
        });
        Ok(())
    }

    /// Cache: a fresh entry for this exact context answers without an LLM call.
    #[tracing::instrument(level = "debug", name = "cache", skip_all)]
    pub(super) fn cache(&self, m: &MessageCtx<'_>) -> Step<Option<Answer>> {
        let Some(key) = &m.cache_key else {
            return Ok(None);
        };
        match self.store.cache_get(key)? {
            Some(hit) if now_unix() - hit.created_at < m.cfg.cache.ttl_secs as i64 => {
                let tokens_saved = hit.tokens;
                CacheHit { tokens_saved }.emit(&self.stats);
                if let Some(p) = m.partial {
                    p.send_replace(hit.reply.clone());
                }
                let reply_tokens = self.reply_tokens(hit.reply_tokens, &hit.reply);
                Ok(Some(Answer {
                    text: hit.reply,
                    reply_tokens,
                    cost: 0,
                    kind: ReplyKind::Cached,
                }))
            }
            _ => {
                CacheMiss.emit(&self.stats);
                Ok(None)
            }
        }
    }

    /// Record: a fresh answer becomes a cache entry; both turns, the pending reply and
    /// the usage are stored in one batch and made durable. Only then may it be sent.
    #[tracing::instrument(level = "debug", name = "record", skip_all)]
    pub(super) async fn record(&self, m: &MessageCtx<'_>, answer: Answer) -> Step<Reply> {
        if let (Some(key), ReplyKind::Answer) = (&m.cache_key, &answer.kind) {
            let entry = CacheEntry {
                reply: answer.text.clone(),
                tokens: answer.cost,
                reply_tokens: answer.reply_tokens,
                created_at: now_unix(),
                origin: m.user.clone(),
                model: m.sampling.model.clone(),
            };
            if let Err(e) = self.store.cache_put(key, &entry, m.cfg.cache.max_entries) {
                let cause = InternalCause::CacheWrite;
                InternalError { cause, error: &e }.emit(&self.stats);
            }
        }
        let started = tokio::time::Instant::now();
        self.remember(m, &answer).await?;
        let elapsed = started.elapsed();
        StoreWritten { elapsed }.emit(&self.stats);
        Ok(Reply::text(answer.text, answer.kind))
    }

    /// Appends both turns, the pending reply and the user's usage in one atomic batch and
    /// makes it durable (group commit).
    async fn remember(&self, m: &MessageCtx<'_>, answer: &Answer) -> Result<(), StoreError> {
        let inbound = m.inbound;
        let now = now_unix();
        let turns = [
            Turn {
                role: Role::User,
                // An image is never stored: memory keeps its caption and a marker.
                text: match m.images.is_empty() {
                    true => m.text.to_string(),
                    false => format!("{} [image]", m.text),
                },
                tokens: m.user_tokens as u32,
                at: now,
            },
            Turn {
                role: Role::Assistant,
                text: answer.text.clone(),
                tokens: answer.reply_tokens.min(u32::MAX as u64) as u32,
                at: now,
            },
        ];
        let pending = HandledEntry {
            state: Handled::Pending {
                reply: answer.text.clone(),
            },
            at: now,
            user: Some(m.user.clone()),
        };
        let today = utc_day(now);
        let cost = answer.cost;
        let mut book = |r: &mut UserRecord| {
            roll_day(r, today);
            if r.first_seen == 0 {
                r.first_seen = now;
            }
            r.last_seen = now;
            if r.name.as_deref() != Some(inbound.user_name.as_str()) {
                r.name = Some(inbound.user_name.clone());
            }
            // A platform with usernames says when one was dropped, too.
            if inbound.platform != Platform::Terminal && r.username != inbound.username {
                r.username = inbound.username.clone();
            }
            r.usage.tokens += cost;
            r.usage.messages += 1;
            r.usage.total_tokens += cost;
            r.usage.total_messages += 1;
        };
        self.store.record_exchange(Exchange {
            conversation: &inbound.conversation(),
            turns: &turns,
            handled: m.update_key.as_deref().map(|k| (k, &pending)),
            user: Some((&m.user, &mut book)),
        })?;
        self.store.flush().await
    }
}
