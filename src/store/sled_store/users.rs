//! [`UserStore`] on sled: `users` (user → record) and `usernames` (per platform:
//! `tg:name` → user; a rename drops the old name). A record that cannot be read is an
//! error, never a fresh record (it may hold a ban).

use super::{io, SledStore};
use crate::domain::{Platform, UserRef};
use crate::store::codec::{Codec as _, UsernameIndex as _};
use crate::store::{ForgetReport, StoreResult, UserRecord, UserStore};

impl UserStore for SledStore {
    fn user(&self, user: &UserRef) -> StoreResult<Option<UserRecord>> {
        let key = self.user_key(user);
        match self.users.get(&key).map_err(io)? {
            Some(v) => self.decode_strict("users", &key, &v).map(Some),
            None => Ok(None),
        }
    }

    fn put_user(&self, user: &UserRef, record: &UserRecord) -> StoreResult<()> {
        let _gate = self.write_gate();
        let key = self.user_key(user);
        let bytes = self.encode("users", &key, record)?;
        let lock = self.user_lock(&key);
        let old = self.users.insert(&key, bytes).map_err(io)?;
        drop(lock);
        let before = old.and_then(|v| self.decode::<UserRecord>("users", &key, &v));
        self.reindex_username(
            user,
            before.and_then(|r| r.username).as_deref(),
            record.username.as_deref(),
        )
    }

    fn update_user(
        &self,
        user: &UserRef,
        f: &mut dyn FnMut(&mut UserRecord),
    ) -> StoreResult<UserRecord> {
        let _gate = self.write_gate();
        let key = self.user_key(user);
        let lock = self.user_lock(&key);
        // A corrupt record is left as it is and reported, never replaced.
        let mut rec: UserRecord = match self.users.get(&key).map_err(io)? {
            Some(v) => self.decode_strict("users", &key, &v)?,
            None => UserRecord::default(),
        };
        let username_before = rec.username.clone();
        f(&mut rec);
        self.users
            .insert(&key, self.encode("users", &key, &rec)?)
            .map_err(io)?;
        drop(lock);
        self.reindex_username(user, username_before.as_deref(), rec.username.as_deref())?;
        Ok(rec)
    }

    fn user_count(&self) -> StoreResult<usize> {
        Ok(self.users.len())
    }

    fn for_each_user(&self, f: &mut dyn FnMut(&UserRecord)) -> StoreResult<()> {
        for item in self.users.iter() {
            let (k, v) = item.map_err(io)?;
            if let Some(rec) = self.decode::<UserRecord>("users", &k, &v) {
                f(&rec);
            }
        }
        Ok(())
    }

    fn find_username(&self, platform: Platform, username: &str) -> StoreResult<Option<UserRef>> {
        let key = self.username_key(platform, username);
        let Some(v) = self.usernames.get(&key).map_err(io)? else {
            return Ok(None);
        };
        let found = self
            .unseal("usernames", &key, &v)
            .ok()
            .and_then(|v| String::from_utf8(v.into_owned()).ok())
            .and_then(|s| s.parse::<UserRef>().ok())
            .filter(|u| u.platform == platform);
        if found.is_none() {
            crate::store::codec::corrupt_skipped("usernames");
        }
        Ok(found)
    }

    fn forget_user(&self, user: &UserRef) -> StoreResult<ForgetReport> {
        self.forget(user)
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use crate::store::{ConversationStore, Exchange, StoreError};

    #[test]
    fn a_corrupt_user_record_is_an_error_and_is_never_overwritten() {
        let (_dir, s) = temp_store();
        let u = tg("5");
        s.users
            .insert(s.user_key(&u), b"{broken".as_slice())
            .unwrap();
        assert!(matches!(
            s.user(&u),
            Err(StoreError::Corrupt { tree: "users", .. })
        ));
        assert!(s.update_user(&u, &mut |r| r.banned = None).is_err());
        let mut book = |r: &mut UserRecord| r.usage.messages += 1;
        let exchange = Exchange {
            conversation: &key("5"),
            turns: &[turn("hi", 1)],
            handled: None,
            user: Some((&u, &mut book)),
        };
        assert!(s.record_exchange(exchange).is_err());
        assert!(s.all_turns(&key("5")).unwrap().is_empty(), "all or nothing");
        let raw = s.users.get(s.user_key(&u)).unwrap().unwrap();
        assert_eq!(raw.as_ref(), b"{broken");
        // the error (it is logged) never quotes the stored value
        let secret = br#"{"name":"Zanzibar","first_seen":"Zanzibar"}"#;
        s.users.insert(s.user_key(&u), secret.as_slice()).unwrap();
        let err = s.user(&u).unwrap_err().to_string();
        assert!(!err.contains("Zanzibar"), "{err}");
        assert!(
            err.starts_with("corrupt store entry in users: Data error"),
            "{err}"
        );
    }
}
