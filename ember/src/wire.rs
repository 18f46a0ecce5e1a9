//! The Goodfire API's wire format (`../shared/reference/goodfire-api.md` §2): request and
//! reply bodies, the limits one request may ask for, and the stream's chunk format.
//!
//! Unknown request fields are ignored: the OpenAI SDK adds its own (`n`, `stream_options`, ...).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::EmberError;

/// Bytes of message content allowed per prompt token: checked before templating and
/// tokenizing, so an oversized conversation costs nothing. English runs about 4 bytes a token;
/// 16 leaves room for any text that fits the token limit.
pub const BYTES_PER_PROMPT_TOKEN: usize = 16;

/// How much one request may ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Tokens of a templated conversation (prompt of a chat, input of an inspection).
    pub max_prompt_tokens: usize,
    /// Tokens one chat completion may generate (larger requests are lowered to this).
    pub max_new_tokens: usize,
    pub max_messages: usize,
    /// Conversations per contrast dataset.
    pub max_conversations: usize,
    /// Features per rerank, list, lookup or neighbours request.
    pub max_features: usize,
    /// Results per search, rerank or neighbours request.
    pub max_top_k: usize,
    /// Tokens of all conversations of one contrast together.
    pub max_contrast_tokens: usize,
    /// Wall time one contrast may take before it is stopped with an error.
    pub contrast_budget: std::time::Duration,
}

impl Limits {
    /// The most bytes of message content a conversation may carry
    /// ([`BYTES_PER_PROMPT_TOKEN`] per allowed token).
    pub fn max_prompt_bytes(&self) -> usize {
        self.max_prompt_tokens.saturating_mul(BYTES_PER_PROMPT_TOKEN)
    }
}

impl Default for Limits {
    fn default() -> Self {
        // The real API's limits where it had them (goodfire-api.md §2.15); prompts sized for
        // a 135M model on a CPU.
        Self {
            max_prompt_tokens: 4096,
            max_new_tokens: 1024,
            max_messages: 128,
            max_conversations: 64,
            max_features: 8192,
            max_top_k: 8192,
            max_contrast_tokens: 32_768,
            // Within the SDK's 60 s timeout.
            contrast_budget: std::time::Duration::from_secs(50),
        }
    }
}

/// A chat message as the SDKs send it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// `stop`: one string or several.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `POST chat/completions` (also the OpenAI-style `/v1/chat/completions`).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub model: String,
    #[serde(default)]
    pub stream: bool,
    pub max_completion_tokens: Option<i64>,
    /// The OpenAI name of `max_completion_tokens`.
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub controller: Option<Value>,
    /// Kindling's: the base model's own conversation, for a provider that writes the base and
    /// the steered reply in one call (Neuronpedia); without it both continue `messages`.
    #[serde(default)]
    pub kindling_base_messages: Option<Vec<Message>>,
}

impl ChatRequest {
    /// Tokens to generate: what was asked (`max_completion_tokens`, or the OpenAI name
    /// `max_tokens`), else `default`, lowered to `limit` (the goodfire SDK always asks 2048,
    /// so a larger request is lowered, not refused).
    pub fn new_tokens(&self, default: usize, limit: usize) -> Result<usize, EmberError> {
        match self.max_completion_tokens.or(self.max_tokens) {
            None => Ok(default.min(limit)),
            Some(n) if n < 1 => Err(EmberError::Invalid(format!("max_completion_tokens must be at least 1, got {n}"))),
            Some(n) => Ok((n as u64).min(limit as u64) as usize),
        }
    }

    /// The sampling temperature (0.6 when not given), 0 to 2.
    pub fn checked_temperature(&self) -> Result<f32, EmberError> {
        let temperature = self.temperature.unwrap_or(0.6);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(EmberError::Invalid(format!(
                "temperature must be between 0 and 2, got {temperature}"
            )));
        }
        Ok(temperature)
    }

    /// The stop strings, empty ones left out, at most 16.
    pub fn stop_strings(&self) -> Vec<String> {
        let stops = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        stops.into_iter().filter(|s| !s.is_empty()).take(16).collect()
    }
}

