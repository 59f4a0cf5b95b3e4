//! The shipped systemd units: they pass `systemd-analyze verify` and rate ≤ 2.0 on
//! `systemd-analyze security` (skipped where systemd-analyze is not installed), bound
//! their resources, and start as the README installs them (an emulation of what systemd
//! does, run as root with `setpriv`; skipped with a printed reason elsewhere).

use std::path::Path;
use std::process::Command;

fn analyze_available() -> bool {
    Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Copies a unit into `dir` as instance `staging`, pointing ExecStart at the built binary.
fn instance(dir: &Path, unit: &str) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(unit);
    let text = std::fs::read_to_string(&src).expect("unit file");
    let text = text.replace("/usr/local/bin/confab", env!("CARGO_BIN_EXE_confab"));
    let dst = dir.join(unit.replace("@.", "@staging."));
    std::fs::write(&dst, text).expect("write unit");
    dst
}

fn exposure(unit: &Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(unit)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no rating in:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    line.split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unparsable: {line}"))
}

#[test]
fn units_verify_and_are_hardened() {
    if !analyze_available() {
        eprintln!("systemd-analyze not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for unit in [
        "confab@.service",
        "confab-backup@.service",
        "confab-backup@.timer",
    ] {
        let path = instance(dir.path(), unit);
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .current_dir(dir.path())
            .output()
            .expect("systemd-analyze verify");
        let err = String::from_utf8_lossy(&out.stderr);
        // verify also loads the units named in After= (not installed here) and may not find
        // the binary's dependencies; only our unit's own findings count.
        let ours: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("confab"))
            .filter(|l| !l.contains("not found"))
            .collect();
        assert!(ours.is_empty(), "{unit}: {err}");
        if unit.ends_with(".service") {
            let score = exposure(&path);
            assert!(score <= 2.0, "{unit}: exposure {score}");
        }
    }
}

// ---------------------------------------------------------------------------
// Starting the units the way systemd would, without systemd (never boot systemd here:
// see DEPENDENCY-FACTS). Root plays PID 1: it creates the StateDirectories owned by
// the service user, reads each LoadCredential= source and hands the service a private
// copy; ExecStart then runs as an unprivileged uid (`setpriv`), every absolute path of
// the unit mapped into a temp dir.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::fake_discord::FakeDiscord;
use crate::fake_openai::FakeOpenAi;
use crate::fake_telegram::FakeTelegram;
use crate::harness::{wait_exit, DC_BOT_ID, DC_TOKEN, TG_TOKEN};

/// The unprivileged uid/gid systemd's DynamicUser stands for in the emulation.
const SERVICE_UID: u32 = 65534;
const WAIT: Duration = Duration::from_secs(30);

/// The `[Service]` settings the emulation acts on, `%i` expanded.
#[derive(Debug, Default)]
struct Service {
    exec_start: Vec<String>,
    working_directory: Option<String>,
    state_directories: Vec<String>,
    state_directory_mode: u32,
    credentials: Vec<(String, String)>,
    environment: Vec<(String, String)>,
    environment_files: Vec<String>,
}

fn parse_service(unit: &str, instance: &str) -> Service {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(unit);
    let text = std::fs::read_to_string(&path).expect("unit file");
    let mut s = Service {
        state_directory_mode: 0o755,
        ..Service::default()
    };
    let mut in_service = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        let Some((key, value)) = line.split_once('=').filter(|_| in_service) else {
            continue;
        };
        let value = value.replace("%i", instance);
        let words = || value.split_whitespace().map(String::from);
        match key {
            "ExecStart" => s.exec_start = words().collect(),
            "WorkingDirectory" => s.working_directory = Some(value.clone()),
            "StateDirectory" => s.state_directories.extend(words()),
            "StateDirectoryMode" => {
                s.state_directory_mode = u32::from_str_radix(&value, 8).expect("octal mode")
            }
            "LoadCredential" => {
                let (id, src) = value.split_once(':').expect("ID:PATH");
                s.credentials.push((id.into(), src.into()));
            }
            "Environment" => s.environment.extend(words().filter_map(|w| {
                w.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })),
            "EnvironmentFile" => s.environment_files.push(value.clone()),
            _ => {}
        }
    }
    s
}

