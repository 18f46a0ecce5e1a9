//! Steering: a variant is the base model plus feature edits, some of them conditional.
//!
//! Edits act in the SAE's latent space at its block, at every position, and keep the SAE's
//! error term (SAELens `use_error_term`), so only the edited latents change:
//!
//! ```text
//! f = encode(x)                    the token's active latents
//! f'_j = edit(f_j)                 nudge: f_j + v·u_j    pin: v·u_j    mul: f_j · v
//! x' = x + Σ_j (f'_j − f_j) · W_dec[j]
//! ```
//!
//! Edit values are in steering units `u_j` ([`Units::steering`], [`STRENGTH_UNIT`] 2): a
//! nudge of 1.0 moves the residual by half its typical norm along the latent's decoder
//! direction, the same for every latent, so 0.2 is a gentle push, 0.5 a clear one and 1.0
//! near where text breaks. A variant without edits or scopes leaves the residual untouched
//! (bit-identical output).
//!
//! Conditions compare a feature or a group, in activation units (each latent's
//! 99th-percentile activation, [`Units::activation`]), with a number or with another
//! feature or group. **A group's value is the largest of its members' values** ("any member
//! at least this strong"), on both sides of a comparison. Comparisons combine with one
//! operator, AND or OR, as the Goodfire SDK sends them. They are read at every position the
//! model processes, prompt included, in order, from the SAE's activations at that token
//! before any edit. A `set_when` scope fires at the first position where its condition
//! holds, and its edits apply from that position on (including it) for the rest of the
//! generation; an `abort_when` scope stops generation there with
//! [`EngineError::Aborted`](crate::EngineError::Aborted) carrying its event name.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::hook::ResidualHook;
use crate::sae::{Feature, Sae};

/// The most edits, scopes, comparisons and group members a variant may carry: far beyond
/// any real use, small enough that a hostile file cannot make generation crawl.
pub const MAX_EDITS: usize = 1024;
pub const MAX_SCOPES: usize = 64;
pub const MAX_COMPARISONS: usize = 64;
pub const MAX_GROUP: usize = 256;
/// Values beyond this many max activations break the model, not steer it.
pub const MAX_VALUE: f32 = 100.0;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VariantError {
    #[error("feature {feature} does not exist (the SAE has {d_sae} latents)")]
    UnknownFeature { feature: u32, d_sae: usize },
    #[error("value {value} for feature {feature} is not a finite number within ±{MAX_VALUE}")]
    BadValue { feature: u32, value: f32 },
    #[error("too many {what}: {count} (at most {limit})")]
    TooMany { what: &'static str, count: usize, limit: usize },
    #[error("a condition compares an empty group")]
    EmptyGroup,
    #[error("invalid variant JSON: {0}")]
    Json(String),
    #[error("variant for model {found:?}, but this is {expected:?}")]
    WrongModel { expected: String, found: String },
}

/// How an edit changes a latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Add `value` max activations.
    Nudge,
    /// Set to `value` max activations.
    Pin,
    /// Multiply by `value`.
    Mul,
}

/// One edit of one latent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Edit {
    pub feature: u32,
    pub mode: Mode,
    pub value: f32,
}

impl Edit {
    pub fn nudge(feature: u32, value: f32) -> Self {
        Self {
            feature,
            mode: Mode::Nudge,
            value,
        }
    }

    /// The latent's new value (raw activation units) given its current one and its unit.
    fn apply(&self, current: f32, unit: f32) -> f32 {
        match self.mode {
            Mode::Nudge => current + self.value * unit,
            Mode::Pin => self.value * unit,
            Mode::Mul => current * self.value,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = "==")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
}

impl Operator {
    fn holds(self, a: f32, b: f32) -> bool {
        match self {
            Operator::Gt => a > b,
            Operator::Lt => a < b,
            Operator::Ge => a >= b,
            Operator::Le => a <= b,
            Operator::Eq => a == b,
            Operator::Ne => a != b,
        }
    }
}

/// The right-hand side of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Operand {
    Number(f32),
    Group(Vec<u32>),
}

/// `max(left) op right`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub left: Vec<u32>,
    pub op: Operator,
    pub right: Operand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Combine {
    #[serde(rename = "AND")]
    And,
    #[serde(rename = "OR")]
    Or,
}

