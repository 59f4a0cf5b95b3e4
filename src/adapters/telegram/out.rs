//! Telegram's outbound side (part of the teloxide-aware Telegram adapter): HTML
//! rendering with plain-text fallback, inline keyboards, throttling, personal replies
//! aimed at the user's private chat, and every call classified for `delivery.rs`.

use std::time::Duration;

use teloxide::payloads::{EditMessageTextSetters, SendDocumentSetters, SendMessageSetters};
use teloxide::requests::Requester;
use teloxide::types::{
    CallbackQueryId, ChatAction, ChatId, InlineKeyboardButton, InlineKeyboardMarkup, InputFile,
    MessageId, ParseMode, ReplyParameters,
};
use teloxide::{ApiError, Bot, RequestError};

use super::{Job, SPLIT_AT, TG_LIMIT};
use crate::adapters::delivery::{Outbound, Part, PrivateNote, Profile, SendError, SendResult};
use crate::adapters::text::{markdown_to_telegram_html, split_message, utf16_len};
use crate::adapters::{redact, DraftPut, Throttle};
use crate::config::Secret;
use crate::domain::{Attachment, Button, Inbound};

/// Telegram's outbound side: HTML rendering with plain-text fallback, inline keyboards,
/// throttling; every call classified for the delivery machinery.
pub struct TgOut {
    pub(super) bot: Bot,
    pub(super) token: Secret,
    /// The bot's own username (the `https://t.me/<name>` link of a private-chat note).
    pub(super) username: String,
    pub(super) throttle: Throttle,
}

pub(super) fn scrub(e: &RequestError, token: &Secret) -> String {
    match e {
        // The raw answer can hold message text.
        RequestError::InvalidJson { .. } => "invalid JSON from the Bot API".to_string(),
        _ => redact(&format!("{e:?}"), token.expose()),
    }
}

/// Retry or not: 429 waits what Telegram asked; network errors, unparsable answers and
/// 5xx (teloxide reports them as unknown API errors) are transient; a user who blocked
/// the bot or never started a private chat with it is unreachable; any other known API
/// error, or an unknown one that names a 4xx (`Bad Request: …`, `Forbidden: …`), is
/// permanent.
fn classify(e: &RequestError, token: &Secret) -> SendError {
    let why = scrub(e, token);
    match e {
        RequestError::RetryAfter(s) => SendError::RetryAfter(s.duration()),
        RequestError::Api(ApiError::BotBlocked | ApiError::CantInitiateConversation) => {
            SendError::Unreachable(why)
        }
        // Telegram's current wording is "Forbidden: bot can't initiate conversation
        // with a user", which teloxide does not know (it expects "Unauthorized: …").
        RequestError::Api(ApiError::Unknown(d)) if refuses_private_chat(d) => {
            SendError::Unreachable(why)
        }
        RequestError::Network(_) | RequestError::Io(_) | RequestError::InvalidJson { .. } => {
            SendError::Transient(why)
        }
        RequestError::Api(ApiError::Unknown(d)) if !names_client_error(d) => {
            SendError::Transient(why)
        }
        _ => SendError::Permanent(why),
    }
}

fn refuses_private_chat(description: &str) -> bool {
    description.starts_with("Forbidden: ")
        && (description.contains("bot can't initiate conversation")
            || description.contains("bot was blocked by the user"))
}

/// The note in a group whose personal answer went to the user's private chat: the
/// user's `@username` (else first name), never the answer.
fn private_note_text(inbound: &Inbound, note: PrivateNote, bot_username: &str) -> String {
    match note {
        PrivateNote::Sent => {
            let name = match &inbound.username {
                Some(u) if !u.is_empty() => format!("@{u}"),
                _ => inbound.user_name.clone(),
            };
            format!("{name}, I've sent you the answer in a private message.")
        }
        PrivateNote::Refused => format!(
            "To get this, open a private chat with me first: https://t.me/{bot_username} and send the command there."
        ),
    }
}

fn names_client_error(description: &str) -> bool {
    [
        "Bad Request",
        "Unauthorized",
        "Forbidden",
        "Not Found",
        "Conflict",
        "Request Entity Too Large",
    ]
    .iter()
    .any(|p| description.starts_with(p))
}

impl TgOut {
    async fn wait(&self, job: &Job) {
        self.throttle
            .wait(&job.chat_id.to_string(), job.is_group)
            .await;
    }

