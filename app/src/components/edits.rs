//! Edits: a slider per edited feature, AutoSteer from a description, and Contrast between
//! two chat datasets.

use kindling_ember::Route;
use kindling_ember::neuronpedia;
use kindling_ember::units::{BREAKS_FROM, StrengthZone, VISIBLE_FROM};
use kindling_ember::variant::{EditMode, SavedEdit};
use leptos::prelude::*;

use crate::logic::{TrialRow, parse_dataset};
use serde_json::{Value, json};

use super::features::add_edit;

/// The slider's track, coloured by zone on both sides of zero: grey where replies barely
/// change, green where steering is clear, amber where text may break (kindling_ember::units::StrengthZone).
fn zone_track() -> String {
    // Positions on a -1..1 track, in percent.
    let at = |v: f32| 50.0 + 50.0 * v.clamp(-1.0, 1.0);
    let (grey, green, amber) = ("#d9d9d9", "#8fd18f", "#f0b35a");
    format!(
        "background: linear-gradient(to right, {amber} 0%, {amber} {a}%, {green} {a}%, {green} {b}%, {grey} {b}%, {grey} {c}%, {green} {c}%, {green} {d}%, {amber} {d}%, {amber} 100%)",
        a = at(-BREAKS_FROM),
        b = at(-VISIBLE_FROM),
        c = at(VISIBLE_FROM),
        d = at(BREAKS_FROM),
    )
}

/// The sliders of the variant's edits.
#[component]
pub fn Edits() -> impl IntoView {
    let session = crate::use_session();
    let edits = move || session.variant.with(|v| v.edits.clone());
    let set = move |uuid: String, f: Box<dyn Fn(&mut SavedEdit)>| {
        session.variant.update(|v| {
            if let Some(e) = v.edits.iter_mut().find(|e| e.feature_id == uuid) {
                f(e)
            }
        })
    };

    view! {
        <section class="edits" aria-label="Edits">
            <h2>"Edits"</h2>
            <Show when=move || session.variant.with(|v| v.edits.is_empty())>
                <p class="hint">"No edits: search features and press “+ Edit”, or use AutoSteer below."</p>
            </Show>
            <ul class="sliders">
                // Keyed by label too: a shared variant's labels are replaced by the atlas's.
                <For each=edits key=|e| (e.feature_id.clone(), e.feature_label.clone()) let:edit>
                    {
                        let (id_value, id_mode, id_remove) = (edit.feature_id.clone(), edit.feature_id.clone(), edit.feature_id.clone());
                        let watched = edit.feature_id.clone();
                        let current = Memo::new(move |_| session.variant.with(|v| v.edits.iter().find(|e| e.feature_id == watched).map(|e| (e.value, e.mode))));
                        let value = move || current.get().map_or(0.0, |c| c.0);
                        view! {
                            <li class="slider" data-testid="edit">
                                <label>
                                    <span class="label">{edit.feature_label.clone()}</span>
                                    <input
                                        type="range"
                                        min="-1"
                                        max="1"
                                        step="0.05"
                                        class="zoned"
                                        style=zone_track()
                                        title=format!("clear steering from ±{VISIBLE_FROM:.2}; from ±{BREAKS_FROM:.2} text may break")
                                        data-testid="edit-slider"
                                        prop:value=move || value().to_string()
                                        on:input=move |ev| {
                                            if let Ok(x) = event_target_value(&ev).parse::<f32>() {
                                                set(id_value.clone(), Box::new(move |e| e.value = x));
                                            }
                                        }
                                    />
                                </label>
                                <output data-testid="edit-value">{move || format!("{:+.2}", value())}</output>
                                <span class="zone" data-testid="edit-zone">
                                    {move || if current.get().is_some_and(|c| c.1 == EditMode::Pin) { "pin" } else { StrengthZone::of(value()).describe() }}
                                </span>
                                <select
                                    aria-label="Mode"
                                    prop:value=move || if current.get().is_some_and(|c| c.1 == EditMode::Pin) { "pin" } else { "nudge" }
                                    on:change=move |ev| {
                                        let mode = if event_target_value(&ev) == "pin" { EditMode::Pin } else { EditMode::Nudge };
                                        set(id_mode.clone(), Box::new(move |e| e.mode = mode));
                                    }
                                >
                                    <option value="nudge">"nudge"</option>
                                    <option
                                        value="pin"
                                        disabled=move || session.client.with(|c| c.as_ref().is_some_and(|c| c.neuronpedia().is_some()))
                                        title=move || session.client.with(|c| c.as_ref().and_then(|c| c.neuronpedia()).map(|_| PIN_ON_NEURONPEDIA.to_string()).unwrap_or_default())
                                    >
                                        "pin"
                                    </option>
                                </select>
                                <Conversion index=edit.index_in_sae value=Signal::derive(value) />
                                <button
                                    aria-label="Remove edit"
                                    on:click=move |_| session.variant.update(|v| v.edits.retain(|e| e.feature_id != id_remove))
                                >
                                    "Remove"
                                </button>
                            </li>
                        }
                    }
                </For>
            </ul>
            <button data-testid="reset-edits" on:click=move |_| session.variant.update(|v| v.edits.clear())>
                "Reset edits"
            </button>
        </section>
        <AutoSteer />
        <Contrast />
    }
}

