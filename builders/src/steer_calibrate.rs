//! `kindling-build steer-calibrate`: where does steering a feature start to act, and where
//! does the text fall apart? The measurements behind the strength unit (docs/STEERING.md).
//!
//! For a seeded random sample of live latents, each is nudged at strengths spread as
//! fractions of the residual stream's median norm (the steering delta's norm over the
//! residual's), and the model answers two neutral prompts greedily. Per setting:
//! * **effect**: the latent's mean activation over the reply's tokens when the reply is read
//!   back by the unsteered model, in units of its 99th-percentile activation, minus the same
//!   for the base model's reply. The reply carries the feature: no labels are involved.
//! * **coherence**: distinct token bigrams, and the base model's perplexity of the reply.
//!
//! * **change**: the share of the reply's token bigrams that the base reply lacks (0: the
//!   same text; greedy decoding turns small nudges into small rewordings first).
//!
//! A feature's **onset** is the smallest strength whose effect reaches [`ONSET_EFFECT`]; its
//! **visible** strength the smallest whose replies change by at least [`VISIBLE_CHANGE`]; its
//! **break** the smallest strength whose reply stops being text (distinct-2 < 0.5 or
//! perplexity > 3 × the base's). The report lists them per feature, with their quantiles.

use std::path::PathBuf;
use std::sync::Arc;

use kindling_engine::steer::{Edit, steering_vector};
use kindling_engine::{CaptureResidual, ChatMessage, Logits, TokenId};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::json;

use crate::BuildError;
use kindling_engine::autosteer::distinct_bigrams;

use crate::autosteer_eval::{Harness, residual_norm};

#[derive(clap::Args)]
pub struct SteerCalibrateArgs {
    #[command(flatten)]
    pub shipped: crate::search_eval::Shipped,
    /// Latents sampled (seeded).
    #[arg(long, default_value_t = 100)]
    pub features: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Check the unit on what its calibration never saw: other prompts, and latents outside
    /// the default sample (seed 7).
    #[arg(long)]
    pub holdout: bool,
    /// Tokens per reply.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Prompts no other measurement uses (AutoSteer's trials and the evaluation have their own).
const PROMPTS: [&str; 2] = ["Write a few sentences about anything you like.", "What did you learn recently?"];
/// `--holdout`'s prompts.
const HOLDOUT_PROMPTS: [&str; 2] = ["Tell me about a place you like.", "How should I spend a rainy afternoon?"];
/// Strengths, as the steering delta's norm over the residual's median norm.
pub const FRACTIONS: [f32; 10] = [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0];
/// The effect (mean activation on the reply, in p99 units, above base) that counts as acting.
pub const ONSET_EFFECT: f32 = 0.1;
/// The share of new bigrams that counts as a visibly different reply.
pub const VISIBLE_CHANGE: f32 = 0.5;

/// The share of `reply`'s token bigrams that `base` lacks.
fn change(reply: &[TokenId], base: &[TokenId]) -> f32 {
    let base: std::collections::HashSet<&[TokenId]> = base.windows(2).collect();
    let n = reply.len().saturating_sub(1);
    if n == 0 {
        return 1.0;
    }
    reply.windows(2).filter(|w| !base.contains(w)).count() as f32 / n as f32
}

pub fn run(args: &SteerCalibrateArgs) -> Result<(), BuildError> {
    let (model, sae, atlas) = args.shipped.load(false)?;
    let texts = if args.holdout { HOLDOUT_PROMPTS } else { PROMPTS };
    let prompts = texts
        .iter()
        .map(|p| model.tokenizer.encode_chat(&[ChatMessage::user(p.to_string())]))
        .collect::<Result<Vec<_>, _>>()?;
    let harness = Harness::new(&model, &sae, &atlas, None, prompts, args.max_tokens)?;
    let norm = residual_norm(&model, &sae, &harness.prompts)?;
    eprintln!("steer-calibrate: median residual norm {norm:.1}");

    let mut live: Vec<u32> = (0..sae.config().d_sae as u32)
        .filter(|&j| atlas.feature(j).is_ok_and(|f| f.is_live()))
        .collect();
    let mut calibration = live.clone();
    calibration.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
    calibration.truncate(args.features);
    live.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(args.seed));
    if args.holdout {
        live.retain(|j| !calibration.contains(j));
    }
    live.truncate(args.features);

    // The base replies, and how much each sampled feature fires on them.
    let base_runs: Vec<_> = (0..harness.prompts.len()).map(|p| (p, None, None)).collect();
    let base = harness.replies(&base_runs, args.max_tokens)?;
    let base_ppl = (base.iter().map(|r| r.nll).sum::<f32>() / base.len() as f32).exp();

