//! Neuronpedia as a provider of the Ember protocol: Llama-3.3-70B-Instruct with Goodfire's SAE
//! (`llama3.3-70b-it` / `50-resid-post-gf`), or any public model/source pair Neuronpedia
//! serves, behind the same routes as Kindling's own engine.
//!
//! This module is the translation only, and does no I/O: it turns Ember requests into
//! Neuronpedia calls and Neuronpedia replies into Ember replies, through a [`Transport`] that
//! each shell supplies (the page's `fetch`, the server's blocking HTTP client). So the page
//! and `kindling-server --upstream neuronpedia` answer alike, and both are tested against the
//! contract double in `tests/neuronpedia/`.
//!
//! What maps to what (`../shared/reference/neuronpedia-api.md`):
//!
//! | Ember | Neuronpedia |
//! |---|---|
//! | `chat/completions` (nudges only) | `POST /api/steer-chat`: base and steered reply in one call |
//! | `features/search`, AutoSteer | `POST /api/explanation/search` |
//! | `features/dashboard` | `GET /api/feature/{model}/{source}/{index}` |
//! | `features/lookup`, `features/` | `POST /api/features` |
//! | `chat-attribution/compute-features` | `POST /api/search-topk-by-token` |
//!
//! The rest ([`Neuronpedia::limitation`]) answer 422 with the reason. Strengths are
//! Kindling's steering unit on the wire and become Neuronpedia's raw coefficients through
//! each feature's `maxActApprox` ([`coefficient`]).

pub mod remote;

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::EmberError;
use crate::ids::FeatureIds;
use crate::replies::{
    Activation, AutoEdits, ChatCompletion, Choice, ContextOut, Dashboard, Features, GoodfireFeature, LookedUp, Lookup, Models,
    ProviderInfo, TokenActivations, TokenFeatures, TokenValue, TrialEdit, TrialOut, Usage,
};
use crate::routes::{ListQuery, Request, Route, SearchQuery};
use crate::units::STRENGTH_UNIT;
use crate::wire::{
    ChatRequest, ComputeFeaturesRequest, DashboardRequest, FeatureOut, LookupRequest, Message, SpecificationRequest, chunk_json,
    completion_id, held_back, now, specification,
};
use remote::{ChatMessage, Neuron, SearchReply, SteerChat, SteerFeature, SteerReply, TopkByToken};

/// The provider's name in messages.
pub const PROVIDER: &str = "Neuronpedia";
/// Where Neuronpedia's API lives.
pub const BASE_URL: &str = "https://www.neuronpedia.org";
/// Llama-3.3-70B-Instruct on Neuronpedia.
pub const DEFAULT_MODEL: &str = "llama3.3-70b-it";
/// Goodfire's open SAE of it, at layer 50 (65,536 latents).
pub const DEFAULT_SOURCE: &str = "50-resid-post-gf";

/// Models whose generation runs on NNsight, with larger limits (`NNSIGHT_MODELS`, §1).
const NNSIGHT_MODELS: [&str; 2] = ["llama3.3-70b-it", "gpt-oss-20b"];
/// The names the Goodfire SDK gives the models Neuronpedia calls otherwise.
const GOODFIRE_NAMES: [(&str, &str); 1] = [("llama3.3-70b-it", "meta-llama/Llama-3.3-70B-Instruct")];

/// Kindling steering units per multiple of a feature's `maxActApprox`: one unit (a push of
/// 0.65 of the residual's typical norm, units.rs) is, for the median latent of Kindling's own
/// SAE, five times its top activation (docs/STEERING.md, "Conversions": old 1.0 is new 0.20).
/// So a value of 0.2 is a coefficient of `maxActApprox`, where Neuronpedia's own steering UI
/// starts a feature, and the slider's clear zone (0.15–0.6) spans 0.75–3 × `maxActApprox`.
pub const MAX_ACTS_PER_UNIT: f32 = 5.0;
/// What Neuronpedia's UI assumes for a feature with no `maxActApprox` (`steerer.tsx`).
pub const FALLBACK_MAX_ACT: f32 = 40.0;

/// Neuronpedia's raw steering coefficient (with `strength_multiplier` 1) for an edit of
/// `value` steering units on a feature whose top activation is `max_act`.
pub fn coefficient(value: f32, max_act: f32) -> f32 {
    value * MAX_ACTS_PER_UNIT * max_act
}

/// The steering value of a raw coefficient: the inverse of [`coefficient`].
pub fn value_of(coefficient: f32, max_act: f32) -> f32 {
    if max_act > 0.0 {
        coefficient / (MAX_ACTS_PER_UNIT * max_act)
    } else {
        0.0
    }
}

// --- limits -------------------------------------------------------------------------------

/// What Neuronpedia accepts in one request, checked here before anything is sent, so a
/// request over a limit is explained instead of refused by the remote (or, for a 429 that
/// reaches a browser without CORS headers, seen as a network failure).
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteLimits {
    /// Characters (UTF-16 units, as JavaScript counts) of all `content` of one message list.
    pub prompt_chars: usize,
    /// Most `n_tokens` of one steer-chat (larger requests are lowered to it).
    pub max_new_tokens: u32,
    /// Characters of a text whose activations are read (unconfirmed: the hosted token cap).
    pub text_chars: usize,
    /// Shortest explanation-search query.
    pub min_query_chars: usize,
    /// Lowest strength of a steering feature (there is no highest).
    pub min_strength: f32,
    /// Largest |seed|.
    pub max_seed: i64,
}

/// One row of [`RemoteLimits::table`]: what is limited, to what, and how sure we are.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LimitRow {
    pub what: &'static str,
    pub limit: String,
    /// Read in Neuronpedia's source (true), or a default the live service may change.
    pub confirmed: bool,
}

/// Requests per hour per client address, by path prefix, the most specific first
/// (`middleware.ts`, §0; `/api/steer` covers `/api/steer-chat`). Applies when the service
/// enables its limiter.
pub const RATE_LIMITS: [(&str, u32); 6] = [
    ("/api/steer", 240),
    ("/api/explanation/search", 200),
    ("/api/search-topk-by-token", 500),
    ("/api/search-all", 1600),
    ("/api/activation/new", 1000),
    ("/api", 25_000),
];

impl RemoteLimits {
    /// The limits for `model_id` (§1: NNsight models have larger ones).
    pub fn for_model(model_id: &str) -> Self {
        let nnsight = NNSIGHT_MODELS.contains(&model_id);
        Self {
            prompt_chars: if nnsight { 8192 } else { 2048 },
            max_new_tokens: if nnsight { 1024 } else { 256 },
            // The cookbook's 1024 tokens per single prompt for llama3.3-70b-it, at about four
            // characters a token; the inference server's own cap is an environment setting.
            text_chars: 4096,
            min_query_chars: 3,
            min_strength: -300.0,
            max_seed: 100_000_000,
        }
    }

