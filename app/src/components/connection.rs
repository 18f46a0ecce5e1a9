//! Where the model runs: in this page (CPU or WebGPU), on a hosted endpoint, or at
//! Neuronpedia (Llama-3.3-70B with Goodfire's SAE, called from this page); loading progress;
//! the backend indicator.

use std::rc::Rc;

use leptos::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

use kindling_ember::neuronpedia;
use kindling_ember::variant::ProviderRef;

use crate::boot::BootWorker;
use crate::client::{Client, Hosted, LoadEvent, LocalEngine};

/// The model the in-browser engine runs (the name requests carry).
pub const LOCAL_MODEL: &str = kindling_ember::MODEL_NAME;
const MODE_KEY: &str = "kindling.mode";
const HOSTED_URL_KEY: &str = "kindling.hosted.url";
const HOSTED_MODEL_KEY: &str = "kindling.hosted.model";
/// The API key, once a request with it has succeeded: in sessionStorage (this tab only) by
/// default, in localStorage when the user ticks "remember on this device".
const HOSTED_KEY_KEY: &str = "kindling.hosted.key";
const NEURONPEDIA_URL_KEY: &str = "kindling.neuronpedia.url";
const NEURONPEDIA_MODEL_KEY: &str = "kindling.neuronpedia.model";
const NEURONPEDIA_SOURCE_KEY: &str = "kindling.neuronpedia.source";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// WebGPU on a hardware adapter, else the CPU (a software fallback adapter, such as
    /// SwiftShader, is many times slower than the wasm CPU engine).
    Auto,
    Cpu,
    WebGpu,
    Hosted,
    Neuronpedia,
}

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Cpu => "cpu",
            Mode::WebGpu => "webgpu",
            Mode::Hosted => "hosted",
            Mode::Neuronpedia => "neuronpedia",
        }
    }

    fn parse(s: &str) -> Mode {
        match s {
            "cpu" => Mode::Cpu,
            "webgpu" => Mode::WebGpu,
            "hosted" => Mode::Hosted,
            "neuronpedia" => Mode::Neuronpedia,
            _ => Mode::Auto,
        }
    }
}

/// One file's download.
#[derive(Debug, Clone, PartialEq)]
struct Download {
    file: String,
    loaded: f64,
    total: f64,
    cached: bool,
}

fn storage() -> Option<web_sys::Storage> {
    web_sys::window()?.local_storage().ok().flatten()
}

fn tab_storage() -> Option<web_sys::Storage> {
    web_sys::window()?.session_storage().ok().flatten()
}

fn stored(key: &str) -> Option<String> {
    storage()?.get_item(key).ok().flatten()
}

fn store(key: &str, value: &str) {
    if let Some(s) = storage() {
        let _ = s.set_item(key, value);
    }
}

/// The API key kept from an earlier success: this tab's first, else this device's.
fn stored_key() -> Option<String> {
    tab_storage()
        .and_then(|s| s.get_item(HOSTED_KEY_KEY).ok().flatten())
        .or_else(|| stored(HOSTED_KEY_KEY))
}

/// Keeps a key that has just worked: on this device (`remember`) or in this tab only; it is
/// removed from the other place, and an empty key is removed from both.
fn keep_key(key: &str, remember: bool) {
    let (keep, drop) = if remember {
        (storage(), tab_storage())
    } else {
        (tab_storage(), storage())
    };
    if let Some(s) = drop {
        let _ = s.remove_item(HOSTED_KEY_KEY);
    }
    if let Some(s) = keep {
        let _ = if key.is_empty() {
            s.remove_item(HOSTED_KEY_KEY)
        } else {
            s.set_item(HOSTED_KEY_KEY, key)
        };
    }
}

