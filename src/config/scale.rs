//! Scale-out settings of the platforms (SPEC §14): how Telegram updates come in
//! (`[telegram] mode`, the webhook keys) and which Discord shards this instance runs
//! (`[discord] shards`). Validated in `validate/scale.rs`.

use std::net::SocketAddr;

use super::Secret;

/// How Telegram updates reach this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TelegramMode {
    /// Long polling with getUpdates (the default).
    Polling,
    /// Telegram POSTs each update to our HTTPS endpoint (setWebhook at start).
    Webhook(WebhookConfig),
}

/// `[telegram] mode = "webhook"`: one local HTTP server for every Telegram bot; each
/// bot is served at `<path of webhook_url>/telegram/<bot>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// The public base URL Telegram calls, without a trailing `/` (https in production).
    pub url: String,
    /// Where the local server listens (behind the load balancer / TLS terminator).
    pub bind: SocketAddr,
    /// Name of the env var holding the `X-Telegram-Bot-Api-Secret-Token` value.
    pub secret_env: String,
    /// The secret itself (from the environment); `None` only where no command needs it.
    pub secret: Option<Secret>,
}

impl WebhookConfig {
    /// The local path of `bot`'s endpoint: the public URL's path + `/telegram/<bot>`,
    /// so a load balancer can forward the path unchanged.
    pub fn path(&self, bot: &str) -> String {
        let after_scheme = self.url.split_once("://").map_or("", |(_, rest)| rest);
        let base = after_scheme
            .find('/')
            .map_or("", |at| &after_scheme[at..])
            .trim_end_matches('/');
        format!("{base}/telegram/{bot}")
    }

    /// The URL given to setWebhook for `bot`.
    pub fn url_for(&self, bot: &str) -> String {
        format!("{}/telegram/{bot}", self.url)
    }
}

/// Which Discord gateway shards this instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shards {
    /// As many as Discord recommends (`/gateway/bot`), all in this instance.
    Auto,
    /// Shards `first..=last` of `total` (validated: first ≤ last < total, total ≥ 1).
    Range { total: u32, first: u32, last: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(url: &str) -> WebhookConfig {
        WebhookConfig {
            url: url.into(),
            bind: SocketAddr::from(([127, 0, 0, 1], 8443)),
            secret_env: "S".into(),
            secret: None,
        }
    }

    #[test]
    fn each_bot_has_its_path_under_the_public_url() {
        assert_eq!(hook("https://bot.example.com").path("a"), "/telegram/a");
        assert_eq!(hook("https://bot.example.com/").path("a"), "/telegram/a");
        assert_eq!(
            hook("https://example.com:8443/confab").path("a"),
            "/confab/telegram/a"
        );
        assert_eq!(
            hook("https://example.com/confab").url_for("a"),
            "https://example.com/confab/telegram/a"
        );
    }
}
