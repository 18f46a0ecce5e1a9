//! A TopK sparse autoencoder on the residual stream after one block: load, encode, decode.
//!
//! ```text
//! encode:  f = TopK_k( ReLU( (x − b_dec) · W_enc + b_enc ) )      sparse (latent, activation) pairs
//! decode:  x̂ = b_dec + Σ f_i · W_dec[i]
//! error:   e = x − x̂          x = x̂ + e exactly, so edits to f keep everything the SAE misses
//! ```
//!
//! Weights work on raw residual activations: the input normalisation used in training is
//! folded into them at export (see `docs/SAE.md`). Two files hold the same SAE:
//! * SAELens layout: `cfg.json` + `sae_weights.safetensors` (`W_enc [d_in, d_sae]`,
//!   `W_dec [d_sae, d_in]`, `b_enc`, `b_dec`; f32), read with [`Sae::from_saelens`];
//! * the compact file the browser loads: the same tensors in f16 with the config in the
//!   safetensors metadata under `"kindling_sae"`, read with [`Sae::from_compact`].
//!
//! Only the compact file is committed; [`saelens_from_compact`] (the command
//! `kindling-build export-saelens`) writes the SAELens layout from it.

use std::collections::HashMap;
use std::ops::Range;

use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::gguf::TensorType;
use crate::hook::ResidualHook;
use crate::llama::Config;
use crate::quant::QMatrix;

/// A latent index and its activation.
pub type Feature = (u32, f32);

/// What an SAE is and where it reads the model.
#[derive(Debug, Clone, PartialEq)]
pub struct SaeConfig {
    pub d_in: usize,
    pub d_sae: usize,
    /// Active latents per token.
    pub k: usize,
    /// The residual stream after this block (0-based), `blocks.{layer}.hook_resid_post`.
    pub layer: usize,
    /// The model it was trained on (SHA-256 of the GGUF), when recorded.
    pub model_sha256: Option<String>,
}

impl SaeConfig {
    /// The TransformerLens hook name SAELens records.
    pub fn hook_name(&self) -> String {
        format!("blocks.{}.hook_resid_post", self.layer)
    }

