//! Step 5: how well each label picks out its latent's contexts, judged by all-MiniLM-L6-v2.
//!
//! Detection (delphi's scorer, with a sentence embedder as the judge, as in its embedding
//! scorer): a latent's positive contexts (4 tokens around an activation) and as many
//! negatives (random held-out contexts in which it never fires) are ranked by cosine
//! similarity to the label; the top half is predicted "fires". The score is the balanced accuracy of that prediction (0.5 = chance).
//!
//! * Choosing: every candidate (see [`Label::candidates`]) is scored on the contexts its
//!   words came from (the activating stored ones and the labelling sample, see
//!   [`super::LABELLING`]) against as many negatives, by ROC AUC (finer than balanced
//!   accuracy); the best is kept (a tie keeps the earlier, the model's theme first).
//! * Reporting: the kept label is scored on the scoring contexts, activating occurrences
//!   (at least [`super::ACTIVATING_FRACTION`] of the unit) spread over their ranks that the
//!   labeller never saw, against as many other negatives. Latents with fewer than four scoring
//!   contexts get no score.
//!
//! Results go to `scores.jsonl` (one line per latent), so a cut-off run resumes.

use kindling_engine::LabelSource;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::labels::Label;
use super::{Activations, AtlasArgs, Journal, LatentStats, Occurrence, context_text, read_lines};
use crate::BuildError;
use crate::minilm::MiniLm;
use crate::workers::{run_on_workers, shares, single_thread_pools};
use kindling_engine::Model;

const NEGATIVE_POOL: usize = 3000;
/// Contexts for choosing: all stored ones (strongest and decile samples).
const CHOOSE_POSITIVES: usize = super::TOP + super::SAMPLED;
const MIN_SCORED: usize = 4;
const BATCH: usize = 64;
/// The judge reads a short window around the activation (2 tokens before, 1 after): the
/// embedding judge cannot see a highlighted token, so the window is its highlight, and a
/// label about one word is not drowned by the rest of a long context (on the first 60
/// latents of the shipped SAE, 37% scored ≥ 0.7 with this window against 27% with 5 + 2).
/// Negatives are windows of the same size.
const JUDGE_BEFORE: usize = 2;
const JUDGE_AFTER: usize = 1;

fn judge_range(acts: &Activations, o: &Occurrence) -> std::ops::Range<usize> {
    let len = acts.windows[o.window as usize].len();
    let p = o.pos as usize;
    p.saturating_sub(JUDGE_BEFORE)..(p + JUDGE_AFTER + 1).min(len)
}

/// The label kept for one latent and its score.
#[derive(Debug, Clone)]
pub struct Scored {
    pub label: String,
    pub source: LabelSource,
    pub score: Option<f32>,
}

/// Area under the ROC curve of the label's similarity as a detector: the chance that a
/// positive context is closer to the label than a negative one (ties count half). Finer
/// than balanced accuracy on a dozen contexts, so it breaks ties when choosing a label.
pub fn detection_auc(label: &[f32], positives: &[Vec<f32>], negatives: &[Vec<f32>]) -> f32 {
    let sim = |v: &Vec<f32>| v.iter().zip(label).map(|(a, b)| a * b).sum::<f32>();
    let neg: Vec<f32> = negatives.iter().map(sim).collect();
    let mut wins = 0.0;
    for p in positives.iter().map(sim) {
        wins += neg
            .iter()
            .map(|&n| {
                if p > n {
                    1.0
                } else if p == n {
                    0.5
                } else {
                    0.0
                }
            })
            .sum::<f32>();
    }
    wins / (positives.len() * negatives.len()).max(1) as f32
}

