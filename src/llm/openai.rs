//! [`LlmProvider`] on async-openai, with its built-in retries replaced by a single-attempt
//! HTTP service (our [`super::ResilientLlm`] owns retries) and real timeouts.

use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::audio::{
    AudioInput, CreateSpeechRequest, CreateTranscriptionRequest, SpeechModel, SpeechResponseFormat,
    Voice,
};
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestMessageContentPartImage, ChatCompletionRequestMessageContentPartText,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionRequestUserMessageContent, ChatCompletionRequestUserMessageContentPart,
    ChatCompletionStreamOptions, CreateChatCompletionRequest, ImageUrl,
};
use async_openai::Client;
use futures::future::BoxFuture;
use futures::StreamExt;
use tracing::field::Empty;
use tracing::Instrument;

use super::{ChatMessage, ChatRequest, ChatResponse, ChatRole, DeltaStream, LlmError};
use super::{LlmProvider, Speech, Transcription};

/// A non-2xx status the HTTP layer saw before async-openai parsed the body, with the
/// `Retry-After` header async-openai would otherwise drop.
#[derive(Debug, thiserror::Error)]
#[error("HTTP {status}")]
struct HttpStatus {
    status: u16,
    retry_after: Option<Duration>,
}

pub struct OpenAiProvider {
    client: Client<OpenAIConfig>,
    /// Kept only to scrub it from error texts (a server may echo it back).
    key: std::sync::Arc<str>,
}

/// Replaces the API key (and its longer fragments) in an error text. A key shorter than
/// 8 characters is not a real secret and replacing it would mangle ordinary words.
fn scrub_text(text: String, key: &str) -> String {
    if key.len() < 8 || !text.contains(key) {
        return text;
    }
    text.replace(key, "[REDACTED]")
}

/// The same error with the API key scrubbed from every text it carries.
fn scrub(e: LlmError, key: &str) -> LlmError {
    match e {
        LlmError::Connect(m) => LlmError::Connect(scrub_text(m, key)),
        LlmError::Rejected { status, message } => LlmError::Rejected {
            status,
            message: scrub_text(message, key),
        },
        LlmError::BadResponse(m) => LlmError::BadResponse(scrub_text(m, key)),
        other => other,
    }
}

/// Parses `Retry-After` in its seconds form (the form LLM APIs use).
fn parse_retry_after(headers: &reqwest13::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest13::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: f64 = v.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

impl OpenAiProvider {
    /// `api_key` may be empty for local servers (Ollama, llama.cpp) that need none.
    pub fn new(base_url: &str, api_key: &str, connect_timeout: Duration) -> Result<Self, LlmError> {
        let http = reqwest13::Client::builder()
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| LlmError::Connect(format!("building HTTP client: {e}")))?;
        // Exactly one attempt per call; 429 and 5xx come back as HttpStatus with Retry-After.
        let service = tower::service_fn(move |factory: HttpRequestFactory| {
            let http = http.clone();
            async move {
                let request = factory.build().await?;
                let response = http.execute(request).await.map_err(OpenAIError::Reqwest)?;
                let status = response.status();
                if status.as_u16() == 429 || status.is_server_error() {
                    return Err(OpenAIError::Boxed(Box::new(HttpStatus {
                        status: status.as_u16(),
                        retry_after: parse_retry_after(response.headers()),
                    })));
                }
                Ok(response)
            }
        });
        let config = OpenAIConfig::new()
            .with_api_base(base_url.trim_end_matches('/'))
            .with_api_key(api_key);
        Ok(Self {
            client: Client::with_config(config).with_http_service(service),
            key: api_key.into(),
        })
    }

    /// A failed request as the caller sees it: mapped, and the key scrubbed from its text.
    fn error(&self, e: OpenAIError) -> LlmError {
        scrub(map_error(e), &self.key)
    }

    fn build_request(req: ChatRequest, stream: bool) -> CreateChatCompletionRequest {
        let messages = req
            .messages
            .into_iter()
            .map(|m| match m.role {
                ChatRole::System => ChatCompletionRequestMessage::System(
                    ChatCompletionRequestSystemMessage::from(m.content),
                ),
                ChatRole::User => ChatCompletionRequestMessage::User(user_message(m)),
                ChatRole::Assistant => ChatCompletionRequestMessage::Assistant(
                    ChatCompletionRequestAssistantMessage::from(m.content.as_str()),
                ),
            })
            .collect();
        #[allow(deprecated)]
        CreateChatCompletionRequest {
            model: req.model,
            messages,
            temperature: req.temperature,
            // `max_tokens` is what most OpenAI-compatible servers understand.
            max_tokens: req.max_tokens,
            stream: stream.then_some(true),
            stream_options: stream.then_some(ChatCompletionStreamOptions {
                include_usage: Some(true),
                include_obfuscation: None,
            }),
            ..Default::default()
        }
    }
}