/// Comparisons joined by one operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    pub combine: Combine,
    pub comparisons: Vec<Comparison>,
}

impl Condition {
    /// One comparison.
    pub fn when(left: Vec<u32>, op: Operator, right: Operand) -> Self {
        Self {
            combine: Combine::And,
            comparisons: vec![Comparison { left, op, right }],
        }
    }

    /// Whether it holds for a token whose latent values (in max-activation units) `value`
    /// returns.
    pub fn holds(&self, value: impl Fn(u32) -> f32) -> bool {
        let group = |g: &[u32]| g.iter().map(|&f| value(f)).fold(f32::NEG_INFINITY, f32::max);
        let check = |c: &Comparison| {
            let right = match &c.right {
                Operand::Number(n) => *n,
                Operand::Group(g) => group(g),
            };
            c.op.holds(group(&c.left), right)
        };
        match self.combine {
            Combine::And => self.comparisons.iter().all(check),
            Combine::Or => self.comparisons.iter().any(check),
        }
    }
}

/// What a scope does once its condition holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Apply these edits from that token on.
    Set(Vec<Edit>),
    /// Stop generating, reporting this event name.
    Abort(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scope {
    pub when: Condition,
    pub then: Action,
}

/// The base model plus edits and conditional scopes; Kindling's own JSON layout is this
/// struct's serde form (`{"base_model", "edits": [...], "scopes": [...]}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    pub base_model: String,
    #[serde(default)]
    pub edits: Vec<Edit>,
    #[serde(default)]
    pub scopes: Vec<Scope>,
}

impl Variant {
    pub fn new(base_model: impl Into<String>) -> Self {
        Self {
            base_model: base_model.into(),
            edits: Vec::new(),
            scopes: Vec::new(),
        }
    }

    /// Nudges every feature of `group` by `value` (replacing earlier edits of them), as the
    /// SDK's `variant.set` does; a value of 0 removes the edits.
    pub fn set(&mut self, group: &[u32], value: f32) {
        self.edits.retain(|e| !group.contains(&e.feature));
        if value != 0.0 {
            self.edits.extend(group.iter().map(|&f| Edit::nudge(f, value)));
        }
    }

    /// Removes every edit and scope: the base model again.
    pub fn reset(&mut self) {
        self.edits.clear();
        self.scopes.clear();
    }

    pub fn set_when(&mut self, when: Condition, edits: Vec<Edit>) {
        self.scopes.push(Scope {
            when,
            then: Action::Set(edits),
        });
    }

    pub fn abort_when(&mut self, when: Condition, event: impl Into<String>) {
        self.scopes.push(Scope {
            when,
            then: Action::Abort(event.into()),
        });
    }

    /// Whether the variant changes nothing.
    pub fn is_base(&self) -> bool {
        self.edits.is_empty() && self.scopes.is_empty()
    }

    /// Checks every id against an SAE of `d_sae` latents, every value and every size limit.
    pub fn validate(&self, d_sae: usize) -> Result<(), VariantError> {
        let feature = |f: u32| {
            if (f as usize) < d_sae {
                Ok(())
            } else {
                Err(VariantError::UnknownFeature { feature: f, d_sae })
            }
        };
        let limit = |what, count, limit| {
            if count <= limit {
                Ok(())
            } else {
                Err(VariantError::TooMany { what, count, limit })
            }
        };
        let edits = |edits: &[Edit]| -> Result<(), VariantError> {
            limit("edits", edits.len(), MAX_EDITS)?;
            for e in edits {
                feature(e.feature)?;
                if !e.value.is_finite() || e.value.abs() > MAX_VALUE {
                    return Err(VariantError::BadValue {
                        feature: e.feature,
                        value: e.value,
                    });
                }
            }
            Ok(())
        };
        let group = |g: &[u32]| -> Result<(), VariantError> {
            if g.is_empty() {
                return Err(VariantError::EmptyGroup);
            }
            limit("group members", g.len(), MAX_GROUP)?;
            g.iter().try_for_each(|&f| feature(f))
        };
        edits(&self.edits)?;
        limit("scopes", self.scopes.len(), MAX_SCOPES)?;
        let mut total = self.edits.len();
        for scope in &self.scopes {
            limit("comparisons", scope.when.comparisons.len(), MAX_COMPARISONS)?;
            for c in &scope.when.comparisons {
                group(&c.left)?;
                match &c.right {
                    Operand::Group(g) => group(g)?,
                    Operand::Number(n) if !n.is_finite() => {
                        return Err(VariantError::BadValue {
                            feature: c.left[0],
                            value: *n,
                        });
                    }
                    Operand::Number(_) => {}
                }
            }
            if let Action::Set(e) = &scope.then {
                edits(e)?;
                total += e.len();
            }
        }
        limit("edits", total, MAX_EDITS)
    }
}

