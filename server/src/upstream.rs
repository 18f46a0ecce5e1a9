//! `--upstream neuronpedia`: the Ember routes answered by Neuronpedia
//! ([`kindling_ember::neuronpedia`]) over a blocking HTTP client, one request at a time on a
//! blocking thread. The server keeps no state beyond a cache of feature facts and the rate
//! window, so replicas can sit behind any load balancer.
//!
//! The user's Neuronpedia key travels as `x-api-key` on every call and nowhere else: it is
//! kept in a [`Secret`] whose `Debug` prints nothing, and no log line carries it.

use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

use kindling_ember::neuronpedia::{BASE_URL, Neuronpedia, RemoteError, Source, SteerPlan, Transport};
use kindling_ember::wire::ChatRequest;
use kindling_ember::{EmberError, Request};
use serde_json::Value;

/// A value that must not be printed.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "Secret(none)" } else { "Secret(…)" })
    }
}

/// Largest reply read from Neuronpedia (a feature's dashboard with all its activations is
/// the biggest, a few MB).
const MAX_REPLY_BYTES: u64 = 32 << 20;
/// Largest stream frame: a snapshot holds the whole conversation and reply twice per side,
/// a few hundred KB at Neuronpedia's limits. The stream itself is bounded by the call's time.
const MAX_FRAME_BYTES: u64 = 4 << 20;
/// Longest call: a steer-chat of 1024 tokens on the 70B.
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Neuronpedia over HTTP: `base_url` (`https://www.neuronpedia.org`, or a contract double in
/// tests) and an optional key.
#[derive(Debug)]
pub struct HttpTransport {
    agent: ureq::Agent,
    base_url: String,
    key: Secret,
}

impl HttpTransport {
    pub fn new(base_url: &str, key: Secret) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(CALL_TIMEOUT))
            .timeout_connect(Some(Duration::from_secs(15)))
            .http_status_as_error(false)
            // The key goes to the configured host and nowhere else: no redirect is followed
            // (ureq would keep x-api-key across hosts).
            .max_redirects(0)
            .user_agent(concat!("kindling-server/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self {
            agent,
            base_url: base_url.trim_end_matches('/').to_string(),
            key,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Sends one call and returns the reply's status, content type and body reader.
    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, String, ureq::Body), RemoteError> {
        let unreachable = |e: ureq::Error| RemoteError::unreachable(format!("{} {}: {e}", method, self.url(path)));
        let response = match body {
            None => {
                let mut request = self.agent.get(self.url(path));
                if !self.key.expose().is_empty() {
                    request = request.header("x-api-key", self.key.expose());
                }
                request.call().map_err(unreachable)?
            }
            Some(body) => {
                let mut request = self.agent.post(self.url(path)).content_type("application/json");
                if !self.key.expose().is_empty() {
                    request = request.header("x-api-key", self.key.expose());
                }
                request.send(body.to_string().as_bytes()).map_err(unreachable)?
            }
        };
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Ok((status, content_type, response.into_body()))
    }

    fn json(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, RemoteError> {
        let (status, _, mut reply) = self.send(method, path, body)?;
        let text = reply
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_string()
            .map_err(|e| RemoteError::unreachable(format!("reading {}: {e}", self.url(path))))?;
        if !(200..300).contains(&status) {
            return Err(RemoteError::from_reply(status, &text));
        }
        serde_json::from_str(&text).map_err(|e| RemoteError {
            status,
            message: format!("the reply is not JSON: {e}"),
        })
    }

    /// Sends a streamed steer-chat and hands each snapshot to `frame` as it arrives (a reply
    /// served from Neuronpedia's cache comes as plain JSON: one snapshot). `frame` returns
    /// false to stop reading.
    pub fn stream(&self, body: &Value, mut frame: impl FnMut(Value) -> bool) -> Result<(), RemoteError> {
        let (status, content_type, reply) = self.send("POST", SteerPlan::PATH, Some(body))?;
        let mut reader = BufReader::new(reply.into_with_config().limit(u64::MAX).reader());
        if !(200..300).contains(&status) || !content_type.starts_with("text/event-stream") {
            let mut text = String::new();
            reader
                .read_to_string(&mut text)
                .map_err(|e| RemoteError::unreachable(format!("reading the steer-chat reply: {e}")))?;
            if !(200..300).contains(&status) {
                return Err(RemoteError::from_reply(status, &text));
            }
            let value = serde_json::from_str(&text).map_err(|e| RemoteError {
                status,
                message: format!("the reply is not JSON: {e}"),
            })?;
            frame(value);
            return Ok(());
        }
        let mut line = String::new();
        loop {
            line.clear();
            let n = (&mut reader)
                .take(MAX_FRAME_BYTES)
                .read_line(&mut line)
                .map_err(|e| RemoteError::unreachable(format!("reading the steer-chat stream: {e}")))?;
            if n == 0 {
                return Ok(());
            }
            if !line.ends_with('\n') && n as u64 == MAX_FRAME_BYTES {
                return Err(RemoteError::unreachable(format!(
                    "a steer-chat stream frame is over {} MB",
                    MAX_FRAME_BYTES >> 20
                )));
            }
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim_start();
            if data.is_empty() || data == "[DONE]" {
                continue;
            }
            // A frame that is not JSON is skipped: a mid-stream error just ends the stream (§1).
            if let Ok(value) = serde_json::from_str(data)
                && !frame(value)
            {
                return Ok(());
            }
        }
    }
}

impl Transport for HttpTransport {
    async fn get(&self, path: &str) -> Result<Value, RemoteError> {
        self.json("GET", path, None)
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, RemoteError> {
        self.json("POST", path, Some(body))
    }
}

/// The upstream behind the server.
pub type Upstream = Neuronpedia<HttpTransport>;

/// What `--upstream` names: `neuronpedia` or `neuronpedia:model/source`.
pub fn parse_upstream(spec: &str) -> Result<Source, String> {
    match spec.split_once(':') {
        None if spec == "neuronpedia" => Ok(Source::default()),
        Some(("neuronpedia", pair)) => Source::parse(pair).map_err(|e| e.to_string()),
        _ => Err(format!(
            "--upstream {spec:?}: the one upstream is neuronpedia, or neuronpedia:MODEL/SOURCE (e.g. neuronpedia:llama3.3-70b-it/50-resid-post-gf)"
        )),
    }
}

/// A Neuronpedia upstream at `base_url` (default [`BASE_URL`]). The server reads
/// Neuronpedia's own 429s, so it does not count calls itself (a key may have a higher tier).
/// Refused: a URL with a user name or password (it would be logged), and a key sent over
/// plain `http://` to anything but this machine.
pub fn upstream(source: Source, base_url: Option<&str>, key: Secret) -> Result<Upstream, String> {
    let base_url = base_url.unwrap_or(BASE_URL);
    let Some((scheme, rest)) = base_url.split_once("://") else {
        return Err(format!("--upstream-url {base_url:?} is not an http(s) URL"));
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.contains('@') {
        return Err("--upstream-url must not hold a user name or password: use --upstream-key-file".into());
    }
    let name = host
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(name, _)| name);
    let loopback = matches!(name, "localhost" | "127.0.0.1" | "[::1]");
    match scheme {
        "https" => {}
        "http" if loopback || key.expose().is_empty() => {}
        "http" => return Err(format!("the Neuronpedia key would travel unencrypted to {name}: use https://")),
        _ => return Err(format!("--upstream-url {base_url:?} is not an http(s) URL")),
    }
    Ok(Neuronpedia::new(source, HttpTransport::new(base_url, key)).counting_calls(false))
}

/// Answers a request that is not a streamed chat (on a blocking thread: the transport blocks).
pub fn answer(upstream: &Upstream, request: &Request) -> Result<Value, EmberError> {
    futures_lite::future::block_on(upstream.answer(request))
}

/// Plans a streamed chat (every error a request can cause is found here, before the stream).
pub fn plan_stream(upstream: &Upstream, request: &ChatRequest) -> Result<SteerPlan, EmberError> {
    futures_lite::future::block_on(upstream.plan_chat(request))
}

/// Streams a planned chat: each Ember chunk goes to `send`, which returns false when the
/// client has gone. A failure after the first chunk is returned for the caller to report.
pub fn stream(upstream: &Upstream, plan: &SteerPlan, send: &dyn Fn(Value) -> bool) -> Result<bool, EmberError> {
    upstream.admit_stream()?;
    let body = serde_json::to_value(&plan.body).map_err(|e| EmberError::Failed(e.to_string()))?;
    let mut chunks = plan.stream();
    let mut failed = None;
    let mut gone = false;
    let read = upstream.transport().stream(&body, |frame| match chunks.snapshot(&frame) {
        Ok(Some(chunk)) => {
            gone = !send(chunk);
            !gone
        }
        Ok(None) => true,
        Err(e) => {
            failed = Some(e);
            false
        }
    });
    if let Err(e) = read {
        return Err(futures_lite::future::block_on(upstream.explain(SteerPlan::PATH, e)));
    }
    if let Some(e) = failed {
        return Err(e);
    }
    if gone {
        return Ok(false);
    }
    Ok(send(chunks.finish()?))
}
