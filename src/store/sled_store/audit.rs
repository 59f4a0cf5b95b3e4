//! [`AuditStore`] on sled: `audit` (u64 sequence, big-endian → entry), in write order.

use super::{io, SledStore};
use crate::store::codec::Codec as _;
use crate::store::{AuditEntry, AuditStore, StoreResult};

impl AuditStore for SledStore {
    fn audit_append(&self, entry: &AuditEntry) -> StoreResult<()> {
        let _gate = self.write_gate();
        let seq = self.db.generate_id().map_err(io)?.to_be_bytes();
        self.audit
            .insert(seq, self.encode("audit", &seq, entry)?)
            .map_err(io)?;
        Ok(())
    }

    fn audit_recent(&self, n: usize) -> StoreResult<Vec<AuditEntry>> {
        let mut out = Vec::new();
        for item in self.audit.iter().rev() {
            if out.len() >= n {
                break;
            }
            let (k, v) = item.map_err(io)?;
            if let Some(e) = self.decode("audit", &k, &v) {
                out.push(e);
            }
        }
        Ok(out)
    }

    fn audit_purge_before(&self, before: i64) -> StoreResult<usize> {
        let mut n = 0;
        // Keys are a growing sequence, so entries are in write order: stop at the first
        // one young enough to keep. Small batches keep the writer gate short.
        loop {
            let _gate = self.write_gate();
            let mut batch = 0;
            let mut done = true;
            for item in self.audit.iter() {
                let (k, v) = item.map_err(io)?;
                let old = self
                    .decode::<AuditEntry>("audit", &k, &v)
                    .is_none_or(|e| e.at < before);
                if !old {
                    break;
                }
                self.audit.remove(k).map_err(io)?;
                n += 1;
                batch += 1;
                if batch == 1000 {
                    done = false;
                    break;
                }
            }
            if done {
                return Ok(n);
            }
        }
    }
}
