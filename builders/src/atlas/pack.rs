//! Step 6: the atlas files under `public/atlas/` and their manifest.

use std::collections::HashMap;

use kindling_engine::atlas::{ATLAS_VERSION, AtlasIndex, AtlasSae, NO_TOKEN};
use kindling_engine::{FeatureInfo, LabelSource, Model, Sae, TokenId};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::{Value, json};

use super::logits::Effects;
use super::score::Scored;
use super::{Activations, AtlasArgs, LatentStats, WINDOW, context_range};
use crate::{BuildError, sha256_file, write_atomically};

pub const INDEX: &str = "atlas.json";
pub const CONTEXTS: &str = "contexts.safetensors";
pub const EMBEDDER: &str = "embedder.safetensors";
/// Stored contexts per latent: the strongest, then the decile samples.
const STORED: usize = super::TOP + super::SAMPLED;

/// Four significant digits: the index is JSON, and more digits only cost bytes.
fn round4(x: f32) -> f32 {
    if x == 0.0 || !x.is_finite() {
        return 0.0;
    }
    let scale = 10f32.powi(3 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

fn rounded(list: &[(TokenId, f32)]) -> Vec<(TokenId, f32)> {
    list.iter().map(|&(t, v)| (t, round4(v))).collect()
}

/// Label-quality figures of the live latents (`scored` holds one entry per live latent). The
/// fractions are shares of all live latents: one too rare to score counts as not reaching
/// the threshold. The median and mean are over the scored ones.
pub fn label_quality(scored: &[Scored]) -> Value {
    let mut scores: Vec<f32> = scored.iter().filter_map(|s| s.score).collect();
    scores.sort_by(f32::total_cmp);
    let n = scores.len();
    let live = scored.len();
    let at_least = |t: f32| {
        if live == 0 {
            0.0
        } else {
            scores.iter().filter(|&&s| s >= t).count() as f64 / live as f64
        }
    };
    let median = if n == 0 {
        0.0
    } else if n % 2 == 1 {
        scores[n / 2]
    } else {
        (scores[n / 2 - 1] + scores[n / 2]) / 2.0
    };
    let mut histogram = vec![0u32; 10];
    for &s in &scores {
        histogram[((s * 10.0) as usize).min(9)] += 1;
    }
    let by_source = |source: LabelSource| scored.iter().filter(|s| s.source == source && s.score.is_some()).count();
    json!({
        "method": "detection balanced accuracy: label vs 20 held-out activating contexts (activation >= 0.25 of the latent's unit, spread over their ranks, 4-token window) and as many random non-activating ones, all-MiniLM-L6-v2 cosine as judge, top half predicted active",
        "live": live,
        "scored": n,
        "fraction_ge_0_7": at_least(0.7),
        "fraction_ge_0_9": at_least(0.9),
        "median": median,
        "mean": if n == 0 { 0.0 } else { scores.iter().sum::<f32>() / n as f32 },
        "histogram_tenths": histogram,
        "labels_from_model": by_source(LabelSource::Model),
        "labels_from_tokens": by_source(LabelSource::Tokens),
    })
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    args: &AtlasArgs,
    model: &Model,
    sae: &Sae,
    acts: &Activations,
    stats: &[LatentStats],
    effects: &[Effects],
    scored: &[Scored],
) -> Result<(), BuildError> {
    let d_sae = stats.len();
    let features: Vec<FeatureInfo> = (0..d_sae)
        .map(|f| {
            let (s, e, l) = (&stats[f], &effects[f], &scored[f]);
            // A latent left out of a trial run (`--features`) gets its words as its label.
            let label = if s.is_live() && l.label.is_empty() {
                super::labels::token_label(model, acts, s).words_label()
            } else {
                l.label.clone()
            };
            FeatureInfo {
                label,
                label_source: if s.is_live() { l.source } else { LabelSource::Dead },
                label_score: l.score.map(round4),
                max_activation: round4(s.max_activation),
                max_observed: round4(s.max_observed),
                density: round4(s.count as f32 / acts.tokens.max(1) as f32),
                histogram: if s.is_live() { s.histogram.clone() } else { Vec::new() },
                promoted: rounded(&e.promoted),
                suppressed: rounded(&e.suppressed),
                boosted: rounded(&e.boosted),
                top_tokens: s.top_tokens.clone(),
            }
        })
        .collect();
    // The SAELens weights are not committed: hash the export `export-saelens` writes, which
    // depends only on the compact file, so that an SAE loaded from it finds this atlas too.
    let compact = args.sae_dir.join(crate::export::COMPACT);
    let compact_bytes = std::fs::read(&compact).map_err(|e| BuildError::io(&compact, e))?;
    let saelens_weights = kindling_engine::sae::saelens_from_compact(&compact_bytes)?.weights;
    let index = AtlasIndex {
        format: "kindling-atlas".into(),
        version: ATLAS_VERSION,
        sae: AtlasSae {
            layer: sae.config().layer,
            d_sae,
            compact_sha256: sae.sha256().unwrap_or_default().to_string(),
            saelens_sha256: format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&saelens_weights)),
        },
        model_sha256: sha256_file(&args.model_path)?,
        embedder_sha256: sha256_file(&args.embedder)?,
        features,
    };
    let index_json = serde_json::to_string(&index).map_err(|e| BuildError::Input(e.to_string()))?;
    write_atomically(&args.out.join(INDEX), index_json.as_bytes())?;

    // Contexts: strongest first, then one per decile band.
    let mut tokens = vec![NO_TOKEN; d_sae * STORED * WINDOW];
    let mut activations = vec![0u8; d_sae * STORED * WINDOW];
    let mut peaks = vec![0f32; d_sae * STORED];
    for (f, s) in stats.iter().enumerate() {
        for (slot, o) in s.top.iter().chain(&s.sampled).take(STORED).enumerate() {
            let range = context_range(acts, o);
            let values = acts.latent_in(f as u32, o.window as usize, range.clone());
            let peak = values.iter().copied().fold(0f32, f32::max);
            peaks[f * STORED + slot] = peak;
            let at = (f * STORED + slot) * WINDOW;
            for (i, (&t, &v)) in acts.windows[o.window as usize][range].iter().zip(&values).enumerate() {
                tokens[at + i] = t as u16;
                activations[at + i] = (v / peak * 255.0).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    let token_bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    let peak_bytes: Vec<u8> = peaks.iter().flat_map(|p| p.to_le_bytes()).collect();
    let shape = vec![d_sae, STORED, WINDOW];
    let views = [
        (
            "tokens",
            TensorView::new(Dtype::U16, shape.clone(), &token_bytes).expect("shape matches"),
        ),
        (
            "activations",
            TensorView::new(Dtype::U8, shape, &activations).expect("shape matches"),
        ),
        (
            "peaks",
            TensorView::new(Dtype::F32, vec![d_sae, STORED], &peak_bytes).expect("shape matches"),
        ),
    ];
    let meta: HashMap<String, String> = [(
        "kindling_atlas_contexts".to_string(),
        json!({ "version": ATLAS_VERSION, "compact_sha256": index.sae.compact_sha256 }).to_string(),
    )]
    .into();
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| BuildError::Input(format!("serializing contexts: {e}")))?;
    write_atomically(&args.out.join(CONTEXTS), &bytes)?;

    let file_entry = |name: &str| -> Result<Value, BuildError> {
        let path = if name == EMBEDDER {
            args.embedder.clone()
        } else {
            args.out.join(name)
        };
        let size = std::fs::metadata(&path).map_err(|e| BuildError::io(&path, e))?.len();
        Ok(json!({ "file": name, "bytes": size, "sha256": sha256_file(&path)? }))
    };
    let files: Vec<Value> = [INDEX, CONTEXTS, EMBEDDER]
        .iter()
        .map(|f| file_entry(f))
        .collect::<Result<_, _>>()?;
    let total_bytes: u64 = files.iter().filter_map(|f| f["bytes"].as_u64()).sum();
    let live = stats.iter().filter(|s| s.is_live()).count();
    let manifest = json!({
        "format": "kindling-atlas",
        "version": ATLAS_VERSION,
        "sae": index.sae,
        "model_sha256": index.model_sha256,
        "latents": { "total": d_sae, "live": live, "dead": d_sae - live },
        "heldout_tokens": acts.tokens,
        "heldout_windows": acts.windows.len(),
        // A trial run (--features N) labels only the first N latents.
        "label_quality": label_quality(&scored.iter().zip(stats).take(args.features.unwrap_or(d_sae)).filter(|(_, s)| s.is_live()).map(|(l, _)| l.clone()).collect::<Vec<_>>()),
        "activation_unit": "max_activation = 99th percentile of the latent's nonzero activations on held-out tokens (steering values use strength unit 2, docs/STEERING.md)",
        "contexts": { "per_latent": STORED, "window": WINDOW, "before": super::BEFORE, "after": super::AFTER },
        "boosted_tokens": { "amplify": args.amplify, "prompts": 2 },
        "files": files,
        "total_bytes": total_bytes,
        "created_by": args.command,
        "regenerate": { "script": "scripts/build_atlas.sh" },
    });
    write_atomically(
        &args.out.join("manifest.json"),
        (serde_json::to_string_pretty(&manifest).expect("JSON") + "\n").as_bytes(),
    )?;
    eprintln!(
        "[atlas] wrote {} ({} bytes in all); label quality: {}",
        args.out.display(),
        total_bytes,
        manifest["label_quality"]
    );
    Ok(())
}
