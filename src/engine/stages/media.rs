//! The media stage (after admit): a voice note or audio file is checked (length, size,
//! format, the user's daily audio budget), fetched through its adapter's
//! [`MediaSource`](crate::engine::media::MediaSource) and transcribed; an image is
//! checked, fetched and attached to the question as an image part. What comes back is
//! the text that stands for the message in the rest of the pipeline.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::admit::todays_usage;
use super::{stop, MessageCtx, Step};
use crate::domain::{Attachment, Media, MediaKind, Rejection, Reply, ReplyKind};
use crate::engine::events::{LlmFailed, MediaHandled};
use crate::engine::limits::{human_duration, utc_day};
use crate::engine::media::{self, FetchError, MediaOutcome};
use crate::engine::{now_unix, roll_day, Engine, MSG_BUSY, MSG_LLM_UNAVAILABLE};
use crate::events::Event;
use crate::llm::{LlmError, Speech, Transcription};

/// The question sent with an image that came without a caption.
pub(crate) const IMAGE_QUESTION: &str = "What is in this image?";
const MSG_NO_VISION: &str = "This bot cannot see images. Please describe what you need in words.";
const MSG_FETCH_FAILED: &str = "I couldn't download your file. Please try sending it again.";
const MSG_TRANSCRIPTION_FAILED: &str =
    "Sorry, I couldn't transcribe your voice message right now. Please try again in a moment.";
const MSG_NOTHING_HEARD: &str = "I couldn't make out any words in that voice message.";
const MSG_NOT_SPOKEN: &str = "\n\n(I couldn't record a voice reply this time.)";

impl Engine {
    /// Media: the text that stands for a media message (its transcript, or an image's
    /// caption with the image attached to `m`), or a notice.
    #[tracing::instrument(level = "debug", name = "media", skip_all)]
    pub(super) async fn media(&self, m: &mut MessageCtx<'_>, media: &Media) -> Step<String> {
        if let Err(problem) = media::precheck(media, &m.cfg.media) {
            return self.refuse(media.kind, problem.outcome(), problem.message(media.kind));
        }
        if media.kind == MediaKind::Image {
            return self.image(m, media).await;
        }
        let declared = media.duration_secs.map(u64::from);
        if !m.admin {
            self.audio_budget(m, media.kind, declared.unwrap_or(1))?;
        }
        let bytes = self.fetch(m, media).await?;
        let secs = declared.unwrap_or_else(|| media::estimated_secs(bytes.len()));
        let request = Transcription {
            model: m.cfg.media.transcription_model.clone(),
            file_name: media::audio_file_name(media.mime.as_deref())
                .unwrap_or("voice.ogg")
                .to_string(),
            bytes: Arc::new(bytes),
        };
        let billed = self.llm.transcribe(request).await;
        let heard = match billed.result {
            Ok(text) => text.trim().to_string(),
            Err(e) => return self.transcription_failed(media.kind, e),
        };
        // The endpoint did the work: the seconds count, heard or not.
        self.store.update_user(&m.user, &mut |r| {
            roll_day(r, utc_day(now_unix()));
            r.usage.audio_secs += secs;
            r.usage.total_audio_secs += secs;
        })?;
        if heard.is_empty() {
            let outcome = MediaOutcome::TranscriptionFailed;
            return self.refuse(media.kind, outcome, MSG_NOTHING_HEARD.into());
        }
        let (kind, outcome, audio_secs) = (media.kind, MediaOutcome::Read, secs);
        MediaHandled {
            kind,
            outcome,
            audio_secs,
        }
        .emit(&self.stats);
        Ok(heard)
    }

    /// An image for a bot whose model sees: attached as an image part; the question is
    /// its caption. The bytes are never stored: memory keeps the caption and `[image]`.
    async fn image(&self, m: &mut MessageCtx<'_>, media: &Media) -> Step<String> {
        if !m.bot.vision {
            let outcome = MediaOutcome::NoVision;
            return self.refuse(media.kind, outcome, MSG_NO_VISION.into());
        }
        let bytes = self.fetch(m, media).await?;
        let mime = media::image_mime(media.mime.as_deref()).unwrap_or("image/jpeg");
        m.image_sha = Some(Sha256::digest(&bytes).into());
        m.images
            .push(format!("data:{mime};base64,{}", media::base64(&bytes)));
        self.store
            .update_user(&m.user, &mut |r| r.usage.total_images += 1)?;
        let (kind, outcome, audio_secs) = (media.kind, MediaOutcome::Read, 0);
        MediaHandled {
            kind,
            outcome,
            audio_secs,
        }
        .emit(&self.stats);
        let caption = media.caption.as_deref().map(str::trim).unwrap_or("");
        Ok(match caption {
            "" => IMAGE_QUESTION.to_string(),
            c => c.to_string(),
        })
    }

