//! The translation, over a transport that answers from a table of recorded-shape replies and
//! records what was sent. The HTTP behaviour (validation, limits, CORS, 429) is tested
//! against the contract double in `tests/neuronpedia/` by the shells' tests.

use std::cell::RefCell;

use futures_lite::future::block_on;
use serde_json::{Value, json};

use super::*;
use crate::wire::Stop;

/// Answers each path with a fixed reply (or error) and records every call.
#[derive(Default)]
struct Table {
    replies: Vec<(&'static str, Result<Value, RemoteError>)>,
    sent: RefCell<Vec<(String, Value)>>,
}

impl Table {
    fn with(mut self, path: &'static str, reply: Result<Value, RemoteError>) -> Self {
        self.replies.push((path, reply));
        self
    }

    fn answer(&self, path: &str, body: Value) -> Result<Value, RemoteError> {
        self.sent.borrow_mut().push((path.to_string(), body));
        self.replies.iter().find(|(p, _)| path.starts_with(p)).map_or_else(
            || Err(RemoteError::from_reply(404, r#"{"error":"not in the table"}"#)),
            |(_, r)| r.clone(),
        )
    }
}

impl Transport for &Table {
    async fn get(&self, path: &str) -> Result<Value, RemoteError> {
        self.answer(path, Value::Null)
    }
    async fn post(&self, path: &str, body: &Value) -> Result<Value, RemoteError> {
        self.answer(path, body.clone())
    }
}

/// The table as a browser sees it: a refusal without CORS headers is no answer at all.
struct Browser(Table);

impl Transport for &Browser {
    async fn get(&self, path: &str) -> Result<Value, RemoteError> {
        self.0.answer(path, Value::Null)
    }
    async fn post(&self, path: &str, body: &Value) -> Result<Value, RemoteError> {
        self.0.answer(path, body.clone())
    }
    fn opaque_failures(&self) -> bool {
        true
    }
}

fn neuron(index: u32, description: &str, max_act: f32) -> Value {
    json!({ "modelId": DEFAULT_MODEL, "layer": DEFAULT_SOURCE, "index": index.to_string(), "maxActApprox": max_act,
            "frac_nonzero": 0.002, "explanations": [{ "description": description, "explanationModelName": "gemini-2.5-flash-lite" }],
            "pos_str": [" arr", " matey"], "pos_values": [1.5, 1.2], "neg_str": [" the"], "neg_values": [-0.4],
            "activations": [{ "tokens": [" Arr", "!"], "values": [12.0, 0.0], "maxValue": 12.0 }] })
}

fn steer_reply(steered: &str, default: &str) -> Value {
    let side = |text: &str| json!({ "raw": format!("<|begin_of_text|>…{text}"), "chatTemplate": [{ "role": "user", "content": "Hi" }, { "role": "assistant", "content": text }], "logprobs": null });
    json!({ "STEERED": side(steered), "DEFAULT": side(default), "id": "abc", "shareUrl": "https://www.neuronpedia.org/steer/abc", "limit": "239" })
}

fn chat(controller: Value) -> ChatRequest {
    serde_json::from_value(json!({
        "model": "meta-llama/Llama-3.3-70B-Instruct", "messages": [{ "role": "user", "content": "Hi" }],
        "max_completion_tokens": 2048, "temperature": 0.0, "controller": controller,
    }))
    .unwrap()
}

fn nudge(index: u32, value: f32) -> Value {
    json!({ "interventions": [{ "mode": "nudge", "features": { "features": [{ "uuid": "x", "label": "", "index_in_sae": index, "max_activation_strength": 1 }] }, "value": value }], "scopes": [] })
}

#[test]
fn sources_parse_name_their_models_and_make_stable_ids() {
    let source = Source::default();
    assert_eq!(source.model_name(), "meta-llama/Llama-3.3-70B-Instruct");
    assert!(source.accepts("llama3.3-70b-it") && source.accepts("llama3.3-70b-it/50-resid-post-gf"));
    assert!(!source.accepts("HuggingFaceTB/SmolLM2-135M-Instruct"));
    let other = Source::parse("gemma-2-2b/20-gemmascope-res-16k").unwrap();
    assert_eq!(other.model_name(), "gemma-2-2b");
    assert_eq!(other.limits().max_new_tokens, 256);
    assert_eq!(source.limits().max_new_tokens, 1024);
    let id = source.feature_ids().uuid(33_234);
    assert_eq!(Source::default().feature_ids().parse(&id), Some(33_234), "stable across instances");
    assert_eq!(other.feature_ids().parse(&id), None, "another source's id");
    for bad in [
        "llama",
        "a/b/c",
        "../x",
        "./s",
        "m/..",
        "/x",
        "m/ s p",
        &format!("{}/s", "m".repeat(51)),
    ] {
        assert!(Source::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn strengths_convert_through_max_act_approx() {
    assert_eq!(
        coefficient(0.2, 12.0),
        12.0,
        "0.2 units is maxActApprox, where Neuronpedia's UI starts"
    );
    assert_eq!(coefficient(-1.0, 3.0), -15.0);
    assert!((value_of(coefficient(0.45, 7.5), 7.5) - 0.45).abs() < 1e-6);
    assert_eq!(value_of(1.0, 0.0), 0.0);
}

#[test]
fn the_rate_window_refuses_past_the_limit_and_slides() {
    let mut window = RateWindow::default();
    for i in 0..240 {
        window.admit("/api/steer-chat", f64::from(i)).unwrap();
    }
    let refused = window.admit("/api/steer-chat", 300.0).unwrap_err();
    assert_eq!(refused.status(), 429);
    assert!(refused.to_string().contains("240"), "{refused}");
    // Other prefixes have their own budget; an hour after the first call, one more fits.
    window.admit("/api/explanation/search", 300.0).unwrap();
    window.admit("/api/steer-chat", 3600.0).unwrap();
    assert!(window.admit("/api/steer-chat", 3600.5).is_err());
}

#[test]
fn a_chat_becomes_one_steer_chat_with_converted_strengths() {
    let table = Table::default()
        .with("/api/features", Ok(json!([neuron(2810, "pirate speech", 12.0)])))
        .with("/api/steer-chat", Ok(steer_reply("Arr, matey! Hello.", "Hello! How can I help?")));
    let np = Neuronpedia::new(Source::default(), &table);
    let reply = block_on(np.chat_completion(&chat(nudge(2810, 0.4)))).unwrap();
    assert_eq!(reply["choices"][0]["message"]["content"], "Arr, matey! Hello.");
    assert_eq!(reply["kindling_upstream"]["base_reply"], "Hello! How can I help?");
    assert_eq!(reply["kindling_upstream"]["features"][0]["coefficient"], 24.0);
    assert_eq!(reply["kindling_upstream"]["share_url"], "https://www.neuronpedia.org/steer/abc");
    let sent = table.sent.borrow();
    let (path, body) = &sent[1];
    assert_eq!(path, "/api/steer-chat");
    assert_eq!(
        body["features"],
        json!([{ "modelId": "llama3.3-70b-it", "layer": "50-resid-post-gf", "index": 2810, "strength": 24.0 }])
    );
    assert_eq!(body["n_tokens"], 1024, "the SDK's 2048 is lowered to the 70B's limit");
    assert_eq!(body["strength_multiplier"], 1.0);
    assert_eq!(body["steer_method"], "SIMPLE_ADDITIVE");
    assert_eq!(body["defaultChatMessages"], body["steeredChatMessages"]);
    for key in ["temperature", "seed", "steer_special_tokens", "stream"] {
        assert!(!body[key].is_null(), "{key} is required");
    }
    drop(sent);
    // The facts are cached: a second reply makes no second /api/features call.
    block_on(np.chat_completion(&chat(nudge(2810, 0.5)))).unwrap();
    assert_eq!(table.sent.borrow().iter().filter(|(p, _)| p == "/api/features").count(), 1);
}

#[test]
fn what_neuronpedia_cannot_do_is_refused_by_name() {
    let table = Table::default();
    let np = Neuronpedia::new(Source::default(), &table);
    let rule = json!({ "interventions": [], "scopes": [{ "conditionals": {}, "controller": {}, "event_name": "e" }] });
    let e = block_on(np.chat_completion(&chat(rule))).unwrap_err();
    assert_eq!(e.status(), 422);
    assert!(e.to_string().contains("set_when") && e.to_string().contains("Neuronpedia"), "{e}");
    let pin = json!({ "interventions": [{ "mode": "pin", "features": { "features": [{ "index_in_sae": 1 }] }, "value": 1.0 }] });
    assert!(block_on(np.chat_completion(&chat(pin))).unwrap_err().to_string().contains("pin"));
    for route in [Route::ComputeLogits, Route::Contrast, Route::AutoConditional, Route::Tokenize] {
        let request = Request::parse(
            route,
            "",
            br#"{"model":"llama3.3-70b-it","messages":[],"dataset_1":[],"dataset_2":[],"specification":"x","top_k":3}"#,
        )
        .unwrap();
        let e = block_on(np.answer(&request)).unwrap_err();
        assert_eq!(e.status(), 422, "{route:?}");
        assert!(e.to_string().contains(Neuronpedia::<&Table>::limitation(route).unwrap()));
    }
    assert!(table.sent.borrow().is_empty(), "nothing refused here reaches the remote");
}

#[test]
fn limits_are_checked_before_anything_is_sent() {
    let table = Table::default();
    let np = Neuronpedia::new(Source::parse("gemma-2-2b/20-gemmascope-res-16k").unwrap(), &table);
    let mut long = chat(Value::Null);
    long.model = "gemma-2-2b".into();
    long.messages[0].content = "é".repeat(2049);
    assert!(block_on(np.chat_completion(&long)).unwrap_err().to_string().contains("2048"));
    long.messages[0].content = "Hi".into();
    long.seed = Some(100_000_001);
    assert!(block_on(np.chat_completion(&long)).unwrap_err().to_string().contains("seed"));
    let short = SearchQuery {
        query: "ab".into(),
        model: None,
        top_k: 5,
    };
    assert!(block_on(np.search(&short)).unwrap_err().to_string().contains("at least 3"));
    assert!(table.sent.borrow().is_empty());
    let mut wrong = chat(Value::Null);
    wrong.model = "HuggingFaceTB/SmolLM2-135M-Instruct".into();
    assert_eq!(block_on(np.chat_completion(&wrong)).unwrap_err().status(), 404);
}

#[test]
fn a_negative_strength_below_the_floor_is_explained() {
    let table = Table::default().with("/api/features", Ok(json!([neuron(7, "x", 40.0)])));
    let np = Neuronpedia::new(Source::default(), &table);
    let e = block_on(np.chat_completion(&chat(nudge(7, -2.0)))).unwrap_err();
    assert!(e.to_string().contains("-300") && e.to_string().contains("-400.0"), "{e}");
}

#[test]
fn search_pages_and_fills_the_cache() {
    let hit = |index: u32, description: &str| json!({ "modelId": DEFAULT_MODEL, "layer": DEFAULT_SOURCE, "index": index, "description": description, "cosine_similarity": 0.5, "neuron": neuron(index, description, 3.0) });
    let table = Table::default().with(
        "/api/explanation/search",
        Ok(json!({ "results": [hit(5, "pirates"), hit(9, "sailing"), hit(5, "pirates again")], "resultsCount": 3, "hasMore": false })),
    );
    let np = Neuronpedia::new(Source::default(), &table);
    let found = block_on(np.search(&SearchQuery {
        query: "talk like a pirate".into(),
        model: Some("meta-llama/Llama-3.3-70B-Instruct".into()),
        top_k: 10,
    }))
    .unwrap();
    let indices: Vec<u32> = found.features.iter().map(|f| f.index_in_sae).collect();
    assert_eq!(indices, [5, 9], "one entry per feature");
    assert_eq!(found.features[0].id, np.feature_ids().uuid(5));
    assert_eq!(found.features[0].density, Some(0.002));
    assert_eq!(
        table.sent.borrow()[0].1,
        json!({ "modelId": "llama3.3-70b-it", "layers": ["50-resid-post-gf"], "query": "talk like a pirate" })
    );
    // A lookup of a hit needs no call.
    let lookup = block_on(np.lookup(&LookupRequest {
        indices: vec![9],
        model: DEFAULT_MODEL.into(),
    }))
    .unwrap();
    assert_eq!(lookup.features[0].feature.label, "sailing");
    assert_eq!(table.sent.borrow().len(), 1);
}

#[test]
fn a_dashboard_shades_against_max_act_approx() {
    let table = Table::default().with("/api/feature/", Ok(neuron(2810, "pirate speech", 12.0)));
    let np = Neuronpedia::new(Source::default(), &table);
    let card = block_on(np.dashboard(&DashboardRequest {
        feature_id: np.feature_ids().uuid(2810),
        model: DEFAULT_MODEL.into(),
    }))
    .unwrap();
    assert_eq!(card.feature.label, "pirate speech");
    assert_eq!(card.contexts[0].activations, [1.0, 0.0]);
    assert_eq!(card.promoted[0].token, " arr");
    assert_eq!(card.suppressed[0].value, -0.4);
    assert_eq!(card.label_source, "neuronpedia: gemini-2.5-flash-lite");
    assert_eq!(table.sent.borrow()[0].0, "/api/feature/llama3.3-70b-it/50-resid-post-gf/2810");
}

/// A steered, streamed plan (feature 2810 at 0.4) with the stop string "END".
fn streamed_plan() -> SteerPlan {
    let table = Table::default().with("/api/features", Ok(json!([neuron(2810, "pirate speech", 12.0)])));
    let np = Neuronpedia::new(Source::default(), &table);
    let mut request = chat(nudge(2810, 0.4));
    request.stream = true;
    request.stop = Some(Stop::One("END".into()));
    block_on(np.plan_chat(&request)).unwrap()
}

fn partial(steered: Option<&str>, default: &str, done: bool) -> Value {
    let mut frame = steer_reply(steered.unwrap_or(""), default);
    if steered.is_none() {
        frame["STEERED"] = Value::Null;
    }
    if !done {
        frame["id"] = Value::Null;
        frame["shareUrl"] = Value::Null;
    }
    frame
}

#[test]
fn snapshots_stream_as_deltas_with_stops_held_back() {
    let plan = streamed_plan();
    assert!(plan.body.stream);
    let mut stream = plan.stream();
    let mut text = String::new();
    let mut bases = Vec::new();
    // Two inference hosts: DEFAULT's first snapshots come alone, STEERED null.
    let frames = [
        partial(None, "Hello", false),
        partial(None, "Hello there", false),
        partial(Some("Arr"), "Hello there", false),
        partial(Some("Arr, matey é E"), "Hello there!", false),
        partial(Some("Arr, matey é EN"), "Hello there!", false),
        partial(Some("Arr, matey é END and more"), "Hello there!", true),
    ];
    for frame in &frames {
        if let Some(chunk) = stream.snapshot(frame).unwrap() {
            text += chunk["choices"][0]["delta"]["content"].as_str().unwrap();
            bases.push(chunk["kindling_upstream"]["base_reply"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(bases[0], "Hello", "the base column fills while the steered reply has not begun");
    assert!(
        !text.starts_with("Hello"),
        "the base text is never sent as the steered reply: {text:?}"
    );
    let last = stream.finish().unwrap();
    text += last["choices"][0]["delta"]["content"].as_str().unwrap();
    assert_eq!(text, "Arr, matey é ", "the stop string and what follows are cut");
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["kindling_upstream"]["base_reply"], "Hello there!");
    assert_eq!(last["kindling_upstream"]["share_url"], "https://www.neuronpedia.org/steer/abc");
}

#[test]
fn a_stream_that_ends_early_or_empty_is_an_error() {
    let plan = streamed_plan();
    let e = plan.stream().finish().unwrap_err();
    assert_eq!(e.status(), 502);
    assert!(e.to_string().contains("without a reply"), "{e}");
    let mut cut_short = plan.stream();
    cut_short.snapshot(&partial(Some("Arr"), "Hello", false)).unwrap();
    assert!(
        cut_short
            .finish()
            .unwrap_err()
            .to_string()
            .contains("before the reply was complete")
    );
    // An unsteered reply is not streamed: Neuronpedia answers it whole, as one snapshot.
    let table = Table::default();
    let np = Neuronpedia::new(Source::default(), &table);
    let mut request = chat(Value::Null);
    request.stream = true;
    let plan = block_on(np.plan_chat(&request)).unwrap();
    assert!(!plan.body.stream, "Neuronpedia fails a stream with no features");
    let mut whole = plan.stream();
    let mut only_default = steer_reply("", "Hello! How can I help?");
    only_default["STEERED"] = Value::Null;
    only_default["id"] = Value::Null;
    let chunk = whole.snapshot(&only_default).unwrap().unwrap();
    assert_eq!(chunk["choices"][0]["delta"]["content"], "Hello! How can I help?");
    whole.finish().unwrap();
}

#[test]
fn conversations_drop_empty_messages_and_the_base_keeps_its_own_history() {
    let table = Table::default().with("/api/steer-chat", Ok(steer_reply("Arr", "Hi")));
    let np = Neuronpedia::new(Source::default(), &table);
    let mut request = chat(Value::Null);
    let said = |role: &str, content: &str| Message {
        role: role.into(),
        content: content.into(),
    };
    request.messages = vec![said("user", "Hi"), said("assistant", ""), said("user", "Again")];
    request.kindling_base_messages = Some(vec![said("user", "Hi"), said("assistant", "Hello."), said("user", "Again")]);
    block_on(np.chat_completion(&request)).unwrap();
    let sent = &table.sent.borrow()[0].1;
    assert_eq!(
        sent["steeredChatMessages"].as_array().unwrap().len(),
        2,
        "the empty reply is left out"
    );
    assert_eq!(sent["defaultChatMessages"][1]["content"], "Hello.");
    assert!(sent["seed"].as_i64().unwrap().unsigned_abs() <= 100_000_000);
}

#[test]
fn failures_become_clear_errors() {
    // No readable answer, while another prefix answers: in a browser, the rate limiter's
    // CORS-less 429.
    let answers_elsewhere = || {
        Table::default()
            .with("/api/steer-chat", Err(RemoteError::unreachable("Failed to fetch")))
            .with("/api/feature/", Ok(neuron(0, "x", 1.0)))
    };
    let browser = Browser(answers_elsewhere());
    let np = Neuronpedia::new(Source::default(), &browser);
    let e = block_on(np.chat_completion(&chat(Value::Null))).unwrap_err();
    assert_eq!(e.status(), 429, "{e}");
    // A server reads every status: no answer there is a timeout or a reset, never a 429.
    let server = answers_elsewhere();
    let np = Neuronpedia::new(Source::default(), &server);
    assert_eq!(block_on(np.chat_completion(&chat(Value::Null))).unwrap_err().status(), 502);
    // Nothing answers: offline.
    let offline = Browser(Table::default().with("/api", Err(RemoteError::unreachable("Failed to fetch"))));
    let np = Neuronpedia::new(Source::default(), &offline);
    let e = block_on(np.chat_completion(&chat(Value::Null))).unwrap_err();
    assert_eq!(e.status(), 503);
    assert!(e.to_string().contains("cannot reach Neuronpedia"), "{e}");
    // A real 429's body says the window.
    let limited = RemoteError::from_reply(
        429,
        r#"{"endpoint":"/api/steer","limitPerWindow":240,"requestWindow":"60 m","remainingRequests":0,"error":"Rate limit exceeded"}"#,
    );
    assert_eq!(limited.message, "240 requests per 60 m under /api/steer");
    let search = Table::default().with(
        "/api/explanation/search",
        Err(RemoteError::from_reply(500, r#"{"message":"Unknown Error"}"#)),
    );
    let np = Neuronpedia::new(Source::default(), &search);
    let e = block_on(np.search(&SearchQuery {
        query: "pirates".into(),
        model: None,
        top_k: 5,
    }))
    .unwrap_err();
    assert!(e.to_string().contains("model/source"), "{e}");
}

#[test]
fn models_name_the_provider_and_what_it_cannot_do() {
    let table = Table::default();
    let np = Neuronpedia::new(Source::default(), &table);
    let models = block_on(np.answer(&Request::Models)).unwrap();
    assert_eq!(models["data"][0]["id"], "meta-llama/Llama-3.3-70B-Instruct");
    let provider = &models["kindling_provider"];
    assert_eq!(provider["source"], "llama3.3-70b-it/50-resid-post-gf");
    assert!(
        provider["limitations"]["/chat-attribution/compute-logits"]
            .as_str()
            .unwrap()
            .contains("logits")
    );
    assert!(provider["limitations"].get("/chat/completions").is_none());
}
