//! The engine in a dedicated Web Worker, so the page never freezes while the model runs.
//!
//! The page posts [`ToWorker`] messages: `load` (fetch the model, SAE and atlas from beside
//! the page, through Cache Storage, then build the engine), `call` (one Goodfire API request,
//! routed through the protocol's route table and answered exactly as the server would answer
//! it) and `cancel` (stop a streamed reply). The worker answers with [`FromWorker`] messages:
//! `progress`, `ready`/`load_error`, `chunk` and `result`.

#[cfg(not(target_arch = "wasm32"))]
fn main() {}

#[cfg(target_arch = "wasm32")]
fn main() {
    worker::start();
}

#[cfg(target_arch = "wasm32")]
mod worker {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::rc::Rc;
    use std::sync::Arc;

    use kindling_ember::worker::{FromWorker, Outcome, ToWorker};
    use kindling_ember::{Ember, EmberError, MODEL_NAME, Request, Route, dispatch};
    use kindling_engine::autosteer::{AUTOSTEER_STEPS, AutoSteerStep, OnStep};
    use kindling_engine::{Atlas, Backend, CancelToken, Model, Sae, StaticEmbedder};
    use serde_json::Value;
    use sha2::{Digest, Sha256};
    use wasm_bindgen::prelude::*;
    use wasm_bindgen_futures::{JsFuture, spawn_local};

    const MODEL_FILE: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    const SAE_FILE: &str = "kindling-sae.f16.safetensors";
    /// Cache Storage bucket; entries are keyed by URL plus the file's sha256, so a new file
    /// never meets a stale copy.
    const CACHE_NAME: &str = "kindling-assets-v1";

    thread_local! {
        static EMBER: RefCell<Option<Rc<Engines>>> = const { RefCell::new(None) };
        static STREAMS: RefCell<HashMap<u64, CancelToken>> = RefCell::new(HashMap::new());
        /// Whether every file of this load came from Cache Storage.
        static ALL_CACHED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
    }

    fn scope() -> web_sys::DedicatedWorkerGlobalScope {
        js_sys::global().unchecked_into()
    }

    fn post(message: FromWorker) {
        let _ = scope().post_message(&JsValue::from_str(&message.to_text()));
    }

    fn progress(file: &str, loaded: f64, total: f64, cached: bool) {
        post(FromWorker::Progress {
            file: file.to_string(),
            loaded,
            total,
            cached,
        });
    }

    pub fn start() {
        console_error_panic_hook::set_once();
        let on_message = Closure::<dyn FnMut(web_sys::MessageEvent)>::new(|event: web_sys::MessageEvent| {
            let Some(message) = event.data().as_string().as_deref().and_then(ToWorker::from_text) else {
                return;
            };
            match message {
                ToWorker::Load { backend, base } => spawn_local(load(backend, base)),
                ToWorker::Call { id, method, path, body } => spawn_local(call(id, method, path, body)),
                ToWorker::Cancel { id } => {
                    STREAMS.with(|s| s.borrow().get(&id).map(CancelToken::cancel));
                }
            }
        });
        scope().set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        on_message.forget();
        post(FromWorker::Started);
    }

    // --- loading ------------------------------------------------------------------------

    /// The engines of one load: every route runs on the CPU engine; with WebGPU, streamed
    /// chat runs on a second engine on the GPU (it generates without blocking on the device;
    /// the other operations read tensors back synchronously, which only the CPU can do here).
    struct Engines {
        cpu: Ember,
        gpu: Option<Ember>,
    }

    async fn load(backend: String, base: String) {
        let started = js_sys::Date::now();
        match build(&base, &backend).await {
            Ok(engines) => {
                let backend = if engines.gpu.is_some() { "webgpu" } else { "cpu" };
                EMBER.with(|e| *e.borrow_mut() = Some(Rc::new(engines)));
                post(FromWorker::Ready {
                    backend: backend.to_string(),
                    model: MODEL_NAME.to_string(),
                    cached: ALL_CACHED.get(),
                    seconds: (js_sys::Date::now() - started) / 1000.0,
                });
            }
            Err(message) => post(FromWorker::LoadError { message }),
        }
    }

