//! `kindling-build autosteer-eval`: does AutoSteer move the model toward a description?
//!
//! For each concept of `tools/autosteer/concepts.json`, AutoSteer (the engine's, exactly as
//! the server runs it) picks edits; then the base model and the steered model answer a set
//! of neutral prompts that AutoSteer never saw, greedily. A judge other than the one
//! AutoSteer optimises against scores the answers: all-MiniLM-L6-v2 (the full transformer,
//! where AutoSteer uses the static embedder distilled from it) gives each answer's cosine to
//! the description, and the distinct-token ratio and longest repeated run measure coherence.
//! The report is a table of base vs steered per concept, and the share of concepts whose
//! answers moved toward the description while staying coherent.

use std::path::PathBuf;

use kindling_engine::autosteer::{AutoSteerOptions, auto_steer, distinct_ratio, greedy_replies};
use kindling_engine::steer::Edit;
use kindling_engine::{Model, Sae};
use serde_json::{Value, json};

use crate::BuildError;
use crate::minilm::MiniLm;

#[derive(clap::Args)]
pub struct AutoSteerEvalArgs {
    #[command(flatten)]
    pub shipped: crate::search_eval::Shipped,
    #[arg(long, default_value = "data/models/all-MiniLM-L6-v2")]
    pub minilm: PathBuf,
    #[arg(long, default_value = "tools/autosteer/concepts.json")]
    pub concepts: PathBuf,
    /// Tokens per answer.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    /// Also write the report as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// How one set of answers scored.
struct Scores {
    similarity: f32,
    distinct: f32,
    /// The longest run of one token repeated back to back, over the answers.
    longest_run: usize,
    texts: Vec<String>,
}

fn longest_run(tokens: &[u32]) -> usize {
    let mut best = 0;
    let mut run = 0;
    for (i, t) in tokens.iter().enumerate() {
        run = if i > 0 && tokens[i - 1] == *t { run + 1 } else { 1 };
        best = best.max(run);
    }
    best
}

fn answer(
    model: &Model,
    sae: &Sae,
    units: &[f32],
    edits: &[Edit],
    prompts: &[String],
    judge: &MiniLm,
    target: &[f32],
    max_tokens: usize,
) -> Result<Scores, BuildError> {
    let (mut similarity, mut distinct, mut run, mut texts) = (0.0, 0.0, 0, Vec::new());
    for (text, tokens) in greedy_replies(model, sae, units, edits, prompts, max_tokens, &kindling_engine::CancelToken::new())? {
        let v = judge.embed(&[text.as_str()])?.remove(0);
        similarity += v.iter().zip(target).map(|(a, b)| a * b).sum::<f32>();
        distinct += distinct_ratio(&tokens);
        run = run.max(longest_run(&tokens));
        texts.push(text);
    }
    let n = prompts.len().max(1) as f32;
    Ok(Scores {
        similarity: similarity / n,
        distinct: distinct / n,
        longest_run: run,
        texts,
    })
}

pub fn run(args: &AutoSteerEvalArgs) -> Result<(), BuildError> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| BuildError::io(p, e));
    let spec: Value =
        serde_json::from_slice(&read(&args.concepts)?).map_err(|e| BuildError::Input(format!("{}: {e}", args.concepts.display())))?;
    let concepts: Vec<String> = spec["concepts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect();
    let prompts: Vec<String> = spec["prompts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect();
    if concepts.is_empty() || prompts.is_empty() {
        return Err(BuildError::Input(format!(
            "{}: needs \"concepts\" and \"prompts\" lists",
            args.concepts.display()
        )));
    }
    let (model, sae, atlas) = args.shipped.load(false)?;
    let units = atlas.units();
    let judge = MiniLm::load(&args.minilm, &kindling_engine::Backend::Cpu.device()?)?;

    println!(
        "| concept | edits (feature: label, value) | similarity base → steered | distinct tokens base → steered | longest repeat | moved |"
    );
    println!("|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    let mut moved = 0;
    for concept in &concepts {
        let target = judge.embed(&[concept.as_str()])?.remove(0);
        let base = answer(&model, &sae, &units, &[], &prompts, &judge, &target, args.max_tokens)?;
        let found = auto_steer(&model, &sae, &atlas, concept, &AutoSteerOptions::default())?;
        let steered = answer(&model, &sae, &units, &found.edits, &prompts, &judge, &target, args.max_tokens)?;
        // Moved: closer to the description, and still text (no collapse into repetition).
        let coherent = steered.distinct >= 0.5 && steered.distinct >= 0.8 * base.distinct && steered.longest_run <= 4;
        let ok = !found.edits.is_empty() && steered.similarity > base.similarity + 0.02 && coherent;
        moved += ok as usize;
        let edits: Vec<String> = found
            .edits
            .iter()
            .map(|e| {
                format!(
                    "#{}: {} ({:+.1})",
                    e.feature,
                    atlas.feature(e.feature).map(|f| f.label.as_str()).unwrap_or("?"),
                    e.value
                )
            })
            .collect();
        println!(
            "| {concept} | {} | {:.3} → {:.3} | {:.2} → {:.2} | {} | {} |",
            if edits.is_empty() { "(none)".into() } else { edits.join("; ") },
            base.similarity,
            steered.similarity,
            base.distinct,
            steered.distinct,
            steered.longest_run,
            if ok { "yes" } else { "no" }
        );
        rows.push(json!({
            "concept": concept, "edits": edits,
            "base": { "similarity": base.similarity, "distinct": base.distinct, "longest_run": base.longest_run, "texts": base.texts },
            "steered": { "similarity": steered.similarity, "distinct": steered.distinct, "longest_run": steered.longest_run, "texts": steered.texts },
            "moved": ok,
        }));
    }
    println!(
        "\n{moved} of {} concepts moved toward their description and stayed coherent.",
        concepts.len()
    );
    if let Some(out) = &args.out {
        let report = json!({
            "judge": "all-MiniLM-L6-v2 cosine of each greedy answer to the description (AutoSteer itself selects with the static embedder)",
            "moved_rule": "steered similarity > base + 0.02, distinct-token ratio >= 0.5 and >= 0.8 x base, no token repeated more than 4 times in a row",
            "max_tokens": args.max_tokens, "prompts": prompts, "concepts": rows, "moved": moved, "total": concepts.len(),
        });
        crate::write_atomically(out, (serde_json::to_string_pretty(&report).expect("JSON") + "\n").as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn longest_run_counts_back_to_back_repeats() {
        assert_eq!(super::longest_run(&[]), 0);
        assert_eq!(super::longest_run(&[1, 2, 3]), 1);
        assert_eq!(super::longest_run(&[1, 2, 2, 2, 3, 3]), 3);
    }
}
