//! Response cache keys: a reply is reused only for exactly the same model, sampling
//! parameters, rendered persona, trimmed context and (normalised) question.

use sha2::{Digest, Sha256};

use crate::domain::UserRef;
use crate::llm::{ChatMessage, ChatRole};

/// Collapses whitespace and case so "Hello  world" and "hello world" share an entry.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

pub struct KeyInput<'a> {
    pub model: &'a str,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    pub system: &'a str,
    pub context: &'a [ChatMessage],
    pub question: &'a str,
    /// `Some` when `cache.scope = "user"`.
    pub user: Option<&'a UserRef>,
}

/// SHA-256 over every field, each length-prefixed so no two inputs collide by concatenation.
pub fn key(input: &KeyInput<'_>) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(b"confab-cache-v1");
    field(input.model.as_bytes());
    field(format!("{:?}", input.temperature).as_bytes());
    field(format!("{:?}", input.max_tokens).as_bytes());
    field(input.system.as_bytes());
    for m in input.context {
        let role: &[u8] = match m.role {
            ChatRole::System => b"s",
            ChatRole::User => b"u",
            ChatRole::Assistant => b"a",
        };
        field(role);
        field(m.content.as_bytes());
    }
    field(normalise(input.question).as_bytes());
    if let Some(u) = input.user {
        field(u.to_string().as_bytes());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Platform;

    fn base<'a>(ctx: &'a [ChatMessage], q: &'a str) -> KeyInput<'a> {
        KeyInput {
            model: "m",
            temperature: None,
            max_tokens: None,
            system: "sys",
            context: ctx,
            question: q,
            user: None,
        }
    }

    #[test]
    fn same_question_same_key_after_normalising() {
        assert_eq!(
            key(&base(&[], "Hello   World")),
            key(&base(&[], "hello world"))
        );
    }

    #[test]
    fn any_difference_changes_the_key() {
        let ctx = [ChatMessage::new(ChatRole::User, "earlier")];
        let k = key(&base(&[], "q"));
        assert_ne!(k, key(&base(&ctx, "q")), "context");
        assert_ne!(
            k,
            key(&KeyInput {
                system: "other",
                ..base(&[], "q")
            }),
            "persona"
        );
        assert_ne!(
            k,
            key(&KeyInput {
                model: "m2",
                ..base(&[], "q")
            }),
            "model"
        );
        assert_ne!(
            k,
            key(&KeyInput {
                temperature: Some(0.5),
                ..base(&[], "q")
            }),
            "sampling"
        );
        let u = UserRef::new(Platform::Telegram, "1");
        assert_ne!(
            k,
            key(&KeyInput {
                user: Some(&u),
                ..base(&[], "q")
            }),
            "scope"
        );
    }
}
