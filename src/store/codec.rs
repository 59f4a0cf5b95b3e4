//! How both backends turn stored values into records and back: JSON, sealed for its
//! row when a data key is set. A backend says only how it seals and opens a value
//! ([`Codec::seal`], [`Codec::unseal`]: which trees, which legacy formats); encoding,
//! decoding and what a corrupt value becomes are written once here.

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::domain::UserRef;
use crate::events::ErrorKind;
use crate::store::{StoreError, StoreResult};

/// Values of a backend's trees, addressed by tree name and row key.
pub(crate) trait Codec {
    /// A row key as the backend spells it (bytes on sled, text on Redis).
    type Key: ?Sized;

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

    /// A record as stored: its JSON, sealed for its row.
    fn encode<T: Serialize>(&self, tree: &str, key: &Self::Key, v: &T) -> StoreResult<Vec<u8>> {
        let plain = serde_json::to_vec(v).map_err(|e| StoreError::Io(format!("encode: {e}")))?;
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
        // serde's message can quote the value (a name, a text): give only where and what kind.
        serde_json::from_slice(&plain).map_err(|e| StoreError::Corrupt {
            tree,
            reason: format!(
                "{:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ),
        })
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