/// Why pin is greyed out on Neuronpedia.
const PIN_ON_NEURONPEDIA: &str =
    "Neuronpedia adds a feature's decoder direction (SIMPLE_ADDITIVE): it cannot hold an activation at a value, so edits there are nudges";

/// On Neuronpedia: the raw coefficient an edit is sent as, through the feature's
/// `maxActApprox` (fetched once per feature and kept by the provider).
#[component]
fn Conversion(index: u32, value: Signal<f32>) -> impl IntoView {
    let session = crate::use_session();
    let max_act = LocalResource::new(move || {
        let remote = session.client.with(|c| c.as_ref().and_then(|c| c.neuronpedia()));
        async move {
            let remote = remote?;
            let facts = remote.facts(&[index]).await.ok()?;
            Some(facts.get(&index)?.max_act)
        }
    });
    move || {
        max_act.get().flatten().map(|max_act| {
            let v = value.get();
            let text = match max_act {
                Some(m) => format!(
                    "on Neuronpedia: strength {:.1} = {v:+.2} × {} × maxActApprox {m:.2}",
                    neuronpedia::coefficient(v, m),
                    neuronpedia::MAX_ACTS_PER_UNIT
                ),
                None => format!(
                    "on Neuronpedia: strength {:.1} = {v:+.2} × {} × 40 (no maxActApprox: Neuronpedia's own default)",
                    neuronpedia::coefficient(v, neuronpedia::FALLBACK_MAX_ACT),
                    neuronpedia::MAX_ACTS_PER_UNIT
                ),
            };
            view! { <span class="conversion" data-testid="edit-conversion">{text}</span> }
        })
    }
}

