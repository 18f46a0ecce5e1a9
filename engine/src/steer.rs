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
use serde_json::{Value, json};

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

    /// Kindling's JSON layout.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a variant serializes")
    }

    /// Reads Kindling's JSON layout and validates it for an SAE of `d_sae` latents.
    pub fn from_json(text: &str, d_sae: usize) -> Result<Self, VariantError> {
        let v: Variant = serde_json::from_str(text).map_err(|e| VariantError::Json(e.to_string()))?;
        v.validate(d_sae)?;
        Ok(v)
    }
}

/// The Goodfire SDK's layouts (`../shared/reference/goodfire-api.md` §4.5–4.7): the
/// `controller` field of a chat request, and `Variant.json()`.
///
/// Features are keyed by `index_in_sae`; the `uuid` the SDK echoes back is made from the
/// SAE and index ([`FeatureIds`]) and is otherwise ignored, dashed or not. A `pin` whose value is
/// another feature, and scopes nested deeper than one level, are refused with a clear
/// error (the SDK's `Variant` never produces either).
impl Variant {
    /// Reads a `controller` object.
    pub fn from_controller(base_model: &str, controller: &Value, d_sae: usize) -> Result<Self, VariantError> {
        let mut v = Variant::new(base_model);
        v.edits = interventions(controller)?;
        for scope in array(controller, "scopes")? {
            let when = condition(&scope["conditionals"])?;
            let inner = &scope["controller"];
            if inner.is_object() && !array(inner, "scopes")?.is_empty() {
                return Err(VariantError::Json("scopes nested inside a scope are not supported".into()));
            }
            let then = match scope["event_name"].as_str() {
                Some(event) => Action::Abort(event.to_string()),
                None => Action::Set(if inner.is_object() { interventions(inner)? } else { Vec::new() }),
            };
            v.scopes.push(Scope { when, then });
        }
        v.validate(d_sae)?;
        Ok(v)
    }

    /// The `controller` object for this variant (`label(i)` names feature `i`).
    pub fn to_controller(&self, ids: &FeatureIds, label: &dyn Fn(u32) -> String) -> Value {
        let feature = |i: u32| json!({ "uuid": ids.uuid(i), "label": label(i), "index_in_sae": i, "max_activation_strength": 1 });
        let group = |g: &[u32]| json!({ "features": g.iter().map(|&i| feature(i)).collect::<Vec<_>>() });
        let controller = |edits: &[Edit], scopes: Vec<Value>| {
            let interventions: Vec<Value> = edits
                .iter()
                .map(|e| json!({ "mode": e.mode, "features": group(&[e.feature]), "value": e.value }))
                .collect();
            json!({ "interventions": interventions, "scopes": scopes, "name": "controller__kindling",
                    "nonzero_strength_threshold": null, "min_nudge_entropy": null, "max_nudge_entropy": null })
        };
        let scopes = self
            .scopes
            .iter()
            .map(|s| {
                let conditionals: Vec<Value> = s
                    .when
                    .comparisons
                    .iter()
                    .map(|c| {
                        let right = match &c.right {
                            Operand::Number(n) => json!(n),
                            Operand::Group(g) => group(g),
                        };
                        json!({ "left_hand": group(&c.left), "right_hand": right, "operator": c.op })
                    })
                    .collect();
                let (edits, event): (&[Edit], Value) = match &s.then {
                    Action::Set(e) => (e, Value::Null),
                    Action::Abort(name) => (&[], json!(name)),
                };
                json!({ "conditionals": { "conditionals": conditionals, "operator": s.when.combine },
                        "controller": controller(edits, Vec::new()), "is_active": false, "event_name": event })
            })
            .collect();
        controller(&self.edits, scopes)
    }

