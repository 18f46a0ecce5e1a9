//! `kindling-build autosteer-eval`: does steering visibly move the model toward a concept?
//!
//! The protocol (docs/STEERING.md) judges what a reader would see, and never with what
//! AutoSteer selects by:
//! * `tools/autosteer/eval.json` holds the concepts, each with a word list (and, for formats,
//!   regular expressions) written before any run, an embedding description, and the neutral
//!   prompts. AutoSteer is given only the concept's request ("talk about food").
//! * Every setting answers each prompt greedily and at temperature 0.7 with 3 seeds.
//! * Per temperature, pooled over the prompts (and seeds): concept words per 100 words, the
//!   distinct-bigram ratio of the reply's tokens, the base model's perplexity of the reply,
//!   and all-MiniLM-L6-v2 cosine to the description (reported, not judged).
//! * A setting passes a concept when, at temperature 0 and at 0.7 alike, its word rate is at
//!   least 3 × the base model's (the base floored at 0.5 words per 100), its distinct-2 is at
//!   least 0.5, and its perplexity at most 3 × the base model's.
//!
//! Beside AutoSteer it reports a **ceiling**: the best single feature and strength an oracle
//! finds with the word list in hand. Candidates are the latents whose decoder directions
//! promote the concept's words most through the unembedding (logit lens, as z-scores over
//! the vocabulary) plus the atlas's search hits; each is screened at strengths spread as
//! fractions of the residual stream's median norm, on two of the prompts, and the best screen
//! gets the full protocol. A concept that fails AutoSteer but passes its ceiling is a
//! selection failure; one that fails both is a concept this SAE does not steer.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use fancy_regex::Regex;
use kindling_engine::autosteer::{AutoSteerOptions, auto_steer, distinct_bigrams, reply_nll};
use kindling_engine::burn::tensor::{Tensor, TensorData};
use kindling_engine::generate::SteeredRequest;
use kindling_engine::steer::{Edit, SteeringVector, Units, steering_vector};
use kindling_engine::{Atlas, CaptureResidual, ChatMessage, Logits, Model, Sae, SamplingParams, TokenId, to_host};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::BuildError;
use crate::minilm::MiniLm;

#[derive(clap::Args)]
pub struct AutoSteerEvalArgs {
    #[command(flatten)]
    pub shipped: crate::search_eval::Shipped,
    #[arg(long, default_value = "data/models/all-MiniLM-L6-v2")]
    pub minilm: PathBuf,
    #[arg(long, default_value = "tools/autosteer/eval.json")]
    pub spec: PathBuf,
    /// Tokens per reply.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Only the concepts whose request contains this (for a quick look).
    #[arg(long)]
    pub only: Option<String>,
    /// Skip the ceiling search (AutoSteer and the base only).
    #[arg(long)]
    pub no_ceiling: bool,
    /// Also write the report as JSON (after every concept).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep the concepts already in `--out` and do only the others.
    #[arg(long)]
    pub resume: bool,
    /// With `--resume`: run AutoSteer again on the concepts already in `--out` (and on no
    /// others), keeping their ceilings: the ceiling search is most of the evaluation's time.
    /// A kept ceiling screened the earlier AutoSteer's picks among its candidates, not the
    /// new ones'.
    #[arg(long, requires = "resume")]
    pub redo_autosteer: bool,
}

#[derive(Deserialize)]
struct Spec {
    prompts: Vec<String>,
    concepts: Vec<Concept>,
}

#[derive(Deserialize)]
struct Concept {
    request: String,
    kind: String,
    description: String,
    #[serde(default)]
    words: Vec<String>,
    #[serde(default)]
    patterns: Vec<String>,
}

