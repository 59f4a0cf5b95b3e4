//! Adapters translate platform updates into [`crate::domain::Inbound`] and replies back.
//! They decide no policy: that is the engine's job.

pub mod terminal;