/// `POST chat-attribution/compute-logits`.
#[derive(Debug, Clone, Deserialize)]
pub struct LogitsRequest {
    pub messages: Vec<Message>,
    pub model: String,
    #[serde(default = "ten")]
    pub top_k: i64,
    pub filter_vocabulary: Option<Vec<String>>,
    pub controller: Option<Value>,
}

fn ten() -> i64 {
    10
}

/// `POST features/rerank`.
#[derive(Debug, Clone, Deserialize)]
pub struct RerankRequest {
    pub query: String,
    pub model: String,
    #[serde(default = "ten")]
    pub top_k: i64,
    pub feature_ids: Vec<String>,
}

/// `POST features/lookup`.
#[derive(Debug, Clone, Deserialize)]
pub struct LookupRequest {
    pub indices: Vec<i64>,
    pub model: String,
}

/// `POST attributions/neighbors`.
#[derive(Debug, Clone, Deserialize)]
pub struct NeighborsRequest {
    pub feature_indices: Vec<i64>,
    pub model: String,
    #[serde(default = "ten")]
    pub top_k: i64,
}

/// `POST features/dashboard` (Kindling's own): everything the atlas knows of one feature.
#[derive(Debug, Clone, Deserialize)]
pub struct DashboardRequest {
    pub feature_id: String,
    pub model: String,
}

/// `POST chat-attribution/compute-features`.
#[derive(Debug, Clone, Deserialize)]
pub struct ComputeFeaturesRequest {
    pub messages: Vec<Message>,
    pub model: String,
    pub controller: Option<Value>,
    /// Aggregation happens in the SDK; accepted and ignored.
    pub aggregate_by: Option<String>,
    pub include_feature_indexes: Option<Vec<i64>>,
}

/// `POST chat-attribution/contrast`.
#[derive(Debug, Clone, Deserialize)]
pub struct ContrastRequest {
    pub dataset_1: Vec<Vec<Message>>,
    pub dataset_2: Vec<Vec<Message>>,
    pub model: String,
    #[serde(default = "five")]
    pub k_to_add: i64,
    #[serde(default = "five")]
    pub k_to_remove: i64,
}

fn five() -> i64 {
    5
}

/// `POST features/auto-edits` and `features/auto-conditional`.
#[derive(Debug, Clone, Deserialize)]
pub struct SpecificationRequest {
    pub specification: String,
    pub model: String,
}

/// `POST attributions/compute-logit-attribution`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttributionRequest {
    pub messages: Vec<Message>,
    pub model: String,
    pub start_index: i64,
    pub end_index: Option<i64>,
}

/// `POST attributions/generate-contrastive-dataset` (the SDK sends no model).
#[derive(Debug, Clone, Deserialize)]
pub struct ContrastiveDatasetRequest {
    pub specification: String,
}

/// `POST chat/tokenize`.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    pub messages: Vec<Message>,
    pub model: String,
}

/// A feature in a search-style answer (`id`; `lookup` answers use `uuid` instead).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureOut {
    pub id: String,
    pub label: String,
    pub index_in_sae: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relevance: Option<f32>,
    /// Share of tokens it fires on (Kindling's addition; Goodfire clients ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub density: Option<f32>,
    /// Its activation histogram, for a sparkline (Kindling's addition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<Vec<u32>>,
}

/// `compute-logits`'s answer: `{"logits": {token: logit}}`, keys in order of logit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogitsResponse {
    pub logits: OrderedMap,
}

/// A JSON object whose keys keep their order (most likely token first).
#[derive(Debug, Clone, PartialEq)]
pub struct OrderedMap(pub Vec<(String, f32)>);

impl Serialize for OrderedMap {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// One streamed piece of a chat reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatDelta {
    /// The generated token's position in the reply (0, 1, ...).
    pub index: usize,
    pub text: String,
    /// Rules that fired since the previous piece.
    pub rules: Vec<RuleFired>,
}