/// Sampling settings of the protocol: greedy, then temperature 0.7 with these seeds.
const SEEDS: [u64; 3] = [11, 22, 33];
const TEMPERATURE: f32 = 0.7;
/// Ceiling screen: candidates, and strengths as fractions of the residual's median norm.
const SCREEN_FROM_LENS: usize = 10;
const SCREEN_FROM_SEARCH: usize = 4;
const SCREEN_FRACTIONS: [f32; 4] = [0.15, 0.25, 0.35, 0.45];
const SCREEN_TOKENS: usize = 40;
/// The screen keeps a margin on the pass rule's coherence bounds: it sees greedy replies only,
/// and sampling at 0.7 raises perplexity and repetition further.
const SCREEN_MIN_DISTINCT: f32 = 0.6;
const SCREEN_MAX_PERPLEXITY: f32 = 2.5;

/// Counts a concept's words (and pattern matches) in text.
struct WordJudge {
    words: HashSet<String>,
    patterns: Vec<Regex>,
}

fn words_of(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\'').to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

impl WordJudge {
    fn new(c: &Concept) -> Result<Self, BuildError> {
        let patterns = c
            .patterns
            .iter()
            .map(|p| Regex::new(p).map_err(|e| BuildError::Input(format!("pattern {p:?}: {e}"))))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            words: c.words.iter().map(|w| w.to_lowercase()).collect(),
            patterns,
        })
    }

    /// (concept hits, words) in `text`.
    fn count(&self, text: &str) -> (usize, usize) {
        let words = words_of(text);
        let mut hits = words.iter().filter(|w| self.words.contains(w.as_str())).count();
        for p in &self.patterns {
            hits += p.find_iter(text).filter(|m| m.is_ok()).count();
        }
        (hits, words.len())
    }
}

/// One reply and the facts the judge needs about it.
#[derive(Clone)]
pub(crate) struct Reply {
    pub prompt: usize,
    pub seed: Option<u64>,
    pub text: String,
    pub tokens: Vec<TokenId>,
    /// Mean negative log-likelihood per token under the base model.
    pub nll: f32,
}

/// What one setting's replies at one temperature scored.
#[derive(Clone, Copy, Default)]
struct Scores {
    rate: f32,
    distinct: f32,
    perplexity: f32,
    similarity: f32,
}

/// Generates and scores replies under steering settings (shared with `steer-calibrate`).
pub(crate) struct Harness<'a> {
    pub model: &'a Model,
    pub sae: &'a Sae,
    pub units: Units,
    /// The similarity judge (`None`: similarities are 0).
    minilm: Option<MiniLm>,
    pub prompts: Vec<Vec<TokenId>>,
    max_tokens: usize,
}

impl<'a> Harness<'a> {
    pub fn new(
        model: &'a Model,
        sae: &'a Sae,
        atlas: &Atlas,
        minilm: Option<&std::path::Path>,
        prompts: Vec<Vec<TokenId>>,
        max_tokens: usize,
    ) -> Result<Self, BuildError> {
        let minilm = match minilm {
            Some(dir) => Some(MiniLm::load(dir, &kindling_engine::Backend::Cpu.device()?)?),
            None => None,
        };
        Ok(Self {
            model,
            sae,
            units: Units::new(sae, atlas.units()),
            minilm,
            prompts,
            max_tokens,
        })
    }

    fn embed(&self, text: &str) -> Result<Vec<f32>, BuildError> {
        match &self.minilm {
            Some(m) => Ok(m.embed(&[text])?.remove(0)),
            None => Ok(Vec::new()),
        }
    }

    /// Generates `runs` (prompt index, seed: None = greedy, steering) in batches, and scores
    /// each reply's perplexity under the base model.
    pub fn replies(&self, runs: &[(usize, Option<u64>, Option<Arc<SteeringVector>>)], max_tokens: usize) -> Result<Vec<Reply>, BuildError> {
        let mut out: Vec<Option<Reply>> = vec![None; runs.len()];
        for temperature in [0.0, TEMPERATURE] {
            let picked: Vec<usize> = (0..runs.len()).filter(|&i| runs[i].1.is_some() == (temperature > 0.0)).collect();
            if picked.is_empty() {
                continue;
            }
            let requests = picked.iter().map(|&i| SteeredRequest {
                prompt: self.prompts[runs[i].0].clone(),
                seed: runs[i].1.unwrap_or(0),
                steering: runs[i].2.clone(),
            });
            let params = SamplingParams {
                temperature,
                max_tokens,
                ..SamplingParams::default()
            };
            self.model.generate_steered(requests, &params, 8, |k, output| {
                let i = picked[k];
                out[i] = Some(Reply {
                    prompt: runs[i].0,
                    seed: runs[i].1,
                    text: output.text,
                    tokens: output.tokens,
                    nll: 0.0,
                });
                Ok(true)
            })?;
        }
        let mut replies: Vec<Reply> = out.into_iter().map(|r| r.expect("every run answers")).collect();
        for r in &mut replies {
            r.nll = reply_nll(self.model, &self.prompts[r.prompt], &r.tokens)?;
        }
        Ok(replies)
    }

