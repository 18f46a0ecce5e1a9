//! Inspect: the last conversation's tokens shaded by a feature's activation, each token's top
//! features, next-token logits, and an export of the activations.

use kindling_ember::Route;
use kindling_ember::variant::FeatureRef;
use leptos::prelude::*;
use serde_json::{Value, json};

use crate::components::rules::FeaturePicker;
use crate::logic::{shade, visible_token};

/// One token and its active features (index, id, activation in max-activation units).
type Token = crate::logic::TokenFeatures;

fn tokens_of(answer: &Value) -> Vec<Token> {
    crate::logic::token_features(answer)
}

/// The inspector.
#[component]
pub fn Inspect() -> impl IntoView {
    let session = crate::use_session();
    let raw = RwSignal::new(None::<Value>);
    let tokens = RwSignal::new(Vec::<Token>::new());
    let picked = RwSignal::new(None::<FeatureRef>);
    let clicked = RwSignal::new(None::<usize>);
    let logits = RwSignal::new(Vec::<(String, f64)>::new());
    let working = RwSignal::new(false);

    let inspect = move || {
        let Some(client) = session.client() else {
            return session.error("The model is not ready yet");
        };
        let conversation = session.conversation.get_untracked();
        if conversation.is_empty() {
            return session.error("Chat first: the inspector reads the last conversation");
        }
        let messages: Vec<Value> = conversation
            .iter()
            .map(|(role, content)| json!({ "role": role, "content": content }))
            .collect();
        // Neuronpedia reads the unsteered model only: its overlay is of the plain model (the
        // panel says so), and its logits are greyed out.
        let remote = client.neuronpedia().is_some();
        let controller = if remote { None } else { session.controller() };
        let logits_unavailable = client.limitation(Route::ComputeLogits).is_some();
        working.set(true);
        leptos::task::spawn_local(async move {
            let mut body = json!({ "messages": messages, "model": client.model() });
            if let Some(c) = &controller {
                body["controller"] = c.clone();
            }
            match client.post("/chat-attribution/compute-features", body.clone()).await {
                Ok(answer) => {
                    tokens.set(tokens_of(&answer));
                    raw.set(Some(answer));
                    clicked.set(None);
                }
                Err(e) => session.error(format!("Inspect failed: {e}")),
            }
            body["top_k"] = json!(10);
            if logits_unavailable {
                logits.set(Vec::new());
                working.set(false);
                return;
            }
            match client.post("/chat-attribution/compute-logits", body).await {
                Ok(answer) => logits.set(
                    answer["logits"]
                        .as_object()
                        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(0.0))).collect())
                        .unwrap_or_default(),
                ),
                Err(e) => session.error(format!("Logits failed: {e}")),
            }
            working.set(false);
        });
    };

    let export = move || {
        if let Some(answer) = raw.get_untracked() {
            super::variant::download(
                "kindling-activations.json",
                &serde_json::to_string_pretty(&answer).unwrap_or_default(),
            );
        }
    };

    // A token's shade: the picked feature's activation, else its strongest feature's.
    let level = move |t: &Token| -> f32 {
        match picked.get() {
            Some(f) => t.features.iter().find(|(i, _, _)| *i == f.index_in_sae).map_or(0.0, |x| x.2),
            None => t.features.first().map_or(0.0, |x| x.2),
        }
    };

    view! {
        <section class="inspect" aria-label="Inspect">
            <h2>"Inspect"</h2>
            <div class="row">
                <button data-testid="inspect" on:click=move |_| inspect() disabled=move || working.get()>
                    "Inspect the last conversation"
                </button>
                <FeaturePicker chosen=picked label="overlay-feature" />
                <button on:click=move |_| export() disabled=move || raw.get().is_none()>
                    "Export activations"
                </button>
            </div>
            <p class="hint">"Tokens are shaded by the chosen feature (or each token's strongest one). Click a token for its top features."</p>
            <Show when=move || session.client.with(|c| c.as_ref().is_some_and(|c| c.neuronpedia().is_some()))>
                <p class="hint" data-testid="overlay-unsteered">
                    "Neuronpedia reads the conversation's text on the unsteered model (its top 10 features per token, those firing on at most 1% of tokens), so the variant's edits do not show here."
                </p>
            </Show>
            <div class="overlay" data-testid="overlay">
                {move || {
                    tokens
                        .get()
                        .iter()
                        .enumerate()
                        .map(|(i, t)| {
                            let a = level(t);
                            view! {
                                <button
                                    class="tok"
                                    class:selected=move || clicked.get() == Some(i)
                                    data-testid="overlay-token"
                                    data-activation=format!("{a:.3}")
                                    style=shade(a)
                                    title=format!("{a:.2}")
                                    on:click=move |_| clicked.set(Some(i))
                                >
                                    {visible_token(&t.text)}
                                </button>
                            }
                        })
                        .collect_view()
                }}
            </div>
            <TokenFeatures tokens=tokens clicked=clicked />
            <h3>"Next-token logits"</h3>
            <super::Unavailable route=Route::ComputeLogits what="Next-token logits" />
            <ol class="logits" data-testid="logits">
                {move || {
                    let list = logits.get();
                    let top = list.first().map_or(1.0, |x| x.1);
                    let bottom = list.last().map_or(0.0, |x| x.1);
                    list.into_iter()
                        .map(|(token, logit)| {
                            let width = if top > bottom { 10.0 + 90.0 * (logit - bottom) / (top - bottom) } else { 100.0 };
                            view! {
                                <li>
                                    <span class="tok">{visible_token(&token)}</span>
                                    <span class="bar" style=format!("width: {width:.0}%")></span>
                                    <span class="meta">{format!("{logit:.2}")}</span>
                                </li>
                            }
                        })
                        .collect_view()
                }}
            </ol>
        </section>
    }
}

/// The clicked token's strongest features, with their labels.
#[component]
fn TokenFeatures(tokens: RwSignal<Vec<Token>>, clicked: RwSignal<Option<usize>>) -> impl IntoView {
    let session = crate::use_session();
    let labelled = LocalResource::new(move || {
        let token = clicked.get().and_then(|i| tokens.with(|t| t.get(i).cloned()));
        let client = session.client.get();
        async move {
            let (token, client) = (token?, client?);
            let top: Vec<(u32, String, f32)> = token.features.into_iter().take(8).collect();
            let query: Vec<String> = top
                .iter()
                .map(|(_, id, _)| format!("feature_id={}", js_sys::encode_uri_component(id)))
                .collect();
            let labels = client.get(&format!("/features/?{}", query.join("&"))).await.ok();
            let label = |id: &str| -> String {
                labels
                    .as_ref()
                    .and_then(|l| l["features"].as_array())
                    .and_then(|l| l.iter().find(|f| crate::feature_ref(f).is_some_and(|f| f.uuid == id)))
                    .and_then(|f| f["label"].as_str())
                    .unwrap_or("")
                    .to_string()
            };
            Some((token.text, top.iter().map(|(i, id, a)| (*i, label(id), *a)).collect::<Vec<_>>()))
        }
    });
    move || {
        labelled.get().flatten().map(|(text, features)| {
            view! {
                <div class="token-features" data-testid="token-features">
                    <h4>{format!("Top features at “{}”", visible_token(&text))}</h4>
                    <ol>
                        {features
                            .into_iter()
                            .map(|(i, label, a)| view! { <li>{format!("{label} (#{i}) {a:.2}")}</li> })
                            .collect_view()}
                    </ol>
                </div>
            }
        })
    }
}
