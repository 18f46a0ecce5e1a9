//! `kindling-server`: Kindling's engine behind HTTP.
//!
//! Every Goodfire API endpoint under `/api/inference/v1/` (the real `goodfire` and `openai`
//! SDKs drive it unchanged), OpenAI-style `/v1/chat/completions` and `/v1/models`, and the
//! playground's static files at `/`. The routes come from the protocol's route table
//! ([`kindling_ember::Route::ALL`]) and are answered by its [`dispatch`] over the local
//! engine ([`Ember`]); this crate only adapts them to HTTP:
//!
//! * model work (tokenizing included) runs on blocking threads, at most `max_running` at a
//!   time, with at most `max_queued` more waiting; beyond that a request gets 429 (the SDK
//!   backs off and retries);
//! * a client that goes away, queued or running, cancels its work and frees its place: every
//!   request's work holds a [`CancelToken`] that is cancelled when axum drops its handler;
//! * a streamed reply is one HTTP chunk per SSE event, never compressed, never with
//!   keep-alive comments (the SDK's parser needs exactly that);
//! * [`serve`] accepts at most `max_connections` connections, closes those that do not send
//!   their headers within `header_read_timeout`, and at shutdown cancels the work in flight;
//! * requests must name a host this server answers for (loopback names, the address the
//!   connection reached, `--allowed-host`), so a web page cannot reach it by DNS rebinding;
//!   browsers get CORS headers only for the origins `--cors-origin` allows;
//! * a handler that panics answers 500;
//! * errors are JSON with a clear message, in the statuses the SDK maps (goodfire-api.md §1.6);
//! * request logs are `tracing` events, one JSON line each: method, route, status, duration.
//!   Never the query string, the body or the `Authorization` header.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use futures_util::StreamExt as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use kindling_ember::routes::{API_PREFIX, OPENAI_PREFIX};
use kindling_ember::wire::ChatRequest;
use kindling_ember::{Ember, EmberError, Request as ApiRequest, Route, dispatch};
use kindling_engine::CancelToken;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tower::ServiceExt as _;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::services::ServeDir;

pub mod upstream;

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
    /// Origins whose pages may call the API (CORS). Empty: none but the server's own pages,
    /// which need no CORS. `*`: any origin, allowed only when keys are required.
    pub cors_origins: Vec<String>,
    /// Host names served besides `localhost`, `127.0.0.1`, `[::1]` and the address a
    /// connection reached (a deployment behind a load balancer names its own).
    pub allowed_hosts: Vec<String>,
    /// Connections open at once; more wait to be accepted.
    pub max_connections: usize,
    /// Time a connection has to send a request's headers.
    pub header_read_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            max_running: 2,
            max_queued: 16,
            max_body_bytes: 2 << 20,
            static_dirs: Vec::new(),
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            max_connections: 256,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

impl Settings {
    /// Refuses settings that would open the server to any web page.
    pub fn check(&self) -> Result<(), String> {
        if self.api_keys.is_empty() && self.cors_origins.iter().any(|o| o == "*") {
            return Err("--cors-origin '*' lets every web site a user visits drive this server: it needs --api-key too".into());
        }
        for origin in self.cors_origins.iter().filter(|o| *o != "*") {
            if HeaderValue::from_str(origin).is_err() || !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err(format!("--cors-origin {origin:?} is not an origin such as https://example.org"));
            }
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        Ok(())
    }
}

/// What answers the routes: Kindling's engine, or Neuronpedia (`--upstream`).
#[derive(Clone)]
pub enum Backend {
    Local(Arc<Ember>),
    Neuronpedia(Arc<upstream::Upstream>),
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    backend: Backend,
    settings: Arc<Settings>,
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    /// The parent of every request's cancel token: cancelled at shutdown.
    shutdown: CancelToken,
    keys: Arc<ApiKeys>,
}

impl AppState {
    pub fn new(ember: Ember, settings: Settings) -> Self {
        Self::with_backend(Backend::Local(Arc::new(ember)), settings)
    }

    pub fn with_backend(backend: Backend, settings: Settings) -> Self {
        let slots = Arc::new(Semaphore::new(settings.max_running.max(1)));
        let keys = Arc::new(ApiKeys::new(&settings.api_keys));
        Self {
            backend,
            settings: Arc::new(settings),
            slots,
            waiting: Arc::new(AtomicUsize::new(0)),
            shutdown: CancelToken::new(),
            keys,
        }
    }

