//! Quantized weight matrices kept in their GGUF encoding, with CPU kernels.
//!
//! burn's quantized tensors dequantize the whole weight before every matmul, which makes
//! single-token decode ~100× slower than f32 (machine-facts §G), and its symmetric Q4S cannot
//! represent GGUF's asymmetric Q4_1 blocks exactly. So on the CPU the engine keeps each weight
//! as the GGUF bytes and multiplies with its own kernels:
//!
//! * **decode** (a few rows of activations): the activations are quantized to 8-bit blocks of
//!   32 (like llama.cpp's `Q8_0`/`Q8_1` activations) and dotted with the 4-/8-bit weight
//!   blocks in integer arithmetic (AVX-512 VNNI, AVX2, wasm `simd128` or scalar, whichever
//!   the CPU has), threads over output rows. This reads the 4-bit weights once per token.
//!   Where AVX-512 VNNI runs, weights are repacked into tiles of 16 rows (one block of every
//!   row side by side, f16 scales as in the file): one vector then carries 16 rows' sums, and
//!   the per-block scaling is a few vector instructions per 512 weights instead of scalar
//!   work per row, which doubled 1-thread decode.
//! * **prefill** (many rows): the weight is dequantized once per call into an f32 scratch
//!   matrix and multiplied with an f32 GEMM, which is compute-bound and ~2× faster per FLOP
//!   than integer dot products on these machines.

use std::sync::Arc;

use half::f16;

use crate::gguf::{TensorType, dequantize};

/// A `[rows, cols]` weight matrix in quantized blocks of 32, row-major (`cols` is contiguous).
#[derive(Clone)]
pub struct QMatrix {
    /// The GGUF encoding it came from.
    pub ty: TensorType,
    pub rows: usize,
    pub cols: usize,
    blocks: Arc<Blocks>,
}

/// Repacked blocks. Block `i` of row `r` is at index `r * cols / 32 + i`.
enum Blocks {
    /// 4-bit: `w = q · d + m` with `q` in 0..16 (Q4_1; Q4_0 becomes `m = -8 d`). `qs` holds 16
    /// bytes per block in ggml's order: byte `j` has weight `j` low and `j + 16` high.
    Q4 { d: Vec<f32>, m: Vec<f32>, qs: Vec<u8> },
    /// 8-bit: `w = q · d` (Q8_0), 32 bytes per block.
    Q8 { d: Vec<f32>, qs: Vec<i8> },
    /// 4-bit in tiles of [`TILE`] rows, the AVX-512 kernels' layout (used where the CPU runs
    /// them): block `i` of the tile's rows side by side, so that one vector holds one block of
    /// every row and each block's scales are one vector load. Per tile and block, `d` and `m`
    /// hold 16 values in GGUF's own f16 (a token reads about the GGUF's bytes) and `qs` 256
    /// bytes in four 64-byte groups: in group `k`, row `l`'s four bytes are its GGUF block's
    /// bytes `4k..4k + 4` (weights `4k + j` low and `4k + j + 16` high).
    Q4Tiles { d: Vec<f16>, m: Vec<f16>, qs: Vec<u8> },
    /// 8-bit in tiles of [`TILE`] rows: per tile and block, `d` as 16 f16 and 512 bytes
    /// `q + 128` (unsigned, what `vpdpbusd` multiplies) in eight 64-byte groups: in group `k`,
    /// row `l`'s four bytes are its weights `4k..4k + 4`.
    Q8Tiles { d: Vec<f16>, qs: Vec<u8> },
    /// Unquantized (F32/F16 files), one row after another.
    F32(Vec<f32>),
}

impl Blocks {
    /// No blocks, in the same layout as `self`.
    fn empty_like(&self) -> Blocks {
        match self {
            Blocks::Q4 { .. } => Blocks::Q4 {
                d: Vec::new(),
                m: Vec::new(),
                qs: Vec::new(),
            },
            Blocks::Q8 { .. } => Blocks::Q8 {
                d: Vec::new(),
                qs: Vec::new(),
            },
            Blocks::Q4Tiles { .. } => Blocks::Q4Tiles {
                d: Vec::new(),
                m: Vec::new(),
                qs: Vec::new(),
            },
            Blocks::Q8Tiles { .. } => Blocks::Q8Tiles {
                d: Vec::new(),
                qs: Vec::new(),
            },
            Blocks::F32(_) => Blocks::F32(Vec::new()),
        }
    }

    /// Appends `other`'s rows; false when its layout differs.
    fn append(&mut self, other: &Blocks) -> bool {
        match (self, other) {
            (Blocks::Q4 { d, m, qs }, Blocks::Q4 { d: od, m: om, qs: oq }) => {
                d.extend_from_slice(od);
                m.extend_from_slice(om);
                qs.extend_from_slice(oq);
            }
            (Blocks::Q8 { d, qs }, Blocks::Q8 { d: od, qs: oq }) => {
                d.extend_from_slice(od);
                qs.extend_from_slice(oq);
            }
            (Blocks::Q4Tiles { d, m, qs }, Blocks::Q4Tiles { d: od, m: om, qs: oq }) => {
                d.extend_from_slice(od);
                m.extend_from_slice(om);
                qs.extend_from_slice(oq);
            }
            (Blocks::Q8Tiles { d, qs }, Blocks::Q8Tiles { d: od, qs: oq }) => {
                d.extend_from_slice(od);
                qs.extend_from_slice(oq);
            }
            (Blocks::F32(v), Blocks::F32(ov)) => v.extend_from_slice(ov),
            _ => return false,
        }
        true
    }
}

/// Repacks GGUF blocks of a quantized type into [`TILE`]-row tiles (`rows` is a multiple of
/// [`TILE`], `bytes` holds exactly the matrix).
fn tiles(ty: TensorType, rows: usize, cols: usize, bytes: &[u8]) -> Blocks {
    let (nb, block_bytes) = (cols / BLOCK, ty.block_bytes());
    let block = |r: usize, i: usize| &bytes[(r * nb + i) * block_bytes..][..block_bytes];
    let f16_at = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]);
    let n_blocks = rows * nb;
    let (mut d, mut m) = (Vec::with_capacity(n_blocks), Vec::with_capacity(n_blocks));
    let mut qs = Vec::with_capacity(n_blocks * if ty == TensorType::Q8_0 { 32 } else { 16 });
    for tile in 0..rows / TILE {
        let rows = || tile * TILE..(tile + 1) * TILE;
        for i in 0..nb {
            match ty {
                TensorType::Q4_1 | TensorType::Q4_0 => {
                    let at = if ty == TensorType::Q4_1 { 4 } else { 2 };
                    for r in rows() {
                        let b = block(r, i);
                        d.push(f16_at(b, 0));
                        // Q4_0 is Q4_1 with m = -8 d (exact in f16: a power of two).
                        m.push(if ty == TensorType::Q4_1 {
                            f16_at(b, 2)
                        } else {
                            f16_at(b, 0) * f16::from_f32(-8.0)
                        });
                    }
                    for k in 0..4 {
                        rows().for_each(|r| qs.extend_from_slice(&block(r, i)[at + 4 * k..][..4]));
                    }
                }
                _ => {
                    rows().for_each(|r| d.push(f16_at(block(r, i), 0)));
                    for k in 0..8 {
                        rows().for_each(|r| qs.extend(block(r, i)[2 + 4 * k..][..4].iter().map(|q| q ^ 0x80)));
                    }
                }
            }
        }
    }
    if ty == TensorType::Q8_0 {
        Blocks::Q8Tiles { d, qs }
    } else {
        Blocks::Q4Tiles { d, m, qs }
    }
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({:?}, {}x{})", self.ty, self.rows, self.cols)
    }
}

