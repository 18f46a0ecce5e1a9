//! The local provider: Kindling's engine (model, SAE, atlas) answering the API.
//!
//! [`Ember`] holds the model, the SAE and the atlas, and answers every route
//! ([`Provider`]) with the wire types of [`crate::wire`]: chat (streamed piece by piece),
//! logits, feature search, rerank, lookup, listing by id, neighbours, inspection, contrast,
//! AutoSteer, AutoConditional and attribution. The server and the browser worker dispatch to
//! it through the route table, so both speak one protocol.
//!
//! Conventions of this implementation, beyond what the SDK fixes:
//! * Feature ids are [`FeatureIds`] UUIDs: tied to the SAE's SHA-256 and the latent's index.
//! * Activations in `compute-features` are in max-activation units (the atlas's
//!   `max_activation`), the unit of edit values and conditions, so what a user reads in an
//!   inspection is what a condition compares against.
//! * Requests that the model cannot serve as sent (unknown feature, bad value, prompt too
//!   long) are [`EmberError::Invalid`]; an unknown model name is [`EmberError::UnknownModel`].
//!   `max_completion_tokens` above the limit is lowered to it, not refused, since the SDK
//!   always sends 2048.

mod controller;

use kindling_engine::atlas::{Atlas, Hit};
use kindling_engine::attribution::logit_attribution;
use kindling_engine::autosteer::{AutoSteerOptions, auto_conditional, auto_steer};
use kindling_engine::contrast::contrastive_replies;
use kindling_engine::inspect::Inspection;
use kindling_engine::logits::next_tokens;
use kindling_engine::sae::Sae;
use kindling_engine::steer::{Comparison, FiredScopes, Operand, Steer, Units, Variant, VariantError};
use kindling_engine::tokenizer::{ChatMessage, TokenId};
use kindling_engine::{
    AtlasError, CancelToken, EngineError, FinishReason, GeneratedToken, Interrupt, Model, ResidualHook, SamplingParams, TokenStream,
};
use serde_json::Value;
use std::sync::OnceLock;

pub use controller::read_controller;

use crate::EmberError;
use crate::ids::FeatureIds;
use crate::replies::{
    self, Ablation, Activation, ActiveAt, AutoEdits, ChatCompletion, Choice, Conditionals, ContextOut, Contrast, ContrastiveDatasets,
    Dashboard, FeatureGroup, Features, GoodfireFeature, LogitAttribution, LookedUp, Lookup, MapPoint, MapRegion, Measured, Neighbors,
    RightHand, TokenActivations, TokenFeatures, TokenText, TokenValue, Tokens, TrialEdit, TrialOut, Usage,
};
use crate::routes::{ListQuery, MapQuery, Provider, Route, SearchQuery};
use crate::units;
use crate::variant::FeatureRef;
use crate::wire::*;

// The protocol's copy of the unit's definition must be the engine's (the page reads the copy).
const _: () = assert!(units::STRENGTH_UNIT == kindling_engine::steer::STRENGTH_UNIT);
const _: () = assert!(units::RESIDUAL_FRACTION_PER_UNIT == kindling_engine::steer::RESIDUAL_FRACTION_PER_UNIT);
const _: () = assert!(units::MAX_EDIT_VALUE == kindling_engine::steer::MAX_VALUE);

impl From<EngineError> for EmberError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Variant(_)
            | EngineError::EmptyInput
            | EngineError::ContextOverflow { .. }
            | EngineError::BadToken(_)
            | EngineError::Tokenizer(_)
            | EngineError::OutOfTime { .. }
            | EngineError::Atlas(AtlasError::UnknownFeature { .. }) => EmberError::Invalid(e.to_string()),
            EngineError::Cancelled => EmberError::Cancelled,
            e => EmberError::Failed(e.to_string()),
        }
    }
}

impl From<VariantError> for EmberError {
    fn from(e: VariantError) -> Self {
        EmberError::Invalid(e.to_string())
    }
}

impl From<AtlasError> for EmberError {
    fn from(e: AtlasError) -> Self {
        EngineError::from(e).into()
    }
}

/// A chat reply being generated. Text that might be the start of a stop string is held back
/// until it is known not to be one.
pub struct ChatRun<'e> {
    stream: TokenStream<'e>,
    stop: Vec<String>,
    cancel: CancelToken,
    text: String,
    sent: usize,
    index: usize,
    stopped: bool,
    done: bool,
    end: ChatEnd,
    /// Where the variant's scopes fired, and which of those were reported.
    fired: Option<FiredScopes>,
    reported: Vec<bool>,
    prompt_len: usize,
    /// The text of every reply token so far (the token a rule fired on is named by it).
    token_texts: Vec<String>,
    rules: Vec<RuleFired>,
}