/// The host filesystem of the emulation: every absolute path of a unit lives below it.
struct Host {
    dir: tempfile::TempDir,
    binary: PathBuf,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().expect("tempdir");
        // The service user must traverse the root of the emulated filesystem.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        // `install -m 755 target/release/confab /usr/local/bin/confab`
        let binary = dir.path().join("usr/local/bin/confab");
        std::fs::create_dir_all(binary.parent().unwrap()).expect("mkdir");
        std::fs::copy(env!("CARGO_BIN_EXE_confab"), &binary).expect("install binary");
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Host { dir, binary }
    }

    fn map(&self, path: &str) -> PathBuf {
        self.dir.path().join(path.trim_start_matches('/'))
    }

    /// An argument or environment value: absolute paths are mapped, the rest kept.
    fn map_word(&self, word: &str) -> String {
        if word.starts_with('/') {
            self.map(word).to_string_lossy().into_owned()
        } else {
            word.to_string()
        }
    }

    /// `mkdir -p /etc/confab && cp -r config bots prompts /etc/confab/` and
    /// `install -m 600 .env.production /etc/confab/.env.production` (as root).
    fn install_config(&self, env: &str, secrets: &str) {
        let etc = self.map("/etc/confab");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        for sub in ["config", "bots", "prompts"] {
            std::fs::create_dir_all(etc.join(sub)).expect("mkdir");
            for entry in std::fs::read_dir(repo.join(sub)).expect("ls").flatten() {
                let to = etc.join(sub).join(entry.file_name());
                std::fs::copy(entry.path(), &to).expect("cp");
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))
                    .expect("chmod");
            }
        }
        let file = etc.join(format!(".env.{env}"));
        std::fs::write(&file, secrets).expect("write env file");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    /// What PID 1 does before ExecStart: StateDirectories owned by the service user,
    /// credentials copied (as root) into a directory only the service can read.
    fn prepare(&self, unit: &str, s: &Service) -> Vec<(String, String)> {
        for d in &s.state_directories {
            let path = self.map(&format!("/var/lib/{d}"));
            std::fs::create_dir_all(&path).expect("mkdir state");
            chown(&path, SERVICE_UID);
            std::fs::set_permissions(
                &path,
                std::fs::Permissions::from_mode(s.state_directory_mode),
            )
            .expect("chmod");
        }
        let mut env: Vec<(String, String)> = s
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), self.map_word(v)))
            .collect();
        if !s.credentials.is_empty() {
            let creds = self.map(&format!("/run/credentials/{unit}"));
            std::fs::create_dir_all(&creds).expect("mkdir credentials");
            for (id, src) in &s.credentials {
                let bytes = std::fs::read(self.map(src)).expect("root reads the credential");
                let to = creds.join(id);
                std::fs::write(&to, bytes).expect("write credential");
                chown(&to, SERVICE_UID);
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o400))
                    .expect("chmod");
            }
            chown(&creds, SERVICE_UID);
            std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o500))
                .expect("chmod");
            env.push((
                "CREDENTIALS_DIRECTORY".into(),
                creds.to_string_lossy().into_owned(),
            ));
        }
        for f in &s.environment_files {
            let text = std::fs::read_to_string(self.map(f)).expect("root reads EnvironmentFile");
            env.extend(text.lines().filter_map(|l| {
                l.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            }));
        }
        env
    }

    /// ExecStart as the service user, with only the unit's environment.
    fn exec(&self, s: &Service, env: &[(String, String)], log: &Path) -> Child {
        let mut args = s.exec_start.iter();
        let program = args.next().expect("ExecStart");
        assert_eq!(
            program, "/usr/local/bin/confab",
            "the unit runs the installed binary"
        );
        let cwd = self.map(s.working_directory.as_deref().unwrap_or("/"));
        std::fs::create_dir_all(&cwd).expect("working directory");
        let uid = SERVICE_UID.to_string();
        Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
            ])
            .arg(&self.binary)
            .args(args.map(|a| self.map_word(a)))
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log.with_extension("out")).expect("stdout file"))
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("spawn setpriv")
    }
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).expect("chown");
}

/// Where the emulation cannot run, the reason (printed, and the test passes).
pub(crate) fn emulation_unavailable() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: cannot play PID 1 (chown, setpriv)");
    }
    let setpriv = Command::new("setpriv").arg("--version").output();
    if !setpriv.is_ok_and(|o| o.status.success()) {
        return Some("setpriv (util-linux) is not installed");
    }
    None
}

