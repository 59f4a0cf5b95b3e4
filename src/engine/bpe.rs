//! A compact, counting-only cl100k_base BPE tokenizer.
//!
//! tiktoken-rs' `CoreBPE` keeps the 100k-token vocabulary three times over (encoder map,
//! decoder map, sorted token list) plus one regex clone per thread: ≈24 MB resident. We only
//! ever need "how many tokens is this text", so at start-up we load the `CoreBPE` once, copy
//! each token's bytes into one contiguous buffer with an offset table and a small
//! open-addressing hash index, and drop it again (≈2 MB in all).
//!
//! Counting follows the reference exactly: split the text with the cl100k pre-tokenisation
//! pattern, then for each piece either find it whole in the vocabulary or run byte-pair
//! merging (always merge the adjacent pair whose concatenation has the lowest rank, the
//! leftmost on ties, until no adjacent pair is a token) and count the parts. Pieces up to
//! [`SMALL_PIECE`] bytes merge in stack arrays; longer ones use a heap, so a huge single
//! "word" costs O(n log n), not O(n²).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use fancy_regex::Regex;

/// The cl100k_base pre-tokenisation pattern, exactly as tiktoken-rs 0.12 compiles it. This
/// is the newer upstream form: possessive quantifiers, and a trailing run of whitespace at
/// the very end of the text (`\s++$`) is one piece. The older form without `\s++$` splits
/// e.g. `"hi \n "` differently and so counts differently.
const CL100K_PATTERN: &str = concat!(
    r"'(?i:[sdmt]|ll|ve|re)",
    r"|[^\r\n\p{L}\p{N}]?+\p{L}++",
    r"|\p{N}{1,3}+",
    r"| ?[^\s\p{L}\p{N}]++[\r\n]*+",
    r"|\s++$",
    r"|\s*[\r\n]",
    r"|\s+(?!\S)",
    r"|\s",
);

/// Ordinary (non-special) ranks of cl100k_base are 0..100256; the special tokens start at
/// 100257 and are never produced by ordinary encoding.
const CL100K_RANKS: u32 = 100_256;

/// Table entries keep `rank + 1` in the low bits (0 = empty slot) ...
const RANK_BITS: u32 = 17;
const RANK_MASK: u32 = (1 << RANK_BITS) - 1;
/// ... and 15 more bits of the key's hash above them (bits the slot index does not use),
/// so most probes that meet a different token are rejected without touching its bytes.
const TAG_MASK: u32 = (1 << (32 - RANK_BITS)) - 1;
/// Tag bits are hash bits 24..39; the slot takes the top log2(table size) bits (18 for
/// cl100k), so the two do not overlap. (Overlap would only cost speed, not correctness.)
const TAG_SHIFT: u32 = 24;

/// Pieces up to this many bytes merge in fixed stack arrays (quadratic, but tiny and
/// allocation-free); longer pieces use the heap-based merge.
const SMALL_PIECE: usize = 128;

/// The cl100k_base vocabulary, stored compactly, plus the pre-tokenisation regex.
pub struct Cl100k {
    /// All token bytes, back to back, in rank order.
    bytes: Box<[u8]>,
    /// Token `r` is `bytes[offsets[r]..offsets[r + 1]]` (empty if the rank is unused).
    offsets: Box<[u32]>,
    /// Open-addressing hash index (linear probing, power-of-two size): `tag | (rank + 1)`.
    table: Box<[u32]>,
    /// `64 - log2(table.len())`: the slot is the top bits of the hash.
    slot_shift: u32,
    /// Longest token, in bytes; anything longer cannot be a token.
    max_token_len: usize,
    regex: Regex,
}

impl std::fmt::Debug for Cl100k {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cl100k")
            .field("tokens", &self.token_count())
            .field("heap_bytes", &self.heap_bytes())
            .finish_non_exhaustive()
    }
}

/// FxHash-style hash of a byte slice, reading 8 bytes per step (short slices in one or two
/// overlapping loads, no copying), with a final mix so the top bits (the slot) and the middle
/// bits (the tag) both depend on every input byte.
#[inline]
fn hash_bytes(s: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    #[inline(always)]
    fn step(h: u64, w: u64) -> u64 {
        (h.rotate_left(5) ^ w).wrapping_mul(K)
    }
    #[inline(always)]
    fn u32_at(s: &[u8], i: usize) -> u64 {
        let mut w = [0u8; 4];
        w.copy_from_slice(&s[i..i + 4]);
        u64::from(u32::from_le_bytes(w))
    }
    #[inline(always)]
    fn u64_at(s: &[u8], i: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[i..i + 8]);
        u64::from_le_bytes(w)
    }
    let len = s.len();
    let mut h = len as u64;
    if len < 4 {
        if len > 0 {
            // With the length mixed in, (first, middle, last) identifies 1..=3 bytes.
            let w = u64::from(s[0]) | u64::from(s[len / 2]) << 8 | u64::from(s[len - 1]) << 16;
            h = step(h, w);
        }
    } else if len <= 8 {
        h = step(h, u32_at(s, 0) | u32_at(s, len - 4) << 32);
    } else {
        let mut i = 0;
        while i + 8 < len {
            h = step(h, u64_at(s, i));
            i += 8;
        }
        h = step(h, u64_at(s, len - 8));
    }
    (h ^ (h >> 29)).wrapping_mul(K)
}

