//! One role's rows inside the shared `rows` tree (schema 3): every key starts with the
//! role's tag byte, so a message's writes to several roles (turns, pending reply, index,
//! user record) are one `apply_batch` on one tree — no multi-tree transaction. A
//! [`Part`] hands out keys without the tag, so the rest of the store (and sealing, which
//! binds a value to its role and row key) sees the same rows as with one tree per role.

use sled::{Batch, IVec, Tree};

/// The roles in the `rows` tree and their tag bytes (never reuse or renumber one).
pub(super) const PARTS: &[(&str, u8)] = &[
    ("turns", b't'),
    ("conv_index", b'i'),
    ("users", b'u'),
    ("usernames", b'n'),
    ("cache", b'c'),
    ("cache_time", b'e'),
    ("audit", b'a'),
    ("handled", b'h'),
    ("inbox", b'x'),
];

/// The name of the shared tree.
pub(super) const ROWS: &str = "rows";

type Row = sled::Result<(IVec, IVec)>;

/// The rows of one role: a tag byte in front of every key of one shared tree.
#[derive(Clone)]
pub(super) struct Part {
    tree: Tree,
    tag: u8,
}

fn strip(item: Row) -> Row {
    item.map(|(k, v)| (IVec::from(k.get(1..).unwrap_or_default()), v))
}

impl Part {
    pub(super) fn new(tree: Tree, tag: u8) -> Part {
        Part { tree, tag }
    }

    /// The key in the shared tree.
    pub(super) fn full(&self, k: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(k.len() + 1);
        full.push(self.tag);
        full.extend_from_slice(k);
        full
    }

    pub(super) fn get(&self, k: impl AsRef<[u8]>) -> sled::Result<Option<IVec>> {
        self.tree.get(self.full(k.as_ref()))
    }

    pub(super) fn insert(
        &self,
        k: impl AsRef<[u8]>,
        v: impl Into<IVec>,
    ) -> sled::Result<Option<IVec>> {
        self.tree.insert(self.full(k.as_ref()), v)
    }

    /// Replaces row `k` (removes it with `new` = `None`) only if it still holds `old`;
    /// `false` when another writer changed or removed it first.
    pub(super) fn replace(&self, k: &[u8], old: &[u8], new: Option<Vec<u8>>) -> sled::Result<bool> {
        let swapped = self.tree.compare_and_swap(self.full(k), Some(old), new)?;
        Ok(swapped.is_ok())
    }

    pub(super) fn remove(&self, k: impl AsRef<[u8]>) -> sled::Result<Option<IVec>> {
        self.tree.remove(self.full(k.as_ref()))
    }

    /// The rows whose (untagged) key starts with `prefix`, keys without the tag.
    pub(super) fn scan_prefix(
        &self,
        prefix: &[u8],
    ) -> impl DoubleEndedIterator<Item = Row> + use<> {
        self.tree.scan_prefix(self.full(prefix)).map(strip)
    }

    /// Every row of this role, in key order.
    pub(super) fn iter(&self) -> impl DoubleEndedIterator<Item = Row> + use<> {
        self.scan_prefix(&[])
    }

    /// The rows after `after` (every row when `None`), in key order.
    pub(super) fn iter_after(&self, after: Option<&[u8]>) -> impl Iterator<Item = Row> + use<> {
        let start = match after {
            Some(k) => std::ops::Bound::Excluded(self.full(k)),
            None => std::ops::Bound::Included(vec![self.tag]),
        };
        let end = match self.tag.checked_add(1) {
            Some(next) => std::ops::Bound::Excluded(vec![next]),
            None => std::ops::Bound::Unbounded,
        };
        self.tree.range::<Vec<u8>, _>((start, end)).map(strip)
    }

    /// The rows whose key sorts before `end`, in key order.
    pub(super) fn iter_before(&self, end: &[u8]) -> impl Iterator<Item = Row> + use<> {
        self.tree.range(vec![self.tag]..self.full(end)).map(strip)
    }

    /// Removes and returns the first row (another caller taking it first is retried).
    pub(super) fn pop_min(&self) -> sled::Result<Option<(IVec, IVec)>> {
        loop {
            let Some(first) = self.tree.scan_prefix([self.tag]).keys().next() else {
                return Ok(None);
            };
            let first = first?;
            if let Some(v) = self.tree.remove(&first)? {
                return Ok(Some((IVec::from(first.get(1..).unwrap_or_default()), v)));
            }
        }
    }

    /// How many rows (a scan: O(n), like sled's own `len`).
    pub(super) fn len(&self) -> usize {
        self.tree.scan_prefix([self.tag]).count()
    }

    /// Removes every row of this role.
    pub(super) fn clear(&self) -> sled::Result<()> {
        let mut batch = Batch::default();
        for item in self.tree.scan_prefix([self.tag]).keys() {
            batch.remove(item?);
        }
        self.tree.apply_batch(batch)
    }

    /// Adds an insert of row `k` to `batch` (a batch of the shared tree).
    pub(super) fn put(&self, batch: &mut Batch, k: &[u8], v: impl Into<IVec>) {
        batch.insert(self.full(k), v);
    }

    /// Adds a removal of row `k` to `batch`.
    pub(super) fn del(&self, batch: &mut Batch, k: &[u8]) {
        batch.remove(self.full(k));
    }

    /// Applies a batch of the shared tree atomically (any parts' rows).
    pub(super) fn apply(&self, batch: Batch) -> sled::Result<()> {
        self.tree.apply_batch(batch)
    }
}
