//! The real `confab` binary: `check` and `chat`.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::fake_openai::FakeOpenAi;
use crate::harness::Root;

fn confab(root: &Root, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(args)
        .arg("--root")
        .arg(root.path())
        .arg("--env-file")
        .arg(root.env_file())
        .current_dir(root.path())
        .env("USER", "tester")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn confab");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait confab")
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn check_lists_every_problem_and_exits_2() {
    let root = Root::new(
        "http://127.0.0.1:9/v1",
        "[limits]\nburst = 0\nmesages_per_minute = 5\n[log]\nformat = \"xml\"\n",
    );
    std::fs::write(root.path().join("bots/broken.toml"), "prompt = \"nope\"\n").unwrap();
    let out = confab(&root, &["check", "--env", "staging"], "");
    let err = s(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    for expected in [
        "config/staging.toml: limits.burst:",
        "config/staging.toml: limits.mesages_per_minute: unknown key",
        "config/staging.toml: log.format:",
        "bots/broken.toml: prompt:",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

#[tokio::test]
async fn check_passes_a_good_config() {
    let root = Root::new("http://127.0.0.1:9/v1", "");
    let out = confab(&root, &["check", "--env", "staging"], "");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", s(&out.stderr));
    assert!(s(&out.stdout).contains("configuration OK"));
}

#[tokio::test]
async fn bad_arguments_exit_2() {
    let root = Root::new("http://127.0.0.1:9/v1", "");
    let out = confab(&root, &["run", "--env", "qa"], "");
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_answers_remembers_refuses_and_exits_on_eof() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "[limits]\nmax_input_chars = 40\n");
    let long = "x".repeat(50);
    let first = {
        let root = &root;
        let input = format!("my name is Ann\n{long}\n");
        tokio::task::block_in_place(|| confab(root, &["chat", "--env", "staging"], &input))
    };
    let out = s(&first.stdout);
    assert_eq!(first.status.code(), Some(0), "stderr: {}", s(&first.stderr));
    assert!(out.contains("assistant> echo: my name is Ann"), "{out}");
    assert!(out.contains("too long (50 chars, limit 40)"), "{out}");
    // a second session remembers the first
    let second = tokio::task::block_in_place(|| {
        confab(&root, &["chat", "--env", "staging"], "what is my name?\n")
    });
    assert_eq!(
        second.status.code(),
        Some(0),
        "stderr: {}",
        s(&second.stderr)
    );
    let last = llm.requests().pop().unwrap();
    assert!(
        last.messages.iter().any(|(_, c)| c == "my name is Ann"),
        "{:?}",
        last.messages
    );
}

#[tokio::test]
async fn check_renders_prompts_like_the_engine_and_names_the_file() {
    let root = Root::new("http://127.0.0.1:9/v1", "");
    std::fs::write(
        root.path().join("prompts/assistant.md"),
        "You are {{ bot_name }}.\nBe {{ tone }} with {{ user_name }}.",
    )
    .unwrap();
    let out = confab(&root, &["check", "--env", "staging"], "");
    let err = s(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(
        err.contains("prompts/assistant.md: template: line 2: undefined value"),
        "{err}"
    );
}

/// A production root as the README installs it: the shipped `config/production.toml`,
/// `bots/` and `prompts/`, and an env file (mode 0600) with real-looking secrets.
fn shipped_production_root() -> tempfile::TempDir {
    use crate::harness::{DC_TOKEN, TG_TOKEN};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for rel in [
        "config/production.toml",
        "bots/assistant.toml",
        "prompts/assistant.md",
    ] {
        let to = dir.path().join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(repo.join(rel), to).unwrap();
    }
    let env = dir.path().join(".env.production");
    std::fs::write(
        &env,
        format!(
            "OPENAI_API_KEY=sk-proj-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c\n\
             ASSISTANT_TELEGRAM_TOKEN={TG_TOKEN}\nASSISTANT_DISCORD_TOKEN={DC_TOKEN}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&env, std::fs::Permissions::from_mode(0o600)).unwrap();
    dir
}

/// The binary on a production root, with only `vars` in its environment.
fn production(dir: &std::path::Path, args: &[&str], vars: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(args)
        .args(["--env", "production", "--root"])
        .arg(dir)
        .env_clear()
        .envs(vars.iter().copied())
        .current_dir(dir)
        .output()
        .expect("run confab")
}

#[tokio::test]
async fn the_shipped_production_config_names_no_admin_and_refuses_to_start() {
    let dir = shipped_production_root();
    let out = production(dir.path(), &["check"], &[]);
    let err = s(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("config/production.toml: admins: production needs at least one admin"),
        "{err}"
    );
    // `run` refuses before contacting anything (the platform URLs are the real ones).
    let out = production(dir.path(), &["run"], &[]);
    let err = s(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("config/production.toml: admins:"), "{err}");
    assert!(err.contains("nothing started"), "{err}");
}

#[tokio::test]
async fn check_warns_when_production_has_no_data_key_but_passes() {
    let dir = shipped_production_root();
    let admin = ("CONFAB__ADMINS__TELEGRAM", "42");
    let out = production(dir.path(), &["check"], &[admin]);
    let err = s(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(s(&out.stdout).contains("configuration OK"));
    assert!(
        err.contains("warning: env: CONFAB_DATA_KEY: CONFAB_DATA_KEY is not set"),
        "{err}"
    );
    let key = (
        "CONFAB_DATA_KEY",
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    );
    let out = production(dir.path(), &["check"], &[admin, key]);
    assert_eq!(out.status.code(), Some(0), "{}", s(&out.stderr));
    assert!(
        !s(&out.stderr).contains("CONFAB_DATA_KEY"),
        "{}",
        s(&out.stderr)
    );
}
