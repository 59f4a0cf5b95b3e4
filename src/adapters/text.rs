//! Reply text for platforms: splitting to a length limit on paragraph / code-block
//! boundaries, and the LLM's Markdown rendered as Telegram HTML.

/// How a platform measures length (Telegram: UTF-16 units; Discord: characters).
pub type Measure = fn(&str) -> usize;

pub fn utf16_len(s: &str) -> usize {
    s.encode_utf16().count()
}

pub fn char_len(s: &str) -> usize {
    s.chars().count()
}

enum Block {
    Para(String),
    Code { fence: String, lines: Vec<String> },
}

impl Block {
    fn render(&self) -> String {
        match self {
            Block::Para(p) => p.clone(),
            Block::Code { fence, lines } => {
                let mut s = fence.clone();
                for l in lines {
                    s.push('\n');
                    s.push_str(l);
                }
                s.push_str("\n```");
                s
            }
        }
    }
}

fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut para: Vec<&str> = Vec::new();
    let mut code: Option<(String, Vec<String>)> = None;
    let flush_para = |para: &mut Vec<&str>, out: &mut Vec<Block>| {
        if !para.is_empty() {
            out.push(Block::Para(para.join("\n")));
            para.clear();
        }
    };
    for line in text.lines() {
        let fence = line.trim_start().starts_with("```");
        match code.as_mut() {
            Some(_) if fence => {
                if let Some((fence, lines)) = code.take() {
                    out.push(Block::Code { fence, lines });
                }
                // Text after a closing fence ("``` and then …") is kept as a paragraph line.
                let tail = line.trim_start().trim_start_matches('`').trim_start();
                if !tail.is_empty() {
                    para.push(tail);
                }
            }
            Some((_, lines)) => lines.push(line.to_string()),
            None if fence => {
                flush_para(&mut para, &mut out);
                code = Some((line.trim_start().to_string(), Vec::new()));
            }
            None if line.trim().is_empty() => flush_para(&mut para, &mut out),
            None => para.push(line),
        }
    }
    flush_para(&mut para, &mut out);
    // An unterminated fence still renders as a code block.
    if let Some((fence, lines)) = code {
        out.push(Block::Code { fence, lines });
    }
    out
}

