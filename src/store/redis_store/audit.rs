//! [`AuditStore`] on Redis: the stream `P:audit` (one field `e`, the entry), appended
//! with `XADD … MAXLEN ~ 1000000`, read newest first with `XREVRANGE`, purged by time
//! with `XTRIM MINID` (stream ids are Redis's clock in ms).

use super::RedisStore;
use crate::store::codec::Codec as _;
use crate::store::{AuditEntry, AuditStore, StoreResult};

/// The stream is capped near this many entries even if the sweeper never runs.
const MAX_ENTRIES: u64 = 1_000_000;

/// Stream entries as (id, [(field, value)]).
pub(super) type StreamRows = Vec<(String, Vec<(String, Vec<u8>)>)>;

impl RedisStore {
    /// Every audit entry with its stream id, oldest first (unreadable ones skipped).
    pub(super) fn audit_all(&self) -> StoreResult<Vec<(String, AuditEntry)>> {
        let key = self.audit_key();
        let rows: StreamRows = self.query(redis::cmd("XRANGE").arg(&key).arg("-").arg("+"))?;
        Ok(self.audit_rows(&key, rows))
    }

    fn audit_rows(&self, key: &str, rows: StreamRows) -> Vec<(String, AuditEntry)> {
        rows.into_iter()
            .filter_map(|(id, fields)| {
                let v = fields.into_iter().find(|(f, _)| f == "e")?.1;
                Some((id, self.decode::<AuditEntry>("audit", key, &v)?))
            })
            .collect()
    }

    /// Replaces the stream by `entries` under their own ids, in one transaction.
    pub(super) fn audit_rewrite(&self, entries: &[(String, AuditEntry)]) -> StoreResult<()> {
        let key = self.audit_key();
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("DEL").arg(&key).ignore();
        for (id, e) in entries {
            pipe.cmd("XADD")
                .arg(&key)
                .arg(id)
                .arg("e")
                .arg(self.encode("audit", &key, e)?)
                .ignore();
        }
        self.run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
    }
}

impl AuditStore for RedisStore {
    fn audit_append(&self, entry: &AuditEntry) -> StoreResult<()> {
        let key = self.audit_key();
        let value = self.encode("audit", &key, entry)?;
        self.query::<String>(
            redis::cmd("XADD")
                .arg(key)
                .arg("MAXLEN")
                .arg("~")
                .arg(MAX_ENTRIES)
                .arg("*")
                .arg("e")
                .arg(value),
        )?;
        Ok(())
    }

    fn audit_recent(&self, n: usize) -> StoreResult<Vec<AuditEntry>> {
        let key = self.audit_key();
        let rows: StreamRows = self.query(
            redis::cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(n),
        )?;
        Ok(self
            .audit_rows(&key, rows)
            .into_iter()
            .map(|(_, e)| e)
            .collect())
    }

    fn audit_purge_before(&self, before: i64) -> StoreResult<usize> {
        let key = self.audit_key();
        let min_id = format!("{}-0", before.max(0).saturating_mul(1000));
        self.query(redis::cmd("XTRIM").arg(key).arg("MINID").arg(min_id))
    }
}
