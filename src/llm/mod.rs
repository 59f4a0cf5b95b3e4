//! The LLM boundary: a small provider trait, the async-openai implementation, and the
//! resilience layer (timeout, retry with backoff + jitter, circuit breaker, concurrency cap).
//!
//! **Architecture Invariant:** only `llm/openai.rs` imports async-openai.

pub mod audio;
pub mod events;
pub mod openai;
pub mod resilient;

use std::pin::Pin;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::Stream;

pub use audio::{Speech, Transcription};
pub use openai::OpenAiProvider;
pub use resilient::{Billed, BreakerState, ResilientLlm, RetryPolicy};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatRole {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: ChatRole,
    pub content: String,
    /// Images sent with a user message, as `data:` URLs (image content parts).
    pub images: Vec<String>,
}

impl ChatMessage {
    pub fn new(role: ChatRole, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            images: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    pub text: String,
    /// Token usage as reported by the endpoint (0 when it did not say).
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Failures of one LLM call, named for what the caller can do about them.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum LlmError {
    #[error("LLM call timed out")]
    Timeout,
    #[error("LLM rate limited (retry after {retry_after:?})")]
    RateLimited { retry_after: Option<Duration> },
    #[error("LLM server error (HTTP {status})")]
    Server {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("could not reach the LLM: {0}")]
    Connect(String),
    #[error("the conversation is longer than the model's context window")]
    ContextLength,
    #[error("LLM rejected the request (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("LLM returned an empty or malformed answer: {0}")]
    BadResponse(String),
    #[error("LLM temporarily unavailable (circuit open)")]
    CircuitOpen,
    #[error("every LLM slot stayed busy for the queue timeout")]
    Busy,
}

impl LlmError {
    /// Worth another attempt: 429, 5xx, timeouts and connection failures.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            LlmError::Timeout
                | LlmError::RateLimited { .. }
                | LlmError::Server { .. }
                | LlmError::Connect(_)
        )
    }

    /// Counts toward opening the circuit (the endpoint itself is unhealthy).
    pub fn is_endpoint_failure(&self) -> bool {
        self.is_retryable() || matches!(self, LlmError::BadResponse(_))
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LlmError::RateLimited { retry_after } | LlmError::Server { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// Label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            LlmError::Timeout => "timeout",
            LlmError::RateLimited { .. } => "rate_limited",
            LlmError::Server { .. } => "server",
            LlmError::Connect(_) => "connect",
            LlmError::ContextLength => "context_length",
            LlmError::Rejected { .. } => "rejected",
            LlmError::BadResponse(_) => "bad_response",
            LlmError::CircuitOpen => "circuit_open",
            LlmError::Busy => "busy",
        }
    }
}

/// A stream of text deltas; an error ends it.
pub type DeltaStream = Pin<Box<dyn Stream<Item = Result<String, LlmError>> + Send>>;

/// One attempt at a chat completion. Implementations must not retry: [`ResilientLlm`] owns that.
pub trait LlmProvider: Send + Sync + 'static {
    fn complete(&self, req: ChatRequest) -> BoxFuture<'_, Result<ChatResponse, LlmError>>;
    /// Starts a streamed completion; the future resolves once the endpoint accepted it.
    fn stream(&self, req: ChatRequest) -> BoxFuture<'_, Result<DeltaStream, LlmError>>;
    /// One attempt at a transcription. A provider without one refuses the request.
    fn transcribe(&self, req: Transcription) -> BoxFuture<'_, Result<String, LlmError>> {
        let _ = req;
        Box::pin(async {
            Err(LlmError::Rejected {
                status: 0,
                message: "this LLM provider cannot transcribe audio".into(),
            })
        })
    }
    /// One attempt at speaking a text; the audio's bytes. Refused unless implemented.
    fn speak(&self, req: Speech) -> BoxFuture<'_, Result<Vec<u8>, LlmError>> {
        let _ = req;
        Box::pin(async {
            Err(LlmError::Rejected {
                status: 0,
                message: "this LLM provider cannot speak".into(),
            })
        })
    }
}
