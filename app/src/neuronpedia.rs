//! Neuronpedia called straight from the page (its `/api/*` routes allow any origin), through
//! [`kindling_ember::neuronpedia`]: the page keeps speaking Ember paths, and this module
//! answers them with Neuronpedia calls made by `fetch`.
//!
//! Browser calls are anonymous: Neuronpedia's CORS preflight does not allow the `x-api-key`
//! header, so no key is sent (public models only). A 429 from its rate limiter carries no CORS
//! header and reaches the page as a network error; the provider tells it apart from "offline"
//! with one cheap call ([`kindling_ember::neuronpedia::Neuronpedia::explain`]).

use futures::channel::mpsc;
use kindling_ember::neuronpedia::{Neuronpedia, RemoteError, Source, SteerPlan, Transport};
use kindling_ember::{EmberError, Request, Route};
use serde_json::Value;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

use crate::client::{ApiError, js_message, read_sse};

/// The provider as the page uses it.
pub type Remote = Neuronpedia<Fetch>;

/// Neuronpedia's API at `base_url` through the browser's `fetch`: no credentials, no key, no
/// redirects followed to another origin.
#[derive(Debug, Clone)]
pub struct Fetch {
    pub base_url: String,
}

impl Fetch {
    fn init(method: &str, body: Option<&Value>, signal: Option<&web_sys::AbortSignal>) -> web_sys::RequestInit {
        let init = web_sys::RequestInit::new();
        init.set_method(method);
        // Anonymous: no cookies, and (set by name, see client.rs) the same for redirects.
        let _ = js_sys::Reflect::set(&init, &"credentials".into(), &"omit".into());
        if let Some(body) = body {
            if let Ok(headers) = web_sys::Headers::new() {
                let _ = headers.set("Content-Type", "application/json");
                init.set_headers(&headers);
            }
            init.set_body(&JsValue::from_str(&body.to_string()));
        }
        if let Some(signal) = signal {
            init.set_signal(Some(signal));
        }
        init
    }

    /// Sends one call; a reply that is not a 2xx becomes [`RemoteError::from_reply`], no
    /// reply at all [`RemoteError::unreachable`].
    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        signal: Option<&web_sys::AbortSignal>,
    ) -> Result<web_sys::Response, RemoteError> {
        let url = format!("{}{path}", self.base_url.trim_end_matches('/'));
        let window = web_sys::window().ok_or_else(|| RemoteError::unreachable("no window"))?;
        let response = JsFuture::from(window.fetch_with_str_and_init(&url, &Self::init(method, body, signal)))
            .await
            .map_err(|e| RemoteError::unreachable(js_message(&e)))?;
        let response: web_sys::Response = response.unchecked_into();
        if !response.ok() {
            let text = text_of(&response).await.unwrap_or_default();
            return Err(RemoteError::from_reply(response.status(), &text));
        }
        Ok(response)
    }

    async fn json(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, RemoteError> {
        let response = self.send(method, path, body, None).await?;
        let status = response.status();
        let text = text_of(&response).await.map_err(RemoteError::unreachable)?;
        serde_json::from_str(&text).map_err(|e| RemoteError {
            status,
            message: format!("the reply is not JSON: {e}"),
        })
    }
}

