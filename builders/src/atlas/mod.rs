//! `kindling-build atlas`: the feature atlas under `public/atlas/` (see `kindling_engine::atlas`).
//!
//! Steps, each resumable, with intermediate files in `--work` (default `data/atlas/`):
//! 1. **activations**: the SAE's latents at every held-out token of the harvest (text the SAE
//!    never trained on), stored sparse in chunk files;
//! 2. **statistics** (in memory, seconds): per latent its density, histogram, max activation
//!    (99th percentile of its nonzero activations: the steering unit) and its contexts: the
//!    strongest ones, samples from every decile of its activations (both shown in dashboards;
//!    the activating ones are shown to the labeller), and a disjoint sample of activating
//!    occurrences (≥ [`ACTIVATING_FRACTION`] of the unit) kept back for scoring;
//! 3. **logits** ([`logits`]): promoted/suppressed tokens through the unembedding, and the
//!    tokens whose probability rises most when the feature is amplified during generation;
//! 4. **labels** ([`labels`]): the instruct model names the theme of the words each live
//!    latent fires on; the words themselves are a candidate label too;
//! 5. **score** ([`score`]): all-MiniLM-L6-v2 judges each label by detection on contexts the
//!    labeller never saw (balanced accuracy);
//! 6. **pack** ([`pack`]): `atlas.json`, `contexts.safetensors` and `manifest.json`.

mod labels;
mod logits;
mod pack;
mod score;

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kindling_engine::{CaptureResidual, Logits as ModelLogits, Model, Sae, TokenId};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::BuildError;
use crate::progress::Progress;
use crate::workers::{run_on_workers, single_thread_pools};

#[derive(clap::Args)]
pub struct AtlasArgs {
    /// Set from the global --model.
    #[arg(skip)]
    pub model_path: PathBuf,
    /// `public/sae`: the compact file and its manifest.
    #[arg(long, default_value = "public/sae")]
    pub sae_dir: PathBuf,
    /// Its held-out windows are the atlas's text.
    #[arg(long, default_value = "data/harvest")]
    pub harvest: PathBuf,
    #[arg(long, default_value = "data/models/all-MiniLM-L6-v2")]
    pub minilm: PathBuf,
    #[arg(long, default_value = "public/atlas/embedder.safetensors")]
    pub embedder: PathBuf,
    /// Intermediate files of every step.
    #[arg(long, default_value = "data/atlas")]
    pub work: PathBuf,
    #[arg(long, default_value = "public/atlas")]
    pub out: PathBuf,
    /// Read only the first N held-out windows.
    #[arg(long)]
    pub windows: Option<usize>,
    /// Label and score only the first N latents (a trial run).
    #[arg(long)]
    pub features: Option<usize>,
    /// Single-threaded workers side by side (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Push (in max-activation units) used to find the tokens a feature boosts.
    #[arg(long, default_value_t = 4.0)]
    pub amplify: f32,
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// The command line, recorded in the manifest.
    #[arg(skip)]
    pub command: String,
}

/// Tokens shown before and after an activation in a stored context.
pub const BEFORE: usize = 15;
pub const AFTER: usize = 4;
pub const WINDOW: usize = BEFORE + 1 + AFTER;
/// Contexts per latent: strongest, decile samples (both stored), and held back for scoring.
pub const TOP: usize = 10;
pub const SAMPLED: usize = 10;
pub const SCORING: usize = 20;
/// Further activating occurrences, drawn like the scoring ones but after them: never stored,
/// never scored on; the labeller's words and the choice among candidate labels come from them
/// and from the stored activating contexts. The stored contexts are mostly the strongest
/// (a latent's weaker decile samples rarely count as activating), while the score spreads
/// over all activating ranks: words read from the strongest alone miss the rest.
pub const LABELLING: usize = 100;
/// A latent counts as *activating* on a token when it reaches this share of its unit (the
/// 99th-percentile activation). A TopK SAE also lets latents in at a few percent of their
/// peak, where they stand for little: dashboards show those (the decile samples), but labels
/// are written and scored on what the latent does when it is really on. On the first 60
/// latents of the shipped SAE, scoring on all deciles gave 37% of labels ≥ 0.7.
pub const ACTIVATING_FRACTION: f32 = 0.25;
pub const HISTOGRAM_BINS: usize = 16;

