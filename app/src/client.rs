//! One way to talk to an Ember endpoint, wherever the model runs: the engine in this page's
//! Web Worker, or a hosted Ember-compatible server over HTTP. Both speak the Goodfire wire
//! format (paths under `/api/inference/v1`, the same JSON bodies and stream chunks), so every
//! panel of the UI is written once.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use futures::channel::{mpsc, oneshot};
use kindling_ember::worker::{FromWorker, ToWorker};

use crate::boot::BootWorker;
use crate::logic::SseFrames;
pub use crate::logic::error_message;
use crate::neuronpedia::Remote;
use kindling_ember::Route;
use serde_json::{Value, json};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

/// The engine's worker scripts (trunk's loader shims, beside the page): the CPU-only build,
/// and the one with WebGPU, which is much larger and only fetched when WebGPU is chosen.
pub const CPU_WORKER_URL: &str = "./kindling-worker_loader.js";
pub const WEBGPU_WORKER_URL: &str = "./kindling-worker-webgpu_loader.js";
/// The Goodfire API's path prefix.
pub const API_PREFIX: &str = "/api/inference/v1";

/// This page's build id, from `<meta name="kindling-build">` (scripts/build-app.sh writes
/// it); `None` in a build that was not stamped.
pub fn page_build() -> Option<String> {
    let build = web_sys::window()?
        .document()?
        .query_selector("meta[name=kindling-build]")
        .ok()??
        .get_attribute("content")?;
    (!build.is_empty() && !build.starts_with("__")).then_some(build)
}

/// A failed request, as the user should read it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status (0: no answer at all).
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            0 => f.write_str(&self.message),
            s => write!(f, "{} (HTTP {s})", self.message),
        }
    }
}

impl ApiError {
    pub(crate) fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn from_js(context: &str, e: JsValue) -> Self {
        Self::new(0, format!("{context}: {}", js_message(&e)))
    }
}

/// The message of a JavaScript error (an `Error`'s message, or a thrown string).
pub(crate) fn js_message(e: &JsValue) -> String {
    e.dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| e.as_string())
        .unwrap_or_else(|| "unknown error".into())
}

/// Where a hosted endpoint is and how to sign in (the key stays in this tab's
/// sessionStorage, or this browser's localStorage when the user asks, and in the
/// `Authorization` header; never in a URL, a log or a share link).
#[derive(Debug, Clone, PartialEq)]
pub struct Hosted {
    pub base_url: String,
    pub model: String,
    pub api_key: String,
    /// The provider behind the endpoint and what it cannot do (route path → why), as its
    /// `GET models` says (`kindling_provider`); `None` for Kindling's engine or an endpoint
    /// that does not say.
    pub provider: Option<(String, std::collections::BTreeMap<String, String>)>,
}

/// A reply being streamed: its chunks (`chat.completion.chunk` JSON) and a way to stop it.
pub struct ChatStream {
    pub chunks: mpsc::UnboundedReceiver<Result<Value, ApiError>>,
    pub stop: Rc<dyn Fn()>,
}

/// What the worker tells the page while it loads.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadEvent {
    /// The worker's build id (its loader says it before anything else).
    Build(String),
    Progress {
        file: String,
        loaded: f64,
        total: f64,
        cached: bool,
    },
    Ready {
        backend: String,
        model: String,
        seconds: f64,
        /// Every file came from Cache Storage.
        cached: bool,
    },
    /// The SAE and the atlas are in too, `seconds` after the load began.
    FeaturesReady {
        seconds: f64,
    },
    /// Chat works, but the SAE or the atlas could not be loaded.
    FeaturesFailed(String),
    Failed(String),
}

/// Hears the steps of a call's long work: step, of how many, and what it does.
pub type OnStep = Rc<dyn Fn(usize, usize, String)>;

enum Pending {
    Once(oneshot::Sender<Result<Value, ApiError>>, Option<OnStep>),
    Stream(mpsc::UnboundedSender<Result<Value, ApiError>>),
}

/// The engine in a dedicated Web Worker.
pub struct LocalEngine {
    worker: web_sys::Worker,
    next_id: Cell<u64>,
    pending: Rc<RefCell<HashMap<u64, Pending>>>,
    _on_message: Closure<dyn FnMut(web_sys::MessageEvent)>,
    _on_error: Closure<dyn FnMut(web_sys::ErrorEvent)>,
}