    fn score(&self, replies: &[&Reply], judge: &WordJudge, description: &[f32]) -> Result<Scores, BuildError> {
        let (mut hits, mut words, mut distinct, mut nll, mut tokens) = (0, 0, 0.0, 0.0f64, 0usize);
        let mut similarity = 0.0;
        // An empty description skips the similarity judge (the ceiling's screen needs none).
        if let Some(minilm) = self.minilm.as_ref().filter(|_| !description.is_empty()) {
            let texts: Vec<&str> = replies.iter().map(|r| r.text.as_str()).collect();
            let embedded = minilm.embed(&texts)?;
            similarity = embedded
                .iter()
                .map(|v| v.iter().zip(description).map(|(a, b)| a * b).sum::<f32>())
                .sum::<f32>();
        }
        for r in replies {
            let (h, w) = judge.count(&r.text);
            hits += h;
            words += w;
            distinct += distinct_bigrams(&r.tokens);
            nll += r.nll as f64 * r.tokens.len() as f64;
            tokens += r.tokens.len();
        }
        let n = replies.len().max(1) as f32;
        Ok(Scores {
            rate: 100.0 * hits as f32 / words.max(1) as f32,
            distinct: distinct / n,
            perplexity: (nll / tokens.max(1) as f64).exp() as f32,
            similarity: similarity / n,
        })
    }

    /// The full protocol for one setting: (greedy scores, sampled scores, replies).
    fn protocol(
        &self,
        steering: Option<Arc<SteeringVector>>,
        judge: &WordJudge,
        description: &[f32],
    ) -> Result<(Scores, Scores, Vec<Reply>), BuildError> {
        let mut runs = Vec::new();
        for p in 0..self.prompts.len() {
            runs.push((p, None, steering.clone()));
            for seed in SEEDS {
                runs.push((p, Some(seed), steering.clone()));
            }
        }
        let replies = self.replies(&runs, self.max_tokens)?;
        let greedy: Vec<&Reply> = replies.iter().filter(|r| r.seed.is_none()).collect();
        let sampled: Vec<&Reply> = replies.iter().filter(|r| r.seed.is_some()).collect();
        Ok((
            self.score(&greedy, judge, description)?,
            self.score(&sampled, judge, description)?,
            replies,
        ))
    }
}

/// The pass rule of the module docs, for one temperature.
fn passes(steered: &Scores, base: &Scores) -> bool {
    steered.rate >= 3.0 * base.rate.max(0.5) && steered.distinct >= 0.5 && steered.perplexity <= 3.0 * base.perplexity
}

/// The median norm of the residual after the SAE's block over the prompts' tokens (position
/// 0, the attention sink, left out): the scale of the ceiling's strengths.
pub(crate) fn residual_norm(model: &Model, sae: &Sae, prompts: &[Vec<TokenId>]) -> Result<f32, BuildError> {
    let layer = sae.config().layer;
    let mut norms = Vec::new();
    for p in prompts {
        let mut capture = CaptureResidual::new(layer);
        let mut cache = model.llama.new_cache();
        model.llama.forward(p, &mut cache, Some(&mut capture), Logits::None)?;
        let rows = capture.take();
        norms.extend(
            rows.chunks_exact(sae.config().d_in)
                .skip(1)
                .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt()),
        );
    }
    norms.sort_by(f32::total_cmp);
    Ok(norms.get(norms.len() / 2).copied().unwrap_or(1.0))
}

