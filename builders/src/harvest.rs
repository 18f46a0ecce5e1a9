//! `kindling-build harvest`: residual activations of the corpus, for SAE training.
//!
//! Every source listed in the corpus manifest is tokenized (general text as plain text,
//! generated chats with their control tokens), documents of a source are joined and cut into
//! windows of `window` tokens, and the windows are visited in a seeded random order. Each
//! window runs through the model up to the deepest harvested block (`Logits::None`); the
//! residual after each harvested block is kept for every position except position 0 (the
//! attention sink, ~100× the norm of the rest) and control tokens. A fixed share of windows is
//! held out for evaluation and only their token ids are written.
//!
//! Output, per layer `L`: `<out>/layer-L/shard-NNNNN.f16` (rows of `d` little-endian f16,
//! shuffled within the shard), and `<out>/harvest.json` (the state: shards written and how
//! many windows they cover). A run that is cut off resumes after the last complete shard;
//! rows of an unfinished shard are recomputed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use kindling_engine::{CaptureResidual, Logits, Model, TokenId};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use crate::progress::Progress;
use crate::workers::run_on_workers;
use crate::{BuildError, sha256_file};

pub struct HarvestArgs {
    pub model_path: PathBuf,
    pub manifest: PathBuf,
    pub out: PathBuf,
    pub layers: Vec<usize>,
    pub window: usize,
    pub shard_rows: usize,
    /// Stop after this many training tokens (rows per layer); `None`: the whole corpus.
    pub max_tokens: Option<u64>,
    /// One window in `heldout_every` is held out for evaluation and the feature atlas.
    pub heldout_every: usize,
    pub seed: u64,
    /// Windows harvested side by side, each on one thread (see `workers`).
    pub workers: usize,
    pub command: String,
}

/// A window of one source's token stream.
pub struct Window {
    pub source: String,
    pub tokens: Vec<TokenId>,
}

/// Tokenizes the corpus and cuts it into windows, in the seeded visiting order.
pub fn corpus_windows(model: &Model, manifest_path: &Path, window: usize, seed: u64) -> Result<Vec<Window>, BuildError> {
    let text = fs::read_to_string(manifest_path).map_err(|e| BuildError::io(manifest_path, e))?;
    let manifest: Value = serde_json::from_str(&text).map_err(|e| BuildError::Input(format!("{}: {e}", manifest_path.display())))?;
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    let sources = manifest["sources"]
        .as_array()
        .ok_or_else(|| BuildError::Input("manifest has no sources".into()))?;
    let mut windows = Vec::new();
    for source in sources {
        let name = source["name"].as_str().unwrap_or("?").to_string();
        let file = source["file"]
            .as_str()
            .ok_or_else(|| BuildError::Input(format!("source {name} has no file")))?;
        let chat = source["kind"] == "generated-chat";
        let path = dir.join(file);
        let body = fs::read_to_string(&path).map_err(|e| BuildError::io(&path, e))?;
        let mut stream: Vec<TokenId> = Vec::new();
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            let doc: Value = serde_json::from_str(line).map_err(|e| BuildError::Input(format!("{}: {e}", path.display())))?;
            let text = doc["text"]
                .as_str()
                .ok_or_else(|| BuildError::Input(format!("{}: a line has no text", path.display())))?;
            if chat {
                // ChatML conversations follow each other directly, as in a chat log.
                stream.extend(model.tokenizer.encode(text, true));
            } else {
                if !stream.is_empty() {
                    stream.extend(model.tokenizer.encode("\n\n", false));
                }
                stream.extend(model.tokenizer.encode(text, false));
            }
        }
        for chunk in stream.chunks(window) {
            if chunk.len() >= 16 {
                windows.push(Window {
                    source: name.clone(),
                    tokens: chunk.to_vec(),
                });
            }
        }
    }
    windows.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    Ok(windows)
}

