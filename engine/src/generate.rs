//! Streaming generation: prefill, then one token at a time until `<|im_end|>`, the token
//! budget, or cancellation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::hook::{AddToResidual, ResidualHook};
use crate::host::to_host;
use crate::llama::{KvCache, Logits};
use crate::sampling::Sampler;
use crate::steer::SteeringVector;
use crate::tokenizer::{StreamDecoder, TokenId};
use crate::{EngineError, Model, SamplingParams};

/// Stops a running generation, or any long engine work, from another thread (or a UI
/// callback). A [`child`](Self::child) is cancelled with its parent: the server cancels every
/// request's token at shutdown through one parent.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<CancelState>);

#[derive(Debug, Default)]
struct CancelState {
    cancelled: AtomicBool,
    parent: Option<CancelToken>,
}

impl CancelToken {
    /// A token that has not been cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new token that is cancelled when this one is (or when it is cancelled itself).
    pub fn child(&self) -> Self {
        Self(Arc::new(CancelState {
            cancelled: AtomicBool::new(false),
            parent: Some(self.clone()),
        }))
    }

    /// Asks the work to stop at its next check (a generation: before its next token).
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::Relaxed);
    }

    /// Whether [`cancel`](Self::cancel) was called on this token or an ancestor.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::Relaxed) || self.0.parent.as_ref().is_some_and(CancelToken::is_cancelled)
    }

    /// `Err(EngineError::Cancelled)` once cancelled: for the checks between steps of long work.
    pub fn check(&self) -> Result<(), EngineError> {
        if self.is_cancelled() { Err(EngineError::Cancelled) } else { Ok(()) }
    }
}

/// When long work (a contrast, an attribution) must stop: its request's cancel token, and a
/// time budget. [`check`](Self::check) between steps.
#[derive(Debug, Clone)]
pub struct Interrupt {
    cancel: CancelToken,
    budget: Option<(web_time::Instant, std::time::Duration)>,
}

impl Interrupt {
    /// Stops only when `cancel` is cancelled.
    pub fn new(cancel: CancelToken) -> Self {
        Self { cancel, budget: None }
    }

    /// Also stops once `budget` has passed from now.
    pub fn with_budget(mut self, budget: std::time::Duration) -> Self {
        self.budget = Some((web_time::Instant::now(), budget));
        self
    }

    /// `Err(Cancelled)` or `Err(OutOfTime)` when the work must stop.
    pub fn check(&self) -> Result<(), EngineError> {
        self.cancel.check()?;
        match self.budget {
            Some((start, budget)) if start.elapsed() > budget => Err(EngineError::OutOfTime { budget }),
            _ => Ok(()),
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its turn (`<|im_end|>`).
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The [`CancelToken`] was cancelled.
    Cancelled,
    /// A hook interrupted it (a steering `abort_when` fired).
    Aborted,
}

/// One generated token and the text it completes.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    pub id: TokenId,
    /// Newly complete text (may be empty while a UTF-8 character is unfinished).
    pub text: String,
}

/// An iterator over generated tokens. Dropping it stops the generation.
pub struct TokenStream<'m> {
    model: &'m Model,
    cache: KvCache,
    sampler: Sampler,
    decoder: StreamDecoder,
    hook: Option<Box<dyn ResidualHook + 'm>>,
    input: Vec<TokenId>,
    generated: Vec<TokenId>,
    cancel: CancelToken,
    finish: Option<FinishReason>,
}