    /// Every limit, for the docs, the page and the live smoke test.
    pub fn table(&self) -> Vec<LimitRow> {
        let row = |what, limit: String, confirmed| LimitRow { what, limit, confirmed };
        let mut rows = vec![
            row(
                "prompt characters per message list (steer-chat)",
                self.prompt_chars.to_string(),
                true,
            ),
            row("n_tokens per steer-chat", self.max_new_tokens.to_string(), true),
            row("prompt tokens at inference (TOKEN_LIMIT)", "200 by default".into(), false),
            row(
                "characters of a text whose activations are read",
                self.text_chars.to_string(),
                false,
            ),
            row(
                "explanation-search query characters (minimum)",
                self.min_query_chars.to_string(),
                true,
            ),
            row("steering strength (minimum; no maximum)", self.min_strength.to_string(), true),
            row("|seed|", self.max_seed.to_string(), true),
            row("texts per activation batch", "4".into(), true),
        ];
        for (prefix, per_hour) in RATE_LIMITS {
            rows.push(row("requests per hour per address", format!("{per_hour} under {prefix}"), false));
        }
        rows
    }
}

/// The calls made in the last hour, by [`RATE_LIMITS`] prefix: a call that would go over is
/// refused here with the reason, before the remote answers with a 429 that a browser cannot
/// read (it carries no CORS header).
#[derive(Debug, Default)]
pub struct RateWindow {
    calls: HashMap<&'static str, VecDeque<f64>>,
}

impl RateWindow {
    /// Counts a call to `path` at `now` (seconds), or says why it would be refused.
    pub fn admit(&mut self, path: &str, now: f64) -> Result<(), EmberError> {
        let Some(&(prefix, per_hour)) = RATE_LIMITS.iter().find(|(p, _)| path.starts_with(p)) else {
            return Ok(());
        };
        let calls = self.calls.entry(prefix).or_default();
        while calls.front().is_some_and(|&t| now - t >= 3600.0) {
            calls.pop_front();
        }
        if calls.len() >= per_hour as usize {
            let wait = calls.front().map_or(0.0, |&t| 3600.0 - (now - t));
            return Err(EmberError::RateLimited(format!(
                "Neuronpedia allows {per_hour} requests an hour under {prefix} from one address, and this one has made them; \
                 the next is possible in {} minutes",
                (wait / 60.0).ceil().max(1.0)
            )));
        }
        calls.push_back(now);
        Ok(())
    }
}

// --- the model and source ---------------------------------------------------------------

/// Which Neuronpedia model and SAE source a provider serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub model_id: String,
    pub source: String,
}

impl Default for Source {
    fn default() -> Self {
        Self {
            model_id: DEFAULT_MODEL.into(),
            source: DEFAULT_SOURCE.into(),
        }
    }
}

impl Source {
    /// A model/source pair, checked as Neuronpedia's routes check ids (at most 50 characters)
    /// and limited to the characters its ids use, since both travel inside URL paths.
    pub fn new(model_id: &str, source: &str) -> Result<Self, EmberError> {
        for (what, id) in [("model", model_id), ("source", source)] {
            // Not "." or "..", nor any id starting with a dot: they travel in URL paths.
            let ok = !id.is_empty()
                && id.len() <= 50
                && !id.starts_with('.')
                && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                return Err(EmberError::Invalid(format!(
                    "{id:?} is not a Neuronpedia {what} id (1 to 50 letters, digits, '.', '_' or '-')"
                )));
            }
        }
        Ok(Self {
            model_id: model_id.into(),
            source: source.into(),
        })
    }

    /// `model/source`, as `--upstream neuronpedia:model/source` and share links write it.
    pub fn parse(spec: &str) -> Result<Self, EmberError> {
        match spec.split_once('/') {
            Some((model, source)) => Self::new(model.trim(), source.trim()),
            None => Err(EmberError::Invalid(format!(
                "{spec:?} is not a Neuronpedia model/source pair such as {DEFAULT_MODEL}/{DEFAULT_SOURCE}"
            ))),
        }
    }

    /// `model/source`.
    pub fn spec(&self) -> String {
        format!("{}/{}", self.model_id, self.source)
    }

    /// The model's name on the Ember side: the Goodfire SDK's name where it has one (so its
    /// quickstart runs unchanged), else Neuronpedia's id.
    pub fn model_name(&self) -> String {
        GOODFIRE_NAMES
            .iter()
            .find(|(id, _)| *id == self.model_id)
            .map_or_else(|| self.model_id.clone(), |(_, name)| name.to_string())
    }

    /// Whether a request naming `model` is for this pair: its Ember name, its Neuronpedia id,
    /// or `model/source`.
    pub fn accepts(&self, model: &str) -> bool {
        model == self.model_name() || model == self.model_id || model == self.spec()
    }

    /// Feature ids of this pair: stable UUIDs made from the model id, source and index, that
    /// parse back without a table (so server replicas need no shared state).
    pub fn feature_ids(&self) -> FeatureIds {
        let digest = Sha256::digest(format!("neuronpedia:{}", self.spec()).as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        FeatureIds::new(&hex)
    }

    pub fn limits(&self) -> RemoteLimits {
        RemoteLimits::for_model(&self.model_id)
    }

    /// The path of one feature's dashboard in the API.
    pub fn feature_path(&self, index: u32) -> String {
        format!("/api/feature/{}/{}/{index}", self.model_id, self.source)
    }

    /// The feature's page on Neuronpedia, for people.
    pub fn feature_page(&self, index: u32) -> String {
        format!("{BASE_URL}/{}/{}/{index}", self.model_id, self.source)
    }
}

// --- transport --------------------------------------------------------------------------

/// A failed call to Neuronpedia, as a transport reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteError {
    /// The HTTP status; 0 when no answer could be read (offline, refused, or, in a browser,
    /// a reply without CORS headers, such as the rate limiter's 429).
    pub status: u16,
    pub message: String,
}