    /// The file's bytes from its adapter, at most `max_download_mb`.
    async fn fetch(&self, m: &MessageCtx<'_>, media: &Media) -> Step<Vec<u8>> {
        let cfg = &m.cfg.media;
        let source = self.media_source(m.inbound.platform, &m.inbound.bot);
        let fetched = match source {
            Some(source) => source.fetch(media, cfg.max_download_bytes()).await,
            None => Err(FetchError::Failed(
                "no media source for this adapter".into(),
            )),
        };
        match fetched {
            Ok(bytes) => Ok(bytes),
            Err(FetchError::TooLarge) => {
                let problem = media::MediaProblem::TooLarge {
                    max_mb: cfg.max_download_mb,
                };
                self.refuse(media.kind, problem.outcome(), problem.message(media.kind))
            }
            Err(FetchError::Failed(e)) => {
                tracing::warn!(kind = media.kind.as_str(), error = %e, "media download failed");
                let outcome = MediaOutcome::FetchFailed;
                self.refuse(media.kind, outcome, MSG_FETCH_FAILED.into())
            }
        }
    }

    /// Goes on while the user has audio seconds left today; else one notice per day.
    fn audio_budget(&self, m: &MessageCtx<'_>, kind: MediaKind, secs: u64) -> Step {
        let limit = m.cfg.limits.daily_audio_secs;
        let now = now_unix();
        let today = utc_day(now);
        let usage = todays_usage(m, today);
        if usage.map_or(0, |u| u.audio_secs).saturating_add(secs) <= limit {
            return Ok(());
        }
        let (outcome, audio_secs) = (MediaOutcome::Budget, 0);
        MediaHandled {
            kind,
            outcome,
            audio_secs,
        }
        .emit(&self.stats);
        let notified = usage.is_some_and(|u| u.audio_notified);
        self.day_spent(m, notified, |u| u.audio_notified = true, |reset| {
            format!(
                "You've used today's voice budget ({} of audio). It resets in {} (midnight UTC); you can still type.",
                human_duration(limit),
                human_duration(reset)
            )
        })
    }

    /// Voice out: an answer to a voice question, also spoken and attached as a voice
    /// message. A speech failure sends the text alone, with a note.
    pub(super) async fn voice_reply(&self, m: &MessageCtx<'_>, reply: Reply) -> Reply {
        let answered = matches!(
            &reply,
            Reply::Text {
                kind: ReplyKind::Answer | ReplyKind::Cached,
                ..
            }
        );
        let Some(text) = reply.as_text().filter(|_| answered) else {
            return reply;
        };
        let cfg = &m.cfg.media;
        let request = Speech {
            model: cfg.speech_model.clone(),
            voice: cfg.speech_voice.clone(),
            format: cfg.response_format.clone(),
            input: media::spoken(text, cfg.max_spoken_chars),
        };
        let kind = MediaKind::Voice;
        match self.llm.speak(request).await.result {
            Ok(bytes) => {
                let (outcome, audio_secs) = (MediaOutcome::Spoken, 0);
                MediaHandled {
                    kind,
                    outcome,
                    audio_secs,
                }
                .emit(&self.stats);
                let ext = if cfg.response_format == "mp3" {
                    "mp3"
                } else {
                    "ogg"
                };
                reply.with_attachment(Attachment {
                    file_name: format!("voice-reply.{ext}"),
                    bytes,
                    voice: true,
                })
            }
            Err(error) => {
                let (outcome, audio_secs) = (MediaOutcome::SpeechFailed, 0);
                MediaHandled {
                    kind,
                    outcome,
                    audio_secs,
                }
                .emit(&self.stats);
                tracing::warn!(error = %error, "speech failed; the answer goes as text only");
                reply.suffixed(MSG_NOT_SPOKEN)
            }
        }
    }

    fn transcription_failed<T>(&self, kind: MediaKind, error: LlmError) -> Step<T> {
        let (outcome, audio_secs) = (MediaOutcome::TranscriptionFailed, 0);
        MediaHandled {
            kind,
            outcome,
            audio_secs,
        }
        .emit(&self.stats);
        match error {
            LlmError::CircuitOpen => stop(Reply::notice(
                Rejection::LlmUnavailable,
                MSG_LLM_UNAVAILABLE,
            )),
            LlmError::Busy => stop(Reply::notice(Rejection::Busy, MSG_BUSY)),
            error => {
                LlmFailed { error: &error }.emit(&self.stats);
                stop(Reply::notice(
                    Rejection::LlmFailed,
                    MSG_TRANSCRIPTION_FAILED,
                ))
            }
        }
    }

    fn refuse<T>(&self, kind: MediaKind, outcome: MediaOutcome, text: String) -> Step<T> {
        let audio_secs = 0;
        MediaHandled {
            kind,
            outcome,
            audio_secs,
        }
        .emit(&self.stats);
        stop(Reply::notice(Rejection::Media, text))
    }
}
