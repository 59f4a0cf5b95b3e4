//! `[media]`: sizes, lengths and the transcription model.

use super::Check;
use crate::config::MediaConfig;

/// OpenAI's transcription endpoint takes files up to 25 MB; more is never useful here.
const MAX_DOWNLOAD_MB: u64 = 100;
/// Four hours: longer is not a voice note.
const MAX_AUDIO_SECS: u64 = 4 * 3_600;

pub(super) fn media(m: MediaConfig, c: &mut Check<'_>) -> MediaConfig {
    c.each_at_least_one(
        "media",
        &[
            ("max_audio_secs", u64::from(m.max_audio_secs)),
            ("max_download_mb", m.max_download_mb),
        ],
    );
    c.each_at_most(
        "media",
        &[
            (
                "max_audio_secs",
                u64::from(m.max_audio_secs),
                MAX_AUDIO_SECS,
            ),
            ("max_download_mb", m.max_download_mb, MAX_DOWNLOAD_MB),
        ],
    );
    for (key, value) in [
        ("transcription_model", &m.transcription_model),
        ("speech_model", &m.speech_model),
        ("speech_voice", &m.speech_voice),
    ] {
        if value.trim().is_empty() {
            c.push(&format!("media.{key}"), "must not be empty");
        }
    }
    let formats = [("opus", ()), ("mp3", ())];
    c.one_of("media.response_format", &m.response_format, &formats);
    c.at_least_one("media.max_spoken_chars", m.max_spoken_chars);
    // OpenAI's speech endpoint reads at most 4096 characters.
    c.at_most("media.max_spoken_chars", m.max_spoken_chars as u64, 4_096);
    m
}
