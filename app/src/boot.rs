//! The engine worker that `boot.js` started while this page's wasm was still loading.
//!
//! `boot.js` leaves a promise in `window.kindlingBoot`; it resolves to the worker, the backend
//! it was started for, what `navigator.gpu` offered (for "auto"), the messages the worker
//! posted before the page listened, and a start-up error if there was one. The page takes it
//! once: [`take`] hands it over and removes it, so a later start makes its own worker.

use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

const GLOBAL: &str = "kindlingBoot";

/// A worker started before the page: not yet sent anything.
pub struct BootWorker {
    /// "cpu" or "webgpu".
    pub backend: String,
    /// For "auto": "hardware", "fallback" or "none"; `None` when a backend was remembered.
    pub adapter: Option<String>,
    pub worker: web_sys::Worker,
    /// `boot.js`'s record, which goes on collecting the worker's messages until the page
    /// listens: read it when taking the worker over, in the same task.
    record: JsValue,
}

impl BootWorker {
    /// What the worker has posted so far, in order.
    pub fn early_messages(&self) -> Vec<JsValue> {
        self.field("early")
            .and_then(|e| e.dyn_into::<js_sys::Array>().ok())
            .map(|e| e.iter().collect())
            .unwrap_or_default()
    }

    /// The worker's start-up error, if it had one.
    pub fn error(&self) -> Option<String> {
        self.field("error").and_then(|e| e.as_string())
    }

    fn field(&self, key: &str) -> Option<JsValue> {
        field(&self.record, key)
    }
}

fn field(record: &JsValue, key: &str) -> Option<JsValue> {
    js_sys::Reflect::get(record, &key.into())
        .ok()
        .filter(|v| !v.is_undefined() && !v.is_null())
}

/// Takes the early worker, if `boot.js` started one (and only the first time).
pub async fn take() -> Option<BootWorker> {
    let window = web_sys::window()?;
    let promise = js_sys::Reflect::get(&window, &GLOBAL.into())
        .ok()
        .filter(|p| p.is_instance_of::<js_sys::Promise>())?;
    let _ = js_sys::Reflect::delete_property(&window, &GLOBAL.into());
    let record = JsFuture::from(js_sys::Promise::from(promise)).await.ok()?;
    let worker: web_sys::Worker = field(&record, "worker")?.dyn_into().ok()?;
    let backend = field(&record, "backend").and_then(|b| b.as_string());
    let Some(backend) = backend.filter(|b| b == "cpu" || b == "webgpu") else {
        worker.terminate();
        return None;
    };
    Some(BootWorker {
        backend,
        adapter: field(&record, "adapter").and_then(|a| a.as_string()),
        worker,
        record,
    })
}