impl LocalEngine {
    /// Starts the worker and has it load the model, SAE and atlas from beside the page on
    /// `backend` ("cpu" or "webgpu"); `on_load` hears progress, readiness or failure. The
    /// worker `boot.js` started early is taken over when it is for `backend`, and stopped
    /// otherwise.
    pub fn start(backend: &str, early: Option<BootWorker>, on_load: impl Fn(LoadEvent) + 'static) -> Result<Rc<Self>, ApiError> {
        let early = match early {
            Some(boot) if boot.backend == backend => Some(boot),
            Some(other) => {
                other.worker.terminate();
                None
            }
            None => None,
        };
        let worker = match &early {
            Some(boot) => boot.worker.clone(),
            None => {
                let options = web_sys::WorkerOptions::new();
                options.set_type(web_sys::WorkerType::Classic);
                // The loader's URL names this page's build: no HTTP cache can answer it with
                // another build's loader (which would say so, and be refused).
                let script = if backend == "webgpu" { WEBGPU_WORKER_URL } else { CPU_WORKER_URL };
                let script = match page_build() {
                    Some(build) => format!("{script}?build={build}"),
                    None => script.to_string(),
                };
                web_sys::Worker::new_with_options(&script, &options).map_err(|e| ApiError::from_js("cannot start the engine worker", e))?
            }
        };
        let pending: Rc<RefCell<HashMap<u64, Pending>>> = Rc::default();
        let on_load = Rc::new(on_load);
        let on_error = {
            let on_load = on_load.clone();
            Closure::<dyn FnMut(web_sys::ErrorEvent)>::new(move |event: web_sys::ErrorEvent| {
                on_load(LoadEvent::Failed(format!("the engine worker stopped: {}", event.message())));
            })
        };
        worker.set_onerror(Some(on_error.as_ref().unchecked_ref()));
        let base = web_sys::window()
            .and_then(|w| w.document())
            .and_then(|d| d.base_uri().ok().flatten())
            .unwrap_or_default();
        let load = ToWorker::Load {
            backend: backend.to_string(),
            base,
        }
        .to_text();
        let handle: Rc<dyn Fn(JsValue)> = {
            let pending = pending.clone();
            let worker = worker.clone();
            let on_load = on_load.clone();
            Rc::new(move |data: JsValue| {
                let Some(message) = data.as_string().as_deref().and_then(FromWorker::from_text) else {
                    return;
                };
                // The worker listens only once its wasm has started (a message posted before
                // that is dropped), so it says so first and the load request answers that.
                if message == FromWorker::Started {
                    if worker.post_message(&JsValue::from_str(&load)).is_err() {
                        on_load(LoadEvent::Failed("cannot reach the engine worker".into()));
                    }
                    return;
                }
                handle_worker_message(message, &pending, &*on_load);
            })
        };
        let on_message = {
            let handle = handle.clone();
            Closure::<dyn FnMut(web_sys::MessageEvent)>::new(move |event: web_sys::MessageEvent| handle(event.data()))
        };
        // Listening from here on; what the early worker said before is replayed first, in the
        // same task, so nothing comes in between.
        worker.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        if let Some(boot) = &early {
            boot.early_messages().into_iter().for_each(|data| handle(data));
            if let Some(error) = boot.error() {
                on_load(LoadEvent::Failed(format!("the engine worker stopped: {error}")));
            }
        }
        Ok(Rc::new(Self {
            worker,
            next_id: Cell::new(1),
            pending,
            _on_message: on_message,
            _on_error: on_error,
        }))
    }

    fn send(&self, method: &str, path: &str, body: Option<&Value>, pending: Pending) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        self.pending.borrow_mut().insert(id, pending);
        let message = ToWorker::Call {
            id,
            method: method.to_string(),
            path: path.to_string(),
            body: body.cloned().unwrap_or(Value::Null),
        };
        if let Err(e) = self.worker.post_message(&JsValue::from_str(&message.to_text())) {
            let error = ApiError::from_js("cannot reach the engine worker", e);
            match self.pending.borrow_mut().remove(&id) {
                Some(Pending::Once(tx, _)) => drop(tx.send(Err(error))),
                Some(Pending::Stream(tx)) => drop(tx.unbounded_send(Err(error))),
                None => {}
            }
        }
        id
    }

    fn cancel(&self, id: u64) {
        let _ = self.worker.post_message(&JsValue::from_str(&ToWorker::Cancel { id }.to_text()));
    }
}

