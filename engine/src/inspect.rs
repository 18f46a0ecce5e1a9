//! Inspect: which features are active at every token of a conversation.
//!
//! One forward pass to the SAE's block (with a variant's edits applied, when given) records
//! each token's active latents; everything else is arithmetic on that sparse matrix:
//! per-token features, a feature's (or group's) vector over the tokens, the dense
//! tokens × latents matrix for export, and aggregates over the tokens (count, mean, max, sum)
//! ranked with [`Inspection::top`] or read for chosen features with [`Inspection::lookup`].
//! Activations are raw SAE values; divide by the atlas's units for max-activation units.

use serde::{Deserialize, Serialize};

use crate::sae::{Feature, Sae};
use crate::steer::{Steer, Units, Variant, VariantError};
use crate::tokenizer::{ChatMessage, TokenId};
use crate::{CancelToken, EngineError, Logits, Model};

/// How a feature's activations over the tokens reduce to one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    /// Tokens on which it is active.
    Count,
    /// Sum over all tokens / number of tokens.
    Mean,
    Max,
    Sum,
}

/// The active latents at every token of an input.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspection {
    pub tokens: Vec<TokenId>,
    /// Per token, its active latents, strongest first.
    pub features: Vec<Vec<Feature>>,
    d_sae: usize,
}

impl Inspection {
    /// Runs `tokens` through the model to the SAE's block, with `variant`'s edits when given
    /// (its values in `units`), and records every token's latents.
    pub fn run(model: &Model, sae: &Sae, tokens: &[TokenId], variant: Option<(&Variant, &Units)>) -> Result<Self, EngineError> {
        Self::run_cancellable(model, sae, tokens, variant, &CancelToken::new())
    }

    /// [`run`](Self::run) that stops between blocks once `cancel` is cancelled
    /// (`EngineError::Cancelled`): a long inspection's pass takes seconds.
    pub fn run_cancellable(
        model: &Model,
        sae: &Sae,
        tokens: &[TokenId],
        variant: Option<(&Variant, &Units)>,
        cancel: &CancelToken,
    ) -> Result<Self, EngineError> {
        let ones;
        let (variant, units) = match variant {
            Some((v, u)) => (v.clone(), u),
            None => {
                ones = Units::uniform(sae.config().d_sae, 1.0);
                (Variant::new(""), &ones)
            }
        };
        let mut steer = Steer::new(sae, units, variant)?.recording().cancellable(cancel.clone());
        let mut cache = model.llama.new_cache();
        model.llama.forward(tokens, &mut cache, Some(&mut steer), Logits::None)?;
        let features = (0..tokens.len()).map(|p| steer.features.remove(&p).unwrap_or_default()).collect();
        Ok(Self {
            tokens: tokens.to_vec(),
            features,
            d_sae: sae.config().d_sae,
        })
    }

    /// [`run`](Self::run) on a conversation rendered with the chat template (no generation
    /// prompt: the conversation as it stands; control tokens only where the template put them).
    pub fn chat(model: &Model, sae: &Sae, messages: &[ChatMessage], variant: Option<(&Variant, &Units)>) -> Result<Self, EngineError> {
        let chat = model.tokenizer.render_chat(messages, false)?;
        Self::run(model, sae, &model.tokenizer.encode_rendered(&chat), variant)
    }

    fn check(&self, feature: u32) -> Result<(), VariantError> {
        if (feature as usize) < self.d_sae {
            Ok(())
        } else {
            Err(VariantError::UnknownFeature {
                feature,
                d_sae: self.d_sae,
            })
        }
    }

    /// The activation of `feature` at every token.
    pub fn vector(&self, feature: u32) -> Result<Vec<f32>, VariantError> {
        self.check(feature)?;
        Ok(self
            .features
            .iter()
            .map(|f| f.iter().find(|(j, _)| *j == feature).map_or(0.0, |&(_, a)| a))
            .collect())
    }

    /// A group's activation at every token: its strongest member's (the steering semantics
    /// of groups).
    pub fn group_vector(&self, group: &[u32]) -> Result<Vec<f32>, VariantError> {
        let vectors = group.iter().map(|&f| self.vector(f)).collect::<Result<Vec<_>, _>>()?;
        Ok((0..self.tokens.len())
            .map(|t| vectors.iter().map(|v| v[t]).fold(0.0, f32::max))
            .collect())
    }

    /// Every feature's aggregate over the tokens, as a dense `d_sae` vector.
    pub fn aggregate(&self, how: Aggregate) -> Vec<f32> {
        let mut out = vec![0f32; self.d_sae];
        for features in &self.features {
            for &(j, a) in features {
                let o = &mut out[j as usize];
                *o = match how {
                    Aggregate::Count => *o + 1.0,
                    Aggregate::Mean | Aggregate::Sum => *o + a,
                    Aggregate::Max => o.max(a),
                };
            }
        }
        if how == Aggregate::Mean && !self.tokens.is_empty() {
            out.iter_mut().for_each(|o| *o /= self.tokens.len() as f32);
        }
        out
    }

    /// The `k` features with the largest aggregate (only features active somewhere), best
    /// first; `within` restricts them to a group.
    pub fn top(&self, k: usize, how: Aggregate, within: Option<&[u32]>) -> Result<Vec<Feature>, VariantError> {
        if let Some(g) = within {
            g.iter().try_for_each(|&f| self.check(f))?;
        }
        let values = self.aggregate(how);
        let mut active: Vec<Feature> = self
            .features
            .iter()
            .flatten()
            .map(|&(j, _)| j)
            .filter(|j| within.is_none_or(|g| g.contains(j)))
            .collect::<std::collections::BTreeSet<u32>>()
            .into_iter()
            .map(|j| (j, values[j as usize]))
            .collect();
        active.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        active.truncate(k);
        Ok(active)
    }

    /// The aggregate of each of `features`, in their order.
    pub fn lookup(&self, features: &[u32], how: Aggregate) -> Result<Vec<Feature>, VariantError> {
        features.iter().try_for_each(|&f| self.check(f))?;
        let values = self.aggregate(how);
        Ok(features.iter().map(|&f| (f, values[f as usize])).collect())
    }

    /// The tokens × latents matrix, dense and row-major (for export).
    pub fn dense(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.tokens.len() * self.d_sae];
        for (t, features) in self.features.iter().enumerate() {
            for &(j, a) in features {
                out[t * self.d_sae + j as usize] = a;
            }
        }
        out
    }

    pub fn d_sae(&self) -> usize {
        self.d_sae
    }
}
