//! Conditional rules: IF feature clauses (AND/OR) THEN edits or ABORT, built by hand or by
//! AutoConditional from a description.

use kindling_ember::Route;
use kindling_ember::variant::{Clause, EditMode, FeatureRef, Rule, RuleAction, SavedEdit};
use leptos::prelude::*;
use serde_json::json;

const OPERATORS: [&str; 6] = [">", ">=", "<", "<=", "==", "!="];

/// A select of the features the session knows (edited, searched or opened).
#[component]
pub(crate) fn FeaturePicker(
    /// The chosen feature.
    chosen: RwSignal<Option<FeatureRef>>,
    /// For tests and screen readers.
    label: &'static str,
) -> impl IntoView {
    let session = crate::use_session();
    let known = move || {
        let mut list: Vec<FeatureRef> = session.variant.with(|v| v.edits.iter().map(SavedEdit::feature).collect());
        for f in session.known.get() {
            if !list.iter().any(|k| k.uuid == f.uuid) {
                list.push(f);
            }
        }
        list
    };
    view! {
        <select
            aria-label=label
            data-testid=label
            on:change=move |ev| {
                let uuid = event_target_value(&ev);
                chosen.set(known().into_iter().find(|f| f.uuid == uuid));
            }
        >
            <option value="" selected=move || chosen.get().is_none()>
                "(choose a feature)"
            </option>
            {move || {
                known()
                    .into_iter()
                    .map(|f| {
                        let selected = chosen.get().is_some_and(|c| c.uuid == f.uuid);
                        view! {
                            <option value=f.uuid.clone() selected=selected>
                                {format!("{} (#{})", f.label, f.index_in_sae)}
                            </option>
                        }
                    })
                    .collect_view()
            }}
        </select>
    }
}

