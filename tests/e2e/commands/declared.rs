//! The command declaration (`engine::commands`) against what users and operators see:
//! every declared command is registered on both platforms — and nothing else —, answers
//! when invoked, is listed in `/help` or the admin usage, and its answer has the
//! declared visibility.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use confab::domain::{Platform, ReplyKind, Visibility};
use confab::engine::commands::{
    admin_usage, help_text, slash_commands, user_commands, Access, Arg, ADMIN_COMMANDS, COMMANDS,
};

use super::on;
use crate::fake_discord::{FakeDiscord, SentMessage};
use crate::fake_openai::FakeOpenAi;
use crate::fake_telegram::FakeTelegram;
use crate::harness::{
    dc_settings, tg_settings, Daemon, Root, DC_APP_STAGING, DC_BOT_ID, DC_BOT_TOML, DC_TOKEN,
    TG_BOT_TOML, TG_TOKEN,
};

const WAIT: Duration = Duration::from_secs(20);
/// The Discord user who is an operator.
const DC_ADMIN: u64 = 200;
const SETTINGS: &str =
    "[admins]\ndiscord = [200]\ntelegram = [100]\n[limits]\ncommands_burst = 100\n";

/// Polls `get` until it returns something non-empty.
async fn wait_non_empty<T>(what: &str, get: impl Fn() -> Vec<T>) -> Vec<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = get();
        if !got.is_empty() {
            return got;
        }
        assert!(Instant::now() < deadline, "no {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Invokes a slash command as the operator in a DM; returns the follow-up's text.
async fn invoke(dc: &FakeDiscord, name: &str, options: Value, channel: u64) -> String {
    let id = dc.send_interaction(name, options, DC_ADMIN, "opal", channel, None);
    let mine = |m: &SentMessage| m.interaction_id == Some(id) && m.kind == "followup";
    let msgs = wait_non_empty(&format!("follow-up of /{name}"), || {
        dc.messages().into_iter().filter(mine).collect()
    })
    .await;
    msgs.into_iter()
        .map(|m| m.content)
        .collect::<Vec<_>>()
        .join("\n")
}

/// `{option: example}` for every declared argument of a command.
fn examples(args: &[Arg]) -> Value {
    let map: Map<String, Value> = args
        .iter()
        .map(|a| (a.name().to_lowercase(), json!(a.example())))
        .collect();
    Value::Object(map)
}

/// What Discord recorded of one declared argument's option: name, description,
/// required, choices.
fn option_of(o: &Value) -> (String, String, bool, Vec<String>) {
    let choices = o["choices"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["value"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    (
        o["name"].as_str().unwrap_or_default().to_string(),
        o["description"].as_str().unwrap_or_default().to_string(),
        o["required"].as_bool().unwrap_or(false),
        choices,
    )
}

fn declared_option(a: &Arg) -> (String, String, bool, Vec<String>) {
    (
        a.name().to_lowercase(),
        a.help().to_string(),
        !a.optional(),
        a.choices().into_iter().map(str::to_string).collect(),
    )
}

fn root(llm: &FakeOpenAi, tg: &FakeTelegram, dc: &FakeDiscord) -> Root {
    let settings = dc_settings(&dc.api_url, &tg_settings(&tg.api_url, SETTINGS));
    let bot = format!(
        "{TG_BOT_TOML}{}",
        DC_BOT_TOML.trim_start_matches("prompt = \"assistant\"\n")
    );
    let root = Root::with_bot(&llm.base_url, &settings, &bot);
    std::fs::write(
        root.path().join(".env.test"),
        format!("ASSISTANT_TELEGRAM_TOKEN={TG_TOKEN}\nASSISTANT_DISCORD_TOKEN={DC_TOKEN}\n"),
    )
    .expect("write env file");
    root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_declared_command_is_registered_on_both_platforms_and_nothing_else() {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let dc = FakeDiscord::start(DC_TOKEN, DC_BOT_ID, DC_APP_STAGING).await;
    let root = root(&llm, &tg, &dc);
    let daemon = Daemon::start(&root);
    assert!(dc.wait_connected(WAIT).await, "the gateway session came up");

    // Telegram's menu: exactly the user commands, in /help order, with their help.
    let menu = wait_non_empty("setMyCommands", || tg.commands()).await;
    let want: Vec<(String, String)> = user_commands()
        .map(|s| (s.name.to_string(), s.help.to_string()))
        .collect();
    assert_eq!(menu, want);
    assert!(user_commands().count() >= 6);

    // Discord: every declared command and `ask`, with their options, and nothing else.
    let registered = wait_non_empty("slash commands", || dc.registered_commands()).await;
    let by_name: BTreeMap<String, &Value> = registered
        .iter()
        .map(|c| (c["name"].as_str().unwrap_or_default().to_string(), c))
        .collect();
    assert_eq!(by_name.len(), registered.len(), "a name registered twice");
    let declared: Vec<String> = slash_commands().map(|s| s.name.to_string()).collect();
    assert_eq!(
        by_name.keys().cloned().collect::<Vec<_>>(),
        {
            let mut d = declared.clone();
            d.sort();
            d
        },
        "registered = declared"
    );
    for spec in slash_commands() {
        let c = by_name[spec.name];
        assert_eq!(c["description"], json!(spec.help), "/{}", spec.name);
        let got: Vec<_> = c["options"]
            .as_array()
            .map(|os| os.iter().map(option_of).collect())
            .unwrap_or_default();
        let want: Vec<_> = spec.args.iter().map(declared_option).collect();
        assert_eq!(got, want, "options of /{}", spec.name);
    }

    // Each registered slash command, invoked with its declared options, reaches a
    // declared command (or, for `ask`, the assistant).
    for (i, spec) in slash_commands().enumerate() {
        let answer = invoke(&dc, spec.name, examples(spec.args), 700 + i as u64).await;
        assert!(!answer.is_empty(), "/{} got no answer", spec.name);
        assert!(
            !answer.starts_with("Unknown command"),
            "/{}: {answer}",
            spec.name
        );
    }
    // /help lists the user commands and only them; `/admin` alone lists every
    // admin subcommand, and each of them, invoked with its declared arguments, runs.
    let help = invoke(&dc, "help", Value::Null, 800).await;
    for spec in COMMANDS {
        let line = format!("/{} — {}", spec.name, spec.help);
        assert_eq!(help.contains(&line), spec.access == Access::User, "{line}");
    }
    let usage = invoke(&dc, "admin", Value::Null, 801).await;
    for (i, spec) in ADMIN_COMMANDS.iter().enumerate() {
        let line = format!("/admin {} — {}", spec.synopsis(), spec.help);
        assert!(usage.contains(&line), "{line} in {usage}");
        let words: Vec<String> = std::iter::once(spec.name.to_string())
            .chain(spec.args.iter().map(Arg::example))
            .collect();
        let said = words.join(" ");
        let answer = invoke(&dc, "admin", json!({ "command": said }), 802 + i as u64).await;
        assert!(
            !answer.contains("Usage: /admin") && !answer.contains("operators only"),
            "/admin {said}: {answer}"
        );
    }
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn every_declared_command_answers_with_its_declared_visibility() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, SETTINGS);
    let app = root.build();
    // In a group, where a personal answer must not be shown to everyone.
    let in_group = |user: &str, said: &str| {
        let mut m = on(Platform::Telegram, user, said);
        m.chat_id = "-100700".into();
        m.is_private = false;
        m
    };
    // Each user command and each admin subcommand, with its declared arguments (the
    // `admin` entry itself only carries the subcommands).
    let mut said: Vec<(String, Visibility)> = user_commands()
        .map(|spec| {
            let words: Vec<String> = std::iter::once(format!("/{}", spec.name))
                .chain(spec.args.iter().map(Arg::example))
                .collect();
            (words.join(" "), spec.visibility)
        })
        .collect();
    said.extend(ADMIN_COMMANDS.iter().map(|spec| {
        let words: Vec<String> = ["/admin".to_string(), spec.name.to_string()]
            .into_iter()
            .chain(spec.args.iter().map(Arg::example))
            .collect();
        (words.join(" "), spec.visibility)
    }));
    // A user first (an operator's `maintenance on` would answer them all the same).
    for (text, visibility) in &said {
        let reply = app.engine.handle(&in_group("7", text)).await;
        assert_eq!(reply.visibility(), *visibility, "{text} by a user");
    }
    // An operator: every command runs.
    for (text, visibility) in &said {
        let reply = app.engine.handle(&in_group("100", text)).await;
        assert_eq!(reply.visibility(), *visibility, "{text}: {reply:?}");
        let Some(answer) = reply.as_text() else {
            panic!("{text}: no answer");
        };
        assert!(!answer.starts_with("Unknown command"), "{text}: {answer}");
        assert!(!answer.contains("Usage: /admin"), "{text}: {answer}");
    }
    // What the engine answers for help and usage is what the declaration lists.
    let help = app.engine.handle(&in_group("7", "/help")).await;
    assert_eq!(help.as_text(), Some(help_text().as_str()));
    let usage = app.engine.handle(&in_group("100", "/admin")).await;
    assert_eq!(usage.as_text(), Some(admin_usage().as_str()));
    let admin = COMMANDS
        .iter()
        .find(|s| s.name == "admin")
        .map(|s| s.visibility);
    assert_eq!(Some(usage.visibility()), admin);
    assert!(matches!(
        usage,
        confab::domain::Reply::Text {
            kind: ReplyKind::Notice(_),
            ..
        }
    ));
}
