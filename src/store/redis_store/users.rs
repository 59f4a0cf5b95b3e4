//! [`UserStore`] on Redis: `P:user:{U}` (the record, written compare-and-set by a
//! script), `P:users` (every user's id, for counts and admin stats) and
//! `P:username:N` (per platform; a rename drops the old name); with a data key the
//! record's script also writes the user's sealed identity (`identity.rs`). A record that cannot be
//! read is an error, never a fresh record (it may hold a ban).

use super::conversations::{cas_backoff, CAS_ATTEMPTS};
use super::scripts::{DEL_IF, PUT_USER_IF};
use super::RedisStore;
use crate::domain::{Platform, UserRef};
use crate::store::codec::{Codec as _, UsernameIndex};
use crate::store::{ForgetReport, StoreError, StoreResult, UserRecord, UserStore};

impl RedisStore {
    /// Writes `rec` if the record still holds `raw`; `Ok(false)` when it changed.
    fn put_user_if(
        &self,
        user: &UserRef,
        raw: Option<Vec<u8>>,
        rec: &UserRecord,
    ) -> StoreResult<bool> {
        let key = self.user_key(user);
        let uid = self.user_id(user);
        let mut inv = PUT_USER_IF.prepare_invoke();
        inv.key(&key)
            .key(self.users_key())
            .key(self.ident_key(&uid))
            .arg(if raw.is_some() { "1" } else { "0" })
            .arg(raw.unwrap_or_default())
            .arg(self.encode("users", &key, rec)?)
            .arg(uid)
            .arg(self.identity_value(user));
        let done: i64 = self.run(|mut c| async move { inv.invoke_async(&mut c).await })?;
        Ok(done == 1)
    }

    /// The raw value of a username key and whether it names `user`.
    pub(super) fn username_of(&self, key: &str) -> StoreResult<Option<(Vec<u8>, Option<UserRef>)>> {
        let raw: Option<Vec<u8>> = self.query(redis::cmd("GET").arg(key))?;
        Ok(raw.map(|v| {
            let who = self
                .unseal("usernames", key, &v)
                .ok()
                .and_then(|p| String::from_utf8(p.into_owned()).ok())
                .and_then(|s| s.parse::<UserRef>().ok());
            (v, who)
        }))
    }

    pub(super) fn del_if(&self, key: &str, raw: Vec<u8>) -> StoreResult<()> {
        let mut inv = DEL_IF.prepare_invoke();
        inv.key(key).arg(raw);
        self.run(|mut c| async move { inv.invoke_async::<i64>(&mut c).await })?;
        Ok(())
    }
}

impl UsernameIndex for RedisStore {
    fn drop_username(&self, user: &UserRef, name: &str) -> StoreResult<()> {
        let k = self.username_key(user.platform, name);
        if let Some((raw, Some(who))) = self.username_of(&k)? {
            if &who == user {
                self.del_if(&k, raw)?;
            }
        }
        Ok(())
    }

    fn set_username(&self, user: &UserRef, name: &str) -> StoreResult<()> {
        let k = self.username_key(user.platform, name);
        let v = self.seal("usernames", &k, user.to_string().as_bytes());
        self.query(redis::cmd("SET").arg(k).arg(v))
    }
}

impl UserStore for RedisStore {
    fn user(&self, user: &UserRef) -> StoreResult<Option<UserRecord>> {
        Ok(self.read_user(&self.user_key(user))?.1)
    }

    fn put_user(&self, user: &UserRef, record: &UserRecord) -> StoreResult<()> {
        let key = self.user_key(user);
        for attempt in 0..CAS_ATTEMPTS {
            cas_backoff(attempt);
            let raw: Option<Vec<u8>> = self.query(redis::cmd("GET").arg(&key))?;
            let before = raw
                .as_ref()
                .and_then(|v| self.decode::<UserRecord>("users", &key, v))
                .and_then(|r| r.username);
            if self.put_user_if(user, raw, record)? {
                return self.reindex_username(user, before.as_deref(), record.username.as_deref());
            }
        }
        Err(StoreError::Io("the user record kept changing".into()))
    }

    fn update_user(
        &self,
        user: &UserRef,
        f: &mut dyn FnMut(&mut UserRecord),
    ) -> StoreResult<UserRecord> {
        let key = self.user_key(user);
        for attempt in 0..CAS_ATTEMPTS {
            cas_backoff(attempt);
            let (raw, old) = self.read_user(&key)?;
            let before = old.as_ref().and_then(|r| r.username.clone());
            let mut rec = old.unwrap_or_default();
            f(&mut rec);
            if self.put_user_if(user, raw, &rec)? {
                self.reindex_username(user, before.as_deref(), rec.username.as_deref())?;
                return Ok(rec);
            }
        }
        Err(StoreError::Io("the user record kept changing".into()))
    }

    fn user_count(&self) -> StoreResult<usize> {
        let k = self.users_key();
        self.query(redis::cmd("SCARD").arg(k))
    }

    fn for_each_user(&self, f: &mut dyn FnMut(&UserRecord)) -> StoreResult<()> {
        let k = self.users_key();
        let ids: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(k))?;
        for chunk in ids.chunks(200) {
            let keys: Vec<String> = chunk
                .iter()
                .map(|id| self.key(&format!("user:{{{id}}}")))
                .collect();
            let values: Vec<Option<Vec<u8>>> = self.query(redis::cmd("MGET").arg(&keys))?;
            for (key, v) in keys.iter().zip(values) {
                if let Some(rec) = v.and_then(|v| self.decode::<UserRecord>("users", key, &v)) {
                    f(&rec);
                }
            }
        }
        Ok(())
    }

    fn find_username(&self, platform: Platform, username: &str) -> StoreResult<Option<UserRef>> {
        let key = self.username_key(platform, username);
        let Some((_, who)) = self.username_of(&key)? else {
            return Ok(None);
        };
        let found = who.filter(|u| u.platform == platform);
        if found.is_none() {
            crate::store::codec::corrupt_skipped("usernames");
        }
        Ok(found)
    }

    fn forget_user(&self, user: &UserRef) -> StoreResult<ForgetReport> {
        self.forget(user)
    }
}
