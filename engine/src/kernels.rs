//! The seam between the one model definition and a backend's own kernels.
//!
//! Layers are written once, in burn's tensor operations, for every backend. Where a backend
//! computes something with kernels of its own instead, the layer calls them through here and
//! never asks which backend it runs on: each backend is one variant, holding what its kernel
//! reads, made once at load time. Today that is the product by a quantized weight; a backend
//! with kernels of its own (CubeCL on wgpu) becomes a variant here, not a second model.

use burn::tensor::{Device, Tensor, TensorData};

use crate::backend::Backend;
use crate::host::to_host;
use crate::quant::QMatrix;

/// How a backend computes `x · Wᵀ` for a weight `W` kept quantized ([`QMatrix`], `[out, in]`).
// One per layer: the size of the `Dense` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(crate) enum QuantMatmul {
    /// CPU: the activations are read back to host memory (no copy on burn-flex) and multiplied
    /// by [`QMatrix::matmul`]'s quantized kernels; a Q4_1 weight costs 6 bits.
    Host,
    /// wgpu: burn's quantized formats cannot hold GGUF's asymmetric Q4_1 blocks exactly and
    /// its Q4 matmul is unreliable on WebGPU limits (prior-art §0.5), so the weight is
    /// dequantized once, at load time, to this f32 `[in, out]` tensor on the device.
    Dense(Tensor<2>),
}

impl QuantMatmul {
    /// What `backend`'s kernel needs of `weight`, on `device`.
    pub(crate) fn new(weight: &QMatrix, backend: Backend, device: &Device) -> Self {
        match backend {
            Backend::Cpu => QuantMatmul::Host,
            Backend::Wgpu => {
                let data = TensorData::new(weight.dequantize(), [weight.rows, weight.cols]);
                QuantMatmul::Dense(Tensor::<2>::from_data(data, device).transpose())
            }
        }
    }

    /// `x · Wᵀ` for the `weight` this was made from.
    ///
    /// # Shapes
    /// `x`: `[seq, in]` → `[seq, out]`
    pub(crate) fn forward(&self, weight: &QMatrix, x: Tensor<2>) -> Tensor<2> {
        self.forward_with(weight, x, QMatrix::matmul)
    }

    /// [`forward`](Self::forward) for one row per sequence of a decode step
    /// ([`QMatrix::matmul_decode`] on the CPU).
    pub(crate) fn forward_decode(&self, weight: &QMatrix, x: Tensor<2>) -> Tensor<2> {
        self.forward_with(weight, x, QMatrix::matmul_decode)
    }

    fn forward_with(&self, weight: &QMatrix, x: Tensor<2>, host_matmul: fn(&QMatrix, &[f32]) -> Vec<f32>) -> Tensor<2> {
        match self {
            QuantMatmul::Dense(w) => x.matmul(w.clone()),
            QuantMatmul::Host => {
                let device = x.device();
                let [seq, _] = x.dims();
                // Activations are f32 on every backend the engine creates.
                let y = host_matmul(weight, &to_host(x).expect("f32 activations"));
                Tensor::from_data(TensorData::new(y, [seq, weight.rows]), &device)
            }
        }
    }
}
