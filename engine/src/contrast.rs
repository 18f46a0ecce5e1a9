//! Contrast: the features that most separate two sets of conversations.
//!
//! Each conversation is inspected; only its assistant tokens count (the content of
//! `<|im_start|>assistant … <|im_end|>` turns, control tokens excluded), since that is the
//! behaviour a user wants to steer. A feature's score is its mean activation over dataset A's
//! assistant tokens minus its mean over dataset B's, in max-activation units; the top of each
//! direction is returned, as Ember's `contrast` does.

use crate::inspect::Inspection;
use crate::sae::{Feature, Sae};
use crate::tokenizer::{ChatMessage, TokenId, Tokenizer};
use crate::{EngineError, Interrupt, Model};

/// Which tokens of a rendered conversation belong to assistant turns (their content only).
pub fn assistant_mask(tokenizer: &Tokenizer, tokens: &[TokenId]) -> Vec<bool> {
    let start = tokenizer.token_id("<|im_start|>");
    let end = tokenizer.token_id("<|im_end|>");
    let mut mask = vec![false; tokens.len()];
    let mut i = 0;
    while i < tokens.len() {
        if Some(tokens[i]) != start {
            i += 1;
            continue;
        }
        // The role runs up to the first token that contains a newline.
        let mut role = String::new();
        i += 1;
        while i < tokens.len() {
            let piece = tokenizer.decode(&[tokens[i]], false).unwrap_or_default();
            i += 1;
            match piece.split_once('\n') {
                Some((before, _)) => {
                    role.push_str(before);
                    break;
                }
                None => role.push_str(&piece),
            }
        }
        let assistant = role.trim() == "assistant";
        while i < tokens.len() && Some(tokens[i]) != end && Some(tokens[i]) != start {
            mask[i] = assistant && !tokenizer.is_control(tokens[i]);
            i += 1;
        }
    }
    mask
}

/// Mean activation (in units) of every latent over the assistant tokens of `conversations`.
fn assistant_means(
    model: &Model,
    sae: &Sae,
    conversations: &[Vec<ChatMessage>],
    units: &[f32],
    interrupt: &Interrupt,
) -> Result<Vec<f64>, EngineError> {
    let mut sums = vec![0f64; sae.config().d_sae];
    let mut count = 0usize;
    for messages in conversations {
        interrupt.check()?;
        let inspection = Inspection::chat(model, sae, messages, None)?;
        let mask = assistant_mask(&model.tokenizer, &inspection.tokens);
        for (features, _) in inspection.features.iter().zip(&mask).filter(|(_, m)| **m) {
            count += 1;
            for &(j, a) in features {
                sums[j as usize] += (a / units[j as usize]) as f64;
            }
        }
    }
    if count == 0 {
        return Err(EngineError::EmptyInput);
    }
    Ok(sums.into_iter().map(|s| s / count as f64).collect())
}

/// The `top_k` features most stronger in `a` than in `b`, and the `top_k` most stronger in
/// `b` (scores: difference of mean activations in max-activation units, largest first).
/// `interrupt` is checked before each conversation.
pub fn contrast(
    model: &Model,
    sae: &Sae,
    a: &[Vec<ChatMessage>],
    b: &[Vec<ChatMessage>],
    units: &[f32],
    top_k: usize,
    interrupt: &Interrupt,
) -> Result<(Vec<Feature>, Vec<Feature>), EngineError> {
    let mean_a = assistant_means(model, sae, a, units, interrupt)?;
    let mean_b = assistant_means(model, sae, b, units, interrupt)?;
    let ranked = |sign: f64| {
        let mut scored: Vec<Feature> = mean_a
            .iter()
            .zip(&mean_b)
            .enumerate()
            .map(|(j, (x, y))| (j as u32, (sign * (x - y)) as f32))
            .filter(|f| f.1 > 0.0)
            .collect();
        scored.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
        scored.truncate(top_k);
        scored
    };
    Ok((ranked(1.0), ranked(-1.0)))
}

/// The neutral prompts [`contrastive_replies`] asks.
pub const CONTRASTIVE_PROMPTS: [&str; 4] = [
    "Tell me about your day.",
    "What should I cook tonight?",
    "Describe the sea.",
    "Give me advice about work.",
];

/// Two paired datasets for [`contrast`]: the model's greedy replies (48 tokens) to
/// [`CONTRASTIVE_PROMPTS`] as it is, and as asked in a system prompt to respond in a way
/// that is `specification`. Each is a list of (prompt, reply).
pub fn contrastive_replies(model: &Model, specification: &str) -> Result<[Vec<(String, String)>; 2], EngineError> {
    let asked = format!("Respond in a way that is: {specification}.");
    let conversation = |system: Option<&str>, prompt: &str| {
        let mut messages: Vec<ChatMessage> = system.into_iter().map(|s| ChatMessage::new("system", s)).collect();
        messages.push(ChatMessage::user(prompt));
        messages
    };
    let prompts = CONTRASTIVE_PROMPTS
        .iter()
        .map(|p| conversation(None, p))
        .chain(CONTRASTIVE_PROMPTS.iter().map(|p| conversation(Some(&asked), p)))
        .map(|m| model.tokenizer.encode_chat(&m))
        .collect::<Result<Vec<_>, _>>()?;
    let mut replies = model.generate_batch(&prompts, &crate::SamplingParams::greedy(48))?.into_iter();
    let mut dataset = || -> Vec<(String, String)> {
        CONTRASTIVE_PROMPTS
            .iter()
            .zip(replies.by_ref())
            .map(|(prompt, reply)| (prompt.to_string(), reply.text))
            .collect()
    };
    Ok([dataset(), dataset()])
}
