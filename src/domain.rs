//! Platform-neutral message types shared by adapters and the engine (no SDK types here).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a message came from. `Terminal` is `confab chat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Telegram,
    Discord,
    Terminal,
}

impl Platform {
    /// Short prefix used in user references (`tg:123`, `dc:456`, `cli:local`).
    pub fn prefix(self) -> &'static str {
        match self {
            Platform::Telegram => "tg",
            Platform::Discord => "dc",
            Platform::Terminal => "cli",
        }
    }

    /// The platform whose [`Platform::prefix`] is `prefix`.
    pub fn from_prefix(prefix: &str) -> Option<Platform> {
        [Platform::Telegram, Platform::Discord, Platform::Terminal]
            .into_iter()
            .find(|p| p.prefix() == prefix)
    }

    pub fn name(self) -> &'static str {
        match self {
            Platform::Telegram => "telegram",
            Platform::Discord => "discord",
            Platform::Terminal => "terminal",
        }
    }

    /// Longest message the platform accepts, in characters.
    pub fn message_limit(self) -> usize {
        match self {
            Platform::Telegram => 4096,
            Platform::Discord => 2000,
            Platform::Terminal => usize::MAX,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A user on one platform, written `tg:<id>` / `dc:<id>` / `cli:<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UserRef {
    pub platform: Platform,
    pub id: String,
}

impl UserRef {
    pub fn new(platform: Platform, id: impl Into<String>) -> Self {
        Self {
            platform,
            id: id.into(),
        }
    }
}

impl fmt::Display for UserRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.platform.prefix(), self.id)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a user reference (expected tg:<id> or dc:<id>): {0:?}")]
pub struct BadUserRef(pub String);

impl FromStr for UserRef {
    type Err = BadUserRef;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadUserRef(s.to_string());
        let (prefix, id) = s.split_once(':').ok_or_else(bad)?;
        let platform = Platform::from_prefix(prefix).ok_or_else(bad)?;
        let numeric_ok = platform == Platform::Terminal || id.chars().all(|c| c.is_ascii_digit());
        if id.is_empty() || !numeric_ok || id.len() > 64 {
            return Err(bad());
        }
        Ok(UserRef::new(platform, id))
    }
}

/// One conversation: a bot talking with one user in one chat.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConversationKey {
    pub bot: String,
    pub platform: Platform,
    pub chat: String,
    pub user: String,
}

impl ConversationKey {
    pub fn user_ref(&self) -> UserRef {
        UserRef::new(self.platform, self.user.clone())
    }
}

impl fmt::Display for ConversationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.bot,
            self.platform.prefix(),
            self.chat,
            self.user
        )
    }
}

/// What the adapter saw, normalised.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Content {
    Text(String),
    /// A voice note, an audio file or an image, fetched and read by the engine.
    Media(Media),
    /// Sticker, video, other files, or an empty message.
    NonText,
}

/// What a media message is, as far as the engine cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaKind {
    /// A voice note (Telegram `voice` / `video_note`, a Discord voice message).
    Voice,
    /// An audio file (Telegram `audio`, a Discord audio attachment).
    Audio,
    /// A photo or an image file.
    Image,
}

impl MediaKind {
    /// Label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Voice => "voice",
            MediaKind::Audio => "audio",
            MediaKind::Image => "image",
        }
    }

    pub fn is_audio(self) -> bool {
        matches!(self, MediaKind::Voice | MediaKind::Audio)
    }
}

/// A media message as the platform declared it; the bytes are fetched only when the
/// engine decides to (after the size, length and budget checks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Media {
    pub kind: MediaKind,
    /// The platform's reference: a Telegram `file_id`, a Discord attachment URL.
    pub file: String,
    /// Declared size in bytes.
    pub size: Option<u64>,
    /// Declared duration in seconds (audio).
    pub duration_secs: Option<u32>,
    /// Declared MIME type.
    pub mime: Option<String>,
    /// The text sent with it (a caption; a Discord message's text).
    pub caption: Option<String>,
}

/// One inbound message, already translated from the platform's SDK type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inbound {
    /// Name of the bot (file stem in `bots/`).
    pub bot: String,
    pub platform: Platform,
    /// Platform update/message id; used to drop redeliveries. `None` = never deduplicated.
    pub update_id: Option<String>,
    pub chat_id: String,
    pub user_id: String,
    /// Display name for the prompt template (`{{user_name}}`).
    pub user_name: String,
    /// `@username` where the platform has one (lets admins refer to users by it).
    pub username: Option<String>,
    /// Private chat (DM); in groups, non-text input is ignored silently.
    pub is_private: bool,
    /// Forwarded from someone else (Telegram `forward_origin`): its text is never run as
    /// a command, so an admin forwarding `/admin …` does not execute it.
    #[serde(default)]
    pub forwarded: bool,
    pub content: Content,
}

impl Inbound {
    pub fn conversation(&self) -> ConversationKey {
        ConversationKey {
            bot: self.bot.clone(),
            platform: self.platform,
            chat: self.chat_id.clone(),
            user: self.user_id.clone(),
        }
    }

    pub fn user(&self) -> UserRef {
        UserRef::new(self.platform, self.user_id.clone())
    }
}

/// Why the engine answered with a notice instead of an LLM reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    TooLong,
    NonText,
    /// A media message that cannot be used (too large or long, unsupported, not fetched).
    Media,
    RateLimited,
    BudgetExhausted,
    Banned,
    Maintenance,
    LlmUnavailable,
    LlmFailed,
    NotAdmin,
    BadCommand,
    /// Every LLM slot stayed taken (or this user already has a call in flight) too long.
    Busy,
    /// Our own failure (store, prompt rendering), not the LLM's.
    Internal,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::TooLong => "too_long",
            Rejection::NonText => "non_text",
            Rejection::Media => "media",
            Rejection::RateLimited => "rate_limited",
            Rejection::BudgetExhausted => "budget_exhausted",
            Rejection::Banned => "banned",
            Rejection::Maintenance => "maintenance",
            Rejection::LlmUnavailable => "llm_unavailable",
            Rejection::LlmFailed => "llm_failed",
            Rejection::NotAdmin => "not_admin",
            Rejection::BadCommand => "bad_command",
            Rejection::Busy => "busy",
            Rejection::Internal => "internal",
        }
    }
}

/// How a reply came about; used for metrics and by adapters (e.g. formatting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyKind {
    /// Fresh answer from the LLM.
    Answer,
    /// Answer served from the response cache.
    Cached,
    /// A command's output.
    Command,
    /// A short notice telling the user why nothing else happened.
    Notice(Rejection),
}

/// A file the adapter should attach (e.g. `/export`).
#[derive(Debug, Clone)]
pub struct Attachment {
    pub file_name: String,
    pub bytes: Vec<u8>,
    /// A spoken answer: sent as a voice message where the platform has them.
    pub voice: bool,
}

/// A button under a reply (Telegram inline keyboard, Discord component). Pressing it
/// is the same as the user typing `command`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Button {
    pub label: String,
    pub command: String,
}

/// What an adapter renders of a [`Reply::Text`] (see [`Reply::rendered`]).
#[derive(Debug, Clone, Copy)]
pub struct Rendered<'a> {
    pub text: &'a str,
    pub attachment: Option<&'a Attachment>,
    pub buttons: &'a [Button],
}

/// Who may read a reply. The engine decides; adapters render it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Visibility {
    /// Where the message came from (the chat, group or channel).
    #[default]
    Public,
    /// Only the user who asked: in a group it goes to their DM (or says how to open
    /// one); on Discord it is ephemeral. `/export`, `/usage`, `/forget`, every `/admin`.
    Personal,
}

/// The engine's decision for one inbound message.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Send this text (the adapter splits and formats it).
    Text {
        text: String,
        kind: ReplyKind,
        attachment: Option<Attachment>,
        buttons: Vec<Button>,
        visibility: Visibility,
    },
    /// Send nothing (duplicate update, repeated over-limit message, non-text in a group).
    Silent,
}

impl Reply {
    pub fn text(text: impl Into<String>, kind: ReplyKind) -> Self {
        Reply::Text {
            text: text.into(),
            kind,
            attachment: None,
            buttons: Vec::new(),
            visibility: Visibility::Public,
        }
    }

    /// The same reply, for the asking user's eyes only.
    pub fn personal(mut self) -> Self {
        if let Reply::Text { visibility, .. } = &mut self {
            *visibility = Visibility::Personal;
        }
        self
    }

    /// What an adapter sends: the text, its buttons and file (`None` for `Silent`).
    pub fn rendered(&self) -> Option<Rendered<'_>> {
        match self {
            Reply::Text {
                text,
                attachment,
                buttons,
                ..
            } => Some(Rendered {
                text,
                attachment: attachment.as_ref(),
                buttons,
            }),
            Reply::Silent => None,
        }
    }

    /// Who may read it (`Public` for `Silent`).
    pub fn visibility(&self) -> Visibility {
        match self {
            Reply::Text { visibility, .. } => *visibility,
            Reply::Silent => Visibility::Public,
        }
    }

    /// The same reply with `prefix` before its text (`Silent` stays silent).
    pub fn prefixed(mut self, prefix: &str) -> Self {
        if let Reply::Text { text, .. } = &mut self {
            text.insert_str(0, prefix);
        }
        self
    }

    /// The same reply with `suffix` after its text (`Silent` stays silent).
    pub fn suffixed(mut self, suffix: &str) -> Self {
        if let Reply::Text { text, .. } = &mut self {
            text.push_str(suffix);
        }
        self
    }

    /// The same reply with a file (`Silent` stays silent).
    pub fn with_attachment(mut self, file: Attachment) -> Self {
        if let Reply::Text { attachment, .. } = &mut self {
            *attachment = Some(file);
        }
        self
    }

    pub fn notice(reason: Rejection, text: impl Into<String>) -> Self {
        Reply::text(text, ReplyKind::Notice(reason))
    }

    /// The text to send, if any.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Reply::Text { text, .. } => Some(text),
            Reply::Silent => None,
        }
    }

    /// Label for metrics: `answer`, `cached`, `command`, the rejection, or `silent`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Reply::Text { kind, .. } => match kind {
                ReplyKind::Answer => "answer",
                ReplyKind::Cached => "cached",
                ReplyKind::Command => "command",
                ReplyKind::Notice(r) => r.as_str(),
            },
            Reply::Silent => "silent",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Option<&str>) {
        let got = input.parse::<UserRef>().ok().map(|u| u.to_string());
        assert_eq!(got.as_deref(), expected, "input {input:?}");
    }

    #[test]
    fn parses_user_refs() {
        check("tg:123", Some("tg:123"));
        check("dc:987654321012345678", Some("dc:987654321012345678"));
        check("cli:alice", Some("cli:alice"));
        check("tg:", None);
        check("tg:12a", None);
        check("xx:1", None);
        check("123", None);
    }
}