impl ChatRun<'_> {
    /// The next piece of the reply, or `None` once it has ended.
    pub fn next_delta(&mut self) -> Result<Option<ChatDelta>, EmberError> {
        while !self.done {
            let item = self.stream.next();
            if let Some(delta) = self.accept(item)? {
                return Ok(Some(delta));
            }
        }
        Ok(None)
    }

    /// [`next_delta`](Self::next_delta) without blocking on the device (WebGPU in the browser).
    pub async fn next_delta_async(&mut self) -> Result<Option<ChatDelta>, EmberError> {
        while !self.done {
            let item = self.stream.next_async().await;
            if let Some(delta) = self.accept(item)? {
                return Ok(Some(delta));
            }
        }
        Ok(None)
    }

    /// Takes the token stream's next item; returns the piece of text that is now safe to send.
    fn accept(&mut self, item: Option<Result<GeneratedToken, EngineError>>) -> Result<Option<ChatDelta>, EmberError> {
        let token = match item {
            Some(Ok(token)) => token,
            Some(Err(EngineError::Aborted { event })) => {
                self.end.event = Some(event);
                self.done = true;
                return Ok(None);
            }
            Some(Err(e)) => return Err(e.into()),
            None => {
                self.collect_fired();
                self.done = true;
                // What was held back as a possible stop string is part of the reply.
                if !self.end.cancelled && self.sent < self.text.len() {
                    return Ok(Some(self.take(self.text.len())));
                }
                return Ok(None);
            }
        };
        self.end.tokens += 1;
        self.text.push_str(&token.text);
        self.token_texts.push(token.text.clone());
        self.collect_fired();
        // The reply ends before the first stop string.
        let sent = self.sent;
        if let Some(cut) = self
            .stop
            .iter()
            .filter_map(|s| self.text[sent..].find(s.as_str()).map(|i| sent + i))
            .min()
        {
            self.text.truncate(cut);
            self.stopped = true;
            self.done = true;
        }
        let safe = if self.stopped {
            self.text.len()
        } else {
            self.text.len() - held_back(&self.text[sent..], &self.stop)
        };
        Ok((safe > sent).then(|| self.take(safe)))
    }

    /// Notes the rules that fired since the last look.
    fn collect_fired(&mut self) {
        let Some(fired) = &self.fired else { return };
        for (rule, position) in fired.positions().into_iter().enumerate() {
            let Some(position) = position else { continue };
            if std::mem::replace(&mut self.reported[rule], true) {
                continue;
            }
            let token_index = position.checked_sub(self.prompt_len);
            let token = token_index.and_then(|i| self.token_texts.get(i)).cloned().unwrap_or_default();
            self.rules.push(RuleFired { rule, token_index, token });
        }
    }

    fn take(&mut self, until: usize) -> ChatDelta {
        let delta = ChatDelta {
            index: self.index,
            text: self.text[self.sent..until].to_string(),
            rules: std::mem::take(&mut self.rules),
        };
        self.index += 1;
        self.sent = until;
        delta
    }

    /// Stops generating (the client went away or pressed stop).
    pub fn cancel(&mut self) {
        self.cancel.cancel();
        self.end.cancelled = true;
        self.done = true;
    }

    /// How the reply ended.
    pub fn end(mut self) -> ChatEnd {
        self.collect_fired();
        self.end.rules = std::mem::take(&mut self.rules);
        let finish = self.stream.finish_reason();
        if finish == Some(FinishReason::Length) && !self.stopped {
            self.end.finish_reason = "length";
        }
        self.end.cancelled |= finish == Some(FinishReason::Cancelled);
        self.end
    }
}

/// A streamed chat reply as Goodfire chunks (`chat.completion.chunk` objects): one per piece of
/// text, then a closing chunk that repeats the last token index (the SDK drops it as a
/// duplicate but still reads its events) with the finish reason and any abort event.
pub struct ChatChunks<'e> {
    run: Option<ChatRun<'e>>,
    id: String,
    created: u64,
    name: &'e str,
    last: usize,
    cancelled: bool,
}

impl ChatChunks<'_> {
    /// The next chunk, or `None` after the closing one (or after [`cancel`](Self::cancel)).
    pub fn next_chunk(&mut self) -> Result<Option<Value>, EmberError> {
        let Some(run) = self.run.as_mut() else { return Ok(None) };
        let delta = run.next_delta()?;
        Ok(self.chunk(delta))
    }

    /// [`next_chunk`](Self::next_chunk) without blocking on the device (WebGPU in the browser).
    pub async fn next_chunk_async(&mut self) -> Result<Option<Value>, EmberError> {
        let Some(run) = self.run.as_mut() else { return Ok(None) };
        let delta = run.next_delta_async().await?;
        Ok(self.chunk(delta))
    }

    /// The chunk for the run's next piece, or the closing chunk once there is none.
    fn chunk(&mut self, delta: Option<ChatDelta>) -> Option<Value> {
        if let Some(delta) = delta {
            self.last = delta.index;
            let chunk = chunk_json(&self.id, self.created, self.name, delta.index, &delta.text, None, &[]);
            return Some(with_rules_fired(chunk, &delta.rules));
        }
        let end = self.run.take()?.end();
        if end.cancelled {
            self.cancelled = true;
            return None;
        }
        let events: Vec<String> = end.event.into_iter().collect();
        let index = if end.tokens == 0 { 0 } else { self.last };
        let chunk = chunk_json(&self.id, self.created, self.name, index, "", Some(end.finish_reason), &events);
        Some(with_rules_fired(chunk, &end.rules))
    }

    /// Stops generating; no closing chunk follows.
    pub fn cancel(&mut self) {
        if let Some(mut run) = self.run.take() {
            run.cancel();
        }
        self.cancelled = true;
    }

    /// True when the reply was stopped rather than finished.
    pub fn was_cancelled(&self) -> bool {
        self.cancelled
    }
}

/// A validated chat request, ready to run.
pub struct ChatPlan {
    pub prompt: Vec<TokenId>,
    pub params: SamplingParams,
    pub variant: Variant,
    pub stop: Vec<String>,
}

// ---------------------------------------------------------------------------------------

/// The SAE, its atlas, and what derives from them: everything feature-related an [`Ember`]
/// serves. The page's worker attaches it after the model, so chat starts sooner.
struct FeatureSet {
    sae: Sae,
    atlas: Atlas,
    units: Units,
    ids: FeatureIds,
}