/// The held-out text with every token's active latents.
pub struct Activations {
    pub windows: Vec<Vec<TokenId>>,
    /// Per window, per position: the active latents (none at position 0 and control tokens).
    pub features: Vec<Vec<Vec<(u32, f32)>>>,
    /// Positions with features (the denominator of densities).
    pub tokens: u64,
}

impl Activations {
    /// The activation of `latent` at each position of `window[range]`.
    pub fn latent_in(&self, latent: u32, window: usize, range: std::ops::Range<usize>) -> Vec<f32> {
        range
            .map(|p| self.features[window][p].iter().find(|(j, _)| *j == latent).map_or(0.0, |(_, a)| *a))
            .collect()
    }
}

/// One occurrence of a latent: where it fired and how strongly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Occurrence {
    pub act: f32,
    pub window: u32,
    pub pos: u32,
}

/// What the statistics step knows about one latent.
#[derive(Debug, Clone, Default)]
pub struct LatentStats {
    pub count: u64,
    pub max_activation: f32,
    pub max_observed: f32,
    pub histogram: Vec<u32>,
    /// Strongest first, non-overlapping.
    pub top: Vec<Occurrence>,
    /// One per decile band, strongest band first.
    pub sampled: Vec<Occurrence>,
    /// Held back from the labeller: activating occurrences (see [`ACTIVATING_FRACTION`])
    /// spread over their rank bands.
    pub scoring: Vec<Occurrence>,
    /// Activating occurrences spread over their rank bands for the labeller (see [`LABELLING`]).
    pub labelling: Vec<Occurrence>,
    /// The tokens it fires on most in its contexts (id, count).
    pub top_tokens: Vec<(TokenId, u32)>,
}

impl LatentStats {
    pub fn is_live(&self) -> bool {
        self.count > 0
    }

    /// Whether an occurrence is strong enough to count as activating.
    pub fn is_activating(&self, o: &Occurrence) -> bool {
        o.act >= ACTIVATING_FRACTION * self.max_activation
    }

    /// What labels are written from and chosen on: the activating stored contexts and the
    /// labelling sample (never the scoring one).
    pub fn labelling_contexts(&self) -> impl Iterator<Item = &Occurrence> {
        self.stored_activating().chain(&self.labelling)
    }

    /// The stored contexts (the dashboard's) that count as activating.
    pub fn stored_activating(&self) -> impl Iterator<Item = &Occurrence> {
        self.top.iter().chain(&self.sampled).filter(|o| self.is_activating(o))
    }
}

/// The context window (token range) around an occurrence.
pub fn context_range(acts: &Activations, o: &Occurrence) -> std::ops::Range<usize> {
    let len = acts.windows[o.window as usize].len();
    let p = o.pos as usize;
    p.saturating_sub(BEFORE)..(p + AFTER + 1).min(len)
}

pub fn run(args: &AtlasArgs) -> Result<(), BuildError> {
    let model = Model::load(&args.model_path, kindling_engine::Backend::Cpu)?;
    let compact = args.sae_dir.join("kindling-sae.f16.safetensors");
    let sae = Sae::from_compact(&fs::read(&compact).map_err(|e| BuildError::io(&compact, e))?)?;
    sae.check_model(model.llama.config(), None)?;
    fs::create_dir_all(&args.work).map_err(|e| BuildError::io(&args.work, e))?;

    let acts = collect_activations(args, &model, &sae)?;
    eprintln!("[atlas] statistics over {} held-out tokens", acts.tokens);
    let stats = statistics(&acts, sae.config().d_sae, args.seed);
    let live = stats.iter().filter(|s| s.is_live()).count();
    eprintln!("[atlas] {live} of {} latents fire on held-out text", stats.len());

    let effects = logits::run(args, &model, &sae, &stats)?;
    let labels = labels::run(args, &model, &acts, &stats)?;
    let scores = score::run(args, &model, &acts, &stats, &labels)?;
    pack::run(args, &model, &sae, &acts, &stats, &effects, &scores)
}

const CHUNK_WINDOWS: usize = 16;