/// 32 activations quantized to i8 with one scale: `x ≈ d * qs`.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct BlockQ8 {
    qs: [i8; 32],
}

/// One row of activations quantized for the integer kernels.
struct ActivationsQ8 {
    blocks: Vec<BlockQ8>,
    /// Per block: the scale `d`.
    d: Vec<f32>,
    /// Per block: `d · Σ qs`, which multiplies a 4-bit block's minimum.
    sum: Vec<f32>,
}

const BLOCK: usize = 32;
/// Rows per tile in the tiled layouts.
const TILE: usize = 16;

/// How a matrix's blocks are laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// One row after another (every kernel reads it).
    Rows,
    /// Tiles of [`TILE`] rows ([`Blocks::Q4Tiles`], [`Blocks::Q8Tiles`]; the AVX-512 kernels).
    Tiles,
}

impl Layout {
    /// The layout the fastest kernels here read.
    fn preferred() -> Self {
        if kernels().tiles.is_some() { Layout::Tiles } else { Layout::Rows }
    }

    /// `self` where a `ty` matrix of `rows` rows can have it: tiles hold whole tiles of
    /// quantized blocks.
    fn for_matrix(self, ty: TensorType, rows: usize) -> Self {
        let quantized = matches!(ty, TensorType::Q4_0 | TensorType::Q4_1 | TensorType::Q8_0);
        if quantized && rows.is_multiple_of(TILE) {
            self
        } else {
            Layout::Rows
        }
    }
}

impl QMatrix {
    /// Repacks `rows × cols` weights of type `ty` from bytes the caller built.
    ///
    /// # Panics
    /// When the shape and the bytes disagree; bytes from a file go through
    /// [`try_from_gguf`](Self::try_from_gguf).
    pub fn from_gguf(ty: TensorType, rows: usize, cols: usize, bytes: &[u8]) -> Self {
        Self::try_from_gguf(ty, rows, cols, bytes).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Repacks `rows × cols` weights of type `ty` from their GGUF bytes; fails unless the
    /// matrix is non-empty, its rows are whole blocks and `bytes` holds exactly the matrix.
    pub fn try_from_gguf(ty: TensorType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, String> {
        Self::repack(ty, rows, cols, bytes, Layout::preferred())
    }

    fn repack(ty: TensorType, rows: usize, cols: usize, bytes: &[u8], layout: Layout) -> Result<Self, String> {
        if rows == 0 || cols == 0 {
            return Err(format!("a {rows}x{cols} matrix has no elements"));
        }
        if !cols.is_multiple_of(ty.block_len()) {
            return Err(format!(
                "a {rows}x{cols} {ty:?} matrix: the row length is not a multiple of {}",
                ty.block_len()
            ));
        }
        let expected = rows
            .checked_mul(cols)
            .map(|n| n / ty.block_len())
            .and_then(|n_blocks| n_blocks.checked_mul(ty.block_bytes()));
        if expected != Some(bytes.len()) {
            return Err(format!("a {rows}x{cols} {ty:?} matrix cannot be {} bytes long", bytes.len()));
        }
        let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        let chunks = || bytes.chunks_exact(ty.block_bytes());
        // Each block's quants, gathered with one copy per block (a `flat_map` collect grows its
        // vector byte by byte: most of the page's model build went there).
        let quants = |at: std::ops::Range<usize>| {
            let mut qs = Vec::with_capacity(bytes.len() / ty.block_bytes() * at.len());
            for b in chunks() {
                qs.extend_from_slice(&b[at.clone()]);
            }
            qs
        };
        let blocks = match ty {
            _ if layout.for_matrix(ty, rows) == Layout::Tiles => tiles(ty, rows, cols, bytes),
            TensorType::Q4_1 => Blocks::Q4 {
                d: chunks().map(|b| f16_at(b, 0)).collect(),
                m: chunks().map(|b| f16_at(b, 2)).collect(),
                qs: quants(4..20),
            },
            TensorType::Q4_0 => Blocks::Q4 {
                d: chunks().map(|b| f16_at(b, 0)).collect(),
                m: chunks().map(|b| -8.0 * f16_at(b, 0)).collect(),
                qs: quants(2..18),
            },
            TensorType::Q8_0 => Blocks::Q8 {
                d: chunks().map(|b| f16_at(b, 0)).collect(),
                qs: quants(2..34).into_iter().map(|q| q as i8).collect(),
            },
            TensorType::F32 | TensorType::F16 => Blocks::F32(dequantize(ty, bytes)),
        };
        Ok(Self {
            ty,
            rows,
            cols,
            blocks: Arc::new(blocks),
        })
    }

    /// Repacks several GGUF matrices of one type and width (`(type, rows, cols, bytes)` each)
    /// stacked along their rows, like [`concat_rows`](Self::concat_rows): all in one layout,
    /// tiles only where every part holds whole tiles.
    pub fn try_stacked_from_gguf(parts: &[(TensorType, usize, usize, &[u8])]) -> Result<Self, String> {
        let preferred = Layout::preferred();
        let layout = if parts.iter().all(|&(ty, rows, ..)| preferred.for_matrix(ty, rows) == Layout::Tiles) {
            Layout::Tiles
        } else {
            Layout::Rows
        };
        let parts = parts
            .iter()
            .map(|&(ty, rows, cols, bytes)| Self::repack(ty, rows, cols, bytes, layout))
            .collect::<Result<Vec<_>, _>>()?;
        Self::concat_rows(&parts).ok_or_else(|| "the stacked matrices differ in type or width".to_string())
    }

    /// Stacks matrices with the same encoding and width on top of each other, so that one
    /// kernel launch computes several projections of the same input (Q, K and V; gate and up).
    pub fn concat_rows(parts: &[QMatrix]) -> Option<QMatrix> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.ty != first.ty || p.cols != first.cols) {
            return None;
        }
        // Every layout keeps its rows (or tiles) one after another, field by field.
        let mut blocks = first.blocks.empty_like();
        for p in parts {
            if !blocks.append(&p.blocks) {
                return None;
            }
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        Some(Self {
            ty: first.ty,
            rows,
            cols: first.cols,
            blocks: Arc::new(blocks),
        })
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// Bytes held in memory.
    pub fn size_bytes(&self) -> usize {
        match &*self.blocks {
            Blocks::Q4 { d, m, qs } => 4 * (d.len() + m.len()) + qs.len(),
            Blocks::Q8 { d, qs } => 4 * d.len() + qs.len(),
            Blocks::Q4Tiles { d, m, qs } => 2 * (d.len() + m.len()) + qs.len(),
            Blocks::Q8Tiles { d, qs } => 2 * d.len() + qs.len(),
            Blocks::F32(v) => 4 * v.len(),
        }
    }

    /// The whole matrix as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        let cols = self.cols;
        par_chunks_mut(&mut out, cols * 64, |chunk_index, chunk| {
            for (i, row_out) in chunk.chunks_exact_mut(cols).enumerate() {
                self.dequantize_row_into(chunk_index * 64 + i, row_out);
            }
        });
        out
    }

    /// One row as f32 (an embedding lookup).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let mut out = vec![0.0; self.cols];
        self.dequantize_row_into(r, &mut out);
        out
    }

    fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        let nb = self.blocks_per_row();
        let first = r * nb;
        match &*self.blocks {
            Blocks::Q4 { d, m, qs } => {
                for (i, out) in out.chunks_exact_mut(BLOCK).enumerate() {
                    let b = first + i;
                    let (lo, hi) = out.split_at_mut(16);
                    for (j, &q) in qs[b * 16..b * 16 + 16].iter().enumerate() {
                        lo[j] = f32::from(q & 0x0f) * d[b] + m[b];
                        hi[j] = f32::from(q >> 4) * d[b] + m[b];
                    }
                }
            }
            Blocks::Q8 { d, qs } => {
                for (i, out) in out.chunks_exact_mut(BLOCK).enumerate() {
                    let b = first + i;
                    for (o, &q) in out.iter_mut().zip(&qs[b * 32..b * 32 + 32]) {
                        *o = f32::from(q) * d[b];
                    }
                }
            }
            Blocks::Q4Tiles { d, m, qs } => {
                let (tile, l) = (r / TILE, r % TILE);
                for (i, out) in out.chunks_exact_mut(BLOCK).enumerate() {
                    let b = tile * nb + i;
                    let (d, m) = (d[b * TILE + l].to_f32(), m[b * TILE + l].to_f32());
                    let q = &qs[b * TILE * 16..][..TILE * 16];
                    for k in 0..4 {
                        for (j, &q) in q[k * 64 + l * 4..][..4].iter().enumerate() {
                            out[4 * k + j] = f32::from(q & 0x0f) * d + m;
                            out[4 * k + j + 16] = f32::from(q >> 4) * d + m;
                        }
                    }
                }
            }
            Blocks::Q8Tiles { d, qs } => {
                let (tile, l) = (r / TILE, r % TILE);
                for (i, out) in out.chunks_exact_mut(BLOCK).enumerate() {
                    let b = tile * nb + i;
                    let d = d[b * TILE + l].to_f32();
                    let q = &qs[b * TILE * 32..][..TILE * 32];
                    for k in 0..8 {
                        for (j, &q) in q[k * 64 + l * 4..][..4].iter().enumerate() {
                            out[4 * k + j] = f32::from((q ^ 0x80) as i8) * d;
                        }
                    }
                }
            }
            Blocks::F32(v) => out.copy_from_slice(&v[r * self.cols..(r + 1) * self.cols]),
        }
    }

    /// `y = x · Wᵀ` for `n = x.len() / cols` activation rows: `y` is `[n, rows]`.
    ///
    /// Up to 8 rows go through the integer kernels (activations quantized to 8 bits), more
    /// through dequantize + f32 GEMM. Prompts take this path, which keeps their logits as close
    /// to llama.cpp's as the reference tests ask.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        self.matmul_with_quantized_up_to(x, QUANTIZED_PATH_MAX_ROWS)
    }

    /// [`matmul`](Self::matmul) for a decode step of `n` sequences: up to 256 rows take the
    /// integer kernels, as one sequence's step does, so a batched step computes what single
    /// steps would, bit for bit.
    pub fn matmul_decode(&self, x: &[f32]) -> Vec<f32> {
        self.matmul_with_quantized_up_to(x, DECODE_QUANTIZED_PATH_MAX_ROWS)
    }

    fn matmul_with_quantized_up_to(&self, x: &[f32], max_rows: usize) -> Vec<f32> {
        let n = x.len() / self.cols;
        assert_eq!(n * self.cols, x.len(), "activation length is not a multiple of {}", self.cols);
        if n <= max_rows && !matches!(*self.blocks, Blocks::F32(_)) {
            return self.matmul_quantized(x, n);
        }
        let w = match &*self.blocks {
            Blocks::F32(v) => v.clone(),
            _ => self.dequantize(),
        };
        let mut y = vec![0.0f32; n * self.rows];
        sgemm_xwt(n, self.cols, self.rows, x, &w, &mut y);
        y
    }

    fn matmul_quantized(&self, x: &[f32], n: usize) -> Vec<f32> {
        let xq: Vec<ActivationsQ8> = x.chunks_exact(self.cols).map(quantize_q8).collect();
        let kernels = kernels();
        let nb = self.blocks_per_row();
        let rows = self.rows;
        // Threads over output rows; every thread walks all `n` activation rows so that each
        // weight row is read from memory once.
        let mut yt = vec![0.0f32; n * rows];
        par_chunks_mut(&mut yt, ROWS_PER_TASK * n, |task, chunk| {
            let first_row = task * ROWS_PER_TASK;
            let task_rows = chunk.len() / n;
            // A task is one tile (ROWS_PER_TASK == TILE): blocks `tile_blocks` of the tiled
            // fields, one kernel call per activation row.
            let tile_blocks = task * nb * TILE..(task + 1) * nb * TILE;
            let tile_out = |t: usize, chunk: &mut [f32], out: [f32; TILE]| {
                out.iter().enumerate().for_each(|(l, &v)| chunk[l * n + t] = v);
            };
            match &*self.blocks {
                Blocks::Q4Tiles { d, m, qs } => {
                    let q4 = kernels.tiles.as_ref().expect("tiles exist where their kernels run").q4;
                    let (d, m) = (&d[tile_blocks.clone()], &m[tile_blocks.clone()]);
                    let qs = &qs[tile_blocks.start * 16..tile_blocks.end * 16];
                    xq.iter().enumerate().for_each(|(t, x)| tile_out(t, chunk, q4(d, m, qs, x)));
                    return;
                }
                Blocks::Q8Tiles { d, qs } => {
                    let q8 = kernels.tiles.as_ref().expect("tiles exist where their kernels run").q8;
                    let (d, qs) = (&d[tile_blocks.clone()], &qs[tile_blocks.start * 32..tile_blocks.end * 32]);
                    xq.iter().enumerate().for_each(|(t, x)| tile_out(t, chunk, q8(d, qs, x)));
                    return;
                }
                _ => {}
            }
            for i in (0..task_rows).step_by(4) {
                // Rows go four at a time; a short last group repeats its last row (the shipped
                // model's row counts are all multiples of 16, so this never costs anything).
                let group = (task_rows - i).min(4);
                let rows: [usize; 4] = std::array::from_fn(|k| first_row + i + k.min(group - 1));
                for (t, xq) in xq.iter().enumerate() {
                    let out = match &*self.blocks {
                        Blocks::Q4 { d, m, qs } => (kernels.q4x4)(
                            rows.map(|r| &d[r * nb..(r + 1) * nb]),
                            rows.map(|r| &m[r * nb..(r + 1) * nb]),
                            rows.map(|r| &qs[r * nb * 16..(r + 1) * nb * 16]),
                            xq,
                        ),
                        Blocks::Q8 { d, qs } => (kernels.q8x4)(
                            rows.map(|r| &d[r * nb..(r + 1) * nb]),
                            rows.map(|r| &qs[r * nb * 32..(r + 1) * nb * 32]),
                            xq,
                        ),
                        Blocks::F32(_) => unreachable!("f32 matrices take the GEMM path"),
                        Blocks::Q4Tiles { .. } | Blocks::Q8Tiles { .. } => unreachable!("tiles returned above"),
                    };
                    for k in 0..group {
                        chunk[(i + k) * n + t] = out[k];
                    }
                }
            }
        });
        if n == 1 {
            return yt; // [rows, 1] is already [1, rows]
        }
        let mut y = vec![0.0f32; n * rows];
        for r in 0..rows {
            for t in 0..n {
                y[t * rows + r] = yt[r * n + t];
            }
        }
        y
    }
}