    async fn build(base: &str, backend: &str) -> Result<Engines, String> {
        let on_gpu = match backend {
            "cpu" => false,
            "webgpu" if cfg!(feature = "webgpu") => true,
            "webgpu" => return Err("this worker is built without WebGPU".to_string()),
            other => return Err(format!("unknown backend {other:?}")),
        };
        // Assets sit beside the page: resolve against the page's directory.
        let dir = base.rfind('/').map_or("./", |i| &base[..=i]);
        let url = |file: &str| format!("{dir}{file}");
        let manifest_urls = [url("sae/manifest.json"), url("atlas/manifest.json")];
        let (sae_manifest, atlas_manifest) = futures::join!(fetch_json(&manifest_urls[0]), fetch_json(&manifest_urls[1]));
        // Offline, the manifests are missing: any cached copy is then the one to use.
        let sha = |manifest: &Option<Value>, file: &str| -> Option<String> {
            manifest.as_ref()?["files"].as_array()?.iter().find(|f| f["file"] == file)?["sha256"]
                .as_str()
                .map(str::to_string)
        };
        let model_sha = sae_manifest
            .as_ref()
            .and_then(|m| m["config"]["metadata"]["model_sha256"].as_str().map(str::to_string));

        let started = js_sys::Date::now();
        // All five files at once: the downloads overlap, and so does hashing them (SubtleCrypto
        // works off the worker's thread). The page lists each file's progress on its own.
        // The model file is by far the largest: the SAE and the atlas are built as soon as
        // their files are in, while the browser goes on reading the model's bytes into its
        // buffers (measured: the cached page reaches its first token ~100 ms sooner than when
        // everything waits for all five files).
        let sae_sha = sha(&sae_manifest, SAE_FILE);
        let (model_url, sae_url) = (url(MODEL_FILE), url(&format!("sae/{SAE_FILE}")));
        let atlas_url = |file: &str| url(&format!("atlas/{file}"));
        let (index_url, embedder_url, contexts_url) = (
            atlas_url("atlas.json"),
            atlas_url("embedder.safetensors"),
            atlas_url("contexts.safetensors"),
        );
        let sae_and_atlas = async {
            let (sae_bytes, index, embedder, contexts) = futures::try_join!(
                fetch_cached("sae", &sae_url, sae_sha.clone()),
                fetch_cached("atlas", &index_url, sha(&atlas_manifest, "atlas.json")),
                fetch_cached("embedder", &embedder_url, sha(&atlas_manifest, "embedder.safetensors")),
                fetch_cached("contexts", &contexts_url, sha(&atlas_manifest, "contexts.safetensors")),
            )?;
            let files_ms = js_sys::Date::now() - started;
            // Checked against the manifest as it was downloaded (or stored under its hash).
            let sae = match &sae_sha {
                Some(sha) => Sae::from_compact_checked(&sae_bytes, sha),
                None => Sae::from_compact(&sae_bytes),
            }
            .map_err(|e| format!("the SAE file: {e}"))?;
            let index = String::from_utf8(index).map_err(|_| "atlas.json is not UTF-8".to_string())?;
            let embedder = StaticEmbedder::from_safetensors(&embedder).map_err(|e| format!("the atlas embedder: {e}"))?;
            let mut atlas = Atlas::from_index(&index, &sae, embedder).map_err(|e| format!("the atlas: {e}"))?;
            atlas.load_contexts(&contexts).map_err(|e| format!("the atlas contexts: {e}"))?;
            let built_ms = js_sys::Date::now() - started - files_ms;
            Ok::<_, String>((sae, atlas, format!("SAE and atlas files {files_ms:.0} ms, built {built_ms:.0} ms")))
        };
        let (model_bytes, (sae, atlas, sae_and_atlas_phases)) =
            futures::try_join!(fetch_cached("model", &model_url, model_sha), sae_and_atlas)?;
        let mut phases = Phases::new(started);
        phases.mark("model file (and, meanwhile, the rest)");
        phases.note(sae_and_atlas_phases);

        progress("building the engine", 0.0, 0.0, false);
        let device = Backend::Cpu.device().map_err(|e| e.to_string())?;
        let model = Model::from_bytes(&model_bytes, Backend::Cpu, &device).map_err(|e| format!("the model file: {e}"))?;
        phases.mark("model");
        let gpu_model = if on_gpu { Some(gpu_model(&model_bytes).await?) } else { None };
        drop(model_bytes);
        phases.log();
        let gpu = gpu_model.map(|m| Ember::new(m, sae.clone(), atlas.clone(), MODEL_NAME));
        Ok(Engines {
            cpu: Ember::new(model, sae, atlas, MODEL_NAME),
            gpu,
        })
    }

    /// How long each step of loading took, logged once the engine is ready (the browser
    /// benchmark reads the line).
    struct Phases {
        last: f64,
        done: Vec<String>,
    }

    impl Phases {
        /// Steps timed from `started` (a `Date::now()`).
        fn new(started: f64) -> Self {
            Self {
                last: started,
                done: Vec::new(),
            }
        }

        /// A step timed elsewhere.
        fn note(&mut self, step: String) {
            self.done.push(format!("({step})"));
        }

        fn mark(&mut self, step: &str) {
            let now = js_sys::Date::now();
            self.done.push(format!("{step} {:.0} ms", now - self.last));
            self.last = now;
        }

        fn log(&self) {
            web_sys::console::info_1(&format!("kindling load: {}", self.done.join(", ")).into());
        }
    }