/// A fixed direction added to the residual after the SAE's block at every position: what
/// unconditional nudges amount to (a nudge adds `v·u_j` to latent `j` whatever its value, so
/// the residual moves by `v·u_j·W_dec[j]`), without encoding every token through the SAE.
#[derive(Debug, Clone, PartialEq)]
pub struct SteeringVector {
    pub layer: usize,
    pub values: Vec<f32>,
}

/// The [`SteeringVector`] of `edits` when they are all nudges (`None` for no edits, or when
/// some edit pins or multiplies, whose effect depends on the token's activations).
pub fn steering_vector(sae: &Sae, units: &Units, edits: &[Edit]) -> Option<SteeringVector> {
    if edits.is_empty() || edits.iter().any(|e| e.mode != Mode::Nudge) {
        return None;
    }
    let mut values = vec![0f32; sae.config().d_in];
    for e in edits {
        let j = e.feature as usize;
        let scale = e.value * units.steering.get(j).copied()?;
        let row = (j < sae.config().d_sae).then(|| sae.decoder_row(j))?;
        values.iter_mut().zip(row).for_each(|(o, w)| *o += scale * w);
    }
    Some(SteeringVector {
        layer: sae.config().layer,
        values,
    })
}

/// Where each scope of a variant fired (the position of the token whose features met its
/// condition; `None`: not yet). A handle shared with whoever runs the hook, since the hook
/// itself ends up boxed inside a token stream.
#[derive(Debug, Clone, Default)]
pub struct FiredScopes(Arc<Mutex<Vec<Option<usize>>>>);

impl FiredScopes {
    fn new(scopes: usize) -> Self {
        Self(Arc::new(Mutex::new(vec![None; scopes])))
    }

    /// Per scope, the position it fired at.
    pub fn positions(&self) -> Vec<Option<usize>> {
        self.0.lock().expect("fired scopes lock").clone()
    }
}

/// The version of the steering unit that edit values are written in. Saved variants and
/// share links record it; values of an older unit are converted when they are opened
/// ([`Units::from_version_1`]).
/// * 1: a latent's 99th-percentile activation (`max_activation`). Its effect varied six-fold
///   between latents, and for most it only began to show near the slider's end (±1).
/// * 2: a nudge of 1.0 moves the residual stream by [`RESIDUAL_FRACTION_PER_UNIT`] of its
///   typical norm at the SAE's block, the same for every latent (docs/STEERING.md).
pub const STRENGTH_UNIT: u32 = 2;

/// How far one steering unit moves the residual, as a fraction of its typical norm. Chosen
/// from `kindling-build steer-calibrate` on 40 latents (docs/STEERING.md): replies change
/// visibly from 0.05–0.2 of the norm (median 0.1) and stop being text from 0.4–0.65 (median
/// 0.5; 39 of 40 by 0.65), so ±1 spans the whole useful range of nearly every latent.
pub const RESIDUAL_FRACTION_PER_UNIT: f32 = 0.65;

/// The two scales values are written in, per latent, as raw activations per unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Units {
    /// One *activation unit*: the latent's 99th-percentile activation (the atlas's
    /// `max_activation`; 1.0 without an atlas). Conditions, inspection and contrast read
    /// activations in these.
    pub activation: Vec<f32>,
    /// One *steering unit*: the latent change that moves the residual by
    /// [`RESIDUAL_FRACTION_PER_UNIT`] × [`Sae::residual_norm`] along its decoder direction.
    /// Edit values (nudge and pin) are written in these.
    pub steering: Vec<f32>,
}