/// Balanced accuracy of calling the `positives.len()` contexts most similar to `label`
/// "fires" (all vectors unit length).
pub fn detection_score(label: &[f32], positives: &[Vec<f32>], negatives: &[Vec<f32>]) -> f32 {
    let sim = |v: &Vec<f32>| v.iter().zip(label).map(|(a, b)| a * b).sum::<f32>();
    let mut ranked: Vec<(f32, bool)> = positives
        .iter()
        .map(|v| (sim(v), true))
        .chain(negatives.iter().map(|v| (sim(v), false)))
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (p, n) = (positives.len() as f32, negatives.len() as f32);
    let tp = ranked.iter().take(positives.len()).filter(|r| r.1).count() as f32;
    let fp = p - tp;
    (tp / p + (n - fp) / n) / 2.0
}

fn embed_all(judge: &MiniLm, texts: &[String]) -> Result<Vec<Vec<f32>>, BuildError> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(BATCH) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        out.extend(judge.embed(&refs)?);
    }
    Ok(out)
}

pub fn run(
    args: &AtlasArgs,
    model: &Model,
    acts: &Activations,
    stats: &[LatentStats],
    labels: &[Label],
) -> Result<Vec<Scored>, BuildError> {
    let path = args.work.join("scores.jsonl");
    let mut scored: Vec<Option<Scored>> = vec![None; stats.len()];
    for line in read_lines(&path) {
        if let Some(f) = line["feature"].as_u64().filter(|&f| (f as usize) < stats.len()) {
            let source = if line["source"] == "model" {
                LabelSource::Model
            } else {
                LabelSource::Tokens
            };
            scored[f as usize] = Some(Scored {
                label: line["label"].as_str().unwrap_or_default().to_string(),
                source,
                score: line["score"].as_f64().map(|s| s as f32),
            });
        }
    }
    let n = args.features.unwrap_or(stats.len()).min(stats.len());
    let todo: Vec<usize> = (0..n)
        .filter(|&f| scored[f].is_none() && stats[f].is_live() && !labels[f].candidates().is_empty())
        .collect();
    if !todo.is_empty() {
        let judge = MiniLm::load(&args.minilm, &kindling_engine::Backend::Cpu.device()?)?;
        let text_of = |o: &Occurrence| context_text(model, &acts.windows[o.window as usize][judge_range(acts, o)], None);

        // A pool of random held-out contexts, embedded once.
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x6e67);
        let mut pool: Vec<Occurrence> = acts
            .features
            .iter()
            .enumerate()
            .flat_map(|(w, f)| {
                f.iter().enumerate().filter(|(_, x)| !x.is_empty()).map(move |(p, _)| Occurrence {
                    act: 0.0,
                    window: w as u32,
                    pos: p as u32,
                })
            })
            .collect();
        pool.shuffle(&mut rng);
        pool.truncate(NEGATIVE_POOL);
        eprintln!("[atlas score] embedding {} negative contexts", pool.len());
        let pool_vectors = embed_all(&judge, &pool.iter().map(text_of).collect::<Vec<_>>())?;

        let journal = Journal::open(&path, "atlas score", todo.len() as u64)?;
        let score_one = |f: usize| -> Result<Scored, BuildError> {
            let s = &stats[f];
            let fires_in = |o: &Occurrence| {
                acts.latent_in(f as u32, o.window as usize, judge_range(acts, o))
                    .iter()
                    .any(|&a| a > 0.0)
            };
            let mut order: Vec<usize> = (0..pool.len()).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(args.seed ^ f as u64));
            let clean: Vec<usize> = order
                .into_iter()
                .filter(|&i| !fires_in(&pool[i]))
                .take(CHOOSE_POSITIVES + s.scoring.len() + s.labelling.len())
                .collect();
            // The scoring negatives come second, so that the labelling sample's share, taken
            // last, does not change which negatives the score is measured against.
            let first = CHOOSE_POSITIVES.min(clean.len());
            let scored_end = (first + s.scoring.len()).min(clean.len());
            let score_negatives = &clean[first..scored_end];
            let choose_negatives: Vec<usize> = clean[..first].iter().chain(&clean[scored_end..]).copied().collect();
            let negatives = |idx: &[usize]| idx.iter().map(|&i| pool_vectors[i].clone()).collect::<Vec<_>>();
            let (choose_negatives, score_negatives) = (negatives(&choose_negatives), negatives(score_negatives));

            let choose: Vec<Occurrence> = s.labelling_contexts().copied().collect();
            let mut texts: Vec<String> = choose.iter().chain(&s.scoring).map(text_of).collect();
            let candidates = labels[f].candidates();
            texts.extend(candidates.iter().map(|c| c.0.clone()));
            let vectors = embed_all(&judge, &texts)?;
            let (choose_v, rest) = vectors.split_at(choose.len());
            let (score_v, label_v) = rest.split_at(s.scoring.len());
            let choosing: Vec<f32> = label_v.iter().map(|l| detection_auc(l, choose_v, &choose_negatives)).collect();
            let best = (0..candidates.len())
                .max_by(|&a, &b| choosing[a].total_cmp(&choosing[b]).then(b.cmp(&a)))
                .expect("a candidate");
            let scorable = score_v.len() >= MIN_SCORED;
            let held_back: Option<Vec<f32>> =
                scorable.then(|| label_v.iter().map(|l| detection_score(l, score_v, &score_negatives)).collect());
            let score = held_back.as_ref().map(|h| h[best]);
            let (label, source) = candidates[best].clone();
            journal.record(
                &json!({
                    "feature": f, "label": label, "source": if source == LabelSource::Model { "model" } else { "tokens" },
                    "score": score, "choosing": choosing,
                    // Every candidate's score on the held-back contexts: what the choice loses.
                    "held_back": held_back, "candidates": candidates.iter().map(|c| &c.0).collect::<Vec<_>>(),
                    // The held-back contexts the score is measured on, for auditing.
                    "scored_on": &texts[choose.len()..choose.len() + s.scoring.len()],
                }),
                &format!("#{f}: {label}"),
            )?;
            Ok(Scored { label, source, score })
        };
        // Single-threaded workers side by side, each on every n-th latent (see `workers`).
        let workers = single_thread_pools(args.workers)?;
        let shares = shares(&todo, workers.len());
        let results = run_on_workers(&workers, &(0..workers.len()).collect::<Vec<_>>(), |w| {
            shares[w]
                .iter()
                .map(|&f| Ok((f, score_one(f)?)))
                .collect::<Result<Vec<_>, BuildError>>()
        })?;
        for (f, result) in results.into_iter().flatten() {
            scored[f] = Some(result);
        }
        journal.finish();
    }
    Ok(scored
        .into_iter()
        .zip(stats)
        .map(|(s, st)| {
            s.unwrap_or_else(|| Scored {
                label: if st.is_live() { String::new() } else { "dead latent".into() },
                source: if st.is_live() { LabelSource::Tokens } else { LabelSource::Dead },
                score: None,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_is_balanced_accuracy_of_the_top_half() {
        let label = vec![1.0, 0.0];
        let near = vec![vec![0.9, 0.1], vec![0.8, 0.2]];
        let far = vec![vec![0.1, 0.9], vec![0.0, 1.0]];
        assert_eq!(detection_score(&label, &near, &far), 1.0);
        assert_eq!(detection_score(&label, &far, &near), 0.0);
        // One positive ranked among the negatives: half the positives found, half the negatives.
        let mixed = vec![vec![0.9, 0.1], vec![0.0, 1.0]];
        assert_eq!(detection_score(&label, &mixed, &[vec![0.8, 0.2], vec![0.1, 0.9]]), 0.5);
        // AUC: 0.9 beats both negatives, 0.0 beats neither.
        assert_eq!(detection_auc(&label, &mixed, &[vec![0.8, 0.2], vec![0.1, 0.9]]), 0.5);
        assert_eq!(detection_auc(&label, &near, &far), 1.0);
    }
}
