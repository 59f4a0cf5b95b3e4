//! What `deploy/` ships against the daemon it watches (SPEC §15): every metric the
//! Grafana dashboard and the Prometheus alert rules name is in a live `/metrics`, every
//! panel reads the `datasource` variable, every alert has its labels, annotations and
//! README runbook; and every line logged at `error` carries a stable `error.kind`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::fake_openai::FakeOpenAi;
use crate::fake_telegram::{FakeTelegram, Fault};
use crate::harness::{msg, Daemon, Root, TG_BOT_TOML, TG_TOKEN};
use crate::telegram::spawn_daemon;

const WAIT: Duration = Duration::from_secs(30);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---- PromQL: which metrics an expression reads ------------------------------------

/// Words of PromQL that are not metric names (operators, modifiers, literals).
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
];

/// Clauses whose parenthesised list holds label names, not metrics.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The expression without string literals (label values, regexes).
fn strip_strings(expr: &str) -> String {
    let mut out = String::new();
    let mut chars = expr.chars();
    while let Some(c) = chars.next() {
        if !matches!(c, '"' | '\'' | '`') {
            out.push(c);
            continue;
        }
        let mut escaped = false;
        for d in chars.by_ref() {
            match d {
                '\\' if c != '`' && !escaped => escaped = true,
                d if d == c && !escaped => break,
                _ => escaped = false,
            }
        }
        out.push(' ');
    }
    out
}

/// The expression without anything between `open` and `close` (label matchers,
/// range and subquery selectors).
fn strip_enclosed(expr: &str, open: char, close: char) -> String {
    let mut out = String::new();
    let mut depth = 0usize;
    for c in expr.chars() {
        if c == open {
            depth += 1;
        } else if c == close && depth > 0 {
            depth -= 1;
            out.push(' ');
        } else if depth == 0 {
            out.push(c);
        }
    }
    out
}

