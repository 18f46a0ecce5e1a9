//! `kindling-build evaluate`: an SAE's quality on the harvest's held-out windows.
//!
//! * FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² over the first `windows` held-out windows (position 0 and control tokens
//!   excluded, as in training), L0 = mean active latents per token, dead fraction = share of
//!   latents that never fire on the held-out tokens.
//! * Language-model loss on the first `ce_windows` held-out windows, next-token cross-entropy
//!   at every position after 0: clean, with the reconstruction spliced in at the SAE's block,
//!   and with that block's output zero-ablated (same positions). CE loss recovered =
//!   (CE_zero − CE_sae) / (CE_zero − CE_clean); KL = mean KL(clean ‖ spliced) per position.
//! * Examples: for a few latents, their strongest held-out contexts (to judge how
//!   interpretable a layer's features look).

use std::path::PathBuf;

use kindling_engine::{CaptureResidual, Logits, Model, Sae, Splice, SpliceMode, TokenId, to_host};
use serde_json::{Value, json};

use crate::BuildError;
use crate::progress::Progress;

pub struct EvalArgs {
    pub model_path: PathBuf,
    pub sae: PathBuf,
    pub harvest: PathBuf,
    /// Held-out windows measured (FVU, L0, dead); the rest stay for the feature atlas.
    pub windows: usize,
    pub ce_windows: usize,
    pub examples: usize,
    pub out: PathBuf,
    pub command: String,
}

/// Cross-entropy of each next token and the log-softmax rows, from `[seq, vocab]` logits.
fn log_softmax_rows(logits: &[f32], vocab: usize) -> Vec<Vec<f32>> {
    logits
        .chunks_exact(vocab)
        .map(|row| {
            let max = row.iter().copied().fold(f32::MIN, f32::max);
            let lse = max + row.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
            row.iter().map(|&l| l - lse).collect()
        })
        .collect()
}

struct Running {
    sse: f64,
    sum: Vec<f64>,
    sum_sq: f64,
    rows: u64,
    active: u64,
    fired: Vec<u64>,
}

