//! tracing setup: pretty on a terminal, JSON lines in production; `RUST_LOG` wins over
//! `log.level`. Every line carries the environment (`"env":"staging"` in JSON, a
//! `[staging]` prefix in pretty logs), including lines from spawned tasks. Message
//! text is only ever logged at debug or below.
//!
//! serenity, tungstenite, reqwest, hyper and teloxide log request routes, interaction
//! tokens and the gateway IDENTIFY frame (the bot token, as frame bytes) at debug and
//! trace. Those targets are capped at info — even under `RUST_LOG=trace` — unless
//! `log.unsafe_debug = true`.

use opentelemetry_sdk::trace::SdkTracer;
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::LogFormat;

/// Wraps a formatter and stamps the environment onto every line.
struct WithEnv<F> {
    inner: F,
    env: Option<&'static str>,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithEnv<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let Some(env) = self.env else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) if self.json => write!(writer, "{{\"env\":\"{env}\",{rest}"),
            _ => write!(writer, "[{env}] {line}"),
        }
    }
}

/// Log targets (prefixes) that print secrets below info.
const SECRET_BEARING: &[&str] = &[
    "serenity",
    "tungstenite",
    "tokio_tungstenite",
    "async_tungstenite",
    "reqwest",
    "hyper",
    "h2",
    "rustls",
    "teloxide",
];

/// The cap ANDed with the level filter: everything passes except the secret-bearing
/// targets below info (unless `unsafe_debug`).
fn secret_cap(unsafe_debug: bool) -> Targets {
    let cap = Targets::new().with_default(LevelFilter::TRACE);
    if unsafe_debug {
        return cap;
    }
    SECRET_BEARING
        .iter()
        .fold(cap, |cap, t| cap.with_target(*t, LevelFilter::INFO))
}

/// Installs the global subscriber with the secret cap on. Safe to call once; later
/// calls are ignored.
/// `traces`: see [`init_config`].
pub fn init(format: LogFormat, level: &str, env: Option<&'static str>, traces: Option<SdkTracer>) {
    init_with(format, level, env, false, traces);
}

/// The daemon's logging from `[log]`: format, level and `unsafe_debug`; with `traces`
/// (see `telemetry`), confab's spans are also exported as OpenTelemetry traces.
pub fn init_config(
    log: &crate::config::LogConfig,
    env: Option<&'static str>,
    traces: Option<SdkTracer>,
) {
    init_with(log.format, &log.level, env, log.unsafe_debug, traces);
    install_panic_hook();
    if log.unsafe_debug {
        tracing::warn!("log.unsafe_debug is on: debug/trace logs of the HTTP and gateway clients can contain tokens");
    }
}

/// Panics are logged as one `error` line with where they happened, never with their
/// message: a panic while handling an update can quote the user's text (SPEC §11). The
/// adapters catch them per update and count them; this only decides what reaches the log.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_else(|| "unknown".into());
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        tracing::error!(
            target: "panic",
            location = location.as_str(),
            thread,
            error.kind = "panic",
            "a thread panicked (its message is withheld: it can quote user text)"
        );
    }));
}

/// The log lines: JSON or pretty, on stderr, filtered by the level and the secret cap
/// (a filter of this layer only, so the trace layer sees spans the log level hides).
fn log_layer(
    format: LogFormat,
    level: &str,
    env: Option<&'static str>,
    unsafe_debug: bool,
) -> Box<dyn Layer<Registry> + Send + Sync> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = filter.and(secret_cap(unsafe_debug));
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Json => layer
            .event_format(WithEnv {
                inner: format::format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
                env,
                json: true,
            })
            .fmt_fields(format::JsonFields::new())
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => layer
            .event_format(WithEnv {
                inner: format::format().with_target(false),
                env,
                json: false,
            })
            .with_filter(filter)
            .boxed(),
    }
}

/// Without `traces` the subscriber is the log layer alone: no trace layer exists, not
/// even an idle one.
fn init_with(
    format: LogFormat,
    level: &str,
    env: Option<&'static str>,
    unsafe_debug: bool,
    traces: Option<SdkTracer>,
) {
    let logs = tracing_subscriber::registry().with(log_layer(format, level, env, unsafe_debug));
    let _ = match traces {
        None => logs.try_init(),
        Some(tracer) => logs.with(crate::telemetry::layer(tracer)).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passes(cap: &Targets, target: &str, level: tracing::Level) -> bool {
        cap.would_enable(target, &level)
    }

    #[test]
    fn secret_bearing_targets_are_capped_at_info_unless_unsafe_debug() {
        let cap = secret_cap(false);
        use tracing::Level;
        for t in [
            "serenity::gateway::ws",
            "tungstenite::protocol",
            "reqwest::connect",
            "hyper_util::client",
            "teloxide_core::net",
        ] {
            assert!(!passes(&cap, t, Level::DEBUG), "{t}");
            assert!(passes(&cap, t, Level::INFO), "{t}");
        }
        assert!(passes(&cap, "confab::engine", Level::TRACE));
        let open = secret_cap(true);
        assert!(passes(&open, "serenity::gateway::ws", Level::TRACE));
    }
}
