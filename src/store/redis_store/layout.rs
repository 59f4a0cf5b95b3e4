//! Key names and value encoding on Redis.
//!
//! Every key starts with the configured prefix (`confab:staging`). Per-user keys carry
//! the user in a hash tag, so a user's conversations, index and record share a slot:
//! `P:turns:{U}:C` (a list of turns, oldest first), `P:convs:{U}` (hash: conversation
//! id → conversation), `P:user:{U}` (the record), `P:users` (set of U), `P:username:N`
//! (→ user), `P:cache:K` (entry, native TTL) with `P:cache_index` (sorted set by
//! created_at), `P:audit` (a stream), `P:handled:ID` (TTL), `P:inbox` and `P:meta`
//! (hashes), `P:ident:{U}` (with a data key: the user's sealed id, `identity.rs`).
//! Without a data key U is `tg:123`, C the escaped conversation, N
//! `tg:name`, K the hex cache key; with one they are keyed hashes (hex) and every
//! personal value is sealed with the tree name and the key as associated data, like
//! sled's. A plaintext value where a sealed one belongs is a corrupt entry.

use std::borrow::Cow;

use super::RedisStore;
use crate::domain::{ConversationKey, Platform, UserRef};
pub(super) use crate::store::codec::normalise_username;
use crate::store::codec::Codec;
use crate::store::{crypto, StoreError, StoreResult};

