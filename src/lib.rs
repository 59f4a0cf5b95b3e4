//! confab: one daemon connecting Telegram and Discord bots to one conversation engine
//! backed by any OpenAI-compatible LLM.
//!
//! Module map (see ARCHITECTURE.md for invariants and the flow of one message):
//! - [`config`]   — raw serde structs → validated [`config::Config`]; every problem collected.
//! - [`coord`]    — coordination between instances: rate limiter, per-conversation
//!   ordering, polling lease; local (governor, locks) or shared on Redis.
//! - [`domain`]   — platform-neutral types: [`domain::Inbound`], [`domain::Reply`], user refs.
//! - [`engine`]   — the pipeline: dedupe, ban, commands, validation, limits, budget, memory,
//!   prompt, cache, LLM, memory append. Imports no SDK, no sled, no async-openai.
//! - [`events`]   — internal events: one struct per happening; `emit` logs and counts it.
//! - [`llm`]      — provider trait, async-openai implementation, retry/breaker/concurrency.
//! - [`store`]    — one trait per role of the store (`Store` = all of them), sled behind them
//!   (encryption at rest, migrations, dumps for backups).
//! - [`adapters`] — Telegram (teloxide), Discord (serenity) and the terminal; one shared
//!   delivery machinery (durable inbox, retries, panics parked); translate, never decide.
//! - [`app`]      — composition root: builds everything and runs it; ordered shutdown.
//! - [`ops`]      — operator interfaces: the ops HTTP endpoint (`/healthz`, `/readyz`,
//!   `/metrics`), the local control socket, backups, sd_notify.
//! - [`shutdown`] — cancellation, task tracking, signals.
//! - [`logging`]  — tracing setup (pretty or JSON), `env` on every line, secret-bearing
//!   targets capped, panics logged without their message.
//! - [`memory`]   — allocator tuning (glibc arenas, returning freed heap after sweeps).
//! - [`telemetry`] — OpenTelemetry traces over OTLP/HTTP (off unless a collector is named).

pub mod adapters;
pub mod app;
pub mod config;
pub mod coord;
pub mod domain;
pub mod engine;
pub mod events;
pub mod llm;
pub mod logging;
pub mod memory;
pub mod ops;
pub mod shutdown;
pub mod store;
pub mod telemetry;

#[cfg(test)]
mod proptests;