/// A rule of the variant (a `set_when` or `abort_when` scope) that fired during a reply. Sent
/// to clients as `kindling_rules_fired` on the stream chunk that follows it (an extra key,
/// which the Goodfire and OpenAI SDKs ignore).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleFired {
    /// The scope's place in the controller's `scopes`.
    pub rule: usize,
    /// The reply token whose features met the condition; `None` when a prompt token did.
    pub token_index: Option<usize>,
    /// That reply token's text (empty for a prompt token).
    pub token: String,
}

/// How a chat reply ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatEnd {
    /// `"stop"` (end of turn, stop string or abort) or `"length"`.
    pub finish_reason: &'static str,
    /// The `abort_when` event that stopped it, if one did.
    pub event: Option<String>,
    /// Generated tokens.
    pub tokens: usize,
    /// True when the caller stopped it (client gone).
    pub cancelled: bool,
    /// Rules that fired after the last piece (an `abort_when` rule always lands here).
    pub rules: Vec<RuleFired>,
}

pub fn specification(spec: &str) -> Result<&str, EmberError> {
    let spec = spec.trim();
    if spec.is_empty() || spec.len() > 1000 {
        return Err(EmberError::Invalid("the specification must be 1 to 1000 characters".into()));
    }
    Ok(spec)
}

/// Bytes at the end of `text` that could begin a stop string.
pub fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for stop in stops {
        for (i, _) in stop.char_indices().skip(1) {
            if text.ends_with(&stop[..i]) {
                hold = hold.max(i);
            }
        }
    }
    hold
}

/// Seconds since the Unix epoch (`web_time` reads `Date.now()` in the browser).
pub fn now() -> u64 {
    web_time::SystemTime::now()
        .duration_since(web_time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A completion id unique within the process (`chatcmpl-`, the time, a counter).
pub fn completion_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "chatcmpl-{:x}{:06x}",
        now(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// One SSE chunk of a streamed reply, in the shape the SDK's parser needs (every field in
/// every chunk; goodfire-api.md §2.1.3).
/// A stream chunk with the rules that fired before it, if any (`kindling_rules_fired`).
pub fn with_rules_fired(mut chunk: Value, rules: &[RuleFired]) -> Value {
    if !rules.is_empty() {
        chunk["kindling_rules_fired"] = json!(rules);
    }
    chunk
}

pub fn chunk_json(
    id: &str,
    created: u64,
    model: &str,
    index: usize,
    content: &str,
    finish_reason: Option<&str>,
    events: &[String],
) -> Value {
    json!({
        "object": "chat.completion.chunk", "id": id, "created": created, "model": model, "system_fingerprint": "",
        "gf_event_names": if events.is_empty() { Value::Null } else { json!(events) },
        "choices": [{ "index": 0, "delta": { "role": "assistant", "content": content }, "gf_token_index": index, "finish_reason": finish_reason }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_what_may_start_a_stop_string() {
        let stops = vec!["<|eot_id|>".to_string(), "END".to_string()];
        assert_eq!(held_back("hello <|eo", &stops), 4);
        assert_eq!(held_back("hello E", &stops), 1);
        assert_eq!(held_back("hello", &stops), 0);
        assert_eq!(held_back("é", &["éx".to_string()]), 2, "whole characters only");
    }

    #[test]
    fn chunks_carry_every_field_the_sdk_requires() {
        let c = chunk_json("chatcmpl-1", 7, "m", 3, "Hi", None, &[]);
        assert_eq!(c["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(c["choices"][0]["gf_token_index"], 3);
        assert!(c["choices"][0].as_object().unwrap().contains_key("finish_reason"));
        assert_eq!(c["system_fingerprint"], "");
        let c = chunk_json("chatcmpl-1", 7, "m", 3, "", Some("stop"), &["ev".into()]);
        assert_eq!(c["gf_event_names"], json!(["ev"]));
    }
}
