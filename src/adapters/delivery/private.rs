//! Personal replies to updates from a shared place (group, guild channel): the reply
//! goes to the user's private chat and the place gets a note without content (part of
//! the delivery machinery; see the contract in `delivery.rs`).

use std::future::Future;

use super::{retrying, traced, Delivery, Failed, Outbound, Retry, SendResult};
use crate::domain::{Reply, Visibility};

/// What a shared place (group, guild channel) is told when a personal reply to one of
/// its messages went to the user's private chat. Never the reply's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrivateNote {
    /// The answer is in the user's private chat.
    Sent,
    /// The platform refused the private chat: how the user can make it possible.
    Refused,
}

impl<P: Outbound> Delivery<P> {
    /// Sends a reply where it belongs: a `Personal` reply to an update from a shared
    /// place goes to the user's private chat (see [`Delivery::deliver_privately`]),
    /// anything else to where the update came from (see [`Delivery::deliver_here`]).
    pub(super) async fn deliver(
        &self,
        job: &P::Job,
        reply: &Reply,
        streamed: Option<P::MsgId>,
    ) -> Result<(), Failed> {
        if reply.visibility() == Visibility::Personal && !P::inbound(job).is_private {
            let note = |n| self.out.private_note(job, n);
            return self.deliver_privately(job, reply, note).await;
        }
        self.deliver_here(job, reply, streamed).await
    }

    /// A personal reply to `job`, which came from a shared place: the whole reply
    /// (parts, buttons, file) goes to the user's private chat, then `note` tells the
    /// place where it went — or, when the platform refused the private chat, how to
    /// open one. Nothing of the reply reaches the place.
    pub async fn deliver_privately<N, Fut>(
        &self,
        job: &P::Job,
        reply: &Reply,
        note: N,
    ) -> Result<(), Failed>
    where
        N: Fn(PrivateNote) -> Fut,
        Fut: Future<Output = SendResult<()>>,
    {
        let (stats, stop) = (&*self.stats, self.stop_token());
        let mut retry = Retry::new(self.max_retry);
        let open = || traced::<P, _>("private_chat", self.out.private_chat(job));
        let private = retrying(&mut retry, stats, &stop, open).await;
        let sent = match private {
            Ok(dm) => self.deliver_here(&dm, reply, None).await,
            Err(e) => Err(e),
        };
        let told = match sent {
            Ok(()) => PrivateNote::Sent,
            Err(Failed::Unreachable(why)) => {
                tracing::info!(reason = %why, "the user's private chat refused a personal reply; telling the group how to open one");
                PrivateNote::Refused
            }
            Err(other) => return Err(other),
        };
        let mut retry = Retry::new(self.max_retry);
        retrying(&mut retry, stats, &stop, || {
            traced::<P, _>("private_note", note(told))
        })
        .await
    }
}
