//! How rows are keyed and encoded, with and without a data key.
//!
//! Without a key, keys carry ids in the clear (`tg:123`, conversation prefixes, `tg:name`)
//! and values are compact (version byte + postcard; JSON from older versions still
//! reads). With a key, every value of a personal tree is sealed for its row
//! (see [`crypto`]) and the ids and names in keys are replaced by keyed hashes:
//! a conversation prefix by 16 bytes, a user by 32 (16 in `conv_index`), a username by
//! 32, a cache key by its HMAC. A plaintext value in a sealed tree is a corrupt entry.

use std::borrow::Cow;

use super::{io, SledStore};
use crate::domain::{ConversationKey, Platform, UserRef};
pub(super) use crate::store::codec::normalise_username;
use crate::store::codec::{Codec, UsernameIndex};
use crate::store::{crypto, StoreResult};

pub(super) const SEP: u8 = 0;

/// Trees whose values are sealed when a data key is set (every tree but `meta` and
/// `cache_time`, whose values are empty).
pub(super) const SEALED_TREES: &[&str] = &[
    "turns",
    "conv_index",
    "users",
    "usernames",
    "cache",
    "audit",
    "handled",
    "inbox",
];

/// `bot \0 platform \0 chat \0 user \0`: the plain conversation prefix.
pub(crate) fn conv_prefix_plain(key: &ConversationKey) -> Vec<u8> {
    let mut p = Vec::with_capacity(key.bot.len() + key.chat.len() + key.user.len() + 8);
    for part in [
        key.bot.as_bytes(),
        key.platform.prefix().as_bytes(),
        key.chat.as_bytes(),
        key.user.as_bytes(),
    ] {
        p.extend_from_slice(part);
        p.push(SEP);
    }
    p
}

pub(crate) fn parse_conv_prefix(p: &[u8]) -> Option<ConversationKey> {
    let parts: Vec<&[u8]> = p.split(|b| *b == SEP).collect();
    // four parts plus the empty tail after the last separator
    let [bot, platform, chat, user, tail] = parts.as_slice() else {
        return None;
    };
    if !tail.is_empty() {
        return None;
    }
    let s = |b: &[u8]| String::from_utf8(b.to_vec()).ok();
    let platform = Platform::from_prefix(std::str::from_utf8(platform).ok()?)?;
    Some(ConversationKey {
        bot: s(bot)?,
        platform,
        chat: s(chat)?,
        user: s(user)?,
    })
}

pub(crate) fn time_key(at: i64, key: &[u8; 32]) -> Vec<u8> {
    let mut k = Vec::with_capacity(40);
    k.extend_from_slice(&(at.max(0) as u64).to_be_bytes());
    k.extend_from_slice(key);
    k
}

impl Codec for SledStore {
    type Key = [u8];
    const COMPACT: bool = true;

    /// Seals `plain` for row `key` of `tree` when a data key is set and the tree is personal.
    fn seal(&self, tree: &str, key: &[u8], plain: &[u8]) -> Vec<u8> {
        match &self.keys {
            Some(k) if SEALED_TREES.contains(&tree) => k.seal(tree, key, plain),
            _ => plain.to_vec(),
        }
    }

    fn unseal<'a>(&self, tree: &str, key: &[u8], bytes: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
        match &self.keys {
            Some(k) if SEALED_TREES.contains(&tree) => k.open(tree, key, bytes).map(Cow::Owned),
            Some(_) => Ok(Cow::Borrowed(bytes)),
            None if crypto::is_sealed(bytes) || crypto::is_sealed_v1(bytes) => {
                Err("encrypted, but no data key is set".into())
            }
            None => Ok(Cow::Borrowed(bytes)),
        }
    }
}

impl SledStore {
    /// `plain` as is, or its keyed hash (first `len` bytes) when a data key is set.
    fn hide(&self, domain: &[u8], plain: Vec<u8>, len: usize) -> Vec<u8> {
        match &self.keys {
            Some(k) => k.index(domain, &plain)[..len.min(32)].to_vec(),
            None => plain,
        }
    }

