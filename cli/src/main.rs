//! `kindling`: chat with SmolLM2 from the terminal, and benchmark the engine.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use kindling_engine::{Backend, ChatMessage, EngineError, Logits, Model, SamplingParams, to_host};

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
    /// Count the SmolLM2 tokens of each FILE (or of stdin), one line per input:
    /// `<tokens>\t<characters>\t<name>`. Control-token text is counted as plain text.
    Tokens {
        /// Text files to count (none: stdin).
        files: Vec<PathBuf>,
    },
    /// AutoSteer: find edits that steer replies toward DESCRIPTION (needs the SAE and atlas).
    Autosteer {
        description: String,
        #[arg(long, default_value = "public/sae")]
        sae_dir: PathBuf,
        #[arg(long, default_value = "public/atlas")]
        atlas_dir: PathBuf,
        /// Then answer this prompt with the chosen edits (and without, for comparison).
        #[arg(long)]
        prompt: Option<String>,
    },
    /// Measure what steering costs: greedy decode with and without a variant at the SAE's block
    /// (per-token SAE encode, two edits, a set_when and an abort_when that never fires),
    /// interleaved, medians and their ratio.
    BenchSteer {
        /// The SAE (the compact file).
        #[arg(long, default_value = "public/sae/kindling-sae.f16.safetensors")]
        sae: PathBuf,
        /// Tokens decoded per measurement.
        #[arg(long, default_value_t = 128)]
        decode: usize,
        /// Timed repetitions of each (after one warm-up of each).
        #[arg(long, default_value_t = 5)]
        reps: usize,
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
        /// Decode this many sequences together (aggregate tok/s; 1 = single stream).
        #[arg(long, default_value_t = 1)]
        batch: usize,
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
    if let Command::Tokens { files } = &cli.command {
        return count_tokens(&cli.model, files);
    }
    let loaded = Instant::now();
    let model = Model::load(&cli.model, cli.backend)?;
    let load_s = loaded.elapsed().as_secs_f64();
    let rss_after_load = resident_mib();
    match cli.command {
        Command::Chat {
            prompt,
            system,
            temperature,
            top_k,
            top_p,
            max_tokens,
            seed,
        } => {
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
        Command::Tokens { .. } => unreachable!("handled before loading the model"),
        Command::BenchSteer { sae, decode, reps } => bench_steer(&model, &sae, decode, reps)?,
        Command::Autosteer {
            description,
            sae_dir,
            atlas_dir,
            prompt,
        } => autosteer(&model, &sae_dir, &atlas_dir, &description, prompt)?,
        Command::Bench {
            prefill,
            decode,
            reps,
            json,
            batch,
        } => {
            let threads = rayon::current_num_threads();
            let result = bench(&model, prefill, decode, reps, batch.max(1))?;
            let rss = resident_mib();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "engine": "kindling", "backend": cli.backend.to_string(), "threads": threads,
                        "prefill_tokens": prefill, "decode_tokens": decode,
                        "prefill_tok_s": result.0, "decode_tok_s": result.1, "other_cores": result.2,
                        "batch": batch, "load_s": load_s, "rss_after_load_mib": rss_after_load, "rss_mib": rss,
                    })
                );
            } else {
                println!(
                    "backend {} · {threads} threads · load {load_s:.2} s · resident {rss_after_load:.0} MiB after load, {rss:.0} MiB after the runs",
                    cli.backend
                );
                println!("prefill {prefill}: median {:.1} tok/s  {:?}", median(&result.0), result.0);
                println!("decode {decode}: median {:.1} tok/s  {:?}", median(&result.1), result.1);
            }
        }
    }
    Ok(())
}

/// Counts tokens with the tokenizer alone (no network weights are loaded).
fn count_tokens(model: &std::path::Path, files: &[PathBuf]) -> Result<(), Box<dyn std::error::Error>> {
    let bytes = std::fs::read(model)?;
    let gguf = kindling_engine::gguf::Gguf::parse(&bytes)?;
    let tokenizer = kindling_engine::Tokenizer::from_gguf(&gguf)?;
    let mut out = std::io::stdout().lock();
    let mut count = |name: &str, text: &str| -> std::io::Result<()> {
        writeln!(out, "{}\t{}\t{name}", tokenizer.encode(text, false).len(), text.chars().count())
    };
    if files.is_empty() {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
        count("-", &text)?;
    }
    for file in files {
        count(&file.display().to_string(), &std::fs::read_to_string(file)?)?;
    }
    Ok(())
}

