//! Every route of the table behind the real router, the real engine and the real SAE and
//! atlas, called in process (`tower::ServiceExt::oneshot`, no sockets, no Python): the status
//! and error body each kind of bad request gets, and a cheap success where one exists. The
//! SDK tests (`scripts/test-server.sh`) cover the successes at length.

use std::sync::LazyLock;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use kindling_ember::routes::API_PREFIX;
use kindling_ember::{Ember, MODEL_NAME, Method, Route};
use kindling_engine::{Atlas, Backend, Model, Sae};
use kindling_server::{AppState, Settings, router};
use serde_json::{Value, json};
use tower::ServiceExt as _;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// One engine for the whole binary (loading it takes seconds).
static STATE: LazyLock<AppState> = LazyLock::new(|| state(Settings::default()));

fn state(settings: Settings) -> AppState {
    let model = Model::load(format!("{ROOT}/public/models/SmolLM2-135M-Instruct.Q4_1.gguf"), Backend::Cpu)
        .expect("the model (scripts/fetch-model.sh)");
    let sae = Sae::from_compact(&std::fs::read(format!("{ROOT}/public/sae/kindling-sae.f16.safetensors")).unwrap()).unwrap();
    let atlas = Atlas::load_dir(std::path::Path::new(&format!("{ROOT}/public/atlas")), &sae, true).unwrap();
    AppState::new(Ember::new(model, sae, atlas, MODEL_NAME), settings)
}

fn app() -> Router {
    router(STATE.clone())
}