/// The host a key would cross the network to unencrypted: `http://` to anything but this
/// machine (`localhost`, 127.0.0.0/8, `[::1]`). `None` for https:// and loopback.
fn plain_http_host(url: &str) -> Option<String> {
    let parsed = web_sys::Url::new(url).ok()?;
    if parsed.protocol() != "http:" {
        return None;
    }
    let host = parsed.hostname();
    let octets: Vec<&str> = host.split('.').collect();
    let loopback = host == "localhost"
        || host.ends_with(".localhost")
        || host == "[::1]"
        || (octets.len() == 4 && octets[0] == "127" && octets.iter().all(|o| o.parse::<u8>().is_ok()));
    (!loopback).then_some(host)
}

/// The WebGPU adapter this browser offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Adapter {
    None,
    /// A software adapter (`isFallbackAdapter`), e.g. SwiftShader.
    Fallback,
    Hardware,
}

impl Adapter {
    /// The names `boot.js` gives what it found.
    fn parse(seen: &str) -> Adapter {
        match seen {
            "hardware" => Adapter::Hardware,
            "fallback" => Adapter::Fallback,
            _ => Adapter::None,
        }
    }
}

/// Asks `navigator.gpu.requestAdapter()`, through JS reflection (web-sys's WebGPU bindings
/// are behind an unstable cfg).
async fn webgpu_adapter() -> Adapter {
    let get = |target: &wasm_bindgen::JsValue, key: &str| {
        js_sys::Reflect::get(target, &key.into())
            .ok()
            .filter(|v| !v.is_undefined() && !v.is_null())
    };
    let Some(window) = web_sys::window() else { return Adapter::None };
    let Some(gpu) = get(&window.navigator(), "gpu") else {
        return Adapter::None;
    };
    let Some(request) = get(&gpu, "requestAdapter").and_then(|r| r.dyn_into::<js_sys::Function>().ok()) else {
        return Adapter::None;
    };
    let Ok(promise) = request.call0(&gpu) else { return Adapter::None };
    let Some(adapter) = JsFuture::from(js_sys::Promise::from(promise))
        .await
        .ok()
        .filter(|a| !a.is_undefined() && !a.is_null())
    else {
        return Adapter::None;
    };
    // `adapter.info.isFallbackAdapter` now; `adapter.isFallbackAdapter` in older browsers.
    let fallback = get(&adapter, "info")
        .and_then(|info| get(&info, "isFallbackAdapter"))
        .or_else(|| get(&adapter, "isFallbackAdapter"))
        .and_then(|f| f.as_bool())
        .unwrap_or(false);
    if fallback { Adapter::Fallback } else { Adapter::Hardware }
}

