//! Discord's outbound side (part of the serenity-aware Discord adapter): replies go out
//! through serenity's request builder and its rate limiter (default URL) or straight to
//! the configured URL (limiter off), and the whole answer is read, so a 429's
//! `retry_after` (body or headers) and `global` flag reach the delivery machinery.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use serenity::all::{
    ApplicationId, ChannelId, CreateAllowedMentions, CreateInteractionResponseFollowup,
    CreateMessage, EditMessage, Http, HttpError, MessageId,
};
use serenity::http::{LightMethod, Multipart, MultipartUpload, Request, Route};
use tokio::time::Instant;

use super::{attachment, components, private_note_text, Interact, Job, DC_LIMIT, RATE_LIMIT_WAIT};
use crate::adapters::delivery::RETRY_AFTER_MAX;
use crate::adapters::delivery::{Outbound, Part, PrivateNote, Profile, SendError, SendResult};
use crate::adapters::text::{char_len, split_message};
use crate::adapters::{redact, DraftPut, Throttle};
use crate::config::Secret;
use crate::domain::{Attachment, Button, Inbound};

/// Discord's error code for "Cannot send messages to this user".
const CANNOT_DM: u64 = 50007;

fn classify(e: &serenity::Error, token: &Secret) -> SendError {
    let why = redact(&format!("{e:?}"), token.expose());
    match e {
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r)) => match r.status_code.as_u16() {
            429 => SendError::RetryAfter(RATE_LIMIT_WAIT),
            500..=599 => SendError::Transient(why),
            _ => SendError::Permanent(why),
        },
        serenity::Error::Http(HttpError::Request(_)) | serenity::Error::Io(_) => {
            SendError::Transient(why)
        }
        _ => SendError::Permanent(why),
    }
}

/// Discord's outbound side: REST calls with our throttling (limiter off) and the
/// pause a global 429 imposes; answers classified for the delivery machinery.
pub struct DcOut {
    pub(super) http: Arc<Http>,
    /// Sends requests when serenity's limiter is off (a proxy or a fake).
    client: reqwest::Client,
    token: Secret,
    application_id: ApplicationId,
    /// Our outbound throttling; `None` while serenity's own rate limiter is on.
    pub(super) throttle: Option<Throttle>,
    /// Until when a global 429 pauses every REST call of this bot.
    paused: Mutex<Option<Instant>>,
}

/// No `@everyone`, role or user pings from LLM text; a reply still notifies its author.
pub(super) fn mentions() -> CreateAllowedMentions {
    CreateAllowedMentions::new().replied_user(true)
}

fn new_message(job: &Job, content: &str, buttons: &[Button]) -> CreateMessage {
    let mut m = CreateMessage::new()
        .content(content)
        .allowed_mentions(mentions());
    if job.is_group {
        m = m.reference_message((job.channel_id, job.message_id));
    }
    if !buttons.is_empty() {
        m = m.components(components(buttons));
    }
    m
}

/// Seconds (a float) from a 429's body or headers, bounded.
fn seconds(v: Option<f64>) -> Option<Duration> {
    let s = v.filter(|s| s.is_finite() && *s >= 0.0)?;
    Some(if s >= RETRY_AFTER_MAX.as_secs_f64() {
        RETRY_AFTER_MAX
    } else {
        Duration::try_from_secs_f64(s).ok()?
    })
}

/// A 429's wait and whether it is global: the body's `retry_after` / `global`, else the
/// `X-RateLimit-Reset-After` / `Retry-After` and `X-RateLimit-Global` / `-Scope` headers.
fn rate_limit(headers: &reqwest::header::HeaderMap, body: &Value) -> (Duration, bool) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let from_header = |name: &str| seconds(header(name).and_then(|v| v.trim().parse().ok()));
    let wait = seconds(body.get("retry_after").and_then(Value::as_f64))
        .or_else(|| from_header("x-ratelimit-reset-after"))
        .or_else(|| from_header("retry-after"))
        .unwrap_or(RATE_LIMIT_WAIT);
    let global = body.get("global").and_then(Value::as_bool) == Some(true)
        || header("x-ratelimit-global").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || header("x-ratelimit-scope").is_some_and(|v| v.eq_ignore_ascii_case("global"));
    (wait, global)
}