impl RemoteError {
    /// The error of a reply with `status` and `body`: the body's `message` or `error`
    /// (Neuronpedia's error shapes, §0), with a 429's window.
    pub fn from_reply(status: u16, body: &str) -> Self {
        let json: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        let text = |key: &str| json[key].as_str().map(str::to_owned);
        let mut message = text("message")
            .or_else(|| text("error"))
            .unwrap_or_else(|| body.chars().take(200).collect());
        if status == 429
            && let Some(per) = json["limitPerWindow"].as_u64()
        {
            let endpoint = text("endpoint").unwrap_or_default();
            let window = text("requestWindow").unwrap_or_else(|| "60 m".into());
            message = format!("{per} requests per {window} under {endpoint}");
        }
        Self { status, message }
    }

    /// No answer could be read.
    pub fn unreachable(message: impl Into<String>) -> Self {
        Self {
            status: 0,
            message: message.into(),
        }
    }
}

/// How the provider reaches Neuronpedia: `fetch` in the page, a blocking HTTP client in the
/// server (driven to completion there). Paths start with `/api/`. A reply that is not a 2xx
/// is a [`RemoteError::from_reply`].
#[allow(async_fn_in_trait)]
pub trait Transport {
    async fn get(&self, path: &str) -> Result<Value, RemoteError>;
    async fn post(&self, path: &str, body: &Value) -> Result<Value, RemoteError>;

    /// Whether a refused call can look like no answer at all: true in a browser, where a
    /// reply without CORS headers (the rate limiter's 429) is a network error. Then a call
    /// with no answer is probed ([`Neuronpedia::explain`]); elsewhere it means what it says.
    fn opaque_failures(&self) -> bool {
        false
    }
}

// --- the provider -----------------------------------------------------------------------

/// What the provider keeps of a feature between calls: its label, and the top activation
/// that converts strengths and shades activations.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub label: String,
    pub max_act: Option<f32>,
    pub density: Option<f32>,
}

impl Facts {
    fn of(neuron: &Neuron) -> Self {
        Self {
            label: neuron.description().unwrap_or("").to_string(),
            max_act: neuron.max_act_approx.filter(|m| m.is_finite() && *m > 0.0),
            density: neuron.frac_nonzero,
        }
    }

    /// The top activation, or Neuronpedia's UI's assumption when the feature has none.
    pub fn max_act_or_fallback(&self) -> f32 {
        self.max_act.unwrap_or(FALLBACK_MAX_ACT)
    }
}

/// Features whose facts are kept; past this the cache starts over (it only saves calls).
const MAX_CACHED_FACTS: usize = 4096;
/// Search hits fetched for one query at most (Neuronpedia pages by 20).
const MAX_SEARCH_RESULTS: usize = 100;
/// Top features per token in an activation overlay.
const OVERLAY_FEATURES_PER_TOKEN: u32 = 10;
/// Neuronpedia's most features per token.
const MAX_FEATURES_PER_TOKEN: u32 = 20;
/// The density filter of overlays: only features firing on at most 1% of tokens
/// (Neuronpedia's default; dense features say little about one token).
const OVERLAY_DENSITY_THRESHOLD: f32 = 0.01;

/// One steered feature of a reply, with its conversion, as the page shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SteeredFeature {
    pub index_in_sae: u32,
    pub label: String,
    /// Kindling steering units.
    pub value: f32,
    /// Neuronpedia's `maxActApprox` for it (`null`: it has none, and 40 was assumed).
    pub max_act_approx: Option<f32>,
    /// The raw coefficient sent (`strength`, with `strength_multiplier` 1).
    pub coefficient: f32,
}

/// What a Neuronpedia reply adds to an Ember chat reply (`kindling_upstream`, an extra key the
/// SDKs ignore): the unsteered reply from the same call, the conversions, and the share link.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UpstreamChat {
    pub provider: &'static str,
    pub source: String,
    pub base_reply: String,
    pub features: Vec<SteeredFeature>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_url: Option<String>,
    /// `n_tokens` asked of Neuronpedia (after lowering to its limit).
    pub n_tokens: u32,
    /// The seed sent (a fresh one when the request had none).
    pub seed: i64,
}

/// A steer-chat ready to send, with what its reply needs.
#[derive(Debug, Clone)]
pub struct SteerPlan {
    pub body: SteerChat,
    pub features: Vec<SteeredFeature>,
    pub stops: Vec<String>,
    pub model: String,
    pub source: String,
}

impl SteerPlan {
    /// The path to send the body to.
    pub const PATH: &'static str = "/api/steer-chat";

    fn upstream(&self, base_reply: String, share_url: Option<String>) -> UpstreamChat {
        UpstreamChat {
            provider: PROVIDER,
            source: self.source.clone(),
            base_reply,
            features: self.features.clone(),
            share_url,
            n_tokens: self.body.n_tokens,
            seed: self.body.seed,
        }
    }

    /// Whether the reply has a steered side to show: with no features Neuronpedia generates
    /// only the default reply, which is then the variant's reply too.
    fn steering(&self) -> bool {
        !self.body.features.is_empty()
    }

    /// The Ember reply of a whole steer-chat reply.
    pub fn completion(&self, reply: &SteerReply) -> Result<Value, EmberError> {
        let (steered, base) = sides(reply, self.steering());
        let steered = steered
            .ok_or_else(|| EmberError::BadGateway("Neuronpedia's steer-chat reply held no STEERED output for a steered request".into()))?;
        let content = cut_at_stop(&steered, &self.stops).to_string();
        let base = cut_at_stop(base.as_deref().unwrap_or(&steered), &self.stops).to_string();
        let words = |s: &str| s.split_whitespace().count();
        let completion = ChatCompletion {
            id: completion_id(),
            object: "chat.completion",
            created: now(),
            model: self.model.clone(),
            system_fingerprint: String::new(),
            gf_event_names: Vec::new(),
            choices: vec![Choice {
                index: 0,
                message: Message {
                    role: "assistant".into(),
                    content: content.clone(),
                },
                finish_reason: "stop",
            }],
            // Neuronpedia returns no token counts; words stand in, and say so by being words.
            usage: Usage {
                prompt_tokens: 0,
                completion_tokens: words(&content),
                total_tokens: words(&content),
            },
            kindling_rules_fired: Vec::new(),
        };
        let mut value = serde_json::to_value(completion).map_err(|e| EmberError::Failed(e.to_string()))?;
        value["kindling_upstream"] = json!(self.upstream(base, reply.share_url.clone()));
        Ok(value)
    }

    /// A stream of Ember chunks made from steer-chat's cumulative snapshots.
    pub fn stream(&self) -> SteerStream {
        SteerStream {
            plan: self.clone(),
            id: completion_id(),
            created: now(),
            sent: 0,
            chunks: 0,
            frames: 0,
            base: String::new(),
            last: SteerReply::default(),
        }
    }
}

