//! The Llama architecture of SmolLM2, in burn, in reading order: config → RoPE → cache →
//! linear layers → attention → MLP → block → model.
//!
//! Ported from llama.cpp's `llm_build_llama` (`src/models/llama.cpp`) for GGUF files:
//! pre-norm blocks with RMSNorm, rotary embeddings over **adjacent pairs** (`LLAMA_ROPE_TYPE_NORM`:
//! the GGUF converter permutes Q/K so that llama.cpp rotates `(x[2i], x[2i+1])`, unlike the
//! `rotate_half` form of the Hugging Face checkpoint), grouped-query attention (query head `h`
//! reads KV head `h / (n_head / n_head_kv)`), a SwiGLU MLP, and the token embedding reused as
//! the LM head when the file has no `output.weight` (SmolLM2 ties them; llama.cpp computes
//! `MUL_MAT(token_embd.weight, result_norm)`).
//!
//! One model serves every backend: tensors live on a burn [`Device`]. Linear layers keep their
//! quantized blocks and multiply through `kernels`, the one place a backend's own
//! kernels plug in. Every pass (prefill, decode, batched decode, the browser's asynchronous one)
//! runs the blocks in one loop (`Llama::residual`); what differs between them is where the
//! keys and values go (`Pass`) and what happens between blocks (`BetweenBlocks`).

use std::ops::Range;
use std::sync::{Arc, PoisonError, RwLock};

use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, Device, Tensor, TensorData};

use crate::EngineError;
use crate::backend::Backend;
use crate::between_blocks::{BetweenBlocks, without_waiting};
use crate::fused;
use crate::gguf::{Gguf, TensorType};
use crate::hook::ResidualHook;
use crate::host::{to_host, to_host_async};
use crate::kernels::QuantMatmul;
use crate::quant::QMatrix;
use crate::spinning;
use crate::tokenizer::TokenId;

/// Hyperparameters, resolved from GGUF metadata (`llama.*` keys).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
}

/// Largest context a file may declare: the KV cache and the RoPE tables grow with use up to
/// it, so this bounds a hostile file's claim, not what a real model costs (Llama 3.1, the
/// largest-context Llama, declares 131,072; SmolLM2 8,192).
pub const MAX_CONTEXT: usize = 1 << 20;
/// Largest attention head width (Llama models use 64 or 128; 256 is the largest in llama.cpp's
/// Llama-architecture files).
pub const MAX_HEAD_DIM: usize = 512;
/// Most blocks a file may declare (Llama 3.1 405B has 126).
pub const MAX_LAYERS: usize = 1024;

impl Config {
    /// Reads the hyperparameters of a `general.architecture = llama` file, and checks that they
    /// describe a model the architecture allows (the tensors are checked against them when the
    /// model loads).
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, EngineError> {
        let arch = gguf.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(EngineError::Unsupported(format!("architecture {arch:?} (only llama)")));
        }
        let u = |k: &str| -> Result<usize, EngineError> {
            let v = gguf.get_u64(&format!("llama.{k}"))?;
            usize::try_from(v).map_err(|_| EngineError::Unsupported(format!("llama.{k} = {v} is too large")))
        };
        let n_embd = u("embedding_length")?;
        let n_head = u("attention.head_count")?;
        let n_head_kv = match gguf.metadata.get("llama.attention.head_count_kv") {
            Some(_) => u("attention.head_count_kv")?,
            None => n_head,
        };
        let config = Self {
            n_layer: u("block_count")?,
            n_embd,
            n_ff: u("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim: n_embd / n_head.max(1),
            vocab_size: gguf.get_str_array("tokenizer.ggml.tokens")?.len(),
            context_length: u("context_length")?,
            // llama.cpp's default when the key is absent.
            rope_theta: match gguf.metadata.get("llama.rope.freq_base") {
                Some(_) => gguf.get_f64("llama.rope.freq_base")? as f32,
                None => 10_000.0,
            },
            rms_eps: gguf.get_f64("llama.attention.layer_norm_rms_epsilon")? as f32,
        };
        config.check()?;
        Ok(config)
    }

    /// Fails unless the hyperparameters are ones a Llama can have.
    fn check(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Unsupported(m));
        let (n_head, n_head_kv, n_embd) = (self.n_head, self.n_head_kv, self.n_embd);
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 || n_embd % n_head != 0 {
            return bad(format!("head layout: {n_head} query heads, {n_head_kv} KV heads, width {n_embd}"));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) || self.head_dim > MAX_HEAD_DIM {
            return bad(format!(
                "head width {} (RoPE needs an even width of at most {MAX_HEAD_DIM})",
                self.head_dim
            ));
        }
        if self.n_layer == 0 || self.n_layer > MAX_LAYERS {
            return bad(format!("{} blocks (1 to {MAX_LAYERS} supported)", self.n_layer));
        }
        if self.n_ff == 0 {
            return bad("feed_forward_length 0".into());
        }
        if self.vocab_size == 0 || u32::try_from(self.vocab_size).is_err() {
            return bad(format!("a vocabulary of {} tokens", self.vocab_size));
        }
        if self.context_length == 0 || self.context_length > MAX_CONTEXT {
            return bad(format!("context_length {} (1 to {MAX_CONTEXT} supported)", self.context_length));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope.freq_base {}", self.rope_theta));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad(format!("layer_norm_rms_epsilon {}", self.rms_eps));
        }
        Ok(())
    }
}

/// Rotary embedding tables: `cos`/`sin` of `pos · θ^(-2i/d)`, each entry repeated twice so
/// that it lines up with the pair `(x[2i], x[2i+1])` it rotates.
///
/// The tables cover the positions used so far and grow (doubling, up to the context length)
/// when a pass reaches past them: a file's `context_length` costs nothing until it is used.
#[derive(Debug, Clone)]
struct Rope {
    head_dim: usize,
    theta: f32,
    context_length: usize,
    device: Device,
    /// Shared by clones of the model; only ever grows, with the same values.
    tables: Arc<RwLock<RopeTables>>,
}

#[derive(Debug)]
struct RopeTables {
    positions: usize,
    cos: Tensor<2>,
    sin: Tensor<2>,
}

