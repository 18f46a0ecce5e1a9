//! The engine's behaviour on the real model: residual hooks, generation, bad input.

use std::ops::Range;

use crate::common::{fixture, ids, model, model_path, prompt};
use burn::tensor::Tensor;
use kindling_engine::gguf::GgufError;
use kindling_engine::{
    AddToResidual, Backend, CancelToken, CaptureResidual, ChatMessage, EngineError, FinishReason, Logits, Model, ResidualHook,
    SamplingParams, StreamDecoder,
};

const LAYER: usize = 15;

fn logits_with(hook: Option<&mut dyn ResidualHook>, tokens: &[u32]) -> Vec<f32> {
    let model = model(Backend::Cpu);
    let mut cache = model.llama.new_cache();
    let logits = model.llama.forward(tokens, &mut cache, hook, Logits::All).unwrap().unwrap();
    logits.into_data().try_into_vec::<f32>().unwrap()
}

#[test]
fn zero_edit_leaves_logits_bit_identical() {
    let tokens = ids(&prompt("A")["ids"]);
    let clean = logits_with(None, &tokens);
    let mut zero = AddToResidual::new(LAYER, vec![0.0; 576]);
    assert_eq!(logits_with(Some(&mut zero), &tokens), clean);
}

#[test]
fn adding_a_vector_changes_the_logits() {
    let tokens = ids(&prompt("A")["ids"]);
    let clean = logits_with(None, &tokens);
    let mut vector = vec![0.0; 576];
    vector[100] = 50.0;
    let mut edit = AddToResidual::new(LAYER, vector);
    let edited = logits_with(Some(&mut edit), &tokens);
    let max_change = clean.iter().zip(&edited).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(max_change > 0.5, "an edit of norm 50 moved the logits by only {max_change}");
}

#[test]
fn early_stop_capture_matches_the_full_forward() {
    let model = model(Backend::Cpu);
    let tokens = ids(&prompt("B")["ids"]);
    let mut full = CaptureResidual::new(LAYER);
    let mut cache = model.llama.new_cache();
    model.llama.forward(&tokens, &mut cache, Some(&mut full), Logits::Last).unwrap();

    let mut early = CaptureResidual::new(LAYER);
    let mut cache = model.llama.new_cache();
    let out = model.llama.forward(&tokens, &mut cache, Some(&mut early), Logits::None).unwrap();
    assert!(out.is_none());
    assert_eq!(early.len(), tokens.len());
    assert_eq!(early.take(), full.take());
    // The early-stopped cache lacks the deeper layers: extending it is an error, not garbage.
    let err = model.llama.forward(&[42], &mut cache, None, Logits::Last).unwrap_err();
    assert!(matches!(err, EngineError::CacheTruncated), "{err}");
}

#[test]
fn one_pass_captures_several_layers() {
    let model = model(Backend::Cpu);
    let tokens = ids(&prompt("C")["ids"]);
    let mut both = CaptureResidual::layers(&[12, 18]);
    let mut cache = model.llama.new_cache();
    model.llama.forward(&tokens, &mut cache, Some(&mut both), Logits::None).unwrap();
    for layer in [12, 18] {
        let mut one = CaptureResidual::new(layer);
        let mut cache = model.llama.new_cache();
        model.llama.forward(&tokens, &mut cache, Some(&mut one), Logits::None).unwrap();
        assert_eq!(both.take_layer(layer), one.take(), "layer {layer}");
    }
}

#[test]
fn residual_norm_shows_the_position_zero_outlier() {
    // machine-facts §A.7: at layer 15, position 0 has norm ≈ 25,000 against ≈ 150–250 elsewhere.
    let model = model(Backend::Cpu);
    let mut capture = CaptureResidual::new(LAYER);
    let mut cache = model.llama.new_cache();
    model
        .llama
        .forward(&ids(&prompt("A")["ids"]), &mut cache, Some(&mut capture), Logits::None)
        .unwrap();
    let norms: Vec<f32> = capture.rows().map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).collect();
    assert!((20_000.0..30_000.0).contains(&norms[0]), "position 0 norm {}", norms[0]);
    assert!(norms[1..].iter().all(|&n| (100.0..600.0).contains(&n)), "{norms:?}");
}

/// Counts the positions a hook sees, to check it runs during decode as well as prefill.
struct CountPositions(Vec<Range<usize>>);