    /// One sendMessage.
    async fn send(
        &self,
        job: &Job,
        text: &str,
        mode: Option<ParseMode>,
        markup: Option<InlineKeyboardMarkup>,
    ) -> Result<(), RequestError> {
        self.wait(job).await;
        let mut req = self.bot.send_message(ChatId(job.chat_id), text.to_string());
        if let Some(mode) = mode {
            req = req.parse_mode(mode);
        }
        if job.is_group {
            let id = MessageId(job.message_id);
            req = req.reply_parameters(ReplyParameters::new(id).allow_sending_without_reply());
        }
        if let Some(m) = markup {
            req = req.reply_markup(m);
        }
        req.await.map(|_| ())
    }

    /// One editMessageText; "not modified" counts as done.
    async fn edit(
        &self,
        job: &Job,
        id: MessageId,
        text: &str,
        mode: Option<ParseMode>,
        markup: Option<InlineKeyboardMarkup>,
    ) -> Result<(), RequestError> {
        self.wait(job).await;
        let mut req = self
            .bot
            .edit_message_text(ChatId(job.chat_id), id, text.to_string());
        if let Some(mode) = mode {
            req = req.parse_mode(mode);
        }
        if let Some(m) = markup {
            req = req.reply_markup(m);
        }
        match req.await {
            Ok(_) | Err(RequestError::Api(ApiError::MessageNotModified)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Outbound for TgOut {
    type Job = Job;
    type MsgId = MessageId;
    /// Telegram shows "typing…" for 5 s per action.
    const PROFILE: Profile = Profile::new("telegram", TG_LIMIT, Duration::from_secs(4));

    fn inbound(job: &Job) -> &Inbound {
        &job.inbound
    }

    fn order(job: &Job) -> u64 {
        job.inbound
            .update_id
            .as_deref()
            .and_then(|id| id.parse().ok())
            .unwrap_or(0)
    }

    fn split(&self, text: &str) -> Vec<String> {
        split_message(text, SPLIT_AT, utf16_len)
    }

    async fn before(&self, job: &Job) {
        if let Some(id) = &job.callback_id {
            // Stops the button's spinner; failure is cosmetic.
            let _ = self
                .bot
                .answer_callback_query(CallbackQueryId(id.clone()))
                .await;
        }
    }

    async fn typing(&self, job: &Job) {
        let _ = self
            .bot
            .send_chat_action(ChatId(job.chat_id), ChatAction::Typing)
            .await;
    }

    async fn draft(&self, job: &Job, id: Option<MessageId>, text: String) -> DraftPut<MessageId> {
        self.wait(job).await;
        let chat = ChatId(job.chat_id);
        let result = match id {
            None => self.bot.send_message(chat, text).await.map(|m| m.id),
            Some(id) => self.bot.edit_message_text(chat, id, text).await.map(|_| id),
        };
        match result {
            Ok(id) => DraftPut::Shown(id),
            Err(RequestError::Api(ApiError::MessageNotModified)) => DraftPut::Unchanged,
            Err(e) => DraftPut::Failed(scrub(&e, &self.token)),
        }
    }

    /// HTML; if Telegram rejects the entities (or the HTML is too long), plain text.
    async fn send_part(&self, job: &Job, part: Part<'_>) -> SendResult<()> {
        let markup = keyboard(part.buttons);
        let html = markdown_to_telegram_html(part.text);
        if utf16_len(&html) <= TG_LIMIT {
            match self
                .send(job, &html, Some(ParseMode::Html), markup.clone())
                .await
            {
                Err(RequestError::Api(ApiError::CantParseEntities(_))) => {
                    tracing::debug!("formatting rejected; resending as plain text");
                }
                other => return other.map_err(|e| classify(&e, &self.token)),
            }
        }
        self.send(job, part.text, None, markup)
            .await
            .map_err(|e| classify(&e, &self.token))
    }

    async fn edit_part(&self, job: &Job, id: MessageId, part: Part<'_>) -> SendResult<()> {
        let markup = keyboard(part.buttons);
        let html = markdown_to_telegram_html(part.text);
        if utf16_len(&html) <= TG_LIMIT {
            match self
                .edit(job, id, &html, Some(ParseMode::Html), markup.clone())
                .await
            {
                Err(RequestError::Api(ApiError::CantParseEntities(_))) => {}
                other => return other.map_err(|e| classify(&e, &self.token)),
            }
        }
        self.edit(job, id, part.text, None, markup)
            .await
            .map_err(|e| classify(&e, &self.token))
    }

    async fn send_file(&self, job: &Job, a: &Attachment) -> SendResult<()> {
        self.wait(job).await;
        let file = InputFile::memory(a.bytes.clone()).file_name(a.file_name.clone());
        if a.voice {
            return self
                .bot
                .send_voice(ChatId(job.chat_id), file)
                .await
                .map(|_| ())
                .map_err(|e| classify(&e, &self.token));
        }
        self.bot
            .send_document(ChatId(job.chat_id), file)
            .caption(a.file_name.clone())
            .await
            .map(|_| ())
            .map_err(|e| classify(&e, &self.token))
    }

    /// A private chat's id is the user's id; no quoting there (the message quoted is
    /// in the group), and a button press was already answered in [`Outbound::before`].
    async fn private_chat(&self, job: &Job) -> SendResult<Job> {
        let user: i64 = job
            .inbound
            .user_id
            .parse()
            .map_err(|_| SendError::Permanent("the user id is not a Telegram id".into()))?;
        Ok(Job {
            inbound: job.inbound.clone(),
            chat_id: user,
            message_id: job.message_id,
            is_group: false,
            callback_id: None,
        })
    }

    /// Plain text (a name may hold `<` or `_`), quoting the user's message.
    async fn private_note(&self, job: &Job, note: PrivateNote) -> SendResult<()> {
        let text = private_note_text(&job.inbound, note, &self.username);
        self.send(job, &text, None, None)
            .await
            .map_err(|e| classify(&e, &self.token))
    }
}

/// The engine's buttons as an inline keyboard (one row); the press sends the command back.
fn keyboard(buttons: &[Button]) -> Option<InlineKeyboardMarkup> {
    if buttons.is_empty() {
        return None;
    }
    let row: Vec<InlineKeyboardButton> = buttons
        .iter()
        .map(|b| InlineKeyboardButton::callback(b.label.clone(), b.command.clone()))
        .collect();
    Some(InlineKeyboardMarkup::new(vec![row]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Content, Platform};

    #[test]
    fn server_errors_are_retried_and_refusals_are_not() {
        let token = Secret::new("7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw".to_string());
        let kind = |e: RequestError| match classify(&e, &token) {
            SendError::RetryAfter(d) => format!("wait {}", d.as_secs()),
            SendError::Transient(_) => "transient".to_string(),
            SendError::Permanent(_) => "permanent".to_string(),
            SendError::Unreachable(_) => "unreachable".to_string(),
        };
        let unknown = |d: &str| RequestError::Api(ApiError::Unknown(d.to_string()));
        assert_eq!(kind(unknown("Bad Gateway")), "transient");
        assert_eq!(kind(unknown("Internal Server Error")), "transient");
        assert_eq!(kind(unknown("Bad Request: something new")), "permanent");
        assert_eq!(kind(RequestError::Api(ApiError::BotBlocked)), "unreachable");
        assert_eq!(
            kind(unknown(
                "Forbidden: bot can't initiate conversation with a user"
            )),
            "unreachable"
        );
        assert_eq!(kind(unknown("Forbidden: bot was kicked")), "permanent");
        assert_eq!(kind(RequestError::Api(ApiError::ChatNotFound)), "permanent");
        let wait = teloxide::types::Seconds::from_seconds(3);
        assert_eq!(kind(RequestError::RetryAfter(wait)), "wait 3");
    }

    #[test]
    fn the_group_note_names_the_user_never_the_answer() {
        let mut inbound = Inbound {
            bot: "assistant".into(),
            platform: Platform::Telegram,
            update_id: Some("1".into()),
            chat_id: "-100".into(),
            user_id: "5".into(),
            user_name: "Gina".into(),
            username: Some("gina_b".into()),
            is_private: false,
            forwarded: false,
            content: Content::Text("/export".into()),
        };
        let sent = "I've sent you the answer in a private message.";
        let note = |i: &Inbound, n| private_note_text(i, n, "acme_bot");
        assert_eq!(
            note(&inbound, PrivateNote::Sent),
            format!("@gina_b, {sent}")
        );
        inbound.username = None;
        assert_eq!(note(&inbound, PrivateNote::Sent), format!("Gina, {sent}"));
        assert_eq!(
            note(&inbound, PrivateNote::Refused),
            "To get this, open a private chat with me first: https://t.me/acme_bot and send the command there."
        );
    }
}