impl LocalEngine {
    /// Stops the worker at once, whatever it is doing, and ends every call waiting on it
    /// with an error that says so (their futures may hold this engine for a while yet).
    pub fn terminate(&self) {
        self.worker.terminate();
        for (_, pending) in self.pending.borrow_mut().drain() {
            let stopped = ApiError::new(0, "stopped: the engine was restarted");
            match pending {
                Pending::Once(tx, _) => drop(tx.send(Err(stopped))),
                Pending::Stream(tx) => drop(tx.unbounded_send(Err(stopped))),
            }
        }
    }
}

impl Drop for LocalEngine {
    fn drop(&mut self) {
        self.worker.terminate();
    }
}

fn handle_worker_message(message: FromWorker, pending: &Rc<RefCell<HashMap<u64, Pending>>>, on_load: &impl Fn(LoadEvent)) {
    match message {
        FromWorker::Started => {}
        FromWorker::Build { build } => on_load(LoadEvent::Build(build)),
        FromWorker::Progress {
            file,
            loaded,
            total,
            cached,
        } => on_load(LoadEvent::Progress {
            file,
            loaded,
            total,
            cached,
        }),
        FromWorker::Ready {
            backend,
            model,
            seconds,
            cached,
        } => on_load(LoadEvent::Ready {
            backend,
            model,
            seconds,
            cached,
        }),
        FromWorker::FeaturesReady { seconds } => on_load(LoadEvent::FeaturesReady { seconds }),
        FromWorker::FeaturesFailed { message } => on_load(LoadEvent::FeaturesFailed(message)),
        FromWorker::LoadError { message } => on_load(LoadEvent::Failed(message)),
        FromWorker::Step { id, step, of, what } => {
            let listener = match pending.borrow().get(&id) {
                Some(Pending::Once(_, Some(on_step))) => Some(on_step.clone()),
                _ => None,
            };
            if let Some(on_step) = listener {
                on_step(step, of, what);
            }
        }
        FromWorker::Chunk { id, chunk } => {
            if let Some(Pending::Stream(tx)) = pending.borrow().get(&id) {
                let _ = tx.unbounded_send(Ok(chunk));
            }
        }
        FromWorker::Result { id, outcome } => {
            let result = outcome.into_result().map_err(|(status, message)| ApiError::new(status, message));
            match pending.borrow_mut().remove(&id) {
                Some(Pending::Once(tx, _)) => drop(tx.send(result)),
                // A stream ends by closing its channel; only an error needs saying.
                Some(Pending::Stream(tx)) => {
                    if let Err(e) = result {
                        let _ = tx.unbounded_send(Err(e));
                    }
                }
                None => {}
            }
        }
    }
}

/// The endpoint the UI is connected to.
#[derive(Clone)]
pub enum Client {
    Local(Rc<LocalEngine>, String),
    Hosted(Rc<Hosted>),
    /// Neuronpedia, called from this page.
    Neuronpedia(Rc<Remote>),
}

impl Client {
    /// The model name requests carry.
    pub fn model(&self) -> String {
        match self {
            Client::Local(_, model) => model.clone(),
            Client::Hosted(h) => h.model.clone(),
            Client::Neuronpedia(remote) => remote.source().model_name(),
        }
    }

    /// Why this endpoint cannot serve `route`, for greying out what needs it; `None` when it
    /// can (or may: a hosted endpoint says so when asked).
    pub fn limitation(&self, route: Route) -> Option<String> {
        match self {
            Client::Neuronpedia(_) => Remote::limitation(route).map(|why| format!("Neuronpedia cannot do this: {why}.")),
            Client::Hosted(hosted) => hosted.provider.as_ref().and_then(|(name, limits)| {
                Some(format!(
                    "{name}, behind this endpoint, cannot do this: {}.",
                    limits.get(route.path())?
                ))
            }),
            Client::Local(..) => None,
        }
    }

