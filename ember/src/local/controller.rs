//! The `controller` of a request (goodfire-api.md §4.5–4.7) as the engine's
//! [`Variant`]: the one conversion from the wire model to the engine's steering.
//!
//! Features are keyed by `index_in_sae`; the `uuid` the SDK echoes back is made from the SAE
//! and index and is otherwise ignored, dashed or not. A `pin` whose value is another
//! feature, and scopes nested deeper than one level, are refused with a clear error (the
//! SDK's `Variant` never produces either). Controllers are written in one place only,
//! [`crate::variant::SavedVariant::to_controller`].

use kindling_engine::steer::{Action, Combine, Comparison, Condition, Edit, Mode, Operand, Operator, Scope, Variant, VariantError};
use serde_json::Value;

/// Reads a `controller` object into a variant of `base_model`, checked against an SAE of
/// `d_sae` latents.
pub fn read_controller(base_model: &str, controller: &Value, d_sae: usize) -> Result<Variant, VariantError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        let v = read_controller("meta-llama/Llama-3.3-70B-Instruct", &controller, 8192).unwrap();
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
        // Unknown ids, pins to features and malformed parts are refused.
        assert!(matches!(
            read_controller("m", &controller, 1),
            Err(VariantError::UnknownFeature { feature: 1, .. })
        ));
        let pin_to_feature =
            json!({"interventions": [{"mode": "pin", "features": {"features": [{"index_in_sae": 3}]}, "value": {"index_in_sae": 4}}]});
        assert!(
            read_controller("m", &pin_to_feature, 10)
                .unwrap_err()
                .to_string()
                .contains("another feature")
        );
        let bad_mode = json!({"interventions": [{"mode": "boost", "features": {"features": [{"index_in_sae": 3}]}, "value": 1}]});
        assert!(read_controller("m", &bad_mode, 10).is_err());
        let bad_scopes = json!({"interventions": [], "scopes": 7});
        assert!(read_controller("m", &bad_scopes, 10).is_err());
    }
}