impl FeatureSet {
    fn new(sae: Sae, atlas: Atlas) -> Self {
        let units = Units::new(&sae, atlas.units());
        let ids = FeatureIds::new(atlas.sae_sha256());
        Self { sae, atlas, units, ids }
    }

    fn d_sae(&self) -> usize {
        self.atlas.d_sae()
    }

    fn label(&self, feature: u32) -> String {
        self.atlas.feature(feature).map(|f| f.label.clone()).unwrap_or_default()
    }

    fn feature_out(&self, feature: u32, relevance: Option<f32>) -> FeatureOut {
        let info = self.atlas.feature(feature).ok();
        FeatureOut {
            id: self.ids.uuid(feature),
            label: self.label(feature),
            index_in_sae: feature,
            relevance,
            density: info.map(|f| f.density),
            histogram: info.map(|f| f.histogram.clone()),
        }
    }

    fn hits_out(&self, hits: Vec<Hit>) -> Vec<FeatureOut> {
        hits.into_iter().map(|h| self.feature_out(h.feature, Some(h.score))).collect()
    }

    /// A feature as the SDK's `Feature.json()` writes it.
    fn goodfire_feature(&self, feature: u32) -> GoodfireFeature {
        FeatureRef {
            uuid: self.ids.uuid(feature),
            label: self.label(feature),
            index_in_sae: feature,
        }
        .to_goodfire()
    }

    /// The latent a feature id names (dashed or 32-hex UUID of this SAE).
    fn parse_id(&self, id: &str) -> Result<u32, EmberError> {
        self.ids
            .parse(id)
            .filter(|&f| (f as usize) < self.d_sae())
            .ok_or_else(|| EmberError::Invalid(format!("{id:?} is not a feature id of this SAE")))
    }
}

/// The model, SAE and atlas of one service, and the Ember operations on them.
///
/// The SAE and atlas may come later than the model ([`Ember::model_only`], then
/// [`Ember::attach_features`]): until then, requests that need them are
/// [`EmberError::Unavailable`] and plain chat works.
pub struct Ember {
    pub model: Model,
    features: OnceLock<FeatureSet>,
    /// The model name requests must carry.
    pub name: String,
    pub limits: Limits,
}

impl Ember {
    pub fn new(model: Model, sae: Sae, atlas: Atlas, name: impl Into<String>) -> Self {
        let ember = Self::model_only(model, name);
        ember.attach_features(sae, atlas);
        ember
    }

    /// An Ember that serves chat without steering until [`attach_features`](Self::attach_features).
    pub fn model_only(model: Model, name: impl Into<String>) -> Self {
        Self {
            model,
            features: OnceLock::new(),
            name: name.into(),
            limits: Limits::default(),
        }
    }

    /// Adds the SAE and the atlas (once: a second call changes nothing and returns false).
    pub fn attach_features(&self, sae: Sae, atlas: Atlas) -> bool {
        self.features.set(FeatureSet::new(sae, atlas)).is_ok()
    }

    /// Prefills the prompt prefix that unsteered chats share and keeps it, ahead of the first
    /// chat (see [`Model::warm_prompt_prefix`]): the playground does it while the user types.
    pub fn warm_prompt_prefix(&self) -> Result<(), EmberError> {
        Ok(self.model.warm_prompt_prefix()?)
    }

    /// Whether the SAE and the atlas are attached.
    pub fn has_features(&self) -> bool {
        self.features.get().is_some()
    }

    fn features(&self) -> Result<&FeatureSet, EmberError> {
        self.features
            .get()
            .ok_or_else(|| EmberError::Unavailable("the SAE and the feature atlas are still loading".into()))
    }

    /// Feature ids of this SAE (`None` until the SAE is attached).
    pub fn feature_ids(&self) -> Option<&FeatureIds> {
        self.features.get().map(|f| &f.ids)
    }

    /// Each latent's activation and steering units (`None` until the SAE is attached).
    pub fn units(&self) -> Option<&Units> {
        self.features.get().map(|f| &f.units)
    }

    fn check_model(&self, model: &str) -> Result<(), EmberError> {
        if model == self.name {
            Ok(())
        } else {
            Err(EmberError::UnknownModel {
                found: model.to_string(),
                serves: self.name.clone(),
            })
        }
    }

    fn index(&self, i: i64) -> Result<u32, EmberError> {
        let d_sae = self.features()?.d_sae();
        u32::try_from(i)
            .ok()
            .filter(|&f| (f as usize) < d_sae)
            .ok_or_else(|| EmberError::Invalid(format!("feature index {i} does not exist (the SAE has {d_sae} latents)")))
    }

    fn indices(&self, list: &[i64]) -> Result<Vec<u32>, EmberError> {
        if list.len() > self.limits.max_features {
            return Err(EmberError::Invalid(format!(
                "{} features, at most {}",
                list.len(),
                self.limits.max_features
            )));
        }
        list.iter().map(|&i| self.index(i)).collect()
    }

    fn top_k(&self, k: i64) -> Result<usize, EmberError> {
        usize::try_from(k)
            .ok()
            .filter(|&k| (1..=self.limits.max_top_k).contains(&k))
            .ok_or_else(|| EmberError::Invalid(format!("top_k must be between 1 and {}, got {k}", self.limits.max_top_k)))
    }

