//! AutoSteer and AutoConditional: from a short description ("be funny", "pirates") to
//! edits or a condition, found by project code.
//!
//! AutoSteer searches the atlas for candidate features (with the description's topic, see
//! [`search_phrase`]), then tries each at a few strengths on
//! neutral prompts: greedy continuations are embedded with the atlas's sentence embedder and
//! compared with the description. A candidate's gain is how much closer to the description
//! its continuations get than the base model's; it counts only if the text stays coherent
//! (distinct-token ratio at least 80% of the base's and at least one half: steering too hard
//! makes a model repeat itself). The best candidate is kept, plus the second best when the
//! two together still beat the best alone and stay coherent.

use crate::atlas::Atlas;
use crate::embed::StaticEmbedder;
use crate::sae::Sae;
use crate::steer::{Condition, Edit, Operand, Operator, Steer, Units, Variant};
use crate::tokenizer::TokenId;
use crate::{CancelToken, ChatMessage, EngineError, Model, ResidualHook, SamplingParams};

/// How hard AutoSteer looks.
#[derive(Debug, Clone)]
pub struct AutoSteerOptions {
    /// Features from the atlas search to try.
    pub candidates: usize,
    /// Nudge strengths to try, in steering units.
    pub values: Vec<f32>,
    /// Neutral user prompts the continuations answer.
    pub prompts: Vec<String>,
    /// Tokens generated per continuation.
    pub max_tokens: usize,
    /// Stop trying further candidates after this long and choose among those tried (the
    /// Goodfire SDK waits 60 s for an answer). Ignored in wasm, which has no clock here.
    pub time_budget: Option<std::time::Duration>,
    /// Stops the search at once (its client went away): `auto_steer` answers
    /// `EngineError::Cancelled`.
    pub cancel: CancelToken,
}

impl Default for AutoSteerOptions {
    fn default() -> Self {
        Self {
            candidates: 8,
            values: vec![0.3, 0.6],
            prompts: vec!["Tell me about your day.".into(), "What should I cook tonight?".into()],
            max_tokens: 32,
            time_budget: None,
            cancel: CancelToken::new(),
        }
    }
}

/// One tried candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub edits: Vec<Edit>,
    /// Mean cosine of the continuations to the description, minus the base model's.
    pub gain: f32,
    /// Mean distinct-token ratio of the continuations.
    pub coherence: f32,
    pub accepted: bool,
}

/// What AutoSteer chose, and every trial behind the choice (best first).
#[derive(Debug, Clone, PartialEq)]
pub struct AutoSteer {
    pub edits: Vec<Edit>,
    pub base_similarity: f32,
    pub base_coherence: f32,
    pub trials: Vec<Trial>,
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// What to search the atlas for: the description without its instruction frame ("talk about
/// food" → "food", "talk like a pirate" → "pirate", "be funny" → "funny"). Searched whole, a
/// description finds the features of its frame: every "talk about …" found a feature of the
/// word "talking".
pub fn search_phrase(description: &str) -> &str {
    const FRAMES: [&str; 16] = [
        "talk about ",
        "talk like ",
        "speak about ",
        "speak like ",
        "speak in ",
        "speak ",
        "write about ",
        "write like ",
        "write in ",
        "sound like ",
        "act like ",
        "respond in ",
        "answer in ",
        "be about ",
        "be ",
        "sound ",
    ];
    const ARTICLES: [&str; 3] = ["a ", "an ", "the "];
    let trimmed = description.trim();
    let mut rest = trimmed;
    for frame in FRAMES {
        if rest.len() > frame.len() && rest[..frame.len()].eq_ignore_ascii_case(frame) {
            rest = rest[frame.len()..].trim_start();
            break;
        }
    }
    for article in ARTICLES {
        if rest.len() > article.len() && rest[..article.len()].eq_ignore_ascii_case(article) {
            rest = rest[article.len()..].trim_start();
            break;
        }
    }
    if rest.is_empty() { trimmed } else { rest }
}

/// Wall time since a start (`web_time` reads `performance.now()` in the browser, where
/// `std::time::Instant` panics).
struct Clock(web_time::Instant);

impl Clock {
    fn start() -> Self {
        Clock(web_time::Instant::now())
    }

