//! One message through the engine as named stages (SPEC §6):
//! dedupe → gate → command → admit → context → cache → call → record.
//!
//! Every stage is a method of [`Engine`] over one [`MessageCtx`]. A stage either lets
//! the message go on (`Ok`) or stops it with [`Stop`]: a decided reply (a notice, a
//! command's answer, silence) or an internal failure. [`Engine::decide`] is the whole
//! sequence; read it first.

mod admit;
mod answer;
mod call;
mod media;

use tokio::sync::watch;

use super::events::{InternalCause, InternalError};
use super::Engine;
use crate::config::{BotConfig, Config, VoiceReplies};
use crate::domain::{Content, Inbound, Reply, ReplyKind, UserRef};
use crate::engine::prompt::Prompts;
use crate::events::Event;
use crate::llm::ChatMessage;
use crate::store::{StoreError, UserRecord};

/// Why the pipeline stopped before its last stage.
pub(super) enum Stop {
    /// A stage decided the reply: a notice, a command's answer, silence.
    Reply(Reply),
    /// Our own failure (not the user's, not the LLM's): the internal-error notice.
    Internal(Internal),
}

/// What failed inside confab itself.
#[derive(Debug)]
pub(super) enum Internal {
    /// The store could not be read or written.
    Store(StoreError),
    /// The bot's system prompt did not render.
    Prompt(String),
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop::Internal(Internal::Store(e))
    }
}

/// A stage's result: go on with `T`, or stop.
pub(super) type Step<T = ()> = Result<T, Stop>;

/// Stops with `reply` (a notice, silence, a command's answer).
pub(super) fn stop<T>(reply: Reply) -> Step<T> {
    Err(Stop::Reply(reply))
}

/// Model and sampling parameters of a bot (its overrides, else the `[llm]` defaults).
#[derive(Default)]
pub(super) struct Sampling {
    pub model: String,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    /// Publish partial text as it arrives (the bot streams and the adapter listens).
    pub stream: bool,
}

/// One message on its way through the stages. Stages fill in the later fields.
pub(super) struct MessageCtx<'a> {
    pub inbound: &'a Inbound,
    /// Where a streaming bot publishes the text so far.
    pub partial: Option<&'a watch::Sender<String>>,
    pub cfg: &'a Config,
    pub prompts: &'a Prompts,
    pub bot: &'a BotConfig,
    /// The durable id of the update (`None` for the terminal chat).
    pub update_key: Option<String>,
    pub user: UserRef,
    pub admin: bool,
    /// The user's stored record (gate).
    pub record: Option<UserRecord>,
    /// The message's text (gate; a non-text message stops there).
    pub text: &'a str,
    /// Model and sampling parameters (context).
    pub sampling: Sampling,
    /// The rendered system prompt and its token count (context).
    pub system: std::sync::Arc<str>,
    pub system_tokens: usize,
    /// Tokens of the user's message (context).
    pub user_tokens: usize,
    /// Tokens the history may take; halved once on a context-length error (call).
    pub history_budget: usize,
    /// Tokens of the history actually loaded (context).
    pub history_tokens: u64,
    /// The history as chat messages, oldest first (context).
    pub history: Vec<ChatMessage>,
    /// The response-cache key (context; `None` when the cache is off).
    pub cache_key: Option<[u8; 32]>,
    /// The context-length retry was used (call).
    pub tried_shorter: bool,
    /// Images sent with the question, as `data:` URLs (media; never stored).
    pub images: Vec<String>,
    /// SHA-256 of the image (media): part of the cache key.
    pub image_sha: Option<[u8; 32]>,
}

impl MessageCtx<'_> {
    /// The prompt's size as we count it: system prompt, history and question.
    pub fn prompt_estimate(&self) -> u64 {
        (self.system_tokens + self.user_tokens) as u64 + self.history_tokens
    }
}

/// A reply text ready to be recorded (call, or a cache hit).
pub(super) struct Answer {
    pub text: String,
    /// Tokens of the reply itself (kept with its stored turn).
    pub reply_tokens: u64,
    /// Tokens charged to the user: the call, plus failed attempts; 0 for a cache hit.
    pub cost: u64,
    /// [`ReplyKind::Answer`] or [`ReplyKind::Cached`].
    pub kind: ReplyKind,
}

impl Engine {
    /// The pipeline of one message. A stored reply to a redelivered update comes back
    /// without a new LLM call; everything else runs the stages in order.
    pub(super) async fn decide(
        &self,
        inbound: &Inbound,
        partial: Option<&watch::Sender<String>>,
    ) -> Step<Reply> {
        let update_key = Self::update_key(inbound);
        self.dedupe(update_key.as_deref())?;
        let settings = self.settings();
        let Some(bot) = settings.config.bot(&inbound.bot) else {
            let cause = InternalCause::UnknownBot;
            InternalError {
                cause,
                error: &inbound.bot,
            }
            .emit(&self.stats);
            return stop(Reply::Silent);
        };
        let heard: String;
        let mut m = self.begin(inbound, partial, &settings, bot, update_key);
        self.gate(&mut m)?;
        self.route(&m).await?; // the command stage: a command runs and stops here
        self.admit(&m).await?;
        let (mut echo, mut speak) = (None, false);
        if let Content::Media(media) = &inbound.content {
            heard = self.media(&mut m, media).await?;
            m.text = &heard;
            self.length_gate(&m)?;
            let show = media.kind.is_audio() && m.cfg.media.show_transcript;
            echo = show.then(|| format!("🎤 {heard}\n\n"));
            speak = media.kind.is_audio() && m.bot.voice_replies == VoiceReplies::Mirror;
        }
        self.context(&mut m)?;
        // A context-length error comes back once for a shorter history.
        let answer = loop {
            self.history(&mut m)?;
            if let Some(hit) = self.cache(&m)? {
                break hit;
            }
            if let Some(answer) = self.call(&mut m).await? {
                break answer;
            }
        };
        let mut reply = self.record(&m, answer).await?;
        if speak {
            reply = self.voice_reply(&m, reply).await;
        }
        Ok(match echo {
            Some(echo) => reply.prefixed(&echo),
            None => reply,
        })
    }

    /// The context of a message that is not a redelivery.
    fn begin<'a>(
        &self,
        inbound: &'a Inbound,
        partial: Option<&'a watch::Sender<String>>,
        settings: &'a super::Settings,
        bot: &'a BotConfig,
        update_key: Option<String>,
    ) -> MessageCtx<'a> {
        let user = inbound.user();
        MessageCtx {
            inbound,
            partial,
            cfg: &settings.config,
            prompts: &settings.prompts,
            bot,
            update_key,
            admin: self.is_admin(&user),
            user,
            record: None,
            text: "",
            system: "".into(),
            system_tokens: 0,
            user_tokens: 0,
            history_budget: 0,
            history_tokens: 0,
            history: Vec::new(),
            sampling: Sampling::default(),
            cache_key: None,
            tried_shorter: false,
            images: Vec::new(),
            image_sha: None,
        }
    }
}
