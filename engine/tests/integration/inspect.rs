//! Inspect on the real model: per-token features, top, lookup, vectors and the dense matrix
//! agree with each other and with a direct SAE encode of the captured residual.

use crate::common::model;
use kindling_engine::steer::{Edit, Units};
use kindling_engine::{
    Aggregate, Backend, CancelToken, CaptureResidual, ChatMessage, EngineError, Inspection, Interrupt, Logits, Sae, SaeConfig, Variant,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const LAYER: usize = 15;

/// A random SAE at block 15: agreement does not need a trained one.
fn sae() -> Sae {
    let (d, s) = (576, 1024);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut v = |n: usize, scale: f32| (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect::<Vec<f32>>();
    Sae::new(
        SaeConfig {
            d_in: d,
            d_sae: s,
            k: 16,
            layer: LAYER,
            model_sha256: None,
        },
        v(d * s, 0.05),
        v(s, 0.1),
        v(s * d, 0.1),
        v(d, 0.1),
    )
    .unwrap()
}

#[test]
fn every_view_of_an_inspection_agrees_with_a_direct_encode() {
    let m = model(Backend::Cpu);
    let sae = sae();
    let messages = [
        ChatMessage::user("What is the capital of France?"),
        ChatMessage::new("assistant", "Paris is the capital of France."),
    ];
    let inspection = Inspection::chat(m, &sae, &messages, None).unwrap();
    let tokens = m
        .tokenizer
        .encode(&m.tokenizer.apply_chat_template(&messages, false).unwrap(), true);
    assert_eq!(inspection.tokens, tokens);

    let mut capture = CaptureResidual::new(LAYER);
    m.llama
        .forward(&tokens, &mut m.llama.new_cache(), Some(&mut capture), Logits::None)
        .unwrap();
    let direct = sae.encode(&capture.take());
    assert_eq!(inspection.features, direct);

    let dense = inspection.dense();
    let d_sae = inspection.d_sae();
    let top = inspection.top(5, Aggregate::Sum, None).unwrap();
    assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
    for &(j, sum) in &top {
        let vector = inspection.vector(j).unwrap();
        let column: Vec<f32> = (0..tokens.len()).map(|t| dense[t * d_sae + j as usize]).collect();
        assert_eq!(vector, column);
        assert!((vector.iter().sum::<f32>() - sum).abs() < 1e-3);
        let max = inspection.lookup(&[j], Aggregate::Max).unwrap()[0].1;
        assert_eq!(max, vector.iter().copied().fold(0.0, f32::max));
        let count = inspection.lookup(&[j], Aggregate::Count).unwrap()[0].1;
        assert_eq!(count as usize, vector.iter().filter(|&&a| a > 0.0).count());
        let mean = inspection.lookup(&[j], Aggregate::Mean).unwrap()[0].1;
        assert!((mean - sum / tokens.len() as f32).abs() < 1e-4);
    }
    // A group's vector is its strongest member's at each token; `top` within a group stays in it.
    let group = [top[0].0, top[1].0];
    let g = inspection.group_vector(&group).unwrap();
    let (a, b) = (inspection.vector(group[0]).unwrap(), inspection.vector(group[1]).unwrap());
    assert!(g.iter().zip(a.iter().zip(&b)).all(|(g, (a, b))| *g == a.max(*b)));
    assert!(
        inspection
            .top(10, Aggregate::Max, Some(&group))
            .unwrap()
            .iter()
            .all(|(j, _)| group.contains(j))
    );
    assert!(inspection.lookup(&[d_sae as u32], Aggregate::Sum).is_err(), "unknown feature");
}

#[test]
fn inspection_under_a_variant_shows_the_edited_values() {
    let m = model(Backend::Cpu);
    let sae = sae();
    let tokens = m.tokenizer.encode("The cat sat on the mat.", false);
    let base = Inspection::run(m, &sae, &tokens, None).unwrap();
    let j = base.features[3][0].0;
    let units = Units::uniform(sae.config().d_sae, 2.0);
    let mut v = Variant::new("m");
    v.edits.push(Edit::nudge(j, 0.5));
    let steered = Inspection::run(m, &sae, &tokens, Some((&v, &units))).unwrap();
    let (before, after) = (base.vector(j).unwrap(), steered.vector(j).unwrap());
    // Each token reads its own edited value (a nudge of 0.5 × 2.0); the block's own latents
    // at a position do not depend on edits at that block.
    for (b, a) in before.iter().zip(&after) {
        assert!((a - (b + 1.0)).abs() < 1e-4, "{b} + 1.0 vs {a}");
    }
}

#[test]
fn next_token_logits_follow_the_variant_and_the_vocabulary_filter() {
    use kindling_engine::next_tokens;
    let m = model(Backend::Cpu);
    let sae = sae();
    let tokens = m
        .tokenizer
        .encode_chat(&[ChatMessage::user("What is the capital of France?")])
        .unwrap();
    let base = next_tokens(m, &sae, &tokens, None, 5, None).unwrap();
    assert_eq!(base.len(), 5);
    assert!(base.windows(2).all(|w| w[0].logit >= w[1].logit));
    let p: f32 = base.iter().map(|t| t.probability).sum();
    assert!(p > 0.0 && p <= 1.0 + 1e-5);
    // The unsteered pass through a variant without edits gives the same numbers.
    let units = Units::uniform(sae.config().d_sae, 2.0);
    let same = next_tokens(m, &sae, &tokens, Some((&Variant::new("m"), &units)), 5, None).unwrap();
    assert_eq!(same, base);
    // A strong edit changes the distribution.
    let mut v = Variant::new("m");
    v.edits.push(Edit::nudge(3, 50.0));
    assert_ne!(next_tokens(m, &sae, &tokens, Some((&v, &units)), 5, None).unwrap(), base);
    // Only the allowed ids, ranked among themselves; ids outside the vocabulary are refused.
    let allowed = [base[4].id, base[1].id];
    let filtered = next_tokens(m, &sae, &tokens, None, 5, Some(&allowed)).unwrap();
    assert_eq!(filtered.iter().map(|t| t.id).collect::<Vec<_>>(), [base[1].id, base[4].id]);
    assert!(next_tokens(m, &sae, &tokens, None, 5, Some(&[999_999])).is_err());
}

#[test]
fn contrast_reads_assistant_tokens_and_ranks_both_directions() {
    use kindling_engine::{assistant_mask, contrast};
    let m = model(Backend::Cpu);
    let sae = sae();
    let chat = |user: &str, reply: &str| vec![ChatMessage::user(user), ChatMessage::new("assistant", reply)];
    let tokens = m
        .tokenizer
        .encode(&m.tokenizer.apply_chat_template(&chat("Hi", "Hello there!"), false).unwrap(), true);
    let masked: Vec<u32> = tokens
        .iter()
        .zip(assistant_mask(&m.tokenizer, &tokens))
        .filter(|(_, k)| *k)
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(m.tokenizer.decode(&masked, false).unwrap(), "Hello there!");

    let plain = [chat("What is 2 + 2?", "2 + 2 is 4."), chat("Name a colour.", "Blue is a colour.")];
    let jokes = [
        chat("Tell me a joke.", "Why did the chicken cross the road? To get to the other side!"),
        chat("Another joke?", "I told my cat a joke. It was not amused."),
    ];
    let units = vec![1.0; sae.config().d_sae];
    let (more_plain, more_jokes) = contrast(m, &sae, &plain, &jokes, &units, 5, &Interrupt::new(CancelToken::new())).unwrap();
    assert_eq!((more_plain.len(), more_jokes.len()), (5, 5));
    assert!(more_plain.windows(2).all(|w| w[0].1 >= w[1].1) && more_plain.iter().all(|f| f.1 > 0.0));
    assert!(more_plain.iter().all(|f| !more_jokes.iter().any(|g| g.0 == f.0)));
    // The same data on both sides separates nothing.
    let (x, y) = contrast(m, &sae, &plain, &plain, &units, 5, &Interrupt::new(CancelToken::new())).unwrap();
    assert!(x.is_empty() && y.is_empty());
}

/// A long inspection stops between blocks once its token is cancelled (a client that leaves
/// frees the server's slot), rather than running to its end.
#[test]
fn a_cancelled_inspection_stops_between_blocks() {
    let model = model(Backend::Cpu);
    let sae = &sae();
    let tokens = model
        .tokenizer
        .encode(&"The cat sat on the mat and looked at the dog. ".repeat(120), false);
    let started = std::time::Instant::now();
    let whole = Inspection::run(model, sae, &tokens, None);
    let full = started.elapsed();
    assert!(whole.is_ok());
    let cancel = CancelToken::new();
    let canceller = {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(full / 10);
            cancel.cancel();
        })
    };
    let started = std::time::Instant::now();
    let stopped = Inspection::run_cancellable(model, sae, &tokens, None, &cancel);
    let took = started.elapsed();
    canceller.join().unwrap();
    assert!(matches!(stopped, Err(EngineError::Cancelled)), "{:?}", stopped.map(|_| ()));
    assert!(
        took < full / 2,
        "cancelled after {:?} it still took {took:?} (whole: {full:?})",
        full / 10
    );
}