/// The held-out windows a harvest recorded in `<dir>/harvest.json` (at most `limit`), in
/// visiting order: the text SAE evaluation and the feature atlas read.
pub fn heldout_windows(dir: &Path, limit: Option<usize>) -> Result<Vec<Window>, BuildError> {
    let path = dir.join("harvest.json");
    let text = fs::read_to_string(&path).map_err(|e| BuildError::io(&path, e))?;
    let state: Value = serde_json::from_str(&text).map_err(|e| BuildError::Input(format!("{}: {e}", path.display())))?;
    let windows: Vec<Window> = state["heldout_windows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| Window {
            source: w["source"].as_str().unwrap_or("?").to_string(),
            tokens: w["tokens"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_u64().map(|t| t as TokenId))
                .collect(),
        })
        .take(limit.unwrap_or(usize::MAX))
        .collect();
    if windows.is_empty() {
        return Err(BuildError::Input(format!("{} holds no held-out windows", path.display())));
    }
    Ok(windows)
}

/// Whether window `i` (in visiting order) is held out for evaluation.
pub fn is_heldout(i: usize, every: usize) -> bool {
    every > 0 && i % every == every - 1
}

fn write_f16(path: &Path, rows: &[f32]) -> Result<(), BuildError> {
    let bytes: Vec<u8> = rows.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, &bytes).map_err(|e| BuildError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| BuildError::io(path, e))
}

fn save_state(out: &Path, state: &Value) -> Result<(), BuildError> {
    let path = out.join("harvest.json");
    let tmp = out.join("harvest.json.tmp");
    // Compact: the held-out windows' token ids would take a line each when pretty-printed.
    fs::write(&tmp, state.to_string() + "\n").map_err(|e| BuildError::io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| BuildError::io(&path, e))
}

