//! Runs a parsed command: the declaration's access and visibility apply to every
//! answer here, so no executor decides them on its own.

use super::{help_text, Access, Action, Command};
use crate::config::{BotConfig, Config};
use crate::domain::{Inbound, Rejection, Reply, ReplyKind, Visibility};
use crate::engine::limits::{human_duration, secs_until_reset, utc_day};
use crate::engine::{now_unix, Engine};
use crate::store::{StoreError, UserRecord};

impl Engine {
    /// Answers a command: unknown ones with the help text, operator commands from
    /// non-operators with a refusal, the rest by their executor; an answer the
    /// declaration calls personal is for the asker only.
    pub(crate) fn command(
        &self,
        cmd: Command,
        inbound: &Inbound,
        text: &str,
        cfg: &Config,
        bot: &BotConfig,
        record: Option<&UserRecord>,
    ) -> Result<Reply, StoreError> {
        let (spec, action) = match cmd {
            Command::Run(spec, action) => (spec, action),
            Command::Unknown(name) => {
                return Ok(Reply::notice(
                    Rejection::BadCommand,
                    format!("Unknown command /{name}.\n{}", help_text()),
                ))
            }
        };
        let said = |answer: String| Reply::text(answer, ReplyKind::Command);
        let reply = match action {
            _ if spec.access == Access::Admin && !self.is_admin(&inbound.user()) => {
                self.refuse_admin(inbound, text)
            }
            Action::Start => said(format!(
                "Hi {}! I'm {}, an AI assistant. Just write to me.\n\n{}",
                inbound.user_name,
                bot.name,
                help_text()
            )),
            Action::Help => said(help_text()),
            Action::Reset => {
                let n = self.store.clear_conversation(&inbound.conversation())?;
                said(format!("Done: I forgot this conversation ({n} messages)."))
            }
            Action::Usage => said(self.usage_text(inbound, cfg, bot, record)),
            Action::Export => self.export(inbound)?,
            Action::Forget { confirm } => self.forget(inbound, confirm)?,
            Action::Admin(parsed) => self.admin(inbound, text, parsed)?,
        };
        Ok(match spec.visibility {
            Visibility::Personal => reply.personal(),
            Visibility::Public => reply,
        })
    }

    fn usage_text(
        &self,
        inbound: &Inbound,
        cfg: &Config,
        bot: &BotConfig,
        record: Option<&UserRecord>,
    ) -> String {
        let limits = self.effective_limits(cfg, bot, record);
        let now = now_unix();
        let today = utc_day(now);
        let today_usage = record.filter(|r| r.usage.day == today).map(|r| &r.usage);
        let used = today_usage.map_or(0, |u| u.tokens);
        let audio = today_usage.map_or(0, |u| u.audio_secs);
        let images = record.map_or(0, |r| r.usage.total_images);
        let media = format!(
            "\nVoice: {audio} s of audio today (of {} s per day); images read: {images}.",
            cfg.limits.daily_audio_secs
        );
        if self.is_admin(&inbound.user()) {
            return format!("You are an admin: no limits apply. Tokens used today: {used}.{media}");
        }
        format!(
            "Limits: {} messages per minute (burst {}), {} tokens per day.\nUsed today: {} tokens ({} left). The budget resets in {} (midnight UTC).{media}",
            limits.per_minute,
            limits.burst,
            limits.daily_tokens,
            used,
            limits.daily_tokens.saturating_sub(used),
            human_duration(secs_until_reset(now) as u64)
        )
    }
}