/// AutoSteer: a description of the behaviour → edits.
#[component]
fn AutoSteer() -> impl IntoView {
    let session = crate::use_session();
    let spec = RwSignal::new(String::new());
    let running = RwSignal::new(false);
    // What the last run tried, best first (the engine's `trials`), and what it chose.
    let tried = RwSignal::new(Vec::<Value>::new());
    let chosen = RwSignal::new(Value::Null);
    // The step the search is at, as the engine tells it; and which run is current (a stopped
    // run's answer, should one still come, is not applied).
    let step = RwSignal::new(String::new());
    let run_id = StoredValue::new(0u64);
    let stop = move || {
        run_id.update_value(|r| *r += 1);
        running.set(false);
        step.set(String::new());
        match session.restart_engine.get_value() {
            // The in-page worker hears nothing while it searches: it is restarted (the model
            // reloads from this browser's cache in a few seconds).
            Some(restart)
                if session
                    .client
                    .with_untracked(|c| matches!(c, Some(crate::client::Client::Local(..)))) =>
            {
                restart();
                session.info("AutoSteer stopped: the in-page engine restarts (a few seconds)");
            }
            _ => session.info("AutoSteer stopped: its answer will be ignored"),
        }
    };
    let run = move || {
        let specification = spec.get_untracked().trim().to_string();
        let Some(client) = session.client() else {
            return session.error("The model is not ready yet");
        };
        if specification.is_empty() {
            return;
        }
        running.set(true);
        tried.set(Vec::new());
        step.set("starting…".into());
        run_id.update_value(|r| *r += 1);
        let this_run = run_id.get_value();
        session.info("AutoSteer is trying edits (this takes a while)…");
        leptos::task::spawn_local(async move {
            let body = json!({ "specification": specification, "model": client.model() });
            let on_step: crate::client::OnStep = std::rc::Rc::new(move |n, of, what| {
                if run_id.get_value() == this_run {
                    step.set(format!("Step {n} of {of}: {what}"));
                }
            });
            let answer = client.post_with_steps("/features/auto-edits", body, on_step).await;
            if run_id.get_value() != this_run {
                // Stopped (or superseded) meanwhile.
                return;
            }
            step.set(String::new());
            match answer {
                Ok(answer) => {
                    tried.set(answer["trials"].as_array().cloned().unwrap_or_default());
                    chosen.set(answer["edits"].clone());
                    let pairs: Vec<(Value, f32)> = answer["edits"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|pair| Some((pair[0].clone(), pair[1].as_f64()? as f32)))
                        .collect();
                    if pairs.is_empty() {
                        session.info("AutoSteer found no edits for that description");
                    }
                    for (feature, value) in pairs {
                        if let Some(f) = crate::feature_ref(&feature) {
                            session.variant.update(|v| v.edits.retain(|e| e.feature_id != f.uuid));
                            add_edit(session, &f, value.clamp(-1.0, 1.0));
                        }
                    }
                }
                Err(e) => session.error(format!("AutoSteer failed: {e}")),
            }
            running.set(false);
        });
    };
    view! {
        <section class="autosteer" aria-label="AutoSteer">
            <h2>"AutoSteer"</h2>
            <form on:submit=move |ev| {
                ev.prevent_default();
                run();
            }>
                <input data-testid="autosteer" placeholder="Describe the behaviour: talk like a pirate" bind:value=spec />
                <button type="submit" disabled=move || running.get()>
                    {move || if running.get() { "Working…" } else { "AutoSteer" }}
                </button>
                <button type="button" data-testid="autosteer-stop" disabled=move || !running.get() on:click=move |_| stop()>
                    "Stop"
                </button>
            </form>
            <Show when=move || running.get()>
                <p class="progress" data-testid="autosteer-progress" role="status">
                    {move || step.get()}
                </p>
            </Show>
            <Show when=move || session.client.with(|c| c.as_ref().is_some_and(|c| c.neuronpedia().is_some()))>
                <p class="hint" data-testid="autosteer-note">
                    "On Neuronpedia, AutoSteer is search-based: it takes the feature whose explanation best matches the description (Neuronpedia's explanation search) at a strength of its maxActApprox (0.20 here), as Neuronpedia's own steering page does. It measures nothing; the effect column is the search's similarity."
                </p>
            </Show>
            <Show when=move || !tried.get().is_empty()>
                <Trials tried=tried chosen=chosen />
            </Show>
        </section>
    }
}

/// AutoSteer's trials as a table: each setting, its effect and coherence, and why it was or
/// wasn't chosen. Hovering a row shows the reply it produced.
#[component]
fn Trials(tried: RwSignal<Vec<Value>>, chosen: RwSignal<Value>) -> impl IntoView {
    let rows = move || {
        let chosen = chosen.get();
        tried
            .get()
            .into_iter()
            .map(|t| {
                let row = TrialRow::from_json(&t, &chosen);
                view! {
                    <tr data-testid="autosteer-trial" class:chosen=row.chosen title=row.sample>
                        <td>{row.features}</td>
                        <td>{row.strengths}</td>
                        <td>{format!("{:+.1}", row.effect)}</td>
                        <td>{row.perplexity}</td>
                        <td>{format!("{:.2}", row.distinct)}</td>
                        <td>{row.verdict}</td>
                    </tr>
                }
            })
            .collect_view()
    };
    view! {
        <table class="autosteer-trials" data-testid="autosteer-trials">
            <caption>
                "What AutoSteer tried, best first. Effect: the concept's words per 100 tokens above the plain replies "
                "(plus 30 × the gain in meaning similarity to the description). "
                "Coherence: the base model's perplexity of the steered replies over that of its own (at most 2.5×), "
                "and their share of distinct word pairs (at least 0.6). Hover a row to read its reply."
            </caption>
            <thead>
                <tr>
                    <th>"Feature"</th>
                    <th>"Strength"</th>
                    <th>"Effect"</th>
                    <th>"Perplexity ×"</th>
                    <th>"Distinct"</th>
                    <th>"Verdict"</th>
                </tr>
            </thead>
            <tbody>{rows}</tbody>
        </table>
    }
}

