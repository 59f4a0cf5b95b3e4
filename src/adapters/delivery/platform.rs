//! The fixed facts of a platform the delivery machinery works with (its [`Profile`]) and
//! the unit it sends ([`Part`]); part of the delivery machinery (see `delivery.rs`).

use std::time::Duration;

use crate::domain::Button;

/// One part of a reply as the platform sends it: text (Markdown, within the platform's
/// limit) and the buttons under it (only the last part has any).
#[derive(Debug, Clone, Copy)]
pub struct Part<'a> {
    pub text: &'a str,
    pub buttons: &'a [Button],
}

impl<'a> Part<'a> {
    /// A part without buttons.
    pub fn plain(text: &'a str) -> Self {
        Part { text, buttons: &[] }
    }
}

/// What the delivery machinery needs to know about a platform: one [`Profile::new`]
/// per platform.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    /// `telegram` / `discord` (log spans).
    pub platform: &'static str,
    /// Longest streaming draft, in characters.
    pub draft_limit: usize,
    /// How often the typing indicator is renewed.
    pub typing_every: Duration,
    /// Flush the store (the inbox entry) before handling: for platforms whose intake
    /// does not flush before confirming.
    pub flush_before_handling: bool,
}

impl Profile {
    pub const fn new(platform: &'static str, draft_limit: usize, typing_every: Duration) -> Self {
        Profile {
            platform,
            draft_limit,
            typing_every,
            flush_before_handling: false,
        }
    }

    /// The same profile, flushing the inbox entry before handling.
    pub const fn flushing_before_handling(self) -> Self {
        Profile {
            flush_before_handling: true,
            ..self
        }
    }
}
