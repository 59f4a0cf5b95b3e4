//! [`ConversationStore`] on Redis: a list of turns per conversation (`P:turns:{U}:C`,
//! oldest first) and the user's conversation index (`P:convs:{U}`), written with the
//! user's usage by one script (`scripts::RECORD_EXCHANGE`).

use super::layout::parse_conversation;
use super::scripts::RECORD_EXCHANGE;
use super::{RedisStore, HANDLED_TTL_SECS};
use crate::domain::{ConversationKey, UserRef};
use crate::store::codec::{Codec as _, UsernameIndex as _};
use crate::store::{ConversationStore, Exchange, StoreError, StoreResult, Turn, UserRecord};

/// How many times a user record write is retried when another writer changed it.
pub(super) const CAS_ATTEMPTS: u32 = 32;

/// Before retry `attempt` of a compare-and-set: a random pause of up to 2^attempt ms
/// (at most 64 ms), so writers that keep colliding spread out. A retry follows a
/// round trip that succeeded, so this runs where [`RedisStore::run`] may block (a
/// multi-thread runtime or a blocking thread): `block_in_place` hands the worker's
/// tasks off first, as `run` does.
pub(super) fn cas_backoff(attempt: u32) {
    if attempt == 0 {
        return;
    }
    use rand::Rng;
    let cap = 1u64 << attempt.min(6);
    let ms = rand::rng().random_range(0..=cap);
    tokio::task::block_in_place(|| std::thread::sleep(std::time::Duration::from_millis(ms)));
}
/// Turns read per round trip from the end of a conversation.
const PAGE: isize = 64;

impl RedisStore {
    /// The user record's stored bytes and decoded value (a corrupt one is an error).
    pub(super) fn read_user(
        &self,
        key: &str,
    ) -> StoreResult<(Option<Vec<u8>>, Option<UserRecord>)> {
        let raw: Option<Vec<u8>> = self.query(redis::cmd("GET").arg(key))?;
        let rec = match &raw {
            Some(v) => Some(self.decode_strict("users", key, v)?),
            None => None,
        };
        Ok((raw, rec))
    }

    fn lrange(&self, key: &str, from: isize, to: isize) -> StoreResult<Vec<Vec<u8>>> {
        self.query(redis::cmd("LRANGE").arg(key).arg(from).arg(to))
    }

    fn decode_turns(&self, key: &str, raw: Vec<Vec<u8>>) -> Vec<Turn> {
        raw.iter()
            .filter_map(|v| self.decode::<Turn>("turns", key, v))
            .collect()
    }

    /// One attempt of an exchange: `Ok(false)` when the user record changed meanwhile.
    fn try_exchange(&self, ex: &mut Exchange<'_>, turns: &[Vec<u8>]) -> StoreResult<bool> {
        let user = ex.user.as_ref().map(|(u, _)| (*u).clone());
        let user_key = user.as_ref().map(|u| self.user_key(u));
        let mut inv = RECORD_EXCHANGE.prepare_invoke();
        inv.key(user_key.clone().unwrap_or_else(|| self.key("user:-")))
            .key(self.users_key())
            .key(self.turns_key(ex.conversation))
            .key(self.convs_key(&ex.conversation.user_ref()))
            .key(match ex.handled {
                Some((id, _)) => self.handled_key(id),
                None => self.key("handled:-"),
            })
            .key(match &user {
                Some(u) => self.ident_key(&self.user_id(u)),
                None => self.key("ident:-"),
            });
        let mut username_change = None;
        match (&user, &user_key, ex.user.as_mut()) {
            (Some(u), Some(k), Some((_, f))) => {
                let (raw, old) = self.read_user(k)?;
                let before = old.as_ref().and_then(|r| r.username.clone());
                let mut rec = old.unwrap_or_default();
                f(&mut rec);
                username_change = Some((before, rec.username.clone()));
                inv.arg("u")
                    .arg(if raw.is_some() { "1" } else { "0" })
                    .arg(raw.unwrap_or_default())
                    .arg(self.encode("users", k, &rec)?)
                    .arg(self.user_id(u));
            }
            _ => {
                inv.arg("-").arg("0").arg("").arg("").arg("");
            }
        }
        let conv_id = self.conversation_id(ex.conversation);
        let convs = self.convs_key(&ex.conversation.user_ref());
        let conv_text = super::layout::conversation_text(ex.conversation);
        inv.arg(&conv_id).arg(self.seal(
            "conv_index",
            &format!("{convs}/{conv_id}"),
            conv_text.as_bytes(),
        ));
        match ex.handled {
            Some((id, entry)) => inv.arg(self.encode("handled", &self.handled_key(id), entry)?),
            None => inv.arg(""),
        };
        inv.arg(HANDLED_TTL_SECS);
        inv.arg(match &user {
            Some(u) => self.identity_value(u),
            None => Vec::new(),
        });
        for t in turns {
            inv.arg(t.as_slice());
        }
        let done: i64 = self.run(|mut c| async move { inv.invoke_async(&mut c).await })?;
        if done != 1 {
            return Ok(false);
        }
        if let (Some(u), Some((before, after))) = (&user, username_change) {
            self.reindex_username(u, before.as_deref(), after.as_deref())?;
        }
        Ok(true)
    }
}

