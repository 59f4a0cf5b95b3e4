//! [`InboxStore`] on Redis: the hash `P:inbox` (adapter key → received update not yet
//! answered), intake positions (fields of `P:meta`, like sled's `meta` rows) and
//! handled markers `P:handled:ID` with a TTL of 7 days (so `purge_handled_before` has
//! nothing to do: Redis expires them).

use super::{RedisStore, HANDLED_TTL_SECS};
use crate::store::codec::Codec as _;
use crate::store::{HandledEntry, InboxStore, StoreResult};

/// `s` with glob characters escaped, for MATCH patterns.
fn glob_escape(s: &str) -> String {
    let mut p = String::with_capacity(s.len());
    for c in s.chars() {
        if "*?[]\\".contains(c) {
            p.push('\\');
        }
        p.push(c);
    }
    p
}

impl InboxStore for RedisStore {
    fn inbox_put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        let hash = self.inbox_key();
        let v = self.seal("inbox", &format!("{hash}/{key}"), value);
        self.query(redis::cmd("HSET").arg(hash).arg(key).arg(v))
    }

    fn inbox_remove(&self, key: &str) -> StoreResult<()> {
        self.query(redis::cmd("HDEL").arg(self.inbox_key()).arg(key))
    }

    fn inbox_scan(&self, prefix: &str) -> StoreResult<Vec<(String, Vec<u8>)>> {
        let hash = self.inbox_key();
        let pattern = format!("{}*", glob_escape(prefix));
        let mut rows = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<(String, Vec<u8>)>) = self.query(
                redis::cmd("HSCAN")
                    .arg(&hash)
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000),
            )?;
            rows.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // HSCAN may return a field twice; key order as sled gives it.
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows.dedup_by(|a, b| a.0 == b.0);
        let mut out = Vec::with_capacity(rows.len());
        for (k, v) in rows.into_iter().filter(|(k, _)| k.starts_with(prefix)) {
            match self.unseal("inbox", &format!("{hash}/{k}"), &v) {
                Ok(value) => out.push((k, value.into_owned())),
                Err(_) => crate::store::codec::corrupt_skipped("inbox"),
            }
        }
        Ok(out)
    }

    fn handled(&self, update: &str) -> StoreResult<Option<HandledEntry>> {
        let k = self.handled_key(update);
        let raw: Option<Vec<u8>> = self.query(redis::cmd("GET").arg(&k))?;
        Ok(raw.and_then(|v| self.decode("handled", &k, &v)))
    }

    fn set_handled(&self, update: &str, entry: &HandledEntry) -> StoreResult<()> {
        let k = self.handled_key(update);
        let v = self.encode("handled", &k, entry)?;
        self.query::<()>(
            redis::cmd("SET")
                .arg(k)
                .arg(v)
                .arg("EX")
                .arg(HANDLED_TTL_SECS),
        )
    }

    /// Nothing to do: every marker expires by itself after 7 days.
    fn purge_handled_before(&self, _before: i64) -> StoreResult<usize> {
        Ok(0)
    }
}
