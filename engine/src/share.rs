//! Variants as users save, export and share them.
//!
//! The playground keeps a variant in Goodfire's own terms: features by UUID and label, so the
//! same variant steers the in-browser model and any Ember-compatible endpoint, and an
//! edit-only file loads in the goodfire SDK's `Variant.from_json`. The SDK cannot serialize
//! conditional scopes, so rules live in a field of their own (`rules`) and `scopes` stays
//! empty. A share link carries the whole variant in the URL fragment: versioned, deflated,
//! checksummed, and bounded in size, so a broken or tampered link is refused as a whole.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The prefix of a share link's payload; a new encoding gets a new one.
pub const LINK_VERSION: &str = "k1.";
/// Longest payload accepted from a link (browsers keep far longer URLs; variants need far less).
pub const MAX_LINK_CHARS: usize = 32 * 1024;
/// Largest variant JSON a link may inflate to.
pub const MAX_VARIANT_BYTES: usize = 256 * 1024;
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
    #[error("the variant is not valid: {0}")]
    Invalid(String),
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
    pub fn to_goodfire(&self) -> Value {
        json!({ "uuid": self.uuid, "label": self.label, "index_in_sae": self.index_in_sae, "max_activation_strength": 1 })
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
    pub features: Vec<FeatureRef>,
    pub operator: String,
    pub value: f32,
}

/// What a rule does once its condition holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    /// `set_when`: apply these edits from then on.
    Edits(Vec<SavedEdit>),
    /// `abort_when`: stop generating and report this event name.
    Abort(String),
}

/// A conditional rule: IF clauses (all or any) THEN an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// `"AND"` or `"OR"`.
    pub combine: String,
    pub clauses: Vec<Clause>,
    pub then: RuleAction,
}

/// A whole variant: edits and rules on a base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedVariant {
    pub base_model: String,
    #[serde(default)]
    pub edits: Vec<SavedEdit>,
    /// Always empty: the SDK's own (unserializable) scopes; rules are in `rules`.
    #[serde(default)]
    pub scopes: Vec<Value>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

const OPERATORS: [&str; 6] = [">", "<", ">=", "<=", "==", "!="];

impl SavedVariant {
    pub fn new(base_model: impl Into<String>) -> Self {
        Self {
            base_model: base_model.into(),
            edits: Vec::new(),
            scopes: Vec::new(),
            rules: Vec::new(),
        }
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
        let check_edit = |e: &SavedEdit| {
            if e.feature_id.trim().is_empty() {
                return Err(ShareError::Invalid(format!("edit of feature {} has no feature_id", e.index_in_sae)));
            }
            if !e.value.is_finite() || e.value.abs() > 100.0 {
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
            for clause in &rule.clauses {
                if clause.features.is_empty() {
                    return bad("a rule clause names no feature".into());
                }
                if !OPERATORS.contains(&clause.operator.as_str()) {
                    return bad(format!("unknown operator {:?}", clause.operator));
                }
                if !clause.value.is_finite() {
                    return bad("a rule threshold is not a number".into());
                }
            }
            match &rule.then {
                RuleAction::Edits(edits) if edits.is_empty() => return bad("a rule has no edits".into()),
                RuleAction::Edits(edits) => edits.iter().try_for_each(check_edit)?,
                RuleAction::Abort(event) if event.trim().is_empty() => return bad("an abort rule has no event name".into()),
                RuleAction::Abort(_) => {}
            }
        }
        Ok(())
    }

    /// Reads a variant file (this format, or the SDK's edit-only `Variant.json()`).
    pub fn from_json(text: &str) -> Result<Self, ShareError> {
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
                        let features: Vec<Value> = c.features.iter().map(FeatureRef::to_goodfire).collect();
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
        let json = miniz_oxide::inflate::decompress_to_vec_with_limit(deflated, MAX_VARIANT_BYTES)
            .map_err(|_| ShareError::Damaged("the compressed variant does not inflate"))?;
        if Sha256::digest(&json)[..CHECKSUM_BYTES] != *checksum {
            return Err(ShareError::Damaged("checksum mismatch"));
        }
        let text = std::str::from_utf8(&json).map_err(|_| ShareError::Damaged("not UTF-8"))?;
        Self::from_json(text)
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
        assert!(matches!(SavedVariant::from_link(&link), Err(ShareError::Damaged(_))));
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
        // The engine's own reader of controllers accepts it, edits and rules alike.
        let engine = crate::Variant::from_controller("m", &c, 64).unwrap();
        assert!(!engine.is_base());
        assert_eq!(
            engine.to_controller(&crate::FeatureIds::new(&"0".repeat(64)), &|_| String::new())["scopes"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
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
}
