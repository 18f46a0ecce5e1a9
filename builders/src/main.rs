//! `kindling-build`: Kindling's offline builders. Each writes versioned artifacts that the
//! engine loads, and each can be cut off and run again to resume.
//!
//! * `chats`: the model-generated chat part of the SAE corpus.
//! * `harvest`: residual activations of the corpus at one or more blocks.
//! * `train`: a TopK SAE on one harvested layer (sparse gradients, checkpoints).
//! * `evaluate`: FVU, L0, dead latents, CE loss recovered and KL on held-out windows.
//! * `embedder`: the static sentence embedder the atlas searches with, distilled from
//!   all-MiniLM-L6-v2.
//! * `atlas`: the feature atlas (statistics, contexts, logit effects, labels, label quality).
//! * `search-eval`: precision@10 of atlas search on the repository's query set.
//! * `ship`: the compact SAE file and its manifest under `public/sae/`.
//! * `export-saelens`: the SAELens files (`cfg.json`, `sae_weights.safetensors`) of the
//!   compact SAE, which the repository does not carry.

mod atlas;
mod autosteer_eval;
mod chats;
mod concept_eval;
mod embedder;
mod evaluate;
mod export;
mod harvest;
mod minilm;
mod progress;
mod search_eval;
mod steer_calibrate;
mod train;
mod workers;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kindling_engine::{EngineError, SamplingParams};
use sha2::{Digest, Sha256};