impl DcOut {
    pub(super) fn new(
        http: Arc<Http>,
        token: Secret,
        application_id: ApplicationId,
        throttle: Option<Throttle>,
    ) -> Self {
        DcOut {
            http,
            client: reqwest::Client::new(),
            token,
            application_id,
            throttle,
            paused: Mutex::new(None),
        }
    }

    /// Waits out a global 429 of this bot.
    async fn wait_paused(&self) {
        loop {
            let until = *self.paused.lock().unwrap_or_else(|p| p.into_inner());
            match until {
                Some(at) if at > Instant::now() => tokio::time::sleep_until(at).await,
                _ => return,
            }
        }
    }

    async fn execute(&self, req: Request<'_>) -> Result<reqwest::Response, serenity::Error> {
        match &self.http.ratelimiter {
            Some(limiter) => limiter.perform(req).await,
            None => {
                let built = req
                    .build(&self.client, self.http.token(), self.http.proxy.as_deref())?
                    .build()
                    .map_err(|e| serenity::Error::Http(HttpError::Request(e)))?;
                self.client
                    .execute(built)
                    .await
                    .map_err(|e| serenity::Error::Http(HttpError::Request(e)))
            }
        }
    }

    /// One REST call with a JSON body (and a file, as multipart); the answer's body.
    /// `place`: the channel a message goes to (for our throttling), if any.
    async fn rest(
        &self,
        place: Option<(ChannelId, bool)>,
        method: LightMethod,
        route: Route<'_>,
        mut body: Value,
        file: Option<&Attachment>,
    ) -> SendResult<Vec<u8>> {
        self.wait_paused().await;
        if let (Some(t), Some((chat, is_group))) = (&self.throttle, place) {
            t.wait(&chat.get().to_string(), is_group).await;
        }
        let mut req = Request::new(route, method);
        req = match file {
            None => req.body(Some(body.to_string().into_bytes())),
            Some(a) => {
                body["attachments"] = json!([{ "id": 0, "filename": a.file_name }]);
                req.multipart(Some(Multipart {
                    upload: MultipartUpload::Attachments(vec![attachment(a)]),
                    fields: vec![],
                    payload_json: Some(body.to_string()),
                }))
            }
        };
        let resp = self
            .execute(req)
            .await
            .map_err(|e| classify(&e, &self.token))?;
        let status = resp.status();
        if status.is_success() {
            // Sent, whatever happens to the answer's body now.
            return Ok(resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default());
        }
        let headers = resp.headers().clone();
        let answer: Value = resp
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        Err(self.failure(status.as_u16(), &headers, &answer))
    }

    fn failure(
        &self,
        status: u16,
        headers: &reqwest::header::HeaderMap,
        body: &Value,
    ) -> SendError {
        let message: String = body
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("")
            .chars()
            .take(200)
            .collect();
        let why = redact(
            &format!("discord answered {status}: {message}"),
            self.token.expose(),
        );
        match status {
            429 => {
                let (wait, global) = rate_limit(headers, body);
                if global {
                    tracing::warn!(wait = ?wait, "discord: global rate limit; pausing every send");
                    let until = Instant::now() + wait;
                    let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
                    *paused = Some(paused.map_or(until, |p| p.max(until)));
                }
                SendError::RetryAfter(wait)
            }
            500..=599 => SendError::Transient(why),
            // "Cannot send messages to this user": DMs closed, or the bot blocked.
            _ if body.get("code").and_then(Value::as_u64) == Some(CANNOT_DM) => {
                SendError::Unreachable(why)
            }
            _ => SendError::Permanent(why),
        }
    }

    /// POST /channels/{id}/messages; the new message's id.
    async fn create(
        &self,
        job: &Job,
        m: CreateMessage,
        file: Option<&Attachment>,
    ) -> SendResult<Option<MessageId>> {
        let body = serde_json::to_value(&m).map_err(|e| SendError::Permanent(e.to_string()))?;
        let route = Route::ChannelMessages {
            channel_id: job.channel_id,
        };
        let answer = self
            .rest(
                Some((job.channel_id, job.is_group)),
                LightMethod::Post,
                route,
                body,
                file,
            )
            .await?;
        Ok(message_id(&answer))
    }