    fn elapsed(&self) -> std::time::Duration {
        self.0.elapsed()
    }
}

/// Unique tokens / tokens (1.0 for an empty text).
pub fn distinct_ratio(tokens: &[u32]) -> f32 {
    if tokens.is_empty() {
        return 1.0;
    }
    tokens.iter().collect::<std::collections::BTreeSet<_>>().len() as f32 / tokens.len() as f32
}

/// Distinct token bigrams / bigrams (1.0 for fewer than two tokens): repetition lowers it.
pub fn distinct_bigrams(tokens: &[TokenId]) -> f32 {
    if tokens.len() < 2 {
        return 1.0;
    }
    let pairs: std::collections::HashSet<(TokenId, TokenId)> = tokens.windows(2).map(|w| (w[0], w[1])).collect();
    pairs.len() as f32 / (tokens.len() - 1) as f32
}

/// The base model's mean negative log-likelihood per token of `reply` after `prompt`
/// (its perplexity is the exponential).
pub fn reply_nll(model: &Model, prompt: &[TokenId], reply: &[TokenId]) -> Result<f32, EngineError> {
    if reply.is_empty() {
        return Ok(0.0);
    }
    let all: Vec<TokenId> = prompt.iter().chain(reply).copied().collect();
    let mut cache = model.llama.new_cache();
    let logits = model
        .llama
        .forward(&all, &mut cache, None, crate::Logits::All)?
        .expect("Logits::All returns logits");
    let logits = crate::to_host(logits.slice([prompt.len() - 1..all.len() - 1]))?;
    let vocab = logits.len() / reply.len();
    let mut total = 0.0f64;
    for (row, &token) in logits.chunks_exact(vocab).zip(reply) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = row.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() + max as f64;
        total += log_sum - row[token as usize] as f64;
    }
    Ok((total / reply.len() as f64) as f32)
}

/// Greedy replies to each prompt (as a user turn) under `edits`: (text, token ids). AutoSteer
/// judges its trials on these, and its evaluation judges the result the same way.
pub fn greedy_replies(
    model: &Model,
    sae: &Sae,
    units: &Units,
    edits: &[Edit],
    prompts: &[String],
    max_tokens: usize,
    cancel: &CancelToken,
) -> Result<Vec<(String, Vec<TokenId>)>, EngineError> {
    let mut out = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        cancel.check()?;
        let tokens = model.tokenizer.encode_chat(&[ChatMessage::user(prompt.clone())])?;
        let hook: Option<Box<dyn ResidualHook + '_>> = if edits.is_empty() {
            None
        } else {
            let mut v = Variant::new("");
            v.edits = edits.to_vec();
            Some(Box::new(Steer::new(sae, units, v)?))
        };
        let mut stream = model.generate(tokens, SamplingParams::greedy(max_tokens), hook, cancel.clone())?;
        let text = stream.collect_text()?;
        cancel.check()?;
        out.push((text, stream.generated().to_vec()));
    }
    Ok(out)
}

/// Greedy continuations of the prompts under `edits`: (similarity to `target`, coherence).
fn judge(
    model: &Model,
    sae: &Sae,
    units: &Units,
    edits: &[Edit],
    embedder: &StaticEmbedder,
    target: &[f32],
    opts: &AutoSteerOptions,
) -> Result<(f32, f32), EngineError> {
    let (mut similarity, mut coherence) = (0.0, 0.0);
    for (text, tokens) in greedy_replies(model, sae, units, edits, &opts.prompts, opts.max_tokens, &opts.cancel)? {
        similarity += cosine(&embedder.embed(&text), target);
        coherence += distinct_ratio(&tokens);
    }
    let n = opts.prompts.len().max(1) as f32;
    Ok((similarity / n, coherence / n))
}

