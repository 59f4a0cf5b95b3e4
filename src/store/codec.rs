//! How both backends turn stored values into records and back, sealed for its row when a
//! data key is set. A backend says only how it seals and opens a value ([`Codec::seal`],
//! [`Codec::unseal`]: which trees, which legacy formats) and whether it writes the
//! compact encoding ([`Codec::COMPACT`]); encoding, decoding and what a corrupt value
//! becomes are written once here.
//!
//! Encodings: JSON (Redis, and sled up to schema 2), or compact — the version byte
//! [`COMPACT_V1`] followed by postcard (sled from schema 3: a turn is ~3× smaller). Both
//! read everywhere: JSON values start with `{`, `[` or `"`, never with that byte, so a
//! store keeps reading what an older version wrote. Sealing wraps the encoded bytes.

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::domain::UserRef;
use crate::events::ErrorKind;
use crate::store::{StoreError, StoreResult};

/// The first byte of a compact value (postcard follows). 0xC1 never starts UTF-8 text,
/// so no JSON value (nor a sealed one: `CFE…`) starts with it.
pub(crate) const COMPACT_V1: u8 = 0xC1;

/// `v` as stored in the compact encoding: [`COMPACT_V1`] + postcard.
pub(crate) fn to_compact<T: Serialize>(v: &T) -> StoreResult<Vec<u8>> {
    postcard::to_extend(v, vec![COMPACT_V1]).map_err(|e| StoreError::Io(format!("encode: {e}")))
}

/// Decodes plain (unsealed) bytes in either encoding. The error names the tree and the
/// kind of fault, never the value (serde's message can quote it: a name, a text).
pub(crate) fn from_plain<T: DeserializeOwned>(tree: &'static str, plain: &[u8]) -> StoreResult<T> {
    if let Some((&COMPACT_V1, rest)) = plain.split_first() {
        return postcard::from_bytes(rest).map_err(|e| StoreError::Corrupt {
            tree,
            reason: format!("compact value: {e:?}"),
        });
    }
    serde_json::from_slice(plain).map_err(|e| StoreError::Corrupt {
        tree,
        reason: format!(
            "{:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ),
    })
}

/// Values of a backend's trees, addressed by tree name and row key.
pub(crate) trait Codec {
    /// A row key as the backend spells it (bytes on sled, text on Redis).
    type Key: ?Sized;

    /// Whether new values are written compact ([`to_compact`]) rather than as JSON.
    const COMPACT: bool = false;

    /// Seals `plain` for row `key` of `tree` when a data key is set (and the tree holds
    /// personal values).
    fn seal(&self, tree: &str, key: &Self::Key, plain: &[u8]) -> Vec<u8>;

    /// The plain bytes of a stored value; an error says why it cannot be opened
    /// (never the value).
    fn unseal<'a>(
        &self,
        tree: &str,
        key: &Self::Key,
        bytes: &'a [u8],
    ) -> Result<Cow<'a, [u8]>, String>;

    /// A record as stored: its encoding, sealed for its row.
    fn encode<T: Serialize>(&self, tree: &str, key: &Self::Key, v: &T) -> StoreResult<Vec<u8>> {
        let plain = match Self::COMPACT {
            true => to_compact(v)?,
            false => serde_json::to_vec(v).map_err(|e| StoreError::Io(format!("encode: {e}")))?,
        };
        Ok(self.seal(tree, key, &plain))
    }

    /// Decodes a value; an unreadable one is an error naming the tree (never its
    /// contents or key: the reason reaches logs).
    fn decode_strict<T: DeserializeOwned>(
        &self,
        tree: &'static str,
        key: &Self::Key,
        bytes: &[u8],
    ) -> StoreResult<T> {
        let plain = self
            .unseal(tree, key, bytes)
            .map_err(|reason| StoreError::Corrupt { tree, reason })?;
        from_plain(tree, &plain)
    }

    /// Decodes a value; a corrupt one is logged and skipped (`None`) so the daemon keeps
    /// serving. The log names the tree, not the key (keys can hold ids and names).
    fn decode<T>(&self, tree: &'static str, key: &Self::Key, bytes: &[u8]) -> Option<T>
    where
        T: DeserializeOwned,
    {
        match self.decode_strict(tree, key, bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(error.kind = ErrorKind::StoreCorrupt.as_str(), tree, error = %e, "{CORRUPT_SKIPPED}");
                None
            }
        }
    }
}

const CORRUPT_SKIPPED: &str = "corrupt store entry skipped";

/// Logs that a value of `tree` that cannot be read was skipped: the tree only, never
/// the key or the value. `inbox` entries say so in their own words.
pub(crate) fn corrupt_skipped(tree: &'static str) {
    let message = match tree {
        "inbox" => "unreadable inbox entry skipped",
        _ => CORRUPT_SKIPPED,
    };
    tracing::error!(
        error.kind = ErrorKind::StoreCorrupt.as_str(),
        tree,
        "{message}"
    );
}

/// `@Name` → `name`: the form usernames are indexed by.
pub(crate) fn normalise_username(name: &str) -> String {
    name.trim().trim_start_matches('@').to_lowercase()
}

/// A backend's username index (normalised `@name` on a platform → user): the backend
/// says how one name is dropped or set; how a rename moves the index is written once.
pub(crate) trait UsernameIndex {
    /// Drops `name` on `user`'s platform if it still points at `user`.
    fn drop_username(&self, user: &UserRef, name: &str) -> StoreResult<()>;
    /// Points `name` on `user`'s platform at `user`.
    fn set_username(&self, user: &UserRef, name: &str) -> StoreResult<()>;

    /// Moves the index from `before` to `after` for `user`: the old name is dropped if
    /// it still points at this user (renames leave nothing stale), the new one points
    /// at them (the newest holder of a name on a platform wins).
    fn reindex_username(
        &self,
        user: &UserRef,
        before: Option<&str>,
        after: Option<&str>,
    ) -> StoreResult<()> {
        let norm = |n: Option<&str>| n.map(normalise_username).filter(|n| !n.is_empty());
        let (before, after) = (norm(before), norm(after));
        if before == after {
            return Ok(());
        }
        if let Some(old) = &before {
            self.drop_username(user, old)?;
        }
        if let Some(new) = &after {
            self.set_username(user, new)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Role, Turn};

    #[test]
    fn compact_values_round_trip_json_ones_still_read_and_errors_quote_nothing() {
        let turn = Turn {
            role: Role::Assistant,
            text: "echo: my favourite colour is teal".into(),
            tokens: 8,
            at: 1_796_211_305,
        };
        let compact = to_compact(&turn).unwrap();
        let json = serde_json::to_vec(&turn).unwrap();
        assert_eq!(compact.first(), Some(&COMPACT_V1));
        assert!(
            compact.len() * 2 < json.len(),
            "{} vs {}",
            compact.len(),
            json.len()
        );
        assert_eq!(from_plain::<Turn>("turns", &compact).unwrap(), turn);
        assert_eq!(from_plain::<Turn>("turns", &json).unwrap(), turn);
        let cut = &compact[..compact.len() - 3];
        let err = from_plain::<Turn>("turns", cut).unwrap_err().to_string();
        assert!(err.starts_with("corrupt store entry in turns"), "{err}");
        assert!(!err.contains("teal"), "{err}");
    }
}