pub fn run(args: &HarvestArgs) -> Result<(), BuildError> {
    let model = Model::load(&args.model_path, kindling_engine::Backend::Cpu)?;
    let d = model.llama.config().n_embd;
    let n_layer = model.llama.config().n_layer;
    if let Some(&bad) = args.layers.iter().find(|&&l| l >= n_layer) {
        return Err(BuildError::Input(format!(
            "layer {bad} does not exist (the model has {n_layer} blocks)"
        )));
    }
    let mut layers = args.layers.clone();
    layers.sort_unstable();
    layers.dedup();
    eprintln!("[harvest] tokenizing the corpus in {}", args.manifest.display());
    let windows = corpus_windows(&model, &args.manifest, args.window, args.seed)?;
    let total_tokens: u64 = windows.iter().map(|w| w.tokens.len() as u64).sum();
    fs::create_dir_all(&args.out).map_err(|e| BuildError::io(&args.out, e))?;
    for l in &layers {
        let dir = args.out.join(format!("layer-{l}"));
        fs::create_dir_all(&dir).map_err(|e| BuildError::io(&dir, e))?;
    }
    let config = json!({
        "layers": layers, "d_in": d, "window": args.window, "seed": args.seed, "heldout_every": args.heldout_every,
        "shard_rows": args.shard_rows, "max_tokens": args.max_tokens,
        "corpus_manifest_sha256": sha256_file(&args.manifest)?, "model_sha256": sha256_file(&args.model_path)?,
        "dtype": "f16", "skipped": "position 0 of every window and control tokens",
    });
    // Resume only a harvest made with the same settings from the same corpus and model.
    let state_path = args.out.join("harvest.json");
    let mut state = match fs::read_to_string(&state_path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
    {
        Some(old) if old["config"] == config => old,
        Some(_) => {
            return Err(BuildError::Input(format!(
                "{} holds a harvest with other settings, corpus or model; remove it or choose another --out",
                args.out.display()
            )));
        }
        None => {
            json!({ "config": config, "shards": [], "windows_done": 0, "rows": 0, "tokens_seen": 0, "complete": false })
        }
    };
    if state["complete"] == true {
        eprintln!("[harvest] {} is complete", args.out.display());
        return Ok(());
    }
    let start_window = state["windows_done"].as_u64().unwrap_or(0) as usize;
    let mut rows_done = state["rows"].as_u64().unwrap_or(0);
    let budget = args.max_tokens.unwrap_or(u64::MAX);
    let train_tokens_est = (total_tokens as f64 * (1.0 - 1.0 / args.heldout_every.max(1) as f64)) as u64;
    let mut progress = Progress::new("harvest", "rows", budget.min(train_tokens_est), rows_done);
    eprintln!(
        "[harvest] {} windows, {total_tokens} tokens; layers {layers:?}; resuming at window {start_window} ({rows_done} rows)",
        windows.len()
    );
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed_0000 ^ start_window as u64);
    let mut buffers: Vec<Vec<f32>> = vec![Vec::new(); layers.len()];
    let mut buffered_rows = 0usize;
    let mut heldout: Vec<Value> = state["heldout_windows"].as_array().cloned().unwrap_or_default();
    let mut source_rows: serde_json::Map<String, Value> = state["source_rows"].as_object().cloned().unwrap_or_default();
    let mut pending_sources: std::collections::HashMap<String, u64> = Default::default();
    let workers = crate::workers::single_thread_pools(args.workers)?;
    let mut computed: std::collections::HashMap<usize, CaptureResidual> = Default::default();
    let mut i = start_window;
    loop {
        let budget_met = rows_done + buffered_rows as u64 >= budget;
        let last = i == windows.len() || budget_met;
        if buffered_rows >= args.shard_rows || (last && buffered_rows > 0) {
            // Shuffle rows within the shard (the same permutation for every layer).
            let mut order: Vec<usize> = (0..buffered_rows).collect();
            order.shuffle(&mut rng);
            let index = state["shards"].as_array().map_or(0, Vec::len);
            let name = format!("shard-{index:05}.f16");
            for (buffer, &l) in buffers.iter_mut().zip(&layers) {
                let shuffled: Vec<f32> = order.iter().flat_map(|&r| buffer[r * d..(r + 1) * d].iter().copied()).collect();
                write_f16(&args.out.join(format!("layer-{l}")).join(&name), &shuffled)?;
                buffer.clear();
            }
            rows_done += buffered_rows as u64;
            state["shards"]
                .as_array_mut()
                .expect("shards list")
                .push(json!({ "file": name, "rows": buffered_rows }));
            buffered_rows = 0;
            for (source, n) in pending_sources.drain() {
                let entry = source_rows.entry(source).or_insert(json!(0));
                *entry = json!(entry.as_u64().unwrap_or(0) + n);
            }
        }
        if buffered_rows == 0 {
            state["windows_done"] = json!(i);
            state["rows"] = json!(rows_done);
            state["heldout_windows"] = json!(heldout);
            state["source_rows"] = Value::Object(source_rows.clone());
            state["complete"] = json!(last);
            if last {
                state["created_by"] = json!(args.command);
            }
            save_state(&args.out, &state)?;
        }
        if last {
            break;
        }
        let window = &windows[i];
        i += 1;
        if is_heldout(i - 1, args.heldout_every) {
            heldout.push(json!({ "source": window.source, "tokens": window.tokens }));
            continue;
        }
        if !computed.contains_key(&(i - 1)) {
            // The next windows to harvest, one per worker, run side by side.
            let batch: Vec<usize> = (i - 1..windows.len())
                .filter(|&w| !is_heldout(w, args.heldout_every))
                .take(workers.len())
                .collect();
            let results = run_on_workers(&workers, &batch, |w| {
                let mut capture = CaptureResidual::layers(&layers);
                let mut cache = model.llama.new_cache();
                model
                    .llama
                    .forward(&windows[w].tokens, &mut cache, Some(&mut capture), Logits::None)?;
                Ok(capture)
            })?;
            computed.extend(batch.into_iter().zip(results));
        }
        let mut capture = computed.remove(&(i - 1)).expect("computed above");
        let keep: Vec<usize> = (1..window.tokens.len())
            .filter(|&p| !model.tokenizer.is_control(window.tokens[p]))
            .collect();
        for (buffer, &l) in buffers.iter_mut().zip(&layers) {
            let rows = capture.take_layer(l);
            for &p in &keep {
                buffer.extend_from_slice(&rows[p * d..(p + 1) * d]);
            }
        }
        buffered_rows += keep.len();
        *pending_sources.entry(window.source.clone()).or_default() += keep.len() as u64;
        progress.update(rows_done + buffered_rows as u64, &format!("window {i}/{}", windows.len()), false);
    }
    progress.update(rows_done, "done", true);
    let heldout_tokens: usize = heldout.iter().map(|w| w["tokens"].as_array().map_or(0, Vec::len)).sum();
    eprintln!(
        "[harvest] {rows_done} rows per layer in {} shards; {} held-out windows ({heldout_tokens} tokens)",
        state["shards"].as_array().map_or(0, Vec::len),
        heldout.len()
    );
    std::io::stderr().flush().ok();
    Ok(())
}
