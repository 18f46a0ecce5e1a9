//! Variants as users save, export and share them.
//!
//! The playground keeps a variant in Goodfire's own terms: features by UUID and label, so the
//! same variant steers the in-browser model and any Ember-compatible endpoint, and an
//! edit-only file loads in the goodfire SDK's `Variant.from_json`. The SDK cannot serialize
//! conditional scopes, so rules live in a field of their own (`rules`) and `scopes` stays
//! empty. A share link carries the whole variant in the URL fragment: versioned, deflated,
//! checksummed, and bounded in size, so a broken or tampered link is refused as a whole.
//!
//! A link carries feature ids and labels as the sharer saw them, and anyone can write a link:
//! its counts (edits, rules, clauses, features per clause) and texts are bounded while it is
//! read, before any list is built past its bound, and its labels are claims only. The page
//! re-resolves every feature by `index_in_sae` against the atlas it loaded
//! ([`SavedVariant::resolve`]) and shows each id or label that differs.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::replies::GoodfireFeature;
use crate::units::{MAX_EDIT_VALUE, STRENGTH_UNIT};

/// The prefix of a share link's payload; a new encoding gets a new one.
pub const LINK_VERSION: &str = "k1.";
/// Longest payload accepted from a link (browsers keep far longer URLs; variants need far less).
pub const MAX_LINK_CHARS: usize = 32 * 1024;
/// Largest variant JSON a link may inflate to (inflating stops there).
pub const MAX_VARIANT_BYTES: usize = 256 * 1024;
/// Most edits a variant may have (at top level, and in each rule's THEN).
pub const MAX_EDITS: usize = 256;
/// Most rules a variant may have.
pub const MAX_RULES: usize = 64;
/// Most clauses one rule may have.
pub const MAX_CLAUSES: usize = 16;
/// Most features one clause may group.
pub const MAX_CLAUSE_FEATURES: usize = 16;
/// Longest label, feature id, event name or model name, in characters.
pub const MAX_TEXT_CHARS: usize = 256;
const CHECKSUM_BYTES: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ShareError {
    #[error("this is not a Kindling share link")]
    NotALink,
    #[error("share link version {0:?} is not supported by this build (it reads {LINK_VERSION:?})")]
    Version(String),
    #[error("the share link is too long ({0} characters, at most {MAX_LINK_CHARS})")]
    TooLong(usize),
    #[error("the share link is damaged: {0}")]
    Damaged(&'static str),
    #[error("the shared variant is too large (more than {MAX_VARIANT_BYTES} bytes once inflated)")]
    TooLarge,
    #[error("the variant is not valid: {0}")]
    Invalid(String),
}

/// Reads a JSON list, refusing it as soon as it has more than `max` entries: a hostile file
/// or link cannot make the reader build a longer list first.
struct Bounded<T> {
    max: usize,
    what: &'static str,
    _entries: std::marker::PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Bounded<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a list of at most {} {}", self.max, self.what)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max));
        while let Some(entry) = seq.next_element()? {
            if out.len() == self.max {
                return Err(serde::de::Error::custom(format!("more than {} {}", self.max, self.what)));
            }
            out.push(entry);
        }
        Ok(out)
    }
}

fn bounded<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D, max: usize, what: &'static str) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(Bounded {
        max,
        what,
        _entries: std::marker::PhantomData,
    })
}

fn bounded_edits<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SavedEdit>, D::Error> {
    bounded(d, MAX_EDITS, "edits")
}

fn bounded_rules<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Rule>, D::Error> {
    bounded(d, MAX_RULES, "rules")
}

fn bounded_clauses<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Clause>, D::Error> {
    bounded(d, MAX_CLAUSES, "clauses in a rule")
}

fn bounded_features<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<FeatureRef>, D::Error> {
    bounded(d, MAX_CLAUSE_FEATURES, "features in a clause")
}

fn bounded_scopes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Value>, D::Error> {
    // Always empty when valid; one entry is enough to say why not.
    bounded(d, 1, "scopes")
}

/// A feature as the Goodfire API names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureRef {
    pub uuid: String,
    #[serde(default)]
    pub label: String,
    pub index_in_sae: u32,
}

impl FeatureRef {
    /// `Feature.json()` as the SDK sends it inside a controller.
    pub fn to_goodfire(&self) -> GoodfireFeature {
        GoodfireFeature {
            uuid: self.uuid.clone(),
            label: self.label.clone(),
            index_in_sae: self.index_in_sae,
            max_activation_strength: 1,
        }
    }
}