    /// Whether requests need an API key.
    pub fn keyed(&self) -> bool {
        !self.settings.api_keys.is_empty()
    }

    /// A slot to run model work in, waiting in the queue if there is room in it. A request
    /// dropped while it waits (its client left) leaves the queue with it.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let ahead = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _place = QueuePlace(&self.waiting);
        if ahead >= self.settings.max_queued {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "the server is busy: every generation slot and queue place is taken; retry shortly",
            ));
        }
        self.slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"))
    }

    /// A cancel token for one request's work, cancelled at shutdown too.
    fn cancel_token(&self) -> CancelToken {
        self.shutdown.child()
    }

    /// Runs `work` on a blocking thread once a slot is free. If the request is dropped (its
    /// client went away) the work's cancel token is cancelled, so it stops at its next check
    /// and frees the slot.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&CancelToken) -> Result<T, EmberError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = self.slot().await?;
        let cancel = self.cancel_token();
        let _cancel_on_drop = CancelOnDrop(cancel.clone());
        let out = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(&cancel)
        })
        .await
        .map_err(worker_failed)?;
        out.map_err(ApiError::from)
    }
}

/// The accepted API keys, kept as SHA-256 digests.
struct ApiKeys(Vec<[u8; 32]>);

impl ApiKeys {
    fn new(keys: &[String]) -> Self {
        Self(keys.iter().map(|k| Sha256::digest(k.as_bytes()).into()).collect())
    }

    /// Whether `given` is one of the keys. Every key is compared, in constant time, as a
    /// digest, so neither a key's content nor its length shows in the time taken.
    fn accepts(&self, given: &str) -> bool {
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |found, key| found | key.ct_eq(&given))
            .into()
    }
}

fn worker_failed(e: tokio::task::JoinError) -> ApiError {
    let message = if e.is_panic() {
        "the engine failed on this request (a panic); the server goes on"
    } else {
        "the engine's worker was stopped"
    };
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
}

/// A place in the queue: given back when dropped, however the waiting request ends.
struct QueuePlace<'a>(&'a AtomicUsize);

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Cancels a request's work when the request is dropped.
struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
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
            403 => "permission_error",
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
    let (mut api, mut openai) = (Router::new(), Router::new());
    for route in Route::ALL {
        api = api.route(route.path(), endpoint(route));
        if route.openai_alias() {
            openai = openai.route(route.path(), endpoint(route));
        }
    }
    let mut app = Router::new()
        .nest(API_PREFIX, api)
        .nest(OPENAI_PREFIX, openai)
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
    with_guard_layers(app, &state.settings)
}

/// The layers every request passes, outermost first: CORS (only for allowed origins), the
/// Host check, the request log, and a 500 for a handler that panics.
pub fn with_guard_layers(app: Router, settings: &Settings) -> Router {
    let hosts = Arc::new(HostPolicy::new(&settings.allowed_hosts));
    let app = app
        .layer(CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send + 'static>| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the server failed on this request (a panic); it goes on",
            )
            .into_response()
        }))
        .layer(middleware::from_fn(log_request))
        .layer(middleware::from_fn_with_state(hosts, check_host));
    if settings.cors_origins.is_empty() {
        return app;
    }
    let origins = if settings.cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::from(Any)
    } else {
        AllowOrigin::list(settings.cors_origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    app.layer(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static("x-base-url"),
            ]),
    )
}

/// The address a connection reached, put on each of its requests by [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectionAddress(pub SocketAddr);

/// Which `Host` names this server answers to. A web page can point a DNS name of its own at
/// 127.0.0.1 (DNS rebinding) and then call this server as if same-origin; its requests still
/// carry that name, so refusing unknown names shuts the door.
#[derive(Debug)]
struct HostPolicy {
    names: Vec<String>,
}

impl HostPolicy {
    fn new(allowed: &[String]) -> Self {
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"].into_iter().map(String::from).collect();
        names.extend(allowed.iter().map(|h| normalize_host(h).to_string()));
        Self { names }
    }