/// Runs of identifier characters with their byte offsets (numbers and `$variables`
/// included: the caller drops them).
fn words(expr: &str) -> Vec<(usize, &str)> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '.' | '$');
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in expr.char_indices().chain([(expr.len(), ' ')]) {
        match (start, is_word(c)) {
            (None, true) => start = Some(i),
            (Some(s), false) => {
                out.push((s, &expr[s..i]));
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// The expression without `by (…)`, `on (…)`, `group_left (…)` and the like.
fn strip_label_lists(expr: &str) -> String {
    let mut out = expr.to_string();
    loop {
        let found = words(&out).into_iter().find_map(|(at, w)| {
            let after = at + w.len();
            let rest = &out[after..];
            let open = rest.len() - rest.trim_start().len();
            (LABEL_LISTS.contains(&w) && rest.trim_start().starts_with('('))
                .then(|| (at, after + open))
        });
        let Some((at, paren)) = found else {
            return out;
        };
        let close = out[paren..]
            .find(')')
            .map(|i| paren + i + 1)
            .unwrap_or(out.len());
        out.replace_range(at..close, " ");
    }
}

/// Every metric name a PromQL expression reads: string literals, label matchers,
/// ranges and label lists removed; function names (a word before `(`), keywords,
/// numbers and Grafana `$variables` skipped.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let bare = strip_strings(expr);
    let bare = strip_enclosed(&bare, '{', '}');
    let bare = strip_enclosed(&bare, '[', ']');
    let bare = strip_label_lists(&bare);
    words(&bare)
        .into_iter()
        .filter(|(at, w)| {
            let first = w.chars().next().unwrap_or('0');
            let call = bare[at + w.len()..].trim_start().starts_with('(');
            let not_a_name = first.is_ascii_digit() || first == '$' || first == '.';
            let keyword = KEYWORDS.contains(&w.to_ascii_lowercase().as_str());
            !(not_a_name || call || keyword)
        })
        .map(|(_, w)| w.to_string())
        .collect()
}

/// A Grafana variable query: `label_values(metric{…}, label)` reads `metric`; anything
/// else is PromQL.
fn variable_metric_names(query: &str) -> BTreeSet<String> {
    let q = query.trim();
    match q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        Some(args) => {
            let series = strip_strings(args);
            let series = strip_enclosed(&series, '{', '}');
            match series.rsplit_once(',') {
                Some((metric, _label)) => metric_names(metric),
                None => BTreeSet::new(), // label_values(label): no metric
            }
        }
        None => metric_names(q),
    }
}

#[test]
fn metric_names_finds_only_the_metrics_of_an_expression() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.95, sum by (le, instance) (rate(confab_a_bucket{env=~"$env", le!="by(x)"}[$__rate_interval])))"#
        ),
        ["confab_a_bucket"]
    );
    assert_eq!(
        names("sum(rate(a_total[5m] offset 1h)) / on(instance) group_left(kind) b > bool 0.2"),
        ["a_total", "b"]
    );
    assert_eq!(names(r#"up{job="confab"} == 0"#), ["up"]);
    assert_eq!(
        names("1e6 * m unless max_over_time(n[1h:5m]) or Inf"),
        ["m", "n"]
    );
    assert_eq!(
        names("sum without (cause) (x) and ignoring (env) y"),
        ["x", "y"]
    );
    assert_eq!(
        variable_metric_names(r#"label_values(confab_uptime_seconds{env=~"$env"}, instance)"#)
            .into_iter()
            .collect::<Vec<_>>(),
        ["confab_uptime_seconds"]
    );
}

// ---- a live /metrics ----------------------------------------------------------------

/// The sample names a Prometheus text exposition holds: every sample line's name, and
/// what its `# TYPE` lines promise (`_bucket`/`_sum`/`_count` of a histogram, `_sum`/
/// `_count` of a summary, the name itself of a counter or gauge).
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut parts = decl.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// `/metrics` of a running daemon (Telegram fake, fake LLM) after one answered message.
async fn live_metrics() -> BTreeSet<String> {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(&llm.base_url, &tg.api_url, "", TG_BOT_TOML);
    let (daemon, addr) = Daemon::start_with_ops(&root).await;
    tg.send_private(1, "Ann", "hello");
    assert_eq!(tg.wait_for_sent(1, WAIT).await.len(), 1);
    let client = reqwest13::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    let body = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    daemon.stop().await.expect("clean stop");
    let names = exported_names(&body);
    assert!(
        names.contains("confab_reply_latency_seconds_bucket"),
        "{body}"
    );
    names
}

/// The names in `used` (with where each is used) that `exported` lacks.
fn missing(used: &[(String, String)], exported: &BTreeSet<String>) -> Vec<String> {
    used.iter()
        .flat_map(|(at, expr)| {
            metric_names(expr)
                .into_iter()
                .filter(|n| !exported.contains(n))
                .map(move |n| format!("{n} (in {at})"))
        })
        .collect()
}

// ---- the Grafana dashboard --------------------------------------------------------

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("deploy/grafana/confab.json")).expect("dashboard is JSON")
}

/// Every panel, rows' nested panels included.
fn panels(d: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    let mut todo: Vec<&serde_json::Value> = d["panels"].as_array().into_iter().flatten().collect();
    while let Some(p) = todo.pop() {
        todo.extend(p["panels"].as_array().into_iter().flatten());
        out.push(p);
    }
    out
}

