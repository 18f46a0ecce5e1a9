//! `kindling-build search-eval`: precision@10 of atlas search on a fixed query set.
//!
//! The queries (`tools/atlas/search-queries.json`) each list related words; a result is
//! relevant when enough of its stored top contexts have a related word within a few tokens
//! of the activation. The judgement reads only the contexts, never the label, so a label
//! that sounds right but sits on an unrelated feature counts as a miss.

use std::path::{Path, PathBuf};

use kindling_engine::{Atlas, Model, Sae, TokenId};
use serde_json::{Value, json};

use crate::BuildError;

/// The shipped model, SAE and atlas, as the evaluation commands read them.
#[derive(clap::Args, Clone)]
pub struct Shipped {
    /// Set from the global --model.
    #[arg(skip)]
    pub model_path: PathBuf,
    #[arg(long, default_value = "public/sae")]
    pub sae_dir: PathBuf,
    #[arg(long, default_value = "public/atlas")]
    pub atlas_dir: PathBuf,
}

impl Shipped {
    /// Loads the model, the SAE and its atlas (with the contexts when `contexts`).
    pub fn load(&self, contexts: bool) -> Result<(Model, Sae, Atlas), BuildError> {
        let model = Model::load(&self.model_path, kindling_engine::Backend::Cpu)?;
        let sae = Sae::from_compact(&read(&self.sae_dir.join("kindling-sae.f16.safetensors"))?)?;
        let atlas = Atlas::load_dir(&self.atlas_dir, &sae, contexts)?;
        Ok((model, sae, atlas))
    }
}

#[derive(clap::Args)]
pub struct SearchEvalArgs {
    #[command(flatten)]
    pub shipped: Shipped,
    #[arg(long, default_value = "tools/atlas/search-queries.json")]
    pub queries: PathBuf,
    /// Also write the report as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// How a result is judged (from the query file).
pub struct Judge {
    pub min_contexts: usize,
    pub near: usize,
}

fn read(path: &Path) -> Result<Vec<u8>, BuildError> {
    std::fs::read(path).map_err(|e| BuildError::io(path, e))
}

/// Whether `feature`'s strongest contexts mention one of `related` near the activation.
pub fn is_relevant(model: &Model, atlas: &Atlas, feature: u32, related: &[String], judge: &Judge) -> Result<bool, BuildError> {
    let contexts = atlas.contexts(feature)?;
    let mentions = contexts
        .iter()
        .take(10)
        .filter(|c| {
            let peak = (0..c.activations.len())
                .max_by(|&a, &b| c.activations[a].total_cmp(&c.activations[b]))
                .unwrap_or(0);
            let around: Vec<TokenId> = c.tokens[peak.saturating_sub(judge.near)..(peak + judge.near + 1).min(c.tokens.len())].to_vec();
            let text = model.tokenizer.decode(&around, true).unwrap_or_default().to_lowercase();
            let words: Vec<&str> = text.split(|ch: char| !ch.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
            related.iter().any(|r| {
                if r.chars().all(char::is_alphanumeric) {
                    words.iter().any(|w| w.starts_with(r.as_str()))
                } else {
                    text.contains(r.as_str())
                }
            })
        })
        .count();
    Ok(mentions >= judge.min_contexts)
}

pub fn run(args: &SearchEvalArgs) -> Result<(), BuildError> {
    let (model, _, atlas) = args.shipped.load(true)?;
    let spec: Value =
        serde_json::from_slice(&read(&args.queries)?).map_err(|e| BuildError::Input(format!("{}: {e}", args.queries.display())))?;
    let judge = Judge {
        min_contexts: spec["min_contexts"].as_u64().unwrap_or(3) as usize,
        near: spec["near"].as_u64().unwrap_or(2) as usize,
    };
    let mut rows = Vec::new();
    println!("{:<22} {:>6}  top results", "query", "p@10");
    for q in spec["queries"].as_array().into_iter().flatten() {
        let query = q["query"]
            .as_str()
            .ok_or_else(|| BuildError::Input("a query without \"query\"".into()))?;
        let related: Vec<String> = q["related"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w.as_str().map(str::to_lowercase))
            .collect();
        let started = std::time::Instant::now();
        let hits = atlas.search(query, 10);
        let search_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut results = Vec::new();
        for h in &hits {
            let relevant = is_relevant(&model, &atlas, h.feature, &related, &judge)?;
            results.push(json!({ "feature": h.feature, "label": atlas.feature(h.feature)?.label, "score": h.score, "relevant": relevant }));
        }
        let precision = results.iter().filter(|r| r["relevant"] == true).count() as f64 / 10.0;
        let shown: Vec<String> = results
            .iter()
            .take(3)
            .map(|r| format!("#{} {}", r["feature"], r["label"].as_str().unwrap_or("")))
            .collect();
        println!("{query:<22} {precision:>6.1}  {}", shown.join(" | "));
        rows.push(
            json!({ "query": query, "seed": q["seed"] == true, "precision_at_10": precision, "search_ms": search_ms, "results": results }),
        );
    }
    let mean = rows.iter().filter_map(|r| r["precision_at_10"].as_f64()).sum::<f64>() / rows.len().max(1) as f64;
    let seeds_found = rows
        .iter()
        .filter(|r| r["seed"] == true)
        .all(|r| r["precision_at_10"].as_f64().unwrap_or(0.0) > 0.0);
    println!("mean precision@10 {mean:.2}; every seed query finds a related feature: {seeds_found}");
    if let Some(out) = &args.out {
        let report = json!({ "queries": rows, "mean_precision_at_10": mean, "seeds_found": seeds_found, "judge": { "min_contexts": judge.min_contexts, "near": judge.near } });
        crate::write_atomically(out, (serde_json::to_string_pretty(&report).expect("JSON") + "\n").as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed queries find a related feature in the top 10 of the shipped atlas, judged by
    /// its contexts as `search-eval` judges them.
    #[test]
    fn seed_queries_find_related_features_in_the_shipped_atlas() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let shipped = Shipped {
            model_path: root.join("public/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            sae_dir: root.join("public/sae"),
            atlas_dir: root.join("public/atlas"),
        };
        let (model, _, atlas) = shipped.load(true).unwrap();
        let spec: Value = serde_json::from_slice(&read(&root.join("tools/atlas/search-queries.json")).unwrap()).unwrap();
        let judge = Judge {
            min_contexts: spec["min_contexts"].as_u64().unwrap() as usize,
            near: spec["near"].as_u64().unwrap() as usize,
        };
        let seeds: Vec<&Value> = spec["queries"].as_array().unwrap().iter().filter(|q| q["seed"] == true).collect();
        assert_eq!(seeds.len(), 3);
        for q in seeds {
            let related: Vec<String> = q["related"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w.as_str().unwrap().to_lowercase())
                .collect();
            let found = atlas
                .search(q["query"].as_str().unwrap(), 10)
                .iter()
                .filter(|h| is_relevant(&model, &atlas, h.feature, &related, &judge).unwrap())
                .count();
            assert!(found >= 1, "{}: no related feature in the top 10", q["query"]);
        }
    }
}
