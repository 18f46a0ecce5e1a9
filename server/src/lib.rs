//! `kindling-server`: Kindling's engine behind HTTP.
//!
//! Every Goodfire API endpoint under `/api/inference/v1/` (the real `goodfire` and `openai`
//! SDKs drive it unchanged), OpenAI-style `/v1/chat/completions` and `/v1/models`, and the
//! playground's static files at `/`. The Ember operations themselves live in
//! [`kindling_engine::ember`]; this crate only adapts them to HTTP:
//!
//! * model work runs on blocking threads, at most `max_running` at a time, with at most
//!   `max_queued` more waiting; beyond that a request gets 429 (the SDK backs off and retries);
//! * a streamed reply is one HTTP chunk per SSE event, never compressed, never with
//!   keep-alive comments (the SDK's parser needs exactly that), and a client that goes away
//!   cancels its generation;
//! * errors are JSON with a clear message, in the statuses the SDK maps (goodfire-api.md §1.6);
//! * request logs are one JSON line each: method, route, status, duration. Never the query
//!   string, the body or the `Authorization` header.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt as _;
use kindling_engine::CancelToken;
use kindling_engine::ember::{self, ChatRequest, Ember, EmberError};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tower_http::cors::{Any, CorsLayer};
use tower_http::services::ServeDir;

/// How the server runs, beyond the engine.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Accepted bearer keys; empty: no key needed.
    pub api_keys: Vec<String>,
    /// Model operations running at once.
    pub max_running: usize,
    /// Requests waiting for a slot before 429.
    pub max_queued: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Directories served at `/`, first match wins (the built playground, then `public/`).
    pub static_dirs: Vec<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            max_running: 2,
            max_queued: 16,
            max_body_bytes: 2 << 20,
            static_dirs: Vec::new(),
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    ember: Arc<Ember>,
    settings: Arc<Settings>,
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
}

impl AppState {
    pub fn new(ember: Ember, settings: Settings) -> Self {
        let slots = Arc::new(Semaphore::new(settings.max_running.max(1)));
        Self {
            ember: Arc::new(ember),
            settings: Arc::new(settings),
            slots,
            waiting: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A slot to run model work in, waiting in the queue if there is room in it.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.settings.max_queued {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "the server is busy: every generation slot and queue place is taken; retry shortly",
            ));
        }
        let permit = self.slots.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        permit.map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"))
    }

    /// Runs `work` on a blocking thread once a slot is free.
    async fn run<T: Send + 'static>(&self, work: impl FnOnce(&Ember) -> Result<T, EmberError> + Send + 'static) -> Result<T, ApiError> {
        let permit = self.slot().await?;
        let ember = self.ember.clone();
        let out = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(&ember)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("worker failed: {e}")))?;
        out.map_err(ApiError::from)
    }
}

/// An error answer: `{"detail": message, "error": {"message", "type", "code"}}` (the Goodfire
/// SDK shows the body; the OpenAI SDK reads `error.message`).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl From<EmberError> for ApiError {
    fn from(e: EmberError) -> Self {
        Self::new(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            e.to_string(),
        )
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        Self::new(r.status(), r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500.. => "server_error",
            _ => "invalid_request_error",
        };
        let body = json!({ "detail": self.message, "error": { "message": self.message, "type": kind, "code": self.status.as_u16() } });
        (self.status, Json(body)).into_response()
    }
}

/// `Json` whose rejections (malformed JSON, wrong types, wrong content type) are [`ApiError`]s.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(req, state).await?;
        Ok(Self(value))
    }
}

/// The whole application: API routes, static files, and the layers around them.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/chat/completions", post(chat_completions))
        .route("/chat-attribution/compute-logits", post(compute_logits))
        .route("/chat-attribution/compute-features", post(compute_features))
        .route("/chat-attribution/contrast", post(contrast))
        .route("/features/search", get(search))
        .route("/features/rerank", post(rerank))
        .route("/features/", get(list))
        .route("/features/lookup", post(lookup))
        .route("/features/dashboard", post(dashboard))
        .route("/features/auto-edits", post(auto_edits))
        .route("/features/auto-conditional", post(auto_conditional))
        .route("/attributions/neighbors", post(neighbors))
        .route("/attributions/compute-logit-attribution", post(attribute))
        .route("/attributions/generate-contrastive-dataset", post(contrastive_dataset))
        .route("/chat/tokenize", post(tokenize))
        .route("/models", get(models));
    let openai = Router::new()
        .route("/chat/completions", post(chat_completions))
        .route("/models", get(models));
    let mut app = Router::new()
        .nest("/api/inference/v1", api)
        .nest("/v1", openai)
        .route("/health", get(health))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .with_state(state.clone());
    // Static files last: any path the API does not know falls through to them.
    let mut dirs = state.settings.static_dirs.iter().rev();
    if let Some(last) = dirs.next() {
        let mut service = Router::new().fallback_service(ServeDir::new(last));
        for dir in dirs {
            service = Router::new().fallback_service(ServeDir::new(dir).fallback(service));
        }
        app = app.fallback_service(service);
    }
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("x-base-url"),
        ]);
    app.layer(middleware::from_fn(log_request)).layer(cors)
}

