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