impl ResidualHook for CountPositions {
    fn wants(&self, layer: usize) -> bool {
        layer == LAYER
    }
    fn last_layer(&self) -> Option<usize> {
        Some(LAYER)
    }
    fn after_block(&mut self, _: usize, positions: Range<usize>, residual: Tensor<2>) -> Tensor<2> {
        self.0.push(positions);
        residual
    }
}

#[test]
fn hook_runs_in_prefill_and_every_decode_step() {
    let model = model(Backend::Cpu);
    let prompt_ids = ids(&prompt("C")["ids"]);
    let mut counter = CountPositions(Vec::new());
    let stream = model
        .generate(
            prompt_ids.clone(),
            SamplingParams::greedy(6),
            Some(Box::new(&mut counter)),
            CancelToken::new(),
        )
        .unwrap();
    assert_eq!(stream.count(), 6);
    let n = prompt_ids.len();
    let mut want = vec![0..n];
    want.extend((n..n + 5).map(|p| p..p + 1));
    assert_eq!(counter.0, want, "prefill once, then one position per decode step");
}

#[test]
fn same_seed_same_text_and_other_seed_other_text() {
    let model = model(Backend::Cpu);
    let messages = [ChatMessage::user("Tell me a short story about a cat.")];
    let run = |seed| {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: Some(0.95),
            seed,
            max_tokens: 24,
            ..Default::default()
        };
        model.chat(&messages, params).unwrap().collect_text().unwrap()
    };
    let first = run(7);
    assert_eq!(first, run(7));
    assert_ne!(first, run(8));
}

/// Unsteered chats prefill the prompt prefix they share (the default system message and the
/// user turn's header) as a pass of its own, kept for the next chat: the reply is the same
/// from a model that has not made that cache yet, from the kept cache, and from a model
/// warmed beforehand; and the split prefill ends on the logits of one pass over the prompt.
#[test]
fn shared_prompt_prefix_gives_the_same_reply_cold_kept_or_warmed() {
    let load = || Model::load(model_path(), Backend::Cpu).unwrap();
    let cold = load();
    let prefix = cold.tokenizer.decode(cold.shared_prompt_prefix(), false).unwrap();
    assert_eq!(
        prefix,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"
    );
    let messages = [ChatMessage::user("Name three colours of the rainbow.")];
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 16,
        ..Default::default()
    };
    let reply = |model: &Model| model.chat(&messages, params.clone()).unwrap().collect_text().unwrap();
    let first = reply(&cold);
    assert!(!first.is_empty());
    assert_eq!(reply(&cold), first, "from the kept cache");
    let warmed = load();
    warmed.warm_prompt_prefix().unwrap();
    assert_eq!(reply(&warmed), first, "from a model warmed beforehand");

    let prompt = cold.tokenizer.encode_chat(&messages).unwrap();
    let n = cold.shared_prompt_prefix().len();
    assert!(prompt.starts_with(cold.shared_prompt_prefix()) && prompt.len() > n);
    let last = |parts: &[&[u32]]| {
        let mut cache = cold.llama.new_cache();
        let mut logits = None;
        for part in parts {
            logits = cold.llama.forward(part, &mut cache, None, Logits::Last).unwrap();
        }
        logits.unwrap().into_data().try_into_vec::<f32>().unwrap()
    };
    let (whole, split) = (last(&[&prompt]), last(&[&prompt[..n], &prompt[n..]]));
    let gap = whole.iter().zip(&split).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(gap < 0.05, "split prefill differs from one pass by {gap}");
}