    /// Reads the fields Kindling needs from a SAELens `cfg.json` (or the compact file's
    /// metadata, which uses the same names).
    pub fn from_json(text: &str) -> Result<Self, SaeError> {
        let v: Value = serde_json::from_str(text).map_err(|e| SaeError::Config(format!("not JSON: {e}")))?;
        let int = |key: &str| {
            v[key]
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| SaeError::Config(format!("\"{key}\" must be a non-negative integer")))
        };
        let architecture = v["architecture"].as_str().unwrap_or("topk");
        if architecture != "topk" {
            return Err(SaeError::Config(format!(
                "architecture \"{architecture}\" is not supported (only \"topk\")"
            )));
        }
        let hook = v["metadata"]["hook_name"].as_str().or(v["hook_name"].as_str());
        let hook = hook.ok_or_else(|| SaeError::Config("missing hook_name".into()))?;
        let layer = hook
            .strip_prefix("blocks.")
            .and_then(|s| s.strip_suffix(".hook_resid_post"))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| SaeError::Config(format!("hook_name \"{hook}\" is not blocks.<layer>.hook_resid_post")))?;
        if v["normalize_activations"].as_str().is_some_and(|n| n != "none") {
            return Err(SaeError::Config(
                "normalize_activations must be \"none\" (Kindling folds the scale into the weights)".into(),
            ));
        }
        let model_sha256 = v["metadata"]["model_sha256"].as_str().map(str::to_string);
        let cfg = Self {
            d_in: int("d_in")?,
            d_sae: int("d_sae")?,
            k: int("k")?,
            layer,
            model_sha256,
        };
        if cfg.k == 0 || cfg.k > cfg.d_sae || cfg.d_in == 0 {
            return Err(SaeError::Config(format!("k = {} must be in 1..={} and d_in > 0", cfg.k, cfg.d_sae)));
        }
        Ok(cfg)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SaeError {
    #[error("SAE config: {0}")]
    Config(String),
    #[error("SAE weights: {0}")]
    File(String),
    #[error("SAE tensor {name}: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: &'static str,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("SAE tensor {name}: dtype {dtype} is not supported (f32 or f16)")]
    Dtype { name: &'static str, dtype: String },
    #[error("SAE tensor {0} contains a NaN or infinite value")]
    NotFinite(&'static str),
    #[error("the SAE does not fit this model: {0}")]
    Model(String),
}

/// A TopK SAE with its weights on the host, row-major.
#[derive(Debug, Clone)]
pub struct Sae {
    cfg: SaeConfig,
    /// `[d_in, d_sae]`.
    w_enc: Vec<f32>,
    b_enc: Vec<f32>,
    /// `[d_sae, d_in]`.
    w_dec: Vec<f32>,
    b_dec: Vec<f32>,
    /// SHA-256 of the file bytes it was loaded from (the atlas checks it belongs to this SAE).
    sha256: Option<String>,
    /// `W_encᵀ` in Q8_0 blocks (`[d_sae, d_in]`) for encoding a few rows at a time (decode
    /// steps): a per-token encode is memory-bound, and 8 bits read a quarter of the f32 bytes
    /// (4.7 MB instead of 18.9 MB for 8,192 × 576). Prefill and evaluation use the f32 weights.
    w_enc_q8: Option<QMatrix>,
}

/// Rows up to which [`Sae::pre_activations`] takes the 8-bit encoder.
const Q8_ENCODE_MAX_ROWS: usize = 4;

/// `W_encᵀ` (`w_enc` is `[d_in, d_sae]`) as Q8_0: per block of 32 inputs one f16 scale and 32
/// signed bytes, as GGUF stores it.
fn encoder_q8(w_enc: &[f32], d_in: usize, d_sae: usize) -> Option<QMatrix> {
    if !d_in.is_multiple_of(32) {
        return None;
    }
    // Transposed in 32 × 32 tiles first: walking a column of `w_enc` touches a new cache line
    // for every value, which made this most of loading the SAE in the browser.
    const TILE: usize = 32;
    let mut rows = vec![0f32; d_sae * d_in];
    for i0 in (0..d_in).step_by(TILE) {
        for j0 in (0..d_sae).step_by(TILE) {
            for i in i0..(i0 + TILE).min(d_in) {
                for j in j0..(j0 + TILE).min(d_sae) {
                    rows[j * d_in + i] = w_enc[i * d_sae + j];
                }
            }
        }
    }
    let mut bytes = Vec::with_capacity(d_sae * d_in / 32 * 34);
    for row in rows.chunks_exact(d_in) {
        for block in row.chunks_exact(32) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = half::f16::from_f32(amax / 127.0);
            let inv = if d.to_f32() > 0.0 { 1.0 / d.to_f32() } else { 0.0 };
            bytes.extend(d.to_le_bytes());
            bytes.extend(block.iter().map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8));
        }
    }
    QMatrix::try_from_gguf(TensorType::Q8_0, d_sae, d_in, &bytes).ok()
}