/// The steered and the default reply of a steer-chat answer or snapshot. With features the
/// steered side is `STEERED` only: a snapshot may hold a partial `DEFAULT` and no `STEERED`
/// yet (the two stream separately on two inference hosts, and the route forwards whichever
/// answers first). Without features the one reply is `DEFAULT`, and it is both.
fn sides(reply: &SteerReply, steering: bool) -> (Option<String>, Option<String>) {
    let text = |side: &Option<remote::SteerOutput>| side.as_ref().map(|o| o.reply().to_string());
    let (steered, base) = (text(&reply.steered), text(&reply.default));
    if steering {
        (steered, base)
    } else {
        (steered.or_else(|| base.clone()), base)
    }
}

/// `text` up to the first stop string (Neuronpedia has no stop strings; they are applied here).
fn cut_at_stop<'t>(text: &'t str, stops: &[String]) -> &'t str {
    let end = stops.iter().filter_map(|s| text.find(s.as_str())).min().unwrap_or(text.len());
    &text[..end]
}

/// Turns steer-chat's cumulative snapshots into Ember stream chunks: each chunk carries the
/// steered text new since the last (held back where it may begin a stop string) and, as
/// `kindling_upstream`, the base reply so far.
pub struct SteerStream {
    plan: SteerPlan,
    id: String,
    created: u64,
    /// Bytes of the steered reply sent.
    sent: usize,
    chunks: usize,
    /// Snapshots read.
    frames: usize,
    /// The base reply so far.
    base: String,
    last: SteerReply,
}

impl SteerStream {
    /// The chunk for one snapshot (`None` when it adds nothing to send yet).
    pub fn snapshot(&mut self, frame: &Value) -> Result<Option<Value>, EmberError> {
        let reply: SteerReply = serde_json::from_value(frame.clone())
            .map_err(|e| EmberError::BadGateway(format!("Neuronpedia sent a stream frame Kindling cannot read: {e}")))?;
        self.frames += 1;
        let (steered, base) = sides(&reply, self.plan.steering());
        let base_moved = base.as_ref().is_some_and(|b| *b != self.base);
        if let Some(base) = base {
            self.base = base;
        }
        self.last = reply;
        let steered = steered.unwrap_or_default();
        let cut = cut_at_stop(&steered, &self.plan.stops);
        let ready = cut.len() - held_back(cut, &self.plan.stops);
        // A snapshot that rewrites what was sent (it should not) sends only what follows.
        let fresh = steered
            .get(self.sent..ready)
            .filter(|_| ready > self.sent && steered.is_char_boundary(self.sent))
            .unwrap_or("");
        if fresh.is_empty() && !base_moved {
            return Ok(None);
        }
        let fresh = fresh.to_string();
        let chunk = self.chunk(&fresh);
        self.sent = self.sent.max(ready);
        Ok(Some(chunk))
    }

    /// The last chunk: what is left of the steered reply, the finish reason, and the whole
    /// base reply and share link. A stream that ended with no reply (Neuronpedia ends a
    /// stream that fails, e.g. a prompt over its token limit) or before its last snapshot (a
    /// streamed reply's last snapshot carries its id) is an error.
    pub fn finish(self) -> Result<Value, EmberError> {
        let (steered, _) = sides(&self.last, self.plan.steering());
        let Some(steered) = steered.filter(|_| self.frames > 0) else {
            return Err(EmberError::BadGateway(
                "Neuronpedia ended the stream without a reply (it does so when generation fails, e.g. for a prompt over \
                 its token limit)"
                    .into(),
            ));
        };
        if self.plan.body.stream && self.last.id.is_none() {
            return Err(EmberError::BadGateway(
                "Neuronpedia's stream ended before the reply was complete".into(),
            ));
        }
        let cut = cut_at_stop(&steered, &self.plan.stops);
        let rest = cut.get(self.sent..).unwrap_or("");
        let base = if self.base.is_empty() { steered.clone() } else { self.base.clone() };
        let base = cut_at_stop(&base, &self.plan.stops).to_string();
        let mut chunk = chunk_json(&self.id, self.created, &self.plan.model, self.chunks, rest, Some("stop"), &[]);
        chunk["kindling_upstream"] = json!(self.plan.upstream(base, self.last.share_url.clone()));
        Ok(chunk)
    }

    fn chunk(&mut self, text: &str) -> Value {
        let mut chunk = chunk_json(&self.id, self.created, &self.plan.model, self.chunks, text, None, &[]);
        chunk["kindling_upstream"] = json!({ "provider": PROVIDER, "base_reply": cut_at_stop(&self.base, &self.plan.stops) });
        self.chunks += 1;
        chunk
    }
}

/// Neuronpedia behind the Ember routes. Its methods are `async` over the [`Transport`];
/// [`Neuronpedia::answer`] is the route table's dispatch for it.
pub struct Neuronpedia<T> {
    source: Source,
    ids: FeatureIds,
    transport: T,
    facts: Mutex<HashMap<u32, Facts>>,
    /// The calls of the last hour, when this provider counts them itself ([`Self::counting_calls`]).
    window: Option<Mutex<RateWindow>>,
}

impl<T: Transport> Neuronpedia<T> {
    pub fn new(source: Source, transport: T) -> Self {
        Self {
            ids: source.feature_ids(),
            source,
            transport,
            facts: Mutex::default(),
            window: Some(Mutex::default()),
        }
    }

    /// Whether calls are counted against [`RATE_LIMITS`] before they are sent (the default).
    /// The page counts, since the limiter's 429 is unreadable there; a server with a key of a
    /// higher tier, or a self-hosted Neuronpedia without a limiter, reads the real 429 instead.
    pub fn counting_calls(mut self, count: bool) -> Self {
        self.window = count.then(Mutex::default);
        self
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    pub fn feature_ids(&self) -> &FeatureIds {
        &self.ids
    }

    /// The transport, for a shell that streams a steer-chat itself.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Why Neuronpedia cannot serve `route`, or `None` when it can (chat serves nudges only:
    /// see [`Neuronpedia::plan_chat`]).
    pub fn limitation(route: Route) -> Option<&'static str> {
        Some(match route {
            Route::ChatCompletions | Route::Search | Route::List | Route::Lookup | Route::Dashboard => return None,
            Route::ComputeFeatures | Route::AutoEdits | Route::Models => return None,
            Route::ComputeLogits => "its steering replies carry no next-token logits (logprobs is always null)",
            Route::Contrast => "it reads activations of single texts, and has no contrast of two datasets",
            Route::Rerank => "it has no reranking of chosen features, only explanation search",
            Route::AutoConditional => "it has no conditional rules (set_when, abort_when) to build one for",
            Route::Neighbors => "its public API has no neighbour search",
            Route::LogitAttribution => "it has no attribution of logits to features",
            Route::ContrastiveDataset => "it does not generate datasets",
            Route::Tokenize => "it has no tokenizer endpoint",
            Route::Map => "Kindling's feature map is of its own SAE, not Goodfire's",
        })
    }

