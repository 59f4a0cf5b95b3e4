//! Operator interfaces outside the chat apps.

pub mod backup;
pub mod control;
pub mod http;
pub mod notify;
