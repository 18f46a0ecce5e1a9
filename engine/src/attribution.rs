//! Logit attribution: which features, ablated where a token is predicted, lower its logit most.

use crate::inspect::Inspection;
use crate::sae::Sae;
use crate::steer::{Edit, Mode, Steer, Units, Variant};
use crate::tokenizer::TokenId;
use crate::{CancelBetweenBlocks, CancelToken, EngineError, Logits, Model, ResidualHook, to_host};

/// One feature's share in predicting a token.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribution {
    pub feature: u32,
    /// How much the token's logit drops when the feature is ablated.
    pub drop: f32,
    /// Where in the context the feature is active, with its activation in activation units.
    pub active: Vec<(usize, f32)>,
}

/// The features whose ablation (× 0, from the SAE's block on) at the position that predicts
/// `target` after `context` lowers `target`'s logit, among the `candidates` strongest
/// features at that position; largest drop first. The context before the predicting
/// position is run once and its KV cache shared, so each candidate costs one token's pass.
pub fn logit_attribution(
    model: &Model,
    sae: &Sae,
    units: &Units,
    context: &[TokenId],
    target: TokenId,
    candidates: usize,
    cancel: &CancelToken,
) -> Result<Vec<Attribution>, EngineError> {
    let Some(last) = context.len().checked_sub(1).filter(|&l| l > 0) else {
        return Err(EngineError::EmptyInput);
    };
    let mut before = model.llama.new_cache();
    let mut cancellable = CancelBetweenBlocks(cancel.clone());
    model
        .llama
        .forward(&context[..last], &mut before, Some(&mut cancellable), Logits::Last)?;
    let logit_of = |variant: Option<&Variant>| -> Result<f32, EngineError> {
        cancel.check()?;
        let mut cache = before.clone();
        let mut steer = variant.map(|v| Steer::new(sae, units, v.clone())).transpose()?;
        let hook = steer.as_mut().map(|s| s as &mut dyn ResidualHook);
        let logits = model
            .llama
            .forward(&context[last..], &mut cache, hook, Logits::Last)?
            .expect("Logits::Last returns logits");
        Ok(to_host(logits)?[target as usize])
    };
    let base = logit_of(None)?;
    let inspection = Inspection::run_cancellable(model, sae, context, None, cancel)?;
    let mut at_last: Vec<(u32, f32)> = inspection.features[last]
        .iter()
        .map(|&(f, a)| (f, a / units.activation[f as usize]))
        .collect();
    at_last.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut found = Vec::new();
    for &(feature, _) in at_last.iter().take(candidates) {
        let mut ablated = Variant::new("attribution");
        ablated.edits.push(Edit {
            feature,
            mode: Mode::Mul,
            value: 0.0,
        });
        let drop = base - logit_of(Some(&ablated))?;
        if drop > 0.0 {
            let unit = units.activation[feature as usize];
            let active = inspection
                .vector(feature)?
                .iter()
                .enumerate()
                .filter(|(_, a)| **a > 0.0)
                .map(|(i, a)| (i, a / unit))
                .collect();
            found.push(Attribution { feature, drop, active });
        }
    }
    found.sort_by(|a, b| b.drop.total_cmp(&a.drop));
    Ok(found)
}
