//! Chat: streamed replies from the variant, and optionally from the base model beside it
//! for the same prompts.

use std::rc::Rc;

use futures::StreamExt;
use leptos::prelude::*;
use serde_json::{Value, json};

use crate::client::Client;
use crate::logic::visible_token;

/// One message in a column.
#[derive(Debug, Clone, PartialEq)]
struct Message {
    role: &'static str,
    text: String,
    /// Rules that fired (which, and at which token) and abort events, as sentences.
    events: Vec<String>,
    error: Option<String>,
    streaming: bool,
}

impl Message {
    fn user(text: String) -> Self {
        Self {
            role: "user",
            text,
            events: Vec::new(),
            error: None,
            streaming: false,
        }
    }

    fn assistant() -> Self {
        Self {
            role: "assistant",
            streaming: true,
            ..Self::user(String::new())
        }
    }
}

/// Sampling settings for a request.
#[derive(Debug, Clone, Copy)]
struct Sampling {
    temperature: f64,
    max_tokens: u32,
}

/// The conversation so far as API messages (without the reply being written).
fn history(column: &[Message]) -> Vec<Value> {
    column
        .iter()
        .filter(|m| !m.streaming && m.error.is_none())
        .map(|m| json!({ "role": m.role, "content": m.text }))
        .collect()
}

/// Streams one reply into the last message of `column`. Returns false when stopped. A
/// provider that answers base and variant in one call (Neuronpedia's steer-chat) sends the
/// base reply beside each chunk: it goes into the last message of `base`, when given.
async fn stream_reply(
    client: Client,
    column: RwSignal<Vec<Message>>,
    base: Option<RwSignal<Vec<Message>>>,
    controller: Option<Value>,
    rules: Vec<String>,
    sampling: Sampling,
    stop: StoredValue<Option<Rc<dyn Fn()>>, LocalStorage>,
) {
    let messages = history(&column.get_untracked());
    let mut body = json!({
        "model": client.model(), "messages": messages,
        "temperature": sampling.temperature, "max_completion_tokens": sampling.max_tokens,
    });
    // The base reply continues the base column's own conversation.
    if let Some(base) = base {
        body["kindling_base_messages"] = json!(history(&base.get_untracked()));
    }
    if let Some(c) = controller {
        body["controller"] = c;
    }
    let mut stream = client.chat(body);
    stop.set_value(Some(stream.stop.clone()));
    let edit_last = |f: &dyn Fn(&mut Message)| {
        column.update(|c| {
            if let Some(last) = c.last_mut() {
                f(last)
            }
        })
    };
    while let Some(item) = stream.chunks.next().await {
        match item {
            Ok(chunk) => {
                let choice = &chunk["choices"][0];
                let piece = choice["delta"]["content"].as_str().unwrap_or_default().to_string();
                let mut events = rules_fired(&chunk, &rules);
                events.extend(
                    chunk["gf_event_names"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|e| e.as_str())
                        .map(|e| format!("Aborted: “{e}”")),
                );
                let upstream = &chunk["kindling_upstream"];
                events.extend(upstream_events(upstream));
                edit_last(&|m| {
                    m.text.push_str(&piece);
                    m.events.extend(events.iter().cloned());
                });
                if let (Some(base), Some(text)) = (base, upstream["base_reply"].as_str()) {
                    base.update(|c| {
                        if let Some(last) = c.last_mut() {
                            last.text = text.to_string();
                        }
                    });
                }
            }
            Err(e) => {
                let text = e.to_string();
                edit_last(&|m| m.error = Some(text.clone()));
            }
        }
    }
    stop.set_value(None);
    edit_last(&|m| m.streaming = false);
    if let Some(base) = base {
        base.update(|c| {
            if let Some(last) = c.last_mut() {
                last.streaming = false;
            }
        });
    }
}