/// Prefill: the first `prefill` tokens of the GPL-3 text (the llama.cpp benchmark's prompt);
/// decode: `decode` greedy tokens after a short chat prompt, ignoring `<|im_end|>`.
/// Prefill rates, decode rates, and for each timed region (prefills, then decodes) the CPU
/// other processes used, in cores: a busy machine invalidates the comparison.
type BenchResult = (Vec<f64>, Vec<f64>, Vec<f64>);

fn bench(model: &Model, prefill: usize, decode: usize, reps: usize, batch: usize) -> Result<BenchResult, EngineError> {
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3")
        .unwrap_or_else(|_| "The quick brown fox jumps over the lazy dog. ".repeat(200));
    let mut tokens = model.tokenizer.encode(&text, false);
    tokens.truncate(prefill);
    let chat = model.tokenizer.encode(
        "<|im_start|>user\nWrite a long story about a pirate who finds a treasure map.<|im_end|>\n<|im_start|>assistant\n",
        true,
    );
    let (mut prefill_rates, mut decode_rates) = (Vec::new(), Vec::new());
    let (mut prefill_other, mut decode_other) = (Vec::new(), Vec::new());
    for rep in 0..=reps {
        let mut cache = model.llama.new_cache();
        let meter = Meter::start();
        let start = Instant::now();
        let logits = model.llama.forward(&tokens, &mut cache, None, Logits::Last)?;
        drop(logits.map(|l| l.into_data()));
        let prefill_s = start.elapsed().as_secs_f64();
        let prefill_busy = meter.other_cores();

        let mut caches = vec![model.llama.new_cache(); batch];
        let mut next = Vec::with_capacity(batch);
        for cache in &mut caches {
            let logits = model.llama.forward(&chat, cache, None, Logits::Last)?.expect("logits");
            next.push(argmax_of(logits)?);
        }
        let meter = Meter::start();
        let start = Instant::now();
        for _ in 0..decode {
            next = if batch == 1 {
                let logits = model.llama.forward(&next, &mut caches[0], None, Logits::Last)?.expect("logits");
                vec![argmax_of(logits)?]
            } else {
                let logits = model.llama.forward_batch(&next, &mut caches)?;
                let values = to_host(logits)?;
                values
                    .chunks_exact(values.len() / batch)
                    .map(kindling_engine::sampling::argmax)
                    .collect()
            };
        }
        let decode_s = start.elapsed().as_secs_f64();
        let decode_busy = meter.other_cores();
        if rep > 0 {
            prefill_rates.push(round1(tokens.len() as f64 / prefill_s));
            decode_rates.push(round1((decode * batch) as f64 / decode_s));
            prefill_other.push(prefill_busy);
            decode_other.push(decode_busy);
        }
    }
    prefill_other.extend(decode_other);
    Ok((prefill_rates, decode_rates, prefill_other))
}

/// Runs AutoSteer and prints its choice and trials.
fn autosteer(
    model: &Model,
    sae_dir: &std::path::Path,
    atlas_dir: &std::path::Path,
    description: &str,
    prompt: Option<String>,
) -> Result<(), Box<dyn std::error::Error>> {
    use kindling_engine::autosteer::{AutoSteerOptions, auto_steer};
    use kindling_engine::{Atlas, CancelToken, Sae, Steer, Variant};
    let sae = Sae::from_compact(&std::fs::read(sae_dir.join("kindling-sae.f16.safetensors"))?)?;
    let atlas = Atlas::load_dir(atlas_dir, &sae, false)?;
    let result = auto_steer(model, &sae, &atlas, description, &AutoSteerOptions::default())?;
    let concept: Vec<String> = result
        .concept_tokens
        .iter()
        .map(|&t| model.tokenizer.decode(&[t], false).unwrap_or_default())
        .collect();
    println!("concept tokens: {concept:?}");
    for example in &result.examples {
        println!("example: {example:?}");
    }
    for t in &result.trials {
        let edits: Vec<String> = t
            .edits
            .iter()
            .map(|e| {
                format!(
                    "#{} {:+.1} ({})",
                    e.feature,
                    e.value,
                    atlas.feature(e.feature).map(|f| f.label.as_str()).unwrap_or("?")
                )
            })
            .collect();
        println!(
            "{} effect {:+.1} perplexity {:.1}x distinct-2 {:.2}  {}",
            if t.accepted { "+" } else { " " },
            t.effect,
            t.perplexity_ratio,
            t.distinct,
            edits.join(" & ")
        );
        println!("      {:?}", t.sample);
    }
    println!("chosen: {:?}", result.edits);
    if let Some(prompt) = prompt {
        let tokens = model.tokenizer.encode_chat(&[ChatMessage::user(prompt)])?;
        let units = kindling_engine::steer::Units::new(&sae, atlas.units());
        let mut variant = Variant::new("SmolLM2-135M-Instruct");
        variant.edits = result.edits.clone();
        for (name, hook) in [
            ("base", None),
            (
                "steered",
                Some(Box::new(Steer::new(&sae, &units, variant)?) as Box<dyn kindling_engine::ResidualHook>),
            ),
        ] {
            let text = model
                .generate(tokens.clone(), SamplingParams::greedy(64), hook, CancelToken::new())?
                .collect_text()?;
            println!("{name}: {text}");
        }
    }
    Ok(())
}

