//! Who a hashed user id is: with a data key `P:user:{U}` names the user by a keyed hash
//! (U), which a backup cannot turn back into the row key sled uses. So every write of
//! a user record also writes `P:ident:{U}` (same slot, same script: never a record
//! without it): the user's id (`tg:123`) sealed for that key. A user restored from an
//! encrypted sled backup without any clue to their id (no username, no conversation)
//! has the sled row key itself there instead (`#` + 64 hex), which is all a later
//! backup needs. Without a data key nothing is written: U is the id.
//!
//! Stores written before identities existed still work; a backup derives a missing
//! identity from the user's username or conversations (both name the user, sealed),
//! and counts the users it cannot name ([`UNNAMED`]).

use super::RedisStore;
use crate::domain::UserRef;
use crate::store::codec::Codec as _;
use crate::store::{StoreError, StoreResult, UserRecord};

/// Why some users of an encrypted store written before identities cannot be backed up.
pub const UNNAMED: &str = "users of this encrypted Redis store were written before confab kept their sealed ids (no identity, username or conversation names them), so a backup cannot name their rows; each is named again the next time confab writes its record (a message, /ban, /limit)";

/// Who a user id in `P:users` is.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Identity {
    /// The user (always known without a data key).
    User(UserRef),
    /// Only the row key an encrypted sled store has for the user (see the module docs).
    RowKey([u8; 32]),
}

impl RedisStore {
    /// `P:ident:{U}`.
    pub(super) fn ident_key(&self, uid: &str) -> String {
        self.key(&format!("ident:{{{uid}}}"))
    }

    /// The sealed identity a user record's script writes; empty without a data key.
    pub(super) fn identity_value(&self, user: &UserRef) -> Vec<u8> {
        match &self.keys {
            Some(_) => self.seal(
                "ident",
                &self.ident_key(&self.user_id(user)),
                user.to_string().as_bytes(),
            ),
            None => Vec::new(),
        }
    }

    /// The identity key of `uid` and `who` sealed for it (restores, with a data key).
    pub(super) fn identity_entry(&self, uid: &str, who: &Identity) -> (String, Vec<u8>) {
        let text = match who {
            Identity::User(u) => u.to_string(),
            Identity::RowKey(k) => format!("#{}", super::layout::hex(k)),
        };
        let key = self.ident_key(uid);
        let v = self.seal("ident", &key, text.as_bytes());
        (key, v)
    }

    /// Who `uid` is: its id without a data key; else its stored identity, or one derived
    /// from its username or conversations; `None` when nothing names it.
    pub(super) fn identity(&self, uid: &str) -> StoreResult<Option<Identity>> {
        if self.keys.is_none() {
            let (platform, raw) = uid.split_once(':').ok_or_else(|| bad("user id"))?;
            let plain = super::percent_decode(raw).map_err(|_| bad("user id"))?;
            let user = format!("{platform}:{plain}")
                .parse()
                .map_err(|_| bad("user id"))?;
            return Ok(Some(Identity::User(user)));
        }
        let key = self.ident_key(uid);
        if let Some(v) = self.query::<Option<Vec<u8>>>(redis::cmd("GET").arg(&key))? {
            let text = self
                .unseal("ident", &key, &v)
                .map_err(|reason| StoreError::Corrupt {
                    tree: "ident",
                    reason,
                })?;
            return parse_identity(&text)
                .map(Some)
                .ok_or_else(|| bad("identity"));
        }
        self.derive_identity(uid)
    }

    /// A user's identity from their username or a conversation, checked against `uid`.
    fn derive_identity(&self, uid: &str) -> StoreResult<Option<Identity>> {
        let mut candidates = Vec::new();
        let record_key = self.key(&format!("user:{{{uid}}}"));
        let (_, record) = self.read_user(&record_key)?;
        if let Some(name) = record.and_then(|r: UserRecord| r.username) {
            for platform in super::sled_rows::NAMED_PLATFORMS {
                let k = self.username_key(platform, &name);
                if let Some((_, Some(who))) = self.username_of(&k)? {
                    candidates.push(who);
                }
            }
        }
        let convs = self.key(&format!("convs:{{{uid}}}"));
        let rows: Vec<(String, Vec<u8>)> = self.query(redis::cmd("HGETALL").arg(&convs))?;
        for (id, sealed) in rows {
            let conv = self
                .unseal("conv_index", &format!("{convs}/{id}"), &sealed)
                .ok()
                .and_then(|v| String::from_utf8(v.into_owned()).ok())
                .and_then(|t| super::layout::parse_conversation(&t));
            candidates.extend(conv.map(|c| c.user_ref()));
        }
        Ok(candidates
            .into_iter()
            .find(|u| self.user_id(u) == uid)
            .map(Identity::User))
    }
}

fn parse_identity(text: &[u8]) -> Option<Identity> {
    let text = std::str::from_utf8(text).ok()?;
    match text.strip_prefix('#') {
        Some(hex) => super::layout::unhex32(hex).map(Identity::RowKey),
        None => text.parse().ok().map(Identity::User),
    }
}

fn bad(reason: &str) -> StoreError {
    StoreError::Corrupt {
        tree: "users",
        reason: reason.into(),
    }
}