/// Positions the RoPE tables start with (SmolLM2's whole context).
const ROPE_INITIAL_POSITIONS: usize = 8192;

impl Rope {
    fn new(config: &Config, device: &Device) -> Self {
        let (head_dim, theta) = (config.head_dim, config.rope_theta);
        let positions = config.context_length.min(ROPE_INITIAL_POSITIONS);
        let tables = Self::tables(head_dim, theta, positions, device);
        Self {
            head_dim,
            theta,
            context_length: config.context_length,
            device: device.clone(),
            tables: Arc::new(RwLock::new(tables)),
        }
    }

    fn tables(d: usize, theta: f32, n: usize, device: &Device) -> RopeTables {
        let mut cos = Vec::with_capacity(n * d);
        let mut sin = Vec::with_capacity(n * d);
        for pos in 0..n {
            Self::push_position(d, theta, pos, &mut cos, &mut sin);
        }
        RopeTables {
            positions: n,
            cos: Tensor::from_data(TensorData::new(cos, [n, d]), device),
            sin: Tensor::from_data(TensorData::new(sin, [n, d]), device),
        }
    }

    /// `cos` and `sin` for positions `0..end` at least.
    fn cos_sin(&self, end: usize) -> (Tensor<2>, Tensor<2>) {
        {
            let t = self.tables.read().unwrap_or_else(PoisonError::into_inner);
            if t.positions >= end {
                return (t.cos.clone(), t.sin.clone());
            }
        }
        let mut t = self.tables.write().unwrap_or_else(PoisonError::into_inner);
        if t.positions < end {
            let n = end.max(t.positions.saturating_mul(2)).min(self.context_length.max(end));
            *t = Self::tables(self.head_dim, self.theta, n, &self.device);
        }
        (t.cos.clone(), t.sin.clone())
    }

    /// Appends position `pos`'s row (`head_dim` values) to the `cos` and `sin` tables.
    fn push_position(d: usize, theta: f32, pos: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        for i in 0..d / 2 {
            let freq = theta.powf(-2.0 * i as f32 / d as f32);
            let angle = pos as f32 * freq;
            let (s, c) = angle.sin_cos();
            cos.extend([c, c]);
            sin.extend([s, s]);
        }
    }

    /// `cos` and `sin` for position `pos` in host memory (`head_dim` values each): the fused
    /// path's rotation, computed like the tables' rows.
    fn host_row(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut cos, mut sin) = (Vec::with_capacity(self.head_dim), Vec::with_capacity(self.head_dim));
        Self::push_position(self.head_dim, self.theta, pos, &mut cos, &mut sin);
        (cos, sin)
    }

    /// Rotates `x` (`[heads, seq, head_dim]`) for positions `positions`.
    fn apply(&self, x: Tensor<3>, positions: Range<usize>) -> Tensor<3> {
        let (cos, sin) = self.cos_sin(positions.end);
        let cos = cos.slice([positions.clone()]).unsqueeze::<3>();
        let sin = sin.slice([positions]).unsqueeze::<3>();
        rotate(x, cos, sin)
    }

    /// `cos` and `sin` rows for one position per sequence, `[positions.len(), 1, head_dim]`:
    /// a batched decode step, where every sequence is at its own position.
    fn at_positions(&self, positions: &[usize]) -> (Tensor<3>, Tensor<3>) {
        let d = self.head_dim;
        let (mut cos, mut sin) = (Vec::with_capacity(positions.len() * d), Vec::with_capacity(positions.len() * d));
        for &pos in positions {
            Self::push_position(d, self.theta, pos, &mut cos, &mut sin);
        }
        let shape = [positions.len(), 1, d];
        (
            Tensor::from_data(TensorData::new(cos, shape), &self.device),
            Tensor::from_data(TensorData::new(sin, shape), &self.device),
        )
    }
}

/// RoPE's rotation of `x` (`[a, b, head_dim]`) by `cos` and `sin` (broadcast to its shape):
/// `x·cos + rotate_pairs(x)·sin`, where `rotate_pairs(x)[2i] = -x[2i+1]` and
/// `rotate_pairs(x)[2i+1] = x[2i]`.
fn rotate(x: Tensor<3>, cos: Tensor<3>, sin: Tensor<3>) -> Tensor<3> {
    let [a, b, d] = x.dims();
    let pairs = x.clone().reshape([a, b, d / 2, 2]);
    let even = pairs.clone().slice([0..a, 0..b, 0..d / 2, 0..1]);
    let odd = pairs.slice([0..a, 0..b, 0..d / 2, 1..2]);
    let rotated = Tensor::cat(vec![odd.neg(), even], 3).reshape([a, b, d]);
    x * cos + rotated * sin
}

/// What every layer of one batched decode step shares (see [`Attention::attend_batch`]).
struct BatchStep {
    /// Each sequence's rotation at its own position, `[batch, 1, head_dim]`.
    cos: Tensor<3>,
    sin: Tensor<3>,
    /// Keys read per sequence: the longest sequence's, after this step's.
    keys: usize,
    /// `[batch, 1, 1, keys]`: 0 for the keys a sequence has, −∞ for the padding beyond them.
    padding: Tensor<4>,
}

