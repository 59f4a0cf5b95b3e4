//! Voice notes, audio files and images: what the engine needs from an adapter (a
//! [`MediaSource`] that fetches a platform's file), the checks made before anything is
//! downloaded ([`precheck`], pure), and the `confab_media_*` counters.

use std::collections::BTreeMap;
use std::sync::Mutex;

use futures::future::BoxFuture;

use crate::config::MediaConfig;
use crate::domain::{Media, MediaKind};
use crate::events::Counter;

/// Fetches the bytes of a platform's file (Telegram `getFile` + the file URL, a Discord
/// attachment URL). Implemented by each adapter; error texts are already redacted.
pub trait MediaSource: Send + Sync + 'static {
    /// At most `max_bytes`; a larger file is [`FetchError::TooLarge`] (not read on).
    fn fetch<'a>(
        &'a self,
        media: &'a Media,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, FetchError>>;
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the file is larger than the limit")]
    TooLarge,
    /// The download failed (the text names no token or URL).
    #[error("download failed: {0}")]
    Failed(String),
}

/// Appends a downloaded chunk, refusing once the file passes `max_bytes` (a platform
/// may declare no size, or a wrong one: the limit holds while reading).
pub fn append_capped(bytes: &mut Vec<u8>, chunk: &[u8], max_bytes: u64) -> Result<(), FetchError> {
    if (bytes.len() as u64).saturating_add(chunk.len() as u64) > max_bytes {
        return Err(FetchError::TooLarge);
    }
    bytes.extend_from_slice(chunk);
    Ok(())
}

/// Why media is refused before (or instead of) being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaProblem {
    TooLong { secs: u32, max: u32 },
    TooLarge { max_mb: u64 },
    Unsupported,
}

impl MediaProblem {
    /// What the user reads.
    pub fn message(self, kind: MediaKind) -> String {
        let what = match kind {
            MediaKind::Voice => "voice message",
            MediaKind::Audio => "audio file",
            MediaKind::Image => "image",
        };
        match self {
            MediaProblem::TooLong { secs, max } => format!(
                "Your {what} is too long ({secs} s, limit {max} s). Please send a shorter one."
            ),
            MediaProblem::TooLarge { max_mb } => {
                format!("Your {what} is too large (limit {max_mb} MB).")
            }
            MediaProblem::Unsupported => format!("I can't read this {what}'s format."),
        }
    }

    pub fn outcome(self) -> MediaOutcome {
        match self {
            MediaProblem::TooLong { .. } => MediaOutcome::TooLong,
            MediaProblem::TooLarge { .. } => MediaOutcome::TooLarge,
            MediaProblem::Unsupported => MediaOutcome::Unsupported,
        }
    }
}

/// The file name (its extension names the format) a transcription endpoint gets for
/// an audio MIME type; `None` for a format it does not read. No MIME: a voice note
/// (Telegram's are OGG/Opus).
pub fn audio_file_name(mime: Option<&str>) -> Option<&'static str> {
    let Some(mime) = mime else {
        return Some("voice.ogg");
    };
    let essence = mime.split(';').next().unwrap_or("").trim();
    let name = match essence.to_ascii_lowercase().as_str() {
        "audio/ogg" | "audio/opus" | "audio/x-opus+ogg" | "application/ogg" => "voice.ogg",
        "audio/mpeg" | "audio/mp3" | "audio/mpga" => "audio.mp3",
        "audio/mp4" | "audio/m4a" | "audio/x-m4a" | "audio/aac" => "audio.m4a",
        "video/mp4" => "video.mp4",
        "audio/wav" | "audio/x-wav" | "audio/wave" => "audio.wav",
        "audio/webm" | "video/webm" => "audio.webm",
        "audio/flac" | "audio/x-flac" => "audio.flac",
        _ => return None,
    };
    Some(name)
}

/// The image MIME types vision models read.
pub fn image_mime(mime: Option<&str>) -> Option<&'static str> {
    let Some(mime) = mime else {
        return Some("image/jpeg"); // a Telegram photo (always JPEG)
    };
    let essence = mime.split(';').next().unwrap_or("").trim();
    ["image/jpeg", "image/png", "image/webp", "image/gif"]
        .into_iter()
        .find(|m| m.eq_ignore_ascii_case(essence))
}

