//! The reply bodies of the Goodfire API (goodfire-api.md §2), typed. A [`crate::Provider`]
//! answers with these; [`crate::dispatch`] turns them into JSON. Fields marked as Kindling's
//! are extras that the Goodfire and OpenAI SDKs ignore.

use serde::{Deserialize, Serialize};

use crate::wire::{FeatureOut, Message, RuleFired};

/// A feature as the SDK's `Feature.json()` writes it (`uuid`, not `id`), inside controllers
/// and lookups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoodfireFeature {
    pub uuid: String,
    pub label: String,
    pub index_in_sae: u32,
    /// Always 1 (the SDK writes the constant).
    pub max_activation_strength: u32,
}

/// `{"features": [...]}`: a group of features in a controller or condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureGroup {
    pub features: Vec<GoodfireFeature>,
}

/// `POST chat/completions` without streaming: the SDK's `ChatCompletion`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    /// `"chat.completion"`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    /// The `abort_when` events that stopped the reply.
    pub gf_event_names: Vec<String>,
    pub choices: Vec<Choice>,
    pub usage: Usage,
    /// Kindling's: the rules that fired during the reply.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kindling_rules_fired: Vec<RuleFired>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: Message,
    pub finish_reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// `GET features/search`, `POST features/rerank`, `GET features/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Features {
    pub features: Vec<FeatureOut>,
}

/// `POST features/lookup`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lookup {
    pub features: Vec<LookedUp>,
    /// Kindling's: the steering unit edit values are in (units.rs).
    pub strength_unit: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LookedUp {
    #[serde(flatten)]
    pub feature: GoodfireFeature,
    /// Kindling's: what one value of steering unit 1 is in the current unit, for converting
    /// old variants (`null` when the latent has no conversion).
    pub strength_per_unit_1: Option<f32>,
}

/// `POST attributions/neighbors`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Neighbors {
    pub neighbors: Vec<FeatureOut>,
}

/// A token and a number: a promoted or suppressed token and its logit effect.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenValue {
    pub token: String,
    pub value: f32,
}

/// A top context: token texts and the feature's activation on each (activation units).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContextOut {
    pub tokens: Vec<String>,
    pub activations: Vec<f32>,
}

/// `POST features/dashboard` (Kindling's own): a feature's card.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dashboard {
    pub feature: FeatureOut,
    /// `"model"`, `"tokens"` or `"dead"`: where the label came from.
    pub label_source: String,
    pub label_score: Option<f32>,
    pub density: f32,
    pub max_activation: f32,
    pub max_observed: f32,
    pub histogram: Vec<u32>,
    pub promoted: Vec<TokenValue>,
    pub suppressed: Vec<TokenValue>,
    pub contexts: Vec<ContextOut>,
    pub neighbors: Vec<FeatureOut>,
}

/// `GET features/map` (Kindling's own): where each live feature sits on the Features tab's
/// map (label meaning laid out in the unit square: related labels sit together), and the
/// map's named regions. Positions are rounded to 10⁻⁴, finer than any screen shows them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeatureMap {
    pub regions: Vec<MapRegion>,
    pub points: Vec<MapPoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MapRegion {
    pub name: String,
    /// The centre of its points.
    pub x: f32,
    pub y: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MapPoint {
    pub index_in_sae: u32,
    pub label: String,
    /// In `[0, 1]`, left to right.
    pub x: f32,
    /// In `[0, 1]`, top to bottom.
    pub y: f32,
    /// Its region, an index into `regions`.
    pub region: u8,
}

/// `POST chat-attribution/compute-features`: every token with its active features.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenFeatures {
    pub tokens: Vec<TokenActivations>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenActivations {
    pub token: String,
    /// Strongest first.
    pub attributions: Vec<Activation>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Activation {
    pub id: String,
    pub index_in_sae: u32,
    /// In activation units (the latent's 99th-percentile activation is 1).
    pub activation_strength: f32,
}

/// `POST chat-attribution/contrast`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Contrast {
    pub dataset_1_features: Vec<FeatureOut>,
    pub dataset_2_features: Vec<FeatureOut>,
}

/// `POST features/auto-edits`: AutoSteer's edits, and (Kindling's) why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AutoEdits {
    /// `[feature, value]` pairs.
    pub edits: Vec<(FeatureOut, f32)>,
    /// Kindling's: every trial, best first.
    pub trials: Vec<TrialOut>,
    /// Kindling's: the tokens counted as the concept's.
    pub concept_tokens: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrialOut {
    pub edits: Vec<TrialEdit>,
    pub effect: f32,
    /// The base model's perplexity of the trial's replies over that of its own replies;
    /// `None` when it was not measured (no effect, or too repetitive).
    pub perplexity_ratio: Option<f32>,
    pub distinct_bigrams: f32,
    pub accepted: bool,
    pub sample: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrialEdit {
    pub index_in_sae: u32,
    pub label: String,
    pub value: f32,
}

/// `POST features/auto-conditional`: the condition, and (Kindling's) what it measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AutoConditional {
    pub conditional: Conditionals,
    pub measured: Measured,
}

/// A condition as the SDK writes one: comparisons joined by `"AND"` or `"OR"`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conditionals {
    pub conditionals: Vec<Comparison>,
    pub operator: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub left_hand: FeatureGroup,
    pub right_hand: RightHand,
    /// `>`, `<`, `>=`, `<=`, `==` or `!=`.
    pub operator: String,
}