impl BatchStep {
    fn new(rope: &Rope, caches: &[KvCache], device: &Device) -> Self {
        let positions: Vec<usize> = caches.iter().map(KvCache::len).collect();
        let keys = positions.iter().max().map_or(1, |p| p + 1);
        let padding: Vec<f32> = positions
            .iter()
            .flat_map(|&p| (0..keys).map(move |j| if j <= p { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let (cos, sin) = rope.at_positions(&positions);
        Self {
            cos,
            sin,
            keys,
            padding: Tensor::from_data(TensorData::new(padding, [positions.len(), 1, 1, keys]), device),
        }
    }
}

/// Where a pass's new tokens sit and where their keys and values go: what the passes differ
/// in, inside the blocks.
// One per pass, on the stack: the size of the `Batch` variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum Pass<'a> {
    /// Consecutive positions `cache.len()..` of one sequence (a prefill or a decode step).
    Sequence { rope: &'a Rope, cache: &'a mut KvCache },
    /// The next position of each of several sequences, one token each (a batched decode step).
    /// `step` is what burn's attention shares between layers; the fused path needs none.
    Batch {
        step: Option<BatchStep>,
        caches: &'a mut [KvCache],
    },
}

impl Pass<'_> {
    /// Records that the pass's `tokens` positions are in the cache(s).
    fn advance(self, tokens: usize) {
        match self {
            Pass::Sequence { cache, .. } => cache.len += tokens,
            Pass::Batch { caches, .. } => caches.iter_mut().for_each(|c| c.len += 1),
        }
    }

    /// The caches the pass writes to.
    fn caches(&mut self) -> &mut [KvCache] {
        match self {
            Pass::Sequence { cache, .. } => std::slice::from_mut(&mut **cache),
            Pass::Batch { caches, .. } => caches,
        }
    }

    /// For each of the pass's `rows` new tokens: its cache (an index into
    /// [`caches`](Self::caches)) and its position there.
    fn row_positions(&mut self, rows: usize) -> Vec<(usize, usize)> {
        match self {
            Pass::Sequence { cache, .. } => (cache.len()..cache.len() + rows).map(|pos| (0, pos)).collect(),
            Pass::Batch { caches, .. } => caches.iter().enumerate().map(|(b, c)| (b, c.len())).collect(),
        }
    }

    /// Marks the cache(s) as spent: some blocks hold this pass's keys and values, others not.
    fn truncate(&mut self) {
        match self {
            Pass::Sequence { cache, .. } => cache.truncated = true,
            Pass::Batch { caches, .. } => caches.iter_mut().for_each(|c| c.truncated = true),
        }
    }
}

/// Keys and values of the positions seen so far, per layer.
///
/// On the CPU backend they live in host memory, where the fused path reads them as slices and
/// burn's attention (a long prompt) gets a tensor copy. Elsewhere they stay on the device.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    max_len: usize,
    /// Set when a forward pass stopped early: deeper layers lack these positions.
    truncated: bool,
    /// Whether layers are kept as [`LayerKv::Host`].
    on_host: bool,
}

/// One layer's keys and values.
// One per layer of a cache, as the tensor pair was before the host variant: its size costs
// nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum LayerKv {
    /// `[n_head_kv, capacity, head_dim]` tensors; storage grows in chunks and is written with
    /// `slice_assign`, so a decode step copies one row rather than the whole history.
    Device(Tensor<3>, Tensor<3>),
    /// Host memory, position-major (`[position][n_head_kv][head_dim]`): the layout the fused
    /// path reads and appends to.
    Host(Vec<f32>, Vec<f32>),
}

const CACHE_CHUNK: usize = 256;

/// Prompts of up to this many tokens take the fused path on the CPU (its linear layers are
/// the same GEMMs as burn's path above [`QUANTIZED_PATH_MAX_ROWS`](crate::quant::QUANTIZED_PATH_MAX_ROWS)
/// rows). A chat turn's prompt is usually this short, and burn's ~80 small operations per
/// block cost more than the loops' attention one query row at a time, in wasm most of all.
const FUSED_PROMPT_MAX_ROWS: usize = 64;

impl KvCache {
    /// An empty cache for `config`'s model on `backend`.
    pub fn new(config: &Config, backend: Backend) -> Self {
        Self {
            layers: vec![None; config.n_layer],
            len: 0,
            max_len: config.context_length,
            truncated: false,
            on_host: backend == Backend::Cpu,
        }
    }

    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position (a new conversation).
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
        self.truncated = false;
    }

    /// Positions to hold so that `end` fit: whole chunks, at least double what is `held`, at
    /// most the context.
    fn capacity_for(&self, end: usize, held: usize) -> usize {
        end.div_ceil(CACHE_CHUNK)
            .saturating_mul(CACHE_CHUNK)
            .max(held * 2)
            .min(self.max_len.max(end))
    }

    /// Stores `k`, `v` (`[n_head_kv, seq, head_dim]`) for positions `start..start + seq` of
    /// `layer` and returns all keys and values up to there.
    fn update(&mut self, layer: usize, start: usize, k: Tensor<3>, v: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        let [heads, seq, d] = k.dims();
        let end = start + seq;
        let device = k.device();
        if self.on_host {
            // Position-major on the host: `[seq, heads, d]` rows appended, all rows returned.
            let host = |t: Tensor<3>| to_host(t.swap_dims(0, 1)).expect("f32 keys and values");
            let (k, v) = (host(k), host(v));
            let width = heads * d;
            for (pos, (k, v)) in (start..end).zip(k.chunks_exact(width).zip(v.chunks_exact(width))) {
                self.write_host(layer, pos, k, v);
            }
            let (ks, vs) = self.host_layer(layer);
            let tensor = |rows: &[f32]| {
                Tensor::<3>::from_data(TensorData::new(rows[..end * width].to_vec(), [end, heads, d]), &device).swap_dims(0, 1)
            };
            return (tensor(ks), tensor(vs));
        }
        let (mut ks, mut vs) = match self.layers[layer].take() {
            Some(LayerKv::Device(ks, vs)) => (ks, vs),
            Some(LayerKv::Host(..)) => unreachable!("a cache on the device holds no host layers"),
            None => {
                let zeros = || Tensor::zeros([heads, self.capacity_for(end, 0), d], &device);
                (zeros(), zeros())
            }
        };
        let held = ks.dims()[1];
        if end > held {
            let pad = || Tensor::zeros([heads, self.capacity_for(end, held) - held, d], &device);
            ks = Tensor::cat(vec![ks, pad()], 1);
            vs = Tensor::cat(vec![vs, pad()], 1);
        }
        ks = ks.slice_assign([0..heads, start..end, 0..d], k);
        vs = vs.slice_assign([0..heads, start..end, 0..d], v);
        let out = (
            ks.clone().slice([0..heads, 0..end, 0..d]),
            vs.clone().slice([0..heads, 0..end, 0..d]),
        );
        self.layers[layer] = Some(LayerKv::Device(ks, vs));
        out
    }

    /// Writes one position's keys and values (`[n_head_kv][head_dim]` each) into `layer`'s
    /// host storage (only in a cache kept on the host, `on_host`).
    fn write_host(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let entry = self.layers[layer].get_or_insert_with(|| LayerKv::Host(Vec::new(), Vec::new()));
        let LayerKv::Host(ks, vs) = entry else {
            unreachable!("a cache on the host holds no device layers")
        };
        let (width, end) = (k.len(), (pos + 1) * k.len());
        if ks.len() < end {
            // `resize` grows the storage geometrically: appending a position is amortized O(1).
            ks.resize(end, 0.0);
            vs.resize(end, 0.0);
        }
        ks[pos * width..end].copy_from_slice(k);
        vs[pos * width..end].copy_from_slice(v);
    }

    /// `layer`'s keys and values in host memory, position-major (empty before any write).
    fn host_layer(&self, layer: usize) -> (&[f32], &[f32]) {
        match &self.layers[layer] {
            Some(LayerKv::Host(ks, vs)) => (ks, vs),
            _ => (&[], &[]),
        }
    }

    /// [`update`](Self::update) for one position, returning the first `keys` rows
    /// (`keys > start`): those past `start` are padding for a batch, masked by its reader.
    fn update_padded(&mut self, layer: usize, start: usize, k: Tensor<3>, v: Tensor<3>, keys: usize) -> (Tensor<3>, Tensor<3>) {
        let (k, v) = self.update(layer, start, k, v);
        let [heads, held, d] = k.dims();
        if held >= keys {
            return (k, v);
        }
        // Storage past `start` exists (it grows in chunks) but `update` returns only the
        // written rows; zeros stand in for the rest.
        let device = k.device();
        let pad = || Tensor::zeros([heads, keys - held, d], &device);
        (Tensor::cat(vec![k, pad()], 1), Tensor::cat(vec![v, pad()], 1))
    }
}

