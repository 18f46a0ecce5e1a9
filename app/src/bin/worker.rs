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

    use futures::channel::oneshot;
    use futures::future::{FutureExt as _, LocalBoxFuture, Shared};
    use kindling_ember::worker::{FromWorker, Outcome, ToWorker};
    use kindling_ember::{Ember, EmberError, MODEL_NAME, Request, Route, dispatch};
    use kindling_engine::atlas::MAP_FILE;
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

    /// The SAE and the atlas being built after the model ([`attach_features`]).
    type FeaturesLoad = Shared<LocalBoxFuture<'static, Result<(), String>>>;

    thread_local! {
        static EMBER: RefCell<Option<Rc<Engines>>> = const { RefCell::new(None) };
        static FEATURES: RefCell<Option<FeaturesLoad>> = const { RefCell::new(None) };
        /// Streamed replies in progress (the features' build waits while there are any).
        static GENERATING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        /// Told when the last streamed reply ends (what the features' build waits on).
        static IDLE_WAITERS: RefCell<Vec<oneshot::Sender<()>>> = const { RefCell::new(Vec::new()) };
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
        match build(&base, &backend, started).await {
            Ok(Loaded {
                engines,
                features,
                start_features,
            }) => {
                let backend = if engines.gpu.is_some() { "webgpu" } else { "cpu" };
                let engines = Rc::new(engines);
                EMBER.with(|e| *e.borrow_mut() = Some(engines.clone()));
                post(FromWorker::Ready {
                    backend: backend.to_string(),
                    model: MODEL_NAME.to_string(),
                    cached: ALL_CACHED.get(),
                    seconds: (js_sys::Date::now() - started) / 1000.0,
                });
                // While the user types: first the prompt prefix every unsteered chat shares
                // (on the CPU; a chat that comes first makes it itself), then the SAE and the
                // atlas, if they were waiting for the engine.
                let warm = (engines.gpu.is_none()).then(|| engines.clone());
                spawn_local(async move {
                    yield_to_event_loop().await;
                    if let Some(engines) = warm.filter(|_| GENERATING.get() == 0)
                        && let Err(e) = engines.cpu.warm_prompt_prefix()
                    {
                        web_sys::console::warn_1(&format!("kindling: the shared prompt prefix: {e}").into());
                    }
                    if let Some(start) = start_features {
                        let _ = start.send(());
                    }
                });
                let features = attach_features(engines, features, started).boxed_local().shared();
                FEATURES.with(|f| *f.borrow_mut() = Some(features.clone()));
                spawn_local(features.map(|_| ()));
            }
            Err(message) => post(FromWorker::LoadError { message }),
        }
    }

    /// The SAE and the atlas, built.
    type BuiltFeatures = Result<(Sae, Atlas), String>;

    /// What [`build`] hands on: the engines, ready for chat, and the SAE and atlas to come.
    struct Loaded {
        engines: Engines,
        features: oneshot::Receiver<BuiltFeatures>,
        /// Lets the features' build begin (`None`: it has been let begin already).
        start_features: Option<oneshot::Sender<()>>,
    }

    /// The files the SAE and the atlas are built from, as they arrive.
    struct FeatureFiles {
        sae: Vec<u8>,
        sae_sha: Option<String>,
        index: Vec<u8>,
        embedder: Vec<u8>,
        contexts: Vec<u8>,
        /// The feature map, optional: an atlas without one (or a failed download) leaves
        /// only the map out.
        map: Option<Vec<u8>>,
        /// How long they took to arrive, for the load log.
        files_ms: f64,
    }

    /// Builds the model: chat can start. The SAE's and the atlas's files download alongside,
    /// and they are built as [`Loaded`] says.
    async fn build(base: &str, backend: &str, started: f64) -> Result<Loaded, String> {
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
        let (sae_manifest, atlas_manifest, stored_model) = futures::join!(
            fetch_json(&manifest_urls[0]),
            fetch_json(&manifest_urls[1]),
            opfs::StoredModel::open()
        );
        // Offline, the manifests are missing: any cached copy is then the one to use.
        let sha = |manifest: &Option<Value>, file: &str| -> Option<String> {
            manifest.as_ref()?["files"].as_array()?.iter().find(|f| f["file"] == file)?["sha256"]
                .as_str()
                .map(str::to_string)
        };
        let model_sha = sae_manifest
            .as_ref()
            .and_then(|m| m["config"]["metadata"]["model_sha256"].as_str().map(str::to_string));

        // All the files at once: the downloads overlap, and so does hashing them (SubtleCrypto
        // works off the worker's thread). The page lists each file's progress on its own.
        let sae_sha = sha(&sae_manifest, SAE_FILE);
        let atlas_url = |file: &str| url(&format!("atlas/{file}"));
        let feature_files = {
            let (sae_url, index_url, embedder_url, contexts_url) = (
                url(&format!("sae/{SAE_FILE}")),
                atlas_url("atlas.json"),
                atlas_url("embedder.safetensors"),
                atlas_url("contexts.safetensors"),
            );
            let (index_sha, embedder_sha, contexts_sha, map_sha) = (
                sha(&atlas_manifest, "atlas.json"),
                sha(&atlas_manifest, "embedder.safetensors"),
                sha(&atlas_manifest, "contexts.safetensors"),
                sha(&atlas_manifest, MAP_FILE),
            );
            // Offline (no manifest), a cached map is used if there is one.
            let map_wanted = map_sha.is_some() || atlas_manifest.is_none();
            let map_url = atlas_url(MAP_FILE);
            async move {
                let map = async {
                    if !map_wanted {
                        return Ok(None);
                    }
                    Ok(fetch_cached("map", &map_url, map_sha, Keep::CacheStorage)
                        .await
                        .inspect_err(|e| web_sys::console::warn_1(&format!("kindling: no feature map: {e}").into()))
                        .ok())
                };
                let (sae, index, embedder, contexts, map) = futures::try_join!(
                    fetch_cached("sae", &sae_url, sae_sha.clone(), Keep::CacheStorage),
                    fetch_cached("atlas", &index_url, index_sha, Keep::CacheStorage),
                    fetch_cached("embedder", &embedder_url, embedder_sha, Keep::CacheStorage),
                    fetch_cached("contexts", &contexts_url, contexts_sha, Keep::CacheStorage),
                    map,
                )?;
                Ok(FeatureFiles {
                    sae,
                    sae_sha,
                    index,
                    embedder,
                    contexts,
                    map,
                    files_ms: js_sys::Date::now() - started,
                })
            }
        };
        // Chat needs only the model. While the model downloads, the worker's thread is mostly
        // idle: the SAE and the atlas are built as soon as their files are in. When the model
        // comes from OPFS it is in at once: they wait until the engine is ready for chat.
        let (start_features, may_start) = oneshot::channel::<()>();
        let (send_features, features) = oneshot::channel();
        spawn_local(async move {
            let files = feature_files.await;
            let _ = may_start.await;
            let _ = send_features.send(build_features(files).await);
        });

        let mut phases = Phases::new(started);
        let mut stored_model = stored_model;
        let stored = stored_model.as_ref().and_then(|s| s.read(model_sha.as_deref()));
        let from_opfs = stored.is_some();
        let start_features = match stored {
            Some(_) => Some(start_features),
            None => {
                let _ = start_features.send(());
                None
            }
        };
        let model_url = url(MODEL_FILE);
        let mut model_bytes = match stored {
            Some(bytes) => {
                progress("model", bytes.len() as f64, bytes.len() as f64, true);
                phases.mark("model file (OPFS)");
                bytes
            }
            None => {
                // A whole copy of this version that could not be opened (another tab's
                // worker holds its exclusive handle) is left alone: replacing it would drop
                // its sha256 first and then fail to write, leaving no usable copy offline.
                let held = stored_model.as_ref().is_some_and(|s| s.holds(model_sha.as_deref()));
                if held {
                    web_sys::console::info_1(&"kindling load: the stored model is held by another page: downloading it".into());
                }
                let replaceable = stored_model.take().filter(|_| !held);
                let bytes = fetch_model(&model_url, model_sha.clone(), replaceable).await?;
                phases.mark("model file");
                bytes
            }
        };
        progress("building the engine", 0.0, 0.0, false);
        let device = Backend::Cpu.device().map_err(|e| e.to_string())?;
        let model = match Model::from_bytes(&model_bytes, Backend::Cpu, &device) {
            Ok(model) => model,
            // The stored copy does not load (damaged on disk since it was checked): it is
            // forgotten, and the model downloaded again.
            Err(e) if from_opfs => {
                web_sys::console::warn_1(&format!("kindling load: the stored model does not load ({e}): downloading it again").into());
                if let Some(stored) = stored_model.take() {
                    stored.forget().await;
                }
                model_bytes = fetch_model(&model_url, model_sha, opfs::StoredModel::open().await).await?;
                Model::from_bytes(&model_bytes, Backend::Cpu, &device).map_err(|e| format!("the model file: {e}"))?
            }
            Err(e) => return Err(format!("the model file: {e}")),
        };
        phases.mark("model");
        let gpu_model = if on_gpu { Some(gpu_model(&model_bytes).await?) } else { None };
        drop(model_bytes);
        phases.log();
        Ok(Loaded {
            engines: Engines {
                cpu: Ember::model_only(model, MODEL_NAME),
                gpu: gpu_model.map(|m| Ember::model_only(m, MODEL_NAME)),
            },
            features,
            start_features,
        })
    }

    /// Builds the SAE and the atlas from their files. Each step first waits while a reply is
    /// being generated, so a chat started meanwhile is not held up by more than one step.
    async fn build_features(files: Result<FeatureFiles, String>) -> BuiltFeatures {
        let files = files?;
        let files_ms = files.files_ms;
        let build_started = js_sys::Date::now();
        let mut busy_ms = wait_while_generating().await;
        // Checked against the manifest as it was downloaded (or stored under its hash).
        let sae = match &files.sae_sha {
            Some(sha) => Sae::from_compact_checked(&files.sae, sha),
            None => Sae::from_compact(&files.sae),
        }
        .map_err(|e| format!("the SAE file: {e}"))?;
        drop(files.sae);
        busy_ms += wait_while_generating().await;
        let index = String::from_utf8(files.index).map_err(|_| "atlas.json is not UTF-8".to_string())?;
        let embedder = StaticEmbedder::from_safetensors(&files.embedder).map_err(|e| format!("the atlas embedder: {e}"))?;
        busy_ms += wait_while_generating().await;
        let mut atlas = Atlas::from_index(&index, &sae, embedder).map_err(|e| format!("the atlas: {e}"))?;
        busy_ms += wait_while_generating().await;
        atlas
            .load_contexts(&files.contexts)
            .map_err(|e| format!("the atlas contexts: {e}"))?;
        if let Some(map) = files.map
            && let Err(e) = atlas.load_map(&map)
        {
            web_sys::console::warn_1(&format!("kindling: the feature map is left out: {e}").into());
        }
        let built_ms = js_sys::Date::now() - build_started - busy_ms;
        web_sys::console::info_1(
            &format!("kindling load: features: files {files_ms:.0} ms, built {built_ms:.0} ms (after waiting {busy_ms:.0} ms for replies)")
                .into(),
        );
        Ok((sae, atlas))
    }

    /// Attaches the SAE and the atlas to the engines once they are built, and tells the page.
    async fn attach_features(engines: Rc<Engines>, features: oneshot::Receiver<BuiltFeatures>, started: f64) -> Result<(), String> {
        let result = match features.await {
            Ok(Ok((sae, atlas))) => {
                if let Some(gpu) = &engines.gpu {
                    gpu.attach_features(sae.clone(), atlas.clone());
                }
                engines.cpu.attach_features(sae, atlas);
                Ok(())
            }
            Ok(Err(message)) => Err(message),
            Err(_) => Err("the features' build stopped".to_string()),
        };
        match &result {
            Ok(()) => post(FromWorker::FeaturesReady {
                seconds: (js_sys::Date::now() - started) / 1000.0,
            }),
            Err(message) => post(FromWorker::FeaturesFailed { message: message.clone() }),
        }
        result
    }

    /// Goes back to the event loop, then waits while any reply is being generated (woken when
    /// the last one ends, not by polling); returns how long it waited for replies (ms).
    async fn wait_while_generating() -> f64 {
        yield_to_event_loop().await;
        let since = js_sys::Date::now();
        while GENERATING.get() > 0 {
            let (tell, idle) = oneshot::channel();
            IDLE_WAITERS.with(|w| w.borrow_mut().push(tell));
            let _ = idle.await;
        }
        js_sys::Date::now() - since
    }

    /// Waits for the SAE and the atlas (after [`FromWorker::Ready`]; an error says why they
    /// will not come).
    async fn features_ready() -> Result<(), EmberError> {
        let features = FEATURES.with(|f| f.borrow().clone());
        match features {
            Some(features) => features
                .await
                .map_err(|e| EmberError::Failed(format!("the features could not be loaded: {e}"))),
            None => Err(EmberError::Unavailable("the model is still loading".into())),
        }
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

    /// The model file when OPFS holds no copy of this version ([`opfs`]): as [`fetch_cached`]
    /// finds it, then stored in OPFS (`stored`) where it can be.
    async fn fetch_model(url: &str, sha256: Option<String>, stored: Option<opfs::StoredModel>) -> Result<Vec<u8>, String> {
        let keep = match stored {
            Some(stored) if sha256.is_some() => Keep::Opfs(stored),
            _ => Keep::CacheStorage,
        };
        fetch_cached("model", url, sha256, keep).await
    }

    /// Where a downloaded file is kept for the next load.
    enum Keep {
        CacheStorage,
        /// The origin-private file system, or Cache Storage where writing there fails.
        Opfs(opfs::StoredModel),
    }

    /// A file's bytes, from Cache Storage when a copy of this version is there, else
    /// downloaded with progress, checked against its sha256 and kept as `keep` says.
    async fn fetch_cached(file: &str, url: &str, sha256: Option<String>, keep: Keep) -> Result<Vec<u8>, String> {
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
            if let Ok(hit) = JsFuture::from(cache.match_with_str_and_options(&key, &options)).await
                && let Some(response) = hit.dyn_ref::<web_sys::Response>()
                && let Ok(bytes) = read_all(file, response, true).await
            {
                // A model that should be in OPFS but came from here (its stored copy was
                // damaged, or stored by an older build) is stored there too: OPFS is where
                // the next load, and an offline one, looks first.
                if let (Keep::Opfs(stored), Some(sha)) = (keep, sha256) {
                    let js_copy = js_sys::Uint8Array::from(bytes.as_slice());
                    spawn_local(async move {
                        let outcome = if stored.replace(&js_copy, &sha).await.is_ok() {
                            "stored"
                        } else {
                            "refused"
                        };
                        web_sys::console::info_1(&format!("kindling load: the model from Cache Storage {outcome} in OPFS").into());
                    });
                }
                return Ok(bytes);
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
        // Stored while the engine is built: nothing waits for it, and a full quota only costs
        // the next load a download. The model goes to OPFS, or to Cache Storage where it cannot.
        spawn_local(async move {
            if let (Keep::Opfs(stored), Some(sha)) = (keep, &sha256) {
                let since = js_sys::Date::now();
                let stored = stored.replace(&js_copy, sha).await.is_ok();
                let outcome = if stored { "stored in OPFS" } else { "refused by OPFS" };
                web_sys::console::info_1(&format!("kindling load: model {outcome} in {:.0} ms", js_sys::Date::now() - since).into());
                if stored {
                    return;
                }
            }
            if let Some(cache) = cache
                && let Ok(copy) = web_sys::Response::new_with_opt_buffer_source(Some(&js_copy))
            {
                let _ = JsFuture::from(cache.put_with_str(&key, &copy)).await;
            }
        });
        Ok(bytes)
    }

    /// The sha256 of `bytes` in hex: the browser's own (SubtleCrypto, several times faster than
    /// hashing in wasm), or `sha2` where it is missing (a page served over plain http from
    /// another host is not a secure context).
    /// `js_copy` holds the same bytes in JS memory: `digest()` reads its input after this
    /// function yields, so it cannot be a view of wasm memory.
    async fn sha256_hex(bytes: &[u8], js_copy: &js_sys::Uint8Array) -> String {
        let hex = |digest: &[u8]| digest.iter().map(|b| format!("{b:02x}")).collect::<String>();
        if let Some(subtle) = scope().crypto().ok().map(|c| c.subtle())
            && let Ok(promise) = subtle.digest_with_str_and_buffer_source("SHA-256", js_copy)
            && let Ok(digest) = JsFuture::from(promise).await
        {
            return hex(&js_sys::Uint8Array::new(&digest).to_vec());
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

    /// The model file in the origin-private file system (OPFS). A synchronous access handle
    /// reads it straight into wasm memory, where Cache Storage hands it over in chunks through
    /// the event loop (measured on the cached page: 98 MB in ~0.2 s against ~0.75 s). It is
    /// written off the worker's thread (a writable stream of the downloaded bytes' JS copy):
    /// writing it through the synchronous handle held the first load up by ~0.6 s. The copy's
    /// sha256 sits beside it, removed first and written last, so a copy cut short (the page
    /// closed while it was written) is never taken for a whole one.
    mod opfs {
        use js_sys::Uint8Array;
        use wasm_bindgen::{JsCast, JsValue};
        use wasm_bindgen_futures::JsFuture;
        use web_sys::{FileSystemDirectoryHandle, FileSystemFileHandle, FileSystemSyncAccessHandle, FileSystemWritableFileStream};

        const MODEL: &str = "model.gguf";
        const MODEL_SHA: &str = "model.gguf.sha256";
        /// Tries at opening the stored model's exclusive handle, and the wait between them.
        const OPEN_TRIES: usize = 10;
        const OPEN_RETRY_MS: i32 = 100;

        /// The stored model: its sha256, and the file open for reading (and locked) when
        /// there is a whole copy, until dropped.
        pub struct StoredModel {
            dir: FileSystemDirectoryHandle,
            sha256: Option<String>,
            access: Option<FileSystemSyncAccessHandle>,
        }

        async fn file(dir: &FileSystemDirectoryHandle, name: &str, create: bool) -> Result<FileSystemFileHandle, JsValue> {
            let options = web_sys::FileSystemGetFileOptions::new();
            options.set_create(create);
            Ok(JsFuture::from(dir.get_file_handle_with_options(name, &options))
                .await?
                .unchecked_into())
        }

        impl StoredModel {
            /// What OPFS holds; `None` where there is no OPFS.
            pub async fn open() -> Option<Self> {
                let storage = super::scope().navigator().storage();
                let dir: FileSystemDirectoryHandle = JsFuture::from(storage.get_directory()).await.ok()?.unchecked_into();
                let sha256 = Self::stored_sha(&dir).await;
                // Opened now, beside the manifests' requests, only to be read (it takes ~0.1 s);
                // another tab may hold it, and then this one reads elsewhere.
                let access = match sha256 {
                    Some(_) => match file(&dir, MODEL, false).await {
                        Ok(model) => {
                            // The handle is exclusive: on a reload, the closing page's worker
                            // may hold it for a moment longer. Offline, the stored copy is the
                            // only one, so it is worth waiting for (up to 1 s).
                            let mut handle = None;
                            for _ in 0..OPEN_TRIES {
                                handle = JsFuture::from(model.create_sync_access_handle()).await.ok();
                                if handle.is_some() {
                                    break;
                                }
                                super::sleep_ms(OPEN_RETRY_MS).await;
                            }
                            handle.map(JsCast::unchecked_into)
                        }
                        Err(_) => None,
                    },
                    None => None,
                };
                Some(Self { dir, sha256, access })
            }

            async fn stored_sha(dir: &FileSystemDirectoryHandle) -> Option<String> {
                let sha: web_sys::Blob = JsFuture::from(file(dir, MODEL_SHA, false).await.ok()?.get_file())
                    .await
                    .ok()?
                    .unchecked_into();
                JsFuture::from(sha.text()).await.ok()?.as_string().filter(|s| !s.is_empty())
            }

            /// The stored model, when it is whole and its sha256 is `sha256` (any, when
            /// `None`: offline, without the manifest).
            pub fn read(&self, sha256: Option<&str>) -> Option<Vec<u8>> {
                let stored = self.sha256.as_deref()?;
                if sha256.is_some_and(|wanted| wanted != stored) {
                    return None;
                }
                read_whole(self.access.as_ref()?)
            }

            /// Whether a whole copy of version `sha256` is stored (readable or not).
            pub fn holds(&self, sha256: Option<&str>) -> bool {
                self.sha256
                    .as_deref()
                    .is_some_and(|stored| sha256.is_none_or(|wanted| wanted == stored))
            }

            /// Drops the stored copy: the next load downloads the model.
            pub async fn forget(mut self) {
                if let Some(access) = self.access.take() {
                    access.close();
                }
                let _ = JsFuture::from(self.dir.remove_entry(MODEL_SHA)).await;
                web_sys::console::info_1(&"kindling load: the stored model is forgotten".into());
            }

            /// Replaces the stored model with `bytes` (a JS copy: it is written after this
            /// function yields), whose sha256 is `sha256`.
            pub async fn replace(mut self, bytes: &Uint8Array, sha256: &str) -> Result<(), JsValue> {
                if let Some(access) = self.access.take() {
                    access.close();
                }
                let _ = JsFuture::from(self.dir.remove_entry(MODEL_SHA)).await;
                web_sys::console::info_1(&"kindling load: storing the model in OPFS".into());
                write(&file(&self.dir, MODEL, true).await?, bytes).await?;
                write(&file(&self.dir, MODEL_SHA, true).await?, &Uint8Array::from(sha256.as_bytes())).await
            }
        }

        impl Drop for StoredModel {
            fn drop(&mut self) {
                if let Some(access) = &self.access {
                    access.close();
                }
            }
        }

        fn read_whole(access: &FileSystemSyncAccessHandle) -> Option<Vec<u8>> {
            let size = access.get_size().ok()? as usize;
            // Not zeroed first: the read fills it (zeroing 98 MB took ~50 ms).
            let mut bytes = Vec::with_capacity(size);
            // SAFETY: the view is used at once, before anything can allocate (which could grow
            // wasm memory and detach it), and it covers `bytes`' own capacity; `set_len`
            // covers only what the read wrote.
            let read = unsafe {
                let view = Uint8Array::view_mut_raw(bytes.as_mut_ptr(), size);
                let options = web_sys::FileSystemReadWriteOptions::new();
                options.set_at(0.0);
                let read = access.read_with_js_u8_array_and_options(&view, &options).ok()? as usize;
                bytes.set_len(read.min(size));
                read
            };
            (read == size).then_some(bytes)
        }

        async fn write(handle: &FileSystemFileHandle, bytes: &Uint8Array) -> Result<(), JsValue> {
            let stream: FileSystemWritableFileStream = JsFuture::from(handle.create_writable()).await?.unchecked_into();
            JsFuture::from(stream.write_with_buffer_source(bytes)?).await?;
            JsFuture::from(stream.close()).await?;
            Ok(())
        }
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
        match serve(&engines, id, &request).await {
            // It needs the SAE or the atlas, which are still being built: once they are in.
            Err(EmberError::Unavailable(_)) if !engines.cpu.has_features() => {
                features_ready().await?;
                serve(&engines, id, &request).await
            }
            answered => answered,
        }
    }

    async fn serve(engines: &Engines, id: u64, request: &Request) -> Result<Value, EmberError> {
        if let Request::Chat(chat) = request
            && chat.stream
        {
            return stream_chat(engines, id, chat).await;
        }
        // A request runs to its end here: the worker's one thread hears no cancel meanwhile
        // (the page stops AutoSteer by restarting the worker). AutoSteer's steps are told as
        // they start, so the page shows where it is.
        if let Request::AutoEdits(spec) = request {
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
        dispatch(&engines.cpu, request, &CancelToken::new())
    }

    /// Streams a reply chunk by chunk, going back to the event loop between chunks so that a
    /// `cancel` message (the stop button) is heard.
    async fn stream_chat(engines: &Engines, id: u64, request: &kindling_ember::wire::ChatRequest) -> Result<Value, EmberError> {
        let ember = engines.gpu.as_ref().unwrap_or(&engines.cpu);
        let plan = ember.plan_chat(request)?;
        let cancel = CancelToken::new();
        STREAMS.with(|s| s.borrow_mut().insert(id, cancel.clone()));
        GENERATING.set(GENERATING.get() + 1);
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
        GENERATING.set(GENERATING.get() - 1);
        if GENERATING.get() == 0 {
            for tell in IDLE_WAITERS.with(|w| std::mem::take(&mut *w.borrow_mut())) {
                let _ = tell.send(());
            }
        }
        result
    }

    async fn yield_to_event_loop() {
        sleep_ms(0).await;
    }

    /// Waits `ms` milliseconds (a timer: the event loop runs meanwhile).
    async fn sleep_ms(ms: i32) {
        let promise = js_sys::Promise::new(&mut |resolve, _| {
            let _ = scope().set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, ms);
        });
        let _ = JsFuture::from(promise).await;
    }
}