const DEFAULT_MODEL: &str = "public/models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(name = "kindling-build", version, about = "Kindling's offline builders (corpus, harvest, SAE).")]
struct Cli {
    /// The GGUF model file (fetch it with scripts/fetch-model.sh).
    #[arg(long, global = true, env = "KINDLING_MODEL", default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate the chat part of the corpus: SmolLM2 answers the prompts, conversations are
    /// appended to OUT as ChatML until they are MIN_FRACTION of the corpus; resumable.
    Chats {
        #[arg(long, default_value = "data/corpus/chat-prompts.jsonl")]
        prompts: PathBuf,
        #[arg(long, default_value = "data/corpus/generated-chat.jsonl")]
        out: PathBuf,
        #[arg(long, default_value = "data/corpus/manifest.json")]
        manifest: PathBuf,
        /// Share of all corpus tokens that generated chats must reach.
        #[arg(long, default_value_t = 0.16)]
        min_fraction: f64,
        /// The whole corpus must reach at least this many tokens.
        #[arg(long, default_value_t = 4_050_000)]
        min_total_tokens: u64,
        /// Conversations decoded together by each worker.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Single-threaded workers generating side by side (0: one per core).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        #[arg(long, default_value_t = 0.7)]
        temperature: f32,
        #[arg(long, default_value_t = 0.9)]
        top_p: f32,
        #[arg(long, default_value_t = 160)]
        max_tokens: usize,
        #[arg(long, default_value_t = 1234)]
        seed: u64,
    },
    /// Run the corpus through the model and store the residual after each of LAYERS as
    /// shuffled f16 shards (position 0 and control tokens skipped); resumable.
    Harvest {
        #[arg(long, default_value = "data/corpus/manifest.json")]
        manifest: PathBuf,
        #[arg(long, default_value = "data/harvest")]
        out: PathBuf,
        /// Blocks (0-based) whose output to keep, e.g. 12,15,18,20.
        #[arg(long, value_delimiter = ',', required = true)]
        layers: Vec<usize>,
        /// Tokens per forward pass (documents of a source are joined, then cut).
        #[arg(long, default_value_t = 512)]
        window: usize,
        /// Rows per shard file.
        #[arg(long, default_value_t = 65_536)]
        shard_rows: usize,
        /// Stop after this many rows per layer (a small budget for comparing layers).
        #[arg(long)]
        max_tokens: Option<u64>,
        /// Hold out one window in this many: SAE evaluation and the feature atlas read only
        /// held-out text (one in ten leaves ~400 k tokens, enough for rare features' contexts).
        #[arg(long, default_value_t = 10)]
        heldout_every: usize,
        #[arg(long, default_value_t = 1234)]
        seed: u64,
        /// Single-threaded workers harvesting windows side by side (0: one per core).
        #[arg(long, default_value_t = 0)]
        workers: usize,
    },
    /// Train a TopK SAE on one layer of a harvest; resumes from OUT/checkpoint.safetensors.
    Train {
        #[arg(long, default_value = "data/harvest")]
        harvest: PathBuf,
        #[arg(long)]
        layer: usize,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 8192)]
        d_sae: usize,
        #[arg(long, default_value_t = 32)]
        k: usize,
        /// Dead latents in the AuxK reconstruction (per token).
        #[arg(long, default_value_t = 256)]
        k_aux: usize,
        #[arg(long, default_value_t = 1.0 / 32.0)]
        aux_coef: f32,
        #[arg(long, default_value_t = 4e-4)]
        lr: f32,
        /// Tokens per step.
        #[arg(long, default_value_t = 4096)]
        batch: usize,
        #[arg(long, default_value_t = 1.0)]
        epochs: f64,
        /// A latent silent for this many tokens is dead (AuxK revives it).
        #[arg(long, default_value_t = 500_000)]
        dead_after_tokens: u64,
        #[arg(long, default_value_t = 1234)]
        seed: u64,
        /// burn device for the dense encoder product: cpu or wgpu.
        #[arg(long, default_value = "cpu")]
        backend: kindling_engine::Backend,
        #[arg(long, default_value_t = 120)]
        checkpoint_every_s: u64,
    },
    /// Distil all-MiniLM-L6-v2 into the static embedder the atlas searches with.
    Embedder(embedder::EmbedderArgs),
    /// Build the feature atlas of the shipped SAE under public/atlas/; resumable.
    Atlas(atlas::AtlasArgs),
    /// Precision@10 of atlas search on a query set (prints a table, optionally writes JSON).
    SearchEval(search_eval::SearchEvalArgs),
    /// Atlas search judged by behaviour: per concept query, the latents that fire on its
    /// probe texts and not on neutral ones, precision@10 and the first relevant rank.
    ConceptEval(concept_eval::ConceptEvalArgs),
    /// The steering evaluation: AutoSteer and an oracle ceiling on tools/autosteer/eval.json
    /// (concept words per 100 words, distinct-2, perplexity; docs/STEERING.md).
    AutosteerEval(autosteer_eval::AutoSteerEvalArgs),
    /// Where steering each of a sample of latents starts to act and where text breaks, as
    /// fractions of the residual norm (the strength unit's measurements, docs/STEERING.md).
    SteerCalibrate(steer_calibrate::SteerCalibrateArgs),
    /// Measure an SAE on the harvest's held-out windows; writes a JSON report.
    Evaluate {
        /// The SAE (a trained sae.safetensors or the compact file).
        #[arg(long)]
        sae: PathBuf,
        #[arg(long, default_value = "data/harvest")]
        harvest: PathBuf,
        /// Held-out windows measured for FVU, L0 and the dead fraction (~256 tokens each).
        #[arg(long, default_value_t = 400)]
        windows: usize,
        /// Held-out windows used for the language-model loss (three forward passes each).
        #[arg(long, default_value_t = 32)]
        ce_windows: usize,
        /// Latents whose strongest contexts are printed.
        #[arg(long, default_value_t = 8)]
        examples: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the shipped SAE (compact file + manifest) from a training run and its evaluation.
    Ship {
        #[arg(long)]
        trained: PathBuf,
        #[arg(long)]
        eval: PathBuf,
        #[arg(long, default_value = "data/corpus/manifest.json")]
        corpus_manifest: PathBuf,
        #[arg(long)]
        layer_comparison: Option<PathBuf>,
        #[arg(long, default_value = "public/sae")]
        out: PathBuf,
    },
    /// Write the SAELens layout (cfg.json + sae_weights.safetensors, f32) of a compact SAE
    /// file into OUT, loadable with SAELens's `SAE.load_from_disk`; the written files are read
    /// back and checked to hold exactly the compact file's weights.
    ExportSaelens {
        #[arg(long, default_value = "public/sae/kindling-sae.f16.safetensors")]
        compact: PathBuf,
        /// A folder (data/ is ignored by git; so are these two names under public/sae/).
        #[arg(long, default_value = "data/sae/saelens")]
        out: PathBuf,
    },
}