impl Units {
    /// The units of `sae`'s latents, given their activation units.
    pub fn new(sae: &Sae, activation: Vec<f32>) -> Self {
        let target = RESIDUAL_FRACTION_PER_UNIT * sae.residual_norm();
        let steering = (0..sae.config().d_sae)
            .map(|j| {
                let norm = sae.decoder_row(j).iter().map(|w| w * w).sum::<f32>().sqrt();
                target / norm.max(f32::MIN_POSITIVE)
            })
            .collect();
        Self { activation, steering }
    }

    /// The same scale for activations and edits (tests, and SAEs without an atlas).
    pub fn uniform(d_sae: usize, unit: f32) -> Self {
        Self {
            activation: vec![unit; d_sae],
            steering: vec![unit; d_sae],
        }
    }

    /// An edit value written in unit version 1 (activation units), in steering units.
    pub fn from_version_1(&self, feature: u32, value: f32) -> Option<f32> {
        let j = feature as usize;
        Some(value * self.activation.get(j)? / self.steering.get(j)?.max(f32::MIN_POSITIVE))
    }
}

/// The residual hook that runs a variant at the SAE's block.
pub struct Steer<'s> {
    sae: &'s Sae,
    units: &'s Units,
    variant: Variant,
    /// Per scope, the position it fired at.
    fired: FiredScopes,
    /// The abort event, once one fired.
    aborted: Option<String>,
    /// Per processed position, its latents after the variant's edits (for inspection).
    pub features: BTreeMap<usize, Vec<Feature>>,
    record: bool,
    cancel: Option<crate::CancelToken>,
}

impl<'s> Steer<'s> {
    /// A hook for `variant` (validated against `sae`), its values in `units`.
    pub fn new(sae: &'s Sae, units: &'s Units, variant: Variant) -> Result<Self, VariantError> {
        variant.validate(sae.config().d_sae)?;
        assert_eq!(units.activation.len(), sae.config().d_sae, "one unit per latent");
        assert_eq!(units.steering.len(), sae.config().d_sae, "one unit per latent");
        let fired = FiredScopes::new(variant.scopes.len());
        Ok(Self {
            sae,
            units,
            variant,
            fired,
            aborted: None,
            features: BTreeMap::new(),
            record: false,
            cancel: None,
        })
    }

    /// Lets `cancel` stop a forward pass this hook is in, between blocks.
    pub fn cancellable(mut self, cancel: crate::CancelToken) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// Also keeps every processed position's latents in [`features`](Self::features).
    pub fn recording(mut self) -> Self {
        self.record = true;
        self
    }

    /// The position where each scope fired (`None`: not yet).
    pub fn fired(&self) -> Vec<Option<usize>> {
        self.fired.positions()
    }

    /// A handle that keeps reporting where scopes fire after the hook is boxed away.
    pub fn fired_scopes(&self) -> FiredScopes {
        self.fired.clone()
    }

