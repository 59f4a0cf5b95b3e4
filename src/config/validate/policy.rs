//! Secrets and the environment policy (SPEC §5): each secret is read from the variable
//! its `*_env` key names; production asks for real secrets, an admin and identities.

use super::{bot_file, scale, Check};
use crate::config::secrets::{self, Vars};
use crate::config::{
    BotConfig, Config, Env, Problem, Secret, StoreBackend, TelegramMode, DATA_KEY_ENV,
};

pub(crate) struct Policy<'a> {
    pub config_file: &'a str,
    /// False when the config file was missing or unparsable: its settings are
    /// defaults, so checks on them would only add noise.
    pub config_parsed: bool,
    pub require_platform_tokens: bool,
}

/// What this load asks of the secrets.
struct Rules<'a> {
    vars: &'a Vars,
    env: Env,
    production: bool,
    /// The command talks to the platforms: their tokens must be set.
    required: bool,
}

/// Fill in secrets from `vars` and apply the per-environment rules.
pub(crate) fn secrets_and_policy(
    config: &mut Config,
    vars: &Vars,
    policy: &Policy<'_>,
    problems: &mut Vec<Problem>,
) {
    let env = config.env;
    let rules = Rules {
        vars,
        env,
        production: env == Env::Production,
        required: policy.require_platform_tokens,
    };
    let mut c = Check {
        file: policy.config_file,
        problems,
    };
    // An LLM without a key (a local server) is fine in staging; production needs a real one.
    let llm_key_required = rules.production && rules.required;
    config.llm.api_key = rules.secret(
        &mut c,
        "llm.api_key_env",
        &config.llm.api_key_env,
        llm_key_required,
    );
    if policy.config_parsed
        && rules.production
        && config.admins.telegram.is_empty()
        && config.admins.discord.is_empty()
    {
        c.push("admins", "production needs at least one admin");
    }
    // On sled the URL is optional: `confab migrate --to redis` uses it when set.
    let var = config.store.redis_url_env.clone();
    let redis = config.store.backend == StoreBackend::Redis;
    config.store.redis_url = rules.secret(&mut c, "store.redis_url_env", &var, redis);
    webhook_secret(config, &rules, &mut c);
    config.data_key = data_key(&rules, problems);
    for bot in &mut config.bots {
        bot_secrets(bot, &rules, problems);
    }
}

/// `[telegram] webhook_secret_env` in webhook mode: required wherever platform tokens
/// are, and in Telegram's alphabet (the value is never echoed).
fn webhook_secret(config: &mut Config, rules: &Rules<'_>, c: &mut Check<'_>) {
    let TelegramMode::Webhook(hook) = &mut config.telegram_mode else {
        return;
    };
    let key = "telegram.webhook_secret_env";
    hook.secret = rules.secret(c, key, &hook.secret_env, rules.required);
    if let Some(why) = hook
        .secret
        .as_ref()
        .and_then(|s| scale::webhook_secret_problem(s.expose()))
    {
        c.push(key, format!("the secret in {} {why}", hook.secret_env));
    }
}

/// `CONFAB_DATA_KEY`, optional; production refuses a weak one.
fn data_key(rules: &Rules<'_>, problems: &mut Vec<Problem>) -> Option<Secret> {
    let v = rules.vars.get(DATA_KEY_ENV).filter(|v| !v.is_empty())?;
    if rules.production {
        if let Some(why) = secrets::weakness(v) {
            problems.push(Problem::new(
                "env",
                DATA_KEY_ENV,
                format!("{DATA_KEY_ENV} {why}; production needs a real secret"),
            ));
        }
    }
    Some(Secret::new(v.to_owned()))
}

/// A bot's platform tokens, and its identity in this environment where one is needed.
fn bot_secrets(bot: &mut BotConfig, rules: &Rules<'_>, problems: &mut Vec<Problem>) {
    let file = bot_file(&bot.name);
    let mut c = Check {
        file: &file,
        problems,
    };
    let env = rules.env;
    let needs_identity = rules.production || rules.required;
    let platforms = [
        ("telegram", "username", &mut bot.telegram),
        ("discord", "application_id", &mut bot.discord),
    ];
    for (section, identity, p) in platforms {
        let Some(p) = p else { continue };
        let key = format!("{section}.token_env");
        p.token = rules.secret(&mut c, &key, &p.token_env, rules.required);
        if needs_identity && p.identity.is_none() {
            c.push(
                &format!("{section}.{identity}"),
                format!("no {env} identity"),
            );
        }
    }
}

impl Rules<'_> {
    /// Read the secret named by `var`. Problems name the variable, never the value.
    fn secret(&self, c: &mut Check<'_>, key: &str, var: &str, required: bool) -> Option<Secret> {
        if var.is_empty() || !secrets::is_env_name(var) {
            return None; // already reported
        }
        match self.vars.get(var) {
            None => {
                if required {
                    c.push(key, format!("environment variable {var} is not set"));
                }
                None
            }
            Some("") => {
                if required || self.production {
                    c.push(key, format!("environment variable {var} is empty"));
                }
                None
            }
            Some(value) => {
                if self.production {
                    if let Some(why) = secrets::weakness(value) {
                        c.push(key, format!("{var} {why}; production needs a real secret"));
                    }
                }
                Some(Secret::new(value.to_owned()))
            }
        }
    }
}
