use super::super::fixtures::*;
use super::*;

#[test]
fn recent_turns_keeps_the_newest_within_budget() {
    let (_dir, s) = temp_store();
    let k = key("1");
    for i in 0..10 {
        s.append_turns(&k, &[turn(&format!("t{i}"), 10)], None)
            .unwrap();
    }
    // another conversation sharing a prefix must not leak in
    s.append_turns(&key("10"), &[turn("other", 1)], None)
        .unwrap();
    let got: Vec<String> = s
        .recent_turns(&k, 35)
        .unwrap()
        .into_iter()
        .map(|t| t.text)
        .collect();
    assert_eq!(got, vec!["t7", "t8", "t9"]);
    assert_eq!(s.all_turns(&k).unwrap().len(), 10);
}

#[test]
fn corrupt_turn_is_skipped() {
    let (_dir, s) = temp_store();
    let k = key("1");
    s.append_turns(&k, &[turn("a", 1)], None).unwrap();
    let mut bad = s.conv_prefix(&k);
    bad.extend_from_slice(&u64::MAX.to_be_bytes());
    s.turns.insert(bad, b"{not json".as_slice()).unwrap();
    let got = s.recent_turns(&k, 100).unwrap();
    assert_eq!(got.len(), 1);
}

/// The `turns` rows of conversation `k` as stored: how many turns each holds.
fn rows_of(s: &SledStore, k: &ConversationKey) -> Vec<usize> {
    s.turns
        .scan_prefix(&s.conv_prefix(k))
        .map(|item| {
            let (k, v) = item.unwrap();
            s.decode_turns(&k, &v).unwrap().len()
        })
        .collect()
}

/// A fresh store, sealed with a data key or not.
fn store(sealed: bool) -> (tempfile::TempDir, SledStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open_with_key(dir.path(), 8, 500, sealed.then_some(KEY)).unwrap();
    (dir, s)
}

/// The texts of conversation `k`, oldest first.
fn texts(s: &SledStore, k: &ConversationKey) -> Vec<String> {
    s.all_turns(k)
        .unwrap()
        .into_iter()
        .map(|t| t.text)
        .collect()
}

#[test]
fn an_exchange_is_one_row_and_reads_back_in_order() {
    for sealed in [false, true] {
        let (_dir, s) = store(sealed);
        let k = key("1");
        s.append_turns(&k, &[turn("q1", 1), turn("a1", 1)], None)
            .unwrap();
        s.append_turns(&k, &[turn("note", 1)], None).unwrap();
        s.append_turns(&k, &[turn("q2", 1), turn("a2", 1), turn("x", 1)], None)
            .unwrap();
        assert_eq!(rows_of(&s, &k), [2, 1, 2, 1], "sealed {sealed}");
        assert_eq!(texts(&s, &k), ["q1", "a1", "note", "q2", "a2", "x"]);
        // A budget that ends inside a row keeps only that row's newer turn.
        let recent: Vec<String> = s
            .recent_turns(&k, 4)
            .unwrap()
            .into_iter()
            .map(|t| t.text)
            .collect();
        assert_eq!(recent, ["note", "q2", "a2", "x"]);
        let recent: Vec<String> = s
            .recent_turns(&k, 5)
            .unwrap()
            .into_iter()
            .map(|t| t.text)
            .collect();
        assert_eq!(recent, ["a1", "note", "q2", "a2", "x"]);
        // Clearing counts turns, not rows.
        assert_eq!(s.clear_conversation(&k).unwrap(), 6);
        assert!(s.all_turns(&k).unwrap().is_empty());
    }
}

#[test]
fn rows_written_one_turn_each_read_with_exchange_rows() {
    let (_dir, s) = temp_store();
    let k = key("1");
    // schema 3 wrote one row per turn (compact or, before, JSON)
    let prefix = s.conv_prefix(&k);
    for v in [
        serde_json::to_vec(&turn("old json", 1)).unwrap(),
        crate::store::codec::to_compact(&turn("old compact", 1)).unwrap(),
    ] {
        let id = s.db.generate_id().unwrap();
        s.turns
            .insert([prefix.as_slice(), &id.to_be_bytes()].concat(), v)
            .unwrap();
    }
    s.append_turns(&k, &[turn("new q", 1), turn("new a", 1)], None)
        .unwrap();
    assert_eq!(texts(&s, &k), ["old json", "old compact", "new q", "new a"]);
    assert_eq!(rows_of(&s, &k), [1, 1, 2]);
}

#[test]
fn purging_is_per_turn_even_inside_an_exchange_row() {
    for sealed in [false, true] {
        let (_dir, s) = store(sealed);
        let k = key("1");
        let at = |text: &str, at: i64| Turn {
            at,
            ..turn(text, 1)
        };
        s.append_turns(&k, &[at("old q", 100), at("old a", 110)], None)
            .unwrap();
        s.append_turns(&k, &[at("late q", 190), at("late a", 210)], None)
            .unwrap();
        s.append_turns(&k, &[at("new", 300)], None).unwrap();
        assert_eq!(s.purge_turns_before(200).unwrap(), 3, "sealed {sealed}");
        assert_eq!(texts(&s, &k), ["late a", "new"]);
        assert_eq!(rows_of(&s, &k), [1, 1]);
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;

    /// One store for every case (opening sled per case is slow); each case has its own
    /// conversation.
    fn store() -> &'static SledStore {
        static STORE: OnceLock<(tempfile::TempDir, SledStore)> = OnceLock::new();
        &STORE
            .get_or_init(|| {
                let dir = tempfile::tempdir().unwrap();
                let s = SledStore::open_with_key(dir.path(), 8, 500, Some(KEY)).unwrap();
                (dir, s)
            })
            .1
    }

    fn appends() -> impl Strategy<Value = Vec<Vec<(String, u32)>>> {
        let turn = (any::<String>(), 0u32..40);
        proptest::collection::vec(proptest::collection::vec(turn, 1..5), 0..8)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Whatever the writes' sizes and texts, the conversation reads back as written,
        /// and the newest turns within a budget are the model's.
        #[test]
        fn turns_read_back_as_written(writes in appends(), budget in 0usize..200) {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let s = store();
            let k = key(&format!("p{}", NEXT.fetch_add(1, Ordering::Relaxed)));
            let mut model: Vec<Turn> = Vec::new();
            for write in &writes {
                let turns: Vec<Turn> = write.iter().map(|(t, n)| turn(t, *n)).collect();
                s.append_turns(&k, &turns, None).unwrap();
                model.extend(turns);
            }
            prop_assert_eq!(&s.all_turns(&k).unwrap(), &model);
            let mut used = 0;
            let fit = model
                .iter()
                .rev()
                .take_while(|t| { used += t.tokens as usize; used <= budget })
                .count();
            prop_assert_eq!(&s.recent_turns(&k, budget).unwrap()[..], &model[model.len() - fit..]);
            let rows = rows_of(s, &k);
            prop_assert!(rows.iter().all(|n| (1..=2).contains(n)), "{:?}", rows);
            prop_assert_eq!(s.clear_conversation(&k).unwrap(), model.len());
        }
    }
}
