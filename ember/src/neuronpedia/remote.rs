//! Neuronpedia's own JSON, as far as Kindling reads and writes it
//! (`../shared/reference/neuronpedia-api.md`). Replies are read leniently: every field the
//! provider does not need is ignored, and every field it reads may be missing (Neuronpedia's
//! Prisma rows grow columns), so a new column never breaks a reply.

use serde::{Deserialize, Serialize};

/// A message of `defaultChatMessages` / `steeredChatMessages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// One steering feature of `POST /api/steer-chat`: `coeff = strength × strength_multiplier`
/// times the raw decoder row is added at the SAE's hook, at every position.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SteerFeature {
    pub model_id: String,
    pub layer: String,
    pub index: u32,
    pub strength: f32,
}

/// The body of `POST /api/steer-chat` (`steerSchema`, §1): every required field, always.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SteerChat {
    pub model_id: String,
    pub default_chat_messages: Vec<ChatMessage>,
    pub steered_chat_messages: Vec<ChatMessage>,
    pub features: Vec<SteerFeature>,
    pub temperature: f32,
    #[serde(rename = "n_tokens")]
    pub n_tokens: u32,
    pub seed: i64,
    #[serde(rename = "strength_multiplier")]
    pub strength_multiplier: f32,
    #[serde(rename = "steer_special_tokens")]
    pub steer_special_tokens: bool,
    pub stream: bool,
    #[serde(rename = "steer_method")]
    pub steer_method: &'static str,
}

/// One side of a steer-chat reply.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SteerOutput {
    #[serde(default)]
    pub raw: String,
    /// The input messages and the generated assistant turn.
    #[serde(default)]
    pub chat_template: Vec<ChatMessage>,
}

impl SteerOutput {
    /// The generated reply: the last assistant turn of `chatTemplate`.
    pub fn reply(&self) -> &str {
        self.chat_template
            .iter()
            .rev()
            .find(|m| m.role == "assistant" || m.role == "model")
            .map_or("", |m| m.content.as_str())
    }
}

/// A steer-chat reply, or one snapshot of a streamed one (cumulative: each holds the whole
/// text so far). `STEERED`/`DEFAULT` are the keys the route really sends (its swagger says
/// otherwise, §1).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SteerReply {
    #[serde(rename = "STEERED", default)]
    pub steered: Option<SteerOutput>,
    #[serde(rename = "DEFAULT", default)]
    pub default: Option<SteerOutput>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(rename = "shareUrl", default)]
    pub share_url: Option<String>,
    /// Requests left in the rate-limit window (a string or a number).
    #[serde(default)]
    pub limit: Option<serde_json::Value>,
}

/// An explanation of a feature.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub explanation_model_name: Option<String>,
}

/// One top-activation record of a feature.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivationRecord {
    #[serde(default)]
    pub tokens: Vec<String>,
    #[serde(default)]
    pub values: Vec<f32>,
    #[serde(default)]
    pub max_value: f32,
}

/// A feature (Neuronpedia's `Neuron` row) as `GET /api/feature/…` and `POST /api/features`
/// return it, and as search results embed it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Neuron {
    #[serde(default)]
    pub model_id: String,
    #[serde(default)]
    pub layer: String,
    /// A string in Prisma's rows, a number in search results: read either.
    #[serde(default, deserialize_with = "index_of")]
    pub index: Option<u32>,
    #[serde(default)]
    pub max_act_approx: Option<f32>,
    #[serde(default, rename = "frac_nonzero")]
    pub frac_nonzero: Option<f32>,
    #[serde(default, rename = "pos_str")]
    pub pos_str: Vec<String>,
    #[serde(default, rename = "pos_values")]
    pub pos_values: Vec<f32>,
    #[serde(default, rename = "neg_str")]
    pub neg_str: Vec<String>,
    #[serde(default, rename = "neg_values")]
    pub neg_values: Vec<f32>,
    #[serde(default, rename = "freq_hist_data_bar_heights")]
    pub freq_hist_data_bar_heights: Vec<f32>,
    #[serde(default)]
    pub activations: Vec<ActivationRecord>,
    #[serde(default)]
    pub explanations: Vec<Explanation>,
}

impl Neuron {
    /// The best explanation's text (explanations come sorted by score).
    pub fn description(&self) -> Option<&str> {
        self.explanations.iter().map(|e| e.description.trim()).find(|d| !d.is_empty())
    }
}

fn index_of<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Ok(match Option::<serde_json::Value>::deserialize(d)? {
        Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    })
}

/// One hit of `POST /api/explanation/search`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SearchHit {
    #[serde(default)]
    pub model_id: String,
    #[serde(default)]
    pub layer: String,
    #[serde(default, deserialize_with = "index_of")]
    pub index: Option<u32>,
    #[serde(default)]
    pub description: String,
    #[serde(default, rename = "cosine_similarity")]
    pub cosine_similarity: Option<f32>,
    #[serde(default)]
    pub neuron: Option<Neuron>,
}

/// `POST /api/explanation/search`'s reply: 20 hits a page.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SearchReply {
    #[serde(default)]
    pub results: Vec<SearchHit>,
    #[serde(default)]
    pub has_more: bool,
    #[serde(default)]
    pub next_offset: Option<u32>,
}

/// One feature firing on a token, in `POST /api/search-topk-by-token`'s reply.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopFeature {
    #[serde(default)]
    pub activation_value: f32,
    #[serde(default)]
    pub feature_index: u32,
    #[serde(default)]
    pub feature: Option<Neuron>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenTopFeatures {
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub is_special: bool,
    #[serde(default)]
    pub top_features: Vec<TopFeature>,
}

/// `POST /api/search-topk-by-token`'s reply for one text.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct TopkByToken {
    #[serde(default)]
    pub results: Vec<TokenTopFeatures>,
}