/// The CPU backend's fused path (decode steps, short prompts: plain loops over a host cache)
/// against llama.cpp, as the tensor path is in `llama_cpp.rs`: prompts fed one token at a time
/// end on logits within 0.5 of llama.cpp's. Rows never mix on that path, so feeding four tokens
/// at a time, or decoding two sequences in one batched step, gives the same bits.
#[test]
fn fused_decode_steps_match_llama_cpp_and_each_other() {
    let model = model(Backend::Cpu);
    let logits = |cache: &mut kindling_engine::KvCache, step: &[u32]| {
        let logits = model.llama.forward(step, cache, None, Logits::Last).unwrap().unwrap();
        logits.into_data().try_into_vec::<f32>().unwrap()
    };
    let fed = |tokens: &[u32], chunk: usize| {
        let mut cache = model.llama.new_cache();
        let last = tokens.chunks(chunk).map(|step| logits(&mut cache, step)).last().unwrap();
        (last, cache)
    };
    let mut caches = Vec::new();
    for name in ["A", "B", "C"] {
        let p = prompt(name);
        let tokens = ids(&p["ids"]);
        let (one_by_one, cache) = fed(&tokens, 1);
        for entry in p["top5"].as_array().unwrap() {
            let (id, want) = (entry[0].as_u64().unwrap() as usize, entry[1].as_f64().unwrap() as f32);
            let got = one_by_one[id];
            assert!((got - want).abs() < 0.5, "prompt {name}: logit of {id} is {got} (llama.cpp {want})");
        }
        assert!(fed(&tokens, 4).0 == one_by_one, "prompt {name}: four tokens a step differ from one");
        caches.push(cache);
    }
    // A batch of 2, and one of 12 (above the 8 rows where prompts leave the integer kernels).
    for batch in [2, 12] {
        let mut caches: Vec<_> = caches.iter().cycle().take(batch).cloned().collect();
        let next: Vec<u32> = (0..batch as u32).map(|i| 42 + i).collect();
        let alone: Vec<Vec<f32>> = caches.iter().zip(&next).map(|(c, &t)| logits(&mut c.clone(), &[t])).collect();
        let batched = model.llama.forward_batch(&next, &mut caches).unwrap();
        assert!(
            batched.into_data().try_into_vec::<f32>().unwrap() == alone.concat(),
            "a batched step of {batch} differs from single steps"
        );
    }
}

#[test]
fn batched_generation_equals_one_at_a_time() {
    let model = model(Backend::Cpu);
    let prompts: Vec<Vec<u32>> = ["Hi, how are you?", "Name three colours.", "What is 2 + 2?"]
        .iter()
        .map(|p| model.tokenizer.encode_chat(&[ChatMessage::user(*p)]).unwrap())
        .collect();
    let params = SamplingParams::greedy(12);
    let batch = model.generate_batch(&prompts, &params).unwrap();
    for (prompt, out) in prompts.iter().zip(&batch) {
        let mut alone = model.generate(prompt.clone(), params.clone(), None, CancelToken::new()).unwrap();
        let ids: Vec<u32> = alone.by_ref().map(|t| t.unwrap().id).collect();
        assert_eq!(out.tokens, ids);
        assert_eq!(Some(out.finish), alone.finish_reason());
        assert_eq!(out.text, model.tokenizer.decode(&ids, true).unwrap());
    }
    // Sampled: sequence i uses seed + i, so a batch is reproducible.
    let sampled = SamplingParams {
        temperature: 0.8,
        seed: 5,
        max_tokens: 10,
        ..Default::default()
    };
    assert_eq!(
        model.generate_batch(&prompts, &sampled).unwrap(),
        model.generate_batch(&prompts, &sampled).unwrap()
    );
    let err = model.llama.forward_batch(&[1, 2], &mut [model.llama.new_cache()]).unwrap_err();
    assert!(matches!(err, EngineError::BadBatch { tokens: 2, caches: 1 }), "{err}");
}

#[test]
fn cancellation_stops_the_stream() {
    let model = model(Backend::Cpu);
    let cancel = CancelToken::new();
    let prompt_ids = model.tokenizer.encode_chat(&[ChatMessage::user("Count from 1 to 100.")]).unwrap();
    let mut stream = model
        .generate(prompt_ids, SamplingParams::greedy(100), None, cancel.clone())
        .unwrap();
    let mut n = 0;
    for token in stream.by_ref() {
        token.unwrap();
        n += 1;
        if n == 3 {
            cancel.cancel();
        }
    }
    assert_eq!(n, 3);
    assert_eq!(stream.finish_reason(), Some(FinishReason::Cancelled));
}

#[test]
fn generation_stops_at_im_end_or_max_tokens() {
    let model = model(Backend::Cpu);
    let im_end = model.tokenizer.token_id("<|im_end|>").unwrap();
    let mut stream = model.chat(&[ChatMessage::user("Say hello.")], SamplingParams::greedy(64)).unwrap();
    let ids: Vec<u32> = stream.by_ref().map(|t| t.unwrap().id).collect();
    assert!(!ids.contains(&im_end));
    assert_eq!(
        stream.finish_reason(),
        Some(FinishReason::Stop),
        "a greeting ends within 64 tokens: {ids:?}"
    );
    let mut stream = model
        .chat(&[ChatMessage::user("Write a long essay about rivers.")], SamplingParams::greedy(5))
        .unwrap();
    assert_eq!(stream.by_ref().count(), 5);
    assert_eq!(stream.finish_reason(), Some(FinishReason::Length));
}

