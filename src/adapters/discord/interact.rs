//! The interactions the Discord adapter answers (part of the serenity-aware adapter): a
//! slash command or a press on one of our buttons, and how each is acknowledged.

use serenity::all::{
    ChannelId, CommandInteraction, ComponentInteraction, CreateInteractionResponse,
    CreateInteractionResponseMessage, GuildId, Http, MessageId, User,
};

use super::is_personal_command;

/// An interaction we answer: a slash command, or a press on one of our buttons.
pub(super) enum Interact {
    Command(Box<CommandInteraction>),
    Component(Box<ComponentInteraction>),
}

impl Interact {
    pub(super) fn id(&self) -> u64 {
        match self {
            Interact::Command(c) => c.id.get(),
            Interact::Component(c) => c.id.get(),
        }
    }

    pub(super) fn user(&self) -> &User {
        match self {
            Interact::Command(c) => &c.user,
            Interact::Component(c) => &c.user,
        }
    }

    pub(super) fn token(&self) -> &str {
        match self {
            Interact::Command(c) => &c.token,
            Interact::Component(c) => &c.token,
        }
    }

    pub(super) fn place(&self) -> (ChannelId, Option<GuildId>) {
        match self {
            Interact::Command(c) => (c.channel_id, c.guild_id),
            Interact::Component(c) => (c.channel_id, c.guild_id),
        }
    }

    /// For a button pressed in a guild channel: the message the button is on.
    pub(super) fn guild_message(&self) -> Option<MessageId> {
        match self {
            Interact::Component(c) if c.guild_id.is_some() => Some(c.message.id),
            _ => None,
        }
    }

    /// Whether the first response is ephemeral: a slash command whose answer is always
    /// personal (declared so: [`is_personal_command`]).
    pub(super) fn defers_ephemerally(&self) -> bool {
        match self {
            Interact::Command(c) => is_personal_command(&c.data.name),
            Interact::Component(_) => false,
        }
    }

    /// A slash command shows "thinking…" until the follow-up (only to the user when its
    /// answer is personal); a button press is acknowledged without changing its message.
    pub(super) async fn acknowledge(&self, http: &Http) -> serenity::Result<()> {
        match self {
            Interact::Command(c) => {
                let message =
                    CreateInteractionResponseMessage::new().ephemeral(self.defers_ephemerally());
                let defer = CreateInteractionResponse::Defer(message);
                c.create_response(http, defer).await
            }
            Interact::Component(c) => {
                c.create_response(http, CreateInteractionResponse::Acknowledge)
                    .await
            }
        }
    }

    /// The engine has nothing to say (e.g. a repeated over-limit message).
    pub(super) async fn nothing_to_say(&self, http: &Http) -> serenity::Result<()> {
        match self {
            // Removes the "thinking…" message.
            Interact::Command(c) => c.delete_response(http).await,
            // The original response is the message with the buttons: keep it.
            Interact::Component(_) => Ok(()),
        }
    }
}
