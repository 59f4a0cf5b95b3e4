//! [`ConversationStore`] on sled: `turns` (conversation prefix + sequence) and
//! `conv_index` (user → conversations), written with the pending reply and the user's
//! usage in one atomic batch on the `rows` tree.

use super::layout::parse_conv_prefix;
use super::{io, SledStore};
use crate::domain::{ConversationKey, UserRef};
use crate::events::ErrorKind;
use crate::store::codec::{Codec as _, UsernameIndex as _};
use crate::store::{ConversationStore, Exchange, StoreResult, Turn, UserRecord};

impl SledStore {
    fn scan_turns<'a>(
        &'a self,
        prefix: &[u8],
    ) -> impl DoubleEndedIterator<Item = (sled::IVec, Turn)> + 'a {
        self.turns
            .scan_prefix(prefix)
            .filter_map(|item| match item {
                Ok((k, v)) => self.decode::<Turn>("turns", &k, &v).map(|t| (k, t)),
                Err(e) => {
                    tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), tree = "turns", error = %e, "store read failed");
                    None
                }
            })
    }
}

impl ConversationStore for SledStore {
    fn record_exchange(&self, exchange: Exchange<'_>) -> StoreResult<()> {
        let Exchange {
            conversation: key,
            turns,
            handled,
            user,
        } = exchange;
        let _gate = self.write_gate();
        let mut batch = sled::Batch::default();
        let prefix = self.conv_prefix(key);
        for turn in turns {
            let seq = self.db.generate_id().map_err(io)?;
            let mut k = prefix.clone();
            k.extend_from_slice(&seq.to_be_bytes());
            let v = self.encode("turns", &k, turn)?;
            self.turns.put(&mut batch, &k, v);
        }
        if let Some((id, entry)) = handled {
            let v = self.encode("handled", id.as_bytes(), entry)?;
            self.handled.put(&mut batch, id.as_bytes(), v);
        }
        // The index row is written once per conversation, not once per message (two
        // first messages at once write the same row twice: harmless).
        let (idx, idx_value) = self.index_row(key);
        if self.conv_index.get(&idx).map_err(io)?.is_none() {
            let v = self.seal("conv_index", &idx, &idx_value);
            self.conv_index.put(&mut batch, &idx, v);
        }
        let Some((user, update)) = user else {
            return self.turns.apply(batch).map_err(io);
        };
        // The record's read-modify-write holds the user's lock until the batch is in.
        let k = self.user_key(user);
        let lock = self.user_lock(&k);
        // A corrupt record fails the whole batch: never replaced by a fresh one (a lifted ban).
        let old: Option<UserRecord> = match self.users.get(&k).map_err(io)? {
            Some(v) => Some(self.decode_strict("users", &k, &v)?),
            None => None,
        };
        let before = old.as_ref().and_then(|r| r.username.clone());
        let mut rec = old.unwrap_or_default();
        update(&mut rec);
        let v = self.encode("users", &k, &rec)?;
        self.users.put(&mut batch, &k, v);
        self.turns.apply(batch).map_err(io)?;
        drop(lock);
        self.reindex_username(user, before.as_deref(), rec.username.as_deref())
    }

    fn recent_turns(&self, key: &ConversationKey, max_tokens: usize) -> StoreResult<Vec<Turn>> {
        let mut used = 0usize;
        let mut out = Vec::new();
        for (_, turn) in self.scan_turns(&self.conv_prefix(key)).rev() {
            used += turn.tokens as usize;
            if used > max_tokens {
                break;
            }
            out.push(turn);
        }
        out.reverse();
        Ok(out)
    }

    fn all_turns(&self, key: &ConversationKey) -> StoreResult<Vec<Turn>> {
        Ok(self
            .scan_turns(&self.conv_prefix(key))
            .map(|(_, t)| t)
            .collect())
    }

    fn user_conversations(&self, user: &UserRef) -> StoreResult<Vec<(ConversationKey, Vec<Turn>)>> {
        let prefix = self.index_user_prefix(user);
        let mut out = Vec::new();
        for item in self.conv_index.scan_prefix(&prefix) {
            let (k, v) = item.map_err(io)?;
            // Without a key the conversation is the rest of the row's key (value empty).
            let conv = if v.is_empty() && self.keys.is_none() {
                Ok(k.get(prefix.len()..).unwrap_or_default().to_vec())
            } else {
                self.unseal("conv_index", &k, &v).map(|c| c.into_owned())
            };
            match conv.ok().and_then(|c| parse_conv_prefix(&c)) {
                Some(key) => {
                    let turns = self.all_turns(&key)?;
                    out.push((key, turns));
                }
                None => tracing::error!(
                    error.kind = ErrorKind::StoreCorrupt.as_str(),
                    tree = "conv_index",
                    "corrupt index entry skipped"
                ),
            }
        }
        Ok(out)
    }

    fn clear_conversation(&self, key: &ConversationKey) -> StoreResult<usize> {
        let _gate = self.write_gate();
        let prefix = self.conv_prefix(key);
        let mut n = 0;
        let mut batch = sled::Batch::default();
        for item in self.turns.scan_prefix(&prefix) {
            let (k, _) = item.map_err(io)?;
            self.turns.del(&mut batch, &k);
            n += 1;
        }
        self.conv_index.del(&mut batch, &self.index_row(key).0);
        self.turns.apply(batch).map_err(io)?;
        Ok(n)
    }

    fn purge_turns_before(&self, before: i64) -> StoreResult<usize> {
        self.purge_older(&self.turns, "turns", before, |t: &Turn| t.at)
    }
}

#[cfg(test)]
mod tests;
