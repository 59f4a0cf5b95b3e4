//! How both backends turn stored values into records and back, sealed for its row when a
//! data key is set. A backend says only how it seals and opens a value ([`Codec::seal`],
//! [`Codec::unseal`]: which trees, which legacy formats) and whether it writes the
//! compact encoding ([`Codec::COMPACT`]); encoding, decoding and what a corrupt value
//! becomes are written once here.
//!
//! Encodings: JSON (Redis, and sled up to schema 2), or compact — the version byte
//! [`COMPACT_V1`] followed by postcard (sled from schema 3: a turn is ~3× smaller; from
//! schema 4 a sled `turns` row holds an exchange, [`COMPACT_TURNS_V1`] + a sequence). All
//! read everywhere: JSON values start with `{`, `[` or `"`, never with that byte, so a
//! store keeps reading what an older version wrote. Sealing wraps the encoded bytes.

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::domain::UserRef;
use crate::events::ErrorKind;
use crate::store::{StoreError, StoreResult, Turn};

/// The first byte of a compact value (postcard follows). 0xC1 never starts UTF-8 text,
/// so no JSON value (nor a sealed one: `CFE…`) starts with it.
pub(crate) const COMPACT_V1: u8 = 0xC1;

/// The first byte of a compact `turns` row holding several turns (schema 4: one row per
/// exchange): postcard of the sequence follows. 0xC0 never starts UTF-8 text either.
pub(crate) const COMPACT_TURNS_V1: u8 = 0xC0;

/// How many turns one `turns` row holds at most: an exchange (question and answer).
/// Larger rows were measured to cost more memory under load in sled 0.34 than they save
/// in its page table (BENCHMARKS.md, "Fewer, larger keys").
pub(crate) const TURNS_PER_ROW: usize = 2;

/// The plain value of a `turns` row holding `turns`: one turn as a record of its own
/// (what schema 3 wrote), several as one sequence — compact, or JSON (an array).
pub(crate) fn turns_to_plain(turns: &[Turn], compact: bool) -> StoreResult<Vec<u8>> {
    let encoded = match (turns, compact) {
        ([one], true) => return to_compact(one),
        ([one], false) => serde_json::to_vec(one).map_err(|e| e.to_string()),
        (many, true) => {
            postcard::to_extend(many, vec![COMPACT_TURNS_V1]).map_err(|e| e.to_string())
        }
        (many, false) => serde_json::to_vec(many).map_err(|e| e.to_string()),
    };
    encoded.map_err(|e| StoreError::Io(format!("encode: {e}")))
}

/// The turns of a plain `turns` row in any encoding ever written: one turn (JSON or
/// compact) or a sequence (compact, or a JSON array).
pub(crate) fn turns_from_plain(plain: &[u8]) -> StoreResult<Vec<Turn>> {
    match plain.split_first() {
        Some((&COMPACT_TURNS_V1, rest)) => {
            postcard::from_bytes(rest).map_err(|e| StoreError::Corrupt {
                tree: "turns",
                reason: format!("compact turns: {e:?}"),
            })
        }
        Some((b'[', _)) => from_plain("turns", plain),
        _ => from_plain::<Turn>("turns", plain).map(|t| vec![t]),
    }
}

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

    /// A `turns` row's value holding `turns` (one, or an exchange's), sealed for its row.
    fn encode_turns(&self, key: &Self::Key, turns: &[Turn]) -> StoreResult<Vec<u8>> {
        Ok(self.seal("turns", key, &turns_to_plain(turns, Self::COMPACT)?))
    }

    /// The turns of a `turns` row; a corrupt row is logged and skipped (`None`).
    fn decode_turns(&self, key: &Self::Key, bytes: &[u8]) -> Option<Vec<Turn>> {
        let turns = self
            .unseal("turns", key, bytes)
            .map_err(|reason| StoreError::Corrupt {
                tree: "turns",
                reason,
            })
            .and_then(|plain| turns_from_plain(&plain));
        match turns {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error.kind = ErrorKind::StoreCorrupt.as_str(), tree = "turns", error = %e, "{CORRUPT_SKIPPED}");
                None
            }
        }
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