/// The ops endpoint's address from the daemon's JSON log, once it listens.
fn ops_addr(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "ops HTTP endpoint listening")
        .and_then(|l| l["addr"].as_str().map(String::from))
}

async fn readyz(addr: &str) -> Option<u16> {
    let client = reqwest13::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?;
    let resp = client
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .ok()?;
    Some(resp.status().as_u16())
}

/// Waits for `/readyz` 200; panics with the log if the daemon exits or never gets ready.
async fn wait_ready(child: &mut Child, log: &Path) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the daemon exited ({status}) before /readyz said 200:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if let Some(addr) = ops_addr(log) {
            if readyz(&addr).await == Some(200) {
                return addr;
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "/readyz never said 200:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every file and directory below `dir`: owned by `uid`, nothing for group or others.
fn assert_private(dir: &Path, uid: u32) {
    for entry in std::fs::read_dir(dir).expect("ls").flatten() {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        assert_eq!(
            meta.uid(),
            uid,
            "{} owned by the service user",
            path.display()
        );
        assert_eq!(
            meta.mode() & 0o077,
            0,
            "{} is {:o}",
            path.display(),
            meta.mode()
        );
        if meta.is_dir() {
            assert_private(&path, uid);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installed_units_start_as_the_readme_says() {
    if let Some(why) = emulation_unavailable() {
        eprintln!("skipping the systemd start emulation: {why}");
        return;
    }
    let llm = FakeOpenAi::start().await;
    // The shipped bots/assistant.toml: @acme_bot and application 222 in production.
    let tg = FakeTelegram::start(TG_TOKEN, "acme_bot").await;
    let dc = FakeDiscord::start(DC_TOKEN, DC_BOT_ID, 222).await;
    let host = Host::new();
    // The operator's secrets file. The overrides point the shipped production config
    // at the fakes and name an admin (the shipped config has none).
    host.install_config(
        "production",
        &format!(
            "OPENAI_API_KEY=sk-proj-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c\n\
             ASSISTANT_TELEGRAM_TOKEN={TG_TOKEN}\nASSISTANT_DISCORD_TOKEN={DC_TOKEN}\n\
             CONFAB__ADMINS__TELEGRAM=42\nCONFAB__HTTP__BIND=127.0.0.1:0\n\
             CONFAB__LLM__BASE_URL={}\nCONFAB__TELEGRAM__API_URL={}\nCONFAB__DISCORD__API_URL={}\n",
            llm.base_url, tg.api_url, dc.api_url
        ),
    );

    let unit = "confab@production.service";
    let service = parse_service("confab@.service", "production");
    let env = host.prepare(unit, &service);
    let log = host.dir.path().join("confab.log");
    let mut daemon = host.exec(&service, &env, &log);
    wait_ready(&mut daemon, &log).await;
    tg.send_private(7, "Ann", "hello from systemd");
    let sent = tg.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].text, "echo: hello from systemd");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("CONFAB_DATA_KEY is not set"),
        "start-up warning:\n{text}"
    );

    // The daily backup job, while the daemon runs (through its control socket).
    let backup_unit = "confab-backup@production.service";
    let backup = parse_service("confab-backup@.service", "production");
    let backup_env = host.prepare(backup_unit, &backup);
    let backup_log = host.dir.path().join("backup.log");
    let mut job = host.exec(&backup, &backup_env, &backup_log);
    let code = tokio::task::block_in_place(|| wait_exit(&mut job, WAIT));
    assert_eq!(
        code,
        Some(0),
        "{}",
        std::fs::read_to_string(&backup_log).unwrap_or_default()
    );
    let backups: Vec<PathBuf> = std::fs::read_dir(host.map("/var/lib/confab-backups/production"))
        .expect("backup directory")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");

    Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .expect("kill");
    let code = tokio::task::block_in_place(|| wait_exit(&mut daemon, WAIT));
    assert_eq!(
        code,
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_private(&host.map("/var/lib/confab/production"), SERVICE_UID);
    assert_private(&host.map("/var/lib/confab-backups/production"), SERVICE_UID);
}

#[test]
fn both_services_bound_memory_tasks_and_files() {
    for unit in ["confab@.service", "confab-backup@.service"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("systemd")
            .join(unit);
        let text = std::fs::read_to_string(path).expect("unit file");
        for key in ["MemoryMax=", "TasksMax=", "LimitNOFILE="] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(key) && l.len() > key.len()),
                "{unit}: no {key}"
            );
        }
    }
}
