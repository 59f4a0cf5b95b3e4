//! A fake OpenAI-compatible LLM server for trying confab locally.
//!
//! ```text
//! cargo run --example fake_openai -- --port 8089 [--latency-ms 200] [--reply "fixed text"] [--quiet]
//! ```
//!
//! Then point confab at it: `llm.base_url = "http://127.0.0.1:8089/v1"` (any API key works).
//! By default every chat completion is answered with `echo: <last user message>`.

#[path = "../tests/support/fake_openai.rs"]
mod fake_openai;

use std::net::SocketAddr;
use std::time::Duration;

use fake_openai::{Behavior, FakeOpenAi};

const USAGE: &str =
    "usage: fake_openai [--port N (default 8089)] [--latency-ms N] [--reply TEXT] [--quiet]";

fn main() {
    let mut port: u16 = 8089;
    let mut latency_ms: u64 = 0;
    let mut reply: Option<String> = None;
    let mut verbose = true;

    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = |name: &str| -> String {
            inline.clone().or_else(|| args.next()).unwrap_or_else(|| {
                eprintln!("fake_openai: {name} needs a value\n{USAGE}");
                std::process::exit(2)
            })
        };
        match flag.as_str() {
            "--port" | "-p" => port = parse(&value("--port"), "--port"),
            "--latency-ms" => latency_ms = parse(&value("--latency-ms"), "--latency-ms"),
            "--reply" => reply = Some(value("--reply")),
            "--quiet" | "-q" => verbose = false,
            "--help" | "-h" => {
                println!("{USAGE}");
                return;
            }
            other => {
                eprintln!("fake_openai: unknown argument {other:?}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let fake = match FakeOpenAi::start_on(addr).await {
            Ok(f) => f,
            Err(e) => {
                eprintln!("fake_openai: cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        };
        fake.set_latency(Duration::from_millis(latency_ms));
        fake.set_verbose(verbose);
        if let Some(text) = reply {
            fake.set_default(Behavior::Reply(text));
        }
        println!("fake OpenAI server listening; base_url = {}", fake.base_url);
        println!("press Ctrl-C to stop");
        if let Err(e) = tokio::signal::ctrl_c().await {
            eprintln!("fake_openai: cannot wait for Ctrl-C: {e}");
        }
        println!("fake_openai: {} requests served, bye", fake.request_count());
        fake.shutdown();
    });
}

fn parse<T: std::str::FromStr>(s: &str, flag: &str) -> T {
    s.parse().unwrap_or_else(|_| {
        eprintln!("fake_openai: bad value {s:?} for {flag}\n{USAGE}");
        std::process::exit(2)
    })
}
