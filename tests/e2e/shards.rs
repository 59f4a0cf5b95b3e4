//! Discord shard layouts (SPEC §14): the real serenity client against the fake gateway,
//! which records the `shard` array of every IDENTIFY and serves `/gateway/bot`.

use std::time::{Duration, Instant};

use crate::fake_discord::FakeDiscord;
use crate::fake_openai::FakeOpenAi;
use crate::harness::{Daemon, Root, DC_APP_STAGING, DC_BOT_ID, DC_BOT_TOML, DC_TOKEN};

/// serenity waits ~5 s between two shards' IDENTIFYs.
const WAIT: Duration = Duration::from_secs(40);

async fn setup(shards: &str) -> (FakeOpenAi, FakeDiscord, Root) {
    let llm = FakeOpenAi::start().await;
    let dc = FakeDiscord::start(DC_TOKEN, DC_BOT_ID, DC_APP_STAGING).await;
    let settings = format!(
        "[discord]\napi_url = {:?}\nglobal_per_second = 10000\nper_chat_per_minute = 6000\ngroup_per_minute = 6000\n{shards}\n",
        dc.api_url
    );
    let root = Root::with_bot(&llm.base_url, &settings, DC_BOT_TOML);
    std::fs::write(
        root.path().join(".env.test"),
        format!("ASSISTANT_DISCORD_TOKEN={DC_TOKEN}\n"),
    )
    .expect("write env file");
    (llm, dc, root)
}

/// Sends a mention on `shard` (once its connection exists) and waits for the answer.
async fn answered_on_shard(dc: &FakeDiscord, shard: u64, channel: u64) {
    let text = format!("hello shard {shard}");
    let deadline = Instant::now() + WAIT;
    while !dc.send_guild_on_shard(shard, 9000, channel, 77, "sam", &text) {
        assert!(Instant::now() < deadline, "shard {shard} never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let want = format!("echo: {text}");
    loop {
        let got: Vec<String> = dc
            .messages_in(channel)
            .into_iter()
            .map(|m| m.content)
            .collect();
        if got.contains(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no answer on shard {shard}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sorted(mut v: Vec<[u64; 2]>) -> Vec<[u64; 2]> {
    v.sort_unstable();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_range_identifies_exactly_its_shards_and_answers_on_each() {
    let (_llm, dc, root) = setup("shards = { total = 4, ids = \"2-3\" }").await;
    let daemon = Daemon::start(&root);
    let shards = dc.wait_identified(2, WAIT).await;
    assert_eq!(sorted(shards), [[2, 4], [3, 4]]);
    answered_on_shard(&dc, 2, 501).await;
    answered_on_shard(&dc, 3, 502).await;
    // Still only those two: no shard of another instance was started meanwhile.
    assert_eq!(sorted(dc.identified_shards()), [[2, 4], [3, 4]]);
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_runs_the_shards_gateway_bot_recommends() {
    let (_llm, dc, root) = setup("").await;
    dc.set_recommended_shards(2);
    let daemon = Daemon::start(&root);
    let shards = dc.wait_identified(2, WAIT).await;
    assert_eq!(sorted(shards), [[0, 2], [1, 2]]);
    answered_on_shard(&dc, 0, 503).await;
    answered_on_shard(&dc, 1, 504).await;
    assert_eq!(dc.identified_shards().len(), 2);
    daemon.stop().await.expect("clean stop");
}
