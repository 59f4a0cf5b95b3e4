//! OpenTelemetry traces (SPEC §15) from the real binary (tracing is a process-global
//! subscriber) to an in-process OTLP/HTTP receiver: one trace per update with the engine
//! stages, the LLM call with GenAI attributes and the send; no text, token or key in it;
//! nothing at all when no endpoint is configured.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::fake_openai::{reported_usage, FakeOpenAi};
use crate::fake_otlp::{as_int, as_str, FakeOtlp, Received1};
use crate::fake_telegram::FakeTelegram;
use crate::harness::{wait_exit, Root, TG_BOT_TOML, TG_TOKEN};

const WAIT: Duration = Duration::from_secs(30);
const LLM_KEY: &str = "sk-otel-test-key-0123456789abcdef";
const TEXT: &str = "Kalamazoo pineapple sonnet 7431";
const FIRST_NAME: &str = "Zebediah";
const STAGES: [&str; 9] = [
    "dedupe", "gate", "route", "admit", "context", "history", "cache", "call", "record",
];

/// Every `OTEL_*` variable that could turn traces on from the test's own environment.
const OTEL_VARS: [&str; 6] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_SDK_DISABLED",
];

async fn setup(settings: &str) -> (FakeOpenAi, FakeTelegram, Root) {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(&llm.base_url, &tg.api_url, settings, TG_BOT_TOML);
    let env = format!("ASSISTANT_TELEGRAM_TOKEN={TG_TOKEN}\nOPENAI_API_KEY={LLM_KEY}\n");
    std::fs::write(root.env_file(), env).expect("write env file");
    (llm, tg, root)
}

/// `confab run` with only `env` of the OTEL variables set. The batch processor's delay
/// is an hour, so spans that arrive were flushed by the graceful stop.
fn spawn(root: &Root, env: &[(&str, &str)]) -> Child {
    let log = std::fs::File::create(root.path().join("daemon.log")).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_confab"));
    cmd.args(["run", "--env", "staging", "--root"])
        .arg(root.path())
        .arg("--env-file")
        .arg(root.env_file())
        .env("RUST_LOG", "info")
        .env("OTEL_BSP_SCHEDULE_DELAY", "3600000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    for var in OTEL_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.spawn().expect("spawn confab")
}

/// One message through the daemon; returns the reply, after a graceful stop (exit 0).
async fn one_message(tg: &FakeTelegram, mut child: Child, root: &Root) -> String {
    tg.send_private(4242, FIRST_NAME, TEXT);
    let sent = tg.wait_for_sent(1, WAIT).await;
    let log = || std::fs::read_to_string(root.path().join("daemon.log")).unwrap_or_default();
    let reply = sent.first().map(|m| m.text.clone());
    let Some(reply) = reply else {
        let _ = child.kill();
        panic!("no reply; log:\n{}", log());
    };
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let code = tokio::task::block_in_place(|| wait_exit(&mut child, WAIT));
    assert_eq!(code, Some(0), "graceful stop; log:\n{}", log());
    reply
}

fn id(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn named<'a>(spans: &'a [Received1], name: &str) -> Vec<&'a Received1> {
    spans.iter().filter(|s| s.span.name == name).collect()
}