    /// Answers one parsed request, as [`crate::dispatch`] does for a [`crate::Provider`].
    pub async fn answer(&self, request: &Request) -> Result<Value, EmberError> {
        if let Some(refused) = self.refusal(request.route()) {
            return Err(refused);
        }
        fn json(reply: impl Serialize) -> Result<Value, EmberError> {
            serde_json::to_value(reply).map_err(|e| EmberError::Failed(e.to_string()))
        }
        match request {
            Request::Chat(chat) => self.chat_completion(chat).await,
            Request::Search(query) => json(self.search(query).await?),
            Request::List(query) => json(self.list(query).await?),
            Request::Lookup(lookup) => json(self.lookup(lookup).await?),
            Request::Dashboard(dashboard) => json(self.dashboard(dashboard).await?),
            Request::ComputeFeatures(features) => json(self.compute_features(features).await?),
            Request::AutoEdits(spec) => json(self.auto_edits(spec).await?),
            Request::Models => {
                let mut models = Models::of(&[self.source.model_name()]);
                models.kindling_provider = Some(ProviderInfo {
                    name: PROVIDER.into(),
                    source: self.source.spec(),
                    limitations: Route::ALL
                        .iter()
                        .filter_map(|&r| Some((r.path().to_string(), Self::limitation(r)?.to_string())))
                        .collect(),
                });
                json(models)
            }
            other => Err(self.unsupported(other.route(), "not implemented")),
        }
    }

    /// The error that refuses `route`, when Neuronpedia cannot serve it (a shell can answer
    /// it before queueing the request).
    pub fn refusal(&self, route: Route) -> Option<EmberError> {
        Self::limitation(route).map(|why| self.unsupported(route, why))
    }

    fn unsupported(&self, route: Route, why: &str) -> EmberError {
        EmberError::Unsupported {
            operation: route.path(),
            provider: format!("{PROVIDER} ({})", self.source.spec()),
            why: why.into(),
        }
    }

    fn check_model(&self, model: &str) -> Result<(), EmberError> {
        if self.source.accepts(model) {
            return Ok(());
        }
        Err(EmberError::UnknownModel {
            found: model.into(),
            serves: self.source.model_name(),
        })
    }

    // --- calls ------------------------------------------------------------------------

    fn admit(&self, path: &str) -> Result<(), EmberError> {
        match &self.window {
            Some(window) => window.lock().unwrap_or_else(|e| e.into_inner()).admit(path, now() as f64),
            None => Ok(()),
        }
    }