    let started = std::time::Instant::now();
    let mut rows = Vec::new();
    let (mut onsets, mut visibles, mut breaks) = (Vec::new(), Vec::new(), Vec::new());
    for (n, &j) in live.iter().enumerate() {
        let (unit, p99) = (harness.units.steering[j as usize], harness.units.activation[j as usize]);
        let row_norm = sae.decoder_row(j as usize).iter().map(|x| x * x).sum::<f32>().sqrt();
        // In steering units; `* unit / p99` gives the value in the old unit (version 1).
        let value = |fraction: f32| fraction * norm / (unit * row_norm).max(f32::MIN_POSITIVE);
        let mut runs = Vec::new();
        for &f in &FRACTIONS {
            let vector = steering_vector(&sae, &harness.units, &[Edit::nudge(j, value(f))]).map(Arc::new);
            runs.extend((0..harness.prompts.len()).map(|p| (p, None, vector.clone())));
        }
        let replies = harness.replies(&runs, args.max_tokens)?;
        let base_effect = base
            .iter()
            .map(|r| feature_on_reply(&harness, j, &harness.prompts[r.prompt], &r.tokens))
            .sum::<Result<f32, _>>()?
            / base.len() as f32;
        let mut settings = Vec::new();
        let (mut onset, mut visible, mut broke) = (None, None, None);
        for (k, &f) in FRACTIONS.iter().enumerate() {
            let group = &replies[k * harness.prompts.len()..(k + 1) * harness.prompts.len()];
            let mut effect = 0.0;
            for r in group {
                effect += feature_on_reply(&harness, j, &harness.prompts[r.prompt], &r.tokens)?;
            }
            let effect = effect / group.len() as f32 - base_effect;
            let distinct = group.iter().map(|r| distinct_bigrams(&r.tokens)).sum::<f32>() / group.len() as f32;
            let ppl = (group.iter().map(|r| r.nll).sum::<f32>() / group.len() as f32).exp();
            let changed = group.iter().map(|r| change(&r.tokens, &base[r.prompt].tokens)).sum::<f32>() / group.len() as f32;
            if visible.is_none() && changed >= VISIBLE_CHANGE {
                visible = Some(f);
            }
            if onset.is_none() && effect >= ONSET_EFFECT {
                onset = Some(f);
            }
            if broke.is_none() && (distinct < 0.5 || ppl > 3.0 * base_ppl) {
                broke = Some(f);
            }
            settings.push(json!({ "fraction": f, "value": value(f), "value_unit_1": value(f) * unit / p99, "effect": effect, "change": changed, "distinct_2": distinct,
                                  "perplexity": ppl, "replies": group.iter().map(|r| r.text.clone()).collect::<Vec<_>>() }));
        }
        onsets.push(onset);
        visibles.push(visible);
        breaks.push(broke);
        rows.push(json!({ "feature": j, "label": atlas.feature(j)?.label, "p99": p99, "onset": onset, "visible": visible, "break": broke, "settings": settings }));
        eprintln!(
            "steer-calibrate: {}/{} features, {:.0} s (#{j}: onset {onset:?}, visible {visible:?}, break {broke:?})",
            n + 1,
            live.len(),
            started.elapsed().as_secs_f32()
        );
    }
    let quantiles = |v: &[Option<f32>]| {
        let mut known: Vec<f32> = v.iter().flatten().copied().collect();
        known.sort_by(f32::total_cmp);
        let q = |p: f32| known.get(((known.len() as f32 - 1.0) * p).round() as usize).copied();
        json!({ "measured": known.len(), "never": v.len() - known.len(), "p10": q(0.1), "median": q(0.5), "p90": q(0.9) })
    };
    let report = json!({
        "about": "steering onset and break per sampled latent, as the steering delta's norm over the residual's median norm (kindling-build steer-calibrate)",
        "residual_norm": norm, "prompts": texts, "holdout": args.holdout,
        "strength_unit": { "version": kindling_engine::steer::STRENGTH_UNIT, "residual_fraction_per_unit": kindling_engine::steer::RESIDUAL_FRACTION_PER_UNIT },
        "fits_the_slider": breaks.iter().filter(|b| b.is_some_and(|b| b <= kindling_engine::steer::RESIDUAL_FRACTION_PER_UNIT + 1e-6)).count(), "fractions": FRACTIONS, "onset_effect": ONSET_EFFECT, "visible_change": VISIBLE_CHANGE,
        "base_replies": base.iter().map(|r| r.text.clone()).collect::<Vec<_>>(), "base_perplexity": base_ppl,
        "onset": quantiles(&onsets), "visible": quantiles(&visibles), "break": quantiles(&breaks), "features": rows,
    });
    println!(
        "onset: {}\nvisible: {}\nbreak: {}",
        report["onset"], report["visible"], report["break"]
    );
    if let Some(out) = &args.out {
        crate::write_atomically(out, (serde_json::to_string_pretty(&report).expect("JSON") + "\n").as_bytes())?;
    }
    Ok(())
}

/// Latent `j`'s mean activation over `reply` read after `prompt` by the unsteered model, in
/// units of its 99th percentile.
fn feature_on_reply(harness: &Harness, j: u32, prompt: &[TokenId], reply: &[TokenId]) -> Result<f32, BuildError> {
    if reply.is_empty() {
        return Ok(0.0);
    }
    let layer = harness.sae.config().layer;
    let all: Vec<TokenId> = prompt.iter().chain(reply).copied().collect();
    let mut capture = CaptureResidual::new(layer);
    let mut cache = harness.model.llama.new_cache();
    harness.model.llama.forward(&all, &mut cache, Some(&mut capture), Logits::None)?;
    let rows = capture.take();
    let d = harness.sae.config().d_in;
    let reply_rows = &rows[prompt.len() * d..];
    let total: f32 = harness
        .sae
        .encode(reply_rows)
        .iter()
        .map(|features| features.iter().find(|(f, _)| *f == j).map_or(0.0, |&(_, a)| a))
        .sum();
    Ok(total / reply.len() as f32 / harness.units.activation[j as usize])
}
