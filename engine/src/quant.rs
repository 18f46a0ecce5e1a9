//! Quantized weight matrices kept in their GGUF encoding, with CPU kernels.
//!
//! burn's quantized tensors dequantize the whole weight before every matmul, which makes
//! single-token decode ~100× slower than f32 (machine-facts §G), and its symmetric Q4S cannot
//! represent GGUF's asymmetric Q4_1 blocks exactly. So on the CPU the engine keeps each weight
//! as the GGUF bytes and multiplies with its own kernels:
//!
//! * **decode** (a few rows of activations): the activations are quantized to 8-bit blocks of
//!   32 (like llama.cpp's `Q8_0`/`Q8_1` activations) and dotted with the 4-/8-bit weight
//!   blocks in integer arithmetic (AVX2 when the CPU has it, scalar otherwise), threads over
//!   output rows. This reads the 4-bit weights once per token: the step is memory-bound.
//! * **prefill** (many rows): the weight is dequantized once per call into an f32 scratch
//!   matrix and multiplied with an f32 GEMM, which is compute-bound and ~2× faster per FLOP
//!   than integer dot products on these machines.

use std::sync::Arc;

use half::f16;

use crate::gguf::{TensorType, dequantize};

/// Shared, immutable model bytes (the whole GGUF file, memory-mapped or read).
pub type ModelBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A `[rows, cols]` weight matrix stored as GGUF blocks, row-major (`cols` is contiguous).
#[derive(Clone)]
pub struct QMatrix {
    pub ty: TensorType,
    pub rows: usize,
    pub cols: usize,
    bytes: ModelBytes,
    start: usize,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({:?}, {}x{})", self.ty, self.rows, self.cols)
    }
}

/// 32 activations quantized to i8 with one scale: `x ≈ d * qs`; `sum = d * Σ qs`.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct BlockQ8 {
    qs: [i8; 32],
    d: f32,
    sum: f32,
}

const BLOCK: usize = 32;

impl QMatrix {
    /// A matrix over `bytes[start..]`; the caller (the GGUF loader) has checked the bounds.
    pub fn new(ty: TensorType, rows: usize, cols: usize, bytes: ModelBytes, start: usize) -> Self {
        debug_assert_eq!(cols % ty.block_len(), 0);
        debug_assert!(start + rows * cols / ty.block_len() * ty.block_bytes() <= (*bytes).as_ref().len());
        Self { ty, rows, cols, bytes, start }
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_len() * self.ty.block_bytes()
    }

    /// The encoded bytes of the whole matrix.
    pub fn data(&self) -> &[u8] {
        let all: &[u8] = (*self.bytes).as_ref();
        &all[self.start..self.start + self.rows * self.row_bytes()]
    }

