//! End-to-end tests: the real engine, real sled in a temp dir, the real async-openai client
//! against an in-process fake OpenAI server on loopback. One binary, many modules.

#[path = "../support/fake_discord.rs"]
mod fake_discord;
#[path = "../support/fake_lb.rs"]
mod fake_lb;
#[path = "../support/fake_openai.rs"]
mod fake_openai;
#[path = "../support/fake_otlp.rs"]
mod fake_otlp;
#[path = "../support/fake_telegram.rs"]
mod fake_telegram;
mod harness;
#[path = "../support/redis_server.rs"]
mod redis_server;

mod cli;
mod commands;
mod coord;
mod delivery;
mod deploy;
mod discord;
mod engine;
mod faults;
mod flood;
mod hardening;
mod media;
mod ops;
mod ops_http;
mod otel;
mod personal;
mod privacy;
mod redis;
mod redis_backup;
mod scaleout;
mod shards;
mod systemd;
mod telegram;
mod upgrade;
mod webhook;