/// Escapes a part of a key: everything but `[A-Za-z0-9._@-]` as `%XX`, so `:`, `{`, `}`
/// and `*` never appear inside a part.
pub(super) fn escape(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for b in part.bytes() {
        if b.is_ascii_alphanumeric() || b"._@-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape(part: &str) -> Option<String> {
    super::percent_decode(part).ok()
}

/// `bot:platform:chat:user`, each part escaped: a conversation as text.
pub(super) fn conversation_text(key: &ConversationKey) -> String {
    [
        key.bot.as_str(),
        key.platform.prefix(),
        key.chat.as_str(),
        key.user.as_str(),
    ]
    .map(escape)
    .join(":")
}

pub(super) fn parse_conversation(text: &str) -> Option<ConversationKey> {
    let parts: Vec<&str> = text.split(':').collect();
    let [bot, platform, chat, user] = parts.as_slice() else {
        return None;
    };
    let platform = Platform::from_prefix(platform)?;
    Some(ConversationKey {
        bot: unescape(bot)?,
        platform,
        chat: unescape(chat)?,
        user: unescape(user)?,
    })
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 64 hex characters as 32 bytes.
pub(super) fn unhex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Codec for RedisStore {
    type Key = str;

    /// Every value Redis holds for a user is personal: sealed whenever a data key is set.
    fn seal(&self, tree: &str, key: &str, plain: &[u8]) -> Vec<u8> {
        match &self.keys {
            Some(k) => k.seal(tree, key.as_bytes(), plain),
            None => plain.to_vec(),
        }
    }

    fn unseal<'a>(&self, tree: &str, key: &str, bytes: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
        match &self.keys {
            Some(k) => k.open(tree, key.as_bytes(), bytes).map(Cow::Owned),
            None if crypto::is_sealed(bytes) => Err("encrypted, but no data key is set".into()),
            None => Ok(Cow::Borrowed(bytes)),
        }
    }
}

impl RedisStore {
    /// `P:rest`.
    pub(super) fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    /// `plain` as is, or the hex of its keyed hash when a data key is set.
    fn hide(&self, domain: &[u8], plain: String) -> String {
        match &self.keys {
            Some(k) => hex(&k.index(domain, plain.as_bytes())[..16]),
            None => plain,
        }
    }

    /// A user's id in keys (`tg:123` or a hash).
    pub(super) fn user_id(&self, user: &UserRef) -> String {
        let plain = format!("{}:{}", user.platform.prefix(), escape(&user.id));
        self.hide(b"user", plain)
    }

    /// A conversation's id in keys.
    pub(super) fn conversation_id(&self, key: &ConversationKey) -> String {
        self.hide(b"conv", conversation_text(key))
    }

    pub(super) fn turns_key(&self, key: &ConversationKey) -> String {
        let user = self.user_id(&key.user_ref());
        self.key(&format!("turns:{{{user}}}:{}", self.conversation_id(key)))
    }

    pub(super) fn convs_key(&self, user: &UserRef) -> String {
        self.key(&format!("convs:{{{}}}", self.user_id(user)))
    }

    pub(super) fn user_key(&self, user: &UserRef) -> String {
        self.key(&format!("user:{{{}}}", self.user_id(user)))
    }

    pub(super) fn users_key(&self) -> String {
        self.key("users")
    }

    pub(super) fn username_key(&self, platform: Platform, name: &str) -> String {
        let plain = format!(
            "{}:{}",
            platform.prefix(),
            escape(&normalise_username(name))
        );
        self.key(&format!("username:{}", self.hide(b"username", plain)))
    }

    /// The id of a cache entry: the engine's hash, keyed with a data key.
    pub(super) fn cache_id(&self, key: &[u8; 32]) -> String {
        match &self.keys {
            Some(k) => hex(&k.index(b"cache", key)),
            None => hex(key),
        }
    }

    pub(super) fn cache_key(&self, id: &str) -> String {
        self.key(&format!("cache:{id}"))
    }

    pub(super) fn cache_index_key(&self) -> String {
        self.key("cache_index")
    }

    pub(super) fn audit_key(&self) -> String {
        self.key("audit")
    }

    pub(super) fn handled_key(&self, update: &str) -> String {
        self.key(&format!("handled:{}", escape(update)))
    }

    pub(super) fn inbox_key(&self) -> String {
        self.key("inbox")
    }

    pub(super) fn meta_key(&self) -> String {
        self.key("meta")
    }

    /// Derives the data key's sub-keys (a passphrase with the salt kept in `P:meta`)
    /// and checks it against the key check the store was first written with: a wrong
    /// key, or none for a sealed store, fails here.
    pub(super) fn apply_key(&mut self, secret: Option<&str>) -> StoreResult<()> {
        let meta = self.meta_key();
        let open_err = |reason: String| StoreError::Open {
            path: format!("redis ({})", self.prefix),
            reason,
        };
        let Some(secret) = secret else {
            let check: Option<Vec<u8>> = self.hget(&meta, "key_check2")?;
            if check.is_some() {
                return Err(open_err(
                    "the store is encrypted but CONFAB_DATA_KEY is not set".into(),
                ));
            }
            return Ok(());
        };
        let salt = crypto::new_salt().to_vec();
        self.hsetnx(&meta, "kdf_salt", &salt)?;
        let salt: Vec<u8> = self.hget(&meta, "kdf_salt")?.unwrap_or(salt);
        self.keys = Some(crypto::Keys::derive(secret, &salt).map_err(open_err)?);
        let sealed = self.seal("meta", "key_check2", crypto::CHECK2);
        self.hsetnx(&meta, "key_check2", &sealed)?;
        let stored: Vec<u8> = self.hget(&meta, "key_check2")?.unwrap_or(sealed);
        match self.unseal("meta", "key_check2", &stored) {
            Ok(v) if v == crypto::CHECK2 => Ok(()),
            _ => Err(open_err(
                "CONFAB_DATA_KEY does not match the key this store was written with".into(),
            )),
        }
    }

    /// This store with the source's key material (`meta` `kdf_salt`, `key_check2`) in
    /// place of its own, its sub-keys derived again from `secret` and checked: a restore
    /// or migrate into an empty prefix then seals and hashes exactly as the source did.
    pub fn adopting_key(
        &self,
        salt: Option<&[u8]>,
        check: &[u8],
        secret: &str,
    ) -> StoreResult<RedisStore> {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(self.meta_key()).arg("key_check2").arg(check);
        if let Some(salt) = salt {
            cmd.arg("kdf_salt").arg(salt);
        }
        self.query::<()>(&cmd)?;
        let mut store = RedisStore {
            conn: self.conn.clone(),
            prefix: self.prefix.clone(),
            timeout: self.timeout,
            cache_ttl_secs: self.cache_ttl_secs,
            keys: None,
            stats: self.stats.clone(),
            secrets: self.secrets.clone(),
        };
        store.apply_key(Some(secret))?;
        Ok(store)
    }

    /// True when the prefix holds nothing but the key material opening it wrote.
    pub fn holds_only_key_material(&self) -> StoreResult<bool> {
        let keys = self.scan_keys(&self.pattern("*"))?;
        let meta = self.meta_key();
        if keys.iter().any(|k| k != &meta) {
            return Ok(false);
        }
        let fields: Vec<String> = self.query(redis::cmd("HKEYS").arg(&meta))?;
        Ok(fields.iter().all(|f| f == "kdf_salt" || f == "key_check2"))
    }

    /// The authenticator of backups of this store (`None` without a data key): the
    /// same as a sled store with the same key material.
    pub fn backup_auth(&self) -> Option<crypto::BackupAuth> {
        self.keys.as_ref().map(crypto::Keys::backup_auth)
    }

    pub(super) fn hget(&self, key: &str, field: &str) -> StoreResult<Option<Vec<u8>>> {
        self.query(redis::cmd("HGET").arg(key).arg(field))
    }

    fn hsetnx(&self, key: &str, field: &str, value: &[u8]) -> StoreResult<()> {
        self.query(redis::cmd("HSETNX").arg(key).arg(field).arg(value))
    }

    /// Every key matching `pattern` (SCAN; for rare whole-store walks: forget, purge).
    pub(super) fn scan_keys(&self, pattern: &str) -> StoreResult<Vec<String>> {
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = self.query(
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000),
            )?;
            out.extend(batch);
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// The prefix as a SCAN pattern (glob characters escaped).
    pub(super) fn pattern(&self, rest: &str) -> String {
        let mut p = String::new();
        for c in self.prefix.chars() {
            if "*?[]\\".contains(c) {
                p.push('\\');
            }
            p.push(c);
        }
        format!("{p}:{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversations_round_trip_through_their_text() {
        let key = ConversationKey {
            bot: "assistant".into(),
            platform: Platform::Discord,
            chat: "a:b{c}*%".into(),
            user: "ünï".into(),
        };
        let text = conversation_text(&key);
        assert!(!text.contains('{') && !text.contains('*'), "{text}");
        assert_eq!(parse_conversation(&text), Some(key));
        assert_eq!(parse_conversation("a:xx:b:c"), None);
    }
}