impl Cl100k {
    /// Builds the compact tables from tiktoken-rs' cl100k_base, then frees the `CoreBPE`
    /// and hands the freed heap back to the OS.
    pub fn load() -> Result<Self, String> {
        let regex = Regex::new(CL100K_PATTERN).map_err(|e| format!("pattern: {e}"))?;
        let (bytes, offsets) = {
            let core = tiktoken_rs::cl100k_base().map_err(|e| e.to_string())?;
            let mut bytes = Vec::with_capacity(1 << 20);
            let mut offsets = Vec::with_capacity(CL100K_RANKS as usize + 1);
            offsets.push(0u32);
            for rank in 0..CL100K_RANKS {
                // A rank that does not decode is a gap in the vocabulary: it keeps an empty
                // span and never enters the index.
                if let Ok(token) = core.decode_bytes(&[rank]) {
                    bytes.extend_from_slice(&token);
                }
                let end = u32::try_from(bytes.len())
                    .map_err(|_| "vocabulary larger than 4 GiB".to_string())?;
                offsets.push(end);
            }
            (bytes.into_boxed_slice(), offsets.into_boxed_slice())
            // `core` (≈24 MB) is dropped here.
        };
        crate::memory::release_free_heap();
        Self::from_parts(bytes, offsets, regex)
    }

    fn from_parts(bytes: Box<[u8]>, offsets: Box<[u32]>, regex: Regex) -> Result<Self, String> {
        let ranks = offsets.len().saturating_sub(1);
        if ranks >= RANK_MASK as usize {
            return Err(format!("vocabulary too large: {ranks} ranks"));
        }
        let token = |rank: u32| {
            let r = rank as usize;
            &bytes[offsets[r] as usize..offsets[r + 1] as usize]
        };
        let size = (ranks * 5 / 2).next_power_of_two().max(2);
        let slot_shift = 64 - size.trailing_zeros();
        let mut table = vec![0u32; size].into_boxed_slice();
        let mut max_token_len = 0;
        for rank in 0..ranks as u32 {
            let bytes = token(rank);
            if bytes.is_empty() {
                continue;
            }
            max_token_len = max_token_len.max(bytes.len());
            let h = hash_bytes(bytes);
            let mut slot = (h >> slot_shift) as usize;
            loop {
                let entry = table[slot];
                if entry == 0 {
                    table[slot] = Self::tag(h) | (rank + 1);
                    break;
                }
                if token((entry & RANK_MASK) - 1) == bytes {
                    return Err(format!("token of rank {rank} is duplicated"));
                }
                slot = (slot + 1) & (size - 1);
            }
        }
        let me = Self {
            bytes,
            offsets,
            table,
            slot_shift,
            max_token_len,
            regex,
        };
        // Byte-pair merging starts from single bytes, so every byte must be a token.
        for b in 0..=255u8 {
            if me.rank(&[b]).is_none() {
                return Err(format!("byte {b:#04x} is not a token"));
            }
        }
        Ok(me)
    }

    #[inline]
    fn tag(h: u64) -> u32 {
        (((h >> TAG_SHIFT) as u32) & TAG_MASK) << RANK_BITS
    }

    #[inline]
    fn token(&self, rank: u32) -> &[u8] {
        let r = rank as usize;
        &self.bytes[self.offsets[r] as usize..self.offsets[r + 1] as usize]
    }

    /// Number of tokens in the index.
    pub fn token_count(&self) -> usize {
        self.offsets.windows(2).filter(|w| w[0] != w[1]).count()
    }

    /// Heap bytes held by the tables (the compiled regex not included).
    pub fn heap_bytes(&self) -> usize {
        self.bytes.len() + 4 * self.offsets.len() + 4 * self.table.len()
    }