/// Edits that make the model's replies closer to `description` (see the module docs).
pub fn auto_steer(model: &Model, sae: &Sae, atlas: &Atlas, description: &str, opts: &AutoSteerOptions) -> Result<AutoSteer, EngineError> {
    let units = Units::new(sae, atlas.units());
    let embedder = atlas.embedder();
    let target = embedder.embed(description);
    let (base_similarity, base_coherence) = judge(model, sae, &units, &[], embedder, &target, opts)?;
    let coherent = |c: f32| c >= 0.5 && c >= 0.8 * base_coherence;
    let mut trials = Vec::new();
    let clock = Clock::start();
    for hit in atlas.search(search_phrase(description), opts.candidates) {
        if opts.time_budget.is_some_and(|budget| clock.elapsed() >= budget) {
            break;
        }
        for &value in &opts.values {
            let edits = vec![Edit::nudge(hit.feature, value)];
            let (similarity, coherence) = judge(model, sae, &units, &edits, embedder, &target, opts)?;
            let gain = similarity - base_similarity;
            trials.push(Trial {
                edits,
                gain,
                coherence,
                accepted: coherent(coherence) && gain > 0.0,
            });
        }
    }
    trials.sort_by(|a, b| b.accepted.cmp(&a.accepted).then(b.gain.total_cmp(&a.gain)));
    let mut edits = Vec::new();
    if let Some(best) = trials.first().filter(|t| t.accepted) {
        edits = best.edits.clone();
        // The best trial of another feature, tried together with the best.
        let second = trials
            .iter()
            .find(|t| t.accepted && t.edits[0].feature != best.edits[0].feature)
            .cloned();
        if let Some(second) = second {
            let both: Vec<Edit> = best.edits.iter().chain(&second.edits).copied().collect();
            let (similarity, coherence) = judge(model, sae, &units, &both, embedder, &target, opts)?;
            let gain = similarity - base_similarity;
            let better = coherent(coherence) && gain > best.gain;
            trials.push(Trial {
                edits: both.clone(),
                gain,
                coherence,
                accepted: better,
            });
            if better {
                edits = both;
            }
        }
    }
    trials.sort_by(|a, b| b.accepted.cmp(&a.accepted).then(b.gain.total_cmp(&a.gain)));
    Ok(AutoSteer {
        edits,
        base_similarity,
        base_coherence,
        trials,
    })
}

/// A condition that holds when the text is about `description`: the best-matching features
/// of the atlas (up to `features`, as a group: the strongest member counts) above `threshold`
/// max activations.
pub fn auto_conditional(atlas: &Atlas, description: &str, features: usize, threshold: f32) -> Option<Condition> {
    let group: Vec<u32> = atlas
        .search(search_phrase(description), features.max(1))
        .into_iter()
        .map(|h| h.feature)
        .collect();
    (!group.is_empty()).then(|| Condition::when(group, Operator::Gt, Operand::Number(threshold)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_phrase_drops_the_instruction_frame() {
        assert_eq!(search_phrase("talk about food"), "food");
        assert_eq!(search_phrase("Talk like a pirate"), "pirate");
        assert_eq!(search_phrase("be funny"), "funny");
        assert_eq!(search_phrase("speak French"), "French");
        assert_eq!(search_phrase("pirates"), "pirates");
        assert_eq!(search_phrase("be"), "be", "a frame alone is searched as it is");
        assert_eq!(search_phrase("  sadness "), "sadness");
    }

    #[test]
    fn repetition_lowers_the_distinct_bigrams() {
        assert_eq!(distinct_bigrams(&[]), 1.0);
        assert_eq!(distinct_bigrams(&[1, 2, 3, 4]), 1.0);
        assert_eq!(distinct_bigrams(&[7, 7, 7, 7]), 1.0 / 3.0);
        assert_eq!(distinct_bigrams(&[1, 2, 1, 2, 1, 2]), 0.4);
    }

    #[test]
    fn repetition_lowers_the_distinct_ratio() {
        assert_eq!(distinct_ratio(&[]), 1.0);
        assert_eq!(distinct_ratio(&[1, 2, 3, 4]), 1.0);
        assert_eq!(distinct_ratio(&[7, 7, 7, 7]), 0.25);
        assert_eq!(distinct_ratio(&[1, 2, 1, 2]), 0.5);
    }
}