/// `Σ a·b` with eight independent partial sums (so that it vectorizes and does not wait on
/// one addition chain).
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Up to this many activation rows (decode steps, batches of up to 8 sequences) the integer
/// kernels beat dequantize + GEMM, which pays for dequantizing every weight per call.
pub(crate) const QUANTIZED_PATH_MAX_ROWS: usize = 8;
/// The same for a batched decode step. The tiled kernels cost little per extra activation
/// row (the tile stays in L1 between rows): 16 sequences decode 5× faster than through
/// dequantize + GEMM (2 threads); on 1 thread 64 rows ran 1.9×, 128 rows 1.3× faster, 512
/// rows 5% slower. The row-layout kernels (wasm, AVX2) cost about what dequantize + GEMM does
/// at 16 rows.
const DECODE_QUANTIZED_PATH_MAX_ROWS: usize = 256;
/// Output rows per parallel task in the quantized kernels: one tile in the tiled layouts.
const ROWS_PER_TASK: usize = TILE;

/// Quantizes one row of activations to 8-bit blocks (`d = max|x| / 127`, round to nearest).
fn quantize_q8(x: &[f32]) -> ActivationsQ8 {
    let nb = x.len() / BLOCK;
    let mut out = ActivationsQ8 {
        blocks: Vec::with_capacity(nb),
        d: Vec::with_capacity(nb),
        sum: Vec::with_capacity(nb),
    };
    for chunk in x.chunks_exact(BLOCK) {
        let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; 32];
        for (q, &v) in qs.iter_mut().zip(chunk) {
            *q = (v * inv).round() as i8;
        }
        let isum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
        out.blocks.push(BlockQ8 { qs });
        out.d.push(d);
        out.sum.push(d * isum as f32);
    }
    out
}

/// Whole dot products of four weight rows with one activation row (Q4: `d`, `m`, `qs` per
/// row, minimums included; Q8: `d`, `qs`): each activation block is loaded once for four
/// rows, and the four accumulation chains run side by side.
type Q4Kernel4 = fn([&[f32]; 4], [&[f32]; 4], [&[u8]; 4], &ActivationsQ8) -> [f32; 4];
type Q8Kernel4 = fn([&[f32]; 4], [&[i8]; 4], &ActivationsQ8) -> [f32; 4];

/// Whole dot products of one [`TILE`]-row tile with one activation row: the tile's `d`
/// (and `m`) for all its blocks, then its `qs` ([`Blocks::Q4Tiles`], [`Blocks::Q8Tiles`]).
type Q4TileKernel = fn(&[f16], &[f16], &[u8], &ActivationsQ8) -> [f32; TILE];
type Q8TileKernel = fn(&[f16], &[u8], &ActivationsQ8) -> [f32; TILE];

struct TileKernels {
    q4: Q4TileKernel,
    q8: Q8TileKernel,
}

struct Kernels {
    q4x4: Q4Kernel4,
    q8x4: Q8Kernel4,
    /// Where there are kernels for the tiled layouts, matrices are repacked into them.
    tiles: Option<TileKernels>,
}

/// The fastest kernels this CPU supports (detected once).
fn kernels() -> &'static Kernels {
    static KERNELS: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    KERNELS.get_or_init(detect_kernels)
}

fn detect_kernels() -> Kernels {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
            // SAFETY: the CPU has these AVX-512 extensions (checked just above).
            return Kernels {
                q4x4: |d, m, q, x| unsafe { avx512::dot_q4_x4(d, m, q, x) },
                q8x4: |d, q, x| unsafe { avx512::dot_q8_x4(d, q, x) },
                tiles: Some(TileKernels {
                    q4: |d, m, q, x| unsafe { avx512::dot_q4_tile(d, m, q, x) },
                    q8: |d, q, x| unsafe { avx512::dot_q8_tile(d, q, x) },
                }),
            };
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return Kernels {
                q4x4: |d, m, q, x| {
                    let dots = unsafe { avx2::dot_q4_x4(d, q, x) };
                    std::array::from_fn(|r| dots[r] + dot_f32(m[r], &x.sum))
                },
                q8x4: |d, q, x| unsafe { avx2::dot_q8_x4(d, q, x) },
                tiles: None,
            };
        }
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    {
        // The wasm build enables simd128 (.cargo/config.toml), which every current browser runs.
        return Kernels {
            q4x4: |d, m, q, x| {
                let dots = simd128::dot_q4_x4(d, q, x);
                std::array::from_fn(|r| dots[r] + dot_f32(m[r], &x.sum))
            },
            q8x4: simd128::dot_q8_x4,
            tiles: None,
        };
    }
    #[allow(unreachable_code)]
    Kernels {
        q4x4: |d, m, q, x| std::array::from_fn(|r| scalar::dot_q4(d[r], q[r], x) + dot_f32(m[r], &x.sum)),
        q8x4: |d, q, x| std::array::from_fn(|r| scalar::dot_q8(d[r], q[r], x)),
        tiles: None,
    }
}

mod scalar {
    use super::ActivationsQ8;

    pub fn dot_q4(d: &[f32], qs: &[u8], x: &ActivationsQ8) -> f32 {
        let mut acc = 0.0f32;
        for (i, q) in qs.chunks_exact(16).enumerate() {
            let xq = &x.blocks[i].qs;
            let isum: i32 = (0..16)
                .map(|j| i32::from(q[j] & 0x0f) * i32::from(xq[j]) + i32::from(q[j] >> 4) * i32::from(xq[j + 16]))
                .sum();
            acc += d[i] * x.d[i] * isum as f32;
        }
        acc
    }

