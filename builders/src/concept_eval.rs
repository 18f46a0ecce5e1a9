//! `kindling-build concept-eval`: atlas search judged by what latents do, not by their labels.
//!
//! Each query of `tools/atlas/concept-queries.json` comes with probe texts that express its
//! concept; the file also holds neutral texts that express none. Every text is read by the
//! model as a user message (as search by example reads it), and each latent's strongest
//! activation on the message's own tokens is taken, in activation units (1.0 = the latent's
//! typical peak, the atlas's `max_activation`). A latent is **relevant** to a query when
//!
//! * it reaches [`CLEAR`] on at least half of the probes,
//! * it reaches [`QUIET`] on at most [`NEUTRAL_SLIPS`] of the neutral texts, and
//! * its mean over the probes is at least [`LIFT`] times its mean over the neutral texts.
//!
//! That finds every relevant latent of the SAE, so the report gives, per query, how many
//! exist, precision@10 of the atlas search, and the rank of the first relevant latent in the
//! search's full ranking. The thresholds were fixed before any result was looked at.

use std::path::PathBuf;

use kindling_engine::inspect::Inspection;
use kindling_engine::tokenizer::ChatMessage;
use kindling_engine::{Atlas, Model, Sae};
use serde_json::{Value, json};

use crate::BuildError;
use crate::search_eval::Shipped;

/// A clear firing, in activation units.
pub const CLEAR: f32 = 0.3;
/// Firing this much on a neutral text counts against a latent.
pub const QUIET: f32 = 0.15;
/// Neutral texts a relevant latent may fire on (of the file's dozen).
pub const NEUTRAL_SLIPS: usize = 1;
/// How much more a relevant latent fires on the probes than on the neutral texts, on average.
pub const LIFT: f32 = 3.0;