/// A linear layer `y = x · Wᵀ` whose weight stays quantized, multiplied by its backend's
/// kernel ([`QuantMatmul`]).
#[derive(Debug, Clone)]
struct Linear {
    weight: QMatrix,
    matmul: QuantMatmul,
}

impl Linear {
    fn load(file: &ModelFile, name: &str, [rows, cols]: [usize; 2], backend: Backend, device: &Device) -> Result<Self, EngineError> {
        Self::new(file.matrix(name, rows, cols)?, backend, device)
    }

    /// One layer computing several GGUF projections of the same input, stacked along the
    /// output dimension (fewer, larger kernel launches per token).
    fn load_stacked(file: &ModelFile, parts: &[(String, [usize; 2])], backend: Backend, device: &Device) -> Result<Self, EngineError> {
        let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
        let parts = parts
            .iter()
            .map(|(n, [rows, cols])| file.matrix_bytes(n, *rows, *cols).map(|(ty, bytes)| (ty, *rows, *cols, bytes)))
            .collect::<Result<Vec<_>, _>>()?;
        let weight = QMatrix::try_stacked_from_gguf(&parts).map_err(|e| EngineError::BadTensor(format!("{names:?}: {e}")))?;
        Self::new(weight, backend, device)
    }

    fn new(weight: QMatrix, backend: Backend, device: &Device) -> Result<Self, EngineError> {
        let matmul = QuantMatmul::new(&weight, backend, device);
        Ok(Self { weight, matmul })
    }

    /// # Shapes
    /// `x`: `[seq, in]` → `[seq, out]`
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.matmul.forward(&self.weight, x)
    }

    /// [`forward`](Self::forward) for one row per sequence of a decode step.
    fn forward_decode(&self, x: Tensor<2>) -> Tensor<2> {
        self.matmul.forward_decode(&self.weight, x)
    }
}

/// RMSNorm: `x / sqrt(mean(x²) + eps) · weight`, over the last dimension.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor<1>,
    /// The same weight in host memory, for the fused path.
    host: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    fn load(file: &ModelFile, name: &str, len: usize, eps: f32, device: &Device) -> Result<Self, EngineError> {
        let values = file.vector(name, len)?;
        let n = values.len();
        Ok(Self {
            weight: Tensor::from_data(TensorData::new(values.clone(), [n]), device),
            host: values,
            eps,
        })
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let inv_rms = (x.clone() * x.clone()).mean_dim(1).add_scalar(self.eps).sqrt().recip();
        x * inv_rms * self.weight.clone().unsqueeze::<2>()
    }
}

#[derive(Debug, Clone)]
struct Attention {
    /// `attn_q`, `attn_k` and `attn_v` stacked: `[n_embd] → [(n_head + 2 n_head_kv) head_dim]`.
    attn_qkv: Linear,
    attn_output: Linear,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
}

impl Attention {
    /// # Shapes
    /// `x`: `[seq, n_embd]` (normalized) → `[seq, n_embd]`
    fn forward(&self, x: Tensor<2>, layer: usize, pass: &mut Pass) -> Tensor<2> {
        let qkv = self.attn_qkv.forward(x);
        let out = match pass {
            Pass::Sequence { rope, cache } => self.attend(qkv, layer, rope, cache),
            Pass::Batch { step, caches } => {
                let step = step.as_ref().expect("a batched pass through burn's attention has its step");
                self.attend_batch(qkv, layer, step, caches)
            }
        };
        self.attn_output.forward(out)
    }