/// What a remote provider's last chunk says of how it steered: each feature's value and the
/// raw coefficient it became, and the provider's own link to the reply.
fn upstream_events(upstream: &Value) -> Vec<String> {
    let mut events: Vec<String> = upstream["features"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            let value = f["value"].as_f64().unwrap_or(0.0);
            let max_act = match f["max_act_approx"].as_f64() {
                Some(m) => format!("maxActApprox {m:.2}"),
                None => format!("no maxActApprox, {} assumed", kindling_ember::neuronpedia::FALLBACK_MAX_ACT),
            };
            format!(
                "Sent to {}: #{} “{}” {value:+.2} → strength {:.2} ({value:+.2} × {} × {max_act})",
                upstream["provider"].as_str().unwrap_or("the provider"),
                f["index_in_sae"],
                f["label"].as_str().unwrap_or_default(),
                f["coefficient"].as_f64().unwrap_or(0.0),
                kindling_ember::neuronpedia::MAX_ACTS_PER_UNIT,
            )
        })
        .collect();
    if let Some(url) = upstream["share_url"].as_str() {
        events.push(format!("Neuronpedia's page for this reply: {url}"));
    }
    events
}

/// What `kindling_rules_fired` on a chunk says, one sentence per rule (`rules` describes the
/// variant's rules in order; a hosted endpoint other than Kindling's never sends it).
fn rules_fired(chunk: &Value, rules: &[String]) -> Vec<String> {
    chunk["kindling_rules_fired"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|fired| {
            let rule = fired["rule"].as_u64()? as usize;
            let place = match fired["token_index"].as_u64() {
                Some(k) => format!(
                    "at reply token {k} “{}”",
                    visible_token(fired["token"].as_str().unwrap_or_default())
                ),
                None => "on the prompt".to_string(),
            };
            let what = rules.get(rule).map(String::as_str).unwrap_or("a rule");
            Some(format!("Rule {} fired {place}: {what}", rule + 1))
        })
        .collect()
}