    /// The encoded bytes of one row.
    fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data()[r * n..(r + 1) * n]
    }

    /// Bytes held (in the encoding).
    pub fn size_bytes(&self) -> usize {
        self.rows * self.row_bytes()
    }

    /// The whole matrix as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.dequantize_rows_into(0, &mut out);
        out
    }

    /// One row as f32 (an embedding lookup).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        dequantize(self.ty, self.row(r))
    }

    /// Dequantizes rows `first..first + out.len() / cols` into `out`.
    fn dequantize_rows_into(&self, first: usize, out: &mut [f32]) {
        let cols = self.cols;
        par_chunks_mut(out, cols * 64, |chunk_index, chunk| {
            for (i, row_out) in chunk.chunks_exact_mut(cols).enumerate() {
                let r = first + chunk_index * 64 + i;
                dequantize_row_into(self.ty, self.row(r), row_out);
            }
        });
    }

    /// `y = x · Wᵀ` for `n = x.len() / cols` activation rows: `y` is `[n, rows]`.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        let n = x.len() / self.cols;
        assert_eq!(n * self.cols, x.len(), "activation length is not a multiple of {}", self.cols);
        if n <= QUANTIZED_PATH_MAX_ROWS || !matches!(self.ty, TensorType::Q4_1 | TensorType::Q8_0 | TensorType::Q4_0) {
            return self.matmul_quantized(x, n);
        }
        self.matmul_dequantized(x, n)
    }

    fn matmul_quantized(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; n * self.rows];
        match self.ty {
            TensorType::Q4_0 | TensorType::Q4_1 | TensorType::Q8_0 => {
                let xq: Vec<Vec<BlockQ8>> = x.chunks_exact(self.cols).map(quantize_q8).collect();
                let kernel = dot_kernel(self.ty);
                let rows = self.rows;
                // Threads over output rows; every thread walks all `n` activation rows so that
                // each weight row is read from memory once.
                let mut yt = vec![0.0f32; n * rows];
                par_chunks_mut(&mut yt, ROWS_PER_TASK * n, |task, chunk| {
                    for (i, out) in chunk.chunks_exact_mut(n).enumerate() {
                        let w = self.row(task * ROWS_PER_TASK + i);
                        for (t, xq) in xq.iter().enumerate() {
                            out[t] = kernel(w, xq);
                        }
                    }
                });
                for r in 0..rows {
                    for t in 0..n {
                        y[t * rows + r] = yt[r * n + t];
                    }
                }
            }
            TensorType::F32 | TensorType::F16 => {
                let w = self.dequantize();
                for (xrow, yrow) in x.chunks_exact(self.cols).zip(y.chunks_exact_mut(self.rows)) {
                    for (r, out) in yrow.iter_mut().enumerate() {
                        *out = w[r * self.cols..(r + 1) * self.cols].iter().zip(xrow).map(|(a, b)| a * b).sum();
                    }
                }
            }
        }
        y
    }

    fn matmul_dequantized(&self, x: &[f32], n: usize) -> Vec<f32> {
        let w = self.dequantize();
        let mut y = vec![0.0f32; n * self.rows];
        sgemm_xwt(n, self.cols, self.rows, x, &w, &mut y);
        y
    }
}

/// Up to this many activation rows the integer kernels beat dequantize + GEMM.
const QUANTIZED_PATH_MAX_ROWS: usize = 4;
/// Output rows per parallel task in the quantized kernels.
const ROWS_PER_TASK: usize = 16;

fn dequantize_row_into(ty: TensorType, bytes: &[u8], out: &mut [f32]) {
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match ty {
        TensorType::Q4_1 => {
            for (block, out) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
                let (d, m) = (f16_at(block, 0), f16_at(block, 2));
                let (lo, hi) = out.split_at_mut(16);
                for j in 0..16 {
                    let q = block[4 + j];
                    lo[j] = f32::from(q & 0x0f) * d + m;
                    hi[j] = f32::from(q >> 4) * d + m;
                }
            }
        }
        TensorType::Q8_0 => {
            for (block, out) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(block, 0);
                for j in 0..32 {
                    out[j] = f32::from(block[2 + j] as i8) * d;
                }
            }
        }
        _ => out.copy_from_slice(&dequantize(ty, bytes)),
    }
}

/// Quantizes one row of activations to 8-bit blocks (`d = max|x| / 127`).
fn quantize_q8(x: &[f32]) -> Vec<BlockQ8> {
    x.chunks_exact(BLOCK)
        .map(|chunk| {
            let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; 32];
            let mut isum = 0i32;
            for (q, &v) in qs.iter_mut().zip(chunk) {
                *q = (v * inv).round() as i8;
                isum += i32::from(*q);
            }
            BlockQ8 { qs, d, sum: d * isum as f32 }
        })
        .collect()
}

type DotKernel = fn(&[u8], &[BlockQ8]) -> f32;

/// The fastest dot-product kernel this CPU supports for weights of type `ty`.
fn dot_kernel(ty: TensorType) -> DotKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return match ty {
                // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
                TensorType::Q4_1 => |w, x| unsafe { avx2::dot_q4_1(w, x) },
                TensorType::Q4_0 => |w, x| unsafe { avx2::dot_q4_0(w, x) },
                _ => |w, x| unsafe { avx2::dot_q8_0(w, x) },
            };
        }
    }
    match ty {
        TensorType::Q4_1 => scalar::dot_q4_1,
        TensorType::Q4_0 => scalar::dot_q4_0,
        _ => scalar::dot_q8_0,
    }
}