    fn allows(&self, host: &str, reached: Option<SocketAddr>) -> bool {
        let name = normalize_host(host);
        self.names.iter().any(|n| n.eq_ignore_ascii_case(name)) || reached.is_some_and(|a| a.ip().to_string().eq_ignore_ascii_case(name))
    }
}

/// The name part of a `Host` value: no port, no IPv6 brackets, no trailing dot.
fn normalize_host(host: &str) -> &str {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.strip_suffix('.').unwrap_or(name)
}

async fn check_host(State(hosts): State<Arc<HostPolicy>>, request: Request, next: Next) -> Response {
    let reached = request.extensions().get::<ConnectionAddress>().map(|a| a.0);
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
        .map(str::to_owned);
    match host {
        Some(host) if hosts.allows(&host, reached) => next.run(request).await,
        Some(host) => ApiError::new(
            StatusCode::FORBIDDEN,
            format!("this server does not answer for host {host:?}; start it with --allowed-host to serve that name"),
        )
        .into_response(),
        None => ApiError::new(StatusCode::BAD_REQUEST, "the request names no Host").into_response(),
    }
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
        Some(key) if state.keys.accepts(key) => next.run(request).await,
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
    tracing::info!(
        target: "kindling_server::request",
        method = method.as_str(),
        route,
        status = response.status().as_u16(),
        ms = started.elapsed().as_millis() as u64
    );
    response
}

/// Serves `state`'s application on `listener` until `shutdown` resolves: at most
/// `max_connections` connections at once, each given `header_read_timeout` to send its
/// headers. At shutdown it stops accepting, cancels the model work in flight (it stops at its
/// next check) and waits up to `drain` for open connections to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let connections = Arc::new(Semaphore::new(state.settings.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(state.settings.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("the connection semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // wait a moment instead of spinning.
                    tracing::warn!("kindling-server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let reached = stream.local_addr().ok();
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            if let Some(address) = reached {
                request.extensions_mut().insert(ConnectionAddress(address));
            }
            app.clone().oneshot(request.map(Body::new))
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    state.shutdown.cancel();
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(drain) => tracing::warn!("kindling-server: connections still open after {} s; closing them", drain.as_secs()),
    }
    Ok(())
}

// --- handlers -----------------------------------------------------------------------------

/// Liveness and load: generations running and requests queued.
async fn health(State(state): State<AppState>) -> Json<Value> {
    let running = state.settings.max_running.max(1) - state.slots.available_permits();
    Json(json!({ "status": "ok", "running": running, "queued": state.waiting.load(Ordering::SeqCst) }))
}

/// The handler of one route of the table: its request parsed from the query string (GET) or
/// the JSON body (POST; axum's extractor answers a body that is not JSON with 400 and one
/// without a JSON content type with 415), then answered.
fn endpoint(route: Route) -> MethodRouter<AppState> {
    match route.method() {
        kindling_ember::Method::Get => get(move |State(state): State<AppState>, uri: axum::http::Uri| async move {
            answer(state, ApiRequest::from_query(route, uri.query().unwrap_or(""))?).await
        }),
        kindling_ember::Method::Post => post(move |State(state): State<AppState>, ApiJson(body): ApiJson<Value>| async move {
            answer(state, ApiRequest::from_json(route, body)?).await
        }),
    }
}

/// Answers a parsed request: a streamed chat as server-sent events, work on the model in a
/// slot on a blocking thread, table lookups at once.
async fn answer(state: AppState, request: ApiRequest) -> Result<Response, ApiError> {
    let ember = match &state.backend {
        Backend::Local(ember) => ember.clone(),
        Backend::Neuronpedia(upstream) => return answer_upstream(state.clone(), upstream.clone(), request).await,
    };
    if let ApiRequest::Chat(chat) = request {
        if chat.stream {
            return stream_chat(state, ember, chat).await;
        }
        let request = ApiRequest::Chat(chat);
        let value = state.run(move |cancel| dispatch(&*ember, &request, cancel)).await?;
        return Ok(Json(value).into_response());
    }
    if !request.route().is_model_work() {
        return Ok(Json(dispatch(&*ember, &request, &CancelToken::new())?).into_response());
    }
    let value = state.run(move |cancel| dispatch(&*ember, &request, cancel)).await?;
    Ok(Json(value).into_response())
}