/// What a comparison's left side is compared with.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum RightHand {
    Number(f32),
    Feature(GoodfireFeature),
}

/// The feature AutoConditional chose, its maximum on texts about the description and on
/// plain texts (activation units), and whether it separates them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measured {
    pub feature: u32,
    pub label: String,
    pub threshold: f32,
    pub on_topic: Vec<f32>,
    pub plain: Vec<f32>,
    pub separates: bool,
}

/// `POST attributions/compute-logit-attribution`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogitAttribution {
    /// Largest logit drop first.
    pub to_ablate: Vec<Ablation>,
    pub num_input_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ablation {
    pub id: String,
    /// The token's logit drop when the feature is ablated.
    pub value: f32,
    /// Where the feature is active before the token.
    pub tokens: Vec<ActiveAt>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActiveAt {
    pub index: usize,
    pub activation_strength: f32,
}

/// `POST attributions/generate-contrastive-dataset`: `[dataset_1, dataset_2]`, each a list of
/// conversations.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct ContrastiveDatasets(pub [Vec<Vec<Message>>; 2]);

/// `POST chat/tokenize`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tokens {
    pub tokens: Vec<TokenText>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenText {
    pub value: String,
}

/// `GET models`, in the OpenAI SDK's list shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Models {
    /// `"list"`.
    pub object: &'static str,
    pub data: Vec<ModelOut>,
    /// Kindling's: who answers behind this endpoint, when it is not Kindling's own engine,
    /// and what it cannot do (so a page greys those controls out before they are used).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kindling_provider: Option<ProviderInfo>,
}

/// A remote provider behind an endpoint, as `GET models` names it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProviderInfo {
    pub name: String,
    /// Its model and SAE source (`model/source`).
    pub source: String,
    /// Route paths (under the API prefix) it cannot serve, each with the reason.
    pub limitations: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelOut {
    pub id: String,
    /// `"model"`.
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

impl Models {
    pub fn of(names: &[String]) -> Self {
        Self {
            object: "list",
            data: names
                .iter()
                .map(|id| ModelOut {
                    id: id.clone(),
                    object: "model",
                    created: 0,
                    owned_by: "kindling",
                })
                .collect(),
            kindling_provider: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, to_value};

    fn feature(index: u32) -> GoodfireFeature {
        GoodfireFeature {
            uuid: format!("u{index}"),
            label: "l".into(),
            index_in_sae: index,
            max_activation_strength: 1,
        }
    }

    #[test]
    fn replies_have_the_sdks_shapes() {
        let lookup = Lookup {
            features: vec![LookedUp {
                feature: feature(3),
                strength_per_unit_1: None,
            }],
            strength_unit: 2,
        };
        assert_eq!(
            to_value(lookup).unwrap(),
            json!({ "features": [{ "uuid": "u3", "label": "l", "index_in_sae": 3, "max_activation_strength": 1, "strength_per_unit_1": null }], "strength_unit": 2 })
        );
        let comparison = |right_hand| Comparison {
            left_hand: FeatureGroup {
                features: vec![feature(1)],
            },
            right_hand,
            operator: ">".into(),
        };
        assert_eq!(to_value(comparison(RightHand::Number(0.5))).unwrap()["right_hand"], json!(0.5));
        assert_eq!(
            to_value(comparison(RightHand::Feature(feature(2)))).unwrap()["right_hand"]["index_in_sae"],
            2
        );
        let said = |role: &str| Message {
            role: role.into(),
            content: "x".into(),
        };
        let datasets = ContrastiveDatasets([vec![vec![said("user"), said("assistant")]], vec![]]);
        assert_eq!(
            to_value(datasets).unwrap(),
            json!([[[{ "role": "user", "content": "x" }, { "role": "assistant", "content": "x" }]], []])
        );
        assert_eq!(
            to_value(Models::of(&["m".into()])).unwrap(),
            json!({ "object": "list", "data": [{ "id": "m", "object": "model", "created": 0, "owned_by": "kindling" }] })
        );
        let trial = TrialOut {
            edits: vec![],
            effect: 1.0,
            perplexity_ratio: None,
            distinct_bigrams: 0.5,
            accepted: false,
            sample: String::new(),
        };
        assert_eq!(to_value(trial).unwrap()["perplexity_ratio"], json!(null));
    }
}
