//! The CPU backend's fused path for a few token rows (a decode step, a batched decode step,
//! a short prompt): the block's small operations as plain loops over host slices.
//!
//! burn's CPU backend runs each of a block's ~80 small tensor operations (norms, RoPE's
//! reshapes and slices, the cache's writes, softmax, SiLU) as its own pass over memory, one
//! after another; for a single token that was about a third of a decode step, spent on vectors
//! of 576 values. Here each of them is one loop, and the linear layers call the quantized
//! kernels directly ([`QMatrix::matmul`](crate::quant::QMatrix::matmul)). The model definition
//! stays the one in `llama.rs`: its blocks call these on the CPU backend when a pass has few
//! rows (see `Llama::residual`), and burn's tensor operations otherwise.

use crate::quant::dot_f32;

/// RMSNorm of each `weight.len()`-wide row of `x`: `x / sqrt(mean(x²) + eps) · weight`.
pub(crate) fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let n = weight.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(n) {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let inv_rms = (mean_square + eps).sqrt().recip();
        out.extend(row.iter().zip(weight).map(|(v, w)| v * inv_rms * w));
    }
    out
}

/// Rotates each `cos.len()`-wide head of `heads` in place by RoPE over adjacent pairs:
/// `(x[2i], x[2i+1]) → (x[2i]·c − x[2i+1]·s, x[2i+1]·c + x[2i]·s)`, where `cos`/`sin` hold
/// each pair's value twice (the layout of the model's RoPE tables).
pub(crate) fn rotate_heads(heads: &mut [f32], cos: &[f32], sin: &[f32]) {
    for head in heads.chunks_exact_mut(cos.len()) {
        for ((pair, c), s) in head.chunks_exact_mut(2).zip(cos.chunks_exact(2)).zip(sin.chunks_exact(2)) {
            let (even, odd) = (pair[0], pair[1]);
            pair[0] = even * c[0] - odd * s[0];
            pair[1] = odd * c[1] + even * s[1];
        }
    }
}

/// Grouped-query attention of one query row over the first `n_keys` cached positions.
///
/// `q` and `out` are `[n_head, head_dim]`; `keys` and `values` are position-major
/// `[position][n_head_kv][head_dim]`; query head `h` reads KV head `h / (n_head / n_head_kv)`.
/// `scores` is scratch space, reused between calls.
pub(crate) fn attend_row(
    q: &[f32],
    [keys, values]: [&[f32]; 2],
    n_keys: usize,
    [n_head_kv, head_dim]: [usize; 2],
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let d = head_dim;
    let group = q.len() / d / n_head_kv;
    let scale = 1.0 / (d as f32).sqrt();
    let stride = n_head_kv * d;
    for (h, (qh, oh)) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
        let at = |j: usize| j * stride + (h / group) * d;
        scores.clear();
        scores.extend((0..n_keys).map(|j| dot_f32(qh, &keys[at(j)..at(j) + d]) * scale));
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            total += *s;
        }
        let inv_total = total.recip();
        oh.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            let p = p * inv_total;
            for (o, v) in oh.iter_mut().zip(&values[at(j)..at(j) + d]) {
                *o += p * v;
            }
        }
    }
}

/// SwiGLU's `silu(gate) · up` for each row of `gate_up` (`[rows, 2 n_ff]`, gate first).
pub(crate) fn silu_gate_rows(gate_up: &[f32], n_ff: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(gate_up.len() / 2);
    for row in gate_up.chunks_exact(2 * n_ff) {
        let (gate, up) = row.split_at(n_ff);
        out.extend(gate.iter().zip(up).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u));
    }
    out
}

/// `x += y`, element by element.
pub(crate) fn add_assign(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention against a plain f64 softmax, with a group of 3 query heads per KV head, an
    /// odd head size and an odd number of keys.
    #[cfg_attr(not(target_arch = "wasm32"), test)]
    #[cfg_attr(target_arch = "wasm32", wasm_bindgen_test::wasm_bindgen_test)]
    fn attention_matches_a_plain_softmax() {
        let (n_head, n_head_kv, d, n_keys) = (6, 2, 5, 7);
        let value = |i: usize| ((i * 37 % 23) as f32 - 11.0) / 7.0;
        let q: Vec<f32> = (0..n_head * d).map(value).collect();
        let keys: Vec<f32> = (0..n_keys * n_head_kv * d).map(|i| value(i + 3)).collect();
        let values: Vec<f32> = (0..n_keys * n_head_kv * d).map(|i| value(i + 11)).collect();
        let mut out = vec![0.0; n_head * d];
        attend_row(&q, [&keys, &values], n_keys, [n_head_kv, d], &mut out, &mut Vec::new());
        for h in 0..n_head {
            let g = h / 3;
            let at = |j: usize, c: usize| (j * n_head_kv + g) * d + c;
            let scores: Vec<f64> = (0..n_keys)
                .map(|j| (0..d).map(|c| f64::from(q[h * d + c]) * f64::from(keys[at(j, c)])).sum::<f64>() / (d as f64).sqrt())
                .collect();
            let total: f64 = scores.iter().map(|s| s.exp()).sum();
            for c in 0..d {
                let exact: f64 = (0..n_keys).map(|j| scores[j].exp() / total * f64::from(values[at(j, c)])).sum();
                assert!((f64::from(out[h * d + c]) - exact).abs() < 1e-5, "head {h}, dim {c}");
            }
        }
    }

    #[cfg_attr(not(target_arch = "wasm32"), test)]
    #[cfg_attr(target_arch = "wasm32", wasm_bindgen_test::wasm_bindgen_test)]
    fn rotation_turns_adjacent_pairs() {
        let mut heads = vec![1.0, 2.0, 3.0, 4.0];
        let (c, s) = (0.6f32, 0.8f32);
        rotate_heads(&mut heads, &[c, c], &[s, s]);
        assert_eq!(heads, vec![c - 2.0 * s, 2.0 * c + s, 3.0 * c - 4.0 * s, 4.0 * c + 3.0 * s]);
    }
}