impl Transport for Fetch {
    async fn get(&self, path: &str) -> Result<Value, RemoteError> {
        self.json("GET", path, None).await
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, RemoteError> {
        self.json("POST", path, Some(body)).await
    }

    /// A reply without CORS headers (the rate limiter's 429) is a network error here.
    fn opaque_failures(&self) -> bool {
        true
    }
}

async fn text_of(response: &web_sys::Response) -> Result<String, String> {
    let promise = response.text().map_err(|e| js_message(&e))?;
    let text = JsFuture::from(promise).await.map_err(|e| js_message(&e))?;
    Ok(text.as_string().unwrap_or_default())
}

/// A provider for `source` at `base_url`.
pub fn remote(base_url: &str, source: Source) -> Remote {
    Neuronpedia::new(
        source,
        Fetch {
            base_url: base_url.trim().trim_end_matches('/').to_string(),
        },
    )
}

/// The page's error for a provider's.
pub fn api_error(e: EmberError) -> ApiError {
    ApiError {
        status: e.status(),
        message: e.to_string(),
    }
}

/// Answers an Ember call (`method`, `path` with its query, JSON `body`) through Neuronpedia.
pub async fn request(remote: &Remote, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ApiError> {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let route = Route::find(method, path).ok_or_else(|| {
        api_error(EmberError::NoRoute {
            method: method.into(),
            path: path.into(),
        })
    })?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = Request::parse(route, query, body.as_bytes()).map_err(api_error)?;
    remote.answer(&request).await.map_err(api_error)
}

/// Streams a chat reply: plans it (every error before the stream), sends one streamed
/// steer-chat, and forwards an Ember chunk per snapshot. Stopping aborts the fetch.
pub async fn stream_chat(
    remote: &Remote,
    body: &Value,
    signal: Option<web_sys::AbortSignal>,
    tx: &mpsc::UnboundedSender<Result<Value, ApiError>>,
) -> Result<(), ApiError> {
    let request = Request::parse(Route::ChatCompletions, "", body.to_string().as_bytes()).map_err(api_error)?;
    let Request::Chat(chat) = request else {
        unreachable!("a chat route parses to a chat request")
    };
    let plan = remote.plan_chat(&chat).await.map_err(api_error)?;
    remote.admit_stream().map_err(api_error)?;
    let sent = serde_json::to_value(&plan.body).map_err(|e| ApiError::new(0, e.to_string()))?;
    let response = match remote.transport().send("POST", SteerPlan::PATH, Some(&sent), signal.as_ref()).await {
        Ok(response) => response,
        // Stopped before the reply started.
        Err(_) if signal.as_ref().is_some_and(web_sys::AbortSignal::aborted) => return Ok(()),
        Err(e) => return Err(api_error(remote.explain(SteerPlan::PATH, e).await)),
    };
    let mut chunks = plan.stream();
    let streamed = response
        .headers()
        .get("content-type")
        .ok()
        .flatten()
        .is_some_and(|t| t.starts_with("text/event-stream"));
    if !streamed {
        // Both outputs were in Neuronpedia's cache: one plain JSON reply.
        let text = text_of(&response).await.map_err(|e| ApiError::new(0, e))?;
        let whole: Value = serde_json::from_str(&text).map_err(|_| ApiError::new(0, "Neuronpedia's reply is not JSON"))?;
        if let Some(chunk) = chunks.snapshot(&whole).map_err(api_error)? {
            let _ = tx.unbounded_send(Ok(chunk));
        }
        let _ = tx.unbounded_send(Ok(chunks.finish().map_err(api_error)?));
        return Ok(());
    }
    let ended = read_sse(&response, signal.as_ref(), |data| {
        // A frame that is not JSON is skipped: Neuronpedia just ends a failed stream.
        let Ok(snapshot) = serde_json::from_str::<Value>(&data) else {
            return Ok(true);
        };
        match chunks.snapshot(&snapshot).map_err(api_error)? {
            Some(chunk) => Ok(tx.unbounded_send(Ok(chunk)).is_ok()),
            None => Ok(true),
        }
    })
    .await?;
    if !ended {
        return Ok(());
    }
    let _ = tx.unbounded_send(Ok(chunks.finish().map_err(api_error)?));
    Ok(())
}

/// The probe a connection starts with: feature 0's facts (one small batch call, within the
/// generous `/api` rate budget; its dashboard would carry every top activation) prove the
/// address, the model and the source at once.
pub async fn probe(remote: &Remote) -> Result<(), ApiError> {
    remote.facts(&[0]).await.map(|_| ()).map_err(api_error)
}