/// The span tree of the one update: the root, then stages, LLM and send below it.
fn assert_one_trace_per_update(spans: &[Received1], llm: &FakeOpenAi, reply: &str) {
    let roots: Vec<_> = named(spans, "update");
    assert_eq!(roots.len(), 1, "one update, one root: {spans:#?}");
    let root = roots[0];
    assert!(
        root.span.parent_span_id.is_empty(),
        "the update span is the root"
    );
    assert_eq!(as_str(root.attr("platform")), Some("telegram"));
    assert_eq!(as_str(root.attr("bot")), Some("assistant"));
    let trace = &root.span.trace_id;
    let in_trace: Vec<&Received1> = spans.iter().filter(|s| &s.span.trace_id == trace).collect();
    let root_id = id(&root.span.span_id);
    for stage in STAGES {
        let found: Vec<_> = in_trace.iter().filter(|s| s.span.name == stage).collect();
        assert_eq!(found.len(), 1, "stage {stage} once in the trace");
        assert_eq!(
            id(&found[0].span.parent_span_id),
            root_id,
            "{stage} under the update"
        );
    }
    // Every span of confab belongs to this one trace (nothing split off a spawn).
    let traces: HashSet<_> = spans.iter().map(|s| s.span.trace_id.clone()).collect();
    assert_eq!(traces.len(), 1, "{spans:#?}");

    let chat = in_trace
        .iter()
        .find(|s| s.span.name.starts_with("chat "))
        .expect("an LLM span");
    let call = named(spans, "call")[0];
    assert_eq!(id(&chat.span.parent_span_id), id(&call.span.span_id));
    assert_eq!(chat.span.name, "chat gpt-4o-mini");
    assert_eq!(as_str(chat.attr("gen_ai.system")), Some("openai"));
    assert_eq!(as_str(chat.attr("gen_ai.operation.name")), Some("chat"));
    assert_eq!(
        as_str(chat.attr("gen_ai.request.model")),
        Some("gpt-4o-mini")
    );
    assert_eq!(
        as_str(chat.attr("gen_ai.response.finish_reasons")),
        Some("stop")
    );
    let requests = llm.requests();
    assert_eq!(requests.len(), 1);
    let (input, output) = reported_usage(&requests[0], reply);
    assert_eq!(
        as_int(chat.attr("gen_ai.usage.input_tokens")),
        Some(input as i64)
    );
    assert_eq!(
        as_int(chat.attr("gen_ai.usage.output_tokens")),
        Some(output as i64)
    );

    let send = in_trace
        .iter()
        .find(|s| s.span.name == "telegram send_part")
        .expect("a send span");
    assert_eq!(id(&send.span.parent_span_id), root_id);
    assert_eq!(as_str(send.attr("outcome")), Some("sent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_update_is_one_trace_from_receipt_through_stages_llm_and_send_without_any_text() {
    let otlp = FakeOtlp::start().await;
    let settings = format!("[otel]\nendpoint = {:?}\n", otlp.endpoint);
    let (llm, tg, root) = setup(&settings).await;
    let child = spawn(&root, &[]);
    let reply = one_message(&tg, child, &root).await;
    assert_eq!(
        reply,
        format!("echo: {TEXT}"),
        "the daemon answers as before"
    );

    assert!(otlp.posts() > 0, "the graceful stop flushed the spans");
    assert_eq!(otlp.undecodable(), 0);
    let spans = otlp.spans();
    assert_one_trace_per_update(&spans, &llm, &reply);

    let resource = &spans[0].resource;
    assert_eq!(as_str(resource.get("service.name")), Some("confab"));
    assert_eq!(
        as_str(resource.get("deployment.environment")),
        Some("staging")
    );
    assert!(as_str(resource.get("service.version")).is_some());
    let bots = format!("{:?}", resource.get("confab.bot"));
    assert!(bots.contains("assistant"), "{bots}");

    // No text, name, token or key anywhere: protobuf keeps strings as raw UTF-8, so a
    // byte scan of every body finds them in any name, attribute, event or resource.
    let secrets = [
        TEXT,
        "Kalamazoo",
        reply.as_str(),
        FIRST_NAME,
        TG_TOKEN,
        LLM_KEY,
    ];
    for body in otlp.raw() {
        for secret in secrets {
            let found = body.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!found, "{secret:?} was exported");
        }
    }
    let decoded = format!("{:?}", otlp.requests());
    for secret in secrets {
        assert!(!decoded.contains(secret), "{secret:?} was exported");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_otel_variables_turn_traces_on() {
    let otlp = FakeOtlp::start().await;
    let (llm, tg, root) = setup("").await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint.as_str()),
        ("OTEL_RESOURCE_ATTRIBUTES", "team=chat"),
    ];
    let child = spawn(&root, &env);
    let reply = one_message(&tg, child, &root).await;
    let spans = otlp.spans();
    assert_one_trace_per_update(&spans, &llm, &reply);
    let resource = &spans[0].resource;
    assert_eq!(as_str(resource.get("service.name")), Some("confab"));
    assert_eq!(as_str(resource.get("team")), Some("chat"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_and_replies_are_unchanged() {
    let otlp = FakeOtlp::start().await;
    let (_llm, tg, root) = setup("").await;
    let child = spawn(&root, &[]);
    let reply = one_message(&tg, child, &root).await;
    assert_eq!(reply, format!("echo: {TEXT}"));
    // The daemon has exited: whatever it would have exported was sent before that.
    assert_eq!(otlp.posts(), 0);
    let log = std::fs::read_to_string(root.path().join("daemon.log")).unwrap_or_default();
    assert!(!log.contains("OpenTelemetry traces on"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_one_warning_never_a_reply() {
    // A port that refuses connections: bound, then closed.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = dead.local_addr().expect("addr");
    drop(dead);
    let settings = format!("[otel]\nendpoint = \"http://{addr}\"\n");
    let (_llm, tg, root) = setup(&settings).await;
    let child = spawn(&root, &[]);
    let reply = one_message(&tg, child, &root).await;
    assert_eq!(reply, format!("echo: {TEXT}"));
    let log = std::fs::read_to_string(root.path().join("daemon.log")).unwrap_or_default();
    let warnings = log.matches("export to the collector failed").count();
    assert_eq!(warnings, 1, "{log}");
    for secret in [TEXT, TG_TOKEN, LLM_KEY] {
        assert!(!log.contains(secret), "{secret:?} in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confab_chat_traces_each_line_as_one_update() {
    use std::io::Write;
    let otlp = FakeOtlp::start().await;
    let llm = FakeOpenAi::start().await;
    let settings = format!("[otel]\nendpoint = {:?}\n", otlp.endpoint);
    let root = Root::new(&llm.base_url, &settings);
    std::fs::write(root.env_file(), format!("OPENAI_API_KEY={LLM_KEY}\n")).expect("env file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_confab"));
    cmd.args(["chat", "--env", "staging", "--root"])
        .arg(root.path())
        .arg("--env-file")
        .arg(root.env_file())
        .env("OTEL_BSP_SCHEDULE_DELAY", "3600000")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in OTEL_VARS {
        cmd.env_remove(var);
    }
    let mut child = cmd.spawn().expect("spawn confab chat");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{TEXT}\n").as_bytes())
        .expect("write");
    drop(stdin);
    let out = tokio::task::block_in_place(|| child.wait_with_output()).expect("chat output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("echo: {TEXT}")), "{stdout}");

    // End of input ends the chat; the spans left before the process exited.
    let spans = otlp.spans();
    let roots = named(&spans, "update");
    assert_eq!(roots.len(), 1, "{spans:#?}");
    assert_eq!(as_str(roots[0].attr("platform")), Some("terminal"));
    let trace = &roots[0].span.trace_id;
    let names: HashSet<&str> = spans
        .iter()
        .filter(|s| &s.span.trace_id == trace)
        .map(|s| s.span.name.as_str())
        .collect();
    for name in STAGES.iter().chain(&["chat gpt-4o-mini"]) {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    for body in otlp.raw() {
        for secret in [TEXT, LLM_KEY] {
            assert!(!body.windows(secret.len()).any(|w| w == secret.as_bytes()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_ratio_of_zero_exports_no_span() {
    let otlp = FakeOtlp::start().await;
    let settings = format!(
        "[otel]\nendpoint = {:?}\nsample_ratio = 0.0\n",
        otlp.endpoint
    );
    let (_llm, tg, root) = setup(&settings).await;
    let child = spawn(&root, &[]);
    let reply = one_message(&tg, child, &root).await;
    assert_eq!(reply, format!("echo: {TEXT}"));
    let log = std::fs::read_to_string(root.path().join("daemon.log")).unwrap_or_default();
    assert!(log.contains("OpenTelemetry traces on"), "{log}");
    assert!(otlp.spans().is_empty(), "{:#?}", otlp.spans());
}