#[derive(clap::Args)]
pub struct ConceptEvalArgs {
    #[command(flatten)]
    pub shipped: Shipped,
    #[arg(long, default_value = "tools/atlas/concept-queries.json")]
    pub queries: PathBuf,
    /// Also write the report as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Each latent's strongest activation (in activation units) on the content of `text` read as
/// a user message: the chat template's own tokens are left out, since every text has them.
pub fn peaks(model: &Model, sae: &Sae, units: &[f32], text: &str) -> Result<Vec<f32>, BuildError> {
    let inspection = Inspection::chat(model, sae, &[ChatMessage::user(text)], None)?;
    let content = model.tokenizer.encode(text, false).len();
    // The conversation ends with the user's content and its closing control token.
    let end = inspection.tokens.len().saturating_sub(1);
    let start = end.saturating_sub(content);
    let mut out = vec![0f32; units.len()];
    for features in &inspection.features[start..end] {
        for &(f, a) in features {
            let a = a / units[f as usize];
            if a > out[f as usize] {
                out[f as usize] = a;
            }
        }
    }
    Ok(out)
}

/// The latents relevant to a query (see the module documentation), from each probe's and
/// each neutral text's [`peaks`].
pub fn relevant(probes: &[Vec<f32>], neutral: &[Vec<f32>]) -> Vec<u32> {
    let d_sae = probes.first().map_or(0, Vec::len);
    let mean = |texts: &[Vec<f32>], f: usize| texts.iter().map(|t| t[f]).sum::<f32>() / texts.len().max(1) as f32;
    (0..d_sae)
        .filter(|&f| {
            let clear = probes.iter().filter(|p| p[f] >= CLEAR).count();
            let slips = neutral.iter().filter(|n| n[f] >= QUIET).count();
            2 * clear >= probes.len() && slips <= NEUTRAL_SLIPS && mean(probes, f) >= LIFT * mean(neutral, f)
        })
        .map(|f| f as u32)
        .collect()
}

fn texts(value: &Value, what: &str) -> Result<Vec<String>, BuildError> {
    let list: Vec<String> = value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect();
    if list.is_empty() {
        return Err(BuildError::Input(format!("{what}: no texts")));
    }
    Ok(list)
}

pub fn run(args: &ConceptEvalArgs) -> Result<(), BuildError> {
    let (model, sae, atlas) = args.shipped.load(false)?;
    let units = atlas.units();
    let spec: Value = serde_json::from_slice(&std::fs::read(&args.queries).map_err(|e| BuildError::io(&args.queries, e))?)
        .map_err(|e| BuildError::Input(format!("{}: {e}", args.queries.display())))?;
    let neutral = texts(&spec["neutral"], "neutral")?
        .iter()
        .map(|t| peaks(&model, &sae, &units, t))
        .collect::<Result<Vec<_>, _>>()?;
    let queries = spec["queries"].as_array().cloned().unwrap_or_default();
    let mut rows = Vec::new();
    println!(
        "{:<26} {:>8} {:>6} {:>11}  first relevant",
        "query", "relevant", "p@10", "first rank"
    );
    for (i, q) in queries.iter().enumerate() {
        let query = q["query"]
            .as_str()
            .ok_or_else(|| BuildError::Input("a query without \"query\"".into()))?;
        let probes = texts(&q["probes"], query)?
            .iter()
            .map(|t| peaks(&model, &sae, &units, t))
            .collect::<Result<Vec<_>, _>>()?;
        let relevant = relevant(&probes, &neutral);
        let row = judge_search(&atlas, query, &relevant, &probes)?;
        println!(
            "{query:<26} {:>8} {:>6.1} {:>11}  {}",
            relevant.len(),
            row["precision_at_10"].as_f64().unwrap_or(0.0),
            row["first_relevant_rank"].as_u64().map_or("-".to_string(), |r| r.to_string()),
            row["first_relevant_label"].as_str().unwrap_or("")
        );
        eprintln!("concept-eval: {}/{} queries", i + 1, queries.len());
        let mut row = row;
        row["kind"] = q["kind"].clone();
        rows.push(row);
    }
    let report = summary(&rows);
    println!(
        "mean precision@10 {:.3} over {} queries with a relevant latent ({} of {}); first relevant in the top 10 for {:.0}% of them",
        report["mean_precision_at_10"].as_f64().unwrap_or(0.0),
        report["queries_with_relevant"],
        report["queries_with_relevant"],
        rows.len(),
        report["share_found_in_top_10"].as_f64().unwrap_or(0.0) * 100.0
    );
    if let Some(out) = &args.out {
        let mut report = report;
        report["queries"] = json!(rows);
        report["judge"] =
            json!({ "clear": CLEAR, "quiet": QUIET, "neutral_slips": NEUTRAL_SLIPS, "lift": LIFT, "neutral_texts": neutral.len() });
        crate::write_atomically(out, (serde_json::to_string_pretty(&report).expect("JSON") + "\n").as_bytes())?;
    }
    Ok(())
}

/// One query's row: how many latents are relevant, precision@10 of the search, the rank of
/// the first relevant latent in the full ranking, and the search's top 10 marked.
fn judge_search(atlas: &Atlas, query: &str, relevant: &[u32], probes: &[Vec<f32>]) -> Result<Value, BuildError> {
    let ranking = atlas.search(query, atlas.d_sae());
    let top: Vec<Value> = ranking
        .iter()
        .take(10)
        .map(|h| {
            let info = atlas.feature(h.feature)?;
            Ok(json!({ "feature": h.feature, "label": info.label, "relevant": relevant.contains(&h.feature) }))
        })
        .collect::<Result<_, kindling_engine::AtlasError>>()?;
    let first = ranking.iter().position(|h| relevant.contains(&h.feature));
    let hits = top.iter().filter(|r| r["relevant"] == true).count();
    // The relevant latents, strongest on the probes first (what a search should find).
    let mut strongest: Vec<(u32, f32)> = relevant
        .iter()
        .map(|&f| (f, probes.iter().map(|p| p[f as usize]).sum::<f32>() / probes.len() as f32))
        .collect();
    strongest.sort_by(|a, b| b.1.total_cmp(&a.1));
    let strongest: Vec<Value> = strongest
        .iter()
        .take(5)
        .map(|&(f, mean)| Ok(json!({ "feature": f, "label": atlas.feature(f)?.label, "probe_mean": mean })))
        .collect::<Result<_, kindling_engine::AtlasError>>()?;
    Ok(json!({
        "query": query,
        "relevant": relevant.len(),
        "precision_at_10": hits as f64 / 10.0,
        "first_relevant_rank": first.map(|r| r + 1),
        "first_relevant_label": first.map(|r| atlas.feature(ranking[r].feature).map(|i| i.label.clone())).transpose()?,
        "top_10": top,
        "strongest_relevant": strongest,
        "relevant_features": relevant,
    }))
}

/// Mean precision@10 and the share of queries whose first relevant latent is in the top 10,
/// over the queries that have a relevant latent at all.
fn summary(rows: &[Value]) -> Value {
    let with: Vec<&Value> = rows.iter().filter(|r| r["relevant"].as_u64().unwrap_or(0) > 0).collect();
    let n = with.len().max(1) as f64;
    let mean = with.iter().filter_map(|r| r["precision_at_10"].as_f64()).sum::<f64>() / n;
    let found = with
        .iter()
        .filter(|r| r["first_relevant_rank"].as_u64().is_some_and(|rank| rank <= 10))
        .count() as f64
        / n;
    json!({
        "queries": rows.len(),
        "queries_with_relevant": with.len(),
        "mean_precision_at_10": mean,
        "share_found_in_top_10": found,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relevant_latent_fires_on_the_probes_and_not_on_neutral_text() {
        // Latent 0 fires on three of four probes and nowhere else; 1 fires everywhere; 2 fires
        // on one probe only; 3 on the probes and on two neutral texts.
        let probes = vec![
            vec![0.8, 0.5, 0.9, 0.6],
            vec![0.5, 0.5, 0.0, 0.6],
            vec![0.4, 0.5, 0.0, 0.6],
            vec![0.0, 0.5, 0.0, 0.6],
        ];
        let neutral = vec![vec![0.0, 0.5, 0.0, 0.2], vec![0.1, 0.5, 0.0, 0.2], vec![0.0, 0.5, 0.0, 0.0]];
        assert_eq!(relevant(&probes, &neutral), [0]);
    }

    #[test]
    fn the_summary_counts_only_queries_with_a_relevant_latent() {
        let rows = [
            json!({ "relevant": 3, "precision_at_10": 0.4, "first_relevant_rank": 2 }),
            json!({ "relevant": 5, "precision_at_10": 0.0, "first_relevant_rank": 57 }),
            json!({ "relevant": 0, "precision_at_10": 0.0, "first_relevant_rank": null }),
        ];
        let s = summary(&rows);
        assert_eq!(s["queries_with_relevant"], 2);
        assert!((s["mean_precision_at_10"].as_f64().unwrap() - 0.2).abs() < 1e-9);
        assert!((s["share_found_in_top_10"].as_f64().unwrap() - 0.5).abs() < 1e-9);
    }
}