/// The mode picker, hosted settings, progress bars and the backend indicator.
#[component]
pub fn Connection() -> impl IntoView {
    let session = crate::use_session();
    // A shared variant made on Neuronpedia opens there, on its model and source.
    let linked = session
        .variant
        .with_untracked(|v| v.provider.clone())
        .filter(|p| p.name == "neuronpedia");
    let mode = RwSignal::new(if linked.is_some() {
        Mode::Neuronpedia
    } else {
        Mode::parse(&stored(MODE_KEY).unwrap_or_default())
    });
    let np_url = RwSignal::new(stored(NEURONPEDIA_URL_KEY).unwrap_or_else(|| neuronpedia::BASE_URL.to_string()));
    let np_model = RwSignal::new(
        linked
            .as_ref()
            .map(|p| p.model_id.clone())
            .or_else(|| stored(NEURONPEDIA_MODEL_KEY))
            .unwrap_or_else(|| neuronpedia::DEFAULT_MODEL.to_string()),
    );
    let np_source = RwSignal::new(
        linked
            .as_ref()
            .map(|p| p.source.clone())
            .or_else(|| stored(NEURONPEDIA_SOURCE_KEY))
            .unwrap_or_else(|| neuronpedia::DEFAULT_SOURCE.to_string()),
    );
    let url = RwSignal::new(
        stored(HOSTED_URL_KEY).unwrap_or_else(|| web_sys::window().and_then(|w| w.location().origin().ok()).unwrap_or_default()),
    );
    let model = RwSignal::new(stored(HOSTED_MODEL_KEY).unwrap_or_else(|| LOCAL_MODEL.to_string()));
    let key = RwSignal::new(stored_key().unwrap_or_default());
    // A key kept on this device stays there until the box is unticked.
    let remember = RwSignal::new(stored(HOSTED_KEY_KEY).is_some());
    // The plain-http host a key would be sent to, while the user has not said to go ahead.
    let insecure = RwSignal::new(None::<String>);
    let downloads = RwSignal::new(Vec::<Download>::new());
    // What runs now, for the indicator: "CPU", "WebGPU", "hosted", or a state.
    let running = RwSignal::new(String::from("not started"));
    // Whether the local engine's SAE and atlas are in ("loading" while only chat works).
    let features = RwSignal::new("loading");
    let gpu_found = RwSignal::new(None::<Adapter>);
    let engine = StoredValue::new_local(None::<Rc<LocalEngine>>);

    let on_load = move |event: LoadEvent| match event {
        LoadEvent::Progress {
            file,
            loaded,
            total,
            cached,
        } => downloads.update(|list| match list.iter_mut().find(|d| d.file == file) {
            Some(d) => {
                *d = Download {
                    file,
                    loaded,
                    total,
                    cached,
                }
            }
            None => list.push(Download {
                file,
                loaded,
                total,
                cached,
            }),
        }),
        LoadEvent::Build(build) => {
            // A worker's first message: a new load begins.
            features.set("loading");
            // The page and its engine worker must be one deployment: a worker of another
            // build (a stale cache, a deploy during the load) is stopped, never talked to.
            match crate::client::page_build() {
                Some(page) if !build.is_empty() && page != build => {
                    // Dropped (and so terminated) once this message's handler has returned.
                    leptos::task::spawn_local(async move { engine.set_value(None) });
                    session.client.set(None);
                    running.set("failed".into());
                    session.engine_build.set(Some(format!("{build} (refused)")));
                    session.error(format!(
                        "This page is build {page} but its engine worker is build {build}: the site was updated while it loaded. Reload the page."
                    ));
                }
                _ => session.engine_build.set(Some(build)),
            }
        }
        LoadEvent::Ready {
            backend,
            model,
            seconds,
            cached,
        } => {
            let name = if backend == "webgpu" { "WebGPU" } else { "CPU" };
            running.set(format!("{name} (in this page)"));
            if let Some(engine) = engine.get_value() {
                session.client.set(Some(Client::Local(engine, model.clone())));
            }
            let left_remote = session.variant.with_untracked(|v| v.provider.is_some() && !v.is_base());
            session.variant.update(|v| {
                v.base_model = model;
                v.provider = None;
            });
            if left_remote && let Some(client) = session.client() {
                // The edits name another SAE's latents: look them up here and say what differs.
                leptos::task::spawn_local(super::variant::check_labels(session, client));
            }
            downloads.set(Vec::new());
            let source = if cached { " (from this browser's cache)" } else { "" };
            session.info(format!("Model ready in {seconds:.1} s{source}; features loading"));
        }
        LoadEvent::FeaturesReady { seconds } => {
            features.set("ready");
            session.info(format!("Model and features ready in {seconds:.1} s"));
        }
        LoadEvent::FeaturesFailed(message) => {
            features.set("failed");
            session.error(format!("Chat works, but the features could not be loaded: {message}"));
        }
        LoadEvent::Failed(message) => {
            running.set("failed".into());
            session.error(format!("Loading failed: {message}"));
        }
    };

    // Starts (or restarts) the engine in a worker; the previous worker is terminated.
    fn start_local(
        backend: &'static str,
        early: Option<BootWorker>,
        session: crate::Session,
        engine: StoredValue<Option<Rc<LocalEngine>>, LocalStorage>,
        downloads: RwSignal<Vec<Download>>,
        running: RwSignal<String>,
        on_load: impl Fn(LoadEvent) + Copy + 'static,
    ) {
        if let Some(old) = engine.get_value() {
            old.terminate();
        }
        session.client.set(None);
        session.engine_build.set(None);
        engine.set_value(None);
        downloads.set(Vec::new());
        running.set(format!("loading ({backend})"));
        match LocalEngine::start(backend, early, on_load) {
            Ok(e) => {
                engine.set_value(Some(e));
                let restart: Rc<dyn Fn()> = Rc::new(move || start_local(backend, None, session, engine, downloads, running, on_load));
                session.restart_engine.set_value(Some(restart));
            }
            Err(e) => {
                running.set("failed".into());
                session.error(e);
            }
        }
    }
    let start_local = move |backend: &'static str, early| start_local(backend, early, session, engine, downloads, running, on_load);

    // `anyway`: the user has read the plain-http warning and sends the key all the same.
    let connect_hosted = move |anyway: bool| {
        session.restart_engine.set_value(None);
        if let Some(old) = engine.get_value() {
            old.terminate();
        }
        session.client.set(None);
        session.engine_build.set(Some("hosted".into()));
        engine.set_value(None);
        let hosted = Hosted {
            base_url: url.get_untracked().trim().to_string(),
            model: model.get_untracked().trim().to_string(),
            api_key: key.get_untracked().trim().to_string(),
            provider: None,
        };
        if web_sys::Url::new(&hosted.base_url).is_ok_and(|u| !u.username().is_empty() || !u.password().is_empty()) {
            running.set("not connected".into());
            return session.error("The endpoint URL holds a user name or password: put the key in the API key field instead.");
        }
        store(HOSTED_URL_KEY, &hosted.base_url);
        store(HOSTED_MODEL_KEY, &hosted.model);
        if !hosted.api_key.is_empty()
            && !anyway
            && let Some(host) = plain_http_host(&hosted.base_url)
        {
            running.set("not connected".into());
            insecure.set(Some(host));
            return;
        }
        insecure.set(None);
        // The key is kept only once a request with it has worked (below).
        running.set("connecting".into());
        let client = Client::Hosted(Rc::new(hosted.clone()));
        leptos::task::spawn_local(async move {
            // A one-result search proves the URL, the key and the model name at once.
            let probe = format!(
                "/features/search?query=hello&perPage=1&model={}",
                js_sys::encode_uri_component(&hosted.model)
            );
            match client.get(&probe).await {
                Ok(_) => {
                    // A provider behind the endpoint (kindling-server --upstream) says what it
                    // cannot do, so those controls are greyed out from the start.
                    let models = client.get("/models").await.unwrap_or_default();
                    let hosted = Hosted {
                        provider: crate::logic::provider_limitations(&models),
                        ..hosted
                    };
                    let client = Client::Hosted(Rc::new(hosted.clone()));
                    keep_key(&hosted.api_key, remember.get_untracked());
                    running.set(format!("hosted: {}", hosted.base_url));
                    session.variant.update(|v| {
                        v.base_model = hosted.model.clone();
                        v.provider = None;
                    });
                    session.client.set(Some(client));
                    session.info(format!("Connected to {}", hosted.base_url));
                }
                Err(e) => {
                    running.set("not connected".into());
                    session.error(format!("Cannot use {}: {e}", hosted.base_url));
                }
            }
        });
    };

    let connect_neuronpedia = move || {
        session.restart_engine.set_value(None);
        if let Some(old) = engine.get_value() {
            old.terminate();
        }
        session.client.set(None);
        session.engine_build.set(Some("neuronpedia".into()));
        engine.set_value(None);
        let base_url = np_url.get_untracked().trim().trim_end_matches('/').to_string();
        let source = match neuronpedia::Source::new(np_model.get_untracked().trim(), np_source.get_untracked().trim()) {
            Ok(source) => source,
            Err(e) => {
                running.set("not connected".into());
                return session.error(e);
            }
        };
        if !web_sys::Url::new(&base_url).is_ok_and(|u| u.username().is_empty() && u.password().is_empty()) {
            running.set("not connected".into());
            return session.error("The Neuronpedia address must be a plain URL such as https://www.neuronpedia.org");
        }
        store(NEURONPEDIA_URL_KEY, &base_url);
        store(NEURONPEDIA_MODEL_KEY, &source.model_id);
        store(NEURONPEDIA_SOURCE_KEY, &source.source);
        running.set("connecting".into());
        let remote = Rc::new(crate::neuronpedia::remote(&base_url, source.clone()));
        leptos::task::spawn_local(async move {
            match crate::neuronpedia::probe(&remote).await {
                Ok(()) => {
                    running.set(format!("Neuronpedia: {} ({})", source.model_name(), source.spec()));
                    let provider = ProviderRef {
                        name: "neuronpedia".into(),
                        model_id: source.model_id.clone(),
                        source: source.source.clone(),
                    };
                    let other_sae = session
                        .variant
                        .with_untracked(|v| !v.is_base() && v.provider.as_ref() != Some(&provider));
                    session.variant.update(|v| {
                        v.base_model = source.model_name();
                        v.provider = Some(provider);
                    });
                    let client = Client::Neuronpedia(remote);
                    session.client.set(Some(client.clone()));
                    session.info(format!(
                        "Connected to Neuronpedia: {} with SAE {}. Steering strengths are sent as {} × maxActApprox per unit; rules, logits and contrast are not available there.",
                        source.model_id,
                        source.source,
                        neuronpedia::MAX_ACTS_PER_UNIT
                    ));
                    if other_sae {
                        // The edits name another SAE's latents: look them up here and say what differs.
                        leptos::task::spawn_local(super::variant::check_labels(session, client));
                    }
                }
                Err(e) => {
                    running.set("not connected".into());
                    session.error(format!("Cannot use Neuronpedia at {base_url}: {e}"));
                }
            }
        });
    };

    let apply = move || {
        leptos::task::spawn_local(async move {
            // The worker boot.js started before this page's wasm (the first start only).
            let early = crate::boot::take().await;
            let stop = |early: Option<BootWorker>| early.inspect(|b| b.worker.terminate());
            match mode.get_untracked() {
                Mode::Hosted => {
                    stop(early);
                    connect_hosted(false)
                }
                Mode::Neuronpedia => {
                    stop(early);
                    connect_neuronpedia()
                }
                Mode::Cpu => start_local("cpu", early),
                Mode::WebGpu => start_local("webgpu", early),
                Mode::Auto => {
                    // boot.js asked navigator.gpu already; asking again would only wait longer.
                    let found = match early.as_ref().and_then(|b| b.adapter.as_deref()) {
                        Some(seen) => Adapter::parse(seen),
                        None => webgpu_adapter().await,
                    };
                    gpu_found.set(Some(found));
                    start_local(if found == Adapter::Hardware { "webgpu" } else { "cpu" }, early);
                }
            }
        })
    };

    // Start at once with the remembered choice (hosted waits for the user to press Connect
    // unless it was the last choice).
    apply();

    view! {
        <div class="connection">
            <label>
                "Run on "
                <select
                    data-testid="mode"
                    prop:value=move || mode.get().key()
                    on:change=move |ev| {
                        let m = Mode::parse(&event_target_value(&ev));
                        mode.set(m);
                        store(MODE_KEY, m.key());
                        if !matches!(m, Mode::Hosted | Mode::Neuronpedia) {
                            apply();
                        }
                    }
                >
                    <option value="auto">"Auto (this page)"</option>
                    <option value="cpu">"CPU (this page)"</option>
                    <option value="webgpu">"WebGPU (this page)"</option>
                    <option value="hosted">"Hosted endpoint"</option>
                    <option value="neuronpedia">"Neuronpedia (Llama-3.3-70B)"</option>
                </select>
            </label>
            <span class="indicator" data-testid="backend" data-features=move || features.get() title="Where the model runs now">
                {move || running.get()}
            </span>
            {move || {
                gpu_found
                    .get()
                    .map(|found| {
                        view! {
                            <span class="hint">
                                {match found {
                                    Adapter::Hardware => "WebGPU adapter found",
                                    Adapter::Fallback => "software WebGPU adapter only: the CPU is faster",
                                    Adapter::None => "no WebGPU adapter",
                                }}
                            </span>
                        }
                    })
            }}
            <Show when=move || mode.get() == Mode::Hosted>
                <form
                    class="hosted"
                    on:submit=move |ev| {
                        ev.prevent_default();
                        connect_hosted(false);
                    }
                >
                    <input aria-label="Endpoint URL" data-testid="hosted-url" placeholder="https://…" bind:value=url />
                    <input aria-label="Model" data-testid="hosted-model" bind:value=model />
                    <input
                        aria-label="API key"
                        data-testid="hosted-key"
                        type="password"
                        autocomplete="off"
                        placeholder="API key"
                        bind:value=key
                    />
                    <label class="remember" title="Otherwise the key is kept in this tab only, and only once a request with it has worked">
                        <input
                            type="checkbox"
                            data-testid="hosted-remember"
                            prop:checked=move || remember.get()
                            on:change=move |ev| {
                                let on = event_target_checked(&ev);
                                remember.set(on);
                                // A key that has already worked moves to where it now belongs.
                                if let Some(k) = stored_key() {
                                    keep_key(&k, on);
                                }
                            }
                        />
                        "remember on this device"
                    </label>
                    <button type="submit" data-testid="hosted-connect">
                        "Connect"
                    </button>
                    {move || {
                        insecure
                            .get()
                            .map(|host| {
                                view! {
                                    <p class="warning" role="alert" data-testid="insecure-warning">
                                        {format!(
                                            "The API key would travel unencrypted (plain http://) to {host}: anyone on the way can read it. Use https://, or ",
                                        )}
                                        <button type="button" data-testid="hosted-connect-insecure" on:click=move |_| connect_hosted(true)>
                                            "send it anyway"
                                        </button>
                                    </p>
                                }
                            })
                    }}
                </form>
            </Show>
            <Show when=move || mode.get() == Mode::Neuronpedia>
                <form
                    class="hosted"
                    data-testid="neuronpedia-form"
                    on:submit=move |ev| {
                        ev.prevent_default();
                        connect_neuronpedia();
                    }
                >
                    <input aria-label="Neuronpedia address" data-testid="neuronpedia-url" bind:value=np_url />
                    <input aria-label="Neuronpedia model" data-testid="neuronpedia-model" bind:value=np_model />
                    <input aria-label="SAE source" data-testid="neuronpedia-source" bind:value=np_source />
                    <button type="submit" data-testid="neuronpedia-connect">
                        "Connect"
                    </button>
                    <span class="hint">"Public models only: the page calls Neuronpedia without a key (its API takes none from browsers)."</span>
                </form>
            </Show>
        </div>
        <div class="downloads">
            <For each=move || downloads.get() key=|d| (d.file.clone(), d.loaded as u64, d.cached) let:d>
                <div class="download" data-testid="download">
                    <span>{format!("{}{}", d.file, if d.cached { " (cached)" } else { "" })}</span>
                    <progress max=d.total.max(1.0) value=d.loaded></progress>
                    <span>{format!("{:.1} / {:.1} MB", d.loaded / 1e6, d.total / 1e6)}</span>
                </div>
            </For>
        </div>
    }
}