/// Contrast: features that tell two chat datasets apart.
#[component]
fn Contrast() -> impl IntoView {
    let session = crate::use_session();
    let first = RwSignal::new(String::from("user: Tell me about the sea.\nassistant: The sea is vast and deep."));
    let second = RwSignal::new(String::from(
        "user: Tell me about the sea.\nassistant: Arr, the sea be me home, matey!",
    ));
    let found = RwSignal::new(Vec::<(String, Value)>::new());
    let running = RwSignal::new(false);
    let run = move || {
        let Some(client) = session.client() else {
            return session.error("The model is not ready yet");
        };
        let (a, b) = match (parse_dataset(&first.get_untracked()), parse_dataset(&second.get_untracked())) {
            (Ok(a), Ok(b)) if a.len() == b.len() && !a.is_empty() => (a, b),
            (Ok(_), Ok(_)) => return session.error("Both datasets need the same number of conversations (at least one)"),
            (Err(e), _) | (_, Err(e)) => return session.error(e),
        };
        running.set(true);
        leptos::task::spawn_local(async move {
            let body = json!({ "dataset_1": a, "dataset_2": b, "model": client.model(), "k_to_add": 5, "k_to_remove": 5 });
            match client.post("/chat-attribution/contrast", body).await {
                Ok(answer) => {
                    let mut list = Vec::new();
                    for (key, side) in [("dataset_2_features", "add"), ("dataset_1_features", "remove")] {
                        for f in answer[key].as_array().into_iter().flatten() {
                            list.push((side.to_string(), f.clone()));
                        }
                    }
                    found.set(list);
                }
                Err(e) => session.error(format!("Contrast failed: {e}")),
            }
            running.set(false);
        });
    };
    view! {
        <section class="contrast" aria-label="Contrast">
            <h2>"Contrast"</h2>
            <p class="hint">"Conversations separated by blank lines; lines start with “user:” or “assistant:”."</p>
            <div class="datasets">
                <label>
                    "Dataset 1 (less of this)"
                    <textarea data-testid="contrast-1" prop:value=move || first.get() on:input=move |ev| first.set(event_target_value(&ev))></textarea>
                </label>
                <label>
                    "Dataset 2 (more of this)"
                    <textarea data-testid="contrast-2" prop:value=move || second.get() on:input=move |ev| second.set(event_target_value(&ev))></textarea>
                </label>
            </div>
            <super::Unavailable route=Route::Contrast what="Contrast" />
            <button on:click=move |_| run() disabled=move || running.get() || session.limitation(Route::Contrast).is_some()>
                "Contrast"
            </button>
            <ul class="hits">
                {move || {
                    found
                        .get()
                        .into_iter()
                        .filter_map(|(side, f)| {
                            let feature = crate::feature_ref(&f)?;
                            let value = if side == "add" { 0.5 } else { -0.3 };
                            let label = feature.label.clone();
                            Some(view! {
                                <li class="hit">
                                    <span class="meta">{side.clone()}</span>
                                    <span class="label">{label}</span>
                                    <button on:click=move |_| add_edit(session, &feature, value)>{format!("+ Edit {value:+}")}</button>
                                </li>
                            })
                        })
                        .collect_view()
                }}
            </ul>
        </section>
    }
}