pub fn run(args: &EvalArgs) -> Result<(), BuildError> {
    let started = std::time::Instant::now();
    let model = Model::load(&args.model_path, kindling_engine::Backend::Cpu)?;
    let bytes = std::fs::read(&args.sae).map_err(|e| BuildError::io(&args.sae, e))?;
    let sae = Sae::from_compact(&bytes)?;
    sae.check_model(model.llama.config(), None)?;
    let layer = sae.config().layer;
    let d = sae.config().d_in;
    let windows: Vec<(String, Vec<TokenId>)> = crate::harvest::heldout_windows(&args.harvest, Some(args.windows))?
        .into_iter()
        .map(|w| (w.source, w.tokens))
        .collect();
    let vocab = model.llama.config().vocab_size;
    let mut acc = Running {
        sse: 0.0,
        sum: vec![0.0; d],
        sum_sq: 0.0,
        rows: 0,
        active: 0,
        fired: vec![0; sae.config().d_sae],
    };
    let (mut ce_clean, mut ce_sae, mut ce_zero, mut kl_sae, mut kl_zero, mut ce_positions) = (0f64, 0f64, 0f64, 0f64, 0f64, 0u64);
    // The five strongest (activation, window, position) of every latent.
    let mut strongest: Vec<Vec<(f32, usize, usize)>> = vec![Vec::new(); sae.config().d_sae];
    let mut progress = Progress::new("evaluate", "windows", windows.len() as u64, 0);
    for (w, (_, tokens)) in windows.iter().enumerate() {
        let leave: Vec<bool> = tokens
            .iter()
            .enumerate()
            .map(|(p, &t)| p == 0 || model.tokenizer.is_control(t))
            .collect();
        let with_ce = w < args.ce_windows;
        let mut capture = CaptureResidual::new(layer);
        let mut cache = model.llama.new_cache();
        let logits = model.llama.forward(
            tokens,
            &mut cache,
            Some(&mut capture),
            if with_ce { Logits::All } else { Logits::None },
        )?;
        let residual = capture.take();
        // One batched encode per window (a gemm over all its rows), not one per token.
        let encoded = sae.encode(&residual);
        for (p, (x, features)) in residual.chunks_exact(d).zip(&encoded).enumerate() {
            if leave[p] {
                continue;
            }
            let recon = sae.decode(features);
            acc.sse += x.iter().zip(&recon).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
            acc.sum.iter_mut().zip(x).for_each(|(s, &v)| *s += v as f64);
            acc.sum_sq += x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
            acc.rows += 1;
            acc.active += features.len() as u64;
            for &(j, a) in features {
                acc.fired[j as usize] += 1;
                let top = &mut strongest[j as usize];
                if top.len() < 5 || a > top[4].0 {
                    top.push((a, w, p));
                    top.sort_by(|x, y| y.0.total_cmp(&x.0));
                    top.truncate(5);
                }
            }
        }
        if let Some(clean) = logits {
            let clean = log_softmax_rows(&to_host(clean)?, vocab);
            let run_with = |mode| -> Result<Vec<Vec<f32>>, BuildError> {
                let mut splice = Splice::new(&sae, mode).leaving(leave.clone());
                let mut cache = model.llama.new_cache();
                let logits = model
                    .llama
                    .forward(tokens, &mut cache, Some(&mut splice), Logits::All)?
                    .expect("logits");
                Ok(log_softmax_rows(&to_host(logits)?, vocab))
            };
            let spliced = run_with(SpliceMode::Reconstruction)?;
            let zeroed = run_with(SpliceMode::ZeroAblate)?;
            let kl = |p: &[f32], q: &[f32]| p.iter().zip(q).map(|(&lp, &lq)| (lp.exp() * (lp - lq)) as f64).sum::<f64>();
            for p in 1..tokens.len() - 1 {
                if leave[p] {
                    continue;
                }
                let next = tokens[p + 1] as usize;
                ce_clean -= clean[p][next] as f64;
                ce_sae -= spliced[p][next] as f64;
                ce_zero -= zeroed[p][next] as f64;
                kl_sae += kl(&clean[p], &spliced[p]);
                kl_zero += kl(&clean[p], &zeroed[p]);
                ce_positions += 1;
            }
        }
        progress.update(w as u64 + 1, "", false);
    }
    let n = acc.rows as f64;
    let mean_sq: f64 = acc.sum.iter().map(|s| (s / n).powi(2)).sum();
    let total_variance = acc.sum_sq - n * mean_sq;
    let fvu = acc.sse / total_variance;
    let dead = acc.fired.iter().filter(|&&c| c == 0).count() as f64 / acc.fired.len() as f64;
    let cp = ce_positions.max(1) as f64;
    let (ce_clean, ce_sae, ce_zero) = (ce_clean / cp, ce_sae / cp, ce_zero / cp);
    let recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean);
    let context = |w: usize, p: usize| -> String {
        let tokens = &windows[w].1;
        let before = model.tokenizer.decode(&tokens[p.saturating_sub(12)..p], false).unwrap_or_default();
        let at = model.tokenizer.decode(&tokens[p..=p], false).unwrap_or_default();
        let after = model
            .tokenizer
            .decode(&tokens[p + 1..(p + 4).min(tokens.len())], false)
            .unwrap_or_default();
        format!("{before}[[{at}]]{after}").replace('\n', "⏎")
    };
    // Example latents: a seeded random sample of those that fired.
    let mut alive: Vec<usize> = (0..acc.fired.len()).filter(|&j| acc.fired[j] > 0).collect();
    {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        alive.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
    }
    let example_json: Vec<Value> = alive
        .iter()
        .take(args.examples)
        .map(|&latent| {
            let top: Vec<Value> = strongest[latent]
                .iter()
                .map(|&(a, w, p)| json!({ "activation": a, "context": context(w, p) }))
                .collect();
            json!({ "latent": latent, "density": acc.fired[latent] as f64 / n, "top": top })
        })
        .collect();
    let result = json!({
        "sae": args.sae.display().to_string(),
        "layer": layer,
        "metrics": {
            "fvu": fvu,
            "l0": acc.active as f64 / n,
            "dead_fraction": dead,
            "ce_loss_recovered": recovered,
            "kl": kl_sae / cp,
        },
        "details": {
            "heldout_windows": windows.len(),
            "heldout_tokens": acc.rows,
            "ce_windows": args.ce_windows.min(windows.len()),
            "ce_positions": ce_positions,
            "ce_clean": ce_clean,
            "ce_sae": ce_sae,
            "ce_zero_ablated": ce_zero,
            "kl_zero_ablated": kl_zero / cp,
            "explained_variance": 1.0 - fvu,
            "positions": "every position after 0 that is not a control token; CE predicts the next token",
        },
        "examples": example_json,
        "seconds": started.elapsed().as_secs_f64().round(),
        "created_by": args.command,
    });
    let tmp = args.out.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&result).expect("JSON") + "\n").map_err(|e| BuildError::io(&tmp, e))?;
    std::fs::rename(&tmp, &args.out).map_err(|e| BuildError::io(&args.out, e))?;
    eprintln!(
        "[evaluate] layer {layer}: FVU {fvu:.4} · L0 {:.1} · dead {:.1}% · CE clean {ce_clean:.4} / SAE {ce_sae:.4} / zero {ce_zero:.4} · recovered {:.1}% · KL {:.4}",
        acc.active as f64 / n,
        100.0 * dead,
        100.0 * recovered,
        kl_sae / cp
    );
    for e in &example_json {
        eprintln!("  latent {} (density {:.4}):", e["latent"], e["density"].as_f64().unwrap_or(0.0));
        for t in e["top"].as_array().into_iter().flatten().take(3) {
            eprintln!(
                "    {:.2}  {}",
                t["activation"].as_f64().unwrap_or(0.0),
                t["context"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