/// Splits `s` at whitespace (or, for one huge word, anywhere) into pieces within `limit`.
fn split_words(s: &str, limit: usize, measure: Measure) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for word in s.split_inclusive(char::is_whitespace) {
        if measure(&cur) + measure(word) <= limit {
            cur.push_str(word);
            continue;
        }
        if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        if measure(word) <= limit {
            cur.push_str(word);
        } else {
            for ch in word.chars() {
                let mut buf = [0u8; 4];
                if measure(&cur) + measure(ch.encode_utf8(&mut buf)) > limit {
                    out.push(std::mem::take(&mut cur));
                }
                cur.push(ch);
            }
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out.into_iter()
        .map(|p| p.trim_end().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Packs lines into pieces within `limit`, joined by `\n`.
fn pack_lines(lines: &[String], limit: usize, measure: Measure) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in lines {
        let pieces = if measure(line) > limit {
            split_words(line, limit, measure)
        } else {
            vec![line.clone()]
        };
        for piece in pieces {
            let sep = usize::from(!cur.is_empty());
            if !cur.is_empty() && measure(&cur) + sep + measure(&piece) > limit {
                out.push(std::mem::take(&mut cur));
            }
            if !cur.is_empty() {
                cur.push('\n');
            }
            cur.push_str(&piece);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn split_block(block: &Block, limit: usize, measure: Measure) -> Vec<String> {
    match block {
        Block::Para(p) => {
            let lines: Vec<String> = p.lines().map(str::to_string).collect();
            pack_lines(&lines, limit, measure)
        }
        Block::Code { fence, lines } => {
            let overhead = measure(fence) + measure("\n\n```");
            if lines.is_empty() || overhead >= limit / 2 {
                // No room for code beside the fence line: plain lines, so nothing is lost.
                let all: Vec<String> = block.render().lines().map(str::to_string).collect();
                return pack_lines(&all, limit, measure);
            }
            // Each piece is a complete fenced block of its own.
            let inner = limit - overhead;
            pack_lines(lines, inner, measure)
                .into_iter()
                .map(|body| format!("{fence}\n{body}\n```"))
                .collect()
        }
    }
}

/// Splits a reply into messages of at most `limit` (as `measure` counts), preferring
/// paragraph boundaries, never cutting inside a code block when a block fits, and
/// re-opening the fence when a code block itself is longer than a message.
pub fn split_message(text: &str, limit: usize, measure: Measure) -> Vec<String> {
    if measure(text) <= limit {
        return if text.trim().is_empty() {
            Vec::new()
        } else {
            vec![text.to_string()]
        };
    }
    let mut out = Vec::new();
    let mut cur = String::new();
    for block in blocks(text) {
        let rendered = block.render();
        if !cur.is_empty() && measure(&cur) + 2 + measure(&rendered) <= limit {
            cur.push_str("\n\n");
            cur.push_str(&rendered);
            continue;
        }
        if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        if measure(&rendered) <= limit {
            cur = rendered;
        } else {
            let mut pieces = split_block(&block, limit, measure);
            cur = pieces.pop().unwrap_or_default();
            out.extend(pieces);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        push_escaped(&mut out, c);
    }
    out
}

/// Appends `c` to `out`, escaped for Telegram HTML (no allocation per character).
fn push_escaped(out: &mut String, c: char) {
    match c {
        '&' => out.push_str("&amp;"),
        '<' => out.push_str("&lt;"),
        '>' => out.push_str("&gt;"),
        '"' => out.push_str("&quot;"),
        _ => out.push(c),
    }
}

/// Finds the closing `delim` for an opening at the start of `rest`, honouring word
/// boundaries for `_` / `*` so `snake_case` and `2*3*4` stay literal.
fn closing(rest: &[char], delim: &[char]) -> Option<usize> {
    let n = delim.len();
    if rest.len() <= n || rest[n].is_whitespace() {
        return None;
    }
    let mut i = n + 1;
    while i + n <= rest.len() {
        if rest[i..i + n] == *delim && !rest[i - 1].is_whitespace() {
            let after = rest.get(i + n);
            let word_char = |c: &char| c.is_alphanumeric();
            if (delim[0] == '_' || n == 1) && after.is_some_and(word_char) {
                i += 1;
                continue;
            }
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Characters that may open inline markup; any other character is plain text.
fn opens_markup(c: char) -> bool {
    matches!(c, '`' | '[' | '*' | '_' | '~')
}

/// Appends the inline Markdown of `chars` to `out` as Telegram HTML.
fn inline_into(chars: &[char], out: &mut String) {
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if !opens_markup(c) {
            push_escaped(out, c);
            i += 1;
            continue;
        }
        let rest = &chars[i..];
        match inline_markup(rest, i > 0 && chars[i - 1].is_alphanumeric(), out) {
            Some(used) => i += used,
            None => {
                push_escaped(out, c);
                i += 1;
            }
        }
    }
}

/// Markup opening at the start of `rest` (code, link, bold, italic, strikethrough),
/// appended to `out`; returns the characters it used, or `None` when `rest[0]` is text.
fn inline_markup(rest: &[char], prev_word: bool, out: &mut String) -> Option<usize> {
    let &c = rest.first()?;
    // `code`
    if c == '`' {
        if let Some(end) = rest[1..].iter().position(|&x| x == '`') {
            out.push_str("<code>");
            rest[1..1 + end].iter().for_each(|&c| push_escaped(out, c));
            out.push_str("</code>");
            return Some(end + 2);
        }
    }
    // [label](url)
    if c == '[' {
        if let Some(close) = rest.iter().position(|&x| x == ']') {
            if rest.get(close + 1) == Some(&'(') {
                if let Some(end) = rest[close + 2..].iter().position(|&x| x == ')') {
                    let url: String = rest[close + 2..close + 2 + end].iter().collect();
                    if url.starts_with("http://") || url.starts_with("https://") {
                        out.push_str("<a href=\"");
                        url.chars().for_each(|c| push_escaped(out, c));
                        out.push_str("\">");
                        inline_into(&rest[1..close], out);
                        out.push_str("</a>");
                        return Some(close + 3 + end);
                    }
                }
            }
        }
    }
    let styles: [(&[char], &str); 5] = [
        (&['*', '*'], "b"),
        (&['_', '_'], "b"),
        (&['~', '~'], "s"),
        (&['*'], "i"),
        (&['_'], "i"),
    ];
    for (delim, tag) in styles {
        let n = delim.len();
        let boundary_ok = !((delim[0] == '_' || n == 1) && prev_word);
        if rest.len() > n && rest[..n] == *delim && boundary_ok {
            if let Some(end) = closing(rest, delim) {
                out.push('<');
                out.push_str(tag);
                out.push('>');
                inline_into(&rest[n..end], out);
                out.push_str("</");
                out.push_str(tag);
                out.push('>');
                return Some(end + n);
            }
        }
    }
    None
}

/// Renders the LLM's Markdown as Telegram HTML: code blocks, inline code, bold, italic,
/// strikethrough, links, headings. Output tags are always balanced; anything else is
/// escaped text.
pub fn markdown_to_telegram_html(md: &str) -> String {
    let mut out = Vec::new();
    for block in blocks(md) {
        match block {
            Block::Code { fence, lines } => {
                let lang = fence.trim_start_matches('`').trim();
                let body = escape_html(&lines.join("\n"));
                if lang.is_empty() {
                    out.push(format!("<pre>{body}</pre>"));
                } else if !lang
                    .chars()
                    .all(|c| c.is_alphanumeric() || "+-#_.".contains(c))
                {
                    // Not a language name: it is text, shown as the block's first line.
                    let sep = if body.is_empty() { "" } else { "\n" };
                    out.push(format!("<pre>{}{sep}{body}</pre>", escape_html(lang)));
                } else {
                    out.push(format!(
                        "<pre><code class=\"language-{lang}\">{body}</code></pre>"
                    ));
                }
            }
            Block::Para(p) => out.push(paragraph_html(&p)),
        }
    }
    out.join("\n\n")
}

/// One paragraph's lines as Telegram HTML (a `#` heading in bold), one buffer for all.
fn paragraph_html(p: &str) -> String {
    let mut html = String::with_capacity(p.len() + p.len() / 8);
    let mut chars: Vec<char> = Vec::new();
    for (n, line) in p.lines().enumerate() {
        if n > 0 {
            html.push('\n');
        }
        let trimmed = line.trim_start();
        let hashes = trimmed.chars().take_while(|&c| c == '#').count();
        chars.clear();
        if (1..=6).contains(&hashes) && trimmed[hashes..].starts_with(' ') {
            chars.extend(trimmed[hashes..].trim().chars());
            html.push_str("<b>");
            inline_into(&chars, &mut html);
            html.push_str("</b>");
        } else {
            chars.extend(line.chars());
            inline_into(&chars, &mut html);
        }
    }
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(md: &str, html: &str) {
        assert_eq!(markdown_to_telegram_html(md), html, "markdown {md:?}");
    }

    #[test]
    fn renders_markdown_as_telegram_html() {
        check("plain & <safe>", "plain &amp; &lt;safe&gt;");
        check(
            "**bold** and *it* and _it_",
            "<b>bold</b> and <i>it</i> and <i>it</i>",
        );
        check("snake_case_name stays", "snake_case_name stays");
        check("2*3*4 = 24", "2*3*4 = 24");
        check("use `a<b>` here", "use <code>a&lt;b&gt;</code> here");
        check(
            "[docs](https://x.y/?a=1&b=2)",
            "<a href=\"https://x.y/?a=1&amp;b=2\">docs</a>",
        );
        check("[bad](javascript:x)", "[bad](javascript:x)");
        check("# Title\ntext", "<b>Title</b>\ntext");
        check(
            "```rust\nfn main() { a < b }\n```",
            "<pre><code class=\"language-rust\">fn main() { a &lt; b }</code></pre>",
        );
        check("```\nno lang\n```", "<pre>no lang</pre>");
        check("**unclosed bold", "**unclosed bold");
        check("~~gone~~", "<s>gone</s>");
    }

    #[test]
    fn short_text_is_one_message() {
        assert_eq!(split_message("hi", 10, char_len), vec!["hi"]);
        assert!(split_message("  ", 10, char_len).is_empty());
    }

    #[test]
    fn splits_on_paragraphs_within_the_limit() {
        let para = "word ".repeat(150).trim().to_string(); // 749 chars
        let text = vec![para.clone(); 14].join("\n\n"); // ≈ 10,500 chars
        let parts = split_message(&text, 4096, utf16_len);
        assert!(parts.len() >= 3);
        for p in &parts {
            assert!(utf16_len(p) <= 4096);
            assert!(!p.starts_with('\n') && !p.ends_with('\n'));
        }
        // nothing lost or reordered
        assert_eq!(parts.join("\n\n"), text);
    }

    #[test]
    fn keeps_code_blocks_whole_when_they_fit() {
        let code = format!("```python\n{}```", "print('x')\n".repeat(30)); // ≈ 350 chars
        let text = format!(
            "{}\n\n{code}\n\n{}",
            "a ".repeat(400).trim(),
            "b ".repeat(400).trim()
        );
        let parts = split_message(&text, 1000, char_len);
        assert!(parts.iter().any(|p| p.contains(&code)), "{parts:#?}");
        for p in &parts {
            assert_eq!(p.matches("```").count() % 2, 0, "balanced fences: {p}");
        }
    }

    #[test]
    fn long_code_block_is_split_into_fenced_pieces() {
        let code = format!("```rust\n{}```", "let x = 1;\n".repeat(500)); // ≈ 5,500 chars
        let parts = split_message(&code, 2000, char_len);
        assert!(parts.len() >= 3);
        for p in &parts {
            assert!(char_len(p) <= 2000);
            assert!(p.starts_with("```rust\n") && p.ends_with("\n```"), "{p}");
        }
    }

    #[test]
    fn nothing_is_lost_around_fences() {
        // A fence line longer than half a message used to make the reply vanish.
        let fence = format!("``` {}", "word ".repeat(40));
        let parts = split_message(&fence, 100, char_len);
        assert!(!parts.is_empty());
        assert_eq!(parts.concat().matches("word").count(), 40, "{parts:#?}");
        check("```\nx\n``` and then", "<pre>x</pre>\n\nand then");
        check("```A: b\nx\n```", "<pre>A: b\nx</pre>");
    }

    #[test]
    fn a_huge_word_is_cut() {
        let parts = split_message(&"x".repeat(5000), 2000, char_len);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.concat().len(), 5000);
    }
}
