//! What a forward pass does to the residual stream between two blocks: nothing, a
//! [`ResidualHook`] on the device, the same hook on a host copy (WebGPU in the browser), or fixed
//! rows added (batched steering).
//!
//! The block loop ([`Llama`](crate::Llama)'s one) is async only for the host-copy hook, which
//! must read the residual back without blocking; every other pass completes in a single poll
//! ([`without_waiting`]), so native code never needs an executor.

use std::ops::Range;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use burn::tensor::Tensor;

use crate::EngineError;
use crate::hook::ResidualHook;
use crate::host::to_host_async;

/// What runs after each block of a forward pass.
// One per pass, on the stack: the size of the `Add` variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum BetweenBlocks<'h> {
    Nothing,
    /// `hook` edits the residual of the token `positions` where it lives.
    Hook {
        hook: &'h mut dyn ResidualHook,
        positions: Range<usize>,
    },
    /// `hook` edits a host copy of the residual, read back asynchronously: hooks read their
    /// input synchronously, which the browser's WebGPU cannot do.
    HookOnHost {
        hook: &'h mut dyn ResidualHook,
        positions: Range<usize>,
    },
    /// Adds `rows` (`[batch, n_embd]`) after block `layer`, row `b` to sequence `b`.
    Add {
        layer: usize,
        rows: Tensor<2>,
    },
}

impl BetweenBlocks<'_> {
    /// A hook that runs on the device, or nothing.
    pub(crate) fn hook(hook: Option<&mut dyn ResidualHook>, positions: Range<usize>) -> BetweenBlocks<'_> {
        match hook {
            Some(hook) => BetweenBlocks::Hook { hook, positions },
            None => BetweenBlocks::Nothing,
        }
    }

    /// A hook that runs on a host copy, or nothing.
    pub(crate) fn hook_on_host(hook: Option<&mut dyn ResidualHook>, positions: Range<usize>) -> BetweenBlocks<'_> {
        match hook {
            Some(hook) => BetweenBlocks::HookOnHost { hook, positions },
            None => BetweenBlocks::Nothing,
        }
    }

    /// Whether the work the pass belongs to was cancelled (asked before every block).
    pub(crate) fn cancelled(&self) -> bool {
        match self {
            BetweenBlocks::Hook { hook, .. } | BetweenBlocks::HookOnHost { hook, .. } => (**hook).cancelled(),
            BetweenBlocks::Nothing | BetweenBlocks::Add { .. } => false,
        }
    }

    /// Whether [`after_block`](Self::after_block) may change the residual after block `layer`
    /// (the fused path makes a tensor of it only then).
    pub(crate) fn acts_after(&self, layer: usize) -> bool {
        match self {
            BetweenBlocks::Hook { hook, .. } | BetweenBlocks::HookOnHost { hook, .. } => hook.wants(layer),
            BetweenBlocks::Add { layer: at, .. } => *at == layer,
            BetweenBlocks::Nothing => false,
        }
    }

    /// The residual `x` to continue with after block `layer`.
    pub(crate) async fn after_block(&mut self, layer: usize, x: Tensor<2>) -> Result<Tensor<2>, EngineError> {
        match self {
            BetweenBlocks::Hook { hook, positions } if hook.wants(layer) => Ok(hook.after_block(layer, positions.clone(), x)),
            BetweenBlocks::HookOnHost { hook, positions } if hook.wants(layer) => {
                hook_on_host(&mut **hook, layer, positions.clone(), x).await
            }
            BetweenBlocks::Add { layer: at, rows } if *at == layer => Ok(x + rows.clone()),
            _ => Ok(x),
        }
    }
}

/// Runs `hook` on a CPU copy of the device tensor `x` (read back asynchronously) and puts the
/// result back on `x`'s device.
async fn hook_on_host(hook: &mut dyn ResidualHook, layer: usize, positions: Range<usize>, x: Tensor<2>) -> Result<Tensor<2>, EngineError> {
    let device = x.device();
    let [rows, width] = x.dims();
    let values = to_host_async(x).await?;
    #[cfg(feature = "cpu")]
    {
        use burn::tensor::{Device, TensorData};
        let host = Tensor::<2>::from_data(TensorData::new(values, [rows, width]), &Device::flex());
        let edited = crate::host::to_host(hook.after_block(layer, positions, host))?;
        Ok(Tensor::from_data(TensorData::new(edited, [rows, width]), &device))
    }
    #[cfg(not(feature = "cpu"))]
    {
        let _ = (hook, layer, positions, values, device, rows, width);
        Err(EngineError::Unsupported(
            "residual hooks on wgpu without blocking need the cpu feature".into(),
        ))
    }
}

/// The output of `future`, which must complete in its first poll: a pass whose
/// [`BetweenBlocks`] never waits (anything but [`BetweenBlocks::HookOnHost`]).
pub(crate) fn without_waiting<T>(future: impl Future<Output = T>) -> T {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => unreachable!("a forward pass that reads back asynchronously must be awaited"),
    }
}