impl Sae {
    /// An SAE from its weights, checked for shape and finiteness.
    pub fn new(cfg: SaeConfig, w_enc: Vec<f32>, b_enc: Vec<f32>, w_dec: Vec<f32>, b_dec: Vec<f32>) -> Result<Self, SaeError> {
        let (d, s) = (cfg.d_in, cfg.d_sae);
        for (name, data, shape) in [
            ("W_enc", &w_enc, vec![d, s]),
            ("b_enc", &b_enc, vec![s]),
            ("W_dec", &w_dec, vec![s, d]),
            ("b_dec", &b_dec, vec![d]),
        ] {
            if Some(data.len()) != shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b)) {
                return Err(SaeError::Shape {
                    name,
                    expected: shape,
                    found: vec![data.len()],
                });
            }
            if data.iter().any(|x| !x.is_finite()) {
                return Err(SaeError::NotFinite(name));
            }
        }
        let w_enc_q8 = encoder_q8(&w_enc, d, s);
        Ok(Self {
            cfg,
            w_enc,
            b_enc,
            w_dec,
            b_dec,
            sha256: None,
            w_enc_q8,
        })
    }

    /// Loads the SAELens layout: `cfg.json` text and `sae_weights.safetensors` bytes.
    pub fn from_saelens(cfg_json: &str, weights: &[u8]) -> Result<Self, SaeError> {
        let mut sae = Self::from_tensors(SaeConfig::from_json(cfg_json)?, weights)?;
        sae.sha256 = Some(format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(weights)));
        Ok(sae)
    }

    /// SHA-256 (hex) of the weights file this SAE was loaded from; `None` when it was built
    /// from weights in memory.
    pub fn sha256(&self) -> Option<&str> {
        self.sha256.as_deref()
    }

    /// Loads the compact file (f16 or f32 tensors, config in the metadata).
    pub fn from_compact(bytes: &[u8]) -> Result<Self, SaeError> {
        let mut sae = Self::compact_unhashed(bytes)?;
        sae.sha256 = Some(format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(bytes)));
        Ok(sae)
    }

    /// [`from_compact`](Self::from_compact) for bytes whose SHA-256 (hex) the caller has just
    /// checked, such as a download verified against the SAE's manifest: hashing 19 MB again in
    /// wasm was a large part of the page's load.
    pub fn from_compact_checked(bytes: &[u8], sha256: &str) -> Result<Self, SaeError> {
        let mut sae = Self::compact_unhashed(bytes)?;
        sae.sha256 = Some(sha256.to_ascii_lowercase());
        Ok(sae)
    }

    fn compact_unhashed(bytes: &[u8]) -> Result<Self, SaeError> {
        let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| SaeError::File(e.to_string()))?;
        let cfg = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("kindling_sae"))
            .ok_or_else(|| SaeError::Config("the file carries no \"kindling_sae\" metadata".into()))?;
        Self::from_tensors(SaeConfig::from_json(cfg)?, bytes)
    }

    fn from_tensors(cfg: SaeConfig, bytes: &[u8]) -> Result<Self, SaeError> {
        let file = SafeTensors::deserialize(bytes).map_err(|e| SaeError::File(e.to_string()))?;
        let (d, s) = (cfg.d_in, cfg.d_sae);
        let read = |name: &'static str, shape: &[usize]| -> Result<Vec<f32>, SaeError> {
            let t = file.tensor(name).map_err(|_| SaeError::File(format!("tensor {name} is missing")))?;
            if t.shape() != shape {
                return Err(SaeError::Shape {
                    name,
                    expected: shape.to_vec(),
                    found: t.shape().to_vec(),
                });
            }
            let data = t.data();
            Ok(match t.dtype() {
                Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                other => {
                    return Err(SaeError::Dtype {
                        name,
                        dtype: format!("{other:?}"),
                    });
                }
            })
        };
        Self::new(
            cfg,
            read("W_enc", &[d, s])?,
            read("b_enc", &[s])?,
            read("W_dec", &[s, d])?,
            read("b_dec", &[d])?,
        )
    }

    /// Fails unless this SAE reads a residual stream that `model` has.
    pub fn check_model(&self, model: &Config, model_sha256: Option<&str>) -> Result<(), SaeError> {
        if self.cfg.d_in != model.n_embd {
            return Err(SaeError::Model(format!(
                "d_in {} but the model's residual is {} wide",
                self.cfg.d_in, model.n_embd
            )));
        }
        if self.cfg.layer >= model.n_layer {
            return Err(SaeError::Model(format!(
                "layer {} but the model has {} blocks",
                self.cfg.layer, model.n_layer
            )));
        }
        if let (Some(want), Some(have)) = (&self.cfg.model_sha256, model_sha256)
            && want != have
        {
            return Err(SaeError::Model(format!("trained on model {want}, loaded {have}")));
        }
        Ok(())
    }

    pub fn config(&self) -> &SaeConfig {
        &self.cfg
    }

    /// The tensors by SAELens name, row-major f32 (for export).
    pub fn tensors(&self) -> [(&'static str, &[f32], Vec<usize>); 4] {
        let (d, s) = (self.cfg.d_in, self.cfg.d_sae);
        [
            ("W_enc", &self.w_enc, vec![d, s]),
            ("b_enc", &self.b_enc, vec![s]),
            ("W_dec", &self.w_dec, vec![s, d]),
            ("b_dec", &self.b_dec, vec![d]),
        ]
    }

    /// The SAE as a safetensors file: its four tensors in f16 (`as_f16`) or f32, with `cfg`
    /// (SAELens field names, see [`saelens_cfg`]) in the metadata under `"kindling_sae"`.
    /// [`from_compact`](Self::from_compact) reads it back.
    pub fn to_safetensors(&self, as_f16: bool, cfg: &Value) -> Result<Vec<u8>, SaeError> {
        let dtype = if as_f16 { Dtype::F16 } else { Dtype::F32 };
        let encoded: Vec<(&str, Vec<u8>, Vec<usize>)> = self
            .tensors()
            .into_iter()
            .map(|(name, data, shape)| {
                let bytes = if as_f16 {
                    data.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect()
                } else {
                    data.iter().flat_map(|x| x.to_le_bytes()).collect()
                };
                (name, bytes, shape)
            })
            .collect();
        let views = encoded
            .iter()
            .map(|(name, bytes, shape)| Ok((name.to_string(), safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
            .map_err(|e| SaeError::File(e.to_string()))?;
        // `collect` builds whichever map type safetensors was compiled with (std or alloc).
        let metadata = [("kindling_sae".to_string(), cfg.to_string())].into_iter().collect();
        safetensors::serialize(views, Some(metadata)).map_err(|e| SaeError::File(e.to_string()))
    }

    /// Decoder direction of latent `i` (`d_in` wide).
    /// The typical norm of the residual this SAE reads: `√d_in` × the median decoder row
    /// norm. Kindling trains with SAELens's `expected_average_only_in` normalisation (inputs
    /// scaled to norm `√d_in`, decoder rows of unit norm) and folds the scale into the
    /// weights, so this is exactly the mean residual norm of its training data (171.9 for the
    /// shipped SAE; the median over the steering evaluation's prompts is 173.7). For an SAE
    /// trained otherwise it is an estimate.
    pub fn residual_norm(&self) -> f32 {
        let d = self.cfg.d_in;
        let mut norms: Vec<f32> = self
            .w_dec
            .chunks_exact(d)
            .map(|r| r.iter().map(|w| w * w).sum::<f32>().sqrt())
            .collect();
        norms.sort_by(f32::total_cmp);
        (d as f32).sqrt() * norms.get(norms.len() / 2).copied().unwrap_or(1.0)
    }

    pub fn decoder_row(&self, i: usize) -> &[f32] {
        &self.w_dec[i * self.cfg.d_in..(i + 1) * self.cfg.d_in]
    }

    /// Pre-activations `(x − b_dec) · W_enc + b_enc` for `rows` residual vectors
    /// (`x` row-major `[rows, d_in]`), row-major `[rows, d_sae]`.
    pub fn pre_activations(&self, x: &[f32]) -> Vec<f32> {
        let (d, s) = (self.cfg.d_in, self.cfg.d_sae);
        let rows = x.len() / d;
        let centred: Vec<f32> = x
            .chunks_exact(d)
            .flat_map(|r| r.iter().zip(&self.b_dec).map(|(a, b)| a - b))
            .collect();
        if let Some(q8) = self.w_enc_q8.as_ref().filter(|_| rows <= Q8_ENCODE_MAX_ROWS) {
            let mut out = q8.matmul(&centred);
            out.iter_mut().zip(self.b_enc.iter().cycle()).for_each(|(o, b)| *o += b);
            return out;
        }
        let mut out: Vec<f32> = self.b_enc.iter().copied().cycle().take(rows * s).collect();
        matmul_accumulate(&centred, &self.w_enc, &mut out, rows, d, s);
        out
    }

    /// Encodes `rows` residual vectors (`[rows, d_in]`) to their active latents, strongest
    /// first (at most `k` each, all with positive activation).
    pub fn encode(&self, x: &[f32]) -> Vec<Vec<Feature>> {
        assert_eq!(x.len() % self.cfg.d_in, 0, "residual rows are d_in wide");
        let pre = self.pre_activations(x);
        pre.chunks_exact(self.cfg.d_sae)
            .map(|row| top_k_positive(row, self.cfg.k))
            .collect()
    }

    /// The reconstruction `b_dec + Σ f_i · W_dec[i]` of one token's features.
    pub fn decode(&self, features: &[Feature]) -> Vec<f32> {
        let mut out = self.b_dec.clone();
        for &(i, a) in features {
            for (o, w) in out.iter_mut().zip(self.decoder_row(i as usize)) {
                *o += a * w;
            }
        }
        out
    }

    /// Reconstructions of `rows` residual vectors, `[rows, d_in]`.
    pub fn reconstruct(&self, x: &[f32]) -> Vec<f32> {
        self.encode(x).iter().flat_map(|f| self.decode(f)).collect()
    }

    /// The error term `x − reconstruction(x)`, `[rows, d_in]`.
    pub fn error(&self, x: &[f32]) -> Vec<f32> {
        x.iter().zip(self.reconstruct(x)).map(|(a, b)| a - b).collect()
    }
}

/// `out[rows, n] += a[rows, k] · b[k, n]` (all row-major), with the gemm crate.
fn matmul_accumulate(a: &[f32], b: &[f32], out: &mut [f32], rows: usize, k: usize, n: usize) {
    #[cfg(not(target_arch = "wasm32"))]
    let parallelism = if rows * k * n >= 1 << 20 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    #[cfg(target_arch = "wasm32")]
    let parallelism = gemm::Parallelism::None;
    // SAFETY: the pointers and strides describe the three row-major buffers exactly, whose
    // lengths the callers derive from the same dimensions; `out` does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            true,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The `k` largest positive values of `row` as (index, value), largest first (ties: lower index).
pub fn top_k_positive(row: &[f32], k: usize) -> Vec<Feature> {
    let mut idx: Vec<u32> = (0..row.len() as u32).filter(|&i| row[i as usize] > 0.0).collect();
    let by_value = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if idx.len() > k {
        idx.select_nth_unstable_by(k - 1, by_value);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by_value);
    idx.into_iter().map(|i| (i, row[i as usize])).collect()
}

/// The residual as host rows.
pub(crate) fn residual_rows(residual: &Tensor<2>) -> Vec<f32> {
    // A hook cannot return an error; the residual is the model's own f32 tensor.
    crate::host::to_host(residual.clone()).expect("the residual reads back as f32")
}

/// Records the active SAE features at every token a forward pass sees (prefill and each
/// decode step), leaving the residual untouched.
#[derive(Debug)]
pub struct FeatureCapture<'s> {
    sae: &'s Sae,
    /// Per position seen so far, its features, strongest first.
    pub features: Vec<Vec<Feature>>,
    /// The positions of `features` (as the forward pass numbers them).
    pub positions: Vec<usize>,
}

impl<'s> FeatureCapture<'s> {
    pub fn new(sae: &'s Sae) -> Self {
        Self {
            sae,
            features: Vec::new(),
            positions: Vec::new(),
        }
    }
}

impl ResidualHook for FeatureCapture<'_> {
    fn wants(&self, layer: usize) -> bool {
        layer == self.sae.cfg.layer
    }

    fn last_layer(&self) -> Option<usize> {
        Some(self.sae.cfg.layer)
    }

    fn after_block(&mut self, _layer: usize, positions: Range<usize>, residual: Tensor<2>) -> Tensor<2> {
        self.features.extend(self.sae.encode(&residual_rows(&residual)));
        self.positions.extend(positions);
        residual
    }
}

/// What [`Splice`] puts back into the residual stream at the SAE's block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceMode {
    /// The reconstruction plus the error term: the model is unchanged up to float rounding.
    ReconstructionPlusError,
    /// The reconstruction alone (how much the model loses to the SAE).
    Reconstruction,
    /// Zeros (the baseline of "CE loss recovered").
    ZeroAblate,
}

/// Replaces the residual after the SAE's block at every position except those it is told to
/// leave alone (typically position 0, the attention sink whose norm is ~100× the rest, and
/// control tokens, which the SAE was not trained on).
#[derive(Debug)]
pub struct Splice<'s> {
    sae: &'s Sae,
    mode: SpliceMode,
    /// `leave[p]`: position `p` keeps the model's own residual (positions past the end are spliced).
    leave: Vec<bool>,
}