/// (where, PromQL) of every panel target; variable queries reduced to their metric.
fn dashboard_queries(d: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default().to_string();
            out.push((format!("panel {:?}", p["title"]), expr));
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().or(v["query"].as_str());
            let names = variable_metric_names(q.unwrap_or_default());
            let expr = names.into_iter().collect::<Vec<_>>().join(" + ");
            out.push((format!("variable {:?}", v["name"]), expr));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_names_only_exported_metrics_through_the_datasource_variable() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().unwrap_or(0) >= 38,
        "schemaVersion"
    );
    let vars = d["templating"]["list"].as_array().expect("templating list");
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a prometheus datasource variable: {vars:?}"
    );
    let the_variable = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let mut charts = 0;
    for p in panels(&d).into_iter().filter(|p| p["type"] != "row") {
        let title = &p["title"];
        assert_eq!(p["datasource"], the_variable, "panel {title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            assert_eq!(t["datasource"], the_variable, "a target of panel {title}");
        }
        charts += 1;
    }
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"], the_variable, "variable {}", v["name"]);
    }
    assert!(charts >= 10, "{charts} panels");

    let queries = dashboard_queries(&d);
    let used: BTreeSet<String> = queries.iter().flat_map(|(_, e)| metric_names(e)).collect();
    // The areas SPEC §15 asks for, each through the metric that shows it.
    for area in [
        "confab_messages_total",
        "confab_replies_total",
        "confab_reply_latency_seconds_bucket",
        "confab_llm_request_seconds_sum",
        "confab_llm_errors_total",
        "confab_llm_tokens_total",
        "confab_cache_hits_total",
        "confab_rate_limited_total",
        "confab_circuit_state",
        "confab_delivery_retries_total",
        "confab_delivery_failed_total",
        "confab_updates_parked_total",
        "confab_store_write_seconds_bucket",
        "confab_resident_memory_bytes",
        "confab_ready",
    ] {
        assert!(used.contains(area), "the dashboard does not show {area}");
    }
    let exported = live_metrics().await;
    let missing = missing(&queries, &exported);
    assert!(
        missing.is_empty(),
        "the dashboard uses metrics /metrics does not export: {missing:#?}"
    );
}

// ---- the Prometheus alert rules ---------------------------------------------------

/// One alerting rule of deploy/prometheus/alerts.yml.
#[derive(Debug, Default)]
struct Rule {
    name: String,
    expr: String,
    severity: String,
    summary: String,
    description: String,
    runbook_url: String,
}

/// The value after `key:` on a line, unquoted (the file's own one-line style).
fn scalar(line: &str, key: &str) -> Option<String> {
    let v = line.trim().strip_prefix(key)?.strip_prefix(':')?.trim();
    Some(v.trim_matches('"').to_string())
}

/// The rules of alerts.yml. A small reader of the file's own layout (`- alert:` starts
/// a rule; `expr:` is one line or a `|` block; labels and annotations one line each),
/// not a YAML parser: promtool checks the YAML itself.
fn alert_rules() -> Vec<Rule> {
    let text = read("deploy/prometheus/alerts.yml");
    let mut rules: Vec<Rule> = Vec::new();
    let mut block: Option<usize> = None; // indentation of a `|` expr block's key
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        if let (Some(key_indent), Some(rule)) = (block, rules.last_mut()) {
            if line.trim().is_empty() || indent > key_indent {
                rule.expr.push_str(line.trim());
                rule.expr.push(' ');
                continue;
            }
            block = None;
        }
        if let Some(name) = scalar(line.trim().trim_start_matches("- "), "alert") {
            rules.push(Rule {
                name,
                ..Rule::default()
            });
            continue;
        }
        let Some(rule) = rules.last_mut() else {
            continue;
        };
        if let Some(expr) = scalar(line, "expr") {
            if expr == "|" || expr == ">" {
                block = Some(indent);
            } else {
                rule.expr = expr;
            }
        }
        let fields = [
            ("severity", &mut rule.severity),
            ("summary", &mut rule.summary),
            ("description", &mut rule.description),
            ("runbook_url", &mut rule.runbook_url),
        ];
        for (key, field) in fields {
            if let Some(v) = scalar(line, key) {
                *field = v;
            }
        }
    }
    rules
}