/// Bearer-key check, when keys are configured.
async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.settings.api_keys.is_empty() {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(key) if state.settings.api_keys.iter().any(|k| k == key) => next.run(request).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "invalid API key").into_response(),
        None => ApiError::new(StatusCode::UNAUTHORIZED, "an API key is needed: Authorization: Bearer <key>").into_response(),
    }
}

/// One JSON line per request on stderr, with no query, body or credentials.
async fn log_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| request.uri().path().to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    let line = json!({
        "time": ember::now(), "method": method.as_str(), "route": route,
        "status": response.status().as_u16(), "ms": started.elapsed().as_millis() as u64,
    });
    eprintln!("{line}");
    response
}

// --- handlers -----------------------------------------------------------------------------

/// Liveness and load: generations running and requests queued.
async fn health(State(state): State<AppState>) -> Json<Value> {
    let running = state.settings.max_running.max(1) - state.slots.available_permits();
    Json(json!({ "status": "ok", "running": running, "queued": state.waiting.load(Ordering::SeqCst) }))
}

async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "object": "list", "data": [{ "id": state.ember.name, "object": "model", "created": 0, "owned_by": "kindling" }] }))
}

async fn chat_completions(State(state): State<AppState>, ApiJson(request): ApiJson<ChatRequest>) -> Result<Response, ApiError> {
    if !request.stream {
        let cancel = CancelToken::new();
        let value = state.run(move |e| e.chat_completion(&request, cancel)).await?;
        return Ok(Json(value).into_response());
    }
    // Everything a request can get wrong is found before the stream starts.
    let plan = state.ember.plan_chat(&request).map_err(ApiError::from)?;
    let permit = state.slot().await?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let ember = state.ember.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let send = |value: Value| tx.blocking_send(sse_frame(&value)).is_ok();
        let streamed = (|| {
            let mut chunks = ember.start_chat_chunks(&plan, CancelToken::new())?;
            while let Some(chunk) = chunks.next_chunk()? {
                if !send(chunk) {
                    chunks.cancel();
                }
            }
            Ok::<_, EmberError>(!chunks.was_cancelled())
        })();
        match streamed {
            Ok(true) => {
                let _ = tx.blocking_send(Bytes::from_static(b"data: [DONE]\n\n"));
            }
            Ok(false) => {}
            Err(e) => {
                // Headers are gone; the error travels as a last event the SDK reports.
                let _ = tx.blocking_send(sse_frame(&json!({ "error": { "message": e.to_string() } })));
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    let mut response = Response::new(Body::from_stream(stream));
    let headers: &mut HeaderMap = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// `data: <compact JSON>\n\n`, with `data: ` inside strings written as `data:\u0020` (the SDK
/// splits on that text).
fn sse_frame(value: &Value) -> Bytes {
    let json = value.to_string().replace("data: ", "data:\\u0020");
    Bytes::from(format!("data: {json}\n\n"))
}

macro_rules! post_handler {
    ($name:ident, $request:ty, $method:ident) => {
        async fn $name(State(state): State<AppState>, ApiJson(request): ApiJson<$request>) -> Result<Response, ApiError> {
            Ok(Json(state.run(move |e| e.$method(&request)).await?).into_response())
        }
    };
}

post_handler!(compute_logits, ember::LogitsRequest, compute_logits);
post_handler!(compute_features, ember::ComputeFeaturesRequest, compute_features);
post_handler!(contrast, ember::ContrastRequest, contrast);
post_handler!(rerank, ember::RerankRequest, rerank);
post_handler!(lookup, ember::LookupRequest, lookup);
post_handler!(dashboard, ember::DashboardRequest, dashboard);
post_handler!(neighbors, ember::NeighborsRequest, neighbors);
post_handler!(auto_edits, ember::SpecificationRequest, auto_edits);
post_handler!(auto_conditional, ember::SpecificationRequest, auto_conditional);
post_handler!(tokenize, ember::TokenizeRequest, tokenize);
post_handler!(attribute, ember::AttributionRequest, attribute);
post_handler!(contrastive_dataset, ember::ContrastiveDatasetRequest, contrastive_dataset);

/// Query parameters, repeated keys kept (`features/?feature_id=a&feature_id=b`).
fn query_pairs(uri: &axum::http::Uri) -> Vec<(String, String)> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).into_owned().collect()
}

async fn search(State(state): State<AppState>, uri: axum::http::Uri) -> Result<Json<Value>, ApiError> {
    let pairs = query_pairs(&uri);
    Ok(Json(state.run(move |e| e.search_query(&pairs)).await?))
}

async fn list(State(state): State<AppState>, uri: axum::http::Uri) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.ember.list_query(&query_pairs(&uri))?))
}