/// Step 1: latents at every held-out token, in chunk files of 16 windows
/// (`activations/chunk-NNNNN.bin`: per position a u16 count, then (u32 latent, f32 value)
/// pairs, little-endian); finished chunks are reused.
fn collect_activations(args: &AtlasArgs, model: &Model, sae: &Sae) -> Result<Activations, BuildError> {
    let windows: Vec<Vec<TokenId>> = crate::harvest::heldout_windows(&args.harvest, args.windows)?
        .into_iter()
        .map(|w| w.tokens)
        .collect();
    let dir = args.work.join("activations");
    fs::create_dir_all(&dir).map_err(|e| BuildError::io(&dir, e))?;
    let stamp = dir.join("sae.sha256");
    let sha = sae.sha256().unwrap_or("").to_string();
    if fs::read_to_string(&stamp).ok().is_some_and(|s| s.trim() != sha) {
        // Activations of another SAE: start over.
        fs::remove_dir_all(&dir).map_err(|e| BuildError::io(&dir, e))?;
        fs::create_dir_all(&dir).map_err(|e| BuildError::io(&dir, e))?;
    }
    fs::write(&stamp, &sha).map_err(|e| BuildError::io(&stamp, e))?;
    let total: u64 = windows.iter().map(|w| w.len() as u64).sum();
    let mut progress = Progress::new("atlas activations", "tokens", total, 0);
    let workers = single_thread_pools(args.workers)?;
    let mut features: Vec<Vec<Vec<(u32, f32)>>> = Vec::with_capacity(windows.len());
    let mut done = 0u64;
    for (c, chunk) in windows.chunks(CHUNK_WINDOWS).enumerate() {
        let path = dir.join(format!("chunk-{c:05}.bin"));
        let chunk_features = match read_chunk(&path, chunk) {
            Some(f) => f,
            None => {
                let mut out = Vec::with_capacity(chunk.len());
                for group in (0..chunk.len()).collect::<Vec<_>>().chunks(workers.len()) {
                    out.extend(run_on_workers(&workers, group, |i| {
                        let tokens = &chunk[i];
                        let mut capture = CaptureResidual::new(sae.config().layer);
                        let mut cache = model.llama.new_cache();
                        model.llama.forward(tokens, &mut cache, Some(&mut capture), ModelLogits::None)?;
                        let mut encoded = sae.encode(&capture.take());
                        for (p, f) in encoded.iter_mut().enumerate() {
                            if p == 0 || model.tokenizer.is_control(tokens[p]) {
                                f.clear();
                            }
                        }
                        Ok(encoded)
                    })?);
                }
                write_chunk(&path, &out)?;
                out
            }
        };
        done += chunk.iter().map(|w| w.len() as u64).sum::<u64>();
        features.extend(chunk_features);
        progress.update(done, &format!("chunk {}", c + 1), false);
    }
    progress.update(done, "done", true);
    let tokens = features.iter().flatten().filter(|f| !f.is_empty()).count() as u64;
    Ok(Activations { windows, features, tokens })
}

fn write_chunk(path: &Path, windows: &[Vec<Vec<(u32, f32)>>]) -> Result<(), BuildError> {
    let mut bytes = Vec::new();
    for position in windows.iter().flatten() {
        bytes.extend((position.len() as u16).to_le_bytes());
        for &(j, a) in position {
            bytes.extend(j.to_le_bytes());
            bytes.extend(a.to_le_bytes());
        }
    }
    crate::write_atomically(path, &bytes)
}

/// A finished chunk for these windows, or `None` (missing or not matching).
fn read_chunk(path: &Path, windows: &[Vec<TokenId>]) -> Option<Vec<Vec<Vec<(u32, f32)>>>> {
    let mut bytes = Vec::new();
    fs::File::open(path).ok()?.read_to_end(&mut bytes).ok()?;
    let mut at = 0;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = bytes.get(at..at + n)?;
        at += n;
        Some(s)
    };
    let mut out = Vec::with_capacity(windows.len());
    for w in windows {
        let mut positions = Vec::with_capacity(w.len());
        for _ in 0..w.len() {
            let n = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
            let mut f = Vec::with_capacity(n);
            for _ in 0..n {
                let pair = take(8)?;
                f.push((
                    u32::from_le_bytes(pair[..4].try_into().ok()?),
                    f32::from_le_bytes(pair[4..].try_into().ok()?),
                ));
            }
            positions.push(f);
        }
        out.push(positions);
    }
    (at == bytes.len()).then_some(out)
}