    /// The model on WebGPU.
    #[cfg(feature = "webgpu")]
    async fn gpu_model(model_bytes: &[u8]) -> Result<Model, String> {
        progress("starting WebGPU", 0.0, 0.0, false);
        let gpu = kindling_engine::burn::tensor::Device::wgpu_options()
            .init_async()
            .await
            .map_err(|e| format!("WebGPU could not start ({e}); choose CPU"))?;
        progress("moving the model to the GPU", 0.0, 0.0, false);
        Model::from_bytes(model_bytes, Backend::Wgpu, &gpu).map_err(|e| format!("the model on WebGPU: {e}"))
    }

    #[cfg(not(feature = "webgpu"))]
    async fn gpu_model(_: &[u8]) -> Result<Model, String> {
        unreachable!("build() refuses webgpu in a worker without it")
    }

    async fn fetch_json(url: &str) -> Option<Value> {
        let init = web_sys::RequestInit::new();
        init.set_cache(web_sys::RequestCache::NoCache);
        let response: web_sys::Response = JsFuture::from(scope().fetch_with_str_and_init(url, &init))
            .await
            .ok()?
            .unchecked_into();
        if !response.ok() {
            return None;
        }
        let text = JsFuture::from(response.text().ok()?).await.ok()?.as_string()?;
        serde_json::from_str(&text).ok()
    }

    /// A file's bytes, from Cache Storage when a copy of this version is there, else
    /// downloaded with progress, checked against its sha256 and cached.
    async fn fetch_cached(file: &str, url: &str, sha256: Option<String>) -> Result<Vec<u8>, String> {
        let cache: Option<web_sys::Cache> = match scope().caches() {
            Ok(caches) => JsFuture::from(caches.open(CACHE_NAME)).await.ok().map(JsCast::unchecked_into),
            Err(_) => None,
        };
        let key = match &sha256 {
            Some(sha) => format!("{url}?sha256={sha}"),
            None => url.to_string(),
        };
        if let Some(cache) = &cache {
            let options = web_sys::CacheQueryOptions::new();
            // Without a manifest (offline) any version will do.
            options.set_ignore_search(sha256.is_none());
            if let Ok(hit) = JsFuture::from(cache.match_with_str_and_options(&key, &options)).await {
                if let Some(response) = hit.dyn_ref::<web_sys::Response>() {
                    if let Ok(bytes) = read_all(file, response, true).await {
                        return Ok(bytes);
                    }
                }
            }
        }
        ALL_CACHED.set(false);
        let response: web_sys::Response = JsFuture::from(scope().fetch_with_str(url))
            .await
            .map_err(|_| format!("cannot download {url} (offline, and not cached yet?)"))?
            .unchecked_into();
        if !response.ok() {
            return Err(format!(
                "cannot download {url}: HTTP {} {}",
                response.status(),
                response.status_text()
            ));
        }
        let bytes = read_all(file, &response, false).await?;
        // One copy in JS memory serves the hash and the Cache Storage entry (each takes its
        // own snapshot of it).
        let js_copy = js_sys::Uint8Array::from(bytes.as_slice());
        if let Some(expected) = &sha256 {
            let found = sha256_hex(&bytes, &js_copy).await;
            if &found != expected {
                return Err(format!("{url} is damaged: sha256 {found}, expected {expected}"));
            }
        }
        if let Some(cache) = cache {
            if let Ok(copy) = web_sys::Response::new_with_opt_buffer_source(Some(&js_copy)) {
                // Stored while the engine is built: nothing waits for it, and a full quota
                // only costs the next load a download.
                wasm_bindgen_futures::spawn_local(async move {
                    let _ = JsFuture::from(cache.put_with_str(&key, &copy)).await;
                });
            }
        }
        Ok(bytes)
    }

    /// The sha256 of `bytes` in hex: the browser's own (SubtleCrypto, several times faster than
    /// hashing in wasm), or `sha2` where it is missing (a page served over plain http from
    /// another host is not a secure context).
    /// `js_copy` holds the same bytes in JS memory: `digest()` reads its input after this
    /// function yields, so it cannot be a view of wasm memory.
    async fn sha256_hex(bytes: &[u8], js_copy: &js_sys::Uint8Array) -> String {
        let hex = |digest: &[u8]| digest.iter().map(|b| format!("{b:02x}")).collect::<String>();
        if let Some(subtle) = scope().crypto().ok().map(|c| c.subtle()) {
            if let Ok(promise) = subtle.digest_with_str_and_buffer_source("SHA-256", js_copy) {
                if let Ok(digest) = JsFuture::from(promise).await {
                    return hex(&js_sys::Uint8Array::new(&digest).to_vec());
                }
            }
        }
        hex(&Sha256::digest(bytes))
    }

