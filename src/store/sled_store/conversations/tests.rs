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