    async fn get(&self, path: &str) -> Result<Value, EmberError> {
        self.admit(path)?;
        match self.transport.get(path).await {
            Ok(v) => Ok(v),
            Err(e) => Err(self.explain(path, e).await),
        }
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, EmberError> {
        self.admit(path)?;
        match self.transport.post(path, body).await {
            Ok(v) => Ok(v),
            Err(e) => Err(self.explain(path, e).await),
        }
    }

    /// An Ember error for a failed call. A call with no readable answer is told apart from
    /// "offline" by one cheap call under another rate-limit prefix: if that one is answered,
    /// the first was refused without CORS headers, which is what the rate limiter's 429 does.
    pub async fn explain(&self, path: &str, error: RemoteError) -> EmberError {
        let limited = |detail: &str| {
            let per_hour = RATE_LIMITS.iter().find(|(p, _)| path.starts_with(p)).map_or(0, |(_, n)| *n);
            EmberError::RateLimited(format!(
                "Neuronpedia refused {path} ({detail}): most likely its rate limit of {per_hour} requests an hour \
                 from one address; wait and try again"
            ))
        };
        match error.status {
            0 if self.transport.opaque_failures() => {
                let probe = self.source.feature_path(0);
                if path != probe && self.transport.get(&probe).await.is_ok() {
                    limited("it answered other calls, but this one without the headers a browser needs")
                } else {
                    EmberError::Unavailable(format!("cannot reach Neuronpedia: {}", error.message))
                }
            }
            0 => EmberError::BadGateway(format!("Neuronpedia did not answer: {}", error.message)),
            400 => EmberError::Invalid(format!("Neuronpedia refused the request: {}", error.message)),
            404 => EmberError::Invalid(format!(
                "Neuronpedia does not serve this for {}: {}",
                self.source.spec(),
                error.message
            )),
            429 => limited(&error.message),
            // Explanation search answers any failure, an unknown model or source included, so.
            500 if error.message == "Unknown Error" && path.starts_with("/api/explanation") => EmberError::Invalid(format!(
                "Neuronpedia's search failed (\"Unknown Error\", its answer for an unknown model or source too): \
                 check that {} is a public model/source pair",
                self.source.spec()
            )),
            status => EmberError::BadGateway(format!("Neuronpedia failed (HTTP {status}): {}", error.message)),
        }
    }

    /// The facts of `indices`, from the cache or one batch call for those not in it.
    pub async fn facts(&self, indices: &[u32]) -> Result<HashMap<u32, Facts>, EmberError> {
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = self.facts.lock().unwrap_or_else(|e| e.into_inner());
            for &i in indices {
                match cache.get(&i) {
                    Some(f) => {
                        found.insert(i, f.clone());
                    }
                    None if !missing.contains(&i) => missing.push(i),
                    None => {}
                }
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let body: Vec<Value> = missing
            .iter()
            .map(|&index| json!({ "modelId": self.source.model_id, "layer": self.source.source, "index": index, "maxActsToReturn": 1 }))
            .collect();
        let reply = self.post("/api/features", &Value::Array(body)).await?;
        let neurons: Vec<Neuron> = read(reply, "POST /api/features")?;
        for (position, neuron) in neurons.iter().enumerate() {
            // Rows carry their index; fall back to the request's order.
            let Some(index) = neuron.index.or_else(|| missing.get(position).copied()) else {
                continue;
            };
            let facts = Facts::of(neuron);
            self.remember(index, facts.clone());
            found.insert(index, facts);
        }
        if let Some(&absent) = missing.iter().find(|i| !found.contains_key(i)) {
            return Err(EmberError::Invalid(format!(
                "Neuronpedia has no feature {absent} in {}",
                self.source.spec()
            )));
        }
        Ok(found)
    }

    fn remember(&self, index: u32, facts: Facts) {
        let mut cache = self.facts.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED_FACTS {
            cache.clear();
        }
        cache.insert(index, facts);
    }

    fn feature_out(&self, index: u32, label: String, relevance: Option<f32>, density: Option<f32>) -> FeatureOut {
        FeatureOut {
            id: self.ids.uuid(index),
            label,
            index_in_sae: index,
            relevance,
            density,
            histogram: None,
        }
    }

    // --- chat ------------------------------------------------------------------------

    /// A conversation as Neuronpedia takes it: known roles, within its character limit
    /// (counted as JavaScript counts, in UTF-16 units), and without empty messages, which its
    /// schema refuses (a reply stopped before its first token leaves one in a history).
    fn conversation(&self, messages: &[Message], limits: &RemoteLimits, what: &str) -> Result<Vec<ChatMessage>, EmberError> {
        let mut out = Vec::with_capacity(messages.len());
        let mut chars = 0;
        for m in messages {
            if !matches!(m.role.as_str(), "user" | "assistant" | "system" | "model" | "developer") {
                return Err(EmberError::Invalid(format!(
                    "Neuronpedia takes messages from user, assistant or system, not {:?}",
                    m.role
                )));
            }
            if m.content.trim().is_empty() {
                continue;
            }
            chars += m.content.encode_utf16().count();
            out.push(ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            });
        }
        if out.is_empty() {
            return Err(EmberError::Invalid(format!("the {what} is empty")));
        }
        if chars > limits.prompt_chars {
            return Err(EmberError::Invalid(format!(
                "Neuronpedia takes at most {} characters of {what} for {}; this one has {chars}",
                limits.prompt_chars, self.source.model_id
            )));
        }
        Ok(out)
    }

    /// Checks a chat request against Neuronpedia's rules and limits and builds the
    /// steer-chat that answers it: the conversation for both the default and the steered
    /// side, and one feature per nudged latent, its value converted to a coefficient.
    pub async fn plan_chat(&self, request: &ChatRequest) -> Result<SteerPlan, EmberError> {
        self.check_model(&request.model)?;
        let limits = self.source.limits();
        let messages = self.conversation(&request.messages, &limits, "conversation")?;
        // The base column's own history, when it differs (Kindling's extension field).
        let base_messages = match &request.kindling_base_messages {
            Some(base) => self.conversation(base, &limits, "base conversation")?,
            None => messages.clone(),
        };
        let n_tokens = request.new_tokens(256, limits.max_new_tokens as usize)? as u32;
        let temperature = request.checked_temperature()?;
        // Neuronpedia caches replies by their settings, seed included: without a seed of its
        // own, a request gets a fresh one, so a repeated prompt is sampled anew.
        let seed = request.seed.unwrap_or_else(|| {
            let nanos = web_time::SystemTime::now()
                .duration_since(web_time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            i64::from(nanos) % limits.max_seed
        });
        if seed.unsigned_abs() > limits.max_seed.unsigned_abs() {
            return Err(EmberError::Invalid(format!(
                "Neuronpedia takes seeds between -{0} and {0}, got {seed}",
                limits.max_seed
            )));
        }
        let nudges = match &request.controller {
            Some(controller) => self.nudges(controller)?,
            None => Vec::new(),
        };
        let indices: Vec<u32> = nudges.iter().map(|(i, _)| *i).collect();
        let facts = if indices.is_empty() {
            HashMap::new()
        } else {
            self.facts(&indices).await?
        };
        let mut features = Vec::with_capacity(nudges.len());
        let mut steer = Vec::with_capacity(nudges.len());
        for (index, value) in nudges {
            let fact = &facts[&index];
            let coefficient = coefficient(value, fact.max_act_or_fallback());
            if !coefficient.is_finite() {
                return Err(EmberError::Invalid(format!("{value} on feature {index} is out of range")));
            }
            if coefficient < limits.min_strength {
                return Err(EmberError::Invalid(format!(
                    "Neuronpedia takes strengths from {} up; {value} on feature {index} is {coefficient:.1} \
                     ({MAX_ACTS_PER_UNIT} × maxActApprox {:.2} per unit)",
                    limits.min_strength,
                    fact.max_act_or_fallback()
                )));
            }
            steer.push(SteerFeature {
                model_id: self.source.model_id.clone(),
                layer: self.source.source.clone(),
                index,
                strength: coefficient,
            });
            features.push(SteeredFeature {
                index_in_sae: index,
                label: fact.label.clone(),
                value,
                max_act_approx: fact.max_act,
                coefficient,
            });
        }
        Ok(SteerPlan {
            body: SteerChat {
                model_id: self.source.model_id.clone(),
                default_chat_messages: base_messages,
                steered_chat_messages: messages,
                features: steer,
                temperature,
                n_tokens,
                seed,
                strength_multiplier: 1.0,
                steer_special_tokens: false,
                // Neuronpedia streams only a steered reply: with no features it generates the
                // default alone, and only without streaming (its route fails a stream then).
                stream: request.stream && !features.is_empty(),
                steer_method: "SIMPLE_ADDITIVE",
            },
            features,
            stops: request.stop_strings(),
            model: request.model.clone(),
            source: self.source.spec(),
        })
    }

    /// A whole (not streamed) chat reply.
    pub async fn chat_completion(&self, request: &ChatRequest) -> Result<Value, EmberError> {
        let mut plan = self.plan_chat(request).await?;
        plan.body.stream = false;
        let body = serde_json::to_value(&plan.body).map_err(|e| EmberError::Failed(e.to_string()))?;
        let reply: SteerReply = read(self.post(SteerPlan::PATH, &body).await?, "steer-chat")?;
        plan.completion(&reply)
    }

    /// Counts a streamed steer-chat against the rate window (the shell sends it itself,
    /// reading the stream as it comes).
    pub fn admit_stream(&self) -> Result<(), EmberError> {
        self.admit(SteerPlan::PATH)
    }

    /// The top-level nudges of a controller, summed per latent. Everything Neuronpedia cannot
    /// do is refused by name: it adds fixed vectors, so it has no rules and no pin or multiply.
    fn nudges(&self, controller: &Value) -> Result<Vec<(u32, f32)>, EmberError> {
        let refuse = |why: &str| self.unsupported(Route::ChatCompletions, why);
        if controller.is_null() {
            return Ok(Vec::new());
        }
        match &controller["scopes"] {
            Value::Null => {}
            Value::Array(scopes) if scopes.is_empty() => {}
            Value::Array(_) => {
                return Err(refuse(
                    "it steers with fixed vectors, so conditional rules (set_when, abort_when), which read features \
                     while the reply is generated, cannot run there",
                ));
            }
            other => return Err(EmberError::Invalid(format!("\"scopes\" must be a list, found {other}"))),
        }
        let interventions = match &controller["interventions"] {
            Value::Null => return Ok(Vec::new()),
            Value::Array(list) => list,
            other => return Err(EmberError::Invalid(format!("\"interventions\" must be a list, found {other}"))),
        };
        let mut nudges: Vec<(u32, f32)> = Vec::new();
        for intervention in interventions {
            match intervention["mode"].as_str() {
                Some("nudge") => {}
                Some(mode @ ("pin" | "mul")) => {
                    return Err(refuse(&format!(
                        "it adds a feature's decoder direction (SIMPLE_ADDITIVE); {mode} needs the feature's activation \
                         during generation, which it does not expose: use a nudge"
                    )));
                }
                _ => {
                    return Err(EmberError::Invalid(format!(
                        "intervention mode must be nudge, pin or mul, found {}",
                        intervention["mode"]
                    )));
                }
            }
            let value = intervention["value"]
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or_else(|| EmberError::Invalid(format!("\"value\" must be a number, found {}", intervention["value"])))?
                as f32;
            let features = intervention["features"]["features"]
                .as_array()
                .ok_or_else(|| EmberError::Invalid("an intervention's \"features\" must be {\"features\": [...]}".into()))?;
            for feature in features {
                let index = feature["index_in_sae"]
                    .as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| {
                        EmberError::Invalid(format!(
                            "\"index_in_sae\" must be a feature index, found {}",
                            feature["index_in_sae"]
                        ))
                    })?;
                match nudges.iter_mut().find(|(i, _)| *i == index) {
                    Some((_, v)) => *v += value,
                    None => nudges.push((index, value)),
                }
            }
        }
        if nudges.len() > 64 {
            return Err(EmberError::Invalid(format!(
                "at most 64 features are steered at once, not {}",
                nudges.len()
            )));
        }
        Ok(nudges)
    }

    // --- features --------------------------------------------------------------------

    /// Explanation search: Neuronpedia's embedding search over its feature explanations.
    pub async fn search(&self, query: &SearchQuery) -> Result<Features, EmberError> {
        if let Some(model) = &query.model {
            self.check_model(model)?;
        }
        let text = query.query.trim();
        let limits = self.source.limits();
        if text.chars().count() < limits.min_query_chars {
            return Err(EmberError::Invalid(format!(
                "Neuronpedia searches for queries of at least {} characters",
                limits.min_query_chars
            )));
        }
        if text.len() > 1000 {
            return Err(EmberError::Invalid("a search query is at most 1000 characters".into()));
        }
        let wanted = (query.top_k.max(1) as usize).min(MAX_SEARCH_RESULTS);
        let mut features = Vec::new();
        let mut offset = 0;
        // Hits of other layers or without an index are skipped: the pages stay bounded all
        // the same, within the search budget (200 an hour).
        let max_pages = wanted.div_ceil(20) + 2;
        let mut pages = 0;
        while features.len() < wanted && pages < max_pages {
            pages += 1;
            let mut body = json!({ "modelId": self.source.model_id, "layers": [self.source.source], "query": text });
            if offset > 0 {
                body["offset"] = json!(offset);
            }
            let page: SearchReply = read(self.post("/api/explanation/search", &body).await?, "explanation search")?;
            for hit in &page.results {
                let Some(index) = hit.index else { continue };
                if hit.layer != self.source.source || features.iter().any(|f: &FeatureOut| f.index_in_sae == index) {
                    continue;
                }
                let density = hit.neuron.as_ref().and_then(|n| n.frac_nonzero);
                if let Some(neuron) = &hit.neuron {
                    let mut facts = Facts::of(neuron);
                    if facts.label.is_empty() {
                        facts.label = hit.description.clone();
                    }
                    self.remember(index, facts);
                }
                features.push(self.feature_out(index, hit.description.clone(), hit.cosine_similarity, density));
            }
            match page.next_offset {
                Some(next) if page.has_more && next > offset && !page.results.is_empty() => offset = next,
                _ => break,
            }
        }
        features.truncate(wanted);
        Ok(Features { features })
    }

    /// Labels of latents by index.
    pub async fn lookup(&self, request: &LookupRequest) -> Result<Lookup, EmberError> {
        self.check_model(&request.model)?;
        let indices = self.indices(&request.indices)?;
        let facts = self.facts(&indices).await?;
        Ok(Lookup {
            features: indices
                .iter()
                .map(|&i| LookedUp {
                    feature: GoodfireFeature {
                        uuid: self.ids.uuid(i),
                        label: facts[&i].label.clone(),
                        index_in_sae: i,
                        max_activation_strength: 1,
                    },
                    // Old Kindling units belong to Kindling's own SAE, not this one.
                    strength_per_unit_1: None,
                })
                .collect(),
            strength_unit: STRENGTH_UNIT,
        })
    }

    /// Features by id (`GET features/?feature_id=…`).
    pub async fn list(&self, query: &ListQuery) -> Result<Features, EmberError> {
        let indices = query
            .feature_ids
            .iter()
            .map(|id| {
                self.ids
                    .parse(id)
                    .ok_or_else(|| EmberError::Invalid(format!("{id:?} is not a feature id of {}", self.source.spec())))
            })
            .collect::<Result<Vec<u32>, _>>()?;
        if indices.len() > 256 {
            return Err(EmberError::Invalid("at most 256 features are listed at once".into()));
        }
        let facts = self.facts(&indices).await?;
        Ok(Features {
            features: indices
                .iter()
                .map(|&i| self.feature_out(i, facts[&i].label.clone(), None, facts[&i].density))
                .collect(),
        })
    }

    fn indices(&self, indices: &[i64]) -> Result<Vec<u32>, EmberError> {
        if indices.len() > 256 {
            return Err(EmberError::Invalid("at most 256 features are looked up at once".into()));
        }
        indices
            .iter()
            .map(|&i| u32::try_from(i).map_err(|_| EmberError::Invalid(format!("{i} is not a feature index"))))
            .collect()
    }

    /// A feature's card: its explanation, density, top activations (shaded against
    /// `maxActApprox`) and the tokens it promotes and suppresses.
    pub async fn dashboard(&self, request: &DashboardRequest) -> Result<Dashboard, EmberError> {
        self.check_model(&request.model)?;
        let index = self
            .ids
            .parse(&request.feature_id)
            .or_else(|| request.feature_id.parse().ok())
            .ok_or_else(|| EmberError::Invalid(format!("{:?} is not a feature id of {}", request.feature_id, self.source.spec())))?;
        let neuron: Neuron = read(self.get(&self.source.feature_path(index)).await?, "the feature's dashboard")?;
        let facts = Facts::of(&neuron);
        self.remember(index, facts.clone());
        let max_act = facts.max_act_or_fallback();
        let tokens = |strs: &[String], values: &[f32]| {
            strs.iter()
                .zip(values)
                .take(10)
                .map(|(t, v)| TokenValue {
                    token: t.clone(),
                    value: *v,
                })
                .collect::<Vec<_>>()
        };
        let contexts: Vec<ContextOut> = neuron
            .activations
            .iter()
            .take(10)
            .map(|a| ContextOut {
                tokens: a.tokens.clone(),
                activations: a.values.iter().map(|v| v / max_act).collect(),
            })
            .collect();
        Ok(Dashboard {
            feature: self.feature_out(index, facts.label.clone(), None, facts.density),
            label_source: neuron
                .explanations
                .first()
                .and_then(|e| e.explanation_model_name.clone())
                .map_or_else(|| "neuronpedia".into(), |m| format!("neuronpedia: {m}")),
            label_score: None,
            density: facts.density.unwrap_or(0.0),
            max_activation: max_act,
            max_observed: neuron.activations.iter().map(|a| a.max_value).fold(0.0, f32::max),
            histogram: neuron.freq_hist_data_bar_heights.iter().map(|h| h.max(0.0) as u32).collect(),
            promoted: tokens(&neuron.pos_str, &neuron.pos_values),
            suppressed: tokens(&neuron.neg_str, &neuron.neg_values),
            contexts,
            neighbors: Vec::new(),
        })
    }

    /// Every token of a conversation with the features that fire most on it (activations
    /// over each feature's `maxActApprox`). Neuronpedia reads plain text of the unsteered
    /// model: the messages' contents, joined by blank lines; a variant cannot be applied.
    pub async fn compute_features(&self, request: &ComputeFeaturesRequest) -> Result<TokenFeatures, EmberError> {
        self.check_model(&request.model)?;
        if let Some(controller) = &request.controller
            && !self.nudges(controller)?.is_empty()
        {
            return Err(self.unsupported(
                Route::ComputeFeatures,
                "it reads activations of the unsteered model only; inspect without the variant's edits",
            ));
        }
        let text = request.messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n");
        let limits = self.source.limits();
        if text.trim().is_empty() {
            return Err(EmberError::Invalid("there is no text to read".into()));
        }
        if text.encode_utf16().count() > limits.text_chars {
            return Err(EmberError::Invalid(format!(
                "Neuronpedia reads at most {} characters of text at once here; this has {}",
                limits.text_chars,
                text.encode_utf16().count()
            )));
        }
        // Chosen features are shaded wherever they fire: no density filter, and the most
        // features per token Neuronpedia gives.
        let (per_token, density) = match &request.include_feature_indexes {
            Some(_) => (MAX_FEATURES_PER_TOKEN, 0.0),
            None => (OVERLAY_FEATURES_PER_TOKEN, OVERLAY_DENSITY_THRESHOLD),
        };
        let body = json!({
            "modelId": self.source.model_id, "source": self.source.source, "text": text,
            "numResults": per_token, "ignoreBos": true, "densityThreshold": density,
        });
        let reply: TopkByToken = read(self.post("/api/search-topk-by-token", &body).await?, "search-topk-by-token")?;
        let only: Option<Vec<u32>> = request
            .include_feature_indexes
            .as_ref()
            .map(|v| v.iter().filter_map(|&i| u32::try_from(i).ok()).collect());
        let mut tokens = Vec::with_capacity(reply.results.len());
        for position in reply.results {
            let mut attributions = Vec::new();
            for top in position.top_features {
                if only.as_ref().is_some_and(|only| !only.contains(&top.feature_index)) {
                    continue;
                }
                let max_act = top.feature.as_ref().and_then(|n| n.max_act_approx).filter(|m| *m > 0.0);
                if let Some(neuron) = &top.feature {
                    self.remember(top.feature_index, Facts::of(neuron));
                }
                attributions.push(Activation {
                    id: self.ids.uuid(top.feature_index),
                    index_in_sae: top.feature_index,
                    activation_strength: max_act.map_or(top.activation_value, |m| top.activation_value / m),
                });
            }
            attributions.sort_by(|a, b| b.activation_strength.total_cmp(&a.activation_strength));
            tokens.push(TokenActivations {
                token: position.token,
                attributions,
            });
        }
        Ok(TokenFeatures { tokens })
    }

    /// AutoSteer as Neuronpedia's own UI does it: the explanation search's best hit, at a
    /// coefficient of its `maxActApprox` (0.2 steering units). It measures nothing, and says
    /// so in its trial's note.
    pub async fn auto_edits(&self, request: &SpecificationRequest) -> Result<AutoEdits, EmberError> {
        self.check_model(&request.model)?;
        let spec = specification(&request.specification)?;
        let hits = self
            .search(&SearchQuery {
                query: spec.into(),
                model: None,
                top_k: 5,
            })
            .await?;
        let value = value_of(1.0, 1.0);
        let trials: Vec<TrialOut> = hits
            .features
            .iter()
            .enumerate()
            .map(|(rank, f)| TrialOut {
                edits: vec![TrialEdit {
                    index_in_sae: f.index_in_sae,
                    label: f.label.clone(),
                    value,
                }],
                effect: f.relevance.unwrap_or(0.0),
                perplexity_ratio: None,
                distinct_bigrams: 0.0,
                accepted: rank == 0,
                sample: "search-based: Neuronpedia's explanation search ranks the features by their explanation; \
                         the strength is maxActApprox, as Neuronpedia's steering page sets it; nothing was generated"
                    .into(),
            })
            .collect();
        Ok(AutoEdits {
            edits: hits.features.into_iter().take(1).map(|f| (f, value)).collect(),
            trials,
            concept_tokens: Vec::new(),
        })
    }
}

/// A Neuronpedia reply as `T`, or a clear error naming the call.
fn read<T: serde::de::DeserializeOwned>(value: Value, what: &str) -> Result<T, EmberError> {
    serde_json::from_value(value).map_err(|e| EmberError::BadGateway(format!("Neuronpedia's {what} reply is not what Kindling reads: {e}")))
}

#[cfg(test)]
mod tests;