/// The rule builder and the variant's rules.
#[component]
pub fn Rules() -> impl IntoView {
    let session = crate::use_session();
    let next_id = StoredValue::new(1usize);
    let new_clause = move || {
        let id = next_id.get_value();
        next_id.set_value(id + 1);
        (
            id,
            RwSignal::new(None::<FeatureRef>),
            RwSignal::new(String::from(">")),
            RwSignal::new(String::from("0.5")),
        )
    };
    let clauses = RwSignal::new(vec![new_clause()]);
    let combine = RwSignal::new(String::from("AND"));
    let action = RwSignal::new(String::from("edit"));
    let then_feature = RwSignal::new(None::<FeatureRef>);
    let then_value = RwSignal::new(String::from("0.5"));
    let event = RwSignal::new(String::from("abort"));
    let description = RwSignal::new(String::new());
    let thinking = RwSignal::new(false);

    let build = move || -> Result<Rule, String> {
        let mut built = Vec::new();
        for (_, feature, operator, threshold) in clauses.get_untracked() {
            let feature = feature.get_untracked().ok_or("Choose a feature for every IF clause")?;
            let value: f32 = threshold
                .get_untracked()
                .trim()
                .parse()
                .ok()
                .filter(|v: &f32| v.is_finite())
                .ok_or("Thresholds must be numbers")?;
            built.push(Clause {
                features: vec![feature],
                operator: operator.get_untracked(),
                value,
            });
        }
        let then = if action.get_untracked() == "abort" {
            let name = event.get_untracked().trim().to_string();
            if name.is_empty() {
                return Err("Give the abort rule an event name".into());
            }
            RuleAction::Abort(name)
        } else {
            let f = then_feature.get_untracked().ok_or("Choose the feature the rule edits")?;
            let value: f32 = then_value
                .get_untracked()
                .trim()
                .parse()
                .map_err(|_| "The edit value must be a number")?;
            RuleAction::Edits(vec![SavedEdit {
                feature_id: f.uuid,
                feature_label: f.label,
                index_in_sae: f.index_in_sae,
                value: value.clamp(-1.0, 1.0),
                mode: EditMode::Nudge,
            }])
        };
        Ok(Rule {
            combine: combine.get_untracked(),
            clauses: built,
            then,
        })
    };

    let add_rule = move || match build() {
        Ok(rule) => {
            session.variant.update(|v| v.rules.push(rule));
            session.info("Rule added to the variant");
        }
        Err(e) => session.error(e),
    };

    let auto = move || {
        let Some(client) = session.client() else {
            return session.error("The model is not ready yet");
        };
        let specification = description.get_untracked().trim().to_string();
        if specification.is_empty() {
            return;
        }
        thinking.set(true);
        leptos::task::spawn_local(async move {
            let body = json!({ "specification": specification, "model": client.model() });
            match client.post("/features/auto-conditional", body).await {
                Ok(answer) => {
                    let group = &answer["conditional"];
                    let mut filled = Vec::new();
                    for c in group["conditionals"].as_array().into_iter().flatten() {
                        let Some(feature) = c["left_hand"]["features"].get(0).and_then(crate::feature_ref) else {
                            continue;
                        };
                        session.known.update(|k| k.push(feature.clone()));
                        let (id, f, op, th) = new_clause();
                        f.set(Some(feature));
                        op.set(c["operator"].as_str().unwrap_or(">").to_string());
                        th.set(c["right_hand"].as_f64().map_or("0.5".into(), |v| format!("{v}")));
                        filled.push((id, f, op, th));
                    }
                    if filled.is_empty() {
                        session.info("AutoConditional found no condition for that description");
                    } else {
                        combine.set(group["operator"].as_str().unwrap_or("AND").to_string());
                        clauses.set(filled);
                    }
                }
                Err(e) => session.error(format!("AutoConditional failed: {e}")),
            }
            thinking.set(false);
        });
    };

    // A remote without rules (Neuronpedia) greys the whole builder out and says why.
    let unavailable = move || session.limitation(Route::AutoConditional).is_some();
    view! {
        <section class="rules" class:greyed=unavailable aria-label="Rules">
            <h2>"Rules"</h2>
            <super::Unavailable route=Route::AutoConditional what="Rules (set_when, abort_when) and AutoConditional" />
            <form class="auto" on:submit=move |ev| {
                ev.prevent_default();
                auto();
            }>
                <input data-testid="autoconditional" placeholder="When… (describe a condition): the user talks about food" bind:value=description />
                <button type="submit" disabled=move || thinking.get() || unavailable()>
                    "AutoConditional"
                </button>
            </form>
            <div class="builder" data-testid="rule-builder">
                <For each=move || clauses.get() key=|c| c.0 let:clause>
                    {
                        let (id, feature, operator, threshold) = clause;
                        view! {
                            <div class="clause">
                                <span>"IF"</span>
                                <FeaturePicker chosen=feature label="rule-feature" />
                                <select aria-label="Operator" data-testid="rule-operator" prop:value=move || operator.get() on:change=move |ev| operator.set(event_target_value(&ev))>
                                    {OPERATORS.map(|o| view! { <option value=o>{o}</option> })}
                                </select>
                                <input class="narrow" aria-label="Threshold" data-testid="rule-threshold" bind:value=threshold />
                                <button aria-label="Remove clause" on:click=move |_| clauses.update(|c| c.retain(|x| x.0 != id))>
                                    "−"
                                </button>
                            </div>
                        }
                    }
                </For>
                <div class="row">
                    <button on:click=move |_| clauses.update(|c| c.push(new_clause()))>"+ Clause"</button>
                    <label>
                        "combine with "
                        <select prop:value=move || combine.get() on:change=move |ev| combine.set(event_target_value(&ev))>
                            <option value="AND">"AND"</option>
                            <option value="OR">"OR"</option>
                        </select>
                    </label>
                </div>
                <div class="row">
                    <span>"THEN"</span>
                    <select data-testid="rule-action" prop:value=move || action.get() on:change=move |ev| action.set(event_target_value(&ev))>
                        <option value="edit">"edit"</option>
                        <option value="abort">"abort"</option>
                    </select>
                    <Show
                        when=move || action.get() == "abort"
                        fallback=move || {
                            view! {
                                <FeaturePicker chosen=then_feature label="rule-then-feature" />
                                <input class="narrow" aria-label="Edit value" data-testid="rule-then-value" bind:value=then_value />
                            }
                        }
                    >
                        <input aria-label="Event name" data-testid="rule-event-name" bind:value=event />
                    </Show>
                </div>
                <button data-testid="add-rule" disabled=unavailable on:click=move |_| add_rule()>
                    "Add rule"
                </button>
            </div>
            <ol class="rule-list" data-testid="rules">
                {move || {
                    session
                        .variant
                        .get()
                        .rules
                        .iter()
                        .enumerate()
                        .map(|(i, r)| {
                            let text = describe(r);
                            view! {
                                <li>
                                    <span>{text}</span>
                                    <button aria-label="Remove rule" on:click=move |_| session.variant.update(|v| drop(v.rules.remove(i)))>
                                        "Remove"
                                    </button>
                                </li>
                            }
                        })
                        .collect_view()
                }}
            </ol>
        </section>
    }
}

/// A rule in words: `IF pirate > 0.5 AND … THEN food +0.50`.
pub(crate) fn describe(rule: &Rule) -> String {
    let clauses: Vec<String> = rule
        .clauses
        .iter()
        .map(|c| {
            let names: Vec<&str> = c.features.iter().map(|f| f.label.as_str()).collect();
            format!("{} {} {}", names.join(" | "), c.operator, c.value)
        })
        .collect();
    let then = match &rule.then {
        RuleAction::Edits(edits) => edits
            .iter()
            .map(|e| format!("{} {:+.2}", e.feature_label, e.value))
            .collect::<Vec<_>>()
            .join(", "),
        RuleAction::Abort(event) => format!("ABORT “{event}”"),
    };
    format!("IF {} THEN {then}", clauses.join(&format!(" {} ", rule.combine)))
}
