//! Throughput of the quantized matrix-vector kernels on the real model's weights:
//! `cargo run --release --example kernel_bench -- MODEL.gguf`
use std::time::Instant;

use kindling_engine::gguf::Gguf;
use kindling_engine::quant::QMatrix;

fn main() {
    let path = std::env::args()
        .nth(1)
        .unwrap_or("public/models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let bytes = std::fs::read(path).unwrap();
    let gguf = Gguf::parse(&bytes).unwrap();
    for name in ["blk.0.ffn_up.weight", "token_embd.weight"] {
        let t = gguf.tensor(name).unwrap();
        let m = QMatrix::from_gguf(
            t.ty,
            t.dims[1] as usize,
            t.dims[0] as usize,
            &bytes[t.offset as usize..(t.offset + t.size) as usize],
        );
        let x: Vec<f32> = (0..m.cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let reps = if m.rows > 10000 { 50 } else { 2000 };
        let _ = m.matmul(&x);
        let start = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(m.matmul(&x));
        }
        let s = start.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{name} {:?}: {:.1} us/matvec, {:.1} GB/s",
            m.ty,
            s * 1e6,
            m.size_bytes() as f64 / s / 1e9
        );
    }
}