    /// The residual deltas for `rows` (`[n, d_in]`) at `positions`, or `None` when nothing
    /// changes.
    fn deltas(&mut self, rows: &[f32], positions: Range<usize>) -> Option<Vec<f32>> {
        let d = self.sae.config().d_in;
        let encoded = self.sae.encode(rows);
        let mut out = vec![0f32; rows.len()];
        let mut changed = false;
        let fired = self.fired.clone();
        let mut fired = fired.0.lock().expect("fired scopes lock");
        for (i, (position, features)) in positions.zip(encoded).enumerate() {
            let value = |f: u32| {
                features.iter().find(|(j, _)| *j == f).map_or(0.0, |&(_, a)| a) / self.units.activation[f as usize].max(f32::MIN_POSITIVE)
            };
            for (s, scope) in self.variant.scopes.iter().enumerate() {
                if fired[s].is_none() && self.aborted.is_none() && scope.when.holds(value) {
                    fired[s] = Some(position);
                    if let Action::Abort(event) = &scope.then {
                        self.aborted = Some(event.clone());
                    }
                }
            }
            let active =
                self.variant
                    .edits
                    .iter()
                    .chain(self.variant.scopes.iter().zip(fired.iter()).filter(|(_, f)| f.is_some()).flat_map(
                        |(scope, _)| match &scope.then {
                            Action::Set(edits) => edits.as_slice(),
                            Action::Abort(_) => &[],
                        },
                    ));
            // Edits of one latent compose in order; the delta is new − original.
            let mut values: BTreeMap<u32, (f32, f32)> = BTreeMap::new();
            for edit in active {
                let original = features.iter().find(|(j, _)| *j == edit.feature).map_or(0.0, |&(_, a)| a);
                let entry = values.entry(edit.feature).or_insert((original, original));
                entry.1 = edit.apply(entry.1, self.units.steering[edit.feature as usize]);
            }
            let row = &mut out[i * d..(i + 1) * d];
            for (&j, &(original, new)) in &values {
                let delta = new - original;
                if delta != 0.0 {
                    changed = true;
                    row.iter_mut()
                        .zip(self.sae.decoder_row(j as usize))
                        .for_each(|(o, w)| *o += delta * w);
                }
            }
            if self.record {
                // Recorded as the variant leaves them: edited latents at their new values.
                let mut after: Vec<Feature> = features.iter().filter(|(j, _)| !values.contains_key(j)).copied().collect();
                after.extend(values.iter().filter(|(_, v)| v.1 > 0.0).map(|(&j, v)| (j, v.1)));
                after.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                self.features.insert(position, after);
            }
        }
        changed.then_some(out)
    }
}

impl ResidualHook for Steer<'_> {
    fn wants(&self, layer: usize) -> bool {
        layer == self.sae.config().layer && (!self.variant.is_base() || self.record)
    }

    fn last_layer(&self) -> Option<usize> {
        Some(self.sae.config().layer)
    }

    fn after_block(&mut self, _layer: usize, positions: Range<usize>, residual: Tensor<2>) -> Tensor<2> {
        let [n, d] = residual.dims();
        let rows = crate::sae::residual_rows(&residual);
        match self.deltas(&rows, positions) {
            Some(delta) => {
                let delta = Tensor::from_data(TensorData::new(delta, [n, d]), &residual.device());
                residual + delta
            }
            None => residual,
        }
    }

    fn interrupt(&self) -> Option<String> {
        self.aborted.clone()
    }

    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(crate::CancelToken::is_cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_compare_by_their_strongest_member() {
        let values = |f: u32| [0.2, 0.9, 0.0][f as usize];
        assert!(Condition::when(vec![0, 1], Operator::Gt, Operand::Number(0.75)).holds(values));
        assert!(!Condition::when(vec![0, 2], Operator::Gt, Operand::Number(0.75)).holds(values));
        assert!(Condition::when(vec![1], Operator::Gt, Operand::Group(vec![0, 2])).holds(values));
        let both = Condition {
            combine: Combine::And,
            comparisons: vec![
                Comparison {
                    left: vec![1],
                    op: Operator::Ge,
                    right: Operand::Number(0.9),
                },
                Comparison {
                    left: vec![2],
                    op: Operator::Ne,
                    right: Operand::Number(0.0),
                },
            ],
        };
        assert!(!both.holds(values));
        assert!(
            Condition {
                combine: Combine::Or,
                ..both
            }
            .holds(values)
        );
    }

    #[test]
    fn validation_refuses_bad_ids_values_and_sizes() {
        let mut v = Variant::new("m");
        v.set(&[3], 0.5);
        assert!(v.validate(4).is_ok());
        assert_eq!(v.validate(3), Err(VariantError::UnknownFeature { feature: 3, d_sae: 3 }));
        v.set(&[1], f32::NAN);
        assert!(matches!(v.validate(4), Err(VariantError::BadValue { feature: 1, .. })));
        v.reset();
        v.edits = vec![Edit::nudge(0, 0.1); MAX_EDITS + 1];
        assert!(matches!(v.validate(4), Err(VariantError::TooMany { what: "edits", .. })));
        v.reset();
        v.abort_when(Condition::when(vec![], Operator::Gt, Operand::Number(1.0)), "e");
        assert_eq!(v.validate(4), Err(VariantError::EmptyGroup));
    }
}
