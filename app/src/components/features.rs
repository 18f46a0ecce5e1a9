//! Feature search by meaning and by example, and a dashboard card per feature.

use kindling_ember::variant::{EditMode, FeatureRef, SavedEdit};
use leptos::prelude::*;
use serde_json::{Value, json};

use crate::Session;
use crate::logic::{ExampleHit, ExampleReading, shade, visible_token};

/// Adds an edit of `feature` to the variant (or says it is already there).
pub(crate) fn add_edit(session: Session, feature: &FeatureRef, value: f32) {
    let mut added = false;
    session.variant.update(|v| {
        if !v.edits.iter().any(|e| e.feature_id == feature.uuid) {
            v.edits.push(SavedEdit {
                feature_id: feature.uuid.clone(),
                feature_label: feature.label.clone(),
                index_in_sae: feature.index_in_sae,
                value,
                mode: EditMode::Nudge,
            });
            added = true;
        }
    });
    if added {
        session.info(format!("Added an edit of “{}”", feature.label));
    } else {
        session.info(format!("“{}” is already edited", feature.label));
    }
}

/// A search hit.
#[derive(Debug, Clone, PartialEq)]
struct Hit {
    feature: FeatureRef,
    density: Option<f64>,
    histogram: Vec<f64>,
}

/// A tiny bar chart of a histogram, as SVG.
#[component]
pub(crate) fn Sparkline(values: Vec<f64>) -> impl IntoView {
    let max = values.iter().copied().fold(0.0f64, f64::max).max(1e-9);
    let n = values.len().max(1) as f64;
    let bars = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            // Log scale: activation histograms are dominated by their first bins.
            let h = ((1.0 + v).ln() / (1.0 + max).ln() * 20.0).max(0.5);
            view! { <rect x=format!("{:.2}", i as f64 * 60.0 / n) y=format!("{:.2}", 20.0 - h) width=format!("{:.2}", 60.0 / n * 0.8) height=format!("{h:.2}") /> }
        })
        .collect_view();
    view! {
        <svg class="sparkline" viewBox="0 0 60 20" width="60" height="20" role="img" aria-label="activation histogram">
            {bars}
        </svg>
    }
}

/// The search box and its results.
#[component]
pub fn Features() -> impl IntoView {
    let session = crate::use_session();
    let query = RwSignal::new(String::new());
    let hits = RwSignal::new(Vec::<Hit>::new());
    // The features search by example lists: they light up on the map too.
    let example_hits = RwSignal::new(Vec::<u32>::new());
    let searching = RwSignal::new(false);

    let search = move || {
        let q = query.get_untracked().trim().to_string();
        if q.is_empty() {
            return;
        }
        let Some(client) = session.client() else {
            return session.error("The model is not ready yet");
        };
        searching.set(true);
        leptos::task::spawn_local(async move {
            let path = format!(
                "/features/search?query={}&model={}&perPage=20",
                js_sys::encode_uri_component(&q),
                js_sys::encode_uri_component(&client.model())
            );
            match client.get(&path).await {
                Ok(answer) => hits.set({
                    let found: Vec<Hit> = answer["features"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|f| {
                            Some(Hit {
                                feature: crate::feature_ref(f)?,
                                density: f["density"].as_f64(),
                                histogram: f["histogram"]
                                    .as_array()
                                    .map(|h| h.iter().filter_map(Value::as_f64).collect())
                                    .unwrap_or_default(),
                            })
                        })
                        .collect();
                    session.known.update(|k| {
                        for h in &found {
                            if !k.iter().any(|f| f.uuid == h.feature.uuid) {
                                k.push(h.feature.clone());
                            }
                        }
                    });
                    found
                }),
                Err(e) => session.error(format!("Search failed: {e}")),
            }
            searching.set(false);
        });
    };

    view! {
        <form
            class="search"
            role="search"
            on:submit=move |ev| {
                ev.prevent_default();
                search();
            }
        >
            <input data-testid="feature-search" aria-label="Search features by meaning" placeholder="Search features: pirate, French, code…" bind:value=query />
            <button type="submit" data-testid="feature-search-go" disabled=move || searching.get()>
                "Search"
            </button>
        </form>
        <ul class="hits" data-testid="feature-results">
            <For each=move || hits.get() key=|h| h.feature.uuid.clone() let:hit>
                {
                    let feature = hit.feature.clone();
                    let open = feature.clone();
                    view! {
                        <li class="hit" data-testid="feature-hit">
                            <button class="link label" on:click=move |_| session.card.set(Some(open.clone()))>
                                {hit.feature.label.clone()}
                            </button>
                            <span class="meta">
                                {format!("#{}", hit.feature.index_in_sae)}
                                {hit.density.map(|d| format!(" · fires on {:.2}%", d * 100.0))}
                            </span>
                            {(!hit.histogram.is_empty()).then(|| view! { <Sparkline values=hit.histogram.clone() /> })}
                            <button data-testid="add-edit" on:click=move |_| add_edit(session, &feature, 0.5)>
                                "+ Edit"
                            </button>
                        </li>
                    }
                }
            </For>
        </ul>
        <super::map::FeatureMap highlight=Signal::derive(move || {
            let mut lit: Vec<u32> = hits.with(|h| h.iter().map(|hit| hit.feature.index_in_sae).collect());
            lit.extend(example_hits.get());
            lit
        }) />
        <ByExample lit=example_hits />
        <DashboardCard />
    }
}

