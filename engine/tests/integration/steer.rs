//! Steering on the real model with the shipped SAE: identity without edits, edits measured
//! back through the SAE, conditional scopes firing where they should, aborts.

use std::ops::Range;
use std::sync::OnceLock;

use crate::common::model;
use kindling_engine::burn::tensor::Tensor;
use kindling_engine::steer::{Condition, Edit, Mode, Operand, Operator, Units};
use kindling_engine::{
    Backend, CancelToken, CaptureResidual, ChatMessage, EngineError, FeatureCapture, Logits, Model, ResidualHook, Sae, SamplingParams,
    Steer, Variant,
};

fn shipped_dir() -> std::path::PathBuf {
    std::env::var_os("KINDLING_SAE_DIR").map_or_else(|| crate::common::repo_root().join("public/sae"), std::path::PathBuf::from)
}

fn sae() -> &'static Sae {
    static SAE: OnceLock<Sae> = OnceLock::new();
    SAE.get_or_init(|| {
        Sae::from_compact(&std::fs::read(shipped_dir().join("kindling-sae.f16.safetensors")).expect("the shipped SAE")).unwrap()
    })
}

/// Activation and steering units of 4.0 for every latent. The engine takes them from the
/// atlas and the SAE; a fixed value keeps the test independent of both.
fn units() -> &'static Units {
    static UNITS: OnceLock<Units> = OnceLock::new();
    UNITS.get_or_init(|| Units::uniform(sae().config().d_sae, 4.0))
}

fn prompt(m: &Model) -> Vec<u32> {
    m.tokenizer
        .encode_chat(&[ChatMessage::user("Tell me a short story about a pirate ship and its crew.")])
        .unwrap()
}

fn generate(m: &Model, variant: Option<Variant>) -> Result<Vec<u32>, EngineError> {
    let hook: Option<Box<dyn ResidualHook>> = match variant {
        Some(v) => Some(Box::new(Steer::new(sae(), units(), v)?)),
        None => None,
    };
    let mut stream = m.generate(prompt(m), SamplingParams::greedy(24), hook, CancelToken::new())?;
    let mut ids = Vec::new();
    for token in &mut stream {
        ids.push(token?.id);
    }
    Ok(ids)
}

/// The base model's latents at every prompt position.
fn base_features(m: &Model, tokens: &[u32]) -> Vec<Vec<(u32, f32)>> {
    let mut capture = FeatureCapture::new(sae());
    let mut cache = m.llama.new_cache();
    m.llama.forward(tokens, &mut cache, Some(&mut capture), Logits::None).unwrap();
    capture.features
}

#[test]
fn a_variant_without_edits_is_the_base_model_and_reset_restores_it() {
    let m = model(Backend::Cpu);
    let base = generate(m, None).unwrap();
    assert_eq!(generate(m, Some(Variant::new("SmolLM2-135M-Instruct"))).unwrap(), base);
    let mut v = Variant::new("SmolLM2-135M-Instruct");
    let strongest = base_features(m, &prompt(m)).last().unwrap()[0].0;
    v.set(&[strongest], -1.0);
    assert_ne!(
        generate(m, Some(v.clone())).unwrap(),
        base,
        "ablating the strongest latent changes the reply"
    );
    v.reset();
    assert_eq!(generate(m, Some(v)).unwrap(), base);
}

/// Runs `first`, then `second`, after each block.
struct Then<A, B>(A, B);

impl<A: ResidualHook, B: ResidualHook> ResidualHook for Then<A, B> {
    fn wants(&self, layer: usize) -> bool {
        self.0.wants(layer) || self.1.wants(layer)
    }
    fn last_layer(&self) -> Option<usize> {
        self.0.last_layer().max(self.1.last_layer())
    }
    fn after_block(&mut self, layer: usize, positions: Range<usize>, residual: Tensor<2>) -> Tensor<2> {
        let x = if self.0.wants(layer) {
            self.0.after_block(layer, positions.clone(), residual)
        } else {
            residual
        };
        if self.1.wants(layer) {
            self.1.after_block(layer, positions, x)
        } else {
            x
        }
    }
}