#[test]
fn streaming_never_splits_a_utf8_character() {
    let model = model(Backend::Cpu);
    let case = fixture()["tokenizer"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["text"].as_str().unwrap().contains('東'))
        .unwrap();
    let mut decoder = StreamDecoder::new();
    let mut text = String::new();
    for id in ids(&case["ids"]) {
        let piece = decoder.push(&model.tokenizer, id).unwrap();
        assert!(!piece.contains('\u{fffd}'), "piece {piece:?}");
        text.push_str(&piece);
    }
    assert_eq!(text, case["text"].as_str().unwrap());
}

#[test]
fn control_tokens_in_user_text_are_plain_text() {
    let tok = &model(Backend::Cpu).tokenizer;
    let im_start = tok.token_id("<|im_start|>").unwrap();
    assert!(!tok.encode("<|im_start|>system", false).contains(&im_start));
    assert_eq!(tok.encode("<|im_start|>system", true)[0], im_start);
}

#[test]
fn prompt_past_the_context_is_a_clear_error() {
    let model = model(Backend::Cpu);
    let too_long = vec![42u32; 8193];
    let err = model
        .generate(too_long.clone(), SamplingParams::greedy(1), None, CancelToken::new())
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::ContextOverflow { needed: 8193, limit: 8192 }), "{err}");
    let mut cache = model.llama.new_cache();
    let err = model.llama.forward(&too_long, &mut cache, None, Logits::Last).unwrap_err();
    assert!(err.to_string().contains("8192"), "{err}");
}

#[test]
fn empty_prompt_and_bad_token_ids_are_errors() {
    let model = model(Backend::Cpu);
    let err = model
        .generate(vec![], SamplingParams::greedy(1), None, CancelToken::new())
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::EmptyInput));
    let mut cache = model.llama.new_cache();
    let err = model.llama.forward(&[49_152], &mut cache, None, Logits::Last).unwrap_err();
    assert!(matches!(err, EngineError::BadToken(49_152)), "{err}");
}

fn load_bytes(bytes: Vec<u8>) -> Result<Model, EngineError> {
    let device = Backend::Cpu.device().unwrap();
    Model::from_bytes(&bytes, Backend::Cpu, &device)
}

#[test]
fn damaged_model_files_are_clear_errors() {
    let bytes = std::fs::read(model_path()).expect("model file: run scripts/fetch-model.sh");
    // Cut inside the metadata, inside the tensor table, and inside the tensor data.
    for cut in [100, 1_000_000, 1_785_000, 50_000_000] {
        let err = load_bytes(bytes[..cut].to_vec()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("truncated") || msg.contains("outside the file"), "cut at {cut}: {msg}");
    }
    // Not a GGUF file at all.
    let err = load_bytes(b"PK\x03\x04 this is a zip".to_vec()).unwrap_err();
    assert!(matches!(err, EngineError::Gguf(GgufError::BadMagic(_))), "{err}");
}

#[test]
fn unknown_tensor_type_is_named() {
    let mut bytes = std::fs::read(model_path()).expect("model file");
    let gguf = kindling_engine::gguf::Gguf::parse(&bytes).unwrap();
    // Find token_embd.weight's entry in the table and rewrite its type to 12 (Q4_K).
    let name = b"token_embd.weight";
    let pos = bytes[..gguf.data_offset as usize]
        .windows(name.len())
        .rposition(|w| w == name)
        .unwrap();
    let type_at = pos + name.len() + 4 + 2 * 8; // rank (u32) + two dims (u64)
    assert_eq!(
        u32::from_le_bytes(bytes[type_at..type_at + 4].try_into().unwrap()),
        8,
        "Q8_0 expected"
    );
    bytes[type_at..type_at + 4].copy_from_slice(&12u32.to_le_bytes());
    let err = load_bytes(bytes).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("token_embd.weight") && msg.contains("not supported"), "{msg}");
}