/// Greedy decode rates (tok/s) without and with a steering variant, alternating.
fn bench_steer(model: &Model, sae_path: &std::path::Path, decode: usize, reps: usize) -> Result<(), Box<dyn std::error::Error>> {
    use kindling_engine::steer::{Condition, Edit, Operand, Operator};
    use kindling_engine::{CancelToken, ResidualHook, Sae, Steer, Variant};
    let sae = Sae::from_compact(&std::fs::read(sae_path)?)?;
    let units = kindling_engine::steer::Units::uniform(sae.config().d_sae, 4.0);
    let mut variant = Variant::new("SmolLM2-135M-Instruct");
    variant.set(&[1, 2], 0.5);
    variant.set_when(
        Condition::when(vec![3, 4], Operator::Gt, Operand::Number(0.5)),
        vec![Edit::nudge(5, 0.3)],
    );
    variant.abort_when(Condition::when(vec![6], Operator::Gt, Operand::Number(1e9)), "never");
    let prompt = model
        .tokenizer
        .encode_chat(&[ChatMessage::user("Write a long story about a pirate who finds a treasure map.")])?;
    // Decode only: the clock starts after the prompt's forward pass (the first token).
    let rate = |steer: bool| -> Result<f64, Box<dyn std::error::Error>> {
        let hook: Option<Box<dyn ResidualHook>> = if steer {
            Some(Box::new(Steer::new(&sae, &units, variant.clone())?))
        } else {
            None
        };
        let params = SamplingParams {
            max_tokens: decode + 1,
            ..SamplingParams::greedy(decode + 1)
        };
        let mut stream = model.generate(prompt.clone(), params, hook, CancelToken::new())?;
        stream.next().transpose()?;
        let start = Instant::now();
        let mut n = 0;
        for token in &mut stream {
            token?;
            n += 1;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    };
    let (mut base, mut steered) = (Vec::new(), Vec::new());
    for rep in 0..=reps {
        // Alternate which goes first, so drift on the machine falls on both.
        let (b, s) = if rep % 2 == 0 {
            (rate(false)?, rate(true)?)
        } else {
            let s = rate(true)?;
            (rate(false)?, s)
        };
        if rep > 0 {
            base.push(round1(b));
            steered.push(round1(s));
        }
    }
    let (mb, ms) = (median(&base), median(&steered));
    println!(
        "decode {decode}, {} threads: base median {mb:.1} tok/s {base:?}",
        rayon::current_num_threads()
    );
    println!("steered (SAE encode per token, 2 edits, 2 scopes): median {ms:.1} tok/s {steered:?}");
    println!("steering adds {:.1}% to decode time", (mb / ms - 1.0) * 100.0);
    Ok(())
}

/// CPU time used by other processes over a region, from `/proc/stat` minus this process's
/// own (Linux; NaN elsewhere). Clock ticks are assumed to be 100 Hz, as on every Linux build
/// this runs on.
struct Meter {
    start: Instant,
    machine_s: f64,
    own_s: f64,
}

impl Meter {
    fn start() -> Self {
        Self {
            start: Instant::now(),
            machine_s: machine_busy_s(),
            own_s: own_cpu_s(),
        }
    }

    fn other_cores(&self) -> f64 {
        let wall = self.start.elapsed().as_secs_f64();
        let other = (machine_busy_s() - self.machine_s) - (own_cpu_s() - self.own_s);
        ((other.max(0.0) / wall) * 1000.0).round() / 1000.0
    }
}

const CLOCK_TICKS_PER_S: f64 = 100.0;

fn machine_busy_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: everything but idle and iowait.
    let busy: f64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| fields.get(i)).sum();
    if fields.is_empty() { f64::NAN } else { busy / CLOCK_TICKS_PER_S }
}

fn own_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (field(11), field(12)) {
        (Some(u), Some(s)) => (u + s) / CLOCK_TICKS_PER_S,
        _ => f64::NAN,
    }
}

fn argmax_of(logits: burn::tensor::Tensor<2>) -> Result<u32, EngineError> {
    Ok(kindling_engine::sampling::argmax(&to_host(logits)?))
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