/// Per concept, every latent's logit-lens z-score averaged over the concept's word tokens
/// (each word with a leading space and capitalised, first token each).
fn lens_scores(model: &Model, sae: &Sae, token_sets: &[Vec<TokenId>]) -> Result<Vec<Vec<f32>>, BuildError> {
    let (d_sae, d_in) = (sae.config().d_sae, sae.config().d_in);
    let device = model.llama.device();
    let mut scores = vec![vec![0f32; d_sae]; token_sets.len()];
    const CHUNK: usize = 256;
    for start in (0..d_sae).step_by(CHUNK) {
        let end = (start + CHUNK).min(d_sae);
        let rows: Vec<f32> = (start..end).flat_map(|j| sae.decoder_row(j).iter().copied()).collect();
        let directions = Tensor::from_data(TensorData::new(rows, [end - start, d_in]), device);
        let logits = to_host(model.llama.logit_lens(directions))?;
        let vocab = logits.len() / (end - start);
        for (j, row) in (start..end).zip(logits.chunks_exact(vocab)) {
            let mean = row.iter().sum::<f32>() / vocab as f32;
            let std = (row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / vocab as f32)
                .sqrt()
                .max(1e-6);
            for (set, out) in token_sets.iter().zip(scores.iter_mut()) {
                if !set.is_empty() {
                    out[j] = set.iter().map(|&t| (row[t as usize] - mean) / std).sum::<f32>() / set.len() as f32;
                }
            }
        }
    }
    Ok(scores)
}

fn word_tokens(model: &Model, c: &Concept) -> Vec<TokenId> {
    let mut set = Vec::new();
    let mut texts: Vec<String> = Vec::new();
    for w in &c.words {
        let mut capital = w.chars();
        let capital = capital
            .next()
            .map(|f| f.to_uppercase().collect::<String>() + capital.as_str())
            .unwrap_or_default();
        texts.extend([format!(" {w}"), format!(" {capital}"), capital]);
    }
    // Formats: the characters their patterns match.
    for p in &c.patterns {
        texts.extend(p.chars().filter(|ch| "?!-*•".contains(*ch)).map(String::from));
        if p.contains("\\d") {
            texts.extend(["1".into(), "2".into(), "\n1".into()]);
        }
    }
    for t in texts {
        if let Some(&first) = model.tokenizer.encode(&t, false).first()
            && !set.contains(&first)
        {
            set.push(first);
        }
    }
    set
}

fn describe(edits: &[Edit], atlas: &Atlas) -> Vec<String> {
    edits
        .iter()
        .map(|e| {
            format!(
                "#{}: {} ({:+.2})",
                e.feature,
                atlas.feature(e.feature).map(|f| f.label.as_str()).unwrap_or("?"),
                e.value
            )
        })
        .collect()
}

fn scores_json(s: &Scores) -> Value {
    json!({ "words_per_100": s.rate, "distinct_2": s.distinct, "perplexity": s.perplexity, "similarity": s.similarity })
}

fn replies_json(replies: &[Reply], prompts: &[String]) -> Value {
    replies
        .iter()
        .map(|r| json!({ "prompt": prompts[r.prompt], "seed": r.seed, "text": r.text }))
        .collect()
}

