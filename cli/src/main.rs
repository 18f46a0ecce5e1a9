//! `kindling`: chat with SmolLM2 from the terminal, and benchmark the engine.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use kindling_engine::{Backend, ChatMessage, EngineError, Logits, Model, SamplingParams};

const DEFAULT_MODEL: &str = "public/models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Kindling: steer a language model by its features. This command runs the engine.
#[derive(Parser)]
#[command(name = "kindling", version)]
struct Cli {
    /// The GGUF model file (fetch it with scripts/fetch-model.sh).
    #[arg(long, global = true, env = "KINDLING_MODEL", default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Compute backend: "cpu" (burn-flex with quantized kernels) or "wgpu" (GPU, or Mesa
    /// lavapipe on machines without one).
    #[arg(long, global = true, default_value = "cpu")]
    backend: Backend,
    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send PROMPT as a user message (through the model's chat template) and stream the reply.
    Chat {
        /// The user message.
        prompt: String,
        /// An optional system message (default: the template's own).
        #[arg(long)]
        system: Option<String>,
        /// Sampling temperature; 0 means greedy (always the most likely token).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Keep only the K most likely tokens when sampling (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Nucleus sampling: keep the most likely tokens up to this total probability.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Stop after this many tokens.
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// Random seed: the same seed gives the same reply.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Measure prefill and decode speed (tokens/s) on the same workload as scripts/bench.sh.
    Bench {
        /// Prompt length for the prefill measurement.
        #[arg(long, default_value_t = 512)]
        prefill: usize,
        /// Tokens generated for the decode measurement.
        #[arg(long, default_value_t = 128)]
        decode: usize,
        /// Timed repetitions (after one warm-up).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Print one JSON line instead of a summary.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kindling: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    }
    if !cli.model.exists() {
        return Err(format!(
            "model file {} not found: run scripts/fetch-model.sh (or pass --model)",
            cli.model.display()
        )
        .into());
    }
    let loaded = Instant::now();
    let model = Model::load(&cli.model, cli.backend)?;
    let load_s = loaded.elapsed().as_secs_f64();
    match cli.command {
        Command::Chat { prompt, system, temperature, top_k, top_p, max_tokens, seed } => {
            let mut messages = Vec::new();
            if let Some(system) = system {
                messages.push(ChatMessage::new("system", system));
            }
            messages.push(ChatMessage::user(prompt));
            let params = SamplingParams {
                temperature,
                top_k: Some(top_k),
                top_p: Some(top_p),
                seed,
                max_tokens,
                ..SamplingParams::default()
            };
            let mut out = std::io::stdout().lock();
            let mut stream = model.chat(&messages, params)?;
            for token in &mut stream {
                out.write_all(token?.text.as_bytes())?;
                out.flush()?;
            }
            writeln!(out)?;
        }
        Command::Bench { prefill, decode, reps, json } => {
            let threads = rayon::current_num_threads();
            let result = bench(&model, prefill, decode, reps)?;
            let rss = resident_mib();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "engine": "kindling", "backend": cli.backend.to_string(), "threads": threads,
                        "prefill_tokens": prefill, "decode_tokens": decode,
                        "prefill_tok_s": result.0, "decode_tok_s": result.1,
                        "load_s": load_s, "rss_mib": rss,
                    })
                );
            } else {
                println!("backend {} · {threads} threads · load {load_s:.2} s · resident {rss:.0} MiB", cli.backend);
                println!("prefill {prefill}: median {:.1} tok/s  {:?}", median(&result.0), result.0);
                println!("decode {decode}: median {:.1} tok/s  {:?}", median(&result.1), result.1);
            }
        }
    }
    Ok(())
}

/// Prefill: the first `prefill` tokens of the GPL-3 text (the llama.cpp benchmark's prompt);
/// decode: `decode` greedy tokens after a short chat prompt, ignoring `<|im_end|>`.
fn bench(model: &Model, prefill: usize, decode: usize, reps: usize) -> Result<(Vec<f64>, Vec<f64>), EngineError> {
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3")
        .unwrap_or_else(|_| "The quick brown fox jumps over the lazy dog. ".repeat(200));
    let mut tokens = model.tokenizer.encode(&text, false);
    tokens.truncate(prefill);
    let chat = model.tokenizer.encode(
        "<|im_start|>user\nWrite a long story about a pirate who finds a treasure map.<|im_end|>\n<|im_start|>assistant\n",
        true,
    );
    let (mut prefill_rates, mut decode_rates) = (Vec::new(), Vec::new());
    for rep in 0..=reps {
        let mut cache = model.llama.new_cache();
        let start = Instant::now();
        let logits = model.llama.forward(&tokens, &mut cache, None, Logits::Last)?;
        drop(logits.map(|l| l.into_data()));
        let prefill_s = start.elapsed().as_secs_f64();

        let mut cache = model.llama.new_cache();
        let logits = model.llama.forward(&chat, &mut cache, None, Logits::Last)?.expect("logits");
        let mut next = argmax_of(logits)?;
        let start = Instant::now();
        for _ in 0..decode {
            let logits = model.llama.forward(&[next], &mut cache, None, Logits::Last)?.expect("logits");
            next = argmax_of(logits)?;
        }
        let decode_s = start.elapsed().as_secs_f64();
        if rep > 0 {
            prefill_rates.push(round1(tokens.len() as f64 / prefill_s));
            decode_rates.push(round1(decode as f64 / decode_s));
        }
    }
    Ok((prefill_rates, decode_rates))
}

fn argmax_of(logits: burn::tensor::Tensor<2>) -> Result<u32, EngineError> {
    let values = logits.into_data().try_into_vec::<f32>().map_err(|e| EngineError::Backend(format!("{e:?}")))?;
    Ok(kindling_engine::sampling::argmax(&values))
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Resident memory of this process in MiB (Linux), NaN elsewhere.
fn resident_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}