/// Everything a builder can fail with.
#[derive(Debug)]
pub enum BuildError {
    Io { path: PathBuf, source: std::io::Error },
    Engine(EngineError),
    Input(String),
}

impl BuildError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Self::Engine(e) => write!(f, "{e}"),
            Self::Input(s) => write!(f, "{s}"),
        }
    }
}

impl<E: Into<EngineError>> From<E> for BuildError {
    fn from(e: E) -> Self {
        Self::Engine(e.into())
    }
}

/// Writes `bytes` to `path` through a temporary file, so that a cut-off run leaves the old
/// file or the new one, never half of one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| BuildError::io(dir, e))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| BuildError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| BuildError::io(path, e))
}

pub fn sha256_file(path: &Path) -> Result<String, BuildError> {
    let mut file = std::fs::File::open(path).map_err(|e| BuildError::io(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| BuildError::io(path, e))?;
    Ok(format!("{:x}", hasher.finalize()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .expect("the global thread pool is set once");
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let result = match cli.command {
        Command::Chats {
            prompts,
            out,
            manifest,
            min_fraction,
            min_total_tokens,
            batch,
            workers,
            temperature,
            top_p,
            max_tokens,
            seed,
        } => chats::run(&chats::ChatsArgs {
            model_path: cli.model,
            prompts,
            out,
            manifest,
            min_fraction,
            min_total_tokens,
            batch,
            workers,
            params: SamplingParams {
                temperature,
                top_p: Some(top_p),
                max_tokens,
                seed,
                ..SamplingParams::default()
            },
            command,
        }),
        Command::Harvest {
            manifest,
            out,
            layers,
            window,
            shard_rows,
            max_tokens,
            heldout_every,
            seed,
            workers,
        } => harvest::run(&harvest::HarvestArgs {
            model_path: cli.model,
            manifest,
            out,
            layers,
            window,
            shard_rows,
            max_tokens,
            heldout_every,
            seed,
            workers,
            command,
        }),
        Command::Train {
            harvest,
            layer,
            out,
            d_sae,
            k,
            k_aux,
            aux_coef,
            lr,
            batch,
            epochs,
            dead_after_tokens,
            seed,
            backend,
            checkpoint_every_s,
        } => {
            train::run(&train::TrainArgs {
                harvest,
                layer,
                out,
                // d_in comes from the harvest.
                cfg: train::TrainConfig {
                    d_in: 0,
                    d_sae,
                    k,
                    k_aux,
                    aux_coef,
                    lr,
                    batch,
                    dead_after_tokens,
                    seed,
                },
                epochs,
                backend,
                checkpoint_every_s,
                command,
            })
        }
        Command::Atlas(args) => atlas::run(&atlas::AtlasArgs {
            model_path: cli.model,
            command,
            ..args
        }),
        Command::SearchEval(mut args) => {
            args.shipped.model_path = cli.model;
            search_eval::run(&args)
        }
        Command::ConceptEval(mut args) => {
            args.shipped.model_path = cli.model;
            concept_eval::run(&args)
        }
        Command::AutosteerEval(mut args) => {
            args.shipped.model_path = cli.model;
            autosteer_eval::run(&args)
        }
        Command::SteerCalibrate(mut args) => {
            args.shipped.model_path = cli.model;
            steer_calibrate::run(&args)
        }
        Command::Embedder(args) => embedder::run(&args),
        Command::Evaluate {
            sae,
            harvest,
            windows,
            ce_windows,
            examples,
            out,
        } => evaluate::run(&evaluate::EvalArgs {
            model_path: cli.model,
            sae,
            harvest,
            windows,
            ce_windows,
            examples,
            out,
            command,
        }),
        Command::Ship {
            trained,
            eval,
            corpus_manifest,
            layer_comparison,
            out,
        } => export::ship(&export::ShipArgs {
            trained,
            eval,
            corpus_manifest,
            layer_comparison,
            out,
            command,
        }),
        Command::ExportSaelens { compact, out } => export::export_saelens(&compact, &out).map(|_| ()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