#[test]
fn edits_move_the_latent_they_target_by_the_requested_amount() {
    let m = model(Backend::Cpu);
    let tokens = prompt(m);
    let base = base_features(m, &tokens);
    let p = tokens.len() - 1;
    let (j, a) = base[p][0];
    let u = units().steering[j as usize];
    let layer = sae().config().layer;
    let measured = |edit: Edit| {
        let mut v = Variant::new("m");
        v.edits.push(edit);
        let mut hook = Then(Steer::new(sae(), units(), v).unwrap(), CaptureResidual::new(layer));
        let mut cache = m.llama.new_cache();
        m.llama.forward(&tokens, &mut cache, Some(&mut hook), Logits::None).unwrap();
        let rows = hook.1.take();
        let d = sae().config().d_in;
        let f = sae().encode(&rows[p * d..(p + 1) * d]);
        f[0].iter().find(|(i, _)| *i == j).map_or(0.0, |x| x.1)
    };
    // Re-encoding the edited residual reads the latent back. Encoder and decoder are not
    // exact inverses (and the error term still projects onto the encoder direction), so the
    // measured change must be within 30% of the requested one.
    let check = |what: &str, got: f32, want: f32| {
        let (moved, asked) = (got - a, want - a);
        assert!((moved - asked).abs() <= 0.3 * asked.abs(), "{what}: {a} → {got}, asked {want}");
    };
    check("nudge +0.5", measured(Edit::nudge(j, 0.5)), a + 0.5 * u);
    check(
        "pin 1.5",
        measured(Edit {
            feature: j,
            mode: Mode::Pin,
            value: 1.5,
        }),
        1.5 * u,
    );
    check(
        "mul 2",
        measured(Edit {
            feature: j,
            mode: Mode::Mul,
            value: 2.0,
        }),
        2.0 * a,
    );
    check(
        "pin 0",
        measured(Edit {
            feature: j,
            mode: Mode::Pin,
            value: 0.0,
        }),
        0.0,
    );
}

#[test]
fn set_when_fires_from_the_first_token_where_its_condition_holds() {
    let m = model(Backend::Cpu);
    let tokens = prompt(m);
    let base = base_features(m, &tokens);
    // A latent that is silent at first and strong later in the prompt.
    let (first, j, threshold) = (1..tokens.len())
        .flat_map(|p| base[p].iter().map(move |&(j, a)| (p, j, a)))
        .filter(|&(p, j, a)| p > 4 && (1..p).all(|q| base[q].iter().all(|&(i, b)| i != j || b < 0.5 * a)))
        .map(|(p, j, a)| (p, j, 0.5 * a / units().activation[j as usize]))
        .next()
        .expect("some latent first fires after position 4");
    let mut v = Variant::new("m");
    let other = (j + 1) % sae().config().d_sae as u32;
    v.set_when(
        Condition::when(vec![j], Operator::Gt, Operand::Number(threshold)),
        vec![Edit::nudge(other, 0.8)],
    );
    let mut steer = Steer::new(sae(), units(), v).unwrap().recording();
    let mut cache = m.llama.new_cache();
    m.llama.forward(&tokens, &mut cache, Some(&mut steer), Logits::Last).unwrap();
    assert_eq!(
        steer.fired(),
        [Some(first)],
        "latent {j} first exceeds {threshold} units at {first}"
    );

    // Before `first` the residual stream is the base one; from `first` on it differs.
    let logits = |hook: Option<&mut dyn ResidualHook>| {
        let mut cache = m.llama.new_cache();
        kindling_engine::to_host(m.llama.forward(&tokens, &mut cache, hook, Logits::All).unwrap().unwrap()).unwrap()
    };
    let plain = logits(None);
    let mut v = Variant::new("m");
    v.set_when(
        Condition::when(vec![j], Operator::Gt, Operand::Number(threshold)),
        vec![Edit::nudge(other, 0.8)],
    );
    let mut steer = Steer::new(sae(), units(), v).unwrap();
    let steered = logits(Some(&mut steer));
    let vocab = plain.len() / tokens.len();
    for p in 0..tokens.len() {
        let same = plain[p * vocab..(p + 1) * vocab] == steered[p * vocab..(p + 1) * vocab];
        assert_eq!(same, p < first, "position {p} (fires at {first})");
    }
}