impl<'m> TokenStream<'m> {
    pub(crate) fn new(
        model: &'m Model,
        prompt: Vec<TokenId>,
        params: SamplingParams,
        hook: Option<Box<dyn ResidualHook + 'm>>,
        cancel: CancelToken,
    ) -> Result<Self, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        let limit = model.llama.config().context_length;
        if prompt.len() > limit {
            return Err(EngineError::ContextOverflow {
                needed: prompt.len(),
                limit,
            });
        }
        // An unsteered chat's shared prefix is a pass of its own, from its kept cache.
        let shared = if hook.is_none() { model.prompt_prefix.covers(&prompt) } else { 0 };
        let (cache, input) = match shared {
            0 => (model.llama.new_cache(), prompt),
            n => (model.prompt_prefix.cache(&model.llama)?, prompt[n..].to_vec()),
        };
        Ok(Self {
            model,
            cache,
            sampler: Sampler::new(params),
            decoder: StreamDecoder::new(),
            hook,
            input,
            generated: Vec::new(),
            cancel,
            finish: None,
        })
    }

    /// Why generation ended (`None` while it runs).
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// The ids generated so far.
    pub fn generated(&self) -> &[TokenId] {
        &self.generated
    }

    /// Runs to the end and returns the whole text.
    pub fn collect_text(&mut self) -> Result<String, EngineError> {
        let mut text = String::new();
        for token in self.by_ref() {
            text.push_str(&token?.text);
        }
        Ok(text)
    }

    /// Whether another token may be generated; if not, records why.
    fn may_continue(&mut self) -> bool {
        let context = self.model.llama.config().context_length;
        self.finish = if self.cancel.is_cancelled() {
            Some(FinishReason::Cancelled)
        } else if self.generated.len() >= self.sampler.params().max_tokens || self.cache.len() + self.input.len() > context {
            Some(FinishReason::Length)
        } else {
            None
        };
        self.finish.is_none()
    }

    /// Samples the next token from the logits of the pass that just ran.
    fn after_pass(&mut self, mut logits: Vec<f32>) -> Result<Option<GeneratedToken>, EngineError> {
        if let Some(event) = self.hook.as_deref().and_then(|h| h.interrupt()) {
            self.finish = Some(FinishReason::Aborted);
            return Err(EngineError::Aborted { event });
        }
        let token = self.sampler.sample(&mut logits);
        if token == self.model.tokenizer.eos() {
            self.finish = Some(FinishReason::Stop);
            return Ok(None);
        }
        self.generated.push(token);
        self.input = vec![token];
        let text = self.decoder.push(&self.model.tokenizer, token)?;
        Ok(Some(GeneratedToken { id: token, text }))
    }

    fn step(&mut self) -> Result<Option<GeneratedToken>, EngineError> {
        if !self.may_continue() {
            return Ok(None);
        }
        let hook = self.hook.as_deref_mut().map(|h| h as &mut dyn ResidualHook);
        let logits = self
            .model
            .llama
            .forward(&self.input, &mut self.cache, hook, Logits::Last)?
            .expect("Logits::Last returns logits");
        self.after_pass(to_host(logits)?)
    }

    /// The next token without blocking on the device ([`Llama::forward_last_async`]): how
    /// WebGPU in the browser generates. Same results as [`Iterator::next`].
    ///
    /// [`Llama::forward_last_async`]: crate::Llama::forward_last_async
    pub async fn next_async(&mut self) -> Option<Result<GeneratedToken, EngineError>> {
        if self.finish.is_some() || !self.may_continue() {
            return None;
        }
        let hook = self.hook.as_deref_mut().map(|h| h as &mut dyn ResidualHook);
        let step = match self.model.llama.forward_last_async(&self.input, &mut self.cache, hook).await {
            Ok(logits) => self.after_pass(logits),
            Err(e) => Err(e),
        };
        self.finished_step(step)
    }

    /// Turns a step's outcome into the iterator's item.
    fn finished_step(&mut self, step: Result<Option<GeneratedToken>, EngineError>) -> Option<Result<GeneratedToken, EngineError>> {
        match step {
            Ok(Some(token)) => Some(Ok(token)),
            // Bytes of a character the model never finished are dropped, not shown as U+FFFD.
            Ok(None) => None,
            Err(e) => {
                if self.finish.is_none() {
                    self.finish = Some(FinishReason::Stop);
                }
                Some(Err(e))
            }
        }
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<GeneratedToken, EngineError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finish.is_some() {
            return None;
        }
        let step = self.step();
        self.finished_step(step)
    }
}

