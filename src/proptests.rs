//! Property tests for every function that takes outside text: Telegram mention stripping
//! and entity offsets, Discord mention removal, command parsing, reply splitting, Markdown →
//! Telegram HTML, `CONFAB__` overrides, and declared media (sizes, durations, MIME types). Inputs mix ASCII, any char, the characters that
//! break naive code (case folding that changes byte length, combining marks, RTL, ZWJ
//! emoji, surrogate-adjacent code points, NUL) and the markup characters heavily.

use proptest::prelude::*;
use proptest::test_runner::Config as PropConfig;

use crate::adapters::text::{char_len, markdown_to_telegram_html, split_message, utf16_len};
use crate::adapters::{discord, telegram};
use crate::engine::commands::{parse, Command};

/// Characters and fragments that have broken text handling somewhere.
const TROUBLE: &[&str] = &[
    "\u{130}",        // İ: lowercases to 3 bytes from 2
    "\u{2126}",       // Ω (ohm): lowercases to 2 bytes from 3
    "\u{1E9E}",       // ẞ: lowercases to ß
    "ß",              // uppercases to "SS"
    "e\u{301}",       // combining acute
    "\u{202E}",       // right-to-left override
    "\u{5D0}\u{5D1}", // Hebrew
    "👩\u{200D}💻",   // ZWJ emoji (4 UTF-16 units + ZWJ)
    "😀",             // astral: 2 UTF-16 units
    "\u{D7FF}",       // just below the surrogates
    "\u{E000}",       // just above them
    "\u{FFFF}",
    "\u{10FFFF}",
    "\u{0}",
    "\u{FEFF}",
    "\u{85}",   // NEL: Unicode whitespace
    "\u{3000}", // ideographic space
];

const MARKUP: &[&str] = &[
    "@",
    "/",
    "`",
    "```",
    "*",
    "**",
    "_",
    "__",
    "~~",
    "[",
    "]",
    "(",
    ")",
    "#",
    "<",
    ">",
    "&",
    "\n",
    "\n\n",
    " ",
    "\t",
    "http://x.y",
    "@acme_bot",
    "<@1000>",
    "<@!1000>",
];

fn pick(list: &'static [&'static str]) -> impl Strategy<Value = String> {
    proptest::sample::select(list).prop_map(str::to_string)
}

/// One fragment: ASCII, any char, a troublemaker, or markup (markup weighted up).
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => "[a-zA-Z0-9 ]{1,6}",
        2 => any::<char>().prop_map(String::from),
        2 => pick(TROUBLE),
        4 => pick(MARKUP),
    ]
}

fn wild(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(fragment(), 0..max).prop_map(|v| v.concat())
}

fn config() -> PropConfig {
    // 256 cases unless PROPTEST_CASES says otherwise (a longer hunt: PROPTEST_CASES=20000).
    PropConfig {
        // No regression files in the source tree: a failure prints its minimal input.
        failure_persistence: None,
        ..PropConfig::default()
    }
}

fn non_ws(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

/// `needle`'s chars appear in `hay` in order (not necessarily adjacent).
fn is_subsequence(needle: &str, hay: &str) -> bool {
    let mut hay = hay.chars();
    needle.chars().all(|c| hay.any(|h| h == c))
}

fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

mod mentions {
    use super::*;

    /// A Telegram username, or (rarely) something stranger from a misbehaving server.
    fn username() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-zA-Z][a-zA-Z0-9_]{4,31}",
            1 => wild(4),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn telegram_stripping_never_panics_and_is_idempotent(text in wild(40), me in username()) {
            let once = telegram::strip_mention(&text, &me);
            prop_assert_eq!(telegram::strip_mention(&once, &me), once);
        }

        #[test]
        fn telegram_stripping_removes_exactly_the_mention(
            a in wild(12), b in wild(12), me in "[a-z][a-z0-9_]{4,20}", upper in any::<bool>()
        ) {
            let a = a.replace('@', "");
            let b = b.replace('@', "");
            let shown = if upper { me.to_uppercase() } else { me.clone() };
            let text = format!("{a} @{shown} {b}");
            let want = collapse(&format!("{a} {b}"));
            let got = telegram::strip_mention(&text, &me);
            if want.is_empty() {
                prop_assert_eq!(got, text);
            } else {
                prop_assert_eq!(got, want);
            }
        }

        #[test]
        fn telegram_text_without_at_only_loses_whitespace(text in wild(40), me in username()) {
            let text = text.replace('@', "");
            let got = telegram::strip_mention(&text, &me);
            let want = collapse(&text);
            if me.is_empty() || want.is_empty() {
                prop_assert_eq!(got, text);
            } else {
                prop_assert_eq!(got, want);
            }
        }

        #[test]
        fn entity_offsets_never_panic_and_cover_the_units_asked(
            text in wild(30), offset in 0usize..80, length in 0usize..80, huge in any::<bool>()
        ) {
            let offset = if huge { usize::MAX - offset } else { offset };
            if let Some(s) = telegram::entity_text(&text, offset, length) {
                prop_assert_eq!(utf16_len(s), length);
                let before: Vec<u16> = text.encode_utf16().take(offset).collect();
                let prefix = String::from_utf16(&before).ok();
                prop_assert!(prefix.is_some_and(|p| text[p.len()..].starts_with(s)));
            }
        }

        #[test]
        fn entity_of_a_real_mention_is_found(a in wild(20), b in wild(10)) {
            let text = format!("{a}@acme_bot{b}");
            let offset = utf16_len(&a);
            prop_assert_eq!(telegram::entity_text(&text, offset, 9), Some("@acme_bot"));
        }

        #[test]
        fn discord_removal_leaves_no_tag(text in wild(40)) {
            let tags = ["<@1000>".to_string(), "<@!1000>".to_string()];
            let got = discord::strip_mention(&text, &tags);
            prop_assert!(!got.contains("<@1000>") && !got.contains("<@!1000>"), "{:?}", got);
            prop_assert_eq!(discord::strip_mention(&got, &tags), got.clone());
            if !text.contains('<') {
                prop_assert_eq!(got, collapse(&text));
            }
        }
    }
}

