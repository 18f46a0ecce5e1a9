//! Next-token logits with a variant applied: what the steered model would say next.

use crate::sae::Sae;
use crate::steer::{Steer, Units, Variant};
use crate::tokenizer::TokenId;
use crate::{EngineError, Logits, Model, to_host};

/// One candidate next token.
#[derive(Debug, Clone, PartialEq)]
pub struct NextToken {
    pub id: TokenId,
    pub text: String,
    pub logit: f32,
    /// Softmax over the whole vocabulary (not just the candidates shown).
    pub probability: f32,
}

/// The `k` most likely next tokens after `tokens`, under `variant` (its values in `units`)
/// when given; `only` restricts the candidates to a vocabulary subset (an id outside
/// the vocabulary is an error).
pub fn next_tokens(
    model: &Model,
    sae: &Sae,
    tokens: &[TokenId],
    variant: Option<(&Variant, &Units)>,
    k: usize,
    only: Option<&[TokenId]>,
) -> Result<Vec<NextToken>, EngineError> {
    let vocab = model.llama.config().vocab_size;
    if let Some(&bad) = only.and_then(|ids| ids.iter().find(|&&t| t as usize >= vocab)) {
        return Err(EngineError::BadToken(bad));
    }
    let mut cache = model.llama.new_cache();
    let logits = match variant {
        Some((v, units)) => {
            let mut steer = Steer::new(sae, units, v.clone())?;
            model.llama.forward(tokens, &mut cache, Some(&mut steer), Logits::Last)?
        }
        None => model.llama.forward(tokens, &mut cache, None, Logits::Last)?,
    };
    let logits = to_host(logits.expect("Logits::Last returns logits"))?;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let mut candidates: Vec<TokenId> = match only {
        Some(ids) => ids.to_vec(),
        None => (0..vocab as TokenId).collect(),
    };
    candidates.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    candidates.dedup();
    candidates.truncate(k);
    candidates
        .into_iter()
        .map(|id| {
            let logit = logits[id as usize];
            let text = model.tokenizer.decode(&[id], false)?;
            Ok(NextToken {
                id,
                text,
                logit,
                probability: (logit - max).exp() / total,
            })
        })
        .collect()
}