    /// Attention of one decode step for several sequences: row `b` of `qkv` is the next token
    /// of the sequence held in `caches[b]`. Everything but the cache writes runs once for all
    /// rows: the keys and values are stacked to the longest sequence's length, and
    /// `step.padding` hides the rows a shorter sequence lacks. (Attending per sequence cost ~15
    /// small tensor operations per sequence and layer, which dominated batched decoding.)
    ///
    /// # Shapes
    /// `qkv`: `[batch, (n_head + 2 n_head_kv) head_dim]` → `[batch, n_head head_dim]`
    fn attend_batch(&self, qkv: Tensor<2>, layer: usize, step: &BatchStep, caches: &mut [KvCache]) -> Tensor<2> {
        let batch = caches.len();
        let (h, hkv, d) = (self.n_head, self.n_head_kv, self.head_dim);
        let qkv = qkv.reshape([batch, h + 2 * hkv, d]);
        let qk = rotate(qkv.clone().slice([0..batch, 0..h + hkv]), step.cos.clone(), step.sin.clone());
        let q = qk.clone().slice([0..batch, 0..h]);
        let k = qk.slice([0..batch, h..h + hkv]);
        let v = qkv.slice([0..batch, h + hkv..h + 2 * hkv]);
        let (mut keys, mut values) = (Vec::with_capacity(batch), Vec::with_capacity(batch));
        for (b, cache) in caches.iter_mut().enumerate() {
            let start = cache.len();
            let one = |t: &Tensor<3>| t.clone().slice([b..b + 1]).reshape([hkv, 1, d]);
            let (ks, vs) = cache.update_padded(layer, start, one(&k), one(&v), step.keys);
            keys.push(ks);
            values.push(vs);
        }
        let (k, v) = (Tensor::stack::<4>(keys, 0), Tensor::stack::<4>(values, 0)); // [batch, hkv, keys, d]
        let group = h / hkv;
        let q = q.reshape([batch, hkv, group, d]);
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (d as f32).sqrt()) + step.padding.clone();
        let out = softmax(scores, 3).matmul(v); // [batch, hkv, group, d]
        out.reshape([batch, h * d])
    }

    /// Attention of one sequence from its projected Q/K/V, at positions `cache.len()..`.
    ///
    /// # Shapes
    /// `qkv`: `[seq, (n_head + 2 n_head_kv) head_dim]` → `[seq, n_head head_dim]`
    fn attend(&self, qkv: Tensor<2>, layer: usize, rope: &Rope, cache: &mut KvCache) -> Tensor<2> {
        let [seq, _] = qkv.dims();
        let start = cache.len();
        let (h, hkv, d) = (self.n_head, self.n_head_kv, self.head_dim);
        let qkv = qkv.reshape([seq, h + 2 * hkv, d]).swap_dims(0, 1); // [h + 2 hkv, seq, d]
        // Rotate the query and key heads in one go (they sit next to each other).
        let qk = rope.apply(qkv.clone().slice([0..h + hkv]), start..start + seq);
        let q = qk.clone().slice([0..h]); // [h, seq, d]
        let k = qk.slice([h..h + hkv]); // [hkv, seq, d]
        let v = qkv.slice([h + hkv..h + 2 * hkv]);
        let (k, v) = cache.update(layer, start, k, v); // [hkv, start + seq, d]

        // Grouped-query attention: the `group` query heads that share a KV head are stacked
        // along the sequence axis so that one batched matmul per KV head does the work.
        let group = h / hkv;
        let q = q.reshape([hkv, group * seq, d]);
        let scores = q.matmul(k.swap_dims(1, 2)).mul_scalar(1.0 / (d as f32).sqrt()); // [hkv, group*seq, total]
        let scores = if seq > 1 {
            let mask = causal_mask(seq, start, &scores.device()).unsqueeze::<3>().repeat_dim(1, group);
            scores.mask_fill(mask, f32::NEG_INFINITY)
        } else {
            scores
        };
        let probs = softmax(scores, 2);
        let out = probs.matmul(v); // [hkv, group*seq, d]
        out.reshape([h, seq, d]).swap_dims(0, 1).reshape([seq, h * d])
    }
}

/// `true` where query `i` (at position `start + i`) must not see key `j`: `j > start + i`.
///
/// ```text
/// start = 2, seq = 3        keys 0 1 2 3 4
///   query 0 (pos 2)              . . . x x
///   query 1 (pos 3)              . . . . x
///   query 2 (pos 4)              . . . . .
/// ```
fn causal_mask(seq: usize, start: usize, device: &Device) -> Tensor<2, Bool> {
    let total = start + seq;
    let mask: Vec<bool> = (0..seq).flat_map(|i| (0..total).map(move |j| j > start + i)).collect();
    Tensor::from_data(TensorData::new(mask, [seq, total]), device)
}

#[derive(Debug, Clone)]
struct Mlp {
    /// `ffn_gate` and `ffn_up` stacked: `[n_embd] → [2 n_ff]`.
    ffn_gate_up: Linear,
    ffn_down: Linear,
    n_ff: usize,
}

impl Mlp {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [seq, _] = x.dims();
        let gate_up = self.ffn_gate_up.forward(x);
        let gate = silu(gate_up.clone().slice([0..seq, 0..self.n_ff]));
        let up = gate_up.slice([0..seq, self.n_ff..2 * self.n_ff]);
        self.ffn_down.forward(gate * up)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn load(file: &ModelFile, i: usize, config: &Config, backend: Backend, device: &Device) -> Result<Self, EngineError> {
        let name = |t: &str| format!("blk.{i}.{t}.weight");
        // Shapes as [rows (outputs), cols (inputs)].
        let (n_embd, n_ff) = (config.n_embd, config.n_ff);
        let q_width = config.n_head * config.head_dim;
        let kv_width = config.n_head_kv * config.head_dim;
        let linear = |t: &str, shape: [usize; 2]| Linear::load(file, &name(t), shape, backend, device);
        let stacked = |ts: &[(&str, [usize; 2])]| {
            let parts: Vec<(String, [usize; 2])> = ts.iter().map(|(t, shape)| (name(t), *shape)).collect();
            Linear::load_stacked(file, &parts, backend, device)
        };
        let norm = |t: &str| RmsNorm::load(file, &name(t), n_embd, config.rms_eps, device);
        Ok(Self {
            attn_norm: norm("attn_norm")?,
            attn: Attention {
                attn_qkv: stacked(&[
                    ("attn_q", [q_width, n_embd]),
                    ("attn_k", [kv_width, n_embd]),
                    ("attn_v", [kv_width, n_embd]),
                ])?,
                attn_output: linear("attn_output", [n_embd, q_width])?,
                n_head: config.n_head,
                n_head_kv: config.n_head_kv,
                head_dim: config.head_dim,
            },
            ffn_norm: norm("ffn_norm")?,
            mlp: Mlp {
                ffn_gate_up: stacked(&[("ffn_gate", [n_ff, n_embd]), ("ffn_up", [n_ff, n_embd])])?,
                ffn_down: linear("ffn_down", [n_embd, n_ff])?,
                n_ff: config.n_ff,
            },
        })
    }