pub fn run(args: &AutoSteerEvalArgs) -> Result<(), BuildError> {
    let text = std::fs::read(&args.spec).map_err(|e| BuildError::io(&args.spec, e))?;
    let spec: Spec = serde_json::from_slice(&text).map_err(|e| BuildError::Input(format!("{}: {e}", args.spec.display())))?;
    let concepts: Vec<&Concept> = spec
        .concepts
        .iter()
        .filter(|c| args.only.as_ref().is_none_or(|o| c.request.contains(o.as_str())))
        .collect();
    if concepts.is_empty() || spec.prompts.is_empty() {
        return Err(BuildError::Input(format!("{}: no concepts or no prompts", args.spec.display())));
    }
    let (model, sae, atlas) = args.shipped.load(false)?;
    let prompts = spec
        .prompts
        .iter()
        .map(|p| model.tokenizer.encode_chat(&[ChatMessage::user(p.clone())]))
        .collect::<Result<Vec<_>, _>>()?;
    let harness = Harness::new(&model, &sae, &atlas, Some(&args.minilm), prompts, args.max_tokens)?;
    let norm = residual_norm(&model, &sae, &harness.prompts)?;
    eprintln!(
        "autosteer-eval: median residual norm after block {} is {norm:.1}",
        sae.config().layer
    );
    let token_sets: Vec<Vec<TokenId>> = concepts.iter().map(|c| word_tokens(&model, c)).collect();
    let lens = if args.no_ceiling {
        Vec::new()
    } else {
        lens_scores(&model, &sae, &token_sets)?
    };
    let judges = concepts.iter().map(|c| WordJudge::new(c)).collect::<Result<Vec<_>, _>>()?;

    // The base model's replies are the same for every concept; only their scores differ.
    let base_runs: Vec<_> = (0..harness.prompts.len())
        .flat_map(|p| std::iter::once((p, None, None)).chain(SEEDS.map(|s| (p, Some(s), None))))
        .collect();
    let base_replies = harness.replies(&base_runs, args.max_tokens)?;
    let greedy_base: Vec<&Reply> = base_replies.iter().filter(|r| r.seed.is_none()).collect();
    let sampled_base: Vec<&Reply> = base_replies.iter().filter(|r| r.seed.is_some()).collect();

    println!(
        "| concept | kind | AutoSteer edits | words/100 t=0 base → steered | t=0.7 | distinct-2 | perplexity × base | pass | ceiling | ceiling pass |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    // A run resumes from its report: concepts already in it are kept, not redone (the whole
    // evaluation takes hours on 2 cores).
    let mut rows: Vec<Value> = match args.out.as_ref().filter(|_| args.resume).and_then(|p| std::fs::read(p).ok()) {
        Some(bytes) => serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|r| r["concepts"].as_array().cloned())
            .unwrap_or_default(),
        None => Vec::new(),
    };
    rows.retain(|r| concepts.iter().any(|c| r["request"] == c.request.as_str()));
    let write = |rows: &[Value]| -> Result<(usize, usize), BuildError> {
        let passed = rows.iter().filter(|r| r["autosteer"]["pass"] == true).count();
        let ceiling_passed = rows.iter().filter(|r| r["ceiling"]["pass"] == true).count();
        let Some(out) = &args.out else {
            return Ok((passed, ceiling_passed));
        };
        let report = json!({
            "protocol": "replies to each neutral prompt greedily and at temperature 0.7 (seeds 11, 22, 33); pass at both: concept words per 100 words >= 3 x max(base, 0.5), distinct-2 >= 0.5, base-model perplexity <= 3 x base",
            "strength_unit": kindling_engine::steer::STRENGTH_UNIT,
            "max_tokens": args.max_tokens, "prompts": spec.prompts, "residual_norm": norm,
            "base_replies": replies_json(&base_replies, &spec.prompts),
            "concepts": rows, "autosteer_passed": passed, "ceiling_passed": ceiling_passed, "total": concepts.len(),
        });
        crate::write_atomically(out, (serde_json::to_string_pretty(&report).expect("JSON") + "\n").as_bytes())?;
        Ok((passed, ceiling_passed))
    };
    let started = std::time::Instant::now();
    for (n, (c, judge)) in concepts.iter().zip(&judges).enumerate() {
        let previous = rows.iter().position(|r| r["request"] == c.request.as_str());
        if previous.is_some() != args.redo_autosteer {
            continue;
        }
        // The ceiling found before, kept when AutoSteer alone is run again.
        let kept_ceiling = previous.map(|i| rows.remove(i)["ceiling"].clone()).filter(|c| !c.is_null());
        let description = harness.embed(&c.description)?;
        let base = (
            harness.score(&greedy_base, judge, &description)?,
            harness.score(&sampled_base, judge, &description)?,
        );
        let auto_started = std::time::Instant::now();
        let found = auto_steer(&model, &sae, &atlas, &c.request, &AutoSteerOptions::default())?;
        let auto_seconds = auto_started.elapsed().as_secs_f32();
        let vector = steering_vector(&sae, &harness.units, &found.edits).map(Arc::new);
        let (greedy, sampled, replies) = harness.protocol(vector, judge, &description)?;
        let pass = !found.edits.is_empty() && passes(&greedy, &base.0) && passes(&sampled, &base.1);

        let ceiling = if args.no_ceiling || kept_ceiling.is_some() {
            None
        } else {
            Some(ceiling(
                &harness,
                &atlas,
                c,
                &lens[n],
                judge,
                &description,
                &base,
                norm,
                &found.edits.iter().map(|e| e.feature).collect::<Vec<_>>(),
            )?)
        };
        let ceiling = match kept_ceiling {
            Some(kept) => kept,
            None => ceiling.map_or(Value::Null, |c| {
                json!({
                    "edits": describe(&c.edits, &atlas), "fraction_of_residual_norm": c.fraction,
                    "t0": scores_json(&c.greedy), "t07": scores_json(&c.sampled), "pass": c.pass,
                    "replies": replies_json(&c.replies, &spec.prompts),
                })
            }),
        };
        let ceiling_pass = ceiling["pass"] == true;
        let edits = describe(&found.edits, &atlas);
        println!(
            "| {} | {} | {} | {:.1} → {:.1} | {:.1} → {:.1} | {:.2} | {:.1} | {} | {} | {} |",
            c.request,
            c.kind,
            if edits.is_empty() { "(none)".into() } else { edits.join("; ") },
            base.0.rate,
            greedy.rate,
            base.1.rate,
            sampled.rate,
            greedy.distinct.min(sampled.distinct),
            (greedy.perplexity / base.0.perplexity).max(sampled.perplexity / base.1.perplexity),
            if pass { "yes" } else { "no" },
            ceiling["edits"]
                .as_array()
                .map(|e| e.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; "))
                .unwrap_or_default(),
            if ceiling_pass { "yes" } else { "no" },
        );
        rows.push(json!({
            "request": c.request, "kind": c.kind, "description": c.description,
            "base": { "t0": scores_json(&base.0), "t07": scores_json(&base.1) },
            "autosteer": {
                "edits": edits, "seconds": auto_seconds,
                "concept_tokens": found.concept_tokens.iter().map(|&t| model.tokenizer.decode(&[t], false).unwrap_or_default()).collect::<Vec<_>>(),
                "examples": found.examples,
                "trials": found.trials.iter().take(12).map(|t| json!({
                    "edits": describe(&t.edits, &atlas), "effect": t.effect, "perplexity_ratio": t.perplexity_ratio,
                    "distinct": t.distinct, "accepted": t.accepted, "sample": t.sample })).collect::<Vec<_>>(),
                "t0": scores_json(&greedy), "t07": scores_json(&sampled), "pass": pass,
                "replies": replies_json(&replies, &spec.prompts),
            },
            "ceiling": ceiling,
        }));
        write(&rows)?;
        eprintln!(
            "autosteer-eval: {}/{} concepts, {:.0} s",
            n + 1,
            concepts.len(),
            started.elapsed().as_secs_f32()
        );
    }
    let (passed, ceiling_passed) = write(&rows)?;
    println!(
        "\nAutoSteer passes {passed} of {} concepts; the ceiling passes {ceiling_passed}.",
        concepts.len()
    );
    Ok(())
}

struct Ceiling {
    edits: Vec<Edit>,
    fraction: f32,
    greedy: Scores,
    sampled: Scores,
    replies: Vec<Reply>,
    pass: bool,
}

/// The oracle's best single feature and strength (module docs).
#[allow(clippy::too_many_arguments)]
fn ceiling(
    harness: &Harness,
    atlas: &Atlas,
    concept: &Concept,
    lens: &[f32],
    judge: &WordJudge,
    description: &[f32],
    base: &(Scores, Scores),
    norm: f32,
    also: &[u32],
) -> Result<Ceiling, BuildError> {
    let mut candidates: Vec<u32> = (0..lens.len() as u32).collect();
    candidates.sort_by(|&a, &b| lens[b as usize].total_cmp(&lens[a as usize]));
    candidates.truncate(SCREEN_FROM_LENS);
    let searched = atlas
        .search(&concept.description, SCREEN_FROM_SEARCH)
        .into_iter()
        .map(|h| h.feature);
    for feature in searched.chain(also.iter().copied()) {
        if !candidates.contains(&feature) {
            candidates.push(feature);
        }
    }
    // A nudge of value v moves the residual by v·u_j·‖W_dec[j]‖ (u_j its steering unit).
    let value = |j: u32, fraction: f32| {
        let row_norm = harness.sae.decoder_row(j as usize).iter().map(|x| x * x).sum::<f32>().sqrt();
        fraction * norm / (harness.units.steering[j as usize] * row_norm).max(f32::MIN_POSITIVE)
    };
    let settings: Vec<(u32, f32)> = candidates.iter().flat_map(|&j| SCREEN_FRACTIONS.map(|f| (j, f))).collect();
    let screen_prompts = 2.min(harness.prompts.len());
    let mut runs = Vec::new();
    for &(j, f) in &settings {
        let vector = steering_vector(harness.sae, &harness.units, &[Edit::nudge(j, value(j, f))]).map(Arc::new);
        for p in 0..screen_prompts {
            runs.push((p, None, vector.clone()));
        }
    }
    let replies = harness.replies(&runs, SCREEN_TOKENS)?;
    // Best screened setting: the highest word rate among the coherent ones.
    let mut best: Option<(f32, u32, f32)> = None;
    for (k, &(j, f)) in settings.iter().enumerate() {
        let group: Vec<&Reply> = replies[k * screen_prompts..(k + 1) * screen_prompts].iter().collect();
        let s = harness.score(&group, judge, &[])?;
        let coherent = s.distinct >= SCREEN_MIN_DISTINCT && s.perplexity <= SCREEN_MAX_PERPLEXITY * base.0.perplexity;
        if coherent && best.is_none_or(|b| s.rate > b.0) {
            best = Some((s.rate, j, f));
        }
    }
    let (_, feature, fraction) = best.unwrap_or((0.0, candidates[0], SCREEN_FRACTIONS[0]));
    let edits = vec![Edit::nudge(feature, value(feature, fraction))];
    let vector = steering_vector(harness.sae, &harness.units, &edits).map(Arc::new);
    let (greedy, sampled, replies) = harness.protocol(vector, judge, description)?;
    let pass = passes(&greedy, &base.0) && passes(&sampled, &base.1);
    Ok(Ceiling {
        edits,
        fraction,
        greedy,
        sampled,
        replies,
        pass,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_counted_per_concept_and_patterns_add_matches() {
        let c = Concept {
            request: "r".into(),
            kind: "topic".into(),
            description: "d".into(),
            words: vec!["food".into(), "c'est".into()],
            patterns: vec!["\\?".into()],
        };
        let judge = WordJudge::new(&c).unwrap();
        assert_eq!(judge.count("Food, food and more FOOD? C'est bon."), (5, 7));
        assert_eq!(judge.count(""), (0, 0));
    }

    #[test]
    fn a_pass_needs_three_times_the_floored_base_rate_coherence_and_fluency() {
        let base = Scores {
            rate: 0.1,
            distinct: 0.9,
            perplexity: 4.0,
            similarity: 0.0,
        };
        let good = Scores {
            rate: 1.5,
            distinct: 0.8,
            perplexity: 11.0,
            similarity: 0.0,
        };
        assert!(passes(&good, &base));
        assert!(!passes(&Scores { rate: 1.4, ..good }, &base), "3 x the floor of 0.5");
        assert!(!passes(&Scores { distinct: 0.4, ..good }, &base));
        assert!(!passes(&Scores { perplexity: 12.5, ..good }, &base));
    }
}