mod commands {
    use super::*;

    const NAMES: &[&str] = &[
        "start", "help", "reset", "usage", "export", "forget", "admin",
    ];

    fn name_case() -> impl Strategy<Value = String> {
        (proptest::sample::select(NAMES), any::<u64>()).prop_map(|(n, bits)| {
            n.chars()
                .enumerate()
                .map(|(i, c)| {
                    if bits >> (i % 64) & 1 == 1 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn parsing_never_panics_and_needs_a_slash(text in wild(30)) {
            if parse(&text).is_some() {
                prop_assert!(text.trim_start().starts_with('/'));
            }
        }

        #[test]
        fn known_names_are_known_in_any_case_and_with_any_bot_suffix(
            name in name_case(), suffix in wild(4), args in wild(20)
        ) {
            let suffix = collapse(&suffix).replace(' ', "");
            let text = format!("/{name}@{suffix} {args}");
            let cmd = parse(&text);
            prop_assert!(
                matches!(cmd, Some(ref c) if !matches!(c, Command::Unknown(_))),
                "{:?} → {:?}", text, cmd
            );
        }

        #[test]
        fn unknown_names_are_never_empty(text in wild(30)) {
            if let Some(Command::Unknown(name)) = parse(&format!("/{text}")) {
                prop_assert!(!name.is_empty());
            }
        }
    }
}

mod split {
    use super::*;

    fn measure() -> impl Strategy<Value = (&'static str, crate::adapters::text::Measure)> {
        prop_oneof![
            Just(("utf16", utf16_len as crate::adapters::text::Measure)),
            Just(("chars", char_len as crate::adapters::text::Measure)),
        ]
    }

    fn no_backticks(s: &str) -> String {
        s.chars().filter(|&c| c != '`').collect()
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn parts_fit_and_nothing_is_lost(text in wild(120), limit in 12usize..200, m in measure()) {
            let (name, measure) = m;
            let parts = split_message(&text, limit, measure);
            for p in &parts {
                prop_assert!(measure(p) <= limit, "{} part of {} > {}: {:?}", name, measure(p), limit, p);
                prop_assert!(!p.trim().is_empty(), "an empty part: {:?}", parts);
            }
            // Fences may be re-opened (and their language repeated) around split code, so
            // the original's text must appear in order; without backticks, exactly.
            let joined = non_ws(&no_backticks(&parts.concat()));
            let original = non_ws(&no_backticks(&text));
            prop_assert!(is_subsequence(&original, &joined), "lost text: {:?} → {:?}", text, parts);
            if !text.contains('`') {
                prop_assert_eq!(joined, original);
            }
        }
    }
}

mod html {
    use super::*;

    const TAGS: &[&str] = &["b", "i", "s", "u", "code", "pre", "a"];

    /// Checks `html` the way Telegram's parse_mode HTML does for the tags we emit; returns
    /// the decoded text (tags dropped, attributes kept as text so nothing hides there).
    fn decode(html: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut stack: Vec<String> = Vec::new();
        let mut rest = html;
        while let Some(c) = rest.chars().next() {
            match c {
                '<' => {
                    let end = rest.find('>').ok_or("unclosed tag")?;
                    let inner = &rest[1..end];
                    if let Some(name) = inner.strip_prefix('/') {
                        if stack.pop().as_deref() != Some(name) {
                            return Err(format!("unbalanced </{name}>"));
                        }
                    } else {
                        let (name, attrs) = inner.split_once(' ').unwrap_or((inner, ""));
                        if !TAGS.contains(&name) {
                            return Err(format!("tag <{name}>"));
                        }
                        if attrs.contains('<') || attrs.contains('>') {
                            return Err("raw angle bracket in an attribute".into());
                        }
                        out.push_str(attrs);
                        stack.push(name.to_string());
                    }
                    rest = &rest[end + 1..];
                }
                '>' => return Err("raw '>'".into()),
                '&' => {
                    let (ent, ch) = [
                        ("&amp;", '&'),
                        ("&lt;", '<'),
                        ("&gt;", '>'),
                        ("&quot;", '"'),
                    ]
                    .into_iter()
                    .find(|(e, _)| rest.starts_with(e))
                    .ok_or("raw '&'")?;
                    out.push(ch);
                    rest = &rest[ent.len()..];
                }
                _ => {
                    out.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        match stack.pop() {
            Some(open) => Err(format!("<{open}> never closed")),
            None => Ok(out),
        }
    }

    fn markdown_syntax(c: char) -> bool {
        "*_~[]()#`".contains(c)
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn output_is_valid_telegram_html_and_keeps_the_text(md in wild(80)) {
            let html = markdown_to_telegram_html(&md);
            let decoded = decode(&html);
            prop_assert!(decoded.is_ok(), "{:?} → {:?}: {:?}", md, html, decoded);
            let decoded = decoded.unwrap_or_default();
            let kept: String = non_ws(&md).chars().filter(|&c| !markdown_syntax(c)).collect();
            let shown: String = non_ws(&decoded).chars().filter(|&c| !markdown_syntax(c)).collect();
            prop_assert!(is_subsequence(&kept, &shown), "lost text: {:?} → {:?}", md, html);
        }

        #[test]
        fn plain_text_is_only_escaped(text in "[^*_~\\[\\]()#`]{0,200}") {
            let html = markdown_to_telegram_html(&text);
            prop_assert_eq!(non_ws(&decode(&html).unwrap_or_default()), non_ws(&text));
        }
    }

    #[test]
    fn alternating_markup_renders_within_a_small_stack() {
        // An LLM can be asked to echo anything; the renderer recurses into styled spans and
        // runs on a tokio worker thread (2 MiB stack).
        let depth = 20_000;
        let md = format!("{}x{}", "*_".repeat(depth), "_*".repeat(depth));
        let html = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || markdown_to_telegram_html(&md))
            .expect("thread")
            .join()
            .expect("no stack overflow");
        assert!(decode(&html).is_ok());
    }
}

mod overrides {
    use super::*;
    use crate::config::{load_with_env, Env, LoadOptions};
    use std::sync::OnceLock;

    const SECRET: &str = "k3y-that-must-never-show-0123456789";

    fn tree() -> &'static std::path::Path {
        static TREE: OnceLock<tempfile::TempDir> = OnceLock::new();
        TREE.get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path();
            for (rel, text) in [
                ("config/staging.toml", "[llm]\nmodel = \"m\"\n"),
                ("prompts/p.md", "You are {{bot_name}}."),
                ("bots/b.toml", "prompt = \"p\"\n"),
                (".env.staging", ""),
            ] {
                let path = root.join(rel);
                std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
                std::fs::write(path, text).expect("write");
            }
            dir
        })
        .path()
    }

    /// Keys that exist, keys that do not, and odd spellings of both.
    fn var_name() -> impl Strategy<Value = String> {
        const KEYS: &[&str] = &[
            "LLM__TIMEOUT_SECS",
            "LLM__BREAKER_COOLDOWN_SECS",
            "LLM__MAX_CONCURRENT",
            "LLM__TEMPERATURE",
            "LLM__BASE_URL",
            "LLM__MAX_TOKENS",
            "LIMITS__BURST",
            "LIMITS__MESSAGES_PER_MINUTE",
            "LIMITS__MAX_INPUT_CHARS",
            "MEMORY__RETENTION_DAYS",
            "CACHE__TTL_SECS",
            "CACHE__SCOPE",
            "STORE__GROUP_COMMIT_US",
            "HTTP__BIND",
            "ADMINS__TELEGRAM",
            "ADMINS__DISCORD",
            "DATA_DIR",
            "SHUTDOWN_TIMEOUT_SECS",
            "DELIVERY__MAX_RETRY_SECS",
            "AUDIT__RETENTION_DAYS",
            "LOG__LEVEL",
            "TELEGRAM__API_URL",
            "LLM",
            "LLM__",
            "__",
            "LLM____X",
            "LLM__TIMEOUT_SECS__X",
            "DATA_DIR__X",
        ];
        prop_oneof![
            4 => proptest::sample::select(KEYS).prop_map(str::to_string),
            1 => wild(6),
        ]
    }

    fn value() -> impl Strategy<Value = String> {
        const EDGES: &[&str] = &[
            "0",
            "-1",
            "1",
            "18446744073709551615",
            "18446744073709551616",
            "9223372036854775807",
            "-9223372036854775808",
            "1e308",
            "nan",
            "inf",
            "-inf",
            "true",
            "[]",
            "[1, \"x\"]",
            "{a = 1}",
            "\"quoted\"",
            "",
            "1,2,,3",
            "[[[[[[[[",
            "x = 1\ny = 2",
            "127.0.0.1:0",
            "http://127.0.0.1:1/v1",
        ];
        prop_oneof![
            3 => proptest::sample::select(EDGES).prop_map(str::to_string),
            2 => wild(10),
            1 => (1usize..3000).prop_map(|n| "[".repeat(n)),
        ]
    }

    proptest! {
        #![proptest_config(PropConfig { cases: config().cases / 2, ..config() })]

        #[test]
        fn overrides_never_panic_and_errors_are_problems(
            vars in proptest::collection::vec((var_name(), value()), 1..4)
        ) {
            let opts = LoadOptions::new(tree(), Env::Staging);
            let mut env: Vec<(String, String)> = vars
                .into_iter()
                .map(|(k, v)| (format!("CONFAB__{k}"), v))
                .collect();
            env.push(("CONFAB_DATA_KEY".into(), SECRET.into()));
            if let Err(problems) = load_with_env(&opts, env) {
                prop_assert!(!problems.0.is_empty());
                let text = problems.to_string();
                prop_assert!(!text.contains(SECRET), "{}", text);
                for p in &problems.0 {
                    prop_assert!(!p.message.is_empty() && !p.key.is_empty(), "{:?}", p);
                }
            }
        }
    }
}

mod media {
    use super::*;
    use crate::config::MediaConfig;
    use crate::domain::{Media, MediaKind};
    use crate::engine::media::{
        audio_file_name, base64, estimated_secs, image_mime, precheck, MediaProblem,
    };

    fn mime() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            1 => Just(None),
            2 => proptest::sample::select(vec![
                "audio/ogg", "audio/OGG; codecs=opus", "audio/mpeg", "video/mp4", "image/png",
                "image/tiff", "application/zip", "", ";", "audio/", "image/jpeg;;",
            ])
            .prop_map(|s| Some(s.to_string())),
            2 => wild(30).prop_map(Some),
        ]
    }

    fn media() -> impl Strategy<Value = Media> {
        (
            proptest::sample::select(vec![MediaKind::Voice, MediaKind::Audio, MediaKind::Image]),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u32>()),
            mime(),
        )
            .prop_map(|(kind, size, duration_secs, mime)| Media {
                kind,
                file: "f".into(),
                size,
                duration_secs,
                mime,
                caption: None,
            })
    }