    /// The variant a request's `controller` describes (the base model without one).
    pub fn variant(&self, controller: Option<&Value>) -> Result<Variant, EmberError> {
        match controller {
            None | Some(Value::Null) => Ok(Variant::new(self.name.clone())),
            Some(c @ Value::Object(_)) => Ok(read_controller(&self.name, c, self.features()?.d_sae())?),
            Some(other) => Err(EmberError::Invalid(format!("\"controller\" must be an object, found {other}"))),
        }
    }

    fn messages(&self, messages: &[Message]) -> Result<Vec<ChatMessage>, EmberError> {
        if messages.is_empty() || messages.len() > self.limits.max_messages {
            return Err(EmberError::Invalid(format!(
                "between 1 and {} messages are needed, got {}",
                self.limits.max_messages,
                messages.len()
            )));
        }
        // Before any templating or tokenizing: their cost grows with the text.
        let bytes: usize = messages.iter().map(|m| m.content.len()).sum();
        if bytes > self.limits.max_prompt_bytes() {
            return Err(EmberError::Invalid(format!(
                "the conversation is {bytes} bytes long, this server takes at most {} ({} tokens)",
                self.limits.max_prompt_bytes(),
                self.limits.max_prompt_tokens
            )));
        }
        messages
            .iter()
            .map(|m| match m.role.as_str() {
                "system" | "user" | "assistant" => Ok(ChatMessage::new(m.role.clone(), m.content.clone())),
                other => Err(EmberError::Invalid(format!(
                    "message role must be system, user or assistant, found {other:?}"
                ))),
            })
            .collect()
    }

    fn check_length(&self, tokens: &[TokenId]) -> Result<(), EmberError> {
        if tokens.len() > self.limits.max_prompt_tokens {
            return Err(EmberError::Invalid(format!(
                "the conversation is {} tokens long, this server takes at most {}",
                tokens.len(),
                self.limits.max_prompt_tokens
            )));
        }
        Ok(())
    }

    /// A conversation as the model reads it as it stands (no generation prompt).
    /// Contents are plain text: `<|im_start|>` in a message cannot open a turn.
    fn conversation_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<TokenId>, EmberError> {
        let tokenizer = &self.model.tokenizer;
        let chat = tokenizer.render_chat(messages, false).map_err(EngineError::from)?;
        let tokens = tokenizer.encode_rendered(&chat);
        self.check_length(&tokens)?;
        Ok(tokens)
    }

    /// A conversation as the model reads it, for a continuation: with the assistant's
    /// generation prompt, or, when the last message is the assistant's, continuing that text.
    fn continuation_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<TokenId>, EmberError> {
        let tokenizer = &self.model.tokenizer;
        let tokens = if messages.last().is_some_and(|m| m.role == "assistant") {
            let mut chat = tokenizer.render_chat(messages, false).map_err(EngineError::from)?;
            let trimmed = chat.text.trim_end();
            let open = trimmed.strip_suffix("<|im_end|>").unwrap_or(trimmed).len();
            chat.truncate(open);
            tokenizer.encode_rendered(&chat)
        } else {
            tokenizer.encode_chat(messages).map_err(EngineError::from)?
        };
        self.check_length(&tokens)?;
        Ok(tokens)
    }

