//! Builds a confab root (config, bots, prompts) in a temp dir pointed at a fake LLM.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use confab::app::{self, App};
use confab::config::{self, Env, LoadOptions};
use confab::domain::{Content, Inbound, Platform, Reply};

pub const PROMPT: &str = "You are {{bot_name}}, helping {{user_name}} on {{platform}}.";

/// A confab root directory; `settings` is appended to config/staging.toml.
pub struct Root {
    pub dir: tempfile::TempDir,
}

impl Root {
    pub fn new(base_url: &str, settings: &str) -> Root {
        Self::with_bot(base_url, settings, "prompt = \"assistant\"\n")
    }

    pub fn with_bot(base_url: &str, settings: &str, bot_toml: &str) -> Root {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for sub in ["config", "bots", "prompts"] {
            std::fs::create_dir_all(root.join(sub)).expect("mkdir");
        }
        let data = root.join("data");
        let toml = format!(
            "data_dir = {data:?}\n{settings}\n",
            data = data.display().to_string()
        );
        // Insert base_url into an [llm] section, creating one if the settings lack it.
        let toml = if toml.contains("[llm]") {
            toml.replace(
                "[llm]",
                &format!("[llm]\nbase_url = {base_url:?}\nbackoff_base_ms = 10"),
            )
        } else {
            format!("{toml}\n[llm]\nbase_url = {base_url:?}\nbackoff_base_ms = 10\n")
        };
        std::fs::write(root.join("config/staging.toml"), toml).expect("write config");
        std::fs::write(root.join("bots/assistant.toml"), bot_toml).expect("write bot");
        std::fs::write(root.join("prompts/assistant.md"), PROMPT).expect("write prompt");
        Root { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            root: self.path().to_path_buf(),
            env: Env::Staging,
            env_file: Some(self.env_file()),
            require_platform_tokens: false,
        }
    }

    /// An empty secrets file so the developer's own environment files never leak in.
    pub fn env_file(&self) -> PathBuf {
        let p = self.path().join(".env.test");
        if !p.exists() {
            std::fs::write(&p, "").expect("write env file");
        }
        p
    }

    pub fn build(&self) -> App {
        let cfg = config::load(&self.options()).unwrap_or_else(|p| panic!("config problems:\n{p}"));
        app::build(cfg).expect("build app")
    }
}

static UPDATE: AtomicU64 = AtomicU64::new(1);

/// A private text message from a Telegram-like user, with a fresh update id.
pub fn msg(user: &str, text: &str) -> Inbound {
    Inbound {
        bot: "assistant".into(),
        platform: Platform::Telegram,
        update_id: Some(UPDATE.fetch_add(1, Ordering::Relaxed).to_string()),
        chat_id: user.into(),
        user_id: user.into(),
        user_name: format!("User{user}"),
        username: None,
        is_private: true,
        content: Content::Text(text.into()),
    }
}

/// The reply text, or "<silent>".
pub fn text(reply: &Reply) -> String {
    reply.as_text().unwrap_or("<silent>").to_string()
}