    /// The prefix of a conversation's rows in `turns`.
    pub(super) fn conv_prefix(&self, key: &ConversationKey) -> Vec<u8> {
        self.hide(b"conv", conv_prefix_plain(key), 16)
    }

    /// The key of a user's row in `users`.
    pub(super) fn user_key(&self, user: &UserRef) -> Vec<u8> {
        self.hide(b"user", user.to_string().into_bytes(), 32)
    }

    /// The prefix of a user's rows in `conv_index`.
    pub(super) fn index_user_prefix(&self, user: &UserRef) -> Vec<u8> {
        let mut plain = user.to_string().into_bytes();
        match &self.keys {
            Some(k) => k.index(b"user", &plain)[..16].to_vec(),
            None => {
                plain.push(SEP);
                plain
            }
        }
    }

    /// The `conv_index` row of a conversation: its key and (unsealed) value.
    pub(super) fn index_row(&self, key: &ConversationKey) -> (Vec<u8>, Vec<u8>) {
        let mut k = self.index_user_prefix(&key.user_ref());
        k.extend_from_slice(&self.conv_prefix(key));
        // With a key the conversation cannot be read back from the row's key.
        let v = match &self.keys {
            Some(_) => conv_prefix_plain(key),
            None => Vec::new(),
        };
        (k, v)
    }

    /// The key of `@name` on `platform` in `usernames`.
    pub(super) fn username_key(&self, platform: Platform, name: &str) -> Vec<u8> {
        let plain = format!("{}:{}", platform.prefix(), normalise_username(name));
        self.hide(b"username", plain.into_bytes(), 32)
    }

    /// The row key of a cache entry: the engine's SHA-256, keyed (HMAC) with a data key,
    /// so a backup cannot confirm a guessed question.
    pub(super) fn cache_row_key(&self, key: &[u8; 32]) -> [u8; 32] {
        match &self.keys {
            Some(k) => k.index(b"cache", key),
            None => *key,
        }
    }

    /// Whether a `usernames` value names `user`.
    pub(super) fn username_points_at(&self, key: &[u8], value: &[u8], user: &UserRef) -> bool {
        self.unseal("usernames", key, value)
            .is_ok_and(|v| v.as_ref() == user.to_string().as_bytes())
    }
}

impl UsernameIndex for SledStore {
    fn drop_username(&self, user: &UserRef, name: &str) -> StoreResult<()> {
        let k = self.username_key(user.platform, name);
        if let Some(v) = self.usernames.get(&k).map_err(io)? {
            if self.username_points_at(&k, &v, user) {
                self.usernames.remove(&k).map_err(io)?;
            }
        }
        Ok(())
    }

    fn set_username(&self, user: &UserRef, name: &str) -> StoreResult<()> {
        let k = self.username_key(user.platform, name);
        let v = self.seal("usernames", &k, user.to_string().as_bytes());
        self.usernames.insert(k, v).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use crate::store::{ConversationStore, UserRecord, UserStore};

    #[test]
    fn with_a_key_plaintext_and_moved_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open_with_key(dir.path(), 8, 500, Some(KEY)).unwrap();
        let (a, b) = (tg("1"), tg("2"));
        s.put_user(&a, &banned("spam")).unwrap();
        s.put_user(&b, &UserRecord::default()).unwrap();
        // a plaintext record planted in place of b's: refused, not trusted
        let plain = serde_json::to_vec(&UserRecord::default()).unwrap();
        s.users.insert(s.user_key(&a), plain).unwrap();
        assert!(s.user(&a).is_err());
        // b's sealed record moved onto a's key does not open either
        let sealed_b = s.users.get(s.user_key(&b)).unwrap().unwrap();
        s.users.insert(s.user_key(&a), sealed_b).unwrap();
        assert!(s.user(&a).is_err());
        // a plaintext turn is skipped like any corrupt entry
        let mut k = s.conv_prefix(&key("1"));
        k.extend_from_slice(&1u64.to_be_bytes());
        s.turns
            .insert(k, serde_json::to_vec(&turn("planted", 1)).unwrap())
            .unwrap();
        assert!(s.all_turns(&key("1")).unwrap().is_empty());
    }
}