async fn call(app: Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn post(path: &str, content_type: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(format!("{API_PREFIX}{path}"))
        .header(header::HOST, "localhost")
        .header(header::CONTENT_TYPE, content_type)
        .body(body.into())
        .unwrap()
}

fn post_json(route: Route, body: Value) -> Request<Body> {
    post(route.path(), "application/json", body.to_string())
}

fn get(path_and_query: &str) -> Request<Body> {
    Request::get(path_and_query)
        .header(header::HOST, "localhost")
        .body(Body::empty())
        .unwrap()
}

/// An error answer: the status, and the body both SDKs read (`detail`, `error.message`,
/// `error.type`, `error.code`), whose message contains `says`.
async fn expect_error(request: Request<Body>, status: StatusCode, says: &str) {
    let what = format!("{} {}", request.method(), request.uri());
    let (got, body) = call(app(), request).await;
    assert_eq!(got, status, "{what}: {body}");
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error.message in {body}"));
    assert_eq!(body["detail"], message, "{what}");
    assert_eq!(body["error"]["code"], status.as_u16(), "{what}");
    assert!(body["error"]["type"].is_string(), "{what}");
    assert!(message.contains(says), "{what}: {message:?} does not say {says:?}");
}

/// A body each POST route accepts as to shape, naming `model`.
fn valid_body(route: Route, model: &str) -> Value {
    let messages = json!([{ "role": "user", "content": "Hello" }]);
    match route {
        Route::ChatCompletions => json!({ "messages": messages, "model": model, "max_completion_tokens": 1 }),
        Route::ComputeLogits | Route::ComputeFeatures | Route::Tokenize => json!({ "messages": messages, "model": model }),
        Route::Contrast => json!({ "dataset_1": [messages], "dataset_2": [messages], "model": model }),
        Route::Rerank => json!({ "query": "food", "model": model, "feature_ids": [] }),
        Route::Lookup => json!({ "indices": [1], "model": model }),
        Route::Dashboard => json!({ "feature_id": "00000000-0000-4000-8000-000000000001", "model": model }),
        Route::AutoEdits | Route::AutoConditional => json!({ "specification": "pirates", "model": model }),
        Route::Neighbors => json!({ "feature_indices": [1], "model": model }),
        Route::LogitAttribution => json!({ "messages": messages, "model": model, "startIndex": 2 }),
        Route::ContrastiveDataset => json!({ "specification": "" }),
        Route::Search | Route::List | Route::Models | Route::Map => unreachable!("GET routes have no body"),
    }
}

#[tokio::test]
async fn every_post_route_refuses_bodies_that_are_not_json_of_its_shape() {
    for route in Route::ALL.into_iter().filter(|r| r.method() == Method::Post) {
        expect_error(
            post(route.path(), "application/json", "{\"messages\": ["),
            StatusCode::BAD_REQUEST,
            "",
        )
        .await;
        expect_error(
            post(route.path(), "text/plain", "messages=hi"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "",
        )
        .await;
        // A JSON array where an object is due: the message names what does not fit.
        expect_error(post_json(route, json!([1, 2])), StatusCode::UNPROCESSABLE_ENTITY, "does not fit").await;
    }
}

#[tokio::test]
async fn every_route_that_names_a_model_refuses_another_model() {
    for route in Route::ALL
        .into_iter()
        .filter(|r| r.method() == Method::Post && *r != Route::ContrastiveDataset)
    {
        expect_error(post_json(route, valid_body(route, "gpt-4")), StatusCode::NOT_FOUND, "unknown model").await;
    }
    expect_error(
        get(&format!("{API_PREFIX}/features/search?query=food&model=gpt-4")),
        StatusCode::NOT_FOUND,
        "unknown model",
    )
    .await;
}

#[tokio::test]
async fn bad_values_are_refused_with_what_is_wrong() {
    let hello = json!([{ "role": "user", "content": "Hello" }]);
    let cases: Vec<(Request<Body>, &str)> = vec![
        (
            post_json(
                Route::ChatCompletions,
                json!({ "messages": hello, "model": MODEL_NAME, "max_tokens": -1 }),
            ),
            "max_completion_tokens",
        ),
        (
            post_json(
                Route::ChatCompletions,
                json!({ "messages": [{ "role": "tool", "content": "x" }], "model": MODEL_NAME }),
            ),
            "role",
        ),
        (
            post_json(
                Route::ChatCompletions,
                json!({ "messages": hello, "model": MODEL_NAME, "controller": { "interventions": [{ "mode": "boost", "features": { "features": [] }, "value": 1 }] } }),
            ),
            "mode",
        ),
        (
            post_json(Route::ComputeLogits, json!({ "messages": hello, "model": MODEL_NAME, "top_k": 0 })),
            "top_k",
        ),
        (
            post_json(
                Route::ComputeLogits,
                json!({ "messages": hello, "model": MODEL_NAME, "filter_vocabulary": ["two words"] }),
            ),
            "one token",
        ),
        (
            post_json(Route::ComputeFeatures, json!({ "messages": [], "model": MODEL_NAME })),
            "messages",
        ),
        (
            post_json(Route::Contrast, json!({ "dataset_1": [], "dataset_2": [], "model": MODEL_NAME })),
            "same number",
        ),
        (
            post_json(
                Route::Rerank,
                json!({ "query": "x", "model": MODEL_NAME, "feature_ids": ["12345678-1234-4234-8234-123456789012"] }),
            ),
            "feature id",
        ),
        (
            post_json(Route::Lookup, json!({ "indices": [1 << 20], "model": MODEL_NAME })),
            "does not exist",
        ),
        (
            post_json(Route::Dashboard, json!({ "feature_id": "not-a-uuid", "model": MODEL_NAME })),
            "not a feature id",
        ),
        (
            post_json(Route::AutoEdits, json!({ "specification": " ", "model": MODEL_NAME })),
            "specification",
        ),
        (
            post_json(
                Route::AutoConditional,
                json!({ "specification": "x".repeat(1001), "model": MODEL_NAME }),
            ),
            "specification",
        ),
        (
            post_json(Route::Neighbors, json!({ "feature_indices": [-1], "model": MODEL_NAME })),
            "does not exist",
        ),
        (
            post_json(Route::Neighbors, json!({ "feature_indices": [], "model": MODEL_NAME })),
            "empty",
        ),
        (
            post_json(
                Route::LogitAttribution,
                json!({ "messages": hello, "model": MODEL_NAME, "startIndex": 1 }),
            ),
            "startIndex",
        ),
        (
            post_json(
                Route::LogitAttribution,
                json!({ "messages": hello, "model": MODEL_NAME, "startIndex": 3, "endIndex": 4 }),
            ),
            "endIndex",
        ),
        (
            post_json(Route::ContrastiveDataset, json!({ "specification": "" })),
            "specification",
        ),
        (
            post_json(
                Route::Tokenize,
                json!({ "messages": [{ "role": "user", "content": "word ".repeat(20_000) }], "model": MODEL_NAME }),
            ),
            "bytes",
        ),
        (get(&format!("{API_PREFIX}/features/search?model={MODEL_NAME}")), "query"),
        (get(&format!("{API_PREFIX}/features/search?query=funny&perPage=lots")), "perPage"),
        (get(&format!("{API_PREFIX}/features/search?query=funny&perPage=0")), "top_k"),
        (get(&format!("{API_PREFIX}/features/?feature_id=not-a-uuid")), "UUID"),
    ];
    for (request, says) in cases {
        expect_error(request, StatusCode::UNPROCESSABLE_ENTITY, says).await;
    }
}

#[tokio::test]
async fn cheap_routes_answer_through_the_table_under_both_prefixes() {
    for prefix in [API_PREFIX, "/v1"] {
        let (status, body) = call(app(), get(&format!("{prefix}/models"))).await;
        assert_eq!((status, &body["data"][0]["id"]), (StatusCode::OK, &json!(MODEL_NAME)));
    }
    let (status, body) = call(app(), get(&format!("{API_PREFIX}/features/search?query=food&perPage=2"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<String> = body["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    let (status, body) = call(
        app(),
        get(&format!("{API_PREFIX}/features/?feature_id={}&feature_id={}", ids[0], ids[1])),
    )
    .await;
    assert_eq!((status, body["features"].as_array().unwrap().len()), (StatusCode::OK, 2));
    let (status, body) = call(app(), post_json(Route::Lookup, valid_body(Route::Lookup, MODEL_NAME))).await;
    assert_eq!(
        (status, &body["features"][0]["index_in_sae"]),
        (StatusCode::OK, &json!(1)),
        "{body}"
    );
    let (status, body) = call(app(), post_json(Route::Tokenize, valid_body(Route::Tokenize, MODEL_NAME))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["tokens"].as_array().unwrap().iter().any(|t| t["value"] == "Hello"), "{body}");
    // The feature map: every point with its label and a named region; another model's is not here.
    let (status, body) = call(app(), get(&format!("{API_PREFIX}/features/map?model={MODEL_NAME}"))).await;
    assert_eq!(status, StatusCode::OK);
    let (points, regions) = (body["points"].as_array().unwrap(), body["regions"].as_array().unwrap());
    assert!(
        points.len() > 8000 && !regions.is_empty(),
        "{} points, {} regions",
        points.len(),
        regions.len()
    );
    for p in points {
        let (x, y) = (p["x"].as_f64().unwrap(), p["y"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&x) && (0.0..=1.0).contains(&y), "{p}");
        assert!(
            p["label"].is_string() && (p["region"].as_u64().unwrap() as usize) < regions.len(),
            "{p}"
        );
    }
    expect_error(
        get(&format!("{API_PREFIX}/features/map?model=gpt-4")),
        StatusCode::NOT_FOUND,
        "unknown model",
    )
    .await;
    // Paths and methods outside the table.
    assert_eq!(
        call(app(), get(&format!("{API_PREFIX}/no/such/route"))).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(app(), get(&format!("{API_PREFIX}/chat/completions"))).await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    // Only chat and models are OpenAI aliases.
    assert_eq!(
        call(app(), post("/v1/features/lookup", "application/json", "{}")).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn with_keys_every_route_needs_one() {
    let keyed = router(AppState::new(
        // A second engine only for this test: the key check comes before any model work.
        {
            let model = Model::load(format!("{ROOT}/public/models/SmolLM2-135M-Instruct.Q4_1.gguf"), Backend::Cpu).unwrap();
            let sae = Sae::from_compact(&std::fs::read(format!("{ROOT}/public/sae/kindling-sae.f16.safetensors")).unwrap()).unwrap();
            let atlas = Atlas::load_dir(std::path::Path::new(&format!("{ROOT}/public/atlas")), &sae, false).unwrap();
            Ember::new(model, sae, atlas, MODEL_NAME)
        },
        Settings {
            api_keys: vec!["the-key".into()],
            ..Settings::default()
        },
    ));
    for route in Route::ALL {
        let request = match route.method() {
            Method::Get => get(&format!("{API_PREFIX}{}", route.path())),
            Method::Post => post_json(route, json!({})),
        };
        let (status, body) = call(keyed.clone(), request).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{route:?}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("API key"), "{route:?}");
    }
}

/// The page's worker serves chat before the SAE and the atlas are in (they load after the
/// model): until they are attached, every route that needs them answers 503 and says why,
/// while plain chat and tokenizing work; once attached, the same requests are served.
#[tokio::test]
async fn before_the_features_are_attached_feature_routes_are_unavailable_and_chat_works() {
    let model = Model::load(format!("{ROOT}/public/models/SmolLM2-135M-Instruct.Q4_1.gguf"), Backend::Cpu).unwrap();
    let ember = std::sync::Arc::new(Ember::model_only(model, MODEL_NAME));
    let app = || {
        router(AppState::with_backend(
            kindling_server::Backend::Local(ember.clone()),
            Settings::default(),
        ))
    };
    // Every POST route but these needs the SAE or the atlas.
    let model_only = [Route::ChatCompletions, Route::Tokenize, Route::ContrastiveDataset];
    let needs_features = Route::ALL
        .into_iter()
        .filter(|r| r.method() == Method::Post && !model_only.contains(r));
    for route in needs_features {
        let (status, body) = call(app(), post_json(route, valid_body(route, MODEL_NAME))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{route:?}: {body}");
        assert!(body.to_string().contains("still loading"), "{route:?}: {body}");
    }
    let search = format!("{API_PREFIX}/features/search?query=food&perPage=2");
    assert_eq!(call(app(), get(&search)).await.0, StatusCode::SERVICE_UNAVAILABLE);
    let list = format!("{API_PREFIX}/features/?feature_id=00000000-0000-4000-8000-000000000001");
    assert_eq!(call(app(), get(&list)).await.0, StatusCode::SERVICE_UNAVAILABLE);
    let map = format!("{API_PREFIX}/features/map");
    assert_eq!(call(app(), get(&map)).await.0, StatusCode::SERVICE_UNAVAILABLE);
    for route in [Route::ChatCompletions, Route::Tokenize] {
        let (status, body) = call(app(), post_json(route, valid_body(route, MODEL_NAME))).await;
        assert_eq!(status, StatusCode::OK, "{route:?}: {body}");
    }
    // A controller needs the SAE.
    let mut steered = valid_body(Route::ChatCompletions, MODEL_NAME);
    steered["controller"] = json!({ "name": "v", "interventions": [] });
    assert_eq!(
        call(app(), post_json(Route::ChatCompletions, steered)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );

    let sae = Sae::from_compact(&std::fs::read(format!("{ROOT}/public/sae/kindling-sae.f16.safetensors")).unwrap()).unwrap();
    let atlas = Atlas::load_dir(std::path::Path::new(&format!("{ROOT}/public/atlas")), &sae, true).unwrap();
    assert!(ember.attach_features(sae.clone(), atlas.clone()));
    assert!(!ember.attach_features(sae, atlas), "attached once");
    assert_eq!(call(app(), get(&search)).await.0, StatusCode::OK);
    assert_eq!(call(app(), get(&map)).await.0, StatusCode::OK);
    let (status, body) = call(app(), post_json(Route::Lookup, valid_body(Route::Lookup, MODEL_NAME))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