/// How an edit changes its feature (the controller's intervention mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EditMode {
    /// Adds to the feature's activation.
    #[default]
    Nudge,
    /// Holds the feature's activation at the value.
    Pin,
}

/// One feature edit, in the SDK's `Variant.json()` shape plus a mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedEdit {
    pub feature_id: String,
    #[serde(default)]
    pub feature_label: String,
    pub index_in_sae: u32,
    pub value: f32,
    #[serde(default)]
    pub mode: EditMode,
}

impl SavedEdit {
    pub fn feature(&self) -> FeatureRef {
        FeatureRef {
            uuid: self.feature_id.clone(),
            label: self.feature_label.clone(),
            index_in_sae: self.index_in_sae,
        }
    }

    fn to_intervention(&self) -> Value {
        json!({ "mode": self.mode, "features": { "features": [self.feature().to_goodfire()] }, "value": self.value })
    }
}

/// `features <operator> value`, on the features' activation (several features: their group).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Clause {
    #[serde(deserialize_with = "bounded_features")]
    pub features: Vec<FeatureRef>,
    pub operator: String,
    pub value: f32,
}

/// What a rule does once its condition holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    /// `set_when`: apply these edits from then on.
    Edits(#[serde(deserialize_with = "bounded_edits")] Vec<SavedEdit>),
    /// `abort_when`: stop generating and report this event name.
    Abort(String),
}

/// A conditional rule: IF clauses (all or any) THEN an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// `"AND"` or `"OR"`.
    pub combine: String,
    #[serde(deserialize_with = "bounded_clauses")]
    pub clauses: Vec<Clause>,
    pub then: RuleAction,
}

/// A whole variant: edits and rules on a base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedVariant {
    pub base_model: String,
    #[serde(default, deserialize_with = "bounded_edits")]
    pub edits: Vec<SavedEdit>,
    /// Always empty: the SDK's own (unserializable) scopes; rules are in `rules`.
    #[serde(default, deserialize_with = "bounded_scopes")]
    pub scopes: Vec<Value>,
    #[serde(default, deserialize_with = "bounded_rules")]
    pub rules: Vec<Rule>,
    /// The steering unit its edit values are written in ([`STRENGTH_UNIT`]). Kindling's
    /// files and links from before unit 2 lack it; [`SavedVariant::convert_units`] brings
    /// them to the current unit. Rule thresholds are activations, whose unit did not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength_unit: Option<u32>,
    /// Where its features live when not in Kindling's own SAE: a hosted provider's model and
    /// SAE source (a Neuronpedia pair), so a share link opens on the same features. `None`:
    /// the model's own SAE, on whatever endpoint serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderRef>,
}

/// A hosted provider's model and SAE source, as variants record them. Never a key or a URL
/// with credentials: a link carries only what names the features.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderRef {
    /// `"neuronpedia"`.
    pub name: String,
    pub model_id: String,
    pub source: String,
}

const OPERATORS: [&str; 6] = [">", "<", ">=", "<=", "==", "!="];

impl SavedVariant {
    pub fn new(base_model: impl Into<String>) -> Self {
        Self {
            base_model: base_model.into(),
            edits: Vec::new(),
            scopes: Vec::new(),
            rules: Vec::new(),
            strength_unit: Some(STRENGTH_UNIT),
            provider: None,
        }
    }

    /// The unit its values are written in (files and links that do not say are unit 1).
    pub fn unit(&self) -> u32 {
        self.strength_unit.unwrap_or(1)
    }

    /// Rewrites edit values written in an older unit in the current one. `per_unit_1(index)`
    /// gives how many current units one unit-1 value of that latent is
    /// (`kindling_engine::steer::Units::from_version_1` of 1.0). Nothing changes when it is already
    /// current; a latent without a factor is an error and nothing is changed.
    pub fn convert_units(&mut self, per_unit_1: &dyn Fn(u32) -> Option<f32>) -> Result<bool, ShareError> {
        if self.unit() == STRENGTH_UNIT {
            return Ok(false);
        }
        let mut converted = self.clone();
        let convert = |e: &mut SavedEdit| {
            let factor = per_unit_1(e.index_in_sae)
                .ok_or_else(|| ShareError::Invalid(format!("no unit conversion for feature {}", e.index_in_sae)))?;
            e.value *= factor;
            Ok::<(), ShareError>(())
        };
        converted.edits.iter_mut().try_for_each(convert)?;
        for rule in &mut converted.rules {
            if let RuleAction::Edits(edits) = &mut rule.then {
                edits.iter_mut().try_for_each(convert)?;
            }
        }
        converted.strength_unit = Some(STRENGTH_UNIT);
        *self = converted;
        Ok(true)
    }

