//! tracing setup: pretty on a terminal, JSON lines in production; `RUST_LOG` wins over
//! `log.level`. Every line carries the environment (`"env":"staging"` in JSON, a
//! `[staging]` prefix in pretty logs), including lines from spawned tasks. Message
//! text is only ever logged at debug or below.

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

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

/// Installs the global subscriber. Safe to call once; later calls are ignored.
pub fn init(format: LogFormat, level: &str, env: Option<&'static str>) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
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
            .try_init(),
        LogFormat::Pretty => builder
            .event_format(WithEnv {
                inner: format::format().with_target(false),
                env,
                json: false,
            })
            .try_init(),
    };
}