    fn steer(&self, variant: &Variant) -> Result<Option<Steer<'_>>, EmberError> {
        if variant.is_base() {
            return Ok(None);
        }
        let fs = self.features()?;
        Ok(Some(Steer::new(&fs.sae, &fs.units, variant.clone())?))
    }

    // --- chat -----------------------------------------------------------------------------

    /// AutoSteer (`POST features/auto-edits`), telling `on_step` each step as it starts (the
    /// page's worker passes them on while the user waits).
    pub fn auto_edits_reporting(
        &self,
        request: &SpecificationRequest,
        cancel: &CancelToken,
        on_step: Option<kindling_engine::autosteer::OnStep>,
    ) -> Result<AutoEdits, EmberError> {
        self.check_model(&request.model)?;
        let fs = self.features()?;
        let spec = specification(&request.specification)?;
        // Within the SDK's 60 s timeout, on a busy 2-core machine too.
        let opts = AutoSteerOptions {
            time_budget: Some(std::time::Duration::from_secs(30)),
            cancel: cancel.clone(),
            on_step,
            ..AutoSteerOptions::default()
        };
        let found = auto_steer(&self.model, &fs.sae, &fs.atlas, spec, &opts)?;
        let edits = found.edits.iter().map(|e| (fs.feature_out(e.feature, None), e.value)).collect();
        // Why it chose what it chose (Kindling's fields; the SDK reads only `edits`): every
        // trial, best first, and the tokens it counted as the concept's.
        let trials = found
            .trials
            .iter()
            .map(|t| TrialOut {
                edits: t
                    .edits
                    .iter()
                    .map(|e| TrialEdit {
                        index_in_sae: e.feature,
                        label: fs.label(e.feature),
                        value: e.value,
                    })
                    .collect(),
                effect: t.effect,
                perplexity_ratio: t.perplexity_ratio.is_finite().then_some(t.perplexity_ratio),
                distinct_bigrams: t.distinct,
                accepted: t.accepted,
                sample: t.sample.clone(),
            })
            .collect();
        let concept_tokens = found
            .concept_tokens
            .iter()
            .map(|&t| self.model.tokenizer.decode(&[t], false).unwrap_or_default())
            .collect();
        Ok(AutoEdits {
            edits,
            trials,
            concept_tokens,
        })
    }

    /// Checks a chat request and turns it into a plan (every error a request can cause is
    /// found here, before any reply is streamed).
    pub fn plan_chat(&self, request: &ChatRequest) -> Result<ChatPlan, EmberError> {
        self.check_model(&request.model)?;
        let messages = self.messages(&request.messages)?;
        let prompt = self.continuation_tokens(&messages)?;
        let variant = self.variant(request.controller.as_ref())?;
        let max_tokens = request.new_tokens(512, self.limits.max_new_tokens)?;
        let temperature = request.checked_temperature()?;
        let top_p = request.top_p.unwrap_or(0.9);
        if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
            return Err(EmberError::Invalid(format!("top_p must be above 0 and at most 1, got {top_p}")));
        }
        let seed = match request.seed {
            None => 42,
            Some(s) => u64::try_from(s).map_err(|_| EmberError::Invalid(format!("seed must not be negative, got {s}")))?,
        };
        let stop = request.stop_strings();
        let params = SamplingParams {
            temperature,
            top_p: Some(top_p),
            seed,
            max_tokens,
            ..SamplingParams::default()
        };
        Ok(ChatPlan {
            prompt,
            params,
            variant,
            stop,
        })
    }

    /// Generates the reply of a plan, handing each piece of text to `emit` (which returns
    /// false to stop: the client went away).
    pub fn run_chat(&self, plan: &ChatPlan, cancel: CancelToken, mut emit: impl FnMut(ChatDelta) -> bool) -> Result<ChatEnd, EmberError> {
        let mut run = self.start_chat(plan, cancel)?;
        while let Some(delta) = run.next_delta()? {
            if !emit(delta) {
                run.cancel();
                break;
            }
        }
        Ok(run.end())
    }

    /// Starts the reply of a plan as Goodfire stream chunks.
    pub fn start_chat_chunks(&self, plan: &ChatPlan, cancel: CancelToken) -> Result<ChatChunks<'_>, EmberError> {
        Ok(ChatChunks {
            run: Some(self.start_chat(plan, cancel)?),
            id: completion_id(),
            created: now(),
            name: &self.name,
            last: 0,
            cancelled: false,
        })
    }

    /// Starts the reply of a plan; the caller pulls its pieces with [`ChatRun::next_delta`]
    /// (the browser worker goes back to its event loop between pieces, so a stop gets through).
    pub fn start_chat(&self, plan: &ChatPlan, cancel: CancelToken) -> Result<ChatRun<'_>, EmberError> {
        let steer = self.steer(&plan.variant)?;
        let fired = steer.as_ref().map(|s| s.fired_scopes());
        let hook = steer.map(|s| Box::new(s) as Box<dyn ResidualHook + '_>);
        let stream = self
            .model
            .generate(plan.prompt.clone(), plan.params.clone(), hook, cancel.clone())?;
        Ok(ChatRun {
            stream,
            stop: plan.stop.clone(),
            cancel,
            text: String::new(),
            sent: 0,
            index: 0,
            stopped: false,
            done: false,
            end: ChatEnd {
                finish_reason: "stop",
                event: None,
                tokens: 0,
                cancelled: false,
                rules: Vec::new(),
            },
            fired,
            reported: vec![false; plan.variant.scopes.len()],
            prompt_len: plan.prompt.len(),
            token_texts: Vec::new(),
            rules: Vec::new(),
        })
    }
}

impl Provider for Ember {
    type Cancel = CancelToken;

    fn provider_name(&self) -> String {
        "Kindling's engine".into()
    }

    fn models(&self) -> Vec<String> {
        vec![self.name.clone()]
    }

    /// A whole (non-streamed) chat completion in the SDK's `ChatCompletion` shape.
    fn chat_completion(&self, request: &ChatRequest, cancel: &CancelToken) -> Result<ChatCompletion, EmberError> {
        let plan = self.plan_chat(request)?;
        let mut content = String::new();
        let mut rules = Vec::new();
        let mut end = self.run_chat(&plan, cancel.clone(), |d| {
            content.push_str(&d.text);
            rules.extend(d.rules);
            true
        })?;
        rules.append(&mut end.rules);
        Ok(ChatCompletion {
            id: completion_id(),
            object: "chat.completion",
            created: now(),
            model: self.name.clone(),
            system_fingerprint: String::new(),
            gf_event_names: end.event.into_iter().collect(),
            choices: vec![Choice {
                index: 0,
                message: Message {
                    role: "assistant".into(),
                    content,
                },
                finish_reason: end.finish_reason,
            }],
            usage: Usage {
                prompt_tokens: plan.prompt.len(),
                completion_tokens: end.tokens,
                total_tokens: plan.prompt.len() + end.tokens,
            },
            kindling_rules_fired: rules,
        })
    }

    // --- logits ---------------------------------------------------------------------------