    /// True when it changes nothing (the base model).
    pub fn is_base(&self) -> bool {
        self.edits.is_empty() && self.rules.is_empty()
    }

    /// Checks what a hand-edited file or a link could get wrong.
    pub fn validate(&self) -> Result<(), ShareError> {
        let bad = |m: String| Err(ShareError::Invalid(m));
        if self.base_model.trim().is_empty() {
            return bad("base_model is empty".into());
        }
        let text = |what: &str, t: &str| {
            let chars = t.chars().count();
            if chars > MAX_TEXT_CHARS {
                return Err(ShareError::Invalid(format!(
                    "a {what} has {chars} characters (at most {MAX_TEXT_CHARS})"
                )));
            }
            Ok(())
        };
        let count = |what: &str, n: usize, max: usize| {
            if n > max {
                return Err(ShareError::Invalid(format!("{n} {what}, at most {max}")));
            }
            Ok(())
        };
        let feature = |f: &FeatureRef| {
            text("feature id", &f.uuid)?;
            text("feature label", &f.label)
        };
        text("model name", &self.base_model)?;
        if let Some(provider) = &self.provider {
            if provider.name != "neuronpedia" {
                return bad(format!(
                    "provider {:?} is not known to this build (it knows \"neuronpedia\")",
                    provider.name
                ));
            }
            crate::neuronpedia::Source::new(&provider.model_id, &provider.source).map_err(|e| ShareError::Invalid(e.to_string()))?;
        }
        if let Some(unit) = self.strength_unit
            && !(1..=STRENGTH_UNIT).contains(&unit)
        {
            return bad(format!(
                "strength_unit {unit} is not known to this build (it reads units 1 to {STRENGTH_UNIT}); was it saved by a newer Kindling?"
            ));
        }
        count("edits", self.edits.len(), MAX_EDITS)?;
        count("rules", self.rules.len(), MAX_RULES)?;
        let check_edit = |e: &SavedEdit| {
            if e.feature_id.trim().is_empty() {
                return Err(ShareError::Invalid(format!("edit of feature {} has no feature_id", e.index_in_sae)));
            }
            text("feature id", &e.feature_id)?;
            text("feature label", &e.feature_label)?;
            if !e.value.is_finite() || e.value.abs() > MAX_EDIT_VALUE {
                return Err(ShareError::Invalid(format!("edit value {} is out of range", e.value)));
            }
            Ok(())
        };
        for edit in &self.edits {
            check_edit(edit)?;
        }
        if !self.scopes.is_empty() {
            return bad("`scopes` must be empty: rules go in `rules`".into());
        }
        for rule in &self.rules {
            if rule.combine != "AND" && rule.combine != "OR" {
                return bad(format!(
                    "rule combines clauses with {:?} (expected \"AND\" or \"OR\")",
                    rule.combine
                ));
            }
            if rule.clauses.is_empty() {
                return bad("a rule has no clauses".into());
            }
            count("clauses in a rule", rule.clauses.len(), MAX_CLAUSES)?;
            for clause in &rule.clauses {
                if clause.features.is_empty() {
                    return bad("a rule clause names no feature".into());
                }
                count("features in a clause", clause.features.len(), MAX_CLAUSE_FEATURES)?;
                clause.features.iter().try_for_each(feature)?;
                if !OPERATORS.contains(&clause.operator.as_str()) {
                    return bad(format!("unknown operator {:?}", clause.operator));
                }
                if !clause.value.is_finite() {
                    return bad("a rule threshold is not a number".into());
                }
            }
            match &rule.then {
                RuleAction::Edits(edits) if edits.is_empty() => return bad("a rule has no edits".into()),
                RuleAction::Edits(edits) => {
                    count("edits in a rule", edits.len(), MAX_EDITS)?;
                    edits.iter().try_for_each(check_edit)?
                }
                RuleAction::Abort(event) if event.trim().is_empty() => return bad("an abort rule has no event name".into()),
                RuleAction::Abort(event) => text("event name", event)?,
            }
        }
        Ok(())
    }

    /// Reads a variant file (this format, or the SDK's edit-only `Variant.json()`). A file
    /// that does not name its unit is Kindling's from before unit 2 when it has `rules` (unit
    /// 1), and the SDK's otherwise, whose values are in the server's current unit.
    pub fn from_json(text: &str) -> Result<Self, ShareError> {
        let mut variant = Self::parse(text)?;
        if variant.strength_unit.is_none() {
            // Parsed again only for its keys; the text is already known to be a small valid variant.
            let keys: Value = serde_json::from_str(text).map_err(|e| ShareError::Invalid(e.to_string()))?;
            if keys.get("rules").is_none() {
                variant.strength_unit = Some(STRENGTH_UNIT);
            }
        }
        Ok(variant)
    }

