//! Step 3: what each latent does to the output.
//!
//! * promoted / suppressed: its decoder direction through the final norm's gain and the
//!   unembedding (VocabProj, Neuronpedia's `pos_str`/`neg_str`), for every latent;
//! * boosted (TokenChange): the next-token probabilities on neutral prompts with the
//!   direction added at the SAE's block at every position, `amplify` × its max activation,
//!   minus the unsteered probabilities; the largest increases, averaged over the prompts.
//!
//! Results go to `logits.jsonl` (one line per latent), so a cut-off run resumes.

use std::collections::HashMap;
use std::fs::OpenOptions;

use kindling_engine::burn::tensor::{Tensor, TensorData};
use kindling_engine::{AddToResidual, Logits, Model, Sae, TokenId, to_host};
use serde_json::json;

use super::{AtlasArgs, LatentStats, append_line, read_lines};
use crate::BuildError;
use crate::progress::Progress;
use crate::workers::{run_on_workers, single_thread_pools};

/// Tokens kept per list.
const KEEP: usize = 8;
const LENS_CHUNK: usize = 128;

#[derive(Debug, Clone, Default)]
pub struct Effects {
    pub promoted: Vec<(TokenId, f32)>,
    pub suppressed: Vec<(TokenId, f32)>,
    pub boosted: Vec<(TokenId, f32)>,
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// The `k` largest values of `row` with their indices, largest first (`sign` −1: smallest).
fn extremes(row: &[f32], k: usize, sign: f32) -> Vec<(TokenId, f32)> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    let key = |i: usize| row[i] * sign;
    idx.select_nth_unstable_by(k.min(row.len() - 1), |&a, &b| key(b).total_cmp(&key(a)));
    idx.truncate(k);
    idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)));
    idx.into_iter().map(|i| (i as TokenId, row[i])).collect()
}

/// Short on purpose (the step runs a forward pass per latent and prompt): the start of an
/// assistant reply (without the template's default system prompt) and of a plain sentence.
fn neutral_prompts(model: &Model) -> Vec<Vec<TokenId>> {
    vec![
        model
            .tokenizer
            .encode("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n", true),
        model.tokenizer.encode("I think that the", false),
    ]
}

pub fn run(args: &AtlasArgs, model: &Model, sae: &Sae, stats: &[LatentStats]) -> Result<Vec<Effects>, BuildError> {
    let path = args.work.join("logits.jsonl");
    let d_sae = sae.config().d_sae;
    let mut effects: Vec<Option<Effects>> = vec![None; d_sae];
    let pairs = |v: &serde_json::Value| -> Vec<(TokenId, f32)> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p[0].as_u64()? as TokenId, p[1].as_f64()? as f32)))
            .collect()
    };
    for line in read_lines(&path) {
        if let Some(f) = line["feature"].as_u64().filter(|&f| (f as usize) < d_sae) {
            effects[f as usize] = Some(Effects {
                promoted: pairs(&line["promoted"]),
                suppressed: pairs(&line["suppressed"]),
                boosted: pairs(&line["boosted"]),
            });
        }
    }
    let n = args.features.unwrap_or(d_sae).min(d_sae);
    let todo: Vec<usize> = (0..n).filter(|&f| effects[f].is_none()).collect();
    if todo.is_empty() {
        return Ok(effects.into_iter().map(Option::unwrap_or_default).collect());
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| BuildError::io(&path, e))?;

    // VocabProj for every latent still to do, a chunk of decoder rows at a time.
    eprintln!("[atlas logits] projecting {} decoder rows through the unembedding", todo.len());
    let d = sae.config().d_in;
    let mut lens: HashMap<usize, (Vec<(TokenId, f32)>, Vec<(TokenId, f32)>)> = HashMap::new();
    for chunk in todo.chunks(LENS_CHUNK) {
        let rows: Vec<f32> = chunk.iter().flat_map(|&f| sae.decoder_row(f).iter().copied()).collect();
        let directions = Tensor::from_data(TensorData::new(rows, [chunk.len(), d]), model.llama.device());
        let logits = to_host(model.llama.logit_lens(directions))?;
        let vocab = logits.len() / chunk.len();
        for (&f, row) in chunk.iter().zip(logits.chunks_exact(vocab)) {
            lens.insert(f, (extremes(row, KEEP, 1.0), extremes(row, KEEP, -1.0)));
        }
    }

    // TokenChange for live latents, two workers side by side.
    let prompts = neutral_prompts(model);
    let layer = sae.config().layer;
    let next_token_probs = |prompt: &[TokenId], add: Option<Vec<f32>>| -> Result<Vec<f32>, BuildError> {
        let mut cache = model.llama.new_cache();
        let mut hook = add.map(|v| AddToResidual::new(layer, v));
        let hook = hook.as_mut().map(|h| h as &mut dyn kindling_engine::ResidualHook);
        let logits = model
            .llama
            .forward(prompt, &mut cache, hook, Logits::Last)?
            .expect("Logits::Last returns logits");
        Ok(softmax(&to_host(logits)?))
    };
    let base: Vec<Vec<f32>> = prompts.iter().map(|p| next_token_probs(p, None)).collect::<Result<_, _>>()?;
    let workers = single_thread_pools(args.workers)?;
    let mut progress = Progress::new("atlas logits", "latents", todo.len() as u64, 0);
    for (n, group) in todo.chunks(workers.len()).enumerate() {
        let boosted = run_on_workers(&workers, group, |f| {
            if !stats[f].is_live() {
                return Ok(Vec::new());
            }
            let scale = args.amplify * stats[f].max_activation;
            let add: Vec<f32> = sae.decoder_row(f).iter().map(|x| x * scale).collect();
            let mut delta = vec![0f32; base[0].len()];
            for (prompt, p0) in prompts.iter().zip(&base) {
                let p = next_token_probs(prompt, Some(add.clone()))?;
                delta
                    .iter_mut()
                    .zip(p.iter().zip(p0))
                    .for_each(|(d, (a, b))| *d += (a - b) / prompts.len() as f32);
            }
            Ok(extremes(&delta, KEEP, 1.0).into_iter().filter(|&(_, dp)| dp > 0.0).collect())
        })?;
        for (&f, boosted) in group.iter().zip(boosted) {
            let (promoted, suppressed) = lens.remove(&f).unwrap_or_default();
            append_line(
                &mut file,
                &json!({ "feature": f, "promoted": promoted, "suppressed": suppressed, "boosted": boosted }),
            )?;
            effects[f] = Some(Effects {
                promoted,
                suppressed,
                boosted,
            });
        }
        progress.update(((n + 1) * workers.len()).min(todo.len()) as u64, "", false);
    }
    progress.update(todo.len() as u64, "done", true);
    Ok(effects.into_iter().map(Option::unwrap_or_default).collect())
}
