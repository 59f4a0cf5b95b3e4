//! Rows as a sled store with the same data key would hold them, for backups, restores
//! and `confab migrate` of a Redis store (`dump.rs`).
//!
//! Without a data key sled's row keys carry ids in the clear and values are JSON. With
//! one (see `sled_store/layout.rs`) a user's row key is the store's keyed hash of
//! `tg:123` (32 bytes; its first 16 in `conv_index`), a conversation prefix the keyed
//! hash of its plain prefix (16 bytes), a username the keyed hash of `tg:name`, a cache
//! row the keyed hash of the engine's key — which is already the Redis cache id — and
//! every personal value is sealed for its sled row. Both backends derive these from the
//! same sub-keys once the salt is the same (`RedisStore::adopting_key`), so a Redis user
//! id (hex of the first 16 bytes of the keyed hash of `tg:<id>`) is the first half of
//! sled's row key for every Telegram and Discord id (digits need no escaping).

use std::collections::HashMap;

use super::RedisStore;
use crate::domain::{ConversationKey, Platform, UserRef};
use crate::store::codec::{normalise_username, turns_to_plain};
use crate::store::crypto::{self, Keys};
use crate::store::sled_store::{conv_prefix_plain, parse_conv_prefix};
use crate::store::{StoreError, StoreResult, Turn};

/// Sled's row keys and values under an optional data key.
pub(super) struct SledForm<'a> {
    keys: Option<&'a Keys>,
}

impl SledForm<'_> {
    fn hide(&self, domain: &[u8], plain: Vec<u8>, len: usize) -> Vec<u8> {
        match self.keys {
            Some(k) => k.index(domain, &plain)[..len.min(32)].to_vec(),
            None => plain,
        }
    }

    /// The key of a user's row in `users`.
    pub fn user_key(&self, user: &UserRef) -> Vec<u8> {
        self.hide(b"user", user.to_string().into_bytes(), 32)
    }

    /// The prefix of a conversation's rows in `turns`.
    pub fn conv_prefix(&self, conv: &ConversationKey) -> Vec<u8> {
        self.hide(b"conv", conv_prefix_plain(conv), 16)
    }

    /// A conversation's `conv_index` row.
    pub fn index_row(&self, conv: &ConversationKey) -> (Vec<u8>, Vec<u8>) {
        let plain_user = conv.user_ref().to_string().into_bytes();
        let mut k = match self.keys {
            Some(keys) => keys.index(b"user", &plain_user)[..16].to_vec(),
            None => [plain_user, vec![0]].concat(),
        };
        k.extend_from_slice(&self.conv_prefix(conv));
        let v = match self.keys {
            Some(_) => self.seal("conv_index", &k, &conv_prefix_plain(conv)),
            None => Vec::new(),
        };
        (k, v)
    }

    /// A `usernames` row pointing `name` on the user's platform at `user`.
    pub fn username_row(&self, user: &UserRef, name: &str) -> (Vec<u8>, Vec<u8>) {
        let plain = format!("{}:{}", user.platform.prefix(), normalise_username(name));
        let k = self.hide(b"username", plain.into_bytes(), 32);
        let v = self.seal("usernames", &k, user.to_string().as_bytes());
        (k, v)
    }

    /// `plain` sealed for row `key` of `tree` (as is without a data key; `meta` and
    /// `cache_time` are never sealed).
    pub fn seal(&self, tree: &str, key: &[u8], plain: &[u8]) -> Vec<u8> {
        match self.keys {
            Some(k) if !matches!(tree, "meta" | "cache_time") => k.seal(tree, key, plain),
            _ => plain.to_vec(),
        }
    }

    /// A record's JSON sealed for its row.
    pub fn encode<T: serde::Serialize>(
        &self,
        tree: &str,
        key: &[u8],
        v: &T,
    ) -> StoreResult<Vec<u8>> {
        let plain = serde_json::to_vec(v).map_err(|e| StoreError::Io(format!("encode: {e}")))?;
        Ok(self.seal(tree, key, &plain))
    }

    /// A `turns` row holding `turns` (one, or an exchange's), as JSON sealed for its row.
    pub fn encode_turns(&self, key: &[u8], turns: &[Turn]) -> StoreResult<Vec<u8>> {
        Ok(self.seal("turns", key, &turns_to_plain(turns, false)?))
    }

    /// The plain value of a sled row (opened with the data key).
    pub fn open(&self, tree: &'static str, key: &[u8], v: &[u8]) -> StoreResult<Vec<u8>> {
        match self.keys {
            Some(k) => k
                .open(tree, key, v)
                .map_err(|reason| StoreError::Corrupt { tree, reason }),
            None if crypto::is_sealed(v) => Err(StoreError::Corrupt {
                tree,
                reason: "encrypted, but no data key is set".into(),
            }),
            None => Ok(v.to_vec()),
        }
    }
}

/// What an encrypted sled row's hashed key stands for, learnt from the rows that name
/// it (`conv_index` values, `usernames` values) before the rows are loaded: one entry
/// per conversation and per named user in memory.
#[derive(Default)]
pub struct LoadIds {
    convs: HashMap<[u8; 16], ConversationKey>,
    users: HashMap<[u8; 16], UserRef>,
}

fn half(k: &[u8]) -> Option<[u8; 16]> {
    k.get(..16).and_then(|h| h.try_into().ok())
}

impl RedisStore {
    /// This store's view of sled's rows.
    pub(super) fn sled_form(&self) -> SledForm<'_> {
        SledForm {
            keys: self.keys.as_ref(),
        }
    }

    /// Learns ids from `rows` (only with a data key: otherwise keys name them).
    pub fn learn_ids(&self, ids: &mut LoadIds, rows: &[crate::store::sled_store::DumpRow]) {
        if self.keys.is_none() {
            return;
        }
        let form = self.sled_form();
        for (tree, k, v) in rows {
            match tree.as_str() {
                "conv_index" => {
                    let conv = form
                        .open("conv_index", k, v)
                        .ok()
                        .and_then(|p| parse_conv_prefix(&p));
                    let (Some(conv), Some(user), Some(c)) =
                        (conv, half(k), k.get(16..).and_then(half))
                    else {
                        continue;
                    };
                    ids.users.insert(user, conv.user_ref());
                    ids.convs.insert(c, conv);
                }
                "usernames" => {
                    let user = form
                        .open("usernames", k, v)
                        .ok()
                        .and_then(|p| String::from_utf8(p).ok())
                        .and_then(|s| s.parse::<UserRef>().ok());
                    if let Some(user) = user {
                        if let Some(h) = half(&form.user_key(&user)) {
                            ids.users.insert(h, user);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// The conversation of a `turns` row prefix (plain, or a hash learnt in `ids`).
    pub(super) fn conversation_of(&self, prefix: &[u8], ids: &LoadIds) -> Option<ConversationKey> {
        match self.keys {
            Some(_) => half(prefix).and_then(|h| ids.convs.get(&h).cloned()),
            None => parse_conv_prefix(prefix),
        }
    }

    /// The user of a `users` row key: `None` for a hashed key nothing named.
    pub(super) fn user_of(&self, key: &[u8], ids: &LoadIds) -> Option<UserRef> {
        match self.keys {
            Some(_) => half(key).and_then(|h| ids.users.get(&h).cloned()),
            None => std::str::from_utf8(key).ok().and_then(|s| s.parse().ok()),
        }
    }
}

/// Platforms a username may belong to (its key names the platform, hashed).
pub(super) const NAMED_PLATFORMS: [Platform; 2] = [Platform::Telegram, Platform::Discord];