/// Features that fire on more than this share of tokens are too general to name a text's
/// content (punctuation, the start of a sentence): search by example leaves them out.
const EXAMPLE_MAX_DENSITY: f64 = 0.05;
/// Features listed for an example.
const EXAMPLE_HITS: usize = 12;

/// Search by example: the model reads a text, and the features that fire most on it are
/// listed, with the text's tokens shaded by the chosen one.
#[component]
fn ByExample(
    /// Set to the listed features' indices, for the map.
    lit: RwSignal<Vec<u32>>,
) -> impl IntoView {
    let session = crate::use_session();
    let text = RwSignal::new(String::new());
    let reading = RwSignal::new(ExampleReading::default());
    // Each hit with its label and density, in rank order.
    let hits = RwSignal::new(Vec::<(ExampleHit, FeatureRef, Option<f64>)>::new());
    let chosen = RwSignal::new(None::<u32>);
    let reading_now = RwSignal::new(false);
    let read = move || {
        let example = text.get_untracked().trim().to_string();
        if example.is_empty() {
            return;
        }
        let Some(client) = session.client() else {
            return session.error("The model is not ready yet");
        };
        reading_now.set(true);
        leptos::task::spawn_local(async move {
            let body = json!({ "messages": [{ "role": "user", "content": example }], "model": client.model() });
            match client.post("/chat-attribution/compute-features", body).await {
                Ok(answer) => {
                    let read = ExampleReading::read(&answer, &example);
                    // Labels and densities of the strongest few, in one call.
                    let top: Vec<ExampleHit> = read.hits.iter().take(EXAMPLE_HITS * 3).cloned().collect();
                    let query: Vec<String> = top
                        .iter()
                        .map(|h| format!("feature_id={}", js_sys::encode_uri_component(&h.id)))
                        .collect();
                    let listed = if query.is_empty() {
                        Value::Null
                    } else {
                        client.get(&format!("/features/?{}", query.join("&"))).await.unwrap_or(Value::Null)
                    };
                    let facts: Vec<(FeatureRef, Option<f64>)> = listed["features"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|f| Some((crate::feature_ref(f)?, f["density"].as_f64())))
                        .collect();
                    let named: Vec<(ExampleHit, FeatureRef, Option<f64>)> = top
                        .into_iter()
                        .filter_map(|h| {
                            let (feature, density) = facts.iter().find(|(f, _)| f.index_in_sae == h.index).cloned()?;
                            Some((h, feature, density))
                        })
                        .filter(|(_, _, density)| density.is_none_or(|d| d <= EXAMPLE_MAX_DENSITY))
                        .take(EXAMPLE_HITS)
                        .collect();
                    if named.is_empty() {
                        session.info("No specific feature fires on that text");
                    }
                    session.known.update(|k| {
                        for (_, f, _) in &named {
                            if !k.iter().any(|known| known.uuid == f.uuid) {
                                k.push(f.clone());
                            }
                        }
                    });
                    chosen.set(named.first().map(|(h, _, _)| h.index));
                    lit.set(named.iter().map(|(h, _, _)| h.index).collect());
                    hits.set(named);
                    reading.set(read);
                }
                Err(e) => session.error(format!("Reading the example failed: {e}")),
            }
            reading_now.set(false);
        });
    };
    view! {
        <section class="by-example" aria-label="Search by example">
            <h3>"Search by example"</h3>
            <form on:submit=move |ev| {
                ev.prevent_default();
                read();
            }>
                <textarea
                    data-testid="example-text"
                    aria-label="Example text"
                    placeholder="Paste or type a text: the features that fire most on it are listed"
                    prop:value=move || text.get()
                    on:input=move |ev| text.set(event_target_value(&ev))
                ></textarea>
                <button type="submit" data-testid="example-go" disabled=move || reading_now.get()>
                    {move || if reading_now.get() { "Reading…" } else { "Find its features" }}
                </button>
            </form>
            <p class="example-tokens" data-testid="example-tokens">
                {move || {
                    let feature = chosen.get();
                    feature
                        .map(|f| reading.with(|r| r.shaded(f)))
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(t, a)| view! { <span class="tok" style=shade(a) title=format!("{a:.2}")>{visible_token(&t)}</span> })
                        .collect_view()
                }}
            </p>
            <ul class="hits" data-testid="example-hits">
                {move || {
                    hits.get()
                        .into_iter()
                        .map(|(hit, feature, density)| {
                            let (open, edit) = (feature.clone(), feature.clone());
                            let index = hit.index;
                            view! {
                                <li class="hit" data-testid="example-hit" class:chosen=move || chosen.get() == Some(index)>
                                    <button class="link label" on:click=move |_| {
                                        chosen.set(Some(index));
                                        session.card.set(Some(open.clone()));
                                    }>{feature.label.clone()}</button>
                                    <span class="meta">
                                        {format!("#{index} · peak {:.2} on {} token{}", hit.peak, hit.tokens, if hit.tokens == 1 { "" } else { "s" })}
                                        {density.map(|d| format!(" · fires on {:.2}%", d * 100.0))}
                                    </span>
                                    <button data-testid="add-edit" on:click=move |_| add_edit(session, &edit, 0.5)>"+ Edit"</button>
                                </li>
                            }
                        })
                        .collect_view()
                }}
            </ul>
        </section>
    }
}

