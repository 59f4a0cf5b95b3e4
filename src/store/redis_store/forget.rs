//! `forget` on Redis: everything about one user goes — their conversations and index,
//! the record and its identity (`P:ident:{U}`), their id in `P:users`, every username
//! pointing at them, cache entries they originated, handled markers (pending replies)
//! to them, and their id, usernames and words in the audit stream (rewritten in one
//! transaction under the same ids).

use std::collections::HashSet;

use super::layout::normalise_username;
use super::RedisStore;
use crate::domain::UserRef;
use crate::store::codec::Codec as _;
use crate::store::sled_store::scrub_audit_entry;
use crate::store::{
    clear_conversations_of, CacheEntry, ForgetReport, Handled, HandledEntry, StoreResult,
    UserRecord,
};

impl RedisStore {
    pub(super) fn forget(&self, user: &UserRef) -> StoreResult<ForgetReport> {
        let mut report = ForgetReport::default();
        let replies = clear_conversations_of(self, user, &mut report)?;
        let mut aliases = Vec::new();
        let (ukey, users, uid) = (self.user_key(user), self.users_key(), self.user_id(user));
        let convs = self.convs_key(user);
        let ident = self.ident_key(&uid);
        let (raw, _) = self.read_user(&ukey).unwrap_or((None, None));
        if let Some(v) = raw {
            report.user_record = true;
            let rec = self.decode::<UserRecord>("users", &ukey, &v);
            aliases.extend(rec.and_then(|r| r.username));
        }
        let (k, u) = (ukey.clone(), users.clone());
        self.run(|mut c| async move {
            redis::pipe()
                .atomic()
                .cmd("DEL")
                .arg(&k)
                .arg(&convs)
                .arg(&ident)
                .cmd("SREM")
                .arg(&u)
                .arg(&uid)
                .query_async::<()>(&mut c)
                .await
        })?;
        for key in self.scan_keys(&self.pattern("username:*"))? {
            if let Some((raw, Some(who))) = self.username_of(&key)? {
                if &who == user {
                    if self.keys.is_none() {
                        let name = key.rsplit(':').next().unwrap_or_default();
                        aliases.extend(super::percent_decode(name).ok());
                    }
                    self.del_if(&key, raw)?;
                }
            }
        }
        report.cache_entries = self.forget_cache(user)?;
        self.forget_handled(user, &replies)?;
        let aliases: Vec<String> = aliases.iter().map(|a| normalise_username(a)).collect();
        self.forget_in_audit(user, &aliases)?;
        Ok(report)
    }

    fn forget_cache(&self, user: &UserRef) -> StoreResult<usize> {
        let mut theirs = Vec::new();
        for id in self.cache_ids()? {
            let k = self.cache_key(&id);
            let raw: Option<Vec<u8>> = self.query(redis::cmd("GET").arg(&k))?;
            if raw
                .and_then(|v| self.decode::<CacheEntry>("cache", &k, &v))
                .is_some_and(|e| &e.origin == user)
            {
                theirs.push(id);
            }
        }
        self.cache_remove_ids(&theirs)
    }

    /// Handled markers of their updates, and pending replies to them.
    fn forget_handled(&self, user: &UserRef, replies: &HashSet<String>) -> StoreResult<()> {
        for key in self.scan_keys(&self.pattern("handled:*"))? {
            let raw: Option<Vec<u8>> = self.query(redis::cmd("GET").arg(&key))?;
            let Some(entry) = raw.and_then(|v| self.decode::<HandledEntry>("handled", &key, &v))
            else {
                continue;
            };
            let theirs = entry.user.as_ref() == Some(user)
                || matches!(&entry.state, Handled::Pending { reply } if replies.contains(reply));
            if theirs {
                self.query::<()>(redis::cmd("DEL").arg(key))?;
            }
        }
        Ok(())
    }

    fn forget_in_audit(&self, user: &UserRef, aliases: &[String]) -> StoreResult<()> {
        let mut entries = self.audit_all()?;
        let mut changed = false;
        for (_, e) in entries.iter_mut() {
            changed |= scrub_audit_entry(e, user, aliases);
        }
        if changed {
            self.audit_rewrite(&entries)?;
        }
        Ok(())
    }
}
