//! Operations with the real binary: backup while running and restore, SIGTERM with a
//! reply in flight, SIGHUP reloading the prompt.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use confab::store::SledStore;

use crate::fake_openai::FakeOpenAi;
use crate::fake_telegram::FakeTelegram;
use crate::harness::{confab_cli as confab, wait_exit, Root, TG_BOT_TOML, TG_TOKEN};
use crate::telegram::spawn_daemon;

const WAIT: Duration = Duration::from_secs(20);

fn signal(child: &std::process::Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Polls the daemon's log until a line contains `needle`; panics with the log at `WAIT`.
async fn wait_for_log(log: &std::path::Path, needle: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn setup() -> (FakeOpenAi, FakeTelegram, Root) {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(&llm.base_url, &tg.api_url, "", TG_BOT_TOML);
    (llm, tg, root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_while_running_then_restore_gives_every_tree_back() {
    let (_llm, tg, root) = setup().await;
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "info");
    for u in 1..=5 {
        tg.send_private(u, "B", &format!("backup me {u}"));
    }
    tg.wait_for_sent(5, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let file = root.path().join("b/confab.backup");
    let out =
        tokio::task::block_in_place(|| confab(&root, &["backup", "--out", file.to_str().unwrap()]));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("sha256 verified"));
    signal(&child, "-TERM");
    assert_eq!(
        tokio::task::block_in_place(|| wait_exit(&mut child, WAIT)),
        Some(0)
    );

    let data = root.path().join("data");
    let before = SledStore::open(&data, 8, 500).unwrap().dump().unwrap();
    assert!(before
        .iter()
        .any(|(t, _, v)| t == "turns" && String::from_utf8_lossy(v).contains("backup me 3")));
    // restore refuses a non-empty data dir without --force
    let out = tokio::task::block_in_place(|| {
        confab(&root, &["restore", "--from", file.to_str().unwrap()])
    });
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    std::fs::remove_dir_all(&data).unwrap();
    let out = tokio::task::block_in_place(|| {
        confab(&root, &["restore", "--from", file.to_str().unwrap()])
    });
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = SledStore::open(&data, 8, 500).unwrap().dump().unwrap();
    assert_eq!(before, after, "every tree equal after restore");

    // a damaged backup is rejected and nothing is touched
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    let bad = root.path().join("bad.backup");
    std::fs::write(&bad, bytes).unwrap();
    let out = tokio::task::block_in_place(|| {
        confab(
            &root,
            &["restore", "--force", "--from", bad.to_str().unwrap()],
        )
    });
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checksum"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        SledStore::open(&data, 8, 500).unwrap().dump().unwrap(),
        after
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_reply_in_flight_and_exits_0() {
    let (llm, tg, root) = setup().await;
    llm.set_latency(Duration::from_secs(3));
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "info");
    tg.send_private(1, "S", "slow question");
    let deadline = Instant::now() + WAIT;
    while llm.request_count() == 0 {
        assert!(Instant::now() < deadline, "the LLM was never called");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&child, "-TERM");
    let code = tokio::task::block_in_place(|| wait_exit(&mut child, WAIT));
    assert_eq!(
        code,
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let sent = tg.sent_to(1);
    assert_eq!(
        sent.last().map(|m| m.text.as_str()),
        Some("echo: slow question")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_prompt() {
    let (llm, tg, root) = setup().await;
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "info");
    tg.send_private(1, "H", "before");
    tg.wait_for_sent(1, WAIT).await;
    std::fs::write(
        root.path().join("prompts/assistant.md"),
        "You are a pirate named {{bot_name}}.",
    )
    .unwrap();
    signal(&child, "-HUP");
    // The daemon says when the new configuration is in force; wait for that, not a guess.
    wait_for_log(&log, "configuration reloaded").await;
    tg.send_private(1, "H", "after");
    tg.wait_for_sent(2, WAIT).await;
    let systems: Vec<String> = llm
        .requests()
        .iter()
        .map(|r| r.system().unwrap_or_default().to_string())
        .collect();
    assert!(systems[0].starts_with("You are assistant"), "{systems:?}");
    assert_eq!(systems[1], "You are a pirate named assistant.");
    signal(&child, "-TERM");
    assert_eq!(
        tokio::task::block_in_place(|| wait_exit(&mut child, WAIT)),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_data_dir_is_a_clear_start_up_error() {
    let (_llm, _tg, root) = setup().await;
    // data_dir is a file: nobody (not even root) can create a store below it
    std::fs::write(root.path().join("data"), "not a directory").unwrap();
    let out = tokio::task::block_in_place(|| confab(&root, &["chat"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("opening the store in") && err.contains("data"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_style_json_logs_carry_env_and_update_span_but_no_text() {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(
        &llm.base_url,
        &tg.api_url,
        "[log]\nformat = \"json\"\n",
        TG_BOT_TOML,
    );
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "info");
    tg.send_private(1, "J", "a very private kiwi question");
    tg.wait_for_sent(1, WAIT).await;
    wait_for_log(&log, "update answered").await;
    signal(&child, "-TERM");
    assert_eq!(
        tokio::task::block_in_place(|| wait_exit(&mut child, WAIT)),
        Some(0)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("kiwi"),
        "message text logged at info:\n{text}"
    );
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3);
    assert!(lines.iter().all(|l| l["env"] == "staging"), "{text}");
    let answered = lines
        .iter()
        .find(|l| l["message"] == "update answered")
        .unwrap_or_else(|| panic!("no per-update line:\n{text}"));
    assert_eq!(answered["span"]["platform"], "telegram");
    assert_eq!(answered["span"]["bot"], "assistant");
    assert!(answered["span"]["update"]
        .as_str()
        .is_some_and(|u| !u.is_empty()));
}

/// Every form a secret can take in a log line: as text, and as the hex or decimal bytes
/// of a websocket frame dump.
fn leaks(log: &str, secret: &str) -> Vec<&'static str> {
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    let dec = secret
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut found = Vec::new();
    if log.contains(secret) {
        found.push("text");
    }
    if log.contains(&hex) {
        found.push("hex bytes");
    }
    if log.contains(&dec) {
        found.push("decimal bytes");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_trace_never_prints_the_discord_token_or_an_interaction_token() {
    use crate::fake_discord::FakeDiscord;
    use crate::harness::{DC_APP_STAGING, DC_BOT_ID, DC_BOT_TOML, DC_TOKEN};
    let llm = FakeOpenAi::start().await;
    let dc = FakeDiscord::start(DC_TOKEN, DC_BOT_ID, DC_APP_STAGING).await;
    let root = Root::discord(&llm.base_url, &dc.api_url, "", DC_BOT_TOML);
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "trace");
    assert!(dc.wait_connected(WAIT).await, "the gateway session came up");
    dc.send_dm(500, 42, "ann", "hello there");
    dc.wait_for_messages(1, WAIT).await;
    let id = dc.send_interaction("usage", serde_json::Value::Null, 42, "ann", 500, None);
    let deadline = Instant::now() + WAIT;
    while !dc.interaction_responses().iter().any(|(i, _)| *i == id) {
        assert!(
            Instant::now() < deadline,
            "the interaction was never answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&child, "-TERM");
    assert_eq!(
        tokio::task::block_in_place(|| wait_exit(&mut child, WAIT)),
        Some(0)
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.lines().count() > 20, "trace logging is on:\n{text}");
    let token_part = DC_TOKEN.split('.').next_back().unwrap_or(DC_TOKEN);
    for (what, secret) in [
        ("bot token", DC_TOKEN),
        ("bot token's secret part", token_part),
        ("interaction token", &format!("itok-{id}")),
    ] {
        let found = leaks(&text, secret);
        assert!(found.is_empty(), "{what} in the log as {found:?}");
    }
}

#[tokio::test]
async fn an_llm_error_that_echoes_the_api_key_never_carries_it() {
    use crate::fake_openai::Behavior;
    use confab::llm::{ChatMessage, ChatRequest, ChatRole, LlmProvider, OpenAiProvider};
    let key = "sk-proj-9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d";
    let llm = FakeOpenAi::start().await;
    let body = serde_json::json!({"error": {
        "message": format!("Incorrect API key provided: {key}. You can find your API key at ..."),
        "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}});
    let provider = OpenAiProvider::new(&llm.base_url, key, Duration::from_secs(5)).unwrap();
    let request = || ChatRequest {
        model: "m".into(),
        messages: vec![ChatMessage::new(ChatRole::User, "hi".to_string())],
        temperature: None,
        max_tokens: None,
    };
    for stream in [false, true] {
        llm.push(Behavior::Status {
            code: 401,
            retry_after: None,
            body: Some(body.to_string()),
        });
        let err = if stream {
            match provider.stream(request()).await {
                Err(e) => e,
                Ok(mut s) => match futures::StreamExt::next(&mut s).await {
                    Some(Err(e)) => e,
                    other => panic!(
                        "stream: expected an error, got {:?}",
                        other.map(|r| r.is_ok())
                    ),
                },
            }
        } else {
            provider.complete(request()).await.unwrap_err()
        };
        let text = format!("{err} / {err:?}");
        assert!(!text.contains(key), "stream={stream}: {text}");
        assert!(text.contains("[REDACTED]"), "stream={stream}: {text}");
    }
}

// ---------------------------------------------------------------------------
// Files, sockets and backups (issue 12.9, 11.9, 11.7)

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// Every path below `dir` (and `dir`), with its mode.
fn modes(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    let mut out = vec![(dir.to_path_buf(), mode(dir))];
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(modes(&path));
        } else {
            out.push((path.clone(), mode(&path)));
        }
    }
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `confab chat` with one line of input: creates (or opens) the store.
fn chat_once(root: &Root, line: &str) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(["chat", "--env", "staging", "--root"])
        .arg(root.path())
        .arg("--env-file")
        .arg(root.env_file())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{line}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_and_every_file_in_it_are_owner_only() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "");
    tokio::task::block_in_place(|| chat_once(&root, "hello"));
    let data = root.path().join("data");
    let all = modes(&data);
    assert!(all.len() > 2, "{all:?}");
    assert_eq!(mode(&data), 0o700);
    for (path, m) in &all {
        assert_eq!(m & 0o077, 0, "{} is {m:o}", path.display());
    }
    // A data dir an older confab left 0755 is tightened at the next start.
    std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    tokio::task::block_in_place(|| chat_once(&root, "again"));
    assert_eq!(mode(&data), 0o700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_socket_that_cannot_be_bound_stops_start_up() {
    let (_llm, _tg, root) = setup().await;
    // Something that is not a socket sits where the control socket goes.
    std::fs::create_dir_all(root.path().join("data/control.sock/keep")).unwrap();
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "info");
    let code = tokio::task::block_in_place(|| wait_exit(&mut child, WAIT));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("binding the control socket"), "{text}");
    assert!(
        root.path().join("data/control.sock/keep").is_dir(),
        "nothing of the operator's is deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_socket_serves_only_the_daemons_user_and_root() {
    if let Some(why) = crate::systemd::emulation_unavailable() {
        eprintln!("skipping: {why}");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let (_llm, tg, root) = setup().await;
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "info");
    tg.send_private(7, "Ann", "a private kiwi question");
    tg.wait_for_sent(1, WAIT).await;
    // Open every door the file system has (as a umask-less or careless setup would):
    // only the peer check is left to refuse another user.
    let data = root.path().join("data");
    let socket = data.join("control.sock");
    for (path, m) in [
        (root.path(), 0o755),
        (data.as_path(), 0o755),
        (socket.as_path(), 0o777),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m)).unwrap();
    }
    let export = |as_nobody: bool| {
        let mut cmd = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(env!("CARGO_BIN_EXE_confab"));
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_confab"))
        };
        cmd.args(["user", "export", "tg:7", "--env", "staging", "--root"])
            .arg(root.path())
            .arg("--env-file")
            .arg(root.env_file())
            .output()
            .unwrap()
    };
    let out = tokio::task::block_in_place(|| export(true));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{}", stderr(&out));
    assert!(
        stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );
    assert!(!stdout.contains("kiwi"), "{stdout}");
    let out = tokio::task::block_in_place(|| export(false));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("kiwi"));
    signal(&child, "-TERM");
    assert_eq!(
        tokio::task::block_in_place(|| wait_exit(&mut child, WAIT)),
        Some(0)
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("control socket connection refused"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_is_private_and_never_writes_through_a_planted_symlink() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "");
    tokio::task::block_in_place(|| chat_once(&root, "hello"));
    let dir = root.path().join("b");
    std::fs::create_dir(&dir).unwrap();
    let victim = root.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    // The temp names an attacker with access to the directory could guess.
    for name in [
        "confab.partial",
        "confab.backup.partial",
        ".confab.backup.partial",
    ] {
        std::os::unix::fs::symlink(&victim, dir.join(name)).unwrap();
    }
    let out_file = dir.join("confab.backup");
    let out = tokio::task::block_in_place(|| {
        confab(&root, &["backup", "--out", out_file.to_str().unwrap()])
    });
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"precious",
        "the backup went through the symlink"
    );
    assert!(std::fs::symlink_metadata(&out_file).unwrap().is_file());
    assert_eq!(mode(&out_file), 0o600);
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial") && !n.starts_with(".confab.backup.partial"))
        .filter(|n| n != "confab.partial" && n != "confab.backup.partial")
        .collect();
    assert!(left.is_empty(), "temp files left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_deletes_only_confabs_own_backups() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "");
    tokio::task::block_in_place(|| chat_once(&root, "hello"));
    let dir = root.path().join("b");
    let first = dir.join("first.backup");
    let out = tokio::task::block_in_place(|| {
        confab(&root, &["backup", "--out", first.to_str().unwrap()])
    });
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Two older real backups, and files that are not confab's backups.
    std::fs::copy(&first, dir.join("confab-20200101T000001Z.backup")).unwrap();
    std::fs::copy(&first, dir.join("confab-20200101T000002Z.backup")).unwrap();
    let foreign = [
        "confab-20200101T000000Z.backup",
        "confab-notes.backup",
        "confab-20200101T000000Z.backup.txt",
    ];
    for name in foreign {
        std::fs::write(dir.join(name), "the operator's own file").unwrap();
    }
    let out = tokio::task::block_in_place(|| {
        confab(
            &root,
            &[
                "backup",
                "--keep",
                "2",
                "--out",
                dir.join("confab.backup").to_str().unwrap(),
            ],
        )
    });
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for name in foreign {
        assert!(dir.join(name).exists(), "{name} was deleted");
    }
    assert!(!dir.join("confab-20200101T000001Z.backup").exists());
    assert!(dir.join("confab-20200101T000002Z.backup").exists());
    let newest: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("confab-20") && !n.starts_with("confab-2020"))
        .collect();
    assert_eq!(newest.len(), 1, "{newest:?}");
}

/// A version-1 backup file with a valid checksum around `rows` (already encoded).
fn crafted_v1(header_rows: u64, rows: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut b = b"CONFAB-BACKUP 1\n".to_vec();
    b.extend_from_slice(
        format!(r#"{{"schema":1,"created_at":"2026-01-01T00:00:00Z","rows":{header_rows}}}"#)
            .as_bytes(),
    );
    b.push(b'\n');
    b.extend_from_slice(rows);
    let sum = sha2::Sha256::digest(&b);
    b.extend_from_slice(&sum);
    b
}

fn v1_row(tree: &str, k: &[u8], v: &[u8]) -> Vec<u8> {
    let mut r = (tree.len() as u16).to_be_bytes().to_vec();
    r.extend_from_slice(tree.as_bytes());
    r.extend_from_slice(&(k.len() as u32).to_be_bytes());
    r.extend_from_slice(k);
    r.extend_from_slice(&(v.len() as u32).to_be_bytes());
    r.extend_from_slice(v);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_backup_header_is_an_error_not_a_panic() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "");
    let file = root.path().join("crafted.backup");
    for bytes in [
        crafted_v1(u64::MAX / 2, &[]),
        crafted_v1(
            1,
            &[0, 5, b't', b'u', b'r', b'n', b's', 0xff, 0xff, 0xff, 0xf0],
        ),
    ] {
        std::fs::write(&file, bytes).unwrap();
        let out = tokio::task::block_in_place(|| {
            confab(&root, &["restore", "--from", file.to_str().unwrap()])
        });
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("malformed"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_restore_that_fails_leaves_the_data_as_it_was() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "");
    tokio::task::block_in_place(|| chat_once(&root, "keep me"));
    let data = root.path().join("data");
    let before = SledStore::open(&data, 8, 500).unwrap().dump().unwrap();
    // Verified checksum, a good row, then a row for a tree confab does not have.
    let rows = [v1_row("meta", b"x", b"y"), v1_row("nope", b"k", b"v")].concat();
    let file = root.path().join("bad.backup");
    std::fs::write(&file, crafted_v1(2, &rows)).unwrap();
    let out = tokio::task::block_in_place(|| {
        confab(
            &root,
            &["restore", "--force", "--from", file.to_str().unwrap()],
        )
    });
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("unknown tree"), "{err}");
    assert_eq!(
        SledStore::open(&data, 8, 500).unwrap().dump().unwrap(),
        before
    );
    let siblings: Vec<String> = std::fs::read_dir(root.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".data."))
        .collect();
    assert!(siblings.is_empty(), "{siblings:?}");

    // A good backup with --force replaces the data.
    let good = root.path().join("good.backup");
    let out =
        tokio::task::block_in_place(|| confab(&root, &["backup", "--out", good.to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    tokio::task::block_in_place(|| chat_once(&root, "after the backup"));
    let out = tokio::task::block_in_place(|| {
        confab(
            &root,
            &["restore", "--force", "--from", good.to_str().unwrap()],
        )
    });
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        SledStore::open(&data, 8, 500).unwrap().dump().unwrap(),
        before
    );
    assert_eq!(mode(&data), 0o700);
}

#[test]
fn writers_run_between_the_batches_of_a_backup() {
    use confab::ops::backup::{self, Chunks, BATCH_ROWS};
    use confab::store::MetaStore;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(&dir.path().join("data"), 8, 500).unwrap());
    for i in 0..BATCH_ROWS * 3 {
        store.meta_put(&format!("row{i:05}"), b"value").unwrap();
    }
    let file = dir.path().join("b.backup");
    let mut out = std::fs::File::create(&file).unwrap();
    let mut chunks = Chunks::new(store.clone());
    let mut written = 0;
    while let Some(bytes) = chunks.next_chunk().unwrap() {
        std::io::Write::write_all(&mut out, &bytes).unwrap();
        written += 1;
        if written == 2 {
            // Mid-backup (header and one batch out): a writer gets through at once.
            let s = store.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(s.meta_put("written during the backup", b"x"));
            });
            let done = rx.recv_timeout(Duration::from_secs(30));
            assert!(
                matches!(done, Ok(Ok(()))),
                "the writer was blocked: {done:?}"
            );
        }
    }
    assert!(
        written >= 4,
        "the backup came in batches ({written} chunks)"
    );
    drop(out);
    let rows = backup::verify(&file).unwrap();
    assert!(rows > (BATCH_ROWS * 3) as u64, "{rows}");
}