    /// Reads the SDK's `Variant.json()` (edits only: the SDK cannot serialize scopes).
    pub fn from_goodfire_json(text: &str, d_sae: usize) -> Result<Self, VariantError> {
        let v: Value = serde_json::from_str(text).map_err(|e| VariantError::Json(e.to_string()))?;
        let base_model = v["base_model"]
            .as_str()
            .ok_or_else(|| VariantError::Json("missing string \"base_model\"".into()))?;
        let mut out = Variant::new(base_model);
        for edit in array(&v, "edits")? {
            let feature = index(&edit["index_in_sae"])?;
            let value = number(&edit["value"], "value")?;
            out.edits.push(Edit::nudge(feature, value));
        }
        if !array(&v, "scopes")?.is_empty() {
            return Err(VariantError::Json(
                "Goodfire Variant.json() scopes are not readable (the SDK cannot write them)".into(),
            ));
        }
        out.validate(d_sae)?;
        Ok(out)
    }

    /// The SDK's `Variant.json()` for the edits (nudges only; scopes have no form there).
    pub fn to_goodfire_json(&self, ids: &FeatureIds, label: &dyn Fn(u32) -> String) -> Value {
        let edits: Vec<Value> = self
            .edits
            .iter()
            .filter(|e| e.mode == Mode::Nudge)
            .map(|e| json!({ "feature_id": ids.uuid(e.feature), "feature_label": label(e.feature), "index_in_sae": e.feature, "value": e.value }))
            .collect();
        json!({ "base_model": self.base_model, "edits": edits, "scopes": [] })
    }
}

/// Feature UUIDs tied to one SAE: the first 80 bits come from the SAE's SHA-256, the last 48
/// are the latent's index, so an id names one latent of one SAE (the Goodfire SDK's
/// `features/?feature_id=` lookup carries no model), is stable across runs, and parses back
/// without a table. The version and variant nibbles make it a well-formed v4 UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureIds {
    /// The 20 hex digits before the index, with the version and variant nibbles set.
    prefix: String,
}

impl FeatureIds {
    /// Ids for the SAE whose file has this SHA-256 (hex; only the first 18 digits are used).
    pub fn new(sae_sha256: &str) -> Self {
        let hex: String = sae_sha256
            .chars()
            .filter(char::is_ascii_hexdigit)
            .map(|c| c.to_ascii_lowercase())
            .chain(std::iter::repeat('0'))
            .take(18)
            .collect();
        Self {
            prefix: format!("{}4{}8{}", &hex[..12], &hex[12..15], &hex[15..18]),
        }
    }

    /// The lowercase dashed UUID of latent `index`.
    pub fn uuid(&self, index: u32) -> String {
        let p = &self.prefix;
        format!("{}-{}-{}-{}-{index:012x}", &p[..8], &p[8..12], &p[12..16], &p[16..20])
    }

    /// The latent a UUID names, in any form the SDK sends (dashed or 32 hex digits, any
    /// case); `None` for a malformed id or one of another SAE.
    pub fn parse(&self, id: &str) -> Option<u32> {
        let hex: String = id.chars().filter(|&c| c != '-').collect::<String>().to_ascii_lowercase();
        if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) || !hex.starts_with(&self.prefix) {
            return None;
        }
        u32::try_from(u64::from_str_radix(&hex[20..], 16).ok()?).ok()
    }
}

fn array<'v>(v: &'v Value, key: &str) -> Result<&'v [Value], VariantError> {
    match &v[key] {
        Value::Array(a) => Ok(a),
        Value::Null => Ok(&[]),
        _ => Err(VariantError::Json(format!("\"{key}\" must be a list"))),
    }
}

fn number(v: &Value, what: &str) -> Result<f32, VariantError> {
    v.as_f64()
        .map(|x| x as f32)
        .ok_or_else(|| VariantError::Json(format!("\"{what}\" must be a number, found {v}")))
}

fn index(v: &Value) -> Result<u32, VariantError> {
    v.as_u64()
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| VariantError::Json(format!("\"index_in_sae\" must be a feature index, found {v}")))
}

/// `{"features": [FeatureJSON, ...]}` → indices.
fn group(v: &Value) -> Result<Vec<u32>, VariantError> {
    array(v, "features")?.iter().map(|f| index(&f["index_in_sae"])).collect()
}