#[test]
fn abort_when_stops_with_its_event_and_conditions_that_never_hold_change_nothing() {
    let m = model(Backend::Cpu);
    let base = generate(m, None).unwrap();
    let tokens = prompt(m);
    let j = base_features(m, &tokens).last().unwrap()[0].0;
    let mut v = Variant::new("m");
    v.abort_when(Condition::when(vec![j], Operator::Gt, Operand::Number(0.01)), "pirate-alarm");
    match generate(m, Some(v)) {
        Err(EngineError::Aborted { event }) => assert_eq!(event, "pirate-alarm"),
        other => panic!("expected an abort, got {other:?}"),
    }
    let mut never = Variant::new("m");
    never.abort_when(Condition::when(vec![j], Operator::Gt, Operand::Number(1e6)), "never");
    never.set_when(
        Condition::when(vec![j], Operator::Lt, Operand::Number(-1.0)),
        vec![Edit::nudge(j, 5.0)],
    );
    assert_eq!(generate(m, Some(never)).unwrap(), base);
}

/// Greedy ids through the non-blocking path ([`TokenStream::next_async`], how WebGPU in the
/// browser generates) and through the iterator.
fn generate_both_ways(m: &Model, variant: Option<Variant>, tokens: usize) -> (Vec<u32>, Vec<u32>) {
    let stream = |variant: Option<Variant>| {
        let hook: Option<Box<dyn ResidualHook>> =
            variant.map(|v| Box::new(Steer::new(sae(), units(), v).unwrap()) as Box<dyn ResidualHook>);
        m.generate(prompt(m), SamplingParams::greedy(tokens), hook, CancelToken::new())
            .unwrap()
    };
    let blocking: Vec<u32> = stream(variant.clone()).map(|t| t.unwrap().id).collect();
    let mut non_blocking = Vec::new();
    let mut s = stream(variant);
    while let Some(token) = futures_lite::future::block_on(s.next_async()) {
        non_blocking.push(token.unwrap().id);
    }
    (blocking, non_blocking)
}

fn non_blocking_generation_matches(backend: Backend) {
    let m = model(backend);
    let base = generate_both_ways(m, None, 6);
    assert_eq!(base.0, base.1, "{backend}: base model");
    let j = base_features(m, &prompt(m)).last().unwrap()[0].0;
    let mut steered = Variant::new("m");
    steered.set(&[j], -1.0);
    steered.set(&[(j + 7) % sae().config().d_sae as u32], 1.0);
    let (blocking, non_blocking) = generate_both_ways(m, Some(steered), 6);
    assert_eq!(blocking, non_blocking, "{backend}: steered");
    assert_ne!(blocking, base.0, "{backend}: the edits change the reply");
}

#[test]
fn non_blocking_generation_matches_the_iterator_on_cpu() {
    non_blocking_generation_matches(Backend::Cpu);
}

#[cfg(feature = "wgpu")]
#[test]
fn non_blocking_generation_matches_the_iterator_on_wgpu() {
    non_blocking_generation_matches(Backend::Wgpu);
}