impl<'s> Splice<'s> {
    pub fn new(sae: &'s Sae, mode: SpliceMode) -> Self {
        Self {
            sae,
            mode,
            leave: Vec::new(),
        }
    }

    /// Leaves the positions `p` with `leave[p]` untouched.
    pub fn leaving(mut self, leave: Vec<bool>) -> Self {
        self.leave = leave;
        self
    }
}

impl ResidualHook for Splice<'_> {
    fn wants(&self, layer: usize) -> bool {
        layer == self.sae.cfg.layer
    }

    fn last_layer(&self) -> Option<usize> {
        Some(self.sae.cfg.layer)
    }

    fn after_block(&mut self, _layer: usize, positions: Range<usize>, residual: Tensor<2>) -> Tensor<2> {
        let [rows, d] = residual.dims();
        let mut x = residual_rows(&residual);
        for (row, p) in x.chunks_exact_mut(d).zip(positions) {
            if self.leave.get(p).copied().unwrap_or(false) {
                continue;
            }
            match self.mode {
                SpliceMode::ReconstructionPlusError => {
                    let recon = self.sae.reconstruct(row);
                    row.iter_mut().zip(&recon).for_each(|(x, r)| *x = r + (*x - r));
                }
                SpliceMode::Reconstruction => row.copy_from_slice(&self.sae.reconstruct(row)),
                SpliceMode::ZeroAblate => row.fill(0.0),
            }
        }
        Tensor::from_data(TensorData::new(x, [rows, d]), &residual.device())
    }
}