    fn parse(text: &str) -> Result<Self, ShareError> {
        let variant: SavedVariant = serde_json::from_str(text).map_err(|e| ShareError::Invalid(e.to_string()))?;
        variant.validate()?;
        Ok(variant)
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("a variant always serializes")
    }

    /// The request's `controller`, exactly as the goodfire SDK builds it: edits as top-level
    /// interventions, then one scope per rule.
    pub fn to_controller(&self) -> Value {
        let controller = |interventions: Vec<Value>, scopes: Vec<Value>| {
            json!({ "interventions": interventions, "scopes": scopes, "name": "controller__kindling",
                    "nonzero_strength_threshold": null, "min_nudge_entropy": null, "max_nudge_entropy": null })
        };
        let scopes = self
            .rules
            .iter()
            .map(|rule| {
                let conditionals: Vec<Value> = rule
                    .clauses
                    .iter()
                    .map(|c| {
                        let features: Vec<GoodfireFeature> = c.features.iter().map(FeatureRef::to_goodfire).collect();
                        json!({ "left_hand": { "features": features }, "right_hand": c.value, "operator": c.operator })
                    })
                    .collect();
                let (inner, event) = match &rule.then {
                    RuleAction::Edits(edits) => (edits.iter().map(SavedEdit::to_intervention).collect(), Value::Null),
                    RuleAction::Abort(event) => (Vec::new(), Value::String(event.clone())),
                };
                json!({ "conditionals": { "conditionals": conditionals, "operator": rule.combine },
                        "controller": controller(inner, Vec::new()), "is_active": false, "event_name": event })
            })
            .collect();
        controller(self.edits.iter().map(SavedEdit::to_intervention).collect(), scopes)
    }

    /// The share-link payload (what follows `#v=` in the URL): version, then base64url of a
    /// checksum and the deflated JSON.
    pub fn to_link(&self) -> String {
        let json = serde_json::to_vec(self).expect("a variant always serializes");
        let mut packed = Sha256::digest(&json)[..CHECKSUM_BYTES].to_vec();
        packed.extend(miniz_oxide::deflate::compress_to_vec(&json, 9));
        format!("{LINK_VERSION}{}", URL_SAFE_NO_PAD.encode(packed))
    }

    /// Reads a share-link payload; any damage is an error and nothing is half-read.
    pub fn from_link(payload: &str) -> Result<Self, ShareError> {
        let payload = payload.trim();
        if payload.len() > MAX_LINK_CHARS {
            return Err(ShareError::TooLong(payload.len()));
        }
        let Some((version, body)) = payload.split_once('.') else {
            return Err(ShareError::NotALink);
        };
        if format!("{version}.") != LINK_VERSION {
            if version.len() <= 8 && version.starts_with('k') {
                return Err(ShareError::Version(version.to_string()));
            }
            return Err(ShareError::NotALink);
        }
        let packed = URL_SAFE_NO_PAD.decode(body).map_err(|_| ShareError::Damaged("not base64url"))?;
        if packed.len() <= CHECKSUM_BYTES {
            return Err(ShareError::Damaged("too short"));
        }
        let (checksum, deflated) = packed.split_at(CHECKSUM_BYTES);
        // Inflating stops at the bound: a small link cannot make a large allocation.
        let json = miniz_oxide::inflate::decompress_to_vec_with_limit(deflated, MAX_VARIANT_BYTES).map_err(|e| match e.status {
            miniz_oxide::inflate::TINFLStatus::HasMoreOutput => ShareError::TooLarge,
            _ => ShareError::Damaged("the compressed variant does not inflate"),
        })?;
        if Sha256::digest(&json)[..CHECKSUM_BYTES] != *checksum {
            return Err(ShareError::Damaged("checksum mismatch"));
        }
        let text = std::str::from_utf8(&json).map_err(|_| ShareError::Damaged("not UTF-8"))?;
        // Links were only ever written by Kindling: one without a unit is unit 1.
        Self::parse(text)
    }
}

/// A feature whose id or label in a variant differs from what the loaded atlas says.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub index_in_sae: u32,
    /// The id and label the variant carried (as the sharer saw them, or as a forger wrote them).
    pub claimed: FeatureRef,
    /// What the atlas says of that latent; the variant now carries this.
    pub atlas: FeatureRef,
}