    fn forward(&self, x: Tensor<2>, layer: usize, pass: &mut Pass) -> Tensor<2> {
        let residual = x.clone();
        let x = residual + self.attn.forward(self.attn_norm.forward(x), layer, pass);
        let residual = x.clone();
        residual + self.mlp.forward(self.ffn_norm.forward(x))
    }

    /// [`forward`](Self::forward) on the fused path: `x` (`[rows, n_embd]`, host memory) is
    /// updated in place; row `r` is the token at `rows[r] = (cache, position)`, rotated by
    /// `rotations[r]` (its position's `cos`, `sin`).
    fn forward_fused(
        &self,
        x: &mut [f32],
        layer: usize,
        rows: &[(usize, usize)],
        rotations: &[(Vec<f32>, Vec<f32>)],
        caches: &mut [KvCache],
    ) {
        let Attention {
            attn_qkv,
            attn_output,
            n_head: h,
            n_head_kv: hkv,
            head_dim: d,
        } = &self.attn;
        let (h, hkv, d) = (*h, *hkv, *d);
        let width = (h + 2 * hkv) * d;
        // A decode step (one row per sequence) multiplies as one sequence's step would.
        let decode_step = rows.len() == caches.len();
        let matmul = |w: &QMatrix, x: &[f32]| if decode_step { w.matmul_decode(x) } else { w.matmul(x) };
        let mut qkv = matmul(&attn_qkv.weight, &fused::rms_norm_rows(x, &self.attn_norm.host, self.attn_norm.eps));
        // Every row's keys and values go in first: a prompt's later rows are not visible to its
        // earlier ones (each attends to positions up to its own).
        for ((row, &(cache, pos)), (cos, sin)) in qkv.chunks_exact_mut(width).zip(rows).zip(rotations) {
            fused::rotate_heads(&mut row[..(h + hkv) * d], cos, sin);
            let (k, v) = row[h * d..].split_at(hkv * d);
            caches[cache].write_host(layer, pos, k, v);
        }
        let mut attended = vec![0.0; rows.len() * h * d];
        let mut scores = Vec::new();
        for ((row, &(cache, pos)), out) in qkv.chunks_exact(width).zip(rows).zip(attended.chunks_exact_mut(h * d)) {
            let (keys, values) = caches[cache].host_layer(layer);
            fused::attend_row(&row[..h * d], [keys, values], pos + 1, [hkv, d], out, &mut scores);
        }
        fused::add_assign(x, &matmul(&attn_output.weight, &attended));
        let gate_up = matmul(
            &self.mlp.ffn_gate_up.weight,
            &fused::rms_norm_rows(x, &self.ffn_norm.host, self.ffn_norm.eps),
        );
        fused::add_assign(
            x,
            &matmul(&self.mlp.ffn_down.weight, &fused::silu_gate_rows(&gate_up, self.mlp.n_ff)),
        );
    }
}

/// Which logits a forward pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only for the last position (generation).
    Last,
    /// For every position (evaluation).
    All,
    /// None: the pass ends after the last block the hook asks for (activation harvesting).
    /// The cache is then only valid up to that block and cannot be decoded from.
    None,
}

/// The GGUF file's bytes with its parsed table.
pub(crate) struct ModelFile<'a> {
    pub gguf: Gguf,
    pub bytes: &'a [u8],
}

impl ModelFile<'_> {
    fn tensor_bytes(&self, t: &crate::gguf::TensorInfo) -> Result<&[u8], EngineError> {
        // The GGUF reader checked every tensor against the file length; this only fails if the
        // table and the bytes do not belong together.
        usize::try_from(t.offset)
            .ok()
            .zip(usize::try_from(t.size).ok())
            .and_then(|(start, size)| self.bytes.get(start..start.checked_add(size)?))
            .ok_or_else(|| EngineError::BadTensor(format!("{} lies outside the file", t.name)))
    }

    /// The 2-D tensor `name`, which must be `rows × cols` (in GGUF's order: `[cols, rows]`).
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix, EngineError> {
        let (ty, bytes) = self.matrix_bytes(name, rows, cols)?;
        QMatrix::try_from_gguf(ty, rows, cols, bytes).map_err(|e| EngineError::BadTensor(format!("{name}: {e}")))
    }

    /// The type and bytes of the 2-D tensor `name`, which must be `rows × cols`.
    fn matrix_bytes(&self, name: &str, rows: usize, cols: usize) -> Result<(crate::gguf::TensorType, &[u8]), EngineError> {
        let t = self.gguf.tensor(name)?;
        if t.dims[..] != [cols as u64, rows as u64] {
            return Err(EngineError::BadTensor(format!(
                "{name} has shape {:?}, expected [{cols}, {rows}]",
                t.dims
            )));
        }
        Ok((t.ty, self.tensor_bytes(t)?))
    }

    /// The F32/F16 vector `name`, which must hold `len` values.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
        let t = self.gguf.tensor(name)?;
        if !matches!(t.ty, TensorType::F32 | TensorType::F16) {
            return Err(EngineError::BadTensor(format!("{name} is {:?}, expected F32", t.ty)));
        }
        if t.dims[..] != [len as u64] {
            return Err(EngineError::BadTensor(format!("{name} has shape {:?}, expected [{len}]", t.dims)));
        }
        Ok(crate::gguf::dequantize(t.ty, self.tensor_bytes(t)?))
    }
}

/// SmolLM2 (any GGUF Llama) on one burn device.
#[derive(Debug, Clone)]
pub struct Llama {
    config: Config,
    backend: Backend,
    device: Device,
    token_embd: QMatrix,
    /// The LM head: a separate `output.weight` when the file has one, else the embedding.
    output: Linear,
    blocks: Vec<Block>,
    output_norm: RmsNorm,
    rope: Rope,
}

