//! Residual-stream hooks: read or edit the hidden state after any block.
//!
//! The SAE, steering and inspection all sit here. A forward pass calls a hook only after the
//! blocks it [`wants`](ResidualHook::wants); with no hook the pass pays nothing. A hook that
//! returns its input unchanged leaves the output bit-identical.

use std::ops::Range;

use burn::tensor::{Tensor, TensorData};

/// Sees the residual stream after chosen blocks, during prefill and decode alike.
pub trait ResidualHook: Send {
    /// Whether to call [`after_block`](Self::after_block) after block `layer` (0-based).
    fn wants(&self, layer: usize) -> bool;

    /// The deepest block this hook needs: with [`Logits::None`](crate::Logits::None) the
    /// forward pass stops there (activation harvesting).
    fn last_layer(&self) -> Option<usize>;

    /// Called with the residual after block `layer` for the token `positions`
    /// (`residual` is `[positions.len(), n_embd]`); returns the residual to continue with.
    fn after_block(&mut self, layer: usize, positions: Range<usize>, residual: Tensor<2>) -> Tensor<2>;

    /// Asks generation to stop, naming why (a steering `abort_when` event); checked after
    /// every forward pass.
    fn interrupt(&self) -> Option<String> {
        None
    }

    /// Whether the work this pass belongs to was cancelled: checked before every block, so a
    /// long prefill stops within one block's time ([`EngineError::Cancelled`](crate::EngineError::Cancelled)).
    fn cancelled(&self) -> bool {
        false
    }
}

/// A hook that edits nothing and only lets a forward pass be cancelled between blocks.
#[derive(Debug, Clone)]
pub struct CancelBetweenBlocks(pub crate::CancelToken);

impl ResidualHook for CancelBetweenBlocks {
    fn wants(&self, _layer: usize) -> bool {
        false
    }

    fn last_layer(&self) -> Option<usize> {
        None
    }

    fn after_block(&mut self, _layer: usize, _positions: Range<usize>, residual: Tensor<2>) -> Tensor<2> {
        residual
    }

    fn cancelled(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// Records the residual stream after one or more blocks, for every position it passes
/// (several layers in one pass: harvesting candidate SAE layers costs one forward pass).
#[derive(Debug, Default)]
pub struct CaptureResidual {
    /// Per captured layer, in ascending order: the rows captured so far.
    layers: std::collections::BTreeMap<usize, Vec<f32>>,
    width: usize,
}

impl CaptureResidual {
    /// Captures after block `layer`.
    pub fn new(layer: usize) -> Self {
        Self::layers(&[layer])
    }

    /// Captures after each of `layers`.
    pub fn layers(layers: &[usize]) -> Self {
        Self {
            layers: layers.iter().map(|&l| (l, Vec::new())).collect(),
            width: 0,
        }
    }

    fn first(&self) -> &[f32] {
        self.layers.values().next().map_or(&[], Vec::as_slice)
    }

    /// The rows captured at the first (lowest) layer, one per position in order, each
    /// `n_embd` wide.
    pub fn rows(&self) -> impl Iterator<Item = &[f32]> {
        self.first().chunks_exact(self.width.max(1))
    }

    /// Number of positions captured.
    pub fn len(&self) -> usize {
        self.first().len().checked_div(self.width).unwrap_or(0)
    }

    /// Whether nothing was captured.
    pub fn is_empty(&self) -> bool {
        self.first().is_empty()
    }

    /// Takes the values captured at the first layer (row-major `[positions, n_embd]`).
    pub fn take(&mut self) -> Vec<f32> {
        let first = self.layers.keys().next().copied();
        first.map_or_else(Vec::new, |l| self.take_layer(l))
    }

    /// Takes the values captured after block `layer` (empty if it is not captured).
    pub fn take_layer(&mut self, layer: usize) -> Vec<f32> {
        self.layers.get_mut(&layer).map(std::mem::take).unwrap_or_default()
    }
}

impl ResidualHook for CaptureResidual {
    fn wants(&self, layer: usize) -> bool {
        self.layers.contains_key(&layer)
    }

    fn last_layer(&self) -> Option<usize> {
        self.layers.keys().next_back().copied()
    }

    fn after_block(&mut self, layer: usize, _positions: Range<usize>, residual: Tensor<2>) -> Tensor<2> {
        let [_, width] = residual.dims();
        self.width = width;
        let data = residual.to_data();
        if let Some(rows) = self.layers.get_mut(&layer) {
            rows.extend_from_slice(data.as_slice::<f32>().expect("f32 residual"));
        }
        residual
    }
}

/// Adds a fixed vector to the residual stream after one block, at every position.
#[derive(Debug, Clone)]
pub struct AddToResidual {
    layer: usize,
    vector: Vec<f32>,
    /// `vector` on the model's device, made at the first call and reused every token after.
    on_device: Option<Tensor<2>>,
}

impl AddToResidual {
    /// Adds `vector` (`n_embd` wide) after block `layer`.
    pub fn new(layer: usize, vector: Vec<f32>) -> Self {
        Self {
            layer,
            vector,
            on_device: None,
        }
    }
}

impl ResidualHook for AddToResidual {
    fn wants(&self, layer: usize) -> bool {
        layer == self.layer
    }

    fn last_layer(&self) -> Option<usize> {
        Some(self.layer)
    }

    fn after_block(&mut self, _layer: usize, _positions: Range<usize>, residual: Tensor<2>) -> Tensor<2> {
        let vector = self.on_device.get_or_insert_with(|| {
            let data = TensorData::new(self.vector.clone(), [1, self.vector.len()]);
            Tensor::from_data(data, &residual.device())
        });
        residual + vector.clone()
    }
}

/// Lets a caller keep ownership of a hook it lends to a generation (`Box::new(&mut hook)`).
impl<H: ResidualHook + ?Sized> ResidualHook for &mut H {
    fn wants(&self, layer: usize) -> bool {
        (**self).wants(layer)
    }

    fn last_layer(&self) -> Option<usize> {
        (**self).last_layer()
    }

    fn after_block(&mut self, layer: usize, positions: Range<usize>, residual: Tensor<2>) -> Tensor<2> {
        (**self).after_block(layer, positions, residual)
    }

    fn interrupt(&self) -> Option<String> {
        (**self).interrupt()
    }

    // Every provided method must be passed on too: a lent hook that answered the default
    // would never be cancelled (`BetweenBlocks` asks through a `&&mut dyn ResidualHook`).
    fn cancelled(&self) -> bool {
        (**self).cancelled()
    }
}
