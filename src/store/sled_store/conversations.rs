//! [`ConversationStore`] on sled: `turns` (conversation prefix + sequence) and
//! `conv_index` (user → conversations), written with the user's usage in one transaction.

use std::cell::RefCell;

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::layout::parse_conv_prefix;
use super::{io, SledStore};
use crate::domain::{ConversationKey, UserRef};
use crate::events::ErrorKind;
use crate::store::codec::{Codec as _, UsernameIndex as _};
use crate::store::{ConversationStore, Exchange, StoreError, StoreResult, Turn, UserRecord};

/// The `users` row change made inside [`SledStore::record_exchange`]'s transaction.
type UserChange = (Option<String>, UserRecord);

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
        let prefix = self.conv_prefix(key);
        let mut rows = Vec::with_capacity(turns.len());
        for turn in turns {
            let seq = self.db.generate_id().map_err(io)?;
            let mut k = prefix.clone();
            k.extend_from_slice(&seq.to_be_bytes());
            let v = self.encode("turns", &k, turn)?;
            rows.push((k, v));
        }
        let handled_row = match handled {
            Some((id, entry)) => Some((
                id.as_bytes().to_vec(),
                self.encode("handled", id.as_bytes(), entry)?,
            )),
            None => None,
        };
        let (idx, idx_value) = self.index_row(key);
        let idx_value = self.seal("conv_index", &idx, &idx_value);
        let (user_ref, update) = match user {
            Some((u, f)) => (Some(u), Some(f)),
            None => (None, None),
        };
        let user_row = user_ref.map(|u| self.user_key(u));
        // sled retries the closure on conflicts and wants `Fn`: borrow through cells.
        let update = RefCell::new(update);
        // (username before, record after) of the user, from the attempt that committed.
        let user_change = RefCell::new(None::<UserChange>);
        (&self.turns, &self.handled, &self.conv_index, &self.users)
            .transaction(|(turns_t, handled_t, index_t, users_t)| {
                for (k, v) in &rows {
                    turns_t.insert(k.as_slice(), v.as_slice())?;
                }
                if let Some((k, v)) = &handled_row {
                    handled_t.insert(k.as_slice(), v.as_slice())?;
                }
                // The index row is written once per conversation, not once per message.
                if index_t.get(idx.as_slice())?.is_none() {
                    index_t.insert(idx.as_slice(), idx_value.as_slice())?;
                }
                if let (Some(k), Some(f)) = (&user_row, update.borrow_mut().as_mut()) {
                    // A corrupt record aborts: never replaced by a fresh one (a lifted ban).
                    let old: Option<UserRecord> = match users_t.get(k.as_slice())? {
                        Some(v) => Some(
                            self.decode_strict("users", k, &v)
                                .map_err(ConflictableTransactionError::Abort)?,
                        ),
                        None => None,
                    };
                    let before = old.as_ref().and_then(|r| r.username.clone());
                    let mut rec = old.unwrap_or_default();
                    f(&mut rec);
                    let bytes = self
                        .encode("users", k, &rec)
                        .map_err(ConflictableTransactionError::Abort)?;
                    users_t.insert(k.as_slice(), bytes)?;
                    *user_change.borrow_mut() = Some((before, rec));
                }
                Ok::<(), ConflictableTransactionError<StoreError>>(())
            })
            .map_err(|e: TransactionError<StoreError>| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => StoreError::Io(format!("append turns: {e}")),
            })?;
        if let (Some(u), Some((before, rec))) = (user_ref, user_change.into_inner()) {
            self.reindex_username(u, before.as_deref(), rec.username.as_deref())?;
        }
        Ok(())
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
        for item in self.turns.scan_prefix(&prefix).keys() {
            batch.remove(item.map_err(io)?);
            n += 1;
        }
        self.turns.apply_batch(batch).map_err(io)?;
        self.conv_index.remove(self.index_row(key).0).map_err(io)?;
        Ok(n)
    }

    fn purge_turns_before(&self, before: i64) -> StoreResult<usize> {
        self.purge_older(&self.turns, "turns", before, |t: &Turn| t.at)
    }
}

#[cfg(test)]
mod tests;