impl Llama {
    pub(crate) fn load(file: &ModelFile, backend: Backend, device: &Device) -> Result<Self, EngineError> {
        let config = Config::from_gguf(&file.gguf)?;
        let vocab_by_embd = [config.vocab_size, config.n_embd];
        let token_embd = file.matrix("token_embd.weight", config.vocab_size, config.n_embd)?;
        // Tied embeddings (no `output.weight`): the head shares the embedding's repacked
        // blocks instead of repacking the same tensor again.
        let output = match file.gguf.tensor("output.weight") {
            Ok(_) => Linear::load(file, "output.weight", vocab_by_embd, backend, device)?,
            Err(_) => Linear::new(token_embd.clone(), backend, device)?,
        };
        let blocks = (0..config.n_layer)
            .map(|i| Block::load(file, i, &config, backend, device))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            output,
            output_norm: RmsNorm::load(file, "output_norm.weight", config.n_embd, config.rms_eps, device)?,
            rope: Rope::new(&config, device),
            token_embd,
            blocks,
            config,
            backend,
            device: device.clone(),
        })
    }

    /// The resolved hyperparameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Bytes of quantized weights held in host memory.
    pub fn quantized_weight_bytes(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                [&b.attn.attn_qkv, &b.attn.attn_output, &b.mlp.ffn_gate_up, &b.mlp.ffn_down]
                    .iter()
                    .map(|l| l.weight.size_bytes())
                    .sum::<usize>()
            })
            .sum();
        blocks + self.token_embd.size_bytes()
    }

    /// A new, empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.config, self.backend)
    }

    /// Runs `tokens` (positions `cache.len()..`) through the model, appending them to the cache.
    ///
    /// `hook`, when given, sees (and may replace) the residual stream after each block it asks
    /// for. Returns the logits asked for: `[1, vocab]` for [`Logits::Last`], `[seq, vocab]` for
    /// [`Logits::All`], nothing for [`Logits::None`].
    pub fn forward(
        &self,
        tokens: &[TokenId],
        cache: &mut KvCache,
        hook: Option<&mut dyn ResidualHook>,
        logits: Logits,
    ) -> Result<Option<Tensor<2>>, EngineError> {
        spinning::run(self.backend, || {
            self.check_input(tokens, cache)?;
            let deepest = self.config.n_layer - 1;
            let last_layer = match (logits, hook.as_deref().and_then(|h| h.last_layer())) {
                (Logits::None, Some(layer)) => layer.min(deepest),
                _ => deepest,
            };
            let positions = cache.len()..cache.len() + tokens.len();
            let between = BetweenBlocks::hook(hook, positions);
            let pass = Pass::Sequence { rope: &self.rope, cache };
            let x = without_waiting(self.residual(tokens, pass, last_layer, between))?;
            if last_layer < deepest {
                cache.truncated = true;
                return Ok(None);
            }
            Ok(match logits {
                Logits::None => None,
                Logits::Last => Some(self.head(x.slice([tokens.len() - 1..tokens.len()]))),
                Logits::All => Some(self.head(x)),
            })
        })
    }

    /// The last position's next-token logits for `tokens`, in host memory, without ever
    /// blocking on the device: what WebGPU in the browser needs, where a tensor can only be
    /// read back asynchronously. Otherwise like [`forward`](Self::forward) with
    /// [`Logits::Last`]. On wgpu, each block the hook wants is read back asynchronously and the
    /// hook runs on a CPU copy of the residual (hooks read their input synchronously), which
    /// then goes back to the device; the other backends just run `forward`.
    pub async fn forward_last_async(
        &self,
        tokens: &[TokenId],
        cache: &mut KvCache,
        hook: Option<&mut dyn ResidualHook>,
    ) -> Result<Vec<f32>, EngineError> {
        if self.backend != Backend::Wgpu {
            let logits = self
                .forward(tokens, cache, hook, Logits::Last)?
                .expect("Logits::Last returns logits");
            return to_host(logits);
        }
        self.check_input(tokens, cache)?;
        let positions = cache.len()..cache.len() + tokens.len();
        let between = BetweenBlocks::hook_on_host(hook, positions);
        let pass = Pass::Sequence { rope: &self.rope, cache };
        let x = self.residual(tokens, pass, self.config.n_layer - 1, between).await?;
        to_host_async(self.head(x.slice([tokens.len() - 1..tokens.len()]))).await
    }

    /// One decode step for several independent sequences at once: `tokens[b]` is appended to
    /// the sequence in `caches[b]` (each at its own position). Returns the next-token logits,
    /// `[batch, vocab]`. The weights are read once for the whole batch, which is what makes
    /// generating many conversations faster than one after another. No residual hook.
    pub fn forward_batch(&self, tokens: &[TokenId], caches: &mut [KvCache]) -> Result<Tensor<2>, EngineError> {
        self.forward_batch_adding(tokens, caches, None)
    }

    /// [`forward_batch`](Self::forward_batch) that adds `added = (layer, rows)` to the
    /// residual after block `layer`, row `b` to sequence `b` (`rows` is `[batch, n_embd]`):
    /// steering by fixed directions, each sequence its own, in one batch.
    pub fn forward_batch_adding(
        &self,
        tokens: &[TokenId],
        caches: &mut [KvCache],
        added: Option<(usize, Tensor<2>)>,
    ) -> Result<Tensor<2>, EngineError> {
        spinning::run(self.backend, || {
            if tokens.is_empty() || tokens.len() != caches.len() {
                return Err(EngineError::BadBatch {
                    tokens: tokens.len(),
                    caches: caches.len(),
                });
            }
            for (token, cache) in tokens.iter().zip(caches.iter()) {
                self.check_input(std::slice::from_ref(token), cache)?;
            }
            let between = match added {
                Some((layer, rows)) => BetweenBlocks::Add { layer, rows },
                None => BetweenBlocks::Nothing,
            };
            let step = (!self.fused(tokens.len(), caches)).then(|| BatchStep::new(&self.rope, caches, &self.device));
            let pass = Pass::Batch { step, caches };
            let x = without_waiting(self.residual(tokens, pass, self.config.n_layer - 1, between))?;
            Ok(self.head_decode(x))
        })
    }

    /// The residual stream after block `last_layer` for `tokens`: the loop over the blocks that
    /// every forward pass runs. On success the cache(s) hold the tokens' positions (up to
    /// `last_layer` only, if it is not the deepest: the caller marks them truncated).
    ///
    /// Async only for [`BetweenBlocks::HookOnHost`]; other passes complete in one poll.
    async fn residual(
        &self,
        tokens: &[TokenId],
        mut pass: Pass<'_>,
        last_layer: usize,
        mut between: BetweenBlocks<'_>,
    ) -> Result<Tensor<2>, EngineError> {
        if self.fused(tokens.len(), pass.caches()) {
            return self.residual_fused(tokens, pass, last_layer, between).await;
        }
        let mut x = self.embed(tokens);
        for (layer, block) in self.blocks.iter().enumerate().take(last_layer + 1) {
            if between.cancelled() {
                pass.truncate();
                return Err(EngineError::Cancelled);
            }
            x = block.forward(x, layer, &mut pass);
            x = between.after_block(layer, x).await?;
        }
        pass.advance(tokens.len());
        Ok(x)
    }

    /// Whether a pass of `rows` new tokens into `caches` takes the fused path (`fused`): on the
    /// CPU backend, for decode steps (one row per cache, batched or not) and prompts of up to
    /// [`FUSED_PROMPT_MAX_ROWS`]. Longer prompts go through burn's attention, whose cost grows
    /// as a GEMM's rather than one query row at a time.
    fn fused(&self, rows: usize, caches: &[KvCache]) -> bool {
        let decode_step = rows == caches.len();
        self.backend == Backend::Cpu && (decode_step || rows <= FUSED_PROMPT_MAX_ROWS) && caches.iter().all(|c| c.on_host)
    }

    /// [`residual`](Self::residual) on the fused path: the residual stays a host vector
    /// through the blocks and becomes a tensor only where something runs between blocks.
    async fn residual_fused(
        &self,
        tokens: &[TokenId],
        mut pass: Pass<'_>,
        last_layer: usize,
        mut between: BetweenBlocks<'_>,
    ) -> Result<Tensor<2>, EngineError> {
        let shape = [tokens.len(), self.config.n_embd];
        let rows = pass.row_positions(tokens.len());
        let rotations: Vec<_> = rows.iter().map(|&(_, pos)| self.rope.host_row(pos)).collect();
        let mut x: Vec<f32> = tokens.iter().flat_map(|&t| self.token_embd.dequantize_row(t as usize)).collect();
        for (layer, block) in self.blocks.iter().enumerate().take(last_layer + 1) {
            if between.cancelled() {
                pass.truncate();
                return Err(EngineError::Cancelled);
            }
            block.forward_fused(&mut x, layer, &rows, &rotations, pass.caches());
            if between.acts_after(layer) {
                let residual = Tensor::from_data(TensorData::new(x, shape), &self.device);
                x = to_host(between.after_block(layer, residual).await?)?;
            }
        }
        pass.advance(tokens.len());
        Ok(Tensor::from_data(TensorData::new(x, shape), &self.device))
    }

    /// The logits for the final residual `x` (`[seq, n_embd]` → `[seq, vocab]`).
    fn head(&self, x: Tensor<2>) -> Tensor<2> {
        self.output.forward(self.output_norm.forward(x))
    }

    /// [`head`](Self::head) for one row per sequence of a decode step.
    fn head_decode(&self, x: Tensor<2>) -> Tensor<2> {
        self.output.forward_decode(self.output_norm.forward(x))
    }

    /// The logits that residual-stream `directions` (`[rows, n_embd]`) add through the final
    /// norm's gain and the unembedding, `[rows, vocab]`: the "logit lens" of SAE decoder rows
    /// (TransformerLens folds the gain into the unembedding the same way).
    pub fn logit_lens(&self, directions: Tensor<2>) -> Tensor<2> {
        self.output.forward(directions * self.output_norm.weight.clone().unsqueeze::<2>())
    }

    /// The logit lens on a few tokens: for each row of `directions` (`[rows, n_embd]`, row
    /// major) its logit for each of `tokens`, through the final norm's weight and the LM head,
    /// as `[rows, tokens.len()]`. The norm's 1/rms is left out (it scales a whole row alike).
    /// Reading a handful of the head's rows costs a sliver of [`Llama::logit_lens`]'s
    /// `[rows, vocab]` product: AutoSteer scores every latent this way.
    pub fn logit_lens_tokens(&self, directions: &[f32], tokens: &[TokenId]) -> Result<Vec<f32>, EngineError> {
        let n_embd = self.config.n_embd;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(EngineError::BadToken(bad));
        }
        let rows = directions.len() / n_embd;
        if rows == 0 || tokens.is_empty() {
            return Ok(Vec::new());
        }
        let gain = to_host(self.output_norm.weight.clone())?;
        // The head's rows, scaled by the norm's weight, as the columns of `[n_embd, tokens]`.
        let mut head = vec![0f32; n_embd * tokens.len()];
        for (c, &t) in tokens.iter().enumerate() {
            for (i, x) in self.output.weight.dequantize_row(t as usize).into_iter().enumerate() {
                head[i * tokens.len() + c] = x * gain[i];
            }
        }
        let directions = Tensor::<2>::from_data(TensorData::new(directions[..rows * n_embd].to_vec(), [rows, n_embd]), &self.device);
        let head = Tensor::<2>::from_data(TensorData::new(head, [n_embd, tokens.len()]), &self.device);
        to_host(directions.matmul(head))
    }

    /// Whether `tokens` can be appended to `cache`.
    fn check_input(&self, tokens: &[TokenId], cache: &KvCache) -> Result<(), EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        if cache.truncated {
            return Err(EngineError::CacheTruncated);
        }
        let (needed, limit) = (cache.len() + tokens.len(), self.config.context_length);
        if needed > limit {
            return Err(EngineError::ContextOverflow { needed, limit });
        }
        match tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            Some(&bad) => Err(EngineError::BadToken(bad)),
            None => Ok(()),
        }
    }

    /// Token embeddings, `[seq, n_embd]` (looked up on the host: a row of Q8_0 is 612 bytes).
    fn embed(&self, tokens: &[TokenId]) -> Tensor<2> {
        let rows: Vec<f32> = tokens.iter().flat_map(|&t| self.token_embd.dequantize_row(t as usize)).collect();
        Tensor::from_data(TensorData::new(rows, [tokens.len(), self.config.n_embd]), &self.device)
    }
}