/// One finished sequence of a batch generation.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutput {
    /// The generated ids (without the final `<|im_end|>`).
    pub tokens: Vec<TokenId>,
    /// Their text.
    pub text: String,
    pub finish: FinishReason,
}

/// One request of [`Model::generate_steered`].
#[derive(Debug, Clone)]
pub struct SteeredRequest {
    pub prompt: Vec<TokenId>,
    /// The sampler's seed.
    pub seed: u64,
    /// Added to the residual at every position; `None` is the base model.
    pub steering: Option<Arc<SteeringVector>>,
}

impl Model {
    /// The rows a batched decode step adds after the steering layer, one per running
    /// sequence (zero for unsteered ones), or `None` when no sequence is steered.
    fn steering_rows(&self, running: &[Running]) -> Option<(usize, burn::tensor::Tensor<2>)> {
        let layer = running.iter().find_map(|r| r.steering.as_ref())?.layer;
        let width = self.llama.config().n_embd;
        let mut rows = vec![0f32; running.len() * width];
        for (row, r) in rows.chunks_exact_mut(width).zip(running) {
            if let Some(v) = &r.steering {
                // Sequences steered at another layer cannot share this step's rows.
                assert_eq!(v.layer, layer, "one batch steers at one layer");
                row.copy_from_slice(&v.values);
            }
        }
        let data = burn::tensor::TensorData::new(rows, [running.len(), width]);
        Some((layer, burn::tensor::Tensor::from_data(data, self.llama.device())))
    }
}

/// A sequence still being generated (its cache lives in a parallel vector, the slice that
/// [`Llama::forward_batch`](crate::Llama::forward_batch) takes).
struct Running {
    index: usize,
    sampler: Sampler,
    steering: Option<Arc<SteeringVector>>,
    tokens: Vec<TokenId>,
    next: TokenId,
}

