//! AutoSteer and AutoConditional: from a short description ("be funny", "pirates") to
//! edits or a condition, found by project code.
//!
//! AutoSteer chooses by **measured effect**, not by labels alone:
//! 1. **The concept's tokens**, from two sources. *Meaning*: every spelling of the
//!    vocabulary's whole words nearest to the description's topic in the atlas's static
//!    embedder ([`search_phrase`]; "food" → food, meals, eating, cuisine…). *Examples*: the
//!    model answers the trial prompts plainly and with the request appended ("Tell me about
//!    your day. Answer in French."); the tokens the examples use four times as often as the
//!    plain replies (plus one) join in ("le", "la", "!").
//! 2. **Candidates** from three sources: the latents that separate the examples from the
//!    plain replies (mean activation over their tokens, read by the SAE), the latents whose
//!    decoder direction promotes the concept's tokens most through the logit lens (a z-score
//!    against a sample of the vocabulary, every latent scored), and atlas search.
//! 3. **Trials.** Every candidate is nudged at the middle strength on the trial prompts; the
//!    three most effective are tried at the other strengths (steering units,
//!    [`crate::steer::STRENGTH_UNIT`]), all in batches of fixed steering vectors. A trial's
//!    **effect** is the concept tokens' rate per 100 tokens of its replies minus the plain
//!    replies', plus the static embedder's similarity gain to the description (× 30).
//!    **Coherence**: the base model's perplexity of the replies at most 2.5× that of the
//!    plain replies, and distinct token bigrams at least 0.6.
//! 4. **Choice.** The coherent trial with the largest effect; then the best trial of another
//!    feature is tried together with it, and kept when the pair is coherent and stronger.
//!
//! AutoConditional ([`auto_conditional`]) measures too: the latent that fires on every text
//! the model writes about the description and on no plain one, thresholded between them.
//!
//! The steering evaluation (`kindling-build autosteer-eval`, docs/STEERING.md) judges the
//! result on other prompts, with word lists and a judge that AutoSteer never sees.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::atlas::Atlas;
use crate::generate::SteeredRequest;
use crate::host::to_host;
use crate::inspect::Inspection;
use crate::llama::Logits;
use crate::sae::Sae;
use crate::steer::{Condition, Edit, Operand, Operator, SteeringVector, Units, steering_vector};
use crate::tokenizer::TokenId;
use crate::{CancelToken, ChatMessage, EngineError, Model, SamplingParams};

/// How hard AutoSteer looks.
#[derive(Debug, Clone)]
pub struct AutoSteerOptions {
    /// Candidates from each source (contrast, promoted tokens, search); duplicates merge.
    pub candidates_per_source: usize,
    /// Nudge strengths to try, in steering units: every candidate at the middle one, the
    /// `refine` most effective at all.
    pub values: Vec<f32>,
    pub refine: usize,
    /// Neutral user prompts the trials answer.
    pub prompts: Vec<String>,
    /// Tokens generated per trial reply (the examples and the plain replies get twice as
    /// many; the baseline is measured on the plain replies' first `max_tokens`).
    pub max_tokens: usize,
    /// Stop starting new trials after this long and choose among those done.
    pub time_budget: Option<std::time::Duration>,
    /// Stops the search at once (its client went away): `auto_steer` answers
    /// `EngineError::Cancelled`.
    pub cancel: CancelToken,
    /// Hears each step as it starts (a page shows them while it waits).
    pub on_step: Option<OnStep>,
}

/// The steps of AutoSteer's search.
pub const AUTOSTEER_STEPS: usize = 4;

/// A step of AutoSteer's search as it starts: `step` of [`AUTOSTEER_STEPS`], and what it does.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoSteerStep {
    pub step: usize,
    pub what: String,
}

/// A listener for [`AutoSteerStep`]s, called on the searching thread between steps.
#[derive(Clone)]
pub struct OnStep(pub Arc<dyn Fn(&AutoSteerStep) + Send + Sync>);

impl std::fmt::Debug for OnStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnStep(..)")
    }
}

impl Default for AutoSteerOptions {
    fn default() -> Self {
        Self {
            candidates_per_source: 3,
            values: vec![0.3, 0.45, 0.6],
            refine: 3,
            prompts: vec!["Tell me about your day.".into(), "What should I do this evening?".into()],
            max_tokens: 32,
            time_budget: None,
            cancel: CancelToken::new(),
            on_step: None,
        }
    }
}