fn interventions(controller: &Value) -> Result<Vec<Edit>, VariantError> {
    let mut edits = Vec::new();
    for i in array(controller, "interventions")? {
        let mode: Mode = serde_json::from_value(i["mode"].clone())
            .map_err(|_| VariantError::Json(format!("intervention mode must be nudge, pin or mul, found {}", i["mode"])))?;
        if i["value"].is_object() {
            return Err(VariantError::Json("pinning a feature to another feature is not supported".into()));
        }
        let value = number(&i["value"], "value")?;
        for feature in group(&i["features"])? {
            edits.push(Edit { feature, mode, value });
        }
    }
    Ok(edits)
}

fn condition(v: &Value) -> Result<Condition, VariantError> {
    let combine: Combine = serde_json::from_value(v["operator"].clone())
        .map_err(|_| VariantError::Json(format!("conditional group operator must be AND or OR, found {}", v["operator"])))?;
    let comparisons = array(v, "conditionals")?
        .iter()
        .map(|c| {
            let op: Operator = serde_json::from_value(c["operator"].clone()).map_err(|_| {
                VariantError::Json(format!(
                    "comparison operator must be one of > < >= <= == !=, found {}",
                    c["operator"]
                ))
            })?;
            let right = if c["right_hand"].is_object() {
                Operand::Group(group(&c["right_hand"])?)
            } else {
                Operand::Number(number(&c["right_hand"], "right_hand")?)
            };
            Ok(Comparison {
                left: group(&c["left_hand"])?,
                op,
                right,
            })
        })
        .collect::<Result<_, VariantError>>()?;
    Ok(Condition { combine, comparisons })
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

    #[test]
    fn json_round_trips_and_reports_errors() {
        let mut v = Variant::new("SmolLM2-135M-Instruct");
        v.set(&[5, 6], 0.5);
        v.edits.push(Edit {
            feature: 7,
            mode: Mode::Pin,
            value: -0.3,
        });
        v.set_when(
            Condition::when(vec![1, 2], Operator::Gt, Operand::Number(0.75)),
            vec![Edit::nudge(3, 0.7)],
        );
        v.abort_when(Condition::when(vec![4], Operator::Ge, Operand::Group(vec![1])), "stop-1");
        let back = Variant::from_json(&v.to_json(), 10).unwrap();
        assert_eq!(back, v);
        assert!(matches!(Variant::from_json("{\"base_model\": 3}", 10), Err(VariantError::Json(_))));
        assert!(matches!(
            Variant::from_json(&v.to_json(), 5),
            Err(VariantError::UnknownFeature { feature: 5, .. })
        ));
        let absurd = v.to_json().replace("0.7", "1e30");
        assert!(matches!(Variant::from_json(&absurd, 10), Err(VariantError::BadValue { .. })));
    }

    /// The controller the SDK sends for `variant.set_when(pirate[0] > 0.75, {funny[0]: 0.7});
    /// variant.abort_when(pirate > 0.75)` (goodfire-api.md §4.6, verified on the wire).
    const SDK_CONTROLLER: &str = r#"{"interventions": [], "scopes": [
      {"conditionals": {"conditionals": [{"left_hand": {"features": [{"uuid": "00000000000000000000000000000001", "label": "feature 0", "index_in_sae": 0, "max_activation_strength": 1}]},
         "right_hand": 0.75, "operator": ">"}], "operator": "AND"},
       "controller": {"interventions": [{"mode": "nudge", "features": {"features": [{"uuid": "00000000000000000000000000000001", "label": "feature 0", "index_in_sae": 0, "max_activation_strength": 1}]}, "value": 0.7}],
         "scopes": [], "name": "controller__13986557", "nonzero_strength_threshold": null, "min_nudge_entropy": null, "max_nudge_entropy": null},
       "is_active": false, "event_name": null},
      {"conditionals": {"conditionals": [{"left_hand": {"features": [
          {"uuid": "00000000000000000000000000000001", "label": "feature 0", "index_in_sae": 0, "max_activation_strength": 1},
          {"uuid": "00000000000000000000000000000002", "label": "feature 1", "index_in_sae": 1, "max_activation_strength": 1}]},
         "right_hand": 0.75, "operator": ">"}], "operator": "AND"},
       "controller": {"interventions": [], "scopes": [], "name": "controller__13986557", "nonzero_strength_threshold": null, "min_nudge_entropy": null, "max_nudge_entropy": null},
       "is_active": false, "event_name": "24e31fd7-11a8-45d4-95e0-6873d09da7e4"}],
     "name": "controller__13986557", "nonzero_strength_threshold": null, "min_nudge_entropy": null, "max_nudge_entropy": null}"#;

    #[test]
    fn reads_and_writes_the_goodfire_controller() {
        let controller: Value = serde_json::from_str(SDK_CONTROLLER).unwrap();
        let v = Variant::from_controller("meta-llama/Llama-3.3-70B-Instruct", &controller, 8192).unwrap();
        assert!(v.edits.is_empty());
        assert_eq!(
            v.scopes[0],
            Scope {
                when: Condition::when(vec![0], Operator::Gt, Operand::Number(0.75)),
                then: Action::Set(vec![Edit::nudge(0, 0.7)])
            }
        );
        assert_eq!(v.scopes[1].when.comparisons[0].left, [0, 1]);
        assert_eq!(v.scopes[1].then, Action::Abort("24e31fd7-11a8-45d4-95e0-6873d09da7e4".into()));
        let again = Variant::from_controller(
            &v.base_model,
            &v.to_controller(&FeatureIds::new("ab"), &|i| format!("feature {i}")),
            8192,
        )
        .unwrap();
        assert_eq!(again, v);
        // Unknown ids, pins to features and malformed parts are refused.
        assert!(matches!(
            Variant::from_controller("m", &controller, 1),
            Err(VariantError::UnknownFeature { feature: 1, .. })
        ));
        let pin_to_feature =
            json!({"interventions": [{"mode": "pin", "features": {"features": [{"index_in_sae": 3}]}, "value": {"index_in_sae": 4}}]});
        assert!(
            Variant::from_controller("m", &pin_to_feature, 10)
                .unwrap_err()
                .to_string()
                .contains("another feature")
        );
        let bad_mode = json!({"interventions": [{"mode": "boost", "features": {"features": [{"index_in_sae": 3}]}, "value": 1}]});
        assert!(Variant::from_controller("m", &bad_mode, 10).is_err());
        let bad_scopes = json!({"interventions": [], "scopes": 7});
        assert!(Variant::from_controller("m", &bad_scopes, 10).is_err());
    }

    #[test]
    fn feature_ids_name_one_latent_of_one_sae() {
        let ids = FeatureIds::new("b179c9523d0e6a0f98a330c7562b682750a6f8c8");
        let id = ids.uuid(300);
        assert_eq!(id, "b179c952-3d0e-46a0-8f98-00000000012c");
        assert_eq!(ids.parse(&id), Some(300));
        assert_eq!(ids.parse(&id.replace('-', "").to_uppercase()), Some(300));
        assert_eq!(FeatureIds::new("00ff").parse(&id), None, "another SAE's id");
        for bad in ["", "not-a-uuid", &id[..35], &format!("{id}0")] {
            assert_eq!(ids.parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_and_writes_the_goodfire_variant_json() {
        let text = r#"{"base_model": "meta-llama/Llama-3.3-70B-Instruct",
          "edits": [{"feature_id": "a16920eb-459c-4862-9c42-d0711c9c700c", "feature_label": "The assistant should roleplay as a pirate", "index_in_sae": 33234, "value": 0.9}],
          "scopes": []}"#;
        let v = Variant::from_goodfire_json(text, 65536).unwrap();
        assert_eq!(v.edits, [Edit::nudge(33234, 0.9)]);
        let back = v.to_goodfire_json(&FeatureIds::new("ab"), &|_| "pirate".into());
        assert_eq!(Variant::from_goodfire_json(&back.to_string(), 65536).unwrap(), v);
        assert!(matches!(
            Variant::from_goodfire_json(text, 8192),
            Err(VariantError::UnknownFeature { feature: 33234, .. })
        ));
        assert!(Variant::from_goodfire_json("{\"edits\": []}", 10).is_err());
        assert!(Variant::from_goodfire_json(&text.replace("0.9", "\"lots\""), 65536).is_err());
    }
}