mod scalar {
    use super::{BlockQ8, f16};

    fn f16_at(b: &[u8], i: usize) -> f32 {
        f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
    }

    pub fn dot_q4_1(w: &[u8], x: &[BlockQ8]) -> f32 {
        let mut acc = 0.0f32;
        for (block, xb) in w.chunks_exact(20).zip(x) {
            let (d, m) = (f16_at(block, 0), f16_at(block, 2));
            let mut isum = 0i32;
            for j in 0..16 {
                let q = block[4 + j];
                isum += i32::from(q & 0x0f) * i32::from(xb.qs[j]);
                isum += i32::from(q >> 4) * i32::from(xb.qs[j + 16]);
            }
            acc += d * xb.d * isum as f32 + m * xb.sum;
        }
        acc
    }

    pub fn dot_q4_0(w: &[u8], x: &[BlockQ8]) -> f32 {
        let mut acc = 0.0f32;
        for (block, xb) in w.chunks_exact(18).zip(x) {
            let d = f16_at(block, 0);
            let mut isum = 0i32;
            for j in 0..16 {
                let q = block[2 + j];
                isum += (i32::from(q & 0x0f) - 8) * i32::from(xb.qs[j]);
                isum += (i32::from(q >> 4) - 8) * i32::from(xb.qs[j + 16]);
            }
            acc += d * xb.d * isum as f32;
        }
        acc
    }