    pub fn dot_q8(d: &[f32], qs: &[i8], x: &ActivationsQ8) -> f32 {
        let mut acc = 0.0f32;
        for (i, q) in qs.chunks_exact(32).enumerate() {
            let isum: i32 = q.iter().zip(&x.blocks[i].qs).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
            acc += d[i] * x.d[i] * isum as f32;
        }
        acc
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd128 {
    //! The integer dot products in wasm SIMD: 4-/8-bit weights and 8-bit activations widened to
    //! 16 bits and multiplied pairwise into 32-bit lanes (`i32x4.dot_i16x8_s`), each block's
    //! integer sum scaled into four f32 accumulators, as the AVX2 kernels do.
    use core::arch::wasm32::*;

    use super::ActivationsQ8;

    /// `Σ a·b` over 16 signed 16-bit pairs (`a`, `b` as two halves each), in four i32 lanes.
    #[inline(always)]
    fn dot16(a: [v128; 2], b: [v128; 2]) -> v128 {
        i32x4_add(i32x4_dot_i16x8(a[0], b[0]), i32x4_dot_i16x8(a[1], b[1]))
    }

    /// 16 bytes of `bytes[at..]`.
    #[inline(always)]
    fn load16<T: Copy>(bytes: &[T], at: usize) -> v128 {
        assert!(std::mem::size_of::<T>() == 1 && at + 16 <= bytes.len());
        // SAFETY: the 16 bytes at `at` lie inside `bytes` (checked just above); v128_load reads
        // unaligned.
        unsafe { v128_load(bytes.as_ptr().add(at) as *const v128) }
    }

    fn widen_signed(v: v128) -> [v128; 2] {
        [i16x8_extend_low_i8x16(v), i16x8_extend_high_i8x16(v)]
    }

    fn widen_unsigned(v: v128) -> [v128; 2] {
        [u16x8_extend_low_u8x16(v), u16x8_extend_high_u8x16(v)]
    }

    /// Activation block `i` widened: weights `0..16` and `16..32`.
    fn activations(x: &ActivationsQ8, i: usize) -> [[v128; 2]; 2] {
        let qs = &x.blocks[i].qs;
        [widen_signed(load16(qs, 0)), widen_signed(load16(qs, 16))]
    }

    /// `Σ_i d_i · x.d_i · block(i)` for four rows, where `block` gives the 32-bit lane sums of
    /// block `i` of a row.
    fn scaled_sum_x4(d: [&[f32]; 4], x: &ActivationsQ8, block: impl Fn(usize, usize, [[v128; 2]; 2]) -> v128) -> [f32; 4] {
        let mut acc = [f32x4_splat(0.0); 4];
        for (i, &x_d) in x.d.iter().enumerate() {
            let xs = activations(x, i);
            for (r, acc) in acc.iter_mut().enumerate() {
                let lanes = f32x4_convert_i32x4(block(r, i, xs));
                *acc = f32x4_add(*acc, f32x4_mul(lanes, f32x4_splat(d[r][i] * x_d)));
            }
        }
        acc.map(|a| f32x4_extract_lane::<0>(a) + f32x4_extract_lane::<1>(a) + f32x4_extract_lane::<2>(a) + f32x4_extract_lane::<3>(a))
    }

    /// Q4 rows (`q` in 0..16; byte `j` holds weight `j` low and `j + 16` high) · Q8 activations,
    /// without the blocks' minimums.
    pub fn dot_q4_x4(d: [&[f32]; 4], qs: [&[u8]; 4], x: &ActivationsQ8) -> [f32; 4] {
        scaled_sum_x4(d, x, |r, i, [low_x, high_x]| {
            let packed = load16(qs[r], i * 16);
            let low = v128_and(packed, u8x16_splat(0x0f));
            let high = u8x16_shr(packed, 4);
            i32x4_add(dot16(widen_unsigned(low), low_x), dot16(widen_unsigned(high), high_x))
        })
    }

    /// Q8 rows · Q8 activations.
    pub fn dot_q8_x4(d: [&[f32]; 4], qs: [&[i8]; 4], x: &ActivationsQ8) -> [f32; 4] {
        scaled_sum_x4(d, x, |r, i, [low_x, high_x]| {
            let (low, high) = (load16(qs[r], i * 32), load16(qs[r], i * 32 + 16));
            i32x4_add(dot16(widen_signed(low), low_x), dot16(widen_signed(high), high_x))
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The integer dot products of ggml's `ggml_vec_dot_q4_1_q8_1` / `q8_0_q8_0`, in AVX2:
    //! `maddubs` multiplies unsigned weight bytes by signed activation bytes and adds pairs to
    //! i16, `madd` with ones widens to i32, and one FMA per block applies both scales. Four
    //! weight rows share each activation load and keep four independent FMA chains.
    use std::arch::x86_64::*;

    use super::{ActivationsQ8, BlockQ8};

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// 16 bytes of nibbles → 32 bytes: low nibbles (weights 0..16), then high (16..32).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn unpack_nibbles(bytes: &[u8]) -> __m256i {
        assert!(bytes.len() >= 16);
        // SAFETY: 16 readable bytes (checked above); unaligned load.
        let q = unsafe { _mm_loadu_si128(bytes.as_ptr() as *const __m128i) };
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn load32(bytes: &[i8]) -> __m256i {
        assert!(bytes.len() >= 32);
        // SAFETY: 32 readable bytes (checked above); unaligned load.
        unsafe { _mm256_loadu_si256(bytes.as_ptr() as *const __m256i) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn activations(xb: &BlockQ8) -> __m256i {
        // SAFETY: BlockQ8 is 32 bytes, 32-byte aligned.
        unsafe { _mm256_load_si256(xb.qs.as_ptr() as *const __m256i) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot_u8_i8(w: __m256i, x: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(w, x);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    /// Signed × signed: `maddubs` needs an unsigned left operand, so move the weights' signs
    /// onto the activations.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot_i8_i8(w: __m256i, x: __m256i) -> __m256 {
        dot_u8_i8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
    }

    /// `Σ_i d[r][i] · x.d[i] · block(r, i, activations)` for four rows, one accumulator each,
    /// sharing each activation load.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn scaled_sum_x4(d: [&[f32]; 4], x: &ActivationsQ8, block: impl Fn(usize, usize, __m256i) -> __m256) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        // `i` indexes the four weight rows' scales as well as the activations.
        #[allow(clippy::needless_range_loop)]
        for i in 0..x.d.len() {
            let a = activations(&x.blocks[i]);
            for r in 0..4 {
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d[r][i] * x.d[i]), block(r, i, a), acc[r]);
            }
        }
        [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn dot_q4_x4(d: [&[f32]; 4], qs: [&[u8]; 4], x: &ActivationsQ8) -> [f32; 4] {
        scaled_sum_x4(d, x, |r, i, a| dot_u8_i8(unpack_nibbles(&qs[r][i * 16..]), a))
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn dot_q8_x4(d: [&[f32]; 4], qs: [&[i8]; 4], x: &ActivationsQ8) -> [f32; 4] {
        scaled_sum_x4(d, x, |r, i, a| dot_i8_i8(load32(&qs[r][i * 32..]), a))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! Four weight rows against one activation row, two blocks (64 weights) per instruction:
    //! `vpdpbusd` (AVX-512 VNNI) multiplies unsigned weight bytes by signed activation bytes
    //! and sums groups of four into i32 lanes: lanes 0–7 belong to block `i`, 8–15 to `i + 1`.
    use std::arch::x86_64::*;

    use half::f16;

    use super::{ActivationsQ8, TILE};

    /// The activation bytes of blocks `i` and `i + 1` (64 contiguous bytes).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    fn activations2(x: &ActivationsQ8, i: usize) -> __m512i {
        let pair = &x.blocks[i..i + 2];
        // SAFETY: two adjacent 32-byte blocks are 64 readable bytes.
        unsafe { _mm512_loadu_si512(pair.as_ptr() as *const __m512i) }
    }

    /// `[s0 × 8, s1 × 8]`: the scales of blocks `i` and `i + 1`, lined up with their lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    fn scales2(s0: f32, s1: f32) -> __m512 {
        let lo = _mm512_castps_pd(_mm512_set1_ps(s0));
        _mm512_castpd_ps(_mm512_insertf64x4(lo, _mm256_castps_pd(_mm256_set1_ps(s1)), 1))
    }

    /// Integer sum of a block for the rare odd tail (the shipped model has none).
    fn tail_dot(w: impl Iterator<Item = i32>, x: &[i8; 32]) -> i32 {
        w.zip(x).map(|(a, &b)| a * i32::from(b)).sum()
    }

    /// `Σ_i d_i · x.d_i · pair(r, i, activations) + offset_scale · offsets_i · x.sum_i` over
    /// pairs of blocks for four rows, then the odd tail block (if any) through `tail(r, i)`,
    /// which returns its integer dot product. The offset term carries Q4_1's block minimums
    /// (`offsets = m`, scale 1) or undoes the `+128` of unsigned Q8 weights (`offsets = d`,
    /// scale −128); its four scalar chains overlap with the vector work.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    fn scaled_sum_x4(
        d: [&[f32]; 4],
        (offsets, offset_scale): ([&[f32]; 4], f32),
        x: &ActivationsQ8,
        pair: impl Fn(usize, usize, __m512i) -> __m512i,
        tail: impl Fn(usize, usize) -> i32,
    ) -> [f32; 4] {
        let nb = x.d.len();
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut off = [0.0f32; 4];
        let mut i = 0;
        while i + 2 <= nb {
            let a = activations2(x, i);
            for r in 0..4 {
                let p = _mm512_cvtepi32_ps(pair(r, i, a));
                acc[r] = _mm512_fmadd_ps(p, scales2(d[r][i] * x.d[i], d[r][i + 1] * x.d[i + 1]), acc[r]);
                off[r] += offsets[r][i] * x.sum[i] + offsets[r][i + 1] * x.sum[i + 1];
            }
            i += 2;
        }
        let mut out = [0.0f32; 4];
        for r in 0..4 {
            out[r] = _mm512_reduce_add_ps(acc[r]);
            if i < nb {
                out[r] += d[r][i] * x.d[i] * tail(r, i) as f32;
                off[r] += offsets[r][i] * x.sum[i];
            }
            out[r] += offset_scale * off[r];
        }
        out
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub fn dot_q4_x4(d: [&[f32]; 4], m: [&[f32]; 4], qs: [&[u8]; 4], x: &ActivationsQ8) -> [f32; 4] {
        let mask = _mm256_set1_epi8(0x0f);
        let pair = |r: usize, i: usize, a: __m512i| {
            let bytes = &qs[r][i * 16..i * 16 + 32];
            // SAFETY: 32 readable bytes.
            let q = unsafe { _mm256_loadu_si256(bytes.as_ptr() as *const __m256i) };
            let lo = _mm256_and_si256(q, mask); // low nibbles of blocks i, i+1
            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask); // high nibbles
            let w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            // [lo_i, lo_i+1, hi_i, hi_i+1] → [lo_i, hi_i, lo_i+1, hi_i+1], the activations' order.
            let w = _mm512_shuffle_i64x2(w, w, 0b11_01_10_00);
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, a)
        };
        let tail = |r: usize, i: usize| {
            let q = &qs[r][i * 16..i * 16 + 16];
            let w = q.iter().map(|&b| i32::from(b & 0x0f)).chain(q.iter().map(|&b| i32::from(b >> 4)));
            tail_dot(w, &x.blocks[i].qs)
        };
        scaled_sum_x4(d, (m, 1.0), x, pair, tail)
    }

    /// Q8 weights are signed but `vpdpbusd` wants unsigned ones: it multiplies `q + 128`
    /// instead and subtracts `128 · Σ d_w · sum_x` afterwards.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub fn dot_q8_x4(d: [&[f32]; 4], qs: [&[i8]; 4], x: &ActivationsQ8) -> [f32; 4] {
        let flip = _mm512_set1_epi8(-128);
        let pair = |r: usize, i: usize, a: __m512i| {
            let bytes = &qs[r][i * 32..i * 32 + 64];
            // SAFETY: 64 readable bytes.
            let w = unsafe { _mm512_loadu_si512(bytes.as_ptr() as *const __m512i) };
            let w = _mm512_xor_si512(w, flip); // q + 128 as an unsigned byte
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, a)
        };
        let tail = |r: usize, i: usize| {
            let w = qs[r][i * 32..i * 32 + 32].iter().map(|&q| i32::from(q) + 128);
            tail_dot(w, &x.blocks[i].qs)
        };
        scaled_sum_x4(d, (d, -128.0), x, pair, tail)
    }

    /// Activation bytes `at..at + 4` of a block in every 32-bit lane.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    fn broadcast4(x: &[i8; 32], at: usize) -> __m512i {
        _mm512_set1_epi32(i32::from_le_bytes(std::array::from_fn(|j| x[at + j] as u8)))
    }

    /// 16 f16 values as f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    fn load_f16x16(v: &[f16]) -> __m512 {
        assert!(v.len() >= 16);
        // SAFETY: 16 f16 values are 32 readable bytes.
        _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(v.as_ptr() as *const __m256i) })
    }

