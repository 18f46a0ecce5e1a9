//! Reading tensors back from their device into host memory.
//!
//! Every read-back goes through here, so that a failed one (a tensor that is not f32, a lost
//! device) is one [`EngineError::Backend`] rather than a panic at each caller.

use burn::tensor::Tensor;

use crate::EngineError;

/// The tensor's values in host memory, row-major.
pub fn to_host<const D: usize>(x: Tensor<D>) -> Result<Vec<f32>, EngineError> {
    x.into_data()
        .try_into_vec::<f32>()
        .map_err(|e| EngineError::Backend(format!("reading a tensor back: {e:?}")))
}

/// [`to_host`] without blocking on the device (the only way to read a tensor on WebGPU in the
/// browser).
pub async fn to_host_async<const D: usize>(x: Tensor<D>) -> Result<Vec<f32>, EngineError> {
    x.into_data_async()
        .await
        .map_err(|e| EngineError::Backend(format!("reading a tensor back: {e:?}")))?
        .try_into_vec::<f32>()
        .map_err(|e| EngineError::Backend(format!("reading a tensor back: {e:?}")))
}