    /// Reads a response body, posting progress about every megabyte.
    async fn read_all(file: &str, response: &web_sys::Response, cached: bool) -> Result<Vec<u8>, String> {
        let total: f64 = response
            .headers()
            .get("content-length")
            .ok()
            .flatten()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let report = |loaded: usize| progress(file, loaded as f64, total, cached);
        let body = response.body().ok_or_else(|| format!("{file}: empty response"))?;
        let reader: web_sys::ReadableStreamDefaultReader = body.get_reader().unchecked_into();
        let mut bytes = Vec::with_capacity(total as usize);
        let mut reported = 0;
        report(0);
        loop {
            let chunk = JsFuture::from(reader.read())
                .await
                .map_err(|_| format!("{file}: the download broke off"))?;
            if js_sys::Reflect::get(&chunk, &"done".into())
                .ok()
                .and_then(|d| d.as_bool())
                .unwrap_or(true)
            {
                break;
            }
            let value = js_sys::Reflect::get(&chunk, &"value".into()).unwrap_or(JsValue::UNDEFINED);
            // Straight into the buffer: `to_vec` would copy every chunk twice.
            let chunk = js_sys::Uint8Array::new(&value);
            let start = bytes.len();
            bytes.resize(start + chunk.length() as usize, 0);
            chunk.copy_to(&mut bytes[start..]);
            if bytes.len() - reported >= 1 << 20 {
                reported = bytes.len();
                report(reported);
            }
        }
        progress(file, bytes.len() as f64, bytes.len() as f64, cached);
        Ok(bytes)
    }

    // --- calls --------------------------------------------------------------------------

    async fn call(id: u64, method: String, path: String, body: Value) {
        let result = answer(id, &method, &path, body).await;
        post(FromWorker::Result {
            id,
            outcome: Outcome::from_result(result),
        });
    }

    /// One Goodfire API request, routed through the same table as the server's.
    async fn answer(id: u64, method: &str, path: &str, body: Value) -> Result<Value, EmberError> {
        let Some(engines) = EMBER.with(|e| e.borrow().clone()) else {
            return Err(EmberError::Unavailable("the model is still loading".into()));
        };
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let route = Route::find(method, path).ok_or_else(|| EmberError::NoRoute {
            method: method.to_string(),
            path: path.to_string(),
        })?;
        let request = match route.method() {
            kindling_ember::Method::Get => Request::from_query(route, query)?,
            kindling_ember::Method::Post => Request::from_json(route, body)?,
        };
        if let Request::Chat(chat) = &request
            && chat.stream
        {
            return stream_chat(&engines, id, chat).await;
        }
        // A request runs to its end here: the worker's one thread hears no cancel meanwhile
        // (the page stops AutoSteer by restarting the worker). AutoSteer's steps are told as
        // they start, so the page shows where it is.
        if let Request::AutoEdits(spec) = &request {
            let on_step = OnStep(Arc::new(move |s: &AutoSteerStep| {
                post(FromWorker::Step {
                    id,
                    step: s.step,
                    of: AUTOSTEER_STEPS,
                    what: s.what.clone(),
                })
            }));
            let reply = engines.cpu.auto_edits_reporting(spec, &CancelToken::new(), Some(on_step))?;
            return serde_json::to_value(reply).map_err(|e| EmberError::Failed(e.to_string()));
        }
        dispatch(&engines.cpu, &request, &CancelToken::new())
    }

    /// Streams a reply chunk by chunk, going back to the event loop between chunks so that a
    /// `cancel` message (the stop button) is heard.
    async fn stream_chat(engines: &Engines, id: u64, request: &kindling_ember::wire::ChatRequest) -> Result<Value, EmberError> {
        let ember = engines.gpu.as_ref().unwrap_or(&engines.cpu);
        let plan = ember.plan_chat(request)?;
        let cancel = CancelToken::new();
        STREAMS.with(|s| s.borrow_mut().insert(id, cancel.clone()));
        let result = (async {
            let mut chunks = ember.start_chat_chunks(&plan, cancel.clone())?;
            loop {
                let chunk = if engines.gpu.is_some() {
                    chunks.next_chunk_async().await?
                } else {
                    chunks.next_chunk()?
                };
                let Some(chunk) = chunk else { break };
                post(FromWorker::Chunk { id, chunk });
                yield_to_event_loop().await;
                if cancel.is_cancelled() {
                    chunks.cancel();
                }
            }
            Ok(Value::Null)
        })
        .await;
        STREAMS.with(|s| s.borrow_mut().remove(&id));
        result
    }

    async fn yield_to_event_loop() {
        let promise = js_sys::Promise::new(&mut |resolve, _| {
            let _ = scope().set_timeout_with_callback(&resolve);
        });
        let _ = JsFuture::from(promise).await;
    }
}