/// A user message: plain text, or text plus image content parts.
fn user_message(m: ChatMessage) -> ChatCompletionRequestUserMessage {
    if m.images.is_empty() {
        return ChatCompletionRequestUserMessage::from(m.content);
    }
    let text = ChatCompletionRequestMessageContentPartText {
        text: m.content,
        prompt_cache_breakpoint: None,
    };
    let mut parts = vec![ChatCompletionRequestUserMessageContentPart::Text(text)];
    parts.extend(m.images.into_iter().map(|url| {
        ChatCompletionRequestUserMessageContentPart::ImageUrl(
            ChatCompletionRequestMessageContentPartImage {
                image_url: ImageUrl { url, detail: None },
                prompt_cache_breakpoint: None,
            },
        )
    }));
    ChatCompletionRequestUserMessage {
        content: ChatCompletionRequestUserMessageContent::Array(parts),
        name: None,
    }
}

/// The `text` of a JSON transcription answer.
fn transcript_text(body: &[u8]) -> Result<String, LlmError> {
    #[derive(serde::Deserialize)]
    struct Answer {
        text: String,
    }
    serde_json::from_slice::<Answer>(body)
        .map(|a| a.text)
        .map_err(|e| LlmError::BadResponse(format!("transcription: {e}")))
}

/// Maps async-openai's error to what the caller can act on. The API key travels in a
/// header and reqwest's messages name only the URL, but a server may echo the key in its
/// error message: callers pass the result through [`scrub`].
fn map_error(e: OpenAIError) -> LlmError {
    match e {
        OpenAIError::Boxed(b) => match b.downcast::<HttpStatus>() {
            Ok(s) if s.status == 429 => LlmError::RateLimited {
                retry_after: s.retry_after,
            },
            Ok(s) => LlmError::Server {
                status: s.status,
                retry_after: s.retry_after,
            },
            Err(other) => LlmError::Connect(other.to_string()),
        },
        OpenAIError::Reqwest(e) => {
            if e.is_timeout() {
                LlmError::Timeout
            } else if e.is_connect() || e.is_request() {
                LlmError::Connect(format!("{e:?}").chars().take(300).collect())
            } else {
                LlmError::BadResponse(e.to_string())
            }
        }
        OpenAIError::ApiError(api) => {
            let code = api.api_error.code.as_deref().unwrap_or("");
            let msg = api.api_error.message.to_lowercase();
            if code == "context_length_exceeded"
                || msg.contains("maximum context length")
                || msg.contains("context length")
            {
                LlmError::ContextLength
            } else {
                LlmError::Rejected {
                    status: api.status_code.as_u16(),
                    message: api.api_error.message.chars().take(300).collect(),
                }
            }
        }
        OpenAIError::JSONDeserialize(e, _) => LlmError::BadResponse(e.to_string()),
        OpenAIError::StreamError(e) => LlmError::BadResponse(e.to_string()),
        OpenAIError::InvalidArgument(m) => LlmError::Rejected {
            status: 0,
            message: m,
        },
        other => LlmError::BadResponse(other.to_string()),
    }
}

/// The client span of one attempt, with the GenAI semantic-convention attributes that
/// are known up front; usage, finish reasons and errors are recorded when they arrive.
/// Model names and counts only: never a message, a key or a URL.
fn chat_span(model: &str) -> tracing::Span {
    tracing::debug_span!(
        "chat",
        otel.name = %format_args!("chat {model}"),
        otel.kind = "client",
        otel.status_code = Empty,
        gen_ai.operation.name = "chat",
        gen_ai.system = "openai",
        gen_ai.provider.name = "openai",
        gen_ai.request.model = %model,
        gen_ai.response.model = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        gen_ai.response.finish_reasons = Empty,
        error.type = Empty,
    )
}

/// A finish reason as the conventions spell it (`stop`, `length`, …).
fn reason_name<T: serde::Serialize>(reason: &T) -> String {
    match serde_json::to_value(reason) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "other".into(),
    }
}

fn record_usage(span: &tracing::Span, input: u32, output: u32) {
    span.record("gen_ai.usage.input_tokens", i64::from(input));
    span.record("gen_ai.usage.output_tokens", i64::from(output));
}

fn record_error(span: &tracing::Span, e: &LlmError) {
    span.record("otel.status_code", "ERROR");
    span.record("error.type", e.kind());
}