    /// The Neuronpedia provider, when that is what the page talks to.
    pub fn neuronpedia(&self) -> Option<Rc<Remote>> {
        match self {
            Client::Neuronpedia(remote) => Some(remote.clone()),
            _ => None,
        }
    }

    /// `GET path` (with its query), answered as JSON.
    pub async fn get(&self, path: &str) -> Result<Value, ApiError> {
        self.request("GET", path, None, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> Result<Value, ApiError> {
        self.request("POST", path, Some(body), None).await
    }

    /// `POST path`, telling `on_step` the steps of its work as they start (the in-page engine
    /// reports AutoSteer's; other endpoints answer without steps).
    pub async fn post_with_steps(&self, path: &str, body: Value, on_step: OnStep) -> Result<Value, ApiError> {
        self.request("POST", path, Some(body), Some(on_step)).await
    }

    async fn request(&self, method: &str, path: &str, body: Option<Value>, on_step: Option<OnStep>) -> Result<Value, ApiError> {
        match self {
            Client::Local(engine, _) => {
                let (tx, rx) = oneshot::channel();
                engine.send(method, path, body.as_ref(), Pending::Once(tx, on_step));
                rx.await.unwrap_or_else(|_| Err(ApiError::new(0, "the engine worker went away")))
            }
            Client::Neuronpedia(remote) => crate::neuronpedia::request(remote, method, path, body.as_ref()).await,
            Client::Hosted(hosted) => {
                let response = http(hosted, method, path, body.as_ref(), "application/json").await?;
                let text = JsFuture::from(response.text().map_err(|e| ApiError::from_js("reading the answer", e))?)
                    .await
                    .map_err(|e| ApiError::from_js("reading the answer", e))?;
                let text = text.as_string().unwrap_or_default();
                serde_json::from_str(&text).map_err(|_| ApiError::new(response.status(), "the endpoint's answer is not JSON"))
            }
        }
    }

    /// Streams a chat completion (`body` without `stream`: it is set here).
    pub fn chat(&self, mut body: Value) -> ChatStream {
        body["stream"] = json!(true);
        let (tx, rx) = mpsc::unbounded();
        match self {
            Client::Local(engine, _) => {
                let id = engine.send("POST", "/chat/completions", Some(&body), Pending::Stream(tx));
                let engine = engine.clone();
                ChatStream {
                    chunks: rx,
                    stop: Rc::new(move || engine.cancel(id)),
                }
            }
            Client::Hosted(_) | Client::Neuronpedia(_) => {
                let abort = web_sys::AbortController::new().ok();
                let signal = abort.as_ref().map(|a| a.signal());
                let client = self.clone();
                wasm_bindgen_futures::spawn_local(async move {
                    let streamed = match &client {
                        Client::Hosted(hosted) => stream_sse(hosted, &body, signal, &tx).await,
                        Client::Neuronpedia(remote) => crate::neuronpedia::stream_chat(remote, &body, signal, &tx).await,
                        Client::Local(..) => Ok(()),
                    };
                    if let Err(e) = streamed {
                        let _ = tx.unbounded_send(Err(e));
                    }
                });
                ChatStream {
                    chunks: rx,
                    stop: Rc::new(move || {
                        if let Some(a) = &abort {
                            a.abort();
                        }
                    }),
                }
            }
        }
    }
}

async fn http(hosted: &Hosted, method: &str, path: &str, body: Option<&Value>, accept: &str) -> Result<web_sys::Response, ApiError> {
    http_with_signal(hosted, method, path, body, accept, None).await
}

async fn http_with_signal(
    hosted: &Hosted,
    method: &str,
    path: &str,
    body: Option<&Value>,
    accept: &str,
    signal: Option<web_sys::AbortSignal>,
) -> Result<web_sys::Response, ApiError> {
    let init = web_sys::RequestInit::new();
    init.set_method(method);
    let headers = web_sys::Headers::new().map_err(|e| ApiError::from_js("headers", e))?;
    let _ = headers.set("Accept", accept);
    if !hosted.api_key.is_empty() {
        let _ = headers.set("Authorization", &format!("Bearer {}", hosted.api_key));
        // A request that carries the key follows no redirect: the key goes to the URL the user
        // typed and nowhere else (`RequestInit.redirect`, set by name: web-sys's setter needs a
        // feature of its own).
        let _ = js_sys::Reflect::set(&init, &"redirect".into(), &"error".into());
    }
    if let Some(body) = body {
        let _ = headers.set("Content-Type", "application/json");
        init.set_body(&JsValue::from_str(&body.to_string()));
    }
    init.set_headers(&headers);
    if let Some(signal) = &signal {
        init.set_signal(Some(signal));
    }
    let url = format!("{}{API_PREFIX}{path}", hosted.base_url.trim_end_matches('/'));
    let window = web_sys::window().ok_or_else(|| ApiError::new(0, "no window"))?;
    let response = JsFuture::from(window.fetch_with_str_and_init(&url, &init)).await.map_err(|e| {
        let why = if hosted.api_key.is_empty() {
            String::new()
        } else {
            " (a request with the API key follows no redirect)".into()
        };
        ApiError::from_js(&format!("cannot reach {}{why}", hosted.base_url), e)
    })?;
    let response: web_sys::Response = response.unchecked_into();
    if !response.ok() {
        let status = response.status();
        let text = match response.text() {
            Ok(p) => JsFuture::from(p).await.ok().and_then(|t| t.as_string()).unwrap_or_default(),
            Err(_) => String::new(),
        };
        return Err(ApiError::new(status, error_message(&text, &response.status_text())));
    }
    Ok(response)
}

/// Reads a server-sent-event reply and forwards its `data:` chunks until `[DONE]`.
async fn stream_sse(
    hosted: &Hosted,
    body: &Value,
    signal: Option<web_sys::AbortSignal>,
    tx: &mpsc::UnboundedSender<Result<Value, ApiError>>,
) -> Result<(), ApiError> {
    let response = http_with_signal(hosted, "POST", "/chat/completions", Some(body), "text/event-stream", signal.clone()).await?;
    read_sse(&response, signal.as_ref(), |data| {
        if data == "[DONE]" {
            return Ok(false);
        }
        let chunk: Value = serde_json::from_str(&data).map_err(|_| ApiError::new(0, "a stream chunk is not JSON"))?;
        if let Some(message) = chunk["error"]["message"].as_str() {
            return Err(ApiError::new(0, message));
        }
        Ok(tx.unbounded_send(Ok(chunk)).is_ok())
    })
    .await
    .map(|_| ())
}

/// Reads a server-sent-event body and hands each `data:` payload to `each`, which says
/// whether to go on. `Ok(true)` when the body ended, `Ok(false)` when `each` stopped or the
/// user did (a read that fails once `signal` is aborted); any other failure is an error.
pub(crate) async fn read_sse(
    response: &web_sys::Response,
    signal: Option<&web_sys::AbortSignal>,
    mut each: impl FnMut(String) -> Result<bool, ApiError>,
) -> Result<bool, ApiError> {
    let stream = response.body().ok_or_else(|| ApiError::new(0, "the reply has no body"))?;
    let reader: web_sys::ReadableStreamDefaultReader = stream.get_reader().unchecked_into();
    // The browser's own streaming UTF-8 decoder: a character cut between two reads waits for
    // its rest; bad bytes become U+FFFD.
    let decoder = web_sys::TextDecoder::new().map_err(|e| ApiError::from_js("this browser has no TextDecoder", e))?;
    let streaming = web_sys::TextDecodeOptions::new();
    streaming.set_stream(true);
    let mut frames = SseFrames::default();
    loop {
        let result = match JsFuture::from(reader.read()).await {
            Ok(result) => result,
            Err(_) if signal.is_some_and(web_sys::AbortSignal::aborted) => return Ok(false),
            Err(e) => return Err(ApiError::from_js("the stream broke off", e)),
        };
        let done = js_sys::Reflect::get(&result, &"done".into())
            .ok()
            .and_then(|d| d.as_bool())
            .unwrap_or(true);
        if done {
            return Ok(true);
        }
        let value = js_sys::Reflect::get(&result, &"value".into()).unwrap_or(JsValue::UNDEFINED);
        let text = decoder
            .decode_with_js_u8_array_and_options(&js_sys::Uint8Array::new(&value), &streaming)
            .map_err(|e| ApiError::from_js("the reply is not text", e))?;
        for data in frames.push(&text) {
            if !each(data)? {
                return Ok(false);
            }
        }
    }
}