    /// PATCH /channels/{id}/messages/{message}.
    async fn edit(&self, job: &Job, id: MessageId, e: EditMessage) -> SendResult<()> {
        let body = serde_json::to_value(&e).map_err(|e| SendError::Permanent(e.to_string()))?;
        let route = Route::ChannelMessage {
            channel_id: job.channel_id,
            message_id: id,
        };
        self.rest(
            Some((job.channel_id, job.is_group)),
            LightMethod::Patch,
            route,
            body,
            None,
        )
        .await
        .map(|_| ())
    }

    /// POST /webhooks/{application}/{interaction token}: a follow-up message.
    pub(super) async fn followup(
        &self,
        it: &Interact,
        f: CreateInteractionResponseFollowup,
        file: Option<&Attachment>,
    ) -> SendResult<()> {
        let body = serde_json::to_value(&f).map_err(|e| SendError::Permanent(e.to_string()))?;
        let route = Route::WebhookFollowupMessages {
            application_id: self.application_id,
            token: it.token(),
        };
        let (channel, guild) = it.place();
        let place = Some((channel, guild.is_some()));
        let sent = self.rest(place, LightMethod::Post, route, body, file).await;
        sent.map(|_| ()).map_err(|e| without_token(e, it))
    }

    /// PATCH /webhooks/{application}/{interaction token}/messages/@original: replaces
    /// the interaction's first response (e.g. a public "thinking…").
    pub(super) async fn edit_original(&self, it: &Interact, content: &str) -> SendResult<()> {
        let body = json!({ "content": content, "allowed_mentions": mentions() });
        let route = Route::WebhookOriginalInteractionResponse {
            application_id: self.application_id,
            token: it.token(),
        };
        let (channel, guild) = it.place();
        let place = Some((channel, guild.is_some()));
        let sent = self
            .rest(place, LightMethod::Patch, route, body, None)
            .await;
        sent.map(|_| ()).map_err(|e| without_token(e, it))
    }
}

/// An interaction's token is a credential for its webhook: never in an error text.
fn without_token(e: SendError, it: &Interact) -> SendError {
    match e {
        SendError::Permanent(why) => SendError::Permanent(redact(&why, it.token())),
        SendError::Transient(why) => SendError::Transient(redact(&why, it.token())),
        SendError::Unreachable(why) => SendError::Unreachable(redact(&why, it.token())),
        other => other,
    }
}

fn message_id(answer: &[u8]) -> Option<MessageId> {
    let v: Value = serde_json::from_slice(answer).ok()?;
    let id = v.get("id")?.as_str()?.parse::<u64>().ok()?;
    std::num::NonZeroU64::new(id).map(MessageId::from)
}

impl Outbound for DcOut {
    type Job = Job;
    type MsgId = MessageId;
    /// Discord shows "typing…" for about 10 s per request. The gateway intake does not
    /// flush; the inbox entry is flushed before handling (group commit).
    const PROFILE: Profile =
        Profile::new("discord", DC_LIMIT, Duration::from_secs(8)).flushing_before_handling();

    fn inbound(job: &Job) -> &Inbound {
        &job.inbound
    }

    fn order(job: &Job) -> u64 {
        job.message_id.get()
    }

    fn split(&self, text: &str) -> Vec<String> {
        split_message(text, DC_LIMIT, char_len)
    }

    async fn before(&self, _job: &Job) {}

    async fn typing(&self, job: &Job) {
        let _ = self.http.broadcast_typing(job.channel_id).await;
    }

    async fn draft(&self, job: &Job, id: Option<MessageId>, text: String) -> DraftPut<MessageId> {
        let result = match id {
            None => match self.create(job, new_message(job, &text, &[]), None).await {
                Ok(Some(id)) => Ok(id),
                Ok(None) => Err(SendError::Permanent("no message id in the answer".into())),
                Err(e) => Err(e),
            },
            Some(id) => self
                .edit(job, id, EditMessage::new().content(text))
                .await
                .map(|()| id),
        };
        match result {
            Ok(id) => DraftPut::Shown(id),
            Err(e) => DraftPut::Failed(format!("{e:?}")),
        }
    }