/// GitHub's anchor of a Markdown heading: lowercase, punctuation dropped, spaces → `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_has_severity_annotations_and_a_readme_runbook() {
    let rules = alert_rules();
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "ConfabDown",
            "ConfabNotReady",
            "ConfabLlmErrorRatio",
            "ConfabBreakerOpen",
            "ConfabReplyLatencyP95",
            "ConfabDeliveryFailures",
            "ConfabStoreErrors",
            "ConfabBudgetNoticeSurge",
        ]
    );
    let readme = read("README.md");
    let anchors: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| anchor(h.trim_start_matches('#')))
        .collect();
    let tests = read("deploy/prometheus/alerts_test.yml");
    for r in &rules {
        assert!(!r.expr.trim().is_empty(), "{r:?}");
        assert!(
            ["critical", "warning", "info"].contains(&r.severity.as_str()),
            "{r:?}"
        );
        assert!(!r.summary.is_empty() && !r.description.is_empty(), "{r:?}");
        let want = format!("README.md#{}", r.name.to_lowercase());
        assert_eq!(r.runbook_url, want, "{}", r.name);
        assert!(
            anchors.contains(&r.name.to_lowercase()),
            "README has no runbook section for {}",
            r.name
        );
        assert!(
            tests.contains(&format!("alertname: {}", r.name)),
            "alerts_test.yml never evaluates {}",
            r.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_rules_name_only_exported_metrics() {
    let rules = alert_rules();
    assert_eq!(rules.len(), 8, "{rules:#?}");
    let queries: Vec<(String, String)> = rules
        .iter()
        .map(|r| (format!("alert {}", r.name), r.expr.clone()))
        .collect();
    let mut exported = live_metrics().await;
    // Prometheus writes `up` for every target it scrapes.
    exported.insert("up".to_string());
    let missing = missing(&queries, &exported);
    assert!(
        missing.is_empty(),
        "the alert rules use metrics /metrics does not export: {missing:#?}"
    );
}

// ---- error.kind on error log lines ------------------------------------------------

/// The values `error.kind` may take.
fn kinds() -> BTreeSet<&'static str> {
    confab::events::ErrorKind::ALL
        .iter()
        .map(|k| k.as_str())
        .collect()
}

/// The text of a macro invocation starting at `open` (the `(`), through its `)`.
fn invocation(src: &str, open: usize) -> &str {
    let mut depth = 0usize;
    let mut in_str = false;
    let mut prev = ' ';
    for (i, c) in src[open..].char_indices() {
        match c {
            '"' if prev != '\\' => in_str = !in_str,
            '(' if !in_str => depth += 1,
            ')' if !in_str => {
                depth -= 1;
                if depth == 0 {
                    return &src[open..open + i + 1];
                }
            }
            _ => {}
        }
        prev = if prev == '\\' && c == '\\' { ' ' } else { c };
    }
    &src[open..]
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// New `error!` lines cannot be added without `error.kind`: every `error!(…)` and
/// `Level::ERROR` event in src/ names one, and a literal one is a documented kind.
#[test]
fn every_error_log_call_in_src_has_an_error_kind() {
    let mut files = Vec::new();
    rust_files(&repo("src"), &mut files);
    let (mut calls, mut lacking) = (0, Vec::new());
    for file in files {
        let src = std::fs::read_to_string(&file).expect("read source");
        let starts = src
            .match_indices("error!(")
            .map(|(i, m)| (i, i + m.len() - 1))
            .chain(
                src.match_indices("event!(")
                    .map(|(i, m)| (i, i + m.len() - 1)),
            );
        for (at, open) in starts {
            let before = src[..at].chars().next_back().unwrap_or(' ');
            if before.is_alphanumeric() || before == '_' {
                continue; // some_error!(…), not tracing's
            }
            let call = invocation(&src, open);
            if src[at..].starts_with("event!(") && !call.contains("Level::ERROR") {
                continue;
            }
            calls += 1;
            let line = src[..at].lines().count();
            let place = format!("{}:{line}", file.display());
            match call.split_once("error.kind") {
                None => lacking.push(place),
                Some((_, rest)) => {
                    let value = rest.trim_start().trim_start_matches('=').trim_start();
                    if let Some(lit) = value.strip_prefix('"') {
                        let lit = lit.split('"').next().unwrap_or_default();
                        assert!(kinds().contains(lit), "{place}: unknown kind {lit:?}");
                    }
                }
            }
        }
    }
    assert!(
        calls >= 30,
        "only {calls} error! calls found: is the scan blind?"
    );
    assert!(
        lacking.is_empty(),
        "error! without error.kind: {lacking:#?}"
    );
}

/// The JSON log lines at level ERROR in `log`, as (target, error.kind, message).
fn error_lines(log: &Path) -> Vec<(String, Option<String>, String)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|j| j["level"] == "ERROR")
        .map(|j| {
            let s = |k: &str| j[k].as_str().unwrap_or_default().to_string();
            let kind = j["error.kind"].as_str().map(str::to_string);
            (s("target"), kind, s("message"))
        })
        .collect()
}