/// The chat panel.
#[component]
pub fn Chat() -> impl IntoView {
    let session = crate::use_session();
    let steered = RwSignal::new(Vec::<Message>::new());
    let base = RwSignal::new(Vec::<Message>::new());
    let input = RwSignal::new(String::new());
    let compare = RwSignal::new(true);
    let temperature = RwSignal::new(String::from("0.7"));
    let max_tokens = RwSignal::new(String::from("64"));
    let busy = RwSignal::new(false);
    let stopped = RwSignal::new(false);
    let stop = StoredValue::new_local(None::<Rc<dyn Fn()>>);

    let sampling = move || -> Result<Sampling, String> {
        let temperature: f64 = temperature
            .get_untracked()
            .trim()
            .parse()
            .ok()
            .filter(|t| (0.0..=2.0).contains(t))
            .ok_or("Temperature must be a number from 0 to 2")?;
        let max_tokens: u32 = max_tokens
            .get_untracked()
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=1024).contains(n))
            .ok_or("Max tokens must be a whole number from 1 to 1024")?;
        Ok(Sampling { temperature, max_tokens })
    };

    let send = move || {
        let prompt = input.get_untracked().trim().to_string();
        if prompt.is_empty() || busy.get_untracked() {
            return;
        }
        let Some(client) = session.client() else {
            session.error("The model is not ready yet");
            return;
        };
        let sampling = match sampling() {
            Ok(s) => s,
            Err(e) => return session.error(e),
        };
        input.set(String::new());
        let compare = compare.get_untracked();
        let controller = session.controller();
        let rules: Vec<String> = session
            .variant
            .with_untracked(|v| v.rules.iter().map(super::rules::describe).collect());
        steered.update(|c| c.push(Message::user(prompt.clone())));
        steered.update(|c| c.push(Message::assistant()));
        if compare {
            base.update(|c| c.push(Message::user(prompt)));
        }
        // Neuronpedia answers both sides in one call: the base column fills from it.
        let together = compare && client.neuronpedia().is_some();
        if together {
            base.update(|c| c.push(Message::assistant()));
        }
        busy.set(true);
        stopped.set(false);
        leptos::task::spawn_local(async move {
            let mirror = together.then_some(base);
            stream_reply(client.clone(), steered, mirror, controller, rules, sampling, stop).await;
            session.conversation.set(
                steered
                    .get_untracked()
                    .iter()
                    .filter(|m| m.error.is_none())
                    .map(|m| (m.role.to_string(), m.text.clone()))
                    .collect(),
            );
            if compare && !together && !stopped.get_untracked() {
                base.update(|c| c.push(Message::assistant()));
                stream_reply(client, base, None, None, Vec::new(), sampling, stop).await;
            }
            busy.set(false);
        });
    };

    let column = move |title: &'static str, testid: &'static str, messages: RwSignal<Vec<Message>>| {
        view! {
            <div class="column" data-testid=testid>
                <h2>{title}</h2>
                <ol class="messages" aria-live="polite">
                    {move || {
                        messages
                            .get()
                            .into_iter()
                            .map(|m| {
                                view! {
                                    <li class=format!("message {}", m.role) data-testid=format!("{}-message", m.role)>
                                        <span class="role">{m.role}</span>
                                        // Model text is always text: never parsed as HTML.
                                        <p class="text">{m.text}</p>
                                        {m.streaming.then(|| view! { <span class="typing">"…"</span> })}
                                        {m
                                            .events
                                            .into_iter()
                                            .map(|e| view! { <p class="event" data-testid="rule-event">{e}</p> })
                                            .collect_view()}
                                        {m.error.map(|e| view! { <p class="error">{e}</p> })}
                                    </li>
                                }
                            })
                            .collect_view()
                    }}
                </ol>
            </div>
        }
    };

    view! {
        <div class="chat">
            <div class="columns" class:compare=move || compare.get()>
                {column("Variant", "variant-column", steered)}
                <Show when=move || compare.get()>{column("Base model", "base-column", base)}</Show>
            </div>
            <form
                class="composer"
                on:submit=move |ev| {
                    ev.prevent_default();
                    send();
                }
            >
                <textarea
                    data-testid="prompt"
                    aria-label="Message"
                    placeholder="Say something… (Enter sends, Shift+Enter for a new line)"
                    prop:value=move || input.get()
                    on:input=move |ev| input.set(event_target_value(&ev))
                    on:keydown=move |ev: web_sys::KeyboardEvent| {
                        if ev.key() == "Enter" && !ev.shift_key() {
                            ev.prevent_default();
                            send();
                        }
                    }
                ></textarea>
                <div class="controls">
                    <button type="submit" data-testid="send" disabled=move || busy.get() || session.client.get().is_none()>
                        "Send"
                    </button>
                    <button
                        type="button"
                        data-testid="stop"
                        disabled=move || !busy.get()
                        on:click=move |_| {
                            stopped.set(true);
                            if let Some(stop) = stop.get_value() {
                                stop();
                            }
                        }
                    >
                        "Stop"
                    </button>
                    <button
                        type="button"
                        data-testid="clear"
                        disabled=move || busy.get()
                        on:click=move |_| {
                            steered.set(Vec::new());
                            base.set(Vec::new());
                            session.conversation.set(Vec::new());
                        }
                    >
                        "Clear"
                    </button>
                    <label>
                        <input type="checkbox" data-testid="compare" bind:checked=compare />
                        " Base model beside it"
                    </label>
                    <label>
                        "Temperature "
                        <input class="narrow" data-testid="temperature" inputmode="decimal" bind:value=temperature />
                    </label>
                    <label>
                        "Max tokens "
                        <input class="narrow" data-testid="max-tokens" inputmode="numeric" bind:value=max_tokens />
                    </label>
                </div>
            </form>
        </div>
    }
}