/// Answers a request through Neuronpedia: each call to it blocks, so it runs in a slot on a
/// blocking thread like model work.
async fn answer_upstream(state: AppState, upstream: Arc<upstream::Upstream>, request: ApiRequest) -> Result<Response, ApiError> {
    if let ApiRequest::Chat(chat) = &request
        && chat.stream
    {
        let chat = chat.clone();
        return stream_upstream(state, upstream, chat).await;
    }
    // What Neuronpedia cannot do is refused at once, without a slot.
    if let Some(refused) = upstream.refusal(request.route()) {
        return Err(refused.into());
    }
    let value = state.run(move |_| upstream::answer(&upstream, &request)).await?;
    Ok(Json(value).into_response())
}

/// A streamed chat through Neuronpedia: its cumulative snapshots become Ember chunks.
async fn stream_upstream(state: AppState, upstream: Arc<upstream::Upstream>, request: ChatRequest) -> Result<Response, ApiError> {
    let planner = upstream.clone();
    stream_blocking(
        state,
        "the upstream",
        move || upstream::plan_stream(&planner, &request),
        move |plan, _, send| upstream::stream(&upstream, &plan, send),
    )
    .await
}

/// An SSE response around a body of frames.
fn sse_response(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers: &mut HeaderMap = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// A streamed chat reply from the engine: one SSE event per chunk, then `[DONE]`.
async fn stream_chat(state: AppState, ember: Arc<Ember>, request: ChatRequest) -> Result<Response, ApiError> {
    let planner = ember.clone();
    stream_blocking(
        state,
        "the engine",
        // Planning templates and tokenizes the conversation: CPU work, so it runs in the slot.
        move || planner.plan_chat(&request),
        move |plan, cancel, send| {
            let mut chunks = ember.start_chat_chunks(&plan, cancel.clone())?;
            while let Some(chunk) = chunks.next_chunk()? {
                if !send(chunk) {
                    chunks.cancel();
                }
            }
            Ok(!chunks.was_cancelled())
        },
    )
    .await
}

/// Streams a reply made on a blocking thread, in a slot. `plan` runs first, so every error a
/// request can cause is the HTTP answer; then `run` sends chunks through its `send` (false:
/// the client has gone) and says whether the reply ran to its end. Then `[DONE]`, or the
/// error as a last event, which the SDK reports (the headers are gone). A client that leaves
/// cancels the work's token.
async fn stream_blocking<P: Send + 'static>(
    state: AppState,
    what: &'static str,
    plan: impl FnOnce() -> Result<P, EmberError> + Send + 'static,
    run: impl FnOnce(P, &CancelToken, &dyn Fn(Value) -> bool) -> Result<bool, EmberError> + Send + 'static,
) -> Result<Response, ApiError> {
    let permit = state.slot().await?;
    let cancel = state.cancel_token();
    let cancel_on_drop = CancelOnDrop(cancel.clone());
    let (planned_tx, planned_rx) = oneshot::channel::<Result<(), EmberError>>();
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let plan = match plan() {
            Ok(plan) => plan,
            Err(e) => {
                let _ = planned_tx.send(Err(e));
                return;
            }
        };
        if planned_tx.send(Ok(())).is_err() {
            return;
        }
        let send = |value: Value| tx.blocking_send(sse_frame(&value)).is_ok();
        match run(plan, &cancel, &send) {
            Ok(true) => {
                let _ = tx.blocking_send(Bytes::from_static(b"data: [DONE]\n\n"));
            }
            Ok(false) => {}
            Err(e) => {
                let _ = tx.blocking_send(sse_frame(&json!({ "error": { "message": e.to_string() } })));
            }
        }
    });
    planned_rx
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{what} failed while planning the reply")))??;
    // The stream owns the cancel guard: a client that leaves mid-reply drops it.
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |bytes| {
        let _alive = &cancel_on_drop;
        Ok::<_, Infallible>(bytes)
    });
    Ok(sse_response(Body::from_stream(stream)))
}

