//! Writing SAEs: the trainer's output, and the shipped forms under `public/sae/`.
//!
//! * `sae_weights.safetensors` + `cfg.json`: SAELens layout (f32, `W_enc [d_in, d_sae]`,
//!   `W_dec [d_sae, d_in]`, `b_enc`, `b_dec`), loadable with `SAE.load_from_disk`.
//! * `kindling-sae.f16.safetensors`: the same tensors in f16 with the config in the metadata,
//!   the one file the engine and the browser load.
//! * `manifest.json`: config, corpus, training summary, held-out metrics, sha256 of every
//!   file and the commands that regenerate them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kindling_engine::Sae;
use kindling_engine::sae::saelens_cfg;
use serde_json::{Value, json};

use crate::{BuildError, sha256_file};

pub const SAELENS_WEIGHTS: &str = "sae_weights.safetensors";
pub const SAELENS_CFG: &str = "cfg.json";
pub const COMPACT: &str = "kindling-sae.f16.safetensors";

fn write(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| BuildError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| BuildError::io(path, e))
}

fn write_json(path: &Path, value: &Value) -> Result<(), BuildError> {
    write(path, (serde_json::to_string_pretty(value).expect("JSON") + "\n").as_bytes())
}

/// The trainer's output: `<out>/sae.safetensors` (f32, loadable with `Sae::from_compact`)
/// and `<out>/train.json`.
pub fn write_trained(out: &Path, sae: &Sae, summary: &Value) -> Result<(), BuildError> {
    let cfg = saelens_cfg(sae.config(), &HashMap::new());
    write(&out.join("sae.safetensors"), &sae.to_safetensors(false, &cfg)?)?;
    write_json(&out.join("train.json"), summary)
}

pub struct ShipArgs {
    pub trained: PathBuf,
    pub eval: PathBuf,
    pub corpus_manifest: PathBuf,
    pub layer_comparison: Option<PathBuf>,
    pub out: PathBuf,
    pub command: String,
}

pub fn ship(args: &ShipArgs) -> Result<(), BuildError> {
    let read_json = |path: &Path| -> Result<Value, BuildError> {
        let text = std::fs::read_to_string(path).map_err(|e| BuildError::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| BuildError::Input(format!("{}: {e}", path.display())))
    };
    let trained_path = args.trained.join("sae.safetensors");
    let bytes = std::fs::read(&trained_path).map_err(|e| BuildError::io(&trained_path, e))?;
    let sae = Sae::from_compact(&bytes)?;
    let train = read_json(&args.trained.join("train.json"))?;
    let eval = read_json(&args.eval)?;
    let corpus = read_json(&args.corpus_manifest)?;
    std::fs::create_dir_all(&args.out).map_err(|e| BuildError::io(&args.out, e))?;
    let mut extra = HashMap::new();
    extra.insert(
        "dataset_path".to_string(),
        json!("Kindling SAE corpus (tools/corpus, kindling-build chats)"),
    );
    extra.insert("context_size".to_string(), train["harvest_window"].clone());
    extra.insert(
        "normalization".to_string(),
        json!({
            "training": "expected_average_only_in: inputs scaled by s = sqrt(d_in) / E||x|| during training",
            "input_scale": train["input_scale"],
            "folded": "s is folded into the weights (W_enc *= s, W_dec /= s, b_dec /= s): these weights take raw residuals",
        }),
    );
    let cfg = saelens_cfg(sae.config(), &extra);
    write(&args.out.join(SAELENS_WEIGHTS), &sae.to_safetensors(false, &cfg)?)?;
    write_json(&args.out.join(SAELENS_CFG), &cfg)?;
    write(&args.out.join(COMPACT), &sae.to_safetensors(true, &cfg)?)?;
    // The compact file must load back to the same SAE (up to f16 rounding).
    let compact = Sae::from_compact(&std::fs::read(args.out.join(COMPACT)).map_err(|e| BuildError::io(&args.out, e))?)?;
    if compact.config() != sae.config() {
        return Err(BuildError::Input("the compact file does not read back with the same config".into()));
    }
    let files: Vec<Value> = [SAELENS_CFG, SAELENS_WEIGHTS, COMPACT]
        .iter()
        .map(|f| {
            let path = args.out.join(f);
            let size = std::fs::metadata(&path).map_err(|e| BuildError::io(&path, e))?.len();
            Ok(json!({ "file": f, "bytes": size, "sha256": sha256_file(&path)? }))
        })
        .collect::<Result<_, BuildError>>()?;
    let mut corpus_summary = corpus.clone();
    if let Some(sources) = corpus_summary["sources"].as_array_mut() {
        for s in sources {
            if let Some(o) = s.as_object_mut() {
                o.retain(|k, _| ["name", "kind", "package", "license", "documents", "tokens", "file", "sha256"].contains(&k.as_str()));
            }
        }
    }
    let manifest = json!({
        "version": 1,
        "name": format!("kindling-smollm2-135m-instruct-l{}-topk{}-{}", sae.config().layer, sae.config().k, sae.config().d_sae),
        "model": { "name": "SmolLM2-135M-Instruct", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": sae.config().model_sha256 },
        "config": cfg,
        "training": train,
        "metrics": eval["metrics"],
        "evaluation": eval,
        "layer_comparison": match &args.layer_comparison { Some(p) => read_json(p)?, None => Value::Null },
        "corpus": corpus_summary,
        "files": files,
        "regenerate": {
            "script": "scripts/build_sae.sh",
            "steps": [
            "python3 tools/corpus/build_corpus.py --out data/corpus",
            "python3 tools/corpus/chat_prompts.py --corpus data/corpus --out data/corpus/chat-prompts.jsonl",
            "target/release/kindling-build chats",
            train["harvest_command"],
            train["created_by"],
            eval["created_by"],
            args.command,
            ],
        },
    });
    write_json(&args.out.join("manifest.json"), &manifest)?;
    eprintln!(
        "[ship] wrote {} ({})",
        args.out.display(),
        [SAELENS_CFG, SAELENS_WEIGHTS, COMPACT, "manifest.json"].join(", ")
    );
    Ok(())
}
