//! The units edit values travel in, and what a slider shows of them.
//!
//! The engine implements the steering unit (`kindling_engine::steer::Units`); these are its
//! definition as the protocol and the page need it, without the engine. With the `engine`
//! feature, [`crate::local`] checks at compile time that both agree.

/// The version of the steering unit that edit values are written in. Saved variants and
/// share links record it; values of an older unit are converted when they are opened.
/// * 1: a latent's 99th-percentile activation (`max_activation`).
/// * 2: a nudge of 1.0 moves the residual stream by [`RESIDUAL_FRACTION_PER_UNIT`] of its
///   typical norm at the SAE's block, the same for every latent (docs/STEERING.md).
pub const STRENGTH_UNIT: u32 = 2;

/// How far one steering unit moves the residual, as a fraction of its typical norm.
pub const RESIDUAL_FRACTION_PER_UNIT: f32 = 0.65;

/// The largest edit value a variant may carry, in steering units: far past where text breaks.
pub const MAX_EDIT_VALUE: f32 = 100.0;

/// Where replies start to change visibly, in steering units: the median over latents that
/// `kindling-build steer-calibrate` measured (docs/STEERING.md).
pub const VISIBLE_FROM: f32 = VISIBLE_FRACTION / RESIDUAL_FRACTION_PER_UNIT;
/// Where text starts to fall apart for some latents (the 10th percentile of the measured
/// breaks), in steering units.
pub const BREAKS_FROM: f32 = BREAK_FRACTION / RESIDUAL_FRACTION_PER_UNIT;
const VISIBLE_FRACTION: f32 = 0.1;
const BREAK_FRACTION: f32 = 0.4;

/// What a steering strength does, as a slider shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrengthZone {
    /// Below [`VISIBLE_FROM`]: replies barely change.
    Subtle,
    /// From [`VISIBLE_FROM`] to [`BREAKS_FROM`]: clear steering, text intact.
    Clear,
    /// From [`BREAKS_FROM`]: strong, and for some features the text breaks.
    Strong,
}

impl StrengthZone {
    /// The zone of a nudge of `value` (either sign) in steering units.
    pub fn of(value: f32) -> Self {
        match value.abs() {
            v if v < VISIBLE_FROM => Self::Subtle,
            v if v < BREAKS_FROM => Self::Clear,
            _ => Self::Strong,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Subtle => "subtle",
            Self::Clear => "clear steering",
            Self::Strong => "strong: text may break",
        }
    }
}
