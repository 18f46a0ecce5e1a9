//! The prompt prefix most chats share: the chat template's default system message and the
//! user turn's header (20 of the 45 tokens of a one-line chat with SmolLM2's template).
//!
//! An unsteered chat that starts with it prefills it as a pass of its own, and the keys and
//! values of that pass are kept: the next such chat prefills only its own tokens. The split
//! is made whether or not the kept cache is there yet, so a reply is the same either way. A
//! steered chat prefills in one pass as before (its hook changes the prefix's residuals too).

use std::sync::Mutex;

use crate::EngineError;
use crate::llama::{KvCache, Llama, Logits};
use crate::tokenizer::{ChatMessage, TokenId, Tokenizer};

#[derive(Debug)]
pub(crate) struct SharedPrefix {
    tokens: Vec<TokenId>,
    /// The cache after `tokens`, once a chat (or [`crate::Model::warm_prompt_prefix`]) made it.
    kept: Mutex<Option<KvCache>>,
}

impl SharedPrefix {
    /// The tokens every one-message user chat starts with under `tokenizer`'s template: the
    /// longest common prefix of two such chats (empty when the template has none, or cannot
    /// render them).
    pub(crate) fn of(tokenizer: &Tokenizer) -> Self {
        let chat = |content: &str| tokenizer.encode_chat(&[ChatMessage::user(content)]).unwrap_or_default();
        let (a, b) = (chat("a"), chat("b"));
        let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        Self {
            tokens: a[..common].to_vec(),
            kept: Mutex::new(None),
        }
    }

    pub(crate) fn tokens(&self) -> &[TokenId] {
        &self.tokens
    }

    /// How many of `prompt`'s tokens the prefix covers: its length when `prompt` starts with
    /// it and goes on after it, else 0.
    pub(crate) fn covers(&self, prompt: &[TokenId]) -> usize {
        let n = self.tokens.len();
        if n > 0 && prompt.len() > n && prompt.starts_with(&self.tokens) {
            n
        } else {
            0
        }
    }

    /// The cache after the prefix: the kept one, or made now and kept.
    pub(crate) fn cache(&self, llama: &Llama) -> Result<KvCache, EngineError> {
        if let Some(kept) = self.kept.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(kept.clone());
        }
        let mut cache = llama.new_cache();
        // The logits of the prefix's last position are not needed; the pass still computes
        // them (`Logits::None` without a hook would stop before the blocks).
        llama.forward(&self.tokens, &mut cache, None, Logits::Last)?;
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(cache.clone());
        Ok(cache)
    }
}
