//! Discord's media: audio attachments (voice messages included) and image attachments
//! become [`Media`] (the attachment URL as the reference), and [`DcMedia`] fetches an
//! attachment — only from Discord's CDN or under the configured `api_url` (the fake).

use std::time::Duration;

use futures::future::BoxFuture;
use serenity::model::channel::Message;

use crate::domain::{Media, MediaKind};
use crate::engine::media::{self, FetchError, MediaSource};

/// Where Discord serves attachments.
const CDN: [&str; 2] = [
    "https://cdn.discordapp.com/",
    "https://media.discordapp.net/",
];

/// The first audio or image attachment of a message, with the message's text as its
/// caption.
pub(super) fn of_message(msg: &Message, text: &str) -> Option<Media> {
    msg.attachments.iter().find_map(|a| {
        let mime = a.content_type.clone()?;
        let kind = if mime.starts_with("audio/") {
            match a.duration_secs {
                Some(_) => MediaKind::Voice,
                None => MediaKind::Audio,
            }
        } else if mime.starts_with("image/") {
            MediaKind::Image
        } else {
            return None;
        };
        let secs = a.duration_secs.filter(|s| s.is_finite() && *s >= 0.0);
        Some(Media {
            kind,
            file: a.url.clone(),
            size: Some(u64::from(a.size)),
            // Rounded up: a 0.4 s note is 1 s of the budget.
            duration_secs: secs.map(|s| s.ceil().min(f64::from(u32::MAX)) as u32),
            mime: Some(mime),
            caption: Some(text.trim().to_string()).filter(|t| !t.is_empty()),
        })
    })
}

/// Fetches attachments (they need no token).
pub(super) struct DcMedia {
    client: reqwest::Client,
    /// URL prefixes attachments may come from.
    allowed: Vec<String>,
}

impl DcMedia {
    /// `api_url`: the configured Discord URL; a non-default one (a fake, a proxy) may
    /// serve attachments too.
    pub(super) fn new(api_url: &str) -> Self {
        let mut allowed: Vec<String> = CDN.iter().map(|s| s.to_string()).collect();
        allowed.push(format!("{}/", api_url.trim_end_matches('/')));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_default();
        DcMedia { client, allowed }
    }

    async fn download(&self, media: &Media, max_bytes: u64) -> Result<Vec<u8>, FetchError> {
        if !self
            .allowed
            .iter()
            .any(|p| media.file.starts_with(p.as_str()))
        {
            return Err(FetchError::Failed("attachment URL outside Discord".into()));
        }
        // Error texts drop the URL: a signed attachment URL is nobody's business.
        let failed = |e: reqwest::Error| FetchError::Failed(e.without_url().to_string());
        let mut resp = self.client.get(&media.file).send().await.map_err(failed)?;
        let resp_status = resp.status();
        if !resp_status.is_success() {
            return Err(FetchError::Failed(format!("HTTP {}", resp_status.as_u16())));
        }
        if resp.content_length().is_some_and(|n| n > max_bytes) {
            return Err(FetchError::TooLarge);
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(failed)? {
            media::append_capped(&mut bytes, &chunk, max_bytes)?;
        }
        Ok(bytes)
    }
}

impl MediaSource for DcMedia {
    fn fetch<'a>(
        &'a self,
        media: &'a Media,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, FetchError>> {
        Box::pin(self.download(media, max_bytes))
    }
}