    proptest! {
        #![proptest_config(config())]

        /// Whatever a platform declares (sizes, durations, MIME types), the checks never
        /// panic and refuse exactly what is over a limit or unreadable.
        #[test]
        fn declared_media_never_panics_and_limits_hold(
            m in media(),
            max_audio_secs in 1u32..100_000,
            max_download_mb in 1u64..1_000,
        ) {
            let cfg = MediaConfig { max_audio_secs, max_download_mb, ..MediaConfig::default() };
            let readable = match m.kind {
                MediaKind::Image => image_mime(m.mime.as_deref()).is_some(),
                _ => audio_file_name(m.mime.as_deref()).is_some(),
            };
            match precheck(&m, &cfg) {
                Ok(()) => {
                    prop_assert!(readable);
                    prop_assert!(m.size.is_none_or(|s| s <= cfg.max_download_bytes()));
                    if m.kind != MediaKind::Image {
                        prop_assert!(m.duration_secs.is_none_or(|d| d <= max_audio_secs));
                    }
                }
                Err(MediaProblem::Unsupported) => prop_assert!(!readable),
                Err(MediaProblem::TooLong { secs, max }) => prop_assert!(secs > max),
                Err(MediaProblem::TooLarge { .. }) => {
                    prop_assert!(m.size.is_some_and(|s| s > cfg.max_download_bytes()));
                }
            }
        }

        #[test]
        fn base64_has_the_padded_length(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let encoded = base64(&bytes);
            prop_assert_eq!(encoded.len(), bytes.len().div_ceil(3) * 4);
            prop_assert!(estimated_secs(bytes.len()) >= 1);
        }
    }
}