    /// A tile's blocks against the activations: lane `l` accumulates row `l`. Per block,
    /// `block(i)` gives the integer dot products, `offset(i)` the vector multiplied by
    /// `offset_scale · x.sum_i` (Q4_1's minimums, or Q8's `d` undoing the `+128`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    fn tile_sum(
        d: &[f16],
        x: &ActivationsQ8,
        (offset, offset_scale): (impl Fn(usize) -> __m512, f32),
        block: impl Fn(usize) -> __m512i,
    ) -> [f32; TILE] {
        let mut acc = _mm512_setzero_ps();
        for i in 0..x.d.len() {
            let dots = _mm512_cvtepi32_ps(block(i));
            let scales = _mm512_mul_ps(load_f16x16(&d[i * TILE..]), _mm512_set1_ps(x.d[i]));
            acc = _mm512_fmadd_ps(dots, scales, acc);
            acc = _mm512_fmadd_ps(offset(i), _mm512_set1_ps(offset_scale * x.sum[i]), acc);
        }
        let mut out = [0.0f32; TILE];
        // SAFETY: 16 writable f32.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), acc) };
        out
    }

    /// A Q4 tile ([`Blocks::Q4Tiles`](super::Blocks::Q4Tiles)): each 64-byte group gives
    /// four weights of every row as low nibbles and the four 16 places later as high ones,
    /// each multiplied by four activation bytes broadcast to every row's lane.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub fn dot_q4_tile(d: &[f16], m: &[f16], qs: &[u8], x: &ActivationsQ8) -> [f32; TILE] {
        let nb = x.d.len();
        assert!(d.len() == nb * TILE && m.len() == nb * TILE && qs.len() == nb * TILE * 16);
        let mask = _mm512_set1_epi8(0x0f);
        let block = |i: usize| {
            let (xb, q) = (&x.blocks[i].qs, &qs[i * TILE * 16..]);
            let (mut lo_acc, mut hi_acc) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for k in 0..4 {
                // SAFETY: 64 readable bytes (the assert above).
                let v = unsafe { _mm512_loadu_si512(q[k * 64..].as_ptr() as *const __m512i) };
                let (lo, hi) = (_mm512_and_si512(v, mask), _mm512_and_si512(_mm512_srli_epi16(v, 4), mask));
                lo_acc = _mm512_dpbusd_epi32(lo_acc, lo, broadcast4(xb, 4 * k));
                hi_acc = _mm512_dpbusd_epi32(hi_acc, hi, broadcast4(xb, 4 * k + 16));
            }
            _mm512_add_epi32(lo_acc, hi_acc)
        };
        tile_sum(d, x, (|i: usize| load_f16x16(&m[i * TILE..]), 1.0), block)
    }

    /// A Q8 tile ([`Blocks::Q8Tiles`](super::Blocks::Q8Tiles)), weights stored as `q + 128`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub fn dot_q8_tile(d: &[f16], qs: &[u8], x: &ActivationsQ8) -> [f32; TILE] {
        let nb = x.d.len();
        assert!(d.len() == nb * TILE && qs.len() == nb * TILE * 32);
        let block = |i: usize| {
            let (xb, q) = (&x.blocks[i].qs, &qs[i * TILE * 32..]);
            let mut acc = [_mm512_setzero_si512(); 2];
            for k in 0..8 {
                // SAFETY: 64 readable bytes (the assert above).
                let v = unsafe { _mm512_loadu_si512(q[k * 64..].as_ptr() as *const __m512i) };
                acc[k % 2] = _mm512_dpbusd_epi32(acc[k % 2], v, broadcast4(xb, 4 * k));
            }
            _mm512_add_epi32(acc[0], acc[1])
        };
        tile_sum(d, x, (|i: usize| load_f16x16(&d[i * TILE..]), -128.0), block)
    }
}

