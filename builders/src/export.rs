//! Writing SAEs: the trainer's output, the shipped form under `public/sae/`, and its SAELens export.
//!
//! * `kindling-sae.f16.safetensors` (committed): the SAE's tensors in f16 with the config in
//!   the metadata, the one file the engine and the browser load.
//! * `manifest.json` (committed): config, corpus, training summary, held-out metrics, sha256
//!   of the compact file and the commands that regenerate it and the SAELens export.
//! * `sae_weights.safetensors` + `cfg.json`: SAELens layout (f32, `W_enc [d_in, d_sae]`,
//!   `W_dec [d_sae, d_in]`, `b_enc`, `b_dec`), loadable with `SAE.load_from_disk`. Not
//!   committed (it doubled the repository's size): `kindling-build export-saelens` writes it
//!   from the compact file, with exactly the compact file's values.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kindling_engine::Sae;
use kindling_engine::sae::{SaelensFiles, saelens_cfg, saelens_from_compact};
use serde_json::{Value, json};

use crate::{BuildError, sha256_file};

pub const SAELENS_WEIGHTS: &str = "sae_weights.safetensors";
pub const SAELENS_CFG: &str = "cfg.json";
pub const COMPACT: &str = "kindling-sae.f16.safetensors";
/// The command that writes the SAELens layout, as the manifest records it.
pub const EXPORT_SAELENS_COMMAND: &str = "kindling-build export-saelens --out <dir>";

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
    write(&args.out.join(COMPACT), &sae.to_safetensors(true, &cfg)?)?;
    // The compact file must load back to the same SAE (up to f16 rounding).
    let compact = Sae::from_compact(&std::fs::read(args.out.join(COMPACT)).map_err(|e| BuildError::io(&args.out, e))?)?;
    if compact.config() != sae.config() {
        return Err(BuildError::Input("the compact file does not read back with the same config".into()));
    }
    let files: Vec<Value> = [COMPACT]
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
        "saelens_export": {
            "command": EXPORT_SAELENS_COMMAND,
            "files": [SAELENS_CFG, SAELENS_WEIGHTS],
            "note": format!("not committed; written from {COMPACT}: its f16 weights as f32 (exact), its config as {SAELENS_CFG}"),
        },
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
            EXPORT_SAELENS_COMMAND,
            ],
        },
    });
    write_json(&args.out.join("manifest.json"), &manifest)?;
    eprintln!("[ship] wrote {} ({COMPACT}, manifest.json)", args.out.display());
    Ok(())
}

/// Writes the SAELens layout (`cfg.json`, `sae_weights.safetensors`) of the compact file
/// `compact` into `out`, then reads the written files back and checks that they hold exactly
/// the compact file's SAE.
pub fn export_saelens(compact: &Path, out: &Path) -> Result<SaelensFiles, BuildError> {
    let compact_bytes = std::fs::read(compact).map_err(|e| BuildError::io(compact, e))?;
    let files = saelens_from_compact(&compact_bytes)?;
    std::fs::create_dir_all(out).map_err(|e| BuildError::io(out, e))?;
    let (cfg_path, weights_path) = (out.join(SAELENS_CFG), out.join(SAELENS_WEIGHTS));
    write(&cfg_path, files.cfg_json.as_bytes())?;
    write(&weights_path, &files.weights)?;
    let cfg_json = std::fs::read_to_string(&cfg_path).map_err(|e| BuildError::io(&cfg_path, e))?;
    let weights = std::fs::read(&weights_path).map_err(|e| BuildError::io(&weights_path, e))?;
    if !same_sae(&Sae::from_saelens(&cfg_json, &weights)?, &Sae::from_compact(&compact_bytes)?) {
        return Err(BuildError::Input(format!(
            "{} does not read back as {}",
            out.display(),
            compact.display()
        )));
    }
    eprintln!(
        "[export-saelens] wrote {} and {} (sha256 {})",
        cfg_path.display(),
        weights_path.display(),
        sha256_file(&weights_path)?
    );
    Ok(files)
}

/// Same config and bitwise the same weights.
fn same_sae(a: &Sae, b: &Sae) -> bool {
    a.config() == b.config()
        && a.tensors()
            .iter()
            .zip(b.tensors().iter())
            .all(|(p, q)| p.0 == q.0 && p.1.len() == q.1.len() && p.1.iter().zip(q.1).all(|(x, y)| x.to_bits() == y.to_bits()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The export of the committed compact SAE, written to disk and read back with the
    /// engine's SAELens reader, holds every weight of the compact file exactly, and its
    /// `cfg.json` is the compact file's config.
    #[test]
    fn the_saelens_export_of_the_shipped_sae_reads_back_equal() {
        let compact = Path::new(env!("CARGO_MANIFEST_DIR")).join("../public/sae").join(COMPACT);
        let out = std::env::temp_dir().join(format!("kindling-export-saelens-{}", std::process::id()));
        let exported = export_saelens(&compact, &out).unwrap();
        let cfg_json = std::fs::read_to_string(out.join(SAELENS_CFG)).unwrap();
        let weights = std::fs::read(out.join(SAELENS_WEIGHTS)).unwrap();
        std::fs::remove_dir_all(&out).unwrap();
        // (`assert!`: a failing `assert_eq!` would print 38 MB.)
        assert!(
            cfg_json == exported.cfg_json && weights == exported.weights,
            "the files on disk differ from the export"
        );

        let compact_bytes = std::fs::read(&compact).unwrap();
        let original = Sae::from_compact(&compact_bytes).unwrap();
        let read_back = Sae::from_saelens(&cfg_json, &weights).unwrap();
        assert_eq!(read_back.config(), original.config());
        for ((name, a, shape_a), (_, b, shape_b)) in read_back.tensors().into_iter().zip(original.tensors()) {
            assert_eq!(shape_a, shape_b, "{name}");
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs");
        }
        // SAELens reads the f32 tensors by these names and shapes.
        let file = safetensors::SafeTensors::deserialize(&weights).unwrap();
        for (name, shape) in [("W_enc", [576, 8192]), ("W_dec", [8192, 576])] {
            let t = file.tensor(name).unwrap();
            assert_eq!((t.dtype(), t.shape()), (safetensors::Dtype::F32, &shape[..]));
        }
        // cfg.json is the compact file's config, and the export is deterministic.
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&compact_bytes).unwrap();
        let embedded: Value = serde_json::from_str(&metadata.metadata().as_ref().unwrap()["kindling_sae"]).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&cfg_json).unwrap(), embedded);
        assert!(
            saelens_from_compact(&compact_bytes).unwrap().weights == weights,
            "a second export differs"
        );
    }
}
