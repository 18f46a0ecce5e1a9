//! Choosing the next token from logits: penalties, temperature, top-k, top-p, seeded RNG.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::tokenizer::TokenId;

/// Tokens whose tempered logit is this far below the best have probability below e⁻³⁰ ≈
/// 10⁻¹³ relative to it, and are left out of sampling.
const NEGLIGIBLE: f32 = 30.0;

/// How to pick tokens. `temperature == 0` means greedy (argmax).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None` or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` (`None` or ≥ 1: all).
    pub top_p: Option<f32>,
    /// Subtracted from a token's logit once per time it was already generated.
    pub frequency_penalty: f32,
    /// Subtracted from a token's logit if it was generated at all.
    pub presence_penalty: f32,
    /// The RNG seed: the same seed, prompt and parameters give the same text.
    pub seed: u64,
    /// Stop after this many generated tokens.
    pub max_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            max_tokens: 256,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            ..Self::default()
        }
    }
}

/// Samples tokens one after another, remembering what it generated for the penalties.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    counts: HashMap<TokenId, u32>,
}

impl Sampler {
    /// A sampler seeded with `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            params,
            counts: HashMap::new(),
        }
    }

    /// The parameters in use.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token from `logits` (modified in place by the penalties) and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> TokenId {
        for (&token, &count) in &self.counts {
            if let Some(l) = logits.get_mut(token as usize) {
                *l -= self.params.frequency_penalty * count as f32 + self.params.presence_penalty;
            }
        }
        let token = if self.params.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        *self.counts.entry(token).or_insert(0) += 1;
        token
    }

    fn sample_random(&mut self, logits: &[f32]) -> TokenId {
        // Only tokens within NEGLIGIBLE of the best logit (after temperature) can be drawn in
        // practice; keeping just those avoids sorting the whole vocabulary every token.
        let best = logits[argmax(logits) as usize];
        let floor = best - NEGLIGIBLE * self.params.temperature;
        let mut candidates: Vec<(TokenId, f32)> = logits
            .iter()
            .enumerate()
            .filter(|&(_, &l)| l.is_finite() && l >= floor)
            .map(|(i, &l)| (i as TokenId, l))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = self.params.top_k.filter(|&k| k > 0) {
            candidates.truncate(k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates
            .iter()
            .map(|&(_, l)| ((l - max) / self.params.temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(p) = self.params.top_p.filter(|&p| p < 1.0) {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    cumulative += q;
                    cumulative >= p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return candidates[i].0;
            }
        }
        candidates[probs.len() - 1].0
    }
}

/// The index of the largest logit (the lowest index among ties).
pub fn argmax(logits: &[f32]) -> TokenId {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as TokenId
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax_and_penalties_apply() {
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 2.0,
            ..SamplingParams::greedy(10)
        });
        assert_eq!(s.sample(&mut [0.0, 3.0, 2.0]), 1);
        // Token 1 now pays 2.0: 1.0 < 2.0.
        assert_eq!(s.sample(&mut [0.0, 3.0, 2.0]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let logits = [0.5, 1.0, 0.9, 0.1];
        let params = SamplingParams {
            temperature: 1.0,
            top_k: Some(1),
            ..SamplingParams::default()
        };
        assert_eq!(Sampler::new(params).sample(&mut logits.clone()), 1);
        let params = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..SamplingParams::default()
        };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..50).map(|_| s.sample(&mut logits.clone())).collect::<Vec<_>>()
        };
        assert_eq!(run(&params), run(&params));
        assert_ne!(
            run(&params),
            run(&SamplingParams {
                seed: 43,
                ..params.clone()
            })
        );
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // p(token 0) ≈ 0.9999: with top_p 0.5 only token 0 can be drawn.
        let params = SamplingParams {
            temperature: 1.0,
            top_p: Some(0.5),
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params);
        for _ in 0..100 {
            assert_eq!(s.sample(&mut [10.0, 0.0, 0.0]), 0);
        }
    }
}