/// `y[n, rows] = x[n, k] · w[rows, k]ᵀ` in f32 with the `gemm` crate (the GEMM burn-flex uses).
fn sgemm_xwt(n: usize, k: usize, rows: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
    // SAFETY: the strides describe x as row-major [n, k], wᵀ as column-major view of
    // row-major [rows, k] (i.e. [k, rows] with row stride 1, col stride k), y as row-major
    // [n, rows]; the slices have exactly those lengths.
    assert!(x.len() == n * k && w.len() == rows * k && y.len() == n * rows);
    unsafe {
        gemm::gemm(
            n,
            rows,
            k,
            y.as_mut_ptr(),
            1,
            rows as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm_parallelism(),
        );
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn gemm_parallelism() -> gemm::Parallelism {
    gemm::Parallelism::Rayon(rayon::current_num_threads())
}

#[cfg(target_arch = "wasm32")]
fn gemm_parallelism() -> gemm::Parallelism {
    gemm::Parallelism::None
}

/// Runs `f(chunk_index, chunk)` over `chunk_len`-sized chunks of `data`, on rayon's threads
/// natively and sequentially in wasm.
fn par_chunks_mut<T: Send>(data: &mut [T], chunk_len: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        data.par_chunks_mut(chunk_len).enumerate().for_each(|(i, c)| f(i, c));
    }
    #[cfg(target_arch = "wasm32")]
    {
        data.chunks_mut(chunk_len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes rows of f32 weights as Q4_1 blocks (round to nearest, like ggml's reference).
    fn encode_q4_1(w: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for block in w.chunks_exact(32) {
            let min = block.iter().copied().fold(f32::INFINITY, f32::min);
            let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            out.extend(f16::from_f32(d).to_le_bytes());
            out.extend(f16::from_f32(min).to_le_bytes());
            for j in 0..16 {
                let lo = (((block[j] - min) * inv).round() as u8).min(15);
                let hi = (((block[j + 16] - min) * inv).round() as u8).min(15);
                out.push(lo | (hi << 4));
            }
        }
        out
    }

    fn encode_q8_0(w: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for block in w.chunks_exact(32) {
            let d = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            out.extend(f16::from_f32(d).to_le_bytes());
            out.extend(block.iter().map(|v| ((v / d).round() as i8) as u8));
        }
        out
    }

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Repacking keeps every weight: it dequantizes exactly like the GGUF reader.
    #[cfg_attr(not(target_arch = "wasm32"), test)]
    #[cfg_attr(target_arch = "wasm32", wasm_bindgen_test::wasm_bindgen_test)]
    fn repacked_blocks_dequantize_like_gguf() {
        let (rows, cols) = (3, 64);
        let w = pseudo_random(rows * cols, 2);
        let q41 = encode_q4_1(&w);
        let q40: Vec<u8> = q41.chunks_exact(20).flat_map(|b| [&b[..2], &b[4..]].concat()).collect();
        for (ty, bytes) in [
            (TensorType::Q4_1, q41),
            (TensorType::Q4_0, q40),
            (TensorType::Q8_0, encode_q8_0(&w)),
        ] {
            let m = QMatrix::from_gguf(ty, rows, cols, &bytes);
            assert_eq!(m.dequantize(), dequantize(ty, &bytes), "{ty:?}");
        }
    }

    /// Both paths (integer kernels for few rows, dequantize + GEMM for many) agree with an f64
    /// product over the dequantized weights, within the activation-quantization error.
    #[cfg_attr(not(target_arch = "wasm32"), test)]
    #[cfg_attr(target_arch = "wasm32", wasm_bindgen_test::wasm_bindgen_test)]
    fn quantized_and_dequantized_paths_match_reference() {
        let (rows, cols) = (48, 96);
        let raw = pseudo_random(rows * cols, 1);
        for (ty, bytes) in [(TensorType::Q4_1, encode_q4_1(&raw)), (TensorType::Q8_0, encode_q8_0(&raw))] {
            let m = QMatrix::from_gguf(ty, rows, cols, &bytes);
            let w = m.dequantize();
            for n in [1, 3, 9] {
                let x = pseudo_random(n * cols, 7 + n as u32);
                let y = m.matmul(&x);
                for t in 0..n {
                    for r in 0..rows {
                        let exact: f64 = (0..cols).map(|c| f64::from(w[r * cols + c]) * f64::from(x[t * cols + c])).sum();
                        let got = f64::from(y[t * rows + r]);
                        assert!((got - exact).abs() < 0.05, "{ty:?} n={n} t={t} r={r}: {got} vs {exact}");
                    }
                }
            }
        }
    }

    #[cfg_attr(not(target_arch = "wasm32"), test)]
    #[cfg_attr(target_arch = "wasm32", wasm_bindgen_test::wasm_bindgen_test)]
    fn stacked_matrices_multiply_like_their_parts() {
        let cols = 64;
        let a = QMatrix::from_gguf(TensorType::Q4_1, 2, cols, &encode_q4_1(&pseudo_random(2 * cols, 5)));
        let b = QMatrix::from_gguf(TensorType::Q4_1, 3, cols, &encode_q4_1(&pseudo_random(3 * cols, 6)));
        let ab = QMatrix::concat_rows(&[a.clone(), b.clone()]).unwrap();
        let x = pseudo_random(cols, 9);
        let (together, apart) = (ab.matmul(&x), [a.matmul(&x), b.matmul(&x)].concat());
        // Equal up to summation order (rows may go through the 1- or the 4-row kernel).
        assert!(
            together.iter().zip(&apart).all(|(t, a)| (t - a).abs() < 1e-4),
            "{together:?} vs {apart:?}"
        );
        let q8 = QMatrix::from_gguf(TensorType::Q8_0, 1, cols, &encode_q8_0(&pseudo_random(cols, 1)));
        assert!(QMatrix::concat_rows(&[a, q8]).is_none());
    }

    /// The tiled layouts hold the same weights as GGUF (Q4_1, Q4_0 and Q8_0), stack like the
    /// row layout, and where their kernels run they multiply like the row layout's kernels.
    #[cfg_attr(not(target_arch = "wasm32"), test)]
    #[cfg_attr(target_arch = "wasm32", wasm_bindgen_test::wasm_bindgen_test)]
    fn tiled_layouts_equal_the_row_layout() {
        let tile_kernels = kernels().tiles.is_some();
        if !tile_kernels {
            eprintln!("no tile kernels on this CPU: checking the tiled layouts' contents only");
        }
        for cols in [32, 288, 576] {
            let rows = 2 * TILE;
            let raw = pseudo_random(rows * cols, 11);
            let q41 = encode_q4_1(&raw);
            let q40: Vec<u8> = q41.chunks_exact(20).flat_map(|b| [&b[..2], &b[4..]].concat()).collect();
            for (ty, bytes) in [
                (TensorType::Q4_1, q41),
                (TensorType::Q4_0, q40),
                (TensorType::Q8_0, encode_q8_0(&raw)),
            ] {
                let repack = |layout| QMatrix::repack(ty, rows, cols, &bytes, layout).unwrap();
                let (tiled, by_rows) = (repack(Layout::Tiles), repack(Layout::Rows));
                assert!(matches!(*tiled.blocks, Blocks::Q4Tiles { .. } | Blocks::Q8Tiles { .. }));
                assert_eq!(tiled.dequantize(), dequantize(ty, &bytes), "{ty:?}, {cols} columns");
                let tiles: Vec<QMatrix> = bytes
                    .chunks_exact(bytes.len() / 2)
                    .map(|half| QMatrix::repack(ty, TILE, cols, half, Layout::Tiles).unwrap())
                    .collect();
                let stacked = QMatrix::concat_rows(&tiles).unwrap();
                assert_eq!(stacked.dequantize(), tiled.dequantize(), "{ty:?} stacked");
                // Parts of 16 and 8 rows: one layout for both (rows), whatever this CPU prefers.
                let (a, b) = bytes.split_at(bytes.len() / 2);
                let mixed = QMatrix::try_stacked_from_gguf(&[(ty, TILE, cols, a), (ty, TILE / 2, cols, &b[..b.len() / 2])]).unwrap();
                assert_eq!(
                    mixed.dequantize(),
                    dequantize(ty, &bytes[..bytes.len() * 3 / 4]),
                    "{ty:?} 16 + 8 rows"
                );
                if tile_kernels {
                    for n in [1, 3] {
                        let x = pseudo_random(n * cols, 13 + n as u32);
                        let (got, want) = (tiled.matmul(&x), by_rows.matmul(&x));
                        let close = got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= 1e-4 * w.abs().max(1.0));
                        assert!(close, "{ty:?}, {cols} columns, n={n}: {got:?} vs {want:?}");
                    }
                }
            }
        }
    }

    #[cfg_attr(not(target_arch = "wasm32"), test)]
    #[cfg_attr(target_arch = "wasm32", wasm_bindgen_test::wasm_bindgen_test)]
    fn simd_kernels_equal_scalar_kernels() {
        // 1, 9 (an odd count) and 18 blocks (the model's rows); four different rows at once.
        for cols in [32, 288, 576] {
            let x = quantize_q8(&pseudo_random(cols, 3));
            let close = |got: [f32; 4], want: [f32; 4]| got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= 1e-4 * w.abs().max(1.0));
            let raw = pseudo_random(4 * cols, 4);
            let q4 = QMatrix::from_gguf(TensorType::Q4_1, 4, cols, &encode_q4_1(&raw));
            let Blocks::Q4 { d, m, qs } = &*q4.blocks else { unreachable!() };
            let nb = cols / 32;
            fn row(v: &[f32], r: usize) -> &[f32] {
                let nb = v.len() / 4;
                &v[r * nb..(r + 1) * nb]
            }
            let rows4 = |r: usize| &qs[r * nb * 16..(r + 1) * nb * 16];
            let want = std::array::from_fn(|r| scalar::dot_q4(row(d, r), rows4(r), &x) + dot_f32(row(m, r), &x.sum));
            let got = (kernels().q4x4)(
                std::array::from_fn(|r| row(d, r)),
                std::array::from_fn(|r| row(m, r)),
                std::array::from_fn(rows4),
                &x,
            );
            assert!(close(got, want), "q4x4, {cols} columns: {got:?} vs {want:?}");

            let q8 = QMatrix::from_gguf(TensorType::Q8_0, 4, cols, &encode_q8_0(&raw));
            let Blocks::Q8 { d, qs } = &*q8.blocks else { unreachable!() };
            let rows8 = |r: usize| &qs[r * nb * 32..(r + 1) * nb * 32];
            let want = std::array::from_fn(|r| scalar::dot_q8(row(d, r), rows8(r), &x));
            let got = (kernels().q8x4)(std::array::from_fn(|r| row(d, r)), std::array::from_fn(rows8), &x);
            assert!(close(got, want), "q8x4, {cols} columns: {got:?} vs {want:?}");
        }
    }
}