/// The checks on what the platform declared, before anything is downloaded.
pub fn precheck(media: &Media, cfg: &MediaConfig) -> Result<(), MediaProblem> {
    let supported = match media.kind {
        MediaKind::Image => image_mime(media.mime.as_deref()).is_some(),
        MediaKind::Voice | MediaKind::Audio => audio_file_name(media.mime.as_deref()).is_some(),
    };
    if !supported {
        return Err(MediaProblem::Unsupported);
    }
    if let Some(secs) = media.duration_secs.filter(|_| media.kind.is_audio()) {
        if secs > cfg.max_audio_secs {
            let max = cfg.max_audio_secs;
            return Err(MediaProblem::TooLong { secs, max });
        }
    }
    if media.size.is_some_and(|s| s > cfg.max_download_bytes()) {
        let max_mb = cfg.max_download_mb;
        return Err(MediaProblem::TooLarge { max_mb });
    }
    Ok(())
}

/// Seconds an audio file of `bytes` lasts when the platform did not say: at least 1,
/// counted at 16 kB/s (a generous bitrate for speech, so the budget is not undercounted
/// by much).
pub fn estimated_secs(bytes: usize) -> u64 {
    (bytes as u64 / 16_000).max(1)
}

/// What is spoken of an answer: all of it up to `max` chars, else cut at the last
/// sentence end (or, failing that, word end) in the second half of the first `max`
/// chars, with "…".
pub fn spoken(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let head: String = text.chars().take(max).collect();
    let half = head.len() / 2;
    let cut = head
        .char_indices()
        .rev()
        .find(|(i, c)| *i >= half && matches!(c, '.' | '!' | '?' | '\n'))
        .map(|(i, c)| i + c.len_utf8())
        .or_else(|| head.rfind(char::is_whitespace).filter(|i| *i >= half))
        .unwrap_or(head.len());
    let mut out = head.get(..cut).unwrap_or(&head).trim_end().to_string();
    out.push('…');
    out
}

/// Standard base64 (RFC 4648, padded): images travel as `data:` URLs.
pub fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// How one media message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MediaOutcome {
    /// Audio transcribed (or an image passed to the model).
    Read,
    TooLong,
    TooLarge,
    Unsupported,
    /// The bot's model does not see images.
    NoVision,
    /// The user's daily audio budget is spent.
    Budget,
    /// The download failed.
    FetchFailed,
    /// The transcription endpoint failed (after its retries) or heard nothing.
    TranscriptionFailed,
    /// The answer to a voice question was spoken (`voice_replies = "mirror"`).
    Spoken,
    /// The speech endpoint failed: the text answer went alone, with a note.
    SpeechFailed,
}

impl MediaOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaOutcome::Read => "read",
            MediaOutcome::TooLong => "too_long",
            MediaOutcome::TooLarge => "too_large",
            MediaOutcome::Unsupported => "unsupported",
            MediaOutcome::NoVision => "no_vision",
            MediaOutcome::Budget => "budget",
            MediaOutcome::FetchFailed => "fetch_failed",
            MediaOutcome::TranscriptionFailed => "transcription_failed",
            MediaOutcome::Spoken => "spoken",
            MediaOutcome::SpeechFailed => "speech_failed",
        }
    }
}

/// `confab_media_total{kind,outcome}` and `confab_audio_seconds_total`.
#[derive(Debug, Default)]
pub struct MediaStats {
    counts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Seconds of audio transcribed.
    pub audio_secs: Counter,
}

impl MediaStats {
    /// `(kind, outcome) → count`: every pair seen so far, and each kind's `read` from 0
    /// (so the series is there before the first media message).
    pub fn snapshot(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for kind in [MediaKind::Voice, MediaKind::Audio, MediaKind::Image] {
            let read = MediaOutcome::Read.as_str();
            counts.entry((kind.as_str(), read)).or_default();
        }
        counts
    }

    pub(crate) fn count(&self, kind: MediaKind, outcome: MediaOutcome) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry((kind.as_str(), outcome.as_str())).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn long_answers_are_spoken_up_to_a_sentence_end() {
        assert_eq!(spoken("Short.", 100), "Short.");
        assert_eq!(spoken("Hello there. And more words", 16), "Hello there.…");
        // A sentence end in the first half is too early: the last word end instead.
        assert_eq!(
            spoken("One two. Three four five six.", 20),
            "One two. Three four…"
        );
        assert_eq!(spoken("aaaa bbbb cccc dddd", 12), "aaaa bbbb…");
        assert_eq!(spoken("ééééééééé", 4), "éééé…");
    }

    #[test]
    fn formats() {
        assert_eq!(audio_file_name(None), Some("voice.ogg"));
        assert_eq!(
            audio_file_name(Some("audio/ogg; codecs=opus")),
            Some("voice.ogg")
        );
        assert_eq!(audio_file_name(Some("audio/MPEG")), Some("audio.mp3"));
        assert_eq!(audio_file_name(Some("application/zip")), None);
        assert_eq!(image_mime(Some("image/PNG")), Some("image/png"));
        assert_eq!(image_mime(Some("image/tiff")), None);
    }
}