impl ConversationStore for RedisStore {
    fn record_exchange(&self, mut exchange: Exchange<'_>) -> StoreResult<()> {
        let list = self.turns_key(exchange.conversation);
        let turns = exchange
            .turns
            .iter()
            .map(|t| self.encode("turns", &list, t))
            .collect::<StoreResult<Vec<_>>>()?;
        for attempt in 0..CAS_ATTEMPTS {
            cas_backoff(attempt);
            if self.try_exchange(&mut exchange, &turns)? {
                return Ok(());
            }
        }
        Err(StoreError::Io(
            "the user record kept changing; exchange not stored".into(),
        ))
    }

    fn recent_turns(&self, key: &ConversationKey, max_tokens: usize) -> StoreResult<Vec<Turn>> {
        let list = self.turns_key(key);
        let mut used = 0usize;
        let mut out = Vec::new();
        let mut end = -1isize;
        loop {
            let page = self.lrange(&list, end - PAGE + 1, end)?;
            let full = page.len() as isize == PAGE;
            for turn in self.decode_turns(&list, page).into_iter().rev() {
                used += turn.tokens as usize;
                if used > max_tokens {
                    out.reverse();
                    return Ok(out);
                }
                out.push(turn);
            }
            if !full {
                out.reverse();
                return Ok(out);
            }
            end -= PAGE;
        }
    }

    fn all_turns(&self, key: &ConversationKey) -> StoreResult<Vec<Turn>> {
        let list = self.turns_key(key);
        let raw = self.lrange(&list, 0, -1)?;
        Ok(self.decode_turns(&list, raw))
    }

    fn user_conversations(&self, user: &UserRef) -> StoreResult<Vec<(ConversationKey, Vec<Turn>)>> {
        let convs = self.convs_key(user);
        let rows: Vec<(String, Vec<u8>)> = self.query(redis::cmd("HGETALL").arg(&convs))?;
        let mut out = Vec::new();
        for (id, sealed) in rows {
            let conv = self
                .unseal("conv_index", &format!("{convs}/{id}"), &sealed)
                .ok()
                .and_then(|v| String::from_utf8(v.into_owned()).ok())
                .and_then(|t| parse_conversation(&t));
            match conv {
                Some(key) => {
                    let turns = self.all_turns(&key)?;
                    out.push((key, turns));
                }
                None => tracing::error!(
                    error.kind = crate::events::ErrorKind::StoreCorrupt.as_str(),
                    tree = "conv_index",
                    "corrupt index entry skipped"
                ),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn clear_conversation(&self, key: &ConversationKey) -> StoreResult<usize> {
        let (list, convs) = (self.turns_key(key), self.convs_key(&key.user_ref()));
        let id = self.conversation_id(key);
        let (n, _, _): (usize, i64, i64) = self.run(|mut c| async move {
            redis::pipe()
                .atomic()
                .cmd("LLEN")
                .arg(&list)
                .cmd("DEL")
                .arg(&list)
                .cmd("HDEL")
                .arg(&convs)
                .arg(&id)
                .query_async(&mut c)
                .await
        })?;
        Ok(n)
    }

    fn purge_turns_before(&self, before: i64) -> StoreResult<usize> {
        let mut n = 0;
        for list in self.scan_keys(&self.pattern("turns:*"))? {
            // Oldest first: count the old head, then trim it (appends go to the tail).
            let mut old = 0isize;
            loop {
                let page = self.lrange(&list, old, old + PAGE - 1)?;
                let len = page.len();
                let stale = page
                    .iter()
                    .take_while(|v| {
                        self.decode::<Turn>("turns", &list, v)
                            .is_none_or(|t| t.at < before)
                    })
                    .count();
                old += stale as isize;
                if stale < len || len < PAGE as usize {
                    break;
                }
            }
            if old > 0 {
                self.query::<()>(redis::cmd("LTRIM").arg(&list).arg(old).arg(-1))?;
                n += old as usize;
            }
        }
        Ok(n)
    }
}