    pub fn dot_q8_0(w: &[u8], x: &[BlockQ8]) -> f32 {
        let mut acc = 0.0f32;
        for (block, xb) in w.chunks_exact(34).zip(x) {
            let d = f16_at(block, 0);
            let isum: i32 =
                (0..32).map(|j| i32::from(block[2 + j] as i8) * i32::from(xb.qs[j])).sum();
            acc += d * xb.d * isum as f32;
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The integer dot products of ggml's `ggml_vec_dot_q4_1_q8_1` / `q8_0_q8_0`, in AVX2:
    //! `maddubs` multiplies unsigned weight bytes by signed activation bytes and adds pairs to
    //! i16, `madd` with ones widens to i32, and one FMA per block applies both scales.
    use std::arch::x86_64::*;

    use super::BlockQ8;

    /// An f16 block scale, converted in hardware (`half`'s portable path costs more than the
    /// block's whole dot product).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn scale(b: &[u8], i: usize) -> f32 {
        let bits = u16::from_le_bytes([b[i], b[i + 1]]);
        // `set1` rather than `cvtsi32_si128`: the latter compiles to a `vpinsrw` that merges
        // into (and so waits on) whatever register the compiler picks, often an accumulator.
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(bits as i16)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// 16 bytes of nibbles → 32 bytes: low nibbles (weights 0..16), then high (16..32).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
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
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load32(bytes: &[u8]) -> __m256i {
        assert!(bytes.len() >= 32);
        // SAFETY: 32 readable bytes (checked above); unaligned load.
        unsafe { _mm256_loadu_si256(bytes.as_ptr() as *const __m256i) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn activations(xb: &BlockQ8) -> __m256i {
        // SAFETY: BlockQ8 is 32-byte aligned and `qs` is its first field (32 bytes).
        unsafe { _mm256_load_si256(xb.qs.as_ptr() as *const __m256i) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_u8_i8(w: __m256i, x: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(w, x);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    /// Signed × signed: `maddubs` needs an unsigned left operand, so move the weights' signs
    /// onto the activations.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_i8_i8(w: __m256i, x: __m256i) -> __m256 {
        dot_u8_i8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot_q4_1(w: &[u8], x: &[BlockQ8]) -> f32 {
        // Two blocks per iteration into separate accumulators: one FMA chain per block would
        // otherwise bound the loop by its latency.
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut mins0, mut mins1) = (0.0f32, 0.0f32);
        let mut pairs = w.chunks_exact(40).zip(x.chunks_exact(2));
        for (blocks, xs) in pairs.by_ref() {
            let (b0, b1) = blocks.split_at(20);
            let p0 = dot_u8_i8(unpack_nibbles(&b0[4..]), activations(&xs[0]));
            let p1 = dot_u8_i8(unpack_nibbles(&b1[4..]), activations(&xs[1]));
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(scale(b0, 0) * xs[0].d), p0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(scale(b1, 0) * xs[1].d), p1, acc1);
            mins0 += scale(b0, 2) * xs[0].sum;
            mins1 += scale(b1, 2) * xs[1].sum;
        }
        let n = w.len() / 20;
        if n % 2 == 1 {
            let (b, xb) = (&w[(n - 1) * 20..], &x[n - 1]);
            let p = dot_u8_i8(unpack_nibbles(&b[4..]), activations(xb));
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(scale(b, 0) * xb.d), p, acc0);
            mins0 += scale(b, 2) * xb.sum;
        }
        hsum(_mm256_add_ps(acc0, acc1)) + mins0 + mins1
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot_q4_0(w: &[u8], x: &[BlockQ8]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (block, xb) in w.chunks_exact(18).zip(x) {
            let qw = _mm256_sub_epi8(unpack_nibbles(&block[2..]), _mm256_set1_epi8(8));
            let p = dot_i8_i8(qw, activations(xb));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(scale(block, 0) * xb.d), p, acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot_q8_0(w: &[u8], x: &[BlockQ8]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (block, xb) in w.chunks_exact(34).zip(x) {
            let p = dot_i8_i8(load32(&block[2..]), activations(xb));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(scale(block, 0) * xb.d), p, acc);
        }
        hsum(acc)
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

    /// Both paths (integer kernels for few rows, dequantize + GEMM for many) agree with an f64
    /// product over the dequantized weights, within the activation-quantization error.
    #[test]
    fn quantized_and_dequantized_paths_match_reference() {
        let (rows, cols) = (48, 96);
        let bytes = encode_q4_1(&pseudo_random(rows * cols, 1));
        let m = QMatrix::new(TensorType::Q4_1, rows, cols, Arc::new(bytes), 0);
        let w = m.dequantize();
        for n in [1, 3, 9] {
            let x = pseudo_random(n * cols, 7 + n as u32);
            let y = m.matmul(&x);
            for t in 0..n {
                for r in 0..rows {
                    let exact: f64 = (0..cols)
                        .map(|c| f64::from(w[r * cols + c]) * f64::from(x[t * cols + c]))
                        .sum();
                    let got = f64::from(y[t * rows + r]);
                    assert!((got - exact).abs() < 0.05, "n={n} t={t} r={r}: {got} vs {exact}");
                }
            }
        }
    }

    #[test]
    fn simd_kernels_equal_scalar_kernels() {
        let cols = 256;
        let x = quantize_q8(&pseudo_random(cols, 3));
        let q41 = encode_q4_1(&pseudo_random(cols, 4));
        let mut q80 = Vec::new();
        for (i, block) in pseudo_random(cols, 5).chunks_exact(32).enumerate() {
            q80.extend(f16::from_f32(0.01 * (i + 1) as f32).to_le_bytes());
            q80.extend(block.iter().map(|v| ((v * 127.0) as i8) as u8));
        }
        let q40: Vec<u8> = q41.chunks_exact(20).flat_map(|b| [&b[..2], &b[4..]].concat()).collect();
        for (ty, w, scalar) in [
            (TensorType::Q4_1, &q41, scalar::dot_q4_1 as DotKernel),
            (TensorType::Q8_0, &q80, scalar::dot_q8_0),
            (TensorType::Q4_0, &q40, scalar::dot_q4_0),
        ] {
            let (a, b) = (dot_kernel(ty)(w, &x), scalar(w, &x));
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{ty:?}: {a} vs {b}");
        }
    }
}