impl Model {
    /// Generates continuations of several prompts together: each prompt is prefilled on its
    /// own, then all unfinished sequences decode in one batched step per token (the weights
    /// are read once per step instead of once per sequence). Sequence `i` samples with seed
    /// `params.seed + i`. Outputs come back in the prompts' order.
    pub fn generate_batch(&self, prompts: &[Vec<TokenId>], params: &SamplingParams) -> Result<Vec<BatchOutput>, EngineError> {
        let mut outputs: Vec<Option<BatchOutput>> = vec![None; prompts.len()];
        let requests = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), params.seed.wrapping_add(i as u64)));
        self.generate_many(requests, params, prompts.len().max(1), |i, output| {
            outputs[i] = Some(output);
            Ok(true)
        })?;
        Ok(outputs.into_iter().map(|o| o.expect("every sequence finishes")).collect())
    }

    /// Continuous batching over a stream of `(prompt, seed)` requests: up to `max_batch`
    /// sequences decode together, and a finished one is replaced by the next request at
    /// once, so the batch stays full instead of draining down to its longest member.
    /// `on_finish(index, output)` receives each sequence as it ends (index = its position in
    /// `requests`); returning `false` stops taking new requests (running ones still finish).
    pub fn generate_many(
        &self,
        requests: impl IntoIterator<Item = (Vec<TokenId>, u64)>,
        params: &SamplingParams,
        max_batch: usize,
        on_finish: impl FnMut(usize, BatchOutput) -> Result<bool, EngineError>,
    ) -> Result<(), EngineError> {
        self.generate_many_after(&self.llama.new_cache(), requests, params, max_batch, on_finish)
    }

    /// [`generate_many`](Self::generate_many) where every prompt continues a shared prefix
    /// already in `prefix` (prefilled once, e.g. long instructions), so that each request
    /// pays only for its own tokens.
    pub fn generate_many_after(
        &self,
        prefix: &KvCache,
        requests: impl IntoIterator<Item = (Vec<TokenId>, u64)>,
        params: &SamplingParams,
        max_batch: usize,
        on_finish: impl FnMut(usize, BatchOutput) -> Result<bool, EngineError>,
    ) -> Result<(), EngineError> {
        let requests = requests.into_iter().map(|(prompt, seed)| SteeredRequest {
            prompt,
            seed,
            steering: None,
        });
        self.generate_steered_after(prefix, requests, params, max_batch, on_finish)
    }

    /// [`generate_many`](Self::generate_many) where each request may carry its own
    /// [`SteeringVector`] (unconditional nudges, see [`crate::steer::steering_vector`]): many
    /// steering settings tried side by side in one batch, as AutoSteer and the steering
    /// evaluation do. The vector is added at every position, prompt included, exactly as the
    /// [`Steer`](crate::Steer) hook adds those nudges.
    pub fn generate_steered(
        &self,
        requests: impl IntoIterator<Item = SteeredRequest>,
        params: &SamplingParams,
        max_batch: usize,
        on_finish: impl FnMut(usize, BatchOutput) -> Result<bool, EngineError>,
    ) -> Result<(), EngineError> {
        self.generate_steered_after(&self.llama.new_cache(), requests, params, max_batch, on_finish)
    }

    fn generate_steered_after(
        &self,
        prefix: &KvCache,
        requests: impl IntoIterator<Item = SteeredRequest>,
        params: &SamplingParams,
        max_batch: usize,
        mut on_finish: impl FnMut(usize, BatchOutput) -> Result<bool, EngineError>,
    ) -> Result<(), EngineError> {
        let mut requests = requests.into_iter().enumerate();
        let mut accepting = true;
        let mut running: Vec<Running> = Vec::with_capacity(max_batch);
        let mut caches = Vec::with_capacity(max_batch);
        let eos = self.tokenizer.eos();
        let limit = self.llama.config().context_length;
        loop {
            while accepting && running.len() < max_batch.max(1) {
                let Some((index, SteeredRequest { prompt, seed, steering })) = requests.next() else {
                    accepting = false;
                    break;
                };
                let mut cache = prefix.clone();
                let mut hook = steering.as_ref().map(|v| AddToResidual::new(v.layer, v.values.to_vec()));
                let logits = self
                    .llama
                    .forward(&prompt, &mut cache, hook.as_mut().map(|h| h as &mut dyn ResidualHook), Logits::Last)?
                    .expect("Logits::Last returns logits");
                let mut sampler = Sampler::new(SamplingParams { seed, ..params.clone() });
                let next = sampler.sample(&mut to_host(logits)?);
                running.push(Running {
                    index,
                    sampler,
                    tokens: Vec::new(),
                    next,
                    steering,
                });
                caches.push(cache);
            }
            // Retire the sequences whose last sample ends them.
            let mut i = 0;
            while i < running.len() {
                let r = &mut running[i];
                let finish = if r.next == eos {
                    Some(FinishReason::Stop)
                } else {
                    r.tokens.push(r.next);
                    if r.tokens.len() >= params.max_tokens || caches[i].len() + 1 >= limit {
                        Some(FinishReason::Length)
                    } else {
                        None
                    }
                };
                if let Some(finish) = finish {
                    let r = running.swap_remove(i);
                    caches.swap_remove(i);
                    let text = self.tokenizer.decode(&r.tokens, true)?;
                    accepting &= on_finish(
                        r.index,
                        BatchOutput {
                            tokens: r.tokens,
                            text,
                            finish,
                        },
                    )?;
                } else {
                    i += 1;
                }
            }
            if running.is_empty() {
                if accepting {
                    continue;
                }
                return Ok(());
            }
            let tokens: Vec<TokenId> = running.iter().map(|r| r.next).collect();
            let added = self.steering_rows(&running);
            let logits = to_host(self.llama.forward_batch_adding(&tokens, &mut caches, added)?)?;
            let vocab = logits.len() / running.len();
            for (r, row) in running.iter_mut().zip(logits.chunks_exact(vocab)) {
                r.next = r.sampler.sample(&mut row.to_vec());
            }
        }
    }
}