    /// The rank of `s` if it is a token.
    #[inline]
    fn rank(&self, s: &[u8]) -> Option<u32> {
        if s.len() > self.max_token_len {
            return None;
        }
        let h = hash_bytes(s);
        let tag = Self::tag(h);
        let mask = self.table.len() - 1;
        let mut slot = (h >> self.slot_shift) as usize;
        loop {
            let entry = self.table[slot];
            if entry == 0 {
                return None;
            }
            if entry & !RANK_MASK == tag {
                let rank = (entry & RANK_MASK) - 1;
                if self.token(rank) == s {
                    return Some(rank);
                }
            }
            slot = (slot + 1) & mask;
        }
    }

    /// How many cl100k_base tokens `text` encodes to (ordinary encoding: special-token
    /// text such as `<|endoftext|>` counts as plain text).
    pub fn count(&self, text: &str) -> usize {
        let mut scratch = Scratch::default();
        let mut total = 0;
        let mut counted_to = 0;
        for piece in self.regex.find_iter(text) {
            match piece {
                Ok(m) => {
                    total += self.count_piece(m.as_str().as_bytes(), &mut scratch);
                    counted_to = m.end();
                }
                Err(_) => {
                    // The regex gave up (backtrack limit). BPE never yields more tokens
                    // than bytes, so counting one per remaining byte is a safe overestimate
                    // for budgeting.
                    return total + (text.len() - counted_to);
                }
            }
        }
        total
    }

    fn count_piece(&self, piece: &[u8], scratch: &mut Scratch) -> usize {
        if piece.len() <= 1 {
            return piece.len(); // every single byte is a token
        }
        if self.rank(piece).is_some() {
            return 1;
        }
        if piece.len() <= SMALL_PIECE {
            self.merge_small(piece)
        } else {
            self.merge_large(piece, scratch)
        }
    }

    /// Byte-pair merging in stack arrays, for `2 <= piece.len() <= SMALL_PIECE`. Returns
    /// the number of parts left.
    fn merge_small(&self, piece: &[u8]) -> usize {
        debug_assert!((2..=SMALL_PIECE).contains(&piece.len()));
        let n = piece.len();
        // Part `i` is `piece[starts[i]..starts[i + 1]]`; `ranks[i]` is the rank of parts `i`
        // and `i + 1` joined (u32::MAX: not a token).
        let mut starts = [0u8; SMALL_PIECE + 1];
        let mut ranks = [u32::MAX; SMALL_PIECE];
        for (i, s) in starts.iter_mut().enumerate().take(n + 1) {
            *s = i as u8; // SMALL_PIECE < 256
        }
        let pair_rank = |starts: &[u8], i: usize| -> u32 {
            self.rank(&piece[starts[i] as usize..starts[i + 2] as usize])
                .unwrap_or(u32::MAX)
        };
        for (i, r) in ranks.iter_mut().enumerate().take(n - 1) {
            *r = pair_rank(&starts, i);
        }
        let mut parts = n;
        while parts > 1 {
            let mut best = u32::MAX;
            let mut at = 0;
            for (i, &r) in ranks[..parts - 1].iter().enumerate() {
                if r < best {
                    best = r;
                    at = i;
                }
            }
            if best == u32::MAX {
                break;
            }
            // Join parts `at` and `at + 1`.
            starts.copy_within(at + 2..parts + 1, at + 1);
            if at + 2 < parts {
                ranks.copy_within(at + 2..parts - 1, at + 1);
            }
            parts -= 1;
            ranks[at] = if at + 1 < parts {
                pair_rank(&starts, at)
            } else {
                u32::MAX
            };
            if at > 0 {
                ranks[at - 1] = pair_rank(&starts, at - 1);
            }
        }
        parts
    }

    /// Byte-pair merging with a min-heap of candidate pairs: O(n log n) for long pieces.
    /// Parts are identified by their start offset; `end[s]` is where part `s` ends (and
    /// so where the next part starts), 0 once the part was absorbed by its left neighbour.
    fn merge_large(&self, piece: &[u8], scratch: &mut Scratch) -> usize {
        let n = piece.len();
        if u32::try_from(n).is_err() {
            return n; // not realistic; safe overestimate
        }
        let Scratch { end, prev, heap } = scratch;
        end.clear();
        prev.clear();
        heap.clear();
        end.extend(1..=n as u32);
        prev.extend((0..n as u32).map(|i| i.wrapping_sub(1))); // u32::MAX: none
        for i in 0..n - 1 {
            if let Some(r) = self.rank(&piece[i..i + 2]) {
                heap.push(Reverse((r, i as u32, i as u32 + 2)));
            }
        }
        let mut parts = n;
        while let Some(Reverse((_, s, pair_end))) = heap.pop() {
            let (s, pair_end) = (s as usize, pair_end as usize);
            let right = end[s] as usize;
            // Stale entry: `s` was absorbed, or a neighbour changed since it was pushed.
            if right <= s || right >= n || end[right] as usize != pair_end {
                continue;
            }
            end[s] = pair_end as u32;
            end[right] = 0;
            parts -= 1;
            if pair_end < n {
                prev[pair_end] = s as u32;
                let after = end[pair_end];
                if let Some(r) = self.rank(&piece[s..after as usize]) {
                    heap.push(Reverse((r, s as u32, after)));
                }
            }
            let left = prev[s];
            if left != u32::MAX {
                if let Some(r) = self.rank(&piece[left as usize..pair_end]) {
                    heap.push(Reverse((r, left, pair_end as u32)));
                }
            }
        }
        parts
    }
}