/// One tried setting.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub edits: Vec<Edit>,
    /// Concept tokens per 100 tokens above the plain replies, plus 30 × the similarity gain.
    pub effect: f32,
    /// The base model's perplexity of the replies over its perplexity of its own replies.
    pub perplexity_ratio: f32,
    /// Distinct token bigrams of the replies (mean).
    pub distinct: f32,
    /// Coherent and with a positive effect.
    pub accepted: bool,
    /// The first trial prompt's reply: what the setting does, for a person to read.
    pub sample: String,
}

/// Where a candidate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Separates the example replies from the plain ones.
    Contrast,
    /// Its decoder direction promotes the concept's tokens.
    Promotes,
    /// Atlas search on the description.
    Search,
}

/// What AutoSteer chose, and why: every trial (best first) and the concept tokens it counted.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoSteer {
    pub edits: Vec<Edit>,
    pub trials: Vec<Trial>,
    pub candidates: Vec<(u32, Source)>,
    /// The concept's tokens: the meaning tokens, then those the examples use far more than
    /// the plain replies.
    pub concept_tokens: Vec<TokenId>,
    /// The example replies (the trial prompts with the request appended).
    pub examples: Vec<String>,
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

/// Distinct token bigrams / bigrams (1.0 for fewer than two tokens): repetition lowers it.
pub fn distinct_bigrams(tokens: &[TokenId]) -> f32 {
    if tokens.len() < 2 {
        return 1.0;
    }
    let pairs: HashSet<(TokenId, TokenId)> = tokens.windows(2).map(|w| (w[0], w[1])).collect();
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
        .forward(&all, &mut cache, None, Logits::All)?
        .expect("Logits::All returns logits");
    let logits = to_host(logits.slice([prompt.len() - 1..all.len() - 1]))?;
    let vocab = logits.len() / reply.len();
    let mut total = 0.0f64;
    for (row, &token) in logits.chunks_exact(vocab).zip(reply) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = row.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() + max as f64;
        total += log_sum - row[token as usize] as f64;
    }
    Ok((total / reply.len() as f64) as f32)
}

/// Replies to `prompts` (token ids), each under its steering vector, greedy, in batches.
fn replies(
    model: &Model,
    runs: &[(usize, Option<Arc<SteeringVector>>)],
    prompts: &[Vec<TokenId>],
    max_tokens: usize,
    cancel: &CancelToken,
) -> Result<Vec<Vec<TokenId>>, EngineError> {
    let mut out = vec![Vec::new(); runs.len()];
    let requests = runs.iter().map(|(p, steering)| SteeredRequest {
        prompt: prompts[*p].clone(),
        seed: 0,
        steering: steering.clone(),
    });
    model.generate_steered(requests, &SamplingParams::greedy(max_tokens), 8, |i, output| {
        out[i] = output.tokens;
        // Stop taking new sequences once cancelled; the running ones end within their budget.
        Ok(!cancel.is_cancelled())
    })?;
    cancel.check()?;
    Ok(out)
}

/// Facts about a group of replies to the trial prompts.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// Concept tokens per 100 tokens.
    rate: f32,
    similarity: f32,
    nll: f32,
    distinct: f32,
    /// Tokens of the shortest reply.
    shortest: usize,
}

struct Judge<'a> {
    model: &'a Model,
    atlas: &'a Atlas,
    concept: HashSet<TokenId>,
    target: Vec<f32>,
    prompts: &'a [Vec<TokenId>],
}

