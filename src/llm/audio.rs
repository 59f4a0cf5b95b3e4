//! Audio requests of the LLM layer (OpenAI's `POST /audio/transcriptions` and
//! `POST /audio/speech`), in our own types: only `openai.rs` turns them into
//! async-openai's.

use std::sync::Arc;

/// One audio file to transcribe.
#[derive(Debug, Clone)]
pub struct Transcription {
    pub model: String,
    /// A name with the extension the endpoint reads the format from (`voice.ogg`).
    pub file_name: String,
    /// Shared between attempts: a retry does not copy the file again.
    pub bytes: Arc<Vec<u8>>,
}

/// One text to speak.
#[derive(Debug, Clone)]
pub struct Speech {
    pub model: String,
    pub voice: String,
    /// `opus` or `mp3`.
    pub format: String,
    pub input: String,
}