impl LlmProvider for OpenAiProvider {
    fn complete(&self, req: ChatRequest) -> BoxFuture<'_, Result<ChatResponse, LlmError>> {
        let span = chat_span(&req.model);
        let traced = span.clone();
        let call = async move {
            let result = self.complete_once(req, &traced).await;
            if let Err(e) = &result {
                record_error(&traced, e);
            }
            result
        };
        Box::pin(call.instrument(span))
    }

    fn stream(&self, req: ChatRequest) -> BoxFuture<'_, Result<DeltaStream, LlmError>> {
        let span = chat_span(&req.model);
        let traced = span.clone();
        let call = async move {
            let result = self.stream_once(req, traced.clone()).await;
            if let Err(e) = &result {
                record_error(&traced, e);
            }
            result
        };
        Box::pin(call.instrument(span))
    }

    fn transcribe(&self, req: Transcription) -> BoxFuture<'_, Result<String, LlmError>> {
        Box::pin(async move {
            let bytes = std::sync::Arc::unwrap_or_clone(req.bytes);
            let request = CreateTranscriptionRequest {
                file: AudioInput::from_vec_u8(req.file_name, bytes),
                model: req.model,
                ..Default::default()
            };
            // Raw: async-openai's typed answer requires `usage`, which Whisper servers
            // (local ones above all) leave out; `text` is all that is needed.
            let audio = self.client.audio();
            let body = audio.transcription().create_raw(request).await;
            let body = body.map_err(|e| self.error(e))?;
            transcript_text(&body)
        })
    }

    fn speak(&self, req: Speech) -> BoxFuture<'_, Result<Vec<u8>, LlmError>> {
        Box::pin(async move {
            let format = match req.format.as_str() {
                "mp3" => SpeechResponseFormat::Mp3,
                _ => SpeechResponseFormat::Opus,
            };
            let request = CreateSpeechRequest {
                input: req.input,
                model: SpeechModel::Other(req.model),
                voice: Voice::Other(req.voice),
                response_format: Some(format),
                ..Default::default()
            };
            let audio = self.client.audio();
            let resp = audio.speech().create(request).await;
            let bytes = resp.map_err(|e| self.error(e))?.bytes;
            if bytes.is_empty() {
                return Err(LlmError::BadResponse("empty speech".into()));
            }
            Ok(bytes.to_vec())
        })
    }
}

impl OpenAiProvider {
    async fn complete_once(
        &self,
        req: ChatRequest,
        span: &tracing::Span,
    ) -> Result<ChatResponse, LlmError> {
        let chat = self.client.chat();
        let resp = chat.create(Self::build_request(req, false)).await;
        let resp = resp.map_err(|e| self.error(e))?;
        // Only a span someone records (tracing or OTel on) is worth the strings.
        if !span.is_disabled() {
            span.record("gen_ai.response.model", resp.model.as_str());
            let reasons: Vec<String> = resp
                .choices
                .iter()
                .filter_map(|c| c.finish_reason.as_ref().map(reason_name))
                .collect();
            span.record("gen_ai.response.finish_reasons", reasons.join(",").as_str());
        }
        if let Some(u) = &resp.usage {
            record_usage(span, u.prompt_tokens, u.completion_tokens);
        }
        let text = resp
            .choices
            .into_iter()
            .next()
            .and_then(|c| c.message.content)
            .unwrap_or_default();
        if text.trim().is_empty() {
            return Err(LlmError::BadResponse("empty answer".into()));
        }
        let (prompt_tokens, completion_tokens) = resp
            .usage
            .map(|u| (u.prompt_tokens as u64, u.completion_tokens as u64))
            .unwrap_or((0, 0));
        Ok(ChatResponse {
            text,
            prompt_tokens,
            completion_tokens,
        })
    }

    /// A streamed completion. `span` goes with the stream (it ends when the stream is
    /// dropped) and gets the usage and finish reason from the last chunks.
    async fn stream_once(
        &self,
        req: ChatRequest,
        span: tracing::Span,
    ) -> Result<DeltaStream, LlmError> {
        let request = Self::build_request(req, true);
        let stream = self
            .client
            .chat()
            .create_stream(request)
            .await
            .map_err(|e| self.error(e))?;
        let key = self.key.clone();
        let deltas = stream.filter_map(move |item| {
            let key = key.clone();
            let span = span.clone();
            async move {
                match item {
                    Ok(chunk) => {
                        if let Some(u) = &chunk.usage {
                            record_usage(&span, u.prompt_tokens, u.completion_tokens);
                        }
                        let choice = chunk.choices.into_iter().next()?;
                        if let Some(reason) = &choice.finish_reason {
                            let name = reason_name(reason);
                            span.record("gen_ai.response.finish_reasons", name.as_str());
                        }
                        choice.delta.content.filter(|s| !s.is_empty()).map(Ok)
                    }
                    // Any stream error (including an `{"error":…}` event) ends the stream.
                    Err(e) => {
                        let e = scrub(map_error(e), &key);
                        record_error(&span, &e);
                        Some(Err(e))
                    }
                }
            }
        });
        Ok(Box::pin(deltas) as DeltaStream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_scrubbed_from_every_error_text() {
        let key = "sk-live-0123456789abcdef";
        let e = scrub(
            LlmError::Rejected {
                status: 401,
                message: format!("Incorrect API key provided: {key}."),
            },
            key,
        );
        assert_eq!(
            e.to_string(),
            "LLM rejected the request (HTTP 401): Incorrect API key provided: [REDACTED]."
        );
        let e = scrub(LlmError::Connect(format!("GET https://x/?key={key}")), key);
        assert!(!e.to_string().contains(key));
        let e = scrub(LlmError::BadResponse("no".into()), "");
        assert_eq!(
            e.to_string(),
            "LLM returned an empty or malformed answer: no"
        );
    }

    #[test]
    fn retry_after_seconds() {
        let mut h = reqwest13::header::HeaderMap::new();
        assert_eq!(parse_retry_after(&h), None);
        h.insert(reqwest13::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(reqwest13::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&h), None);
    }
}