/// Buffers for [`Cl100k::merge_large`], reused across the pieces of one text.
#[derive(Default)]
struct Scratch {
    end: Vec<u32>,
    prev: Vec<u32>,
    heap: BinaryHeap<Reverse<(u32, u32, u32)>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::sync::OnceLock;

    fn ours() -> &'static Cl100k {
        static OURS: OnceLock<Cl100k> = OnceLock::new();
        OURS.get_or_init(|| Cl100k::load().expect("load cl100k"))
    }

    fn reference() -> &'static tiktoken_rs::CoreBPE {
        static REF: OnceLock<tiktoken_rs::CoreBPE> = OnceLock::new();
        REF.get_or_init(|| tiktoken_rs::cl100k_base().expect("load reference"))
    }

    fn fixed_corpus() -> Vec<String> {
        let mut v: Vec<String> = [
            "",
            " ",
            "a",
            "hello world",
            "Hello, world! How are you today?",
            "The quick brown fox jumps over the lazy dog. It's a sunny day; isn't it?",
            "Four score and seven years ago our fathers brought forth on this continent, a new \
             nation, conceived in Liberty, and dedicated to the proposition that all men are \
             created equal.",
            "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    \
             println!(\"{x:?}\");\n}\n",
            "def f(a, b=3, *args, **kw):\n\treturn {k: v for k, v in kw.items() if v}\n",
            "if (x != nullptr && x->next) { return x->next->value; } // done",
            "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
            "1234567",
            "3.14159265358979 1,000,000 0x1F 2026-11-21T10:00:00Z +1-555-0100",
            "12345678901234567890",
            "😀 😃😄 👍🏽 👨‍👩‍👧‍👦 🇺🇦 ❤️",
            "你好，世界！今天天气很好。我们去公园散步吧。",
            "日本語のテキストです。カタカナとひらがな。",
            "한국어 텍스트입니다.",
            "Привет, мир! Как дела? Всё хорошо.",
            "مرحبا بالعالم! كيف حالك؟",
            "שלום עולם",
            "नमस्ते दुनिया",
            "Ελληνικά κείμενα",
            "   leading and trailing   ",
            "tabs\t\tand\t spaces   \t ",
            "line\r\nbreak\n\nparagraph\r\n\r\n\n   \n  x",
            "\r\n\n",
            "\n",
            "\n\n\n\n",
            "   \n",
            "hi \n ",
            "a  ",
            "a\u{a0}b\u{2003}c\u{2028}d",
            "I'LL do it, don't worry. You'RE right; they've gone. We'd, I'm, she's, it'S",
            "'s 't 're 've 'm 'll 'd ''' 'x",
            "!!!??? ... --- *** ### $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
            "a!b@c#d$e%f^g&h*i(j)k",
            "...\n\n---\n",
            "https://example.com/path/to/page?query=1&lang=en#frag",
            "mailto:someone@example.org, ftp://files.example.net/pub/",
            "<|endoftext|> <|fim_prefix|> normal text",
            "café naïve résumé coöperate",
            "e\u{301}e\u{301}e\u{301} combining marks",
            "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ１２３",
            "ǅungla ǈemur ΣΊΣΥΦΟΣ ß ẞ",
            "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 math",
            "\u{feff}BOM and \u{200b}zero\u{200b}width",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push("word ".repeat(500));
        v.push("supercalifragilisticexpialidocious".repeat(20));
        v.push("antidisestablishmentarianism".repeat(100)); // one 2,800-byte piece
        v.push("你好世界".repeat(200)); // one long CJK piece
        v.push("!?".repeat(300));
        v.push(" ".repeat(1000));
        v.push(format!("{}x", " ".repeat(1000)));
        v.push("\n".repeat(300));
        v.push("9".repeat(1000));
        // Runs of one character: equal-rank pairs everywhere, so merge order matters.
        for c in [
            "a", "e", "z", "ha", "ab", "=", "-", "*", "_", "哈", "ー", "ж",
        ] {
            for n in 2..40 {
                v.push(c.repeat(n));
                v.push(format!(" {}", c.repeat(n)));
            }
            v.push(c.repeat(301)); // the same, down the large-piece path
        }
        v
    }

    /// Pseudo-random strings from a seeded RNG mixing the alphabets and the tricky bits
    /// (contractions, whitespace and line breaks, digits, punctuation, marks).
    fn random_corpus(count: usize) -> Vec<String> {
        const PARTS: &[&str] = &[
            "a", "e", "th", "ing", "The", "HELLO", "x", "q", "z", "Z", "é", "ß", "ю", "Щ", "при",
            "вет", "م", "ر", "حبا", "你", "好", "世", "界", "の", "テ", "한", "😀", "👍🏽", "‍",
            "\u{301}", "0", "1", "7", "42", "999", "'", "'s", "'LL", "'d", "'re", "'ve", "'m",
            "'t", " ", "  ", "\t", "\n", "\r", "\r\n", "\u{a0}", "\u{3000}", ".", ",", "!", "?",
            "-", "_", "/", ":", "://", "(", ")", "{", "}", "\"", "<|", "|>", "#", "$", "%", "…",
            "—", "«", "»",
        ];
        let mut rng = StdRng::seed_from_u64(0x00c0_ffee);
        (0..count)
            .map(|_| {
                let len = rng.random_range(1..60);
                let mut s = String::new();
                for _ in 0..len {
                    s.push_str(PARTS[rng.random_range(0..PARTS.len())]);
                }
                s
            })
            .collect()
    }

    fn assert_matches_reference(texts: &[String]) {
        let (ours, reference) = (ours(), reference());
        let mut bad = Vec::new();
        for t in texts {
            let want = reference.encode_ordinary(t).len();
            let got = ours.count(t);
            if got != want {
                bad.push(format!("{t:?}: got {got}, want {want}"));
            }
        }
        assert!(
            bad.is_empty(),
            "{} mismatches:\n{}",
            bad.len(),
            bad.join("\n")
        );
    }

    #[test]
    fn vocabulary_is_complete_and_compact() {
        let t = ours();
        assert_eq!(t.token_count(), CL100K_RANKS as usize);
        // A few known ranks must round-trip through the index.
        let reference = reference();
        for rank in [0, 1, 255, 256, 1000, 50_000, 100_000, CL100K_RANKS - 1] {
            let bytes = reference.decode_bytes(&[rank]).expect("rank decodes");
            assert_eq!(t.rank(&bytes), Some(rank), "rank {rank}");
        }
        assert_eq!(t.rank(b"definitely not a single token"), None);
        assert!(t.heap_bytes() < 3 << 20, "{} bytes", t.heap_bytes());
    }

    #[test]
    fn counts_match_tiktoken_on_fixed_corpus() {
        assert_matches_reference(&fixed_corpus());
    }

    #[test]
    fn counts_match_tiktoken_on_random_corpus() {
        assert_matches_reference(&random_corpus(400));
    }

    /// The small (stack) and large (heap) merge paths must agree on every piece, including
    /// pieces short enough that `count` never sends them down the large path.
    #[test]
    fn small_and_large_merges_agree() {
        let t = ours();
        let mut scratch = Scratch::default();
        let mut corpus = fixed_corpus();
        corpus.extend(random_corpus(200));
        for text in &corpus {
            for m in t.regex.find_iter(text) {
                let piece = m.expect("regex").as_str().as_bytes();
                if piece.len() < 2 || piece.len() > SMALL_PIECE {
                    continue;
                }
                assert_eq!(
                    t.merge_small(piece),
                    t.merge_large(piece, &mut scratch),
                    "{:?}",
                    String::from_utf8_lossy(piece)
                );
            }
        }
    }

    #[test]
    fn huge_single_word_is_fast() {
        let t = ours();
        let word: String = "abcdefghij".repeat(2_000); // one 20,000-byte piece
        let started = std::time::Instant::now();
        let n = t.count(&word);
        let elapsed = started.elapsed();
        assert!(n > 0 && n < word.len());
        // Generous even for a debug build on a loaded machine; a quadratic merge takes
        // far longer.
        assert!(elapsed < std::time::Duration::from_secs(3), "{elapsed:?}");
        // CJK without spaces is one piece as well.
        let cjk = "你好世界".repeat(2_000);
        assert!(t.count(&cjk) > 0);
    }
}