/// The open feature's card: what the atlas knows of it.
#[component]
fn DashboardCard() -> impl IntoView {
    let session = crate::use_session();
    let card = LocalResource::new(move || {
        let feature = session.card.get();
        let client = session.client.get();
        async move {
            let (feature, client) = (feature?, client?);
            let body = json!({ "feature_id": feature.uuid, "model": client.model() });
            Some(client.post("/features/dashboard", body).await.map_err(|e| e.to_string()))
        }
    });
    move || {
        card.get().flatten().map(|answer| match answer {
            Err(e) => view! { <div class="card error">"No dashboard for this feature: " {e}</div> }.into_any(),
            Ok(d) => dashboard_view(session, d).into_any(),
        })
    }
}

fn dashboard_view(session: Session, d: Value) -> impl IntoView {
    let feature = crate::feature_ref(&d["feature"]);
    let tokens = |list: &Value| -> Vec<String> {
        list.as_array()
            .into_iter()
            .flatten()
            .take(10)
            .filter_map(|t| t["token"].as_str().map(visible_token))
            .collect()
    };
    let promoted = tokens(&d["promoted"]).join("  ");
    let suppressed = tokens(&d["suppressed"]).join("  ");
    let histogram: Vec<f64> = d["histogram"].as_array().into_iter().flatten().filter_map(Value::as_f64).collect();
    let contexts: Vec<Value> = d["contexts"].as_array().cloned().unwrap_or_default().into_iter().take(6).collect();
    let neighbors: Vec<FeatureRef> = d["neighbors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(crate::feature_ref)
        .collect();
    let add = feature.clone();
    view! {
        <article class="card" data-testid="dashboard">
            <header>
                <h3>{feature.as_ref().map(|f| f.label.clone()).unwrap_or_default()}</h3>
                <button class="close" aria-label="Close card" on:click=move |_| session.card.set(None)>
                    "×"
                </button>
            </header>
            <p class="meta">
                {feature.as_ref().map(|f| format!("#{} · ", f.index_in_sae))}
                {format!("fires on {:.2}% of tokens", d["density"].as_f64().unwrap_or(0.0) * 100.0)}
                {d["label_score"].as_f64().map(|s| format!(" · label accuracy {s:.2}"))}
            </p>
            <Sparkline values=histogram />
            <p>
                <strong>"Promotes: "</strong>
                <span class="tokens">{promoted}</span>
            </p>
            <p>
                <strong>"Suppresses: "</strong>
                <span class="tokens">{suppressed}</span>
            </p>
            <h4>"Top contexts"</h4>
            <ol class="contexts">
                {contexts
                    .into_iter()
                    .map(|c| {
                        let acts: Vec<f32> = c["activations"].as_array().into_iter().flatten().map(|a| a.as_f64().unwrap_or(0.0) as f32).collect();
                        let pieces: Vec<String> = c["tokens"].as_array().into_iter().flatten().map(|t| t.as_str().unwrap_or_default().to_string()).collect();
                        view! {
                            <li class="context">
                                {pieces
                                    .into_iter()
                                    .zip(acts)
                                    .map(|(t, a)| view! { <span class="tok" style=shade(a) title=format!("{a:.2}")>{visible_token(&t)}</span> })
                                    .collect_view()}
                            </li>
                        }
                    })
                    .collect_view()}
            </ol>
            <h4>"Neighbours"</h4>
            <ul class="neighbors">
                {neighbors
                    .into_iter()
                    .map(|n| {
                        let label = n.label.clone();
                        view! {
                            <li>
                                <button class="link" on:click=move |_| session.card.set(Some(n.clone()))>
                                    {label}
                                </button>
                            </li>
                        }
                    })
                    .collect_view()}
            </ul>
            {add.map(|f| view! { <button on:click=move |_| add_edit(session, &f, 0.5)>"+ Edit this feature"</button> })}
        </article>
    }
}