    async fn send_part(&self, job: &Job, part: Part<'_>) -> SendResult<()> {
        self.create(job, new_message(job, part.text, part.buttons), None)
            .await
            .map(|_| ())
    }

    async fn edit_part(&self, job: &Job, id: MessageId, part: Part<'_>) -> SendResult<()> {
        let mut e = EditMessage::new().content(part.text);
        if !part.buttons.is_empty() {
            e = e.components(components(part.buttons));
        }
        self.edit(job, id, e).await
    }

    async fn send_file(&self, job: &Job, a: &Attachment) -> SendResult<()> {
        self.create(job, new_message(job, &a.file_name, &[]), Some(a))
            .await
            .map(|_| ())
    }

    /// POST /users/@me/channels opens (or finds) the DM channel with the user.
    async fn private_chat(&self, job: &Job) -> SendResult<Job> {
        let body = json!({ "recipient_id": job.inbound.user_id });
        let answer = self
            .rest(None, LightMethod::Post, Route::UserMeDmChannels, body, None)
            .await?;
        let channel = channel_id(&answer)
            .ok_or_else(|| SendError::Permanent("no channel id in the answer".into()))?;
        Ok(Job {
            inbound: job.inbound.clone(),
            channel_id: channel,
            message_id: job.message_id,
            is_group: false,
        })
    }

    /// A reply to the user's message in the channel, without content.
    async fn private_note(&self, job: &Job, note: PrivateNote) -> SendResult<()> {
        let m = new_message(job, private_note_text(note), &[]);
        self.create(job, m, None).await.map(|_| ())
    }
}

fn channel_id(answer: &[u8]) -> Option<ChannelId> {
    let v: Value = serde_json::from_slice(answer).ok()?;
    let id = v.get("id")?.as_str()?.parse::<u64>().ok()?;
    std::num::NonZeroU64::new(id).map(ChannelId::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn a_429_says_how_long_in_its_body_or_its_headers() {
        let body =
            json!({"message": "You are being rate limited.", "retry_after": 3.5, "global": false});
        let h = headers(&[("retry-after", "4"), ("x-ratelimit-reset-after", "3.9")]);
        assert_eq!(rate_limit(&h, &body), (Duration::from_millis(3500), false));
        assert_eq!(
            rate_limit(&h, &Value::Null),
            (Duration::from_millis(3900), false)
        );
        let h = headers(&[("retry-after", "4")]);
        assert_eq!(
            rate_limit(&h, &Value::Null),
            (Duration::from_secs(4), false)
        );
        assert_eq!(
            rate_limit(&HeaderMap::new(), &Value::Null),
            (RATE_LIMIT_WAIT, false)
        );
    }

    #[test]
    fn a_global_429_is_recognised_by_body_or_headers() {
        let global = json!({"retry_after": 1.0, "global": true});
        assert!(rate_limit(&HeaderMap::new(), &global).1);
        assert!(rate_limit(&headers(&[("x-ratelimit-global", "true")]), &Value::Null).1);
        assert!(rate_limit(&headers(&[("x-ratelimit-scope", "global")]), &Value::Null).1);
        assert!(!rate_limit(&headers(&[("x-ratelimit-scope", "user")]), &Value::Null).1);
    }

    #[test]
    fn hostile_waits_are_bounded_and_never_panic() {
        for v in [json!(-1.0), json!(1e300), json!("soon"), json!(null)] {
            let (wait, _) = rate_limit(
                &headers(&[("retry-after", "NaN")]),
                &json!({"retry_after": v}),
            );
            assert!(wait <= RETRY_AFTER_MAX, "{wait:?}");
        }
        let (wait, _) = rate_limit(&HeaderMap::new(), &json!({"retry_after": 1e300}));
        assert_eq!(wait, RETRY_AFTER_MAX);
    }
}