/// Polls the log until an ERROR line with `kind` appears.
async fn wait_for_kind(log: &Path, kind: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !error_lines(log)
        .iter()
        .any(|(_, k, _)| k.as_deref() == Some(kind))
    {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(Instant::now() < deadline, "no {kind} error line:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The real daemon with JSON logs: a corrupt stored turn (`store_corrupt`), a reply
/// given up after `delivery.max_retry_secs` (`delivery_expired`) and a refused reload
/// (`config`) each log one ERROR line with its kind; every confab ERROR line has one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_lines_carry_their_error_kind_in_json_logs() {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let extra = "[log]\nformat = \"json\"\n[delivery]\nmax_retry_secs = 1\n";
    let root = Root::telegram(&llm.base_url, &tg.api_url, extra, TG_BOT_TOML);
    {
        let app = root.build();
        let mut first = msg("5", "first turn");
        first.update_id = None;
        app.engine.handle(&first).await;
    }
    {
        let store =
            confab::store::SledStore::open(&root.path().join("data"), 8, 500).expect("open store");
        let rows = store.dump().expect("dump");
        let keys: Vec<_> = rows.into_iter().filter(|(t, _, _)| t == "turns").collect();
        assert!(!keys.is_empty());
        for (_, k, _) in keys {
            store.raw_put("turns", &k, b"\xff{garbage").expect("damage");
        }
        store.db().flush().expect("flush");
    }
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "info");

    // 1. A damaged turn is skipped while answering.
    tg.send_private(5, "C", "still there?");
    assert_eq!(tg.wait_for_sent(1, WAIT).await.len(), 1);
    wait_for_kind(&log, "store_corrupt").await;

    // 2. Telegram refuses every send: the reply is given up after 1 s.
    tg.fail_for(
        "sendMessage",
        Fault::Status(502, "Bad Gateway".into()),
        Duration::from_secs(300),
    );
    tg.send_private(6, "D", "hello");
    wait_for_kind(&log, "delivery_expired").await;

    // 3. A reload with a broken bot file is refused.
    std::fs::write(root.path().join("bots/assistant.toml"), "prompt = [").expect("write");
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) with our own child's pid and a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    wait_for_kind(&log, "config").await;
    let _ = child.kill();
    let _ = child.wait();

    let lines = error_lines(&log);
    let has = |kind: &str, message: &str| {
        lines
            .iter()
            .any(|(_, k, m)| k.as_deref() == Some(kind) && m.contains(message))
    };
    assert!(
        has("store_corrupt", "corrupt store entry skipped"),
        "{lines:#?}"
    );
    assert!(has("delivery_expired", "giving up"), "{lines:#?}");
    assert!(has("config", "reload failed"), "{lines:#?}");
    for (target, kind, message) in &lines {
        if target.starts_with("confab") {
            let kind = kind.as_deref().unwrap_or("<none>");
            assert!(kinds().contains(kind), "{target}: {message}: kind {kind}");
        }
    }
}