impl Judge<'_> {
    /// Measures replies; their perplexity (a forward pass each) only when `fluency` is set.
    fn measure(&self, replies: &[(usize, &Vec<TokenId>)], fluency: bool) -> Result<Measured, EngineError> {
        let (mut hits, mut tokens, mut similarity, mut nll, mut distinct) = (0usize, 0usize, 0.0, 0.0f32, 0.0);
        for &(p, reply) in replies {
            hits += reply.iter().filter(|t| self.concept.contains(t)).count();
            tokens += reply.len();
            let text = self.model.tokenizer.decode(reply, true)?;
            similarity += cosine(&self.atlas.embedder().embed(&text), &self.target);
            if fluency {
                nll += reply_nll(self.model, &self.prompts[p], reply)? * reply.len() as f32;
            }
            distinct += distinct_bigrams(reply);
        }
        let n = replies.len().max(1) as f32;
        Ok(Measured {
            rate: 100.0 * hits as f32 / tokens.max(1) as f32,
            similarity: similarity / n,
            nll: nll / tokens.max(1) as f32,
            distinct: distinct / n,
            shortest: replies.iter().map(|(_, r)| r.len()).min().unwrap_or(0),
        })
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Every spelling (" food", "food", " Food") of the `words` whole-word tokens of the
/// vocabulary nearest in meaning to `phrase` (the atlas's static embedder; words of three
/// letters or more). A topic's own vocabulary, known without generating any text.
fn meaning_tokens(model: &Model, atlas: &Atlas, phrase: &str, words: usize) -> Result<Vec<TokenId>, EngineError> {
    let mut spellings: HashMap<String, Vec<TokenId>> = HashMap::new();
    for id in 0..model.llama.config().vocab_size as TokenId {
        let text = model.tokenizer.decode(&[id], false)?;
        let word = text.strip_prefix(' ').unwrap_or(&text);
        if word.len() >= 3 && word.bytes().all(|b| b.is_ascii_alphabetic()) {
            spellings.entry(word.to_ascii_lowercase()).or_default().push(id);
        }
    }
    let target = atlas.embedder().embed(phrase);
    let mut scored: Vec<(f32, &String)> = spellings.keys().map(|w| (cosine(&atlas.embedder().embed(w), &target), w)).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    Ok(scored
        .into_iter()
        .take(words)
        .filter(|(similarity, _)| *similarity >= MEANING_MIN_SIMILARITY)
        .flat_map(|(_, w)| spellings[w].iter().copied())
        .collect())
}

/// Words [`meaning_tokens`] takes at most, and how near in meaning (cosine) to the phrase.
const MEANING_WORDS: usize = 12;
const MEANING_MIN_SIMILARITY: f32 = 0.55;

/// `description` as a sentence: "talk about food" → "Talk about food."
fn instruction(description: &str) -> String {
    let trimmed = description.trim().trim_end_matches('.');
    let mut chars = trimmed.chars();
    match chars.next() {
        Some(first) => format!("{}{}.", first.to_uppercase(), chars.as_str()),
        None => String::new(),
    }
}

/// The tokens `examples` use at least four times as often as `plain` replies (plus one), most
/// frequent first: a language's or a style's own words ("le", "thee"), a format's marks ("!",
/// "1."). The margin keeps out words that differ by chance in so little text ("you", "day");
/// a persona's rarer words ("matey") are lost with them.
fn concept_tokens(examples: &[Vec<TokenId>], plain: &[Vec<TokenId>], limit: usize) -> Vec<TokenId> {
    let count = |replies: &[Vec<TokenId>]| {
        let mut counts: HashMap<TokenId, usize> = HashMap::new();
        replies.iter().flatten().for_each(|&t| *counts.entry(t).or_default() += 1);
        counts
    };
    let (ex, base) = (count(examples), count(plain));
    let mut tokens: Vec<(TokenId, usize)> = ex
        .into_iter()
        .filter(|&(t, n)| n >= 4 * (base.get(&t).copied().unwrap_or(0) + 1))
        .collect();
    tokens.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    tokens.into_iter().take(limit).map(|(t, _)| t).collect()
}

/// Edits that make the model's replies carry `description`, chosen by measured effect (see
/// the module docs).
pub fn auto_steer(model: &Model, sae: &Sae, atlas: &Atlas, description: &str, opts: &AutoSteerOptions) -> Result<AutoSteer, EngineError> {
    let clock = Clock::start();
    let units = Units::new(sae, atlas.units());
    let cancel = &opts.cancel;
    let step = |step: usize, what: String| {
        if let Some(OnStep(hear)) = &opts.on_step {
            hear(&AutoSteerStep { step, what });
        }
    };
    let plain: Vec<Vec<TokenId>> = opts
        .prompts
        .iter()
        .map(|p| model.tokenizer.encode_chat(&[ChatMessage::user(p.clone())]))
        .collect::<Result<_, _>>()?;
    let asked: Vec<Vec<TokenId>> = opts
        .prompts
        .iter()
        .map(|p| {
            // The request itself is the instruction, after the question ("Tell me about your
            // day. Talk about food."): SmolLM2 ignores most system prompts, and a frame such
            // as "In every reply" leaks its own words ("always") into the examples.
            model
                .tokenizer
                .encode_chat(&[ChatMessage::user(format!("{p} {}", instruction(description)))])
        })
        .collect::<Result<_, _>>()?;
    let n = plain.len();
    if n == 0 {
        return Err(EngineError::EmptyInput);
    }

    // 1. Plain replies and examples, in one batch.
    step(1, format!("writing plain replies and examples of “{description}”"));
    let mut prompts = plain.clone();
    prompts.extend(asked.iter().cloned());
    let runs: Vec<(usize, Option<Arc<SteeringVector>>)> = (0..2 * n).map(|p| (p, None)).collect();
    let first = replies(model, &runs, &prompts, 2 * opts.max_tokens, cancel)?;
    let (base_replies, examples) = first.split_at(n);
    // The concept's tokens: words that mean what the description says, and the tokens the
    // examples use far more than the plain replies (a style, a language, a format).
    let mut concept = meaning_tokens(model, atlas, search_phrase(description), MEANING_WORDS)?;
    for token in concept_tokens(examples, base_replies, 12) {
        if !concept.contains(&token) {
            concept.push(token);
        }
    }

    // 2. Candidates.
    let k = opts.candidates_per_source;
    let mut candidates: Vec<(u32, Source)> = Vec::new();
    let add = |f: u32, source: Source, candidates: &mut Vec<(u32, Source)>| {
        if atlas.feature(f).is_ok_and(|i| i.is_live()) && !candidates.iter().any(|c| c.0 == f) {
            candidates.push((f, source));
        }
    };
    for f in contrast_examples(model, sae, &units, &prompts, &first, n, k, cancel)? {
        add(f, Source::Contrast, &mut candidates);
    }
    for f in promoting(model, sae, &concept, k)? {
        add(f, Source::Promotes, &mut candidates);
    }
    for hit in atlas.search(search_phrase(description), k) {
        add(hit.feature, Source::Search, &mut candidates);
    }
    // 3. Trials: the base first, then every candidate at the middle strength, then the best
    //    few at the others.
    let judge = Judge {
        model,
        atlas,
        concept: concept.iter().copied().collect(),
        target: atlas.embedder().embed(description),
        prompts: &plain,
    };
    // The baseline on the plain replies' first `max_tokens` tokens, the trials' length
    // (greedy, so the same text a trial-length run writes): rates and perplexity per token
    // drift along a reply.
    let plain_prefixes: Vec<Vec<TokenId>> = base_replies.iter().map(|r| r[..r.len().min(opts.max_tokens)].to_vec()).collect();
    let base = judge.measure(&plain_prefixes.iter().enumerate().collect::<Vec<_>>(), true)?;
    // Every candidate at the middle strength first; then the most effective few at the
    // others (a feature that does nothing at the middle rarely does at the ends, and the
    // other strengths find where the effect peaks before coherence goes).
    let mut values = opts.values.clone();
    values.sort_by(f32::total_cmp);
    let middle = values.get(values.len() / 2).copied().unwrap_or(0.45);
    let first: Vec<Vec<Edit>> = candidates.iter().map(|&(f, _)| vec![Edit::nudge(f, middle)]).collect();
    step(2, format!("trying {} candidate features at {middle:+.2}", first.len()));
    let mut trials = run_trials(&judge, sae, &units, &first, &plain, &base, opts)?;
    if opts.time_budget.is_none_or(|budget| clock.elapsed() < budget) {
        let mut ranked: Vec<&Trial> = trials.iter().filter(|t| t.effect > 0.0).collect();
        ranked.sort_by(|a, b| b.effect.total_cmp(&a.effect));
        let refine: Vec<Vec<Edit>> = ranked
            .iter()
            .take(opts.refine)
            .flat_map(|t| {
                let feature = t.edits[0].feature;
                values.iter().filter(|&&v| v != middle).map(move |&v| vec![Edit::nudge(feature, v)])
            })
            .collect();
        step(
            3,
            format!("trying the {} most effective at other strengths", ranked.len().min(opts.refine)),
        );
        trials.extend(run_trials(&judge, sae, &units, &refine, &plain, &base, opts)?);
    }
    trials.sort_by(|a, b| b.accepted.cmp(&a.accepted).then(b.effect.total_cmp(&a.effect)));

    // 4. The best, and the best of another feature together with it.
    let mut edits = Vec::new();
    if let Some(best) = trials.first().filter(|t| t.accepted).cloned() {
        edits = best.edits.clone();
        let second = trials
            .iter()
            .find(|t| t.accepted && t.edits[0].feature != best.edits[0].feature)
            .cloned();
        if let Some(second) = second
            && opts.time_budget.is_none_or(|budget| clock.elapsed() < budget)
        {
            step(4, "trying the best two features together".into());
            let both: Vec<Edit> = best.edits.iter().chain(&second.edits).copied().collect();
            let mut pair = run_trials(&judge, sae, &units, std::slice::from_ref(&both), &plain, &base, opts)?;
            let pair = pair.remove(0);
            if pair.accepted && pair.effect > best.effect {
                edits = both;
            }
            trials.push(pair);
            trials.sort_by(|a, b| b.accepted.cmp(&a.accepted).then(b.effect.total_cmp(&a.effect)));
        }
    }
    Ok(AutoSteer {
        edits,
        trials,
        candidates,
        concept_tokens: concept,
        examples: examples.iter().map(|r| model.tokenizer.decode(r, true)).collect::<Result<_, _>>()?,
    })
}

/// Runs each setting on the trial prompts and judges it against the plain replies.
fn run_trials(
    judge: &Judge,
    sae: &Sae,
    units: &Units,
    settings: &[Vec<Edit>],
    prompts: &[Vec<TokenId>],
    base: &Measured,
    opts: &AutoSteerOptions,
) -> Result<Vec<Trial>, EngineError> {
    let n = prompts.len();
    let runs: Vec<(usize, Option<Arc<SteeringVector>>)> = settings
        .iter()
        .flat_map(|edits| {
            let vector = steering_vector(sae, units, edits).map(Arc::new);
            (0..n).map(move |p| (p, vector.clone()))
        })
        .collect();
    let out = replies(judge.model, &runs, prompts, opts.max_tokens, &opts.cancel)?;
    let mut trials = Vec::with_capacity(settings.len());
    for (k, edits) in settings.iter().enumerate() {
        let group: Vec<(usize, &Vec<TokenId>)> = (0..n).map(|p| (p, &out[k * n + p])).collect();
        let m = judge.measure(&group, false)?;
        let effect = (m.rate - base.rate) + SIMILARITY_WEIGHT * (m.similarity - base.similarity);
        // Fluency costs a forward pass per reply: only for settings worth keeping.
        let perplexity_ratio = if effect > 0.0 && m.distinct >= MIN_DISTINCT {
            (judge.measure(&group, true)?.nll - base.nll).exp()
        } else {
            f32::INFINITY
        };
        trials.push(Trial {
            edits: edits.clone(),
            effect,
            perplexity_ratio,
            distinct: m.distinct,
            // A setting that ends a reply at once says nothing, however fluent and distinct.
            accepted: effect > 0.0
                && perplexity_ratio <= MAX_PERPLEXITY_RATIO
                && m.distinct >= MIN_DISTINCT
                && m.shortest >= MIN_REPLY_TOKENS,
            sample: judge.model.tokenizer.decode(&out[k * n], true)?,
        });
    }
    Ok(trials)
}

/// A trial stays coherent below this perplexity ratio to the plain replies and above this
/// share of distinct bigrams (margins on the evaluation's 3× and 0.5: trials are greedy and
/// short, the evaluation also samples).
const MAX_PERPLEXITY_RATIO: f32 = 2.5;
/// Points of effect per unit of similarity gain: a gain of 0.1 (a clear topical shift for the
/// static embedder) weighs as much as 3 concept tokens per 100. Similarity alone is noisy on
/// 32-token replies, so the counted tokens lead.
const SIMILARITY_WEIGHT: f32 = 30.0;
const MIN_DISTINCT: f32 = 0.6;
/// Tokens every reply of an accepted trial has at least.
const MIN_REPLY_TOKENS: usize = 8;

/// The latents whose mean activation (activation units) over the example replies' tokens
/// exceeds that over the plain replies' most: `first` holds the plain replies then the
/// examples, answering `prompts` in the same order.
#[allow(clippy::too_many_arguments)]
fn contrast_examples(
    model: &Model,
    sae: &Sae,
    units: &Units,
    prompts: &[Vec<TokenId>],
    first: &[Vec<TokenId>],
    n: usize,
    k: usize,
    cancel: &CancelToken,
) -> Result<Vec<u32>, EngineError> {
    let d_sae = sae.config().d_sae;
    let mut means = [vec![0f32; d_sae], vec![0f32; d_sae]];
    for (i, reply) in first.iter().enumerate() {
        cancel.check()?;
        if reply.is_empty() {
            continue;
        }
        let tokens: Vec<TokenId> = prompts[i].iter().chain(reply).copied().collect();
        let inspection = Inspection::run_cancellable(model, sae, &tokens, None, cancel)?;
        let side = &mut means[usize::from(i >= n)];
        for features in &inspection.features[prompts[i].len()..] {
            for &(j, a) in features {
                side[j as usize] += a / units.activation[j as usize] / reply.len() as f32;
            }
        }
    }
    let mut order: Vec<u32> = (0..d_sae as u32).filter(|&j| means[1][j as usize] > means[0][j as usize]).collect();
    let gap = |j: u32| means[1][j as usize] - means[0][j as usize];
    order.sort_by(|&a, &b| gap(b).total_cmp(&gap(a)));
    order.truncate(k);
    Ok(order)
}

/// The latents whose decoder direction, read through the logit lens, promotes the concept
/// tokens most: each latent's mean logit over the concept tokens, as a z-score against its
/// logits for a fixed, even sample of the vocabulary (a direction that lifts every token
/// promotes no concept). Every latent is scored, not only the atlas's top `promoted` lists,
/// which miss a concept spread thinly over many words.
fn promoting(model: &Model, sae: &Sae, concept: &[TokenId], k: usize) -> Result<Vec<u32>, EngineError> {
    if concept.is_empty() || k == 0 {
        return Ok(Vec::new());
    }
    let vocab = model.llama.config().vocab_size;
    let reference = (0..LENS_REFERENCE_TOKENS).map(|i| (i * vocab / LENS_REFERENCE_TOKENS) as TokenId);
    let tokens: Vec<TokenId> = concept.iter().copied().chain(reference).collect();
    let d_sae = sae.config().d_sae;
    let rows: Vec<f32> = (0..d_sae).flat_map(|j| sae.decoder_row(j).iter().copied()).collect();
    let logits = model.llama.logit_lens_tokens(&rows, &tokens)?;
    let mut scored: Vec<(u32, f32)> = logits
        .chunks_exact(tokens.len())
        .enumerate()
        .map(|(j, row)| {
            let (wanted, reference) = row.split_at(concept.len());
            let n = reference.len() as f32;
            let mean = reference.iter().sum::<f32>() / n;
            let std = (reference.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n)
                .sqrt()
                .max(1e-6);
            (j as u32, (wanted.iter().sum::<f32>() / wanted.len() as f32 - mean) / std)
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(scored.into_iter().take(k).map(|(j, _)| j).collect())
}

/// Vocabulary tokens that [`promoting`] measures a latent's typical logit on.
const LENS_REFERENCE_TOKENS: usize = 512;

/// What AutoConditional chose, and the activations (activation units, each text's maximum
/// over its tokens) that it chose by.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoConditional {
    /// `feature > threshold`.
    pub condition: Condition,
    pub feature: u32,
    pub threshold: f32,
    /// The feature's maximum on each text about the description, and on each plain one.
    pub on_topic: Vec<f32>,
    pub plain: Vec<f32>,
    /// Whether the feature separates them (else the atlas's best search hit at 0.5 stands in).
    pub separates: bool,
}

/// Texts about the description that AutoConditional measures on (`{}`: its topic phrase).
const CONDITIONAL_PROMPTS: [&str; 3] = ["Tell me about {}.", "Write a few sentences about {}.", "What do you know about {}?"];

/// A condition that holds when the conversation is about `description`, chosen by measured
/// activations: the model writes about the description (three prompts) and answers the plain
/// trial prompts; every latent's maximum over each text's tokens (prompt and reply) is read;
/// the latent whose lowest maximum on the topic's texts clears its highest on the plain ones
/// by the widest margin wins, with the threshold halfway between. A condition fires per
/// token, so it must stay quiet on every plain token and fire somewhere in every topical text.
/// `None`: not even the atlas's search matches the description.
pub fn auto_conditional(
    model: &Model,
    sae: &Sae,
    atlas: &Atlas,
    description: &str,
    cancel: &CancelToken,
) -> Result<Option<AutoConditional>, EngineError> {
    let units = Units::new(sae, atlas.units());
    let phrase = search_phrase(description);
    let chat = |text: String| model.tokenizer.encode_chat(&[ChatMessage::user(text)]);
    let topical: Vec<Vec<TokenId>> = CONDITIONAL_PROMPTS
        .iter()
        .map(|p| chat(p.replace("{}", phrase)))
        .collect::<Result<_, _>>()?;
    let plain: Vec<Vec<TokenId>> = AutoSteerOptions::default()
        .prompts
        .into_iter()
        .map(chat)
        .collect::<Result<_, _>>()?;
    let prompts: Vec<Vec<TokenId>> = topical.iter().chain(&plain).cloned().collect();
    let runs: Vec<(usize, Option<Arc<SteeringVector>>)> = (0..prompts.len()).map(|p| (p, None)).collect();
    let written = replies(model, &runs, &prompts, CONDITIONAL_TOKENS, cancel)?;
    // Per text, every latent's maximum (activation units) over its tokens.
    let mut maxima: Vec<HashMap<u32, f32>> = Vec::with_capacity(prompts.len());
    for (prompt, reply) in prompts.iter().zip(&written) {
        let tokens: Vec<TokenId> = prompt.iter().chain(reply).copied().collect();
        let inspection = Inspection::run_cancellable(model, sae, &tokens, None, cancel)?;
        let mut max: HashMap<u32, f32> = HashMap::new();
        // Position 0 (the attention sink) fires oddly for many latents.
        for &(j, a) in inspection.features.iter().skip(1).flatten() {
            let v = a / units.activation[j as usize];
            let m = max.entry(j).or_insert(0.0);
            *m = m.max(v);
        }
        maxima.push(max);
    }
    let (on, off) = maxima.split_at(topical.len());
    let value = |m: &HashMap<u32, f32>, j: u32| m.get(&j).copied().unwrap_or(0.0);
    let margin = |j: u32| {
        let lowest_on = on.iter().map(|m| value(m, j)).fold(f32::INFINITY, f32::min);
        let highest_off = off.iter().map(|m| value(m, j)).fold(0.0, f32::max);
        (lowest_on - highest_off, lowest_on, highest_off)
    };
    let best = on[0]
        .keys()
        .copied()
        .filter(|&j| atlas.feature(j).is_ok_and(|i| i.is_live()))
        .map(|j| (j, margin(j)))
        .filter(|(_, (gap, ..))| *gap > 0.0)
        .max_by(|a, b| a.1.0.total_cmp(&b.1.0).then(b.0.cmp(&a.0)));
    let (feature, threshold, separates) = match best {
        Some((j, (_, lowest_on, highest_off))) => (j, (lowest_on + highest_off) / 2.0, true),
        None => match atlas.search(phrase, 1).first() {
            Some(hit) => (hit.feature, 0.5, false),
            None => return Ok(None),
        },
    };
    Ok(Some(AutoConditional {
        condition: Condition::when(vec![feature], Operator::Gt, Operand::Number(threshold)),
        feature,
        threshold,
        on_topic: on.iter().map(|m| value(m, feature)).collect(),
        plain: off.iter().map(|m| value(m, feature)).collect(),
        separates,
    }))
}

/// Tokens of each text AutoConditional writes.
const CONDITIONAL_TOKENS: usize = 32;

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
    fn concept_tokens_are_the_ones_examples_use_far_more() {
        let examples = vec![vec![1, 5, 5, 6, 7, 9, 9], vec![5, 6, 6, 8, 5, 9, 9, 9, 9, 9, 9]];
        let plain = vec![vec![1, 6, 7, 7, 9], vec![1, 2]];
        // 5: 4 times, never plain; 9: 8 times vs once (needs 8); 6: 3 times vs once; 8: once.
        assert_eq!(concept_tokens(&examples, &plain, 10), vec![9, 5]);
        assert_eq!(concept_tokens(&examples, &plain, 1), vec![9]);
        assert_eq!(concept_tokens(&examples, &plain, 0), Vec::<u32>::new());
    }
}