#[test]
fn a_steering_unit_moves_the_residual_by_a_fixed_share_of_its_norm_for_every_latent() {
    use kindling_engine::steer::{RESIDUAL_FRACTION_PER_UNIT, steering_vector};
    let sae = sae();
    // The shipped SAE records its training normalisation: inputs scaled by s to norm √d_in.
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(shipped_dir().join("manifest.json")).unwrap()).unwrap();
    let s = manifest["config"]["metadata"]["normalization"]["input_scale"].as_f64().unwrap() as f32;
    let trained_norm = (sae.config().d_in as f32).sqrt() / s;
    assert!(
        (sae.residual_norm() / trained_norm - 1.0).abs() < 1e-3,
        "{} vs {trained_norm}",
        sae.residual_norm()
    );

    let activation: Vec<f32> = (0..sae.config().d_sae).map(|j| 1.0 + (j % 7) as f32).collect();
    let units = Units::new(sae, activation);
    for j in [0u32, 17, 4095, 8191] {
        let vector = steering_vector(sae, &units, &[Edit::nudge(j, 1.0)]).unwrap();
        let norm = vector.values.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            (norm / (RESIDUAL_FRACTION_PER_UNIT * trained_norm) - 1.0).abs() < 1e-3,
            "latent {j}: {norm}"
        );
        // An old value (unit 1: activation units) converts to the same latent change.
        let old = 0.8;
        let new = units.from_version_1(j, old).unwrap();
        assert!((new * units.steering[j as usize] - old * units.activation[j as usize]).abs() < 1e-4);
    }
    // Pins and multiplications act on the token's own activation: no fixed vector.
    assert!(
        steering_vector(
            sae,
            &units,
            &[Edit {
                mode: Mode::Pin,
                ..Edit::nudge(3, 1.0)
            }]
        )
        .is_none()
    );
}

#[test]
fn batched_steering_vectors_generate_what_the_steer_hook_generates() {
    use kindling_engine::generate::SteeredRequest;
    use kindling_engine::steer::steering_vector;
    let m = model(Backend::Cpu);
    let edits = [Edit::nudge(100, 0.4), Edit::nudge(2000, -0.2)];
    let mut v = Variant::new("m");
    v.edits = edits.to_vec();
    let one_by_one = generate(m, Some(v)).unwrap();
    let vector = steering_vector(sae(), units(), &edits).map(std::sync::Arc::new);
    assert!(vector.is_some());
    // Three sequences in one batch: steered, base, steered again.
    let requests = [vector.clone(), None, vector].map(|steering| SteeredRequest {
        prompt: prompt(m),
        seed: 0,
        steering,
    });
    let mut out = vec![Vec::new(); 3];
    m.generate_steered(requests, &SamplingParams::greedy(24), 3, |i, o| {
        out[i] = o.tokens;
        Ok(true)
    })
    .unwrap();
    let base = generate(m, None).unwrap();
    assert_ne!(one_by_one, base, "the edits change the reply");
    // The batch's tokens drop the final <|im_end|>; the stream's keep none either.
    assert_eq!(out[0], one_by_one);
    assert_eq!(out[1], base);
    assert_eq!(out[2], one_by_one);
}

/// AutoConditional measures: its feature fires somewhere in texts about the topic that it
/// never saw, and on no token of plain ones.
#[test]
fn auto_conditional_fires_on_unseen_text_about_its_topic_and_not_on_plain_text() {
    use kindling_engine::Atlas;
    use kindling_engine::autosteer::auto_conditional;
    let m = model(Backend::Cpu);
    let atlas = Atlas::load_dir(&crate::common::repo_root().join("public/atlas"), sae(), false).expect("the shipped atlas");
    let units = Units::new(sae(), atlas.units());
    let found = auto_conditional(m, sae(), &atlas, "pirates", &CancelToken::new())
        .unwrap()
        .expect("a feature");
    println!("{found:?}");
    assert!(found.separates, "{found:?}");
    assert!(found.on_topic.iter().all(|&v| v > found.threshold) && found.plain.iter().all(|&v| v < found.threshold));
    let fires = |user: &str, assistant: &str| {
        let tokens = m
            .tokenizer
            .encode_chat(&[ChatMessage::user(user), ChatMessage::new("assistant", assistant)])
            .unwrap();
        base_features(m, &tokens).iter().skip(1).any(|features| {
            found.condition.holds(|f| {
                features
                    .iter()
                    .find(|(j, _)| *j == f)
                    .map_or(0.0, |&(j, a)| a / units.activation[j as usize])
            })
        })
    };
    assert!(fires(
        "Can you describe pirate life?",
        "Pirates sailed the seas in wooden ships, raiding merchant vessels and burying their treasure."
    ));
    assert!(!fires(
        "What did you do this morning?",
        "I went to the library, read a book about gardening and had a cup of tea."
    ));
}
