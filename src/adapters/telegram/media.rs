//! Telegram's media: voice notes, audio files, video notes, photos and image documents
//! become [`Media`] (declared size, duration, MIME type; the `file_id` as the
//! reference), and [`TgMedia`] fetches a file with `getFile` and the file URL under the
//! configured `api_url` (so the test fake serves it too).

use futures::future::BoxFuture;
use futures::StreamExt;
use teloxide::net::Download;
use teloxide::requests::Requester;
use teloxide::types::{FileId, Message};
use teloxide::Bot;

use super::scrub;
use crate::adapters::redact;
use crate::config::Secret;
use crate::domain::{Media, MediaKind};
use crate::engine::media::{self, FetchError, MediaSource};

/// The media of a message, if it carries one the engine reads (the largest photo size).
pub(super) fn of_message(msg: &Message) -> Option<Media> {
    let caption = msg.caption().map(str::to_string);
    let media = |kind, file: &FileId, size: u32, secs: Option<u32>, mime: Option<String>| Media {
        kind,
        file: file.0.clone(),
        size: Some(u64::from(size)),
        duration_secs: secs,
        mime,
        caption: caption.clone(),
    };
    if let Some(v) = msg.voice() {
        let mime = v.mime_type.as_ref().map(ToString::to_string);
        let secs = Some(v.duration.seconds());
        return Some(media(MediaKind::Voice, &v.file.id, v.file.size, secs, mime));
    }
    if let Some(v) = msg.video_note() {
        let mime = Some("video/mp4".to_string());
        let secs = Some(v.duration.seconds());
        return Some(media(MediaKind::Voice, &v.file.id, v.file.size, secs, mime));
    }
    if let Some(a) = msg.audio() {
        let mime = a.mime_type.as_ref().map(ToString::to_string);
        let secs = Some(a.duration.seconds());
        return Some(media(MediaKind::Audio, &a.file.id, a.file.size, secs, mime));
    }
    if let Some(p) = msg
        .photo()
        .and_then(|sizes| sizes.iter().max_by_key(|p| p.file.size))
    {
        return Some(media(MediaKind::Image, &p.file.id, p.file.size, None, None));
    }
    let d = msg.document()?;
    let mime = d.mime_type.as_ref().map(ToString::to_string)?;
    let kind = if mime.starts_with("image/") {
        MediaKind::Image
    } else if mime.starts_with("audio/") {
        MediaKind::Audio
    } else {
        return None;
    };
    Some(media(kind, &d.file.id, d.file.size, None, Some(mime)))
}

/// Fetches a bot's files: `getFile`, then the file's bytes, at most `max_bytes`.
pub(super) struct TgMedia {
    pub bot: Bot,
    pub token: Secret,
}

impl TgMedia {
    async fn download(&self, media: &Media, max_bytes: u64) -> Result<Vec<u8>, FetchError> {
        let file = self
            .bot
            .get_file(FileId(media.file.clone()))
            .await
            .map_err(|e| FetchError::Failed(scrub(&e, &self.token)))?;
        if u64::from(file.meta.size) > max_bytes {
            return Err(FetchError::TooLarge);
        }
        let mut stream = self.bot.download_file_stream(&file.path);
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| FetchError::Failed(redact(&e.to_string(), self.token.expose())))?;
            media::append_capped(&mut bytes, &chunk, max_bytes)?;
        }
        Ok(bytes)
    }
}

impl MediaSource for TgMedia {
    fn fetch<'a>(
        &'a self,
        media: &'a Media,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, FetchError>> {
        Box::pin(self.download(media, max_bytes))
    }
}
