//! Which gateway shards this instance runs (`[discord] shards`, SPEC §14).
//!
//! `"auto"` asks Discord (`GET /gateway/bot`) how many shards the bot needs and runs all
//! of them here; `{ total = N, ids = "A-B" }` runs shards A..=B of N, so several
//! instances can split a large bot between them. Discord sends DMs on shard 0 only.

use serenity::all::Client;

use crate::config::Shards;

/// Starts the client's shards as configured; returns when they all stopped.
pub(super) async fn start(client: &mut Client, shards: Shards) -> serenity::Result<()> {
    match shards {
        Shards::Auto => client.start_autosharded().await,
        // serenity 0.12 reads the range's end as the LAST shard (inclusive):
        // `start_shard_range(2..3, 4)` runs shards 2 and 3.
        Shards::Range { total, first, last } => client.start_shard_range(first..last, total).await,
    }
}

/// The shards as a log field: `auto` or `2-3/4`.
pub(super) fn describe(shards: Shards) -> String {
    match shards {
        Shards::Auto => "auto".into(),
        Shards::Range { total, first, last } => format!("{first}-{last}/{total}"),
    }
}
