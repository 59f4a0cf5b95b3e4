//! `confab chat`: the engine in a terminal, with the same memory, limits, cache and LLM.

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tracing::Instrument;

use crate::domain::{Content, Inbound, Platform, Reply};
use crate::engine::Engine;

pub struct TerminalChat {
    pub engine: Arc<Engine>,
    pub bot: String,
    /// Stable id for the local user, so memory survives restarts.
    pub user_id: String,
    pub user_name: String,
}

impl TerminalChat {
    /// Reads lines until end of input (Ctrl-D) and writes each reply. Returns on EOF.
    pub async fn run<R, W>(&self, input: R, mut out: W) -> std::io::Result<()>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut lines = BufReader::new(input).lines();
        let streaming = self
            .engine
            .config()
            .bot(&self.bot)
            .is_some_and(|b| b.stream);
        while let Some(line) = lines.next_line().await? {
            if line.trim().is_empty() {
                continue;
            }
            let inbound = Inbound {
                bot: self.bot.clone(),
                platform: Platform::Terminal,
                update_id: None,
                chat_id: "terminal".into(),
                user_id: self.user_id.clone(),
                user_name: self.user_name.clone(),
                username: None,
                is_private: true,
                forwarded: false,
                content: Content::Text(line),
            };
            // The root span of this line's trace, like an adapter's `update` span.
            let span =
                tracing::info_span!(parent: None, "update", platform = "terminal", bot = %self.bot);
            let reply = self
                .answer(&inbound, streaming, &mut out)
                .instrument(span)
                .await?;
            if let Reply::Text {
                attachment: Some(a),
                ..
            } = &reply
            {
                // The file goes next to where `confab chat` runs; its path is the answer.
                let path = std::env::current_dir()?.join(&a.file_name);
                tokio::fs::write(&path, &a.bytes).await?;
                let note = format!("(saved {} bytes to {})\n", a.bytes.len(), path.display());
                out.write_all(note.as_bytes()).await?;
            }
            out.flush().await?;
        }
        Ok(())
    }

    /// Asks the engine and prints its answer (as it streams in, for a streaming bot).
    async fn answer<W: AsyncWrite + Unpin>(
        &self,
        inbound: &Inbound,
        streaming: bool,
        out: &mut W,
    ) -> std::io::Result<Reply> {
        if streaming {
            return self.streamed(inbound, out).await;
        }
        let reply = self.engine.handle(inbound).await;
        if let Some(text) = reply.as_text() {
            out.write_all(format!("{}> {}\n", self.bot, text).as_bytes())
                .await?;
        }
        Ok(reply)
    }

    /// Prints text as it streams in, then whatever the final reply adds.
    async fn streamed<W: AsyncWrite + Unpin>(
        &self,
        inbound: &Inbound,
        out: &mut W,
    ) -> std::io::Result<Reply> {
        let (tx, mut rx) = watch::channel(String::new());
        out.write_all(format!("{}> ", self.bot).as_bytes()).await?;
        out.flush().await?;
        let mut shown = String::new();
        let handle = self.engine.handle_streaming(inbound, Some(&tx));
        tokio::pin!(handle);
        let reply = loop {
            tokio::select! {
                reply = &mut handle => break reply,
                changed = rx.changed() => {
                    if changed.is_err() { continue; }
                    let text = rx.borrow_and_update().clone();
                    if let Some(new) = text.strip_prefix(shown.as_str()) {
                        out.write_all(new.as_bytes()).await?;
                        out.flush().await?;
                        shown = text;
                    }
                }
            }
        };
        let text = reply.as_text().unwrap_or_default();
        match text.strip_prefix(shown.as_str()) {
            // The stream showed a prefix of the final text: finish it.
            Some(rest) => out.write_all(rest.as_bytes()).await?,
            // The final reply differs (e.g. an apology after a broken stream).
            None => {
                out.write_all(format!("\n{}> {}", self.bot, text).as_bytes())
                    .await?
            }
        }
        out.write_all(b"\n").await?;
        Ok(reply)
    }
}