/// The config JSON written into the compact file's metadata and SAELens `cfg.json`.
pub fn saelens_cfg(cfg: &SaeConfig, extra_metadata: &HashMap<String, Value>) -> Value {
    let mut metadata = serde_json::json!({
        "model_name": "SmolLM2-135M-Instruct",
        "hook_name": cfg.hook_name(),
        "hook_head_index": null,
        "prepend_bos": false,
        "model_sha256": cfg.model_sha256,
    });
    for (key, value) in extra_metadata {
        metadata[key] = value.clone();
    }
    serde_json::json!({
        "architecture": "topk",
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "k": cfg.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": true,
        "normalize_activations": "none",
        "rescale_acts_by_decoder_norm": false,
        "reshape_activations": "none",
        "hook_name": cfg.hook_name(),
        "metadata": metadata,
    })
}

/// The SAELens layout of an SAE: `cfg.json` text and `sae_weights.safetensors` bytes.
#[derive(Debug, Clone)]
pub struct SaelensFiles {
    pub cfg_json: String,
    pub weights: Vec<u8>,
}

/// The SAELens files holding the same SAE as a compact file. f16 → f32 is exact, so the f32
/// weights are the compact file's values; `cfg.json` is the config from its metadata. The
/// output depends on nothing but the input bytes, so an export's SHA-256 can stand for it.
pub fn saelens_from_compact(compact: &[u8]) -> Result<SaelensFiles, SaeError> {
    let sae = Sae::from_compact(compact)?;
    let (_, metadata) = SafeTensors::read_metadata(compact).map_err(|e| SaeError::File(e.to_string()))?;
    let cfg_text = metadata.metadata().as_ref().and_then(|m| m.get("kindling_sae"));
    let cfg: Value =
        serde_json::from_str(cfg_text.ok_or_else(|| SaeError::Config("the file carries no \"kindling_sae\" metadata".into()))?)
            .map_err(|e| SaeError::Config(format!("not JSON: {e}")))?;
    // The weights file carries the config in its metadata too, so that `Sae::from_compact`
    // reads it alone; SAELens ignores the metadata.
    let weights = sae.to_safetensors(false, &cfg)?;
    let cfg_json = serde_json::to_string_pretty(&cfg).expect("a JSON value serialises") + "\n";
    Ok(SaelensFiles { cfg_json, weights })
}