/// `data: <compact JSON>\n\n`, with `data: ` inside strings written as `data:\u0020` (the SDK
/// splits on that text).
fn sse_frame(value: &Value) -> Bytes {
    let json = value.to_string().replace("data: ", "data:\\u0020");
    Bytes::from(format!("data: {json}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn boom() -> &'static str {
        panic!("a handler bug")
    }

    /// A route that panics, behind the same layers as the real routes.
    fn guarded(settings: &Settings) -> Router {
        let app = Router::new().route("/boom", get(boom)).route("/ok", get(|| async { "ok" }));
        with_guard_layers(app, settings)
    }

    async fn call(app: Router, request: Request) -> (StatusCode, HeaderMap, Value) {
        let response = app.oneshot(request).await.unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, headers, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    fn get_from(host: &str, path: &str) -> Request {
        Request::builder().uri(path).header(header::HOST, host).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500() {
        let (status, _, body) = call(guarded(&Settings::default()), get_from("localhost", "/boom")).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body["detail"].as_str().unwrap().contains("panic"), "{body}");
    }

    #[tokio::test]
    async fn only_known_host_names_are_served() {
        let settings = Settings {
            allowed_hosts: vec!["kindling.example.org".into()],
            ..Settings::default()
        };
        for host in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]:8080",
            "KINDLING.example.org.",
            "kindling.example.org:443",
        ] {
            let (status, _, _) = call(guarded(&settings), get_from(host, "/ok")).await;
            assert_eq!(status, StatusCode::OK, "{host}");
        }
        for host in ["evil.example", "localhost.evil.example", "127.0.0.1.evil.example:80", "[::2]"] {
            let (status, _, body) = call(guarded(&settings), get_from(host, "/ok")).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{host}");
            assert!(body["detail"].as_str().unwrap().contains("--allowed-host"));
        }
        // The address a connection reached counts (a server bound to 0.0.0.0, reached at its LAN address).
        let mut request = get_from("192.168.1.7:8080", "/ok");
        request
            .extensions_mut()
            .insert(ConnectionAddress("192.168.1.7:8080".parse().unwrap()));
        assert_eq!(call(guarded(&Settings::default()), request).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn cors_headers_only_for_allowed_origins() {
        let preflight = |origin: &str| {
            Request::builder()
                .method(Method::OPTIONS)
                .uri("/ok")
                .header(header::HOST, "localhost")
                .header(header::ORIGIN, origin)
                .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
                .body(Body::empty())
                .unwrap()
        };
        let none = Settings::default();
        let (_, headers, _) = call(guarded(&none), preflight("https://evil.example")).await;
        assert!(headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
        let listed = Settings {
            cors_origins: vec!["https://app.example".into()],
            ..Settings::default()
        };
        let (_, headers, _) = call(guarded(&listed), preflight("https://app.example")).await;
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "https://app.example");
        let (_, headers, _) = call(guarded(&listed), preflight("https://evil.example")).await;
        assert!(headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    }

    #[test]
    fn any_origin_needs_keys() {
        let open = Settings {
            cors_origins: vec!["*".into()],
            ..Settings::default()
        };
        assert!(open.check().unwrap_err().contains("--api-key"));
        let keyed = Settings {
            api_keys: vec!["k".into()],
            ..open
        };
        assert!(keyed.check().is_ok());
        let bad = Settings {
            cors_origins: vec!["evil.example".into()],
            ..Settings::default()
        };
        assert!(bad.check().is_err());
    }

    #[test]
    fn every_configured_key_is_accepted_and_nothing_else() {
        let keys = ApiKeys::new(&["first".into(), "second-key".into()]);
        assert!(keys.accepts("first") && keys.accepts("second-key"));
        for wrong in ["", "firs", "first ", "second-keyx", "SECOND-KEY"] {
            assert!(!keys.accepts(wrong), "{wrong:?}");
        }
        assert!(!ApiKeys::new(&[]).accepts(""));
    }

    #[test]
    fn host_names_lose_port_brackets_and_trailing_dot() {
        assert_eq!(normalize_host("localhost:8080"), "localhost");
        assert_eq!(normalize_host("[::1]:8080"), "::1");
        assert_eq!(normalize_host("[::1]"), "::1");
        assert_eq!(normalize_host("example.org."), "example.org");
        assert_eq!(normalize_host("example.org"), "example.org");
    }
}