    /// `compute-logits`: the next-token logits after the conversation, under its controller,
    /// most likely first.
    fn compute_logits(&self, request: &LogitsRequest, cancel: &CancelToken) -> Result<LogitsResponse, EmberError> {
        self.check_model(&request.model)?;
        let fs = self.features()?;
        let tokens = self.continuation_tokens(&self.messages(&request.messages)?)?;
        let variant = self.variant(request.controller.as_ref())?;
        let k = self.top_k(request.top_k)?.min(self.model.llama.config().vocab_size);
        let only = match &request.filter_vocabulary {
            None => None,
            Some(words) => Some(
                words
                    .iter()
                    .map(|w| match self.model.tokenizer.encode(w, true).as_slice() {
                        [id] => Ok(*id),
                        _ => Err(EmberError::Invalid(format!("{w:?} in filter_vocabulary is not one token"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let steered = (!variant.is_base()).then_some((&variant, &fs.units));
        cancel.check()?;
        let next = next_tokens(&self.model, &fs.sae, &tokens, steered, k, only.as_deref())?;
        let mut logits: Vec<(String, f32)> = Vec::with_capacity(next.len());
        for t in next {
            if !logits.iter().any(|(text, _)| *text == t.text) {
                logits.push((t.text, t.logit));
            }
        }
        Ok(LogitsResponse {
            logits: OrderedMap(logits),
        })
    }

    // --- features -------------------------------------------------------------------------

    /// `GET features/search` (the model defaults to this one).
    fn search(&self, request: &SearchQuery) -> Result<Features, EmberError> {
        self.check_model(request.model.as_deref().unwrap_or(&self.name))?;
        let fs = self.features()?;
        let k = self.top_k(request.top_k)?.min(100);
        Ok(Features {
            features: fs.hits_out(fs.atlas.search(&request.query, k)),
        })
    }

    /// `POST features/rerank`.
    fn rerank(&self, request: &RerankRequest) -> Result<Features, EmberError> {
        self.check_model(&request.model)?;
        let fs = self.features()?;
        if request.feature_ids.len() > self.limits.max_features {
            return Err(EmberError::Invalid(format!(
                "{} feature ids, at most {}",
                request.feature_ids.len(),
                self.limits.max_features
            )));
        }
        let features = request
            .feature_ids
            .iter()
            .map(|id| fs.parse_id(id))
            .collect::<Result<Vec<_>, _>>()?;
        let hits = fs.atlas.rerank(&features, &request.query, self.top_k(request.top_k)?)?;
        Ok(Features {
            features: fs.hits_out(hits),
        })
    }

    /// `GET features/?feature_id=...`: the features these ids name (ids of another SAE are
    /// left out, as the SDK expects; malformed ids are an error).
    fn list(&self, request: &ListQuery) -> Result<Features, EmberError> {
        let fs = self.features()?;
        let ids = &request.feature_ids;
        if ids.len() > self.limits.max_features {
            return Err(EmberError::Invalid(format!(
                "{} feature ids, at most {}",
                ids.len(),
                self.limits.max_features
            )));
        }
        let mut out = Vec::new();
        for id in ids {
            let hex: String = id.chars().filter(|&c| c != '-').collect();
            if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(EmberError::Invalid(format!("{id:?} is not a UUID")));
            }
            if let Ok(f) = fs.parse_id(id) {
                out.push(fs.feature_out(f, None));
            }
        }
        Ok(Features { features: out })
    }

    /// `POST features/lookup`.
    fn lookup(&self, request: &LookupRequest) -> Result<Lookup, EmberError> {
        self.check_model(&request.model)?;
        let fs = self.features()?;
        let features = self.indices(&request.indices)?;
        // Beside each feature, what one value of the old steering unit is in the current one:
        // the page converts variants saved before unit 2 with it (a Kindling field; the SDK
        // ignores keys it does not know).
        let features = features
            .iter()
            .map(|&f| LookedUp {
                feature: fs.goodfire_feature(f),
                strength_per_unit_1: fs.units.from_version_1(f, 1.0),
            })
            .collect();
        Ok(Lookup {
            features,
            strength_unit: units::STRENGTH_UNIT,
        })
    }

    /// `POST attributions/neighbors`: by decoder cosine to the group's centroid.
    fn neighbors(&self, request: &NeighborsRequest) -> Result<Neighbors, EmberError> {
        self.check_model(&request.model)?;
        let fs = self.features()?;
        let group = self.indices(&request.feature_indices)?;
        if group.is_empty() {
            return Err(EmberError::Invalid("feature_indices is empty".into()));
        }
        let hits = fs.atlas.neighbors(&fs.sae, &group, self.top_k(request.top_k)?)?;
        let out: Vec<FeatureOut> = hits.into_iter().map(|h| fs.feature_out(h.feature, None)).collect();
        Ok(Neighbors { neighbors: out })
    }

    /// `POST features/dashboard`: a feature's card: label and its score, density, histogram,
    /// the tokens it promotes and suppresses, its top contexts (token texts with activations in
    /// max-activation units) and its nearest neighbours by decoder direction.
    fn dashboard(&self, request: &DashboardRequest) -> Result<Dashboard, EmberError> {
        self.check_model(&request.model)?;
        let fs = self.features()?;
        let feature = fs.parse_id(&request.feature_id)?;
        let info = fs.atlas.feature(feature)?;
        let unit = fs.units.activation[feature as usize];
        let text = |id: TokenId| self.model.tokenizer.decode(&[id], false).unwrap_or_default();
        let tokens =
            |list: &[(TokenId, f32)]| -> Vec<TokenValue> { list.iter().map(|&(t, value)| TokenValue { token: text(t), value }).collect() };
        let contexts: Vec<ContextOut> = match fs.atlas.contexts(feature) {
            Ok(list) => list
                .into_iter()
                .map(|c| ContextOut {
                    tokens: c.tokens.iter().map(|&t| text(t)).collect(),
                    activations: c.activations.iter().map(|a| a / unit).collect(),
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let neighbors: Vec<FeatureOut> = fs
            .atlas
            .neighbors(&fs.sae, &[feature], 8)?
            .into_iter()
            .map(|h| fs.feature_out(h.feature, Some(h.score)))
            .collect();
        Ok(Dashboard {
            feature: fs.feature_out(feature, None),
            label_source: wire_name(&info.label_source),
            label_score: info.label_score,
            density: info.density,
            max_activation: info.max_activation,
            max_observed: info.max_observed,
            histogram: info.histogram.clone(),
            promoted: tokens(&info.promoted),
            suppressed: tokens(&info.suppressed),
            contexts,
            neighbors,
        })
    }

    /// `POST chat-attribution/compute-features`: every token of the templated conversation
    /// with its active features (strongest first, in max-activation units).
    fn compute_features(&self, request: &ComputeFeaturesRequest, cancel: &CancelToken) -> Result<TokenFeatures, EmberError> {
        self.check_model(&request.model)?;
        let fs = self.features()?;
        let messages = self.messages(&request.messages)?;
        let variant = self.variant(request.controller.as_ref())?;
        let only = match &request.include_feature_indexes {
            Some(list) if list.len() > 512 => {
                return Err(EmberError::Invalid(format!("{} include_feature_indexes, at most 512", list.len())));
            }
            Some(list) => Some(self.indices(list)?),
            None => None,
        };
        let tokens = self.conversation_tokens(&messages)?;
        let steered = (!variant.is_base()).then_some((&variant, &fs.units));
        let inspection = Inspection::run_cancellable(&self.model, &fs.sae, &tokens, steered, cancel)?;
        let mut out = Vec::with_capacity(tokens.len());
        for (&token, features) in inspection.tokens.iter().zip(&inspection.features) {
            let mut attributions: Vec<(u32, f32)> = features
                .iter()
                .filter(|&&(f, _)| only.as_ref().is_none_or(|o| o.contains(&f)))
                .map(|&(f, a)| (f, a / fs.units.activation[f as usize]))
                .collect();
            attributions.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            out.push(TokenActivations {
                token: self.model.tokenizer.decode(&[token], false).map_err(EngineError::from)?,
                attributions: attributions
                    .into_iter()
                    .map(|(f, a)| Activation {
                        id: fs.ids.uuid(f),
                        index_in_sae: f,
                        activation_strength: a,
                    })
                    .collect(),
            });
        }
        Ok(TokenFeatures { tokens: out })
    }

    /// `POST chat-attribution/contrast`: `dataset_1_features` are stronger in dataset 1's
    /// assistant turns, `dataset_2_features` in dataset 2's. At most
    /// [`Limits::max_contrast_tokens`] in all, stopped after [`Limits::contrast_budget`].
    fn contrast(&self, request: &ContrastRequest, cancel: &CancelToken) -> Result<Contrast, EmberError> {
        self.check_model(&request.model)?;
        let fs = self.features()?;
        let (a, b) = (&request.dataset_1, &request.dataset_2);
        if a.is_empty() || a.len() != b.len() || a.len() > self.limits.max_conversations {
            return Err(EmberError::Invalid(format!(
                "the datasets must hold the same number of conversations, 1 to {} (got {} and {})",
                self.limits.max_conversations,
                a.len(),
                b.len()
            )));
        }
        let mut total_tokens = 0;
        let mut read = |set: &[Vec<Message>]| -> Result<Vec<Vec<ChatMessage>>, EmberError> {
            set.iter()
                .map(|c| {
                    let messages = self.messages(c)?;
                    total_tokens += self.conversation_tokens(&messages)?.len();
                    if total_tokens > self.limits.max_contrast_tokens {
                        return Err(EmberError::Invalid(format!(
                            "the datasets hold more than {} tokens in all; contrast fewer or shorter conversations",
                            self.limits.max_contrast_tokens
                        )));
                    }
                    cancel.check()?;
                    Ok(messages)
                })
                .collect()
        };
        let (a, b) = (read(a)?, read(b)?);
        let k = self.top_k(request.k_to_add.max(request.k_to_remove))?;
        let interrupt = Interrupt::new(cancel.clone()).with_budget(self.limits.contrast_budget);
        let (ones, twos) = kindling_engine::contrast(&self.model, &fs.sae, &a, &b, &fs.units.activation, k, &interrupt)?;
        let out = |list: Vec<(u32, f32)>, k: i64| -> Vec<FeatureOut> {
            list.into_iter()
                .take(k.max(0) as usize)
                .map(|(f, _)| fs.feature_out(f, None))
                .collect()
        };
        Ok(Contrast {
            dataset_1_features: out(ones, request.k_to_remove),
            dataset_2_features: out(twos, request.k_to_add),
        })
    }

    /// `POST features/auto-edits`: AutoSteer.
    fn auto_edits(&self, request: &SpecificationRequest, cancel: &CancelToken) -> Result<AutoEdits, EmberError> {
        self.auto_edits_reporting(request, cancel, None)
    }

    /// `POST features/auto-conditional`.
    fn auto_conditional(&self, request: &SpecificationRequest, cancel: &CancelToken) -> Result<replies::AutoConditional, EmberError> {
        self.check_model(&request.model)?;
        let fs = self.features()?;
        let spec = specification(&request.specification)?;
        let found = auto_conditional(&self.model, &fs.sae, &fs.atlas, spec, cancel)?
            .ok_or_else(|| EmberError::Invalid(format!("no feature matches {spec:?}")))?;
        let group = |features: &[u32]| FeatureGroup {
            features: features.iter().map(|&f| fs.goodfire_feature(f)).collect(),
        };
        let conditionals = found
            .condition
            .comparisons
            .iter()
            .map(|Comparison { left, op, right }| replies::Comparison {
                left_hand: group(left),
                right_hand: match right {
                    Operand::Number(n) => RightHand::Number(*n),
                    Operand::Group(g) => RightHand::Feature(fs.goodfire_feature(g[0])),
                },
                operator: wire_name(op),
            })
            .collect();
        Ok(replies::AutoConditional {
            conditional: Conditionals {
                conditionals,
                operator: wire_name(&found.condition.combine),
            },
            // Why (Kindling's field; the SDK reads only `conditional`): the feature's maximum
            // on the texts about the description and on plain ones, in activation units.
            measured: Measured {
                feature: found.feature,
                label: fs.label(found.feature),
                threshold: found.threshold,
                on_topic: found.on_topic,
                plain: found.plain,
                separates: found.separates,
            },
        })
    }

    /// `POST attributions/compute-logit-attribution`: the features whose ablation at the
    /// position that predicts the token at `startIndex` lowers that token's logit most
    /// ([`kindling_engine::attribution`]). `value` is the logit drop; `tokens` lists where the
    /// feature is active before the token.
    fn attribute(&self, request: &AttributionRequest, cancel: &CancelToken) -> Result<LogitAttribution, EmberError> {
        let fs = self.features()?;
        const CANDIDATES: usize = 16;
        self.check_model(&request.model)?;
        let messages = self.messages(&request.messages)?;
        let tokens = self.conversation_tokens(&messages)?;
        let index = usize::try_from(request.start_index)
            .ok()
            .filter(|&i| i >= 2 && i < tokens.len())
            .ok_or_else(|| {
                EmberError::Invalid(format!(
                    "startIndex must be between 2 and {}, got {}",
                    tokens.len().saturating_sub(1),
                    request.start_index
                ))
            })?;
        if request.end_index.is_some_and(|e| e != request.start_index) {
            return Err(EmberError::Invalid(
                "attribution covers one token: endIndex must equal startIndex".into(),
            ));
        }
        let found = logit_attribution(&self.model, &fs.sae, &fs.units, &tokens[..index], tokens[index], CANDIDATES, cancel)?;
        let to_ablate = found
            .into_iter()
            .map(|a| Ablation {
                id: fs.ids.uuid(a.feature),
                value: a.drop,
                tokens: a
                    .active
                    .iter()
                    .map(|&(index, activation_strength)| ActiveAt {
                        index,
                        activation_strength,
                    })
                    .collect(),
            })
            .collect();
        Ok(LogitAttribution {
            to_ablate,
            num_input_tokens: tokens.len(),
        })
    }

    /// `POST attributions/generate-contrastive-dataset`: `[dataset_1, dataset_2]`, the model's
    /// replies to a few neutral prompts as it is, and as asked to follow `specification`
    /// ([`contrastive_replies`]): two paired datasets for `contrast`.
    /// Its work is fixed (8 short replies), so it checks `cancel` only before starting.
    fn contrastive_dataset(&self, request: &ContrastiveDatasetRequest, cancel: &CancelToken) -> Result<ContrastiveDatasets, EmberError> {
        let spec = specification(&request.specification)?;
        cancel.check()?;
        let [plain, asked] = contrastive_replies(&self.model, spec)?;
        let dataset = |pairs: Vec<(String, String)>| -> Vec<Vec<Message>> {
            pairs
                .into_iter()
                .map(|(prompt, reply)| {
                    vec![
                        Message {
                            role: "user".into(),
                            content: prompt,
                        },
                        Message {
                            role: "assistant".into(),
                            content: reply,
                        },
                    ]
                })
                .collect()
        };
        Ok(ContrastiveDatasets([dataset(plain), dataset(asked)]))
    }

    /// `POST chat/tokenize`.
    fn tokenize(&self, request: &TokenizeRequest) -> Result<Tokens, EmberError> {
        self.check_model(&request.model)?;
        let tokens = self.conversation_tokens(&self.messages(&request.messages)?)?;
        let tokens = tokens
            .iter()
            .map(|&t| {
                Ok(TokenText {
                    value: self.model.tokenizer.decode(&[t], false).map_err(EngineError::from)?,
                })
            })
            .collect::<Result<Vec<_>, EmberError>>()?;
        Ok(Tokens { tokens })
    }

    /// `GET features/map` (Kindling's own).
    fn feature_map(&self, request: &MapQuery) -> Result<replies::FeatureMap, EmberError> {
        self.check_model(request.model.as_deref().unwrap_or(&self.name))?;
        let fs = self.features()?;
        let map = fs.atlas.map().ok_or_else(|| EmberError::Unsupported {
            operation: Route::Map.path(),
            provider: self.provider_name(),
            why: "its atlas has no map.safetensors (scripts/build-map.sh makes one)".into(),
        })?;
        let round = |v: f32| (v * 1e4).round() / 1e4;
        let regions = map
            .regions
            .iter()
            .zip(map.region_centres())
            .map(|(name, centre)| {
                let (x, y) = centre.unwrap_or((0.5, 0.5));
                MapRegion {
                    name: name.clone(),
                    x: round(x),
                    y: round(y),
                }
            })
            .collect();
        let points = map
            .points
            .iter()
            .enumerate()
            .filter_map(|(index, point)| {
                let p = point.as_ref()?;
                Some(MapPoint {
                    index_in_sae: index as u32,
                    label: fs.label(index as u32),
                    x: round(p.x),
                    y: round(p.y),
                    region: p.region,
                })
            })
            .collect();
        Ok(replies::FeatureMap { regions, points })
    }
}

/// The name an engine enum has on the wire (its serde name: `">"`, `"AND"`, `"model"`).
fn wire_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(name)) => name,
        other => unreachable!("{other:?} is not a unit variant's name"),
    }
}