impl Mismatch {
    /// The ids differ: the variant was made with another SAE, so its latents may mean other things.
    pub fn other_sae(&self) -> bool {
        self.claimed.uuid != self.atlas.uuid
    }
}

impl SavedVariant {
    /// Every latent the variant names (edits, clauses, rules' edits), each once, ascending.
    pub fn indices(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self.edits.iter().map(|e| e.index_in_sae).collect();
        for rule in &self.rules {
            if let RuleAction::Edits(edits) = &rule.then {
                out.extend(edits.iter().map(|e| e.index_in_sae));
            }
            out.extend(rule.clauses.iter().flat_map(|c| c.features.iter().map(|f| f.index_in_sae)));
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Re-resolves every feature by `index_in_sae` with `atlas` (the loaded SAE's ids and
    /// labels): the variant then carries the atlas's id and label, and each latent whose id or
    /// label differed is returned once. A latent the atlas does not have is an error, and the
    /// variant is left as it was.
    pub fn resolve(&mut self, atlas: &dyn Fn(u32) -> Option<FeatureRef>) -> Result<Vec<Mismatch>, ShareError> {
        let mut known = std::collections::BTreeMap::new();
        for index in self.indices() {
            let found = atlas(index).ok_or_else(|| ShareError::Invalid(format!("feature #{index} does not exist in this SAE")))?;
            known.insert(index, found);
        }
        let mut mismatches: Vec<Mismatch> = Vec::new();
        self.for_each_feature(&mut |uuid, label, index| {
            let found = &known[index];
            if (uuid.as_str(), label.as_str()) != (found.uuid.as_str(), found.label.as_str()) {
                if !mismatches.iter().any(|m| m.index_in_sae == *index) {
                    mismatches.push(Mismatch {
                        index_in_sae: *index,
                        claimed: FeatureRef {
                            uuid: uuid.clone(),
                            label: label.clone(),
                            index_in_sae: *index,
                        },
                        atlas: found.clone(),
                    });
                }
                uuid.clone_from(&found.uuid);
                label.clone_from(&found.label);
            }
        });
        mismatches.sort_by_key(|m| m.index_in_sae);
        Ok(mismatches)
    }

    fn for_each_feature(&mut self, f: &mut dyn FnMut(&mut String, &mut String, &mut u32)) {
        let mut edits = |edits: &mut Vec<SavedEdit>| {
            for e in edits {
                f(&mut e.feature_id, &mut e.feature_label, &mut e.index_in_sae);
            }
        };
        edits(&mut self.edits);
        for rule in &mut self.rules {
            if let RuleAction::Edits(list) = &mut rule.then {
                edits(list);
            }
        }
        for rule in &mut self.rules {
            for clause in &mut rule.clauses {
                for feature in &mut clause.features {
                    f(&mut feature.uuid, &mut feature.label, &mut feature.index_in_sae);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(index: u32, value: f32) -> SavedEdit {
        SavedEdit {
            feature_id: format!("{index:032x}"),
            feature_label: format!("feature <b>{index}</b>"),
            index_in_sae: index,
            value,
            mode: EditMode::Nudge,
        }
    }

    fn variant() -> SavedVariant {
        let mut v = SavedVariant::new("HuggingFaceTB/SmolLM2-135M-Instruct");
        v.edits.push(edit(7, 0.5));
        v.edits.push(SavedEdit {
            mode: EditMode::Pin,
            ..edit(9, -0.25)
        });
        v.rules.push(Rule {
            combine: "OR".into(),
            clauses: vec![Clause {
                features: vec![edit(3, 0.0).feature(), edit(4, 0.0).feature()],
                operator: ">".into(),
                value: 0.75,
            }],
            then: RuleAction::Edits(vec![edit(5, 0.7)]),
        });
        v.rules.push(Rule {
            combine: "AND".into(),
            clauses: vec![Clause {
                features: vec![edit(11, 0.0).feature()],
                operator: ">=".into(),
                value: 0.5,
            }],
            then: RuleAction::Abort("too-pirate".into()),
        });
        v
    }

    #[test]
    fn link_round_trips_the_whole_variant() {
        let v = variant();
        let link = v.to_link();
        assert!(link.starts_with(LINK_VERSION));
        assert!(link.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)), "{link}");
        assert_eq!(SavedVariant::from_link(&link).unwrap(), v);
    }

    #[test]
    fn links_carry_the_provider_and_refuse_a_bad_one() {
        let mut v = variant();
        v.rules.clear();
        v.provider = Some(ProviderRef {
            name: "neuronpedia".into(),
            model_id: "llama3.3-70b-it".into(),
            source: "50-resid-post-gf".into(),
        });
        let opened = SavedVariant::from_link(&v.to_link()).unwrap();
        assert_eq!(opened.provider, v.provider);
        for (name, model, source) in [("elsewhere", "m", "s"), ("neuronpedia", "../../x", "s"), ("neuronpedia", "m", "")] {
            v.provider = Some(ProviderRef {
                name: name.into(),
                model_id: model.into(),
                source: source.into(),
            });
            assert!(
                matches!(SavedVariant::from_link(&v.to_link()), Err(ShareError::Invalid(_))),
                "{name} {model} {source}"
            );
        }
    }

    #[test]
    fn damaged_links_are_refused() {
        let link = variant().to_link();
        // Flip one character in the middle of the payload.
        let mut chars: Vec<char> = link.chars().collect();
        let i = chars.len() / 2;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.into_iter().collect();
        assert!(matches!(SavedVariant::from_link(&tampered), Err(ShareError::Damaged(_))));
        assert!(matches!(
            SavedVariant::from_link(&link[..link.len() - 5]),
            Err(ShareError::Damaged(_))
        ));
        assert_eq!(SavedVariant::from_link("hello"), Err(ShareError::NotALink));
        assert_eq!(
            SavedVariant::from_link(&link.replacen("k1.", "k9.", 1)),
            Err(ShareError::Version("k9".into()))
        );
        let huge = format!("k1.{}", "A".repeat(MAX_LINK_CHARS));
        assert!(matches!(SavedVariant::from_link(&huge), Err(ShareError::TooLong(_))));
    }

    #[test]
    fn a_zip_bomb_is_refused() {
        let json = format!(
            "{{\"base_model\":\"m\",\"edits\":[],\"pad\":\"{}\"}}",
            " ".repeat(MAX_VARIANT_BYTES * 4)
        );
        let mut packed = Sha256::digest(json.as_bytes())[..CHECKSUM_BYTES].to_vec();
        packed.extend(miniz_oxide::deflate::compress_to_vec(json.as_bytes(), 9));
        let link = format!("{LINK_VERSION}{}", URL_SAFE_NO_PAD.encode(packed));
        assert!(link.len() < MAX_LINK_CHARS);
        assert_eq!(SavedVariant::from_link(&link), Err(ShareError::TooLarge));
    }

    /// A link around any JSON text, made the way `to_link` makes one.
    fn link_of(json: &[u8]) -> String {
        let mut packed = Sha256::digest(json)[..CHECKSUM_BYTES].to_vec();
        packed.extend(miniz_oxide::deflate::compress_to_vec(json, 6));
        format!("{LINK_VERSION}{}", URL_SAFE_NO_PAD.encode(packed))
    }

    fn many_edits(n: usize) -> Vec<u8> {
        let edit = br#"{"feature_id":"a","index_in_sae":1,"value":0},"#;
        let mut json = br#"{"base_model":"m","edits":["#.to_vec();
        json.reserve(edit.len() * n + 2);
        for _ in 0..n {
            json.extend_from_slice(edit);
        }
        json.pop();
        json.extend_from_slice(b"]}");
        json
    }

    #[test]
    fn a_link_with_a_million_edits_is_refused_cheaply() {
        // 47 MB of JSON: refused from the payload's length, or at the inflate bound, never
        // inflated whole.
        let link = link_of(&many_edits(1_000_000));
        let started = std::time::Instant::now();
        let err = SavedVariant::from_link(&link).unwrap_err();
        assert!(matches!(err, ShareError::TooLong(_) | ShareError::TooLarge), "{err}");
        // 100,000 edits (4.7 MB) fit in a link's length: inflating stops at MAX_VARIANT_BYTES.
        let link = link_of(&many_edits(100_000));
        assert!(link.len() <= MAX_LINK_CHARS, "{}", link.len());
        assert_eq!(SavedVariant::from_link(&link), Err(ShareError::TooLarge));
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[test]
    fn counts_are_bounded_while_a_link_is_read() {
        // Within the byte bound, but more edits than a variant may have.
        let json = many_edits(MAX_EDITS + 1);
        assert!(json.len() < MAX_VARIANT_BYTES);
        let err = SavedVariant::from_link(&link_of(&json)).unwrap_err();
        assert!(matches!(&err, ShareError::Invalid(m) if m.contains("more than 256 edits")), "{err}");
        assert!(SavedVariant::from_json(std::str::from_utf8(&many_edits(MAX_EDITS)).unwrap()).is_ok());

        // Rules, clauses per rule, features per clause, and edits in a rule.
        let clause = r#"{"features":[{"uuid":"u","index_in_sae":1}],"operator":">","value":0.5}"#;
        let rule = |clauses: usize| {
            format!(
                r#"{{"combine":"AND","clauses":[{}],"then":{{"abort":"x"}}}}"#,
                vec![clause; clauses].join(",")
            )
        };
        let rules = |n: usize, clauses: usize| format!(r#"{{"base_model":"m","rules":[{}]}}"#, vec![rule(clauses); n].join(","));
        assert!(SavedVariant::from_json(&rules(MAX_RULES, 1)).is_ok());
        let err = SavedVariant::from_link(&link_of(rules(MAX_RULES + 1, 1).as_bytes())).unwrap_err();
        assert!(err.to_string().contains("more than 64 rules"), "{err}");
        let err = SavedVariant::from_json(&rules(1, MAX_CLAUSES + 1)).unwrap_err();
        assert!(err.to_string().contains("more than 16 clauses"), "{err}");
        let wide = format!(
            r#"{{"base_model":"m","rules":[{{"combine":"OR","clauses":[{{"features":[{}],"operator":">","value":1}}],"then":{{"abort":"x"}}}}]}}"#,
            vec![r#"{"uuid":"u","index_in_sae":1}"#; MAX_CLAUSE_FEATURES + 1].join(",")
        );
        assert!(
            SavedVariant::from_json(&wide)
                .unwrap_err()
                .to_string()
                .contains("more than 16 features")
        );
        let then = format!(
            r#"{{"base_model":"m","rules":[{{"combine":"OR","clauses":[{clause}],"then":{{"edits":[{}]}}}}]}}"#,
            vec![r#"{"feature_id":"a","index_in_sae":1,"value":0}"#; MAX_EDITS + 1].join(",")
        );
        assert!(
            SavedVariant::from_json(&then)
                .unwrap_err()
                .to_string()
                .contains("more than 256 edits")
        );

        // Texts: a label may not be a novel.
        let mut v = variant();
        v.edits[0].feature_label = "x".repeat(MAX_TEXT_CHARS + 1);
        assert!(SavedVariant::from_link(&v.to_link()).unwrap_err().to_string().contains("label"));
        // A variant built in code is held to the same counts.
        let mut v = variant();
        v.edits = (0..=MAX_EDITS as u32).map(|i| edit(i, 0.1)).collect();
        assert!(v.validate().is_err());
    }

    #[test]
    fn resolve_takes_ids_and_labels_from_the_atlas_and_reports_each_difference() {
        let atlas = |index: u32| {
            (index < 100).then(|| FeatureRef {
                uuid: format!("{index:032x}"),
                label: format!("atlas label {index}"),
                index_in_sae: index,
            })
        };
        let mut v = variant();
        // The fixture's labels are `feature <b>N</b>`: every one differs from the atlas.
        v.edits[0].feature_label = "<img src=x onerror=alert(1)>".into();
        // Feature 9's id is another SAE's.
        v.edits[1].feature_id = "f".repeat(32);
        let mismatches = v.resolve(&atlas).unwrap();
        assert_eq!(mismatches.iter().map(|m| m.index_in_sae).collect::<Vec<_>>(), [3, 4, 5, 7, 9, 11]);
        let seven = mismatches.iter().find(|m| m.index_in_sae == 7).unwrap();
        assert_eq!(seven.claimed.label, "<img src=x onerror=alert(1)>");
        assert_eq!(seven.atlas.label, "atlas label 7");
        assert!(!seven.other_sae());
        assert!(mismatches.iter().find(|m| m.index_in_sae == 9).unwrap().other_sae());
        // The variant now says what the atlas says, everywhere.
        assert_eq!(v.edits[0].feature_label, "atlas label 7");
        assert_eq!(v.edits[1].feature_id, format!("{:032x}", 9));
        assert_eq!(v.rules[0].clauses[0].features[1].label, "atlas label 4");
        assert!(matches!(&v.rules[0].then, RuleAction::Edits(e) if e[0].feature_label == "atlas label 5"));
        // Resolving again finds nothing more.
        assert_eq!(v.resolve(&atlas).unwrap(), []);
        // A latent the SAE does not have: an error, and nothing changes.
        let mut w = variant();
        w.edits[0].index_in_sae = 100_000;
        let before = w.clone();
        assert!(w.resolve(&atlas).unwrap_err().to_string().contains("#100000 does not exist"));
        assert_eq!(w, before);
    }

    #[test]
    fn controller_matches_the_sdk_shape_and_the_engine_reads_it() {
        let v = variant();
        let c = v.to_controller();
        assert_eq!(c["interventions"][0]["mode"], "nudge");
        assert_eq!(c["interventions"][1]["mode"], "pin");
        assert_eq!(c["interventions"][0]["features"]["features"][0]["index_in_sae"], 7);
        assert_eq!(c["scopes"][0]["conditionals"]["operator"], "OR");
        assert_eq!(
            c["scopes"][0]["conditionals"]["conditionals"][0]["left_hand"]["features"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(c["scopes"][0]["event_name"], Value::Null);
        assert_eq!(c["scopes"][1]["event_name"], "too-pirate");
        // The engine's reader of controllers accepts it, edits and rules alike.
        #[cfg(feature = "engine")]
        {
            let engine = crate::local::read_controller("m", &c, 64).unwrap();
            assert_eq!((engine.edits.len(), engine.scopes.len()), (2, 2));
        }
    }

    #[test]
    fn sdk_edit_only_files_load_and_bad_files_explain_themselves() {
        let sdk = r#"{"base_model": "meta-llama/Llama-3.3-70B-Instruct",
            "edits": [{"feature_id": "a16920eb-459c-4862-9c42-d0711c9c700c", "feature_label": "pirate",
                       "index_in_sae": 33234, "value": 0.9}], "scopes": []}"#;
        let v = SavedVariant::from_json(sdk).unwrap();
        assert_eq!(v.edits[0].mode, EditMode::Nudge);
        assert!(v.rules.is_empty());
        let err = SavedVariant::from_json(r#"{"base_model":"m","edits":[{"feature_id":"x","index_in_sae":1,"value":1e9}]}"#).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        assert!(SavedVariant::from_json("{not json").is_err());
        let mut v = variant();
        v.rules[0].clauses[0].operator = "=>".into();
        assert!(v.validate().unwrap_err().to_string().contains("operator"));
    }

    #[test]
    fn values_of_the_old_unit_open_converted_and_new_ones_as_they_are() {
        // A link or file of unit 1 (written before unit 2 existed: no strength_unit).
        let mut old = variant();
        old.strength_unit = None;
        let json = old.to_json_pretty();
        assert!(!json.contains("strength_unit"));
        let link = old.to_link();
        let factor = |i: u32| Some(if i == 7 { 0.25 } else { 0.5 });
        for mut opened in [SavedVariant::from_link(&link).unwrap(), SavedVariant::from_json(&json).unwrap()] {
            assert_eq!(opened.unit(), 1);
            assert!(opened.convert_units(&factor).unwrap());
            assert_eq!(opened.unit(), STRENGTH_UNIT);
            assert_eq!((opened.edits[0].value, opened.edits[1].value), (0.5 * 0.25, -0.25 * 0.5));
            // Rule thresholds are activations: untouched.
            assert_eq!(opened.rules, {
                let mut rules = old.rules.clone();
                for rule in &mut rules {
                    if let RuleAction::Edits(edits) = &mut rule.then {
                        edits.iter_mut().for_each(|e| e.value *= factor(e.index_in_sae).unwrap());
                    }
                }
                rules
            });
            assert!(!opened.convert_units(&factor).unwrap(), "converted once");
        }
        // What this build writes names its unit and opens unchanged.
        let new = variant();
        let mut opened = SavedVariant::from_link(&new.to_link()).unwrap();
        assert_eq!(opened.unit(), STRENGTH_UNIT);
        assert!(!opened.convert_units(&factor).unwrap());
        assert_eq!(opened, new);
        // The SDK's Variant.json() names no unit: its values are the server's, already current.
        let sdk = r#"{"base_model": "m", "edits": [{"feature_id": "x", "index_in_sae": 3, "value": 0.9}], "scopes": []}"#;
        assert_eq!(SavedVariant::from_json(sdk).unwrap().unit(), STRENGTH_UNIT);
        // A latent without a conversion changes nothing; a unit from the future is refused.
        let mut stuck = SavedVariant::from_json(&json).unwrap();
        assert!(stuck.convert_units(&|_| None).is_err());
        assert_eq!(stuck.unit(), 1);
        let future = json.replacen("{", "{\"strength_unit\": 9,", 1);
        assert!(SavedVariant::from_json(&future).unwrap_err().to_string().contains("newer Kindling"));
    }
}