/// Step 2: per-latent statistics and context choices (deterministic for a seed).
pub fn statistics(acts: &Activations, d_sae: usize, seed: u64) -> Vec<LatentStats> {
    let mut occurrences: Vec<Vec<Occurrence>> = vec![Vec::new(); d_sae];
    for (w, window) in acts.features.iter().enumerate() {
        for (p, features) in window.iter().enumerate() {
            for &(j, act) in features {
                occurrences[j as usize].push(Occurrence {
                    act,
                    window: w as u32,
                    pos: p as u32,
                });
            }
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    occurrences
        .into_iter()
        .map(|mut occ| {
            if occ.is_empty() {
                return LatentStats::default();
            }
            occ.sort_by(|a, b| b.act.total_cmp(&a.act));
            let n = occ.len();
            let max_observed = occ[0].act;
            // The 99th percentile: rank 1% from the top.
            let max_activation = occ[((n as f64 * 0.01).floor() as usize).min(n - 1)].act;
            let mut histogram = vec![0u32; HISTOGRAM_BINS];
            for o in &occ {
                let bin = ((o.act / max_observed) * HISTOGRAM_BINS as f32).ceil() as usize;
                histogram[bin.clamp(1, HISTOGRAM_BINS) - 1] += 1;
            }
            let mut taken: Vec<Occurrence> = Vec::new();
            let overlaps = |taken: &[Occurrence], o: &Occurrence| {
                taken
                    .iter()
                    .any(|t| t.window == o.window && (t.pos as i64 - o.pos as i64).unsigned_abs() < WINDOW as u64)
            };
            let mut top = Vec::new();
            for o in &occ {
                if top.len() == TOP {
                    break;
                }
                if !overlaps(&taken, o) {
                    top.push(*o);
                    taken.push(*o);
                }
            }
            // Decile bands by rank; from each, one sample to show.
            let mut sampled = Vec::new();
            for band in 0..SAMPLED {
                let mut candidates: Vec<Occurrence> = occ[band * n / SAMPLED..(band + 1) * n / SAMPLED].to_vec();
                candidates.shuffle(&mut rng);
                if let Some(o) = candidates.into_iter().find(|o| !overlaps(&taken, o)) {
                    sampled.push(o);
                    taken.push(o);
                }
            }
            // Activating occurrences, one from each of `bands` rank bands: first held back
            // for scoring, then for the labeller.
            let activating = occ.partition_point(|o| o.act >= ACTIVATING_FRACTION * max_activation);
            let mut spread = |bands: usize, taken: &mut Vec<Occurrence>| {
                let mut out = Vec::new();
                for band in 0..bands {
                    let mut candidates: Vec<Occurrence> = occ[band * activating / bands..(band + 1) * activating / bands].to_vec();
                    candidates.shuffle(&mut rng);
                    if let Some(o) = candidates.into_iter().find(|o| !overlaps(taken, o)) {
                        out.push(o);
                        taken.push(o);
                    }
                }
                out
            };
            let scoring = spread(SCORING, &mut taken);
            let labelling = spread(LABELLING, &mut taken);
            let mut token_counts: HashMap<TokenId, u32> = HashMap::new();
            for o in top.iter().chain(&sampled) {
                *token_counts.entry(acts.windows[o.window as usize][o.pos as usize]).or_default() += 1;
            }
            let mut top_tokens: Vec<(TokenId, u32)> = token_counts.into_iter().collect();
            top_tokens.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            top_tokens.truncate(8);
            LatentStats {
                count: n as u64,
                max_activation,
                max_observed,
                histogram,
                top,
                sampled,
                scoring,
                labelling,
                top_tokens,
            }
        })
        .collect()
}

/// The text of a token range, with the token at `mark` (if any) between `<<` and `>>`.
pub fn context_text(model: &Model, tokens: &[TokenId], mark: Option<usize>) -> String {
    let mut text = String::new();
    for (i, &t) in tokens.iter().enumerate() {
        let piece = model.tokenizer.decode(&[t], true).unwrap_or_default();
        if Some(i) == mark {
            let trimmed = piece.trim_start();
            text.push_str(&piece[..piece.len() - trimmed.len()]);
            text.push_str("<<");
            text.push_str(trimmed);
            text.push_str(">>");
        } else {
            text.push_str(&piece);
        }
    }
    text.replace('\n', " ")
}

/// Appends one JSON line and flushes (resumable steps write their results this way).
pub fn append_line(file: &mut fs::File, value: &Value) -> Result<(), BuildError> {
    writeln!(file, "{value}")
        .and_then(|_| file.flush())
        .map_err(|e| BuildError::Input(format!("writing: {e}")))
}

/// A resumable step's results file, shared by workers side by side: one JSON line per latent,
/// appended and flushed as each is done, with progress shown.
pub struct Journal {
    file: Mutex<fs::File>,
    progress: Mutex<(Progress, u64)>,
}

impl Journal {
    /// Opens `path` for appending; `total` latents are to be done.
    pub fn open(path: &Path, what: &'static str, total: u64) -> Result<Self, BuildError> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| BuildError::io(path, e))?;
        Ok(Self {
            file: Mutex::new(file),
            progress: Mutex::new((Progress::new(what, "latents", total, 0), 0)),
        })
    }

    /// Appends one latent's result and shows `note` beside the progress.
    pub fn record(&self, value: &Value, note: &str) -> Result<(), BuildError> {
        append_line(&mut self.file.lock().expect("journal file"), value)?;
        let mut progress = self.progress.lock().expect("journal progress");
        progress.1 += 1;
        let done = progress.1;
        progress.0.update(done, note, false);
        Ok(())
    }

    pub fn finish(&self) {
        let mut progress = self.progress.lock().expect("journal progress");
        let done = progress.1;
        progress.0.update(done, "done", true);
    }
}

/// The JSON lines of a resumable step's file (a torn last line is ignored).
pub fn read_lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 400 windows of 64 tokens; latent 0 fires every 8th token with a strength that grows
    /// along the text, latent 1 never fires.
    fn activations() -> Activations {
        let (windows, len) = (400, 64);
        let mut features = Vec::new();
        for w in 0..windows {
            features.push(
                (0..len)
                    .map(|p| {
                        if p % 8 == 4 {
                            vec![(0, 1.0 + (w * len + p) as f32 / 100.0)]
                        } else {
                            Vec::new()
                        }
                    })
                    .collect(),
            );
        }
        Activations {
            windows: vec![vec![0; len]; windows],
            features,
            tokens: (windows * len / 8) as u64,
        }
    }

    #[test]
    fn the_labeller_and_the_score_see_different_activating_contexts() {
        let stats = statistics(&activations(), 2, 7);
        let s = &stats[0];
        assert!(!stats[1].is_live());
        assert_eq!((s.top.len(), s.sampled.len(), s.scoring.len()), (TOP, SAMPLED, SCORING));
        // A narrow rank band can run out of contexts that overlap none already taken.
        assert!(s.labelling.len() >= LABELLING * 9 / 10, "{}", s.labelling.len());
        assert!(s.top.windows(2).all(|p| p[0].act >= p[1].act), "strongest first");
        assert!(s.scoring.iter().chain(&s.labelling).all(|o| s.is_activating(o)));
        // No two contexts of any kind overlap, so no held-back context was shown to the
        // labeller or used to choose its label.
        let all: Vec<&Occurrence> = s.top.iter().chain(&s.sampled).chain(&s.scoring).chain(&s.labelling).collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert!(a.window != b.window || (a.pos as i64 - b.pos as i64).unsigned_abs() >= WINDOW as u64);
            }
        }
        let labelling: Vec<&Occurrence> = s.labelling_contexts().collect();
        assert!(s.scoring.iter().all(|o| !labelling.contains(&o)));
        // The labelling sample spreads over the activating range like the scoring one: some
        // from its weaker half.
        let unit = s.max_activation;
        assert!(s.labelling.iter().filter(|o| o.act < 0.6 * unit).count() >= LABELLING / 4);
    }

    #[test]
    fn the_activation_unit_is_the_99th_percentile() {
        let stats = statistics(&activations(), 2, 7);
        let s = &stats[0];
        assert_eq!(s.count, 400 * 8);
        // Activations are 1.04 + 0.08 k for k = 0..3200; the 32nd strongest is k = 3167.
        assert!((s.max_activation - (1.04 + 0.08 * 3167.0)).abs() < 1e-2, "{}", s.max_activation);
        assert_eq!(s.histogram.iter().sum::<u32>(), 3200);
    }
}
