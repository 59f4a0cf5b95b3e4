//! [`ConversationStore`] on sled: `turns` (conversation prefix + sequence → the turns of
//! one exchange, schema 4; a single turn in rows written before) and `conv_index`
//! (user → conversations), written with the pending reply and the user's usage in one
//! atomic batch on the `rows` tree.

use super::layout::parse_conv_prefix;
use super::{io, SledStore};
use crate::domain::{ConversationKey, UserRef};
use crate::events::ErrorKind;
use crate::store::codec::{turns_from_plain, Codec as _, UsernameIndex as _, TURNS_PER_ROW};
use crate::store::{ConversationStore, Exchange, StoreResult, Turn, UserRecord};

impl SledStore {
    /// A conversation's rows in key order, each with its turns (corrupt rows skipped).
    pub(super) fn scan_turn_rows<'a>(
        &'a self,
        prefix: &[u8],
    ) -> impl DoubleEndedIterator<Item = (sled::IVec, Vec<Turn>)> + 'a {
        self.turns
            .scan_prefix(prefix)
            .filter_map(|item| match item {
                Ok((k, v)) => self.decode_turns(&k, &v).map(|t| (k, t)),
                Err(e) => {
                    tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), tree = "turns", error = %e, "store read failed");
                    None
                }
            })
    }

    /// How many turns a stored row holds (a corrupt one counts as one).
    pub(super) fn turns_in_row(&self, k: &[u8], v: &[u8]) -> usize {
        self.unseal("turns", k, v)
            .ok()
            .and_then(|plain| turns_from_plain(&plain).ok())
            .map_or(1, |t| t.len())
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
        // An exchange's turns share one row: half the keys in sled's page table.
        for row in turns.chunks(TURNS_PER_ROW) {
            let seq = self.db.generate_id().map_err(io)?;
            let mut k = prefix.clone();
            k.extend_from_slice(&seq.to_be_bytes());
            let v = self.encode_turns(&k, row)?;
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
        'rows: for (_, row) in self.scan_turn_rows(&self.conv_prefix(key)).rev() {
            for turn in row.into_iter().rev() {
                used += turn.tokens as usize;
                if used > max_tokens {
                    break 'rows;
                }
                out.push(turn);
            }
        }
        out.reverse();
        Ok(out)
    }

    fn all_turns(&self, key: &ConversationKey) -> StoreResult<Vec<Turn>> {
        Ok(self
            .scan_turn_rows(&self.conv_prefix(key))
            .flat_map(|(_, t)| t)
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
            let (k, v) = item.map_err(io)?;
            self.turns.del(&mut batch, &k);
            n += self.turns_in_row(&k, &v);
        }
        self.conv_index.del(&mut batch, &self.index_row(key).0);
        self.turns.apply(batch).map_err(io)?;
        Ok(n)
    }

    /// Retention is per turn: a row whose turns are all older than `before` (or that
    /// cannot be read) goes; a row with some of them is rewritten without them (a
    /// compare-and-swap, so a row another writer just removed is not brought back).
    fn purge_turns_before(&self, before: i64) -> StoreResult<usize> {
        let _gate = self.write_gate();
        let mut n = 0;
        for item in self.turns.iter() {
            let (k, v) = item.map_err(io)?;
            let Some(row) = self.decode_turns(&k, &v) else {
                self.turns.remove(&k).map_err(io)?;
                n += 1;
                continue;
            };
            let total = row.len();
            let kept: Vec<Turn> = row.into_iter().filter(|t| t.at >= before).collect();
            if kept.len() == total {
                continue;
            }
            // Only if unchanged: a conversation cleared meanwhile stays cleared.
            let new = match kept.is_empty() {
                true => None,
                false => Some(self.encode_turns(&k, &kept)?),
            };
            if self.turns.replace(&k, &v, new).map_err(io)? {
                n += total - kept.len();
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
