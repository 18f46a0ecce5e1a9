//! Step 4: a short label for every live latent, written by the shipped instruct model.
//!
//! SmolLM2-135M is small: shown whole contexts, it copies its worked examples or the
//! prompt. What it can do is name the theme of a list of words, so the prompt gives it the
//! words each latent fires on (the whole word around each firing token, most frequent first)
//! after five varied worked examples that sit in a chat prefix prefilled once and shared by
//! every request. The answer is primed with "Theme:" and decoded greedily, and kept only if
//! it reads as a label (1–8 words, mostly letters, no echo of the prompt). The candidates
//! for the score step are the theme, the theme with its strongest words in parentheses, and
//! the words alone; it keeps whichever describes the contexts best.
//!
//! Results go to `labels.jsonl` (one line per latent), so a cut-off run resumes.

use kindling_engine::{ChatMessage, LabelSource, Logits, Model, SamplingParams, TokenId};
use serde_json::json;

use super::{Activations, AtlasArgs, Journal, LatentStats, Occurrence, read_lines};
use crate::BuildError;
use crate::workers::{run_on_workers, shares, single_thread_pools};

const PRIME: &str = "Theme:";
/// Firing words listed in a prompt.
const WORDS_SHOWN: usize = 8;

/// What the labeller produced for one latent.
#[derive(Debug, Clone, Default)]
pub struct Label {
    /// The model's theme when usable.
    pub model: Option<String>,
    /// The words the latent fires on with their counts, most frequent first.
    pub words: Vec<(String, usize)>,
    /// The two words ending at each firing token ("trying to"), most frequent first.
    pub phrases: Vec<(String, usize)>,
    /// The firing tokens themselves (a latent on a word piece), most frequent first.
    pub pieces: Vec<(String, usize)>,
}

/// The first `n` of `items` seen at least `min_count` times, as a list.
fn list(items: &[(String, usize)], n: usize, min_count: usize) -> String {
    let shown: Vec<&str> = items.iter().filter(|i| i.1 >= min_count).take(n).map(|i| i.0.as_str()).collect();
    shown.join(", ")
}

impl Label {
    /// The label made of the words alone.
    pub fn words_label(&self) -> String {
        list(&self.words, 4, 1)
    }

    /// The candidate labels, the model's first: the theme, the theme with its strongest
    /// words, then the words, the phrases and the word pieces it fires on, then longer lists
    /// of the words and phrases that recur (a latent with many forms: "trying to, tried to,
    /// try to, try and, attempt to, best to"); distinct ones only. Recurring, because past
    /// the first few, words seen once are the latent's noise ("anaconda, Cadbury, Palo").
    pub fn candidates(&self) -> Vec<(String, LabelSource)> {
        let mut out: Vec<(String, LabelSource)> = Vec::new();
        if let Some(theme) = &self.model {
            out.push((theme.clone(), LabelSource::Model));
            if !self.words.is_empty() {
                out.push((format!("{theme} ({})", list(&self.words, 3, 1)), LabelSource::Model));
            }
        }
        for tokens in [
            self.words_label(),
            list(&self.phrases, 3, 1),
            list(&self.pieces, 4, 1),
            list(&self.words, 8, 2),
            list(&self.phrases, 6, 2),
        ] {
            if !tokens.is_empty() && !out.iter().any(|(c, _)| *c == tokens) {
                out.push((tokens, LabelSource::Tokens));
            }
        }
        out
    }
}

/// Worked examples: (words, theme). Varied on purpose: a small model copies whichever
/// example resembles the question, and leans to the last one, so none should resemble
/// many and the last is the least catchy.
const EXAMPLES: [(&str, &str); 5] = [
    ("\".\", \"!\", \"?\"", "punctuation that ends a sentence"),
    ("laughed, funny, joke, hilarious, comedy", "humor and laughter"),
    ("he, she, him, her, they", "personal pronouns"),
    ("Monday, Friday, Sunday, weekend", "days of the week"),
    ("ship, boat, sailor, sails, deck", "boats and sailing"),
];

fn question(words: &str) -> String {
    format!("Words: {words}")
}

/// The shared chat prefix: the worked examples as earlier turns.
fn prefix_messages() -> Vec<ChatMessage> {
    let mut messages = vec![ChatMessage::new(
        "system",
        "You name the theme that a list of words shares, in two to five words.",
    )];
    for (words, theme) in EXAMPLES {
        messages.push(ChatMessage::user(question(words)));
        messages.push(ChatMessage::new("assistant", format!("{PRIME} {theme}")));
    }
    messages
}

/// The whole word around the token at `pos` as the text reads it (a token inside a word,
/// like `iously` in `Seriously`, gives the word); punctuation and other non-word tokens come
/// back quoted.
pub fn firing_word(model: &Model, tokens: &[TokenId], pos: usize) -> Option<String> {
    let piece = |i: usize| model.tokenizer.decode(&[tokens[i]], true).unwrap_or_default();
    let marked = piece(pos);
    let core = marked.trim();
    if core.is_empty() {
        return marked.contains('\n').then(|| "\"\\n\"".to_string());
    }
    if !core.chars().any(char::is_alphanumeric) {
        return Some(format!("\"{core}\""));
    }
    let mut word = core.to_string();
    // Extend over neighbouring tokens that continue the word without a space.
    if !marked.starts_with(char::is_whitespace) {
        for i in (pos.saturating_sub(4)..pos).rev() {
            let p = piece(i);
            let glued: String = p
                .chars()
                .rev()
                .take_while(|c| c.is_alphanumeric())
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            word.insert_str(0, &glued);
            if glued.len() != p.len() {
                break;
            }
        }
    }
    if marked.ends_with(char::is_alphanumeric) {
        for i in pos + 1..(pos + 4).min(tokens.len()) {
            let p = piece(i);
            let glued: String = p.chars().take_while(|c| c.is_alphanumeric()).collect();
            word.push_str(&glued);
            if glued.len() != p.len() {
                break;
            }
        }
    }
    Some(word)
}

/// The words the model is shown: those a latent fires on in its stored activating contexts
/// (the ones its dashboard shows), most frequent first.
pub fn prompt_words(model: &Model, acts: &Activations, stats: &LatentStats) -> Vec<String> {
    let words = most_frequent(acts, stats.stored_activating(), |tokens, pos| firing_word(model, tokens, pos));
    words.into_iter().map(|(w, _)| w).collect()
}

/// A latent's label candidates made of its text alone (no model answer yet), read from its
/// labelling contexts: the stored activating ones and the larger labelling sample, whose
/// frequencies reflect all of its activating range rather than its peak.
pub fn token_label(model: &Model, acts: &Activations, stats: &LatentStats) -> Label {
    let read = |f: &dyn Fn(&[TokenId], usize) -> Option<String>| most_frequent(acts, stats.labelling_contexts(), f);
    Label {
        model: None,
        words: read(&|tokens, pos| firing_word(model, tokens, pos)),
        phrases: read(&|tokens, pos| firing_phrase(model, tokens, pos)),
        pieces: read(&|tokens, pos| firing_piece(model, tokens, pos)),
    }
}

/// The two words ending at the firing token, as the text reads them ("trying to"), or
/// `None` at the start of a window.
pub fn firing_phrase(model: &Model, tokens: &[TokenId], pos: usize) -> Option<String> {
    let text = model.tokenizer.decode(&tokens[pos.saturating_sub(4)..=pos], true).ok()?;
    let words: Vec<&str> = text.split_whitespace().collect();
    let phrase = words[words.len().saturating_sub(2)..].join(" ");
    phrase.chars().any(char::is_alphanumeric).then_some(phrase)
}

/// The firing token itself, trimmed (`None` for whitespace).
pub fn firing_piece(model: &Model, tokens: &[TokenId], pos: usize) -> Option<String> {
    let piece = model.tokenizer.decode(&[tokens[pos]], true).ok()?;
    let piece = piece.trim();
    (!piece.is_empty()).then(|| piece.to_string())
}

/// What `occurrences` show, read by `read` at each firing token: distinct values (case
/// folded) with their counts, most frequent first, ties in context order.
fn most_frequent<'a>(
    acts: &Activations,
    occurrences: impl Iterator<Item = &'a Occurrence>,
    read: impl Fn(&[TokenId], usize) -> Option<String>,
) -> Vec<(String, usize)> {
    let mut counts: Vec<(String, usize, usize)> = Vec::new();
    for (order, o) in occurrences.enumerate() {
        let Some(value) = read(&acts.windows[o.window as usize], o.pos as usize) else {
            continue;
        };
        match counts.iter_mut().find(|(v, _, _)| v.eq_ignore_ascii_case(&value)) {
            Some(entry) => entry.1 += 1,
            None => counts.push((value, 1, order)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
    counts.into_iter().map(|(v, n, _)| (v, n)).collect()
}

/// The model's answer as a label, or `None` when it does not read as one.
pub fn clean_answer(answer: &str) -> Option<String> {
    let first = answer.trim().lines().next()?.trim();
    let first = first.strip_prefix(PRIME).unwrap_or(first).trim();
    let cut = first.find(['.', ';', '!', '?', '(']).map_or(first, |i| &first[..i]);
    let label = cut
        .trim()
        .trim_matches(|c: char| c == '"' || c == '\'' || c == '*' || c == ':')
        .trim();
    let words: Vec<&str> = label.split_whitespace().collect();
    let letters = label.chars().filter(|c| c.is_alphabetic()).count();
    let lower = label.to_lowercase();
    let echoes = ["words:", "theme", "list of words", "<<", ">>"].iter().any(|e| lower.contains(e));
    let repeats = words
        .iter()
        .any(|w| words.iter().filter(|x| x.eq_ignore_ascii_case(w)).count() >= 3);
    if words.is_empty() || words.len() > 8 || letters < 3 || letters * 2 < label.len() || echoes || repeats {
        return None;
    }
    Some(label.to_string())
}

pub fn run(args: &AtlasArgs, model: &Model, acts: &Activations, stats: &[LatentStats]) -> Result<Vec<Label>, BuildError> {
    let path = args.work.join("labels.jsonl");
    let n = args.features.unwrap_or(stats.len()).min(stats.len());
    let mut labels: Vec<Option<Label>> = vec![None; stats.len()];
    for line in read_lines(&path) {
        if let Some(f) = line["feature"].as_u64().filter(|&f| (f as usize) < stats.len()) {
            let text = token_label(model, acts, &stats[f as usize]);
            labels[f as usize] = Some(Label {
                model: line["model_label"].as_str().map(str::to_string),
                ..text
            });
        }
    }
    let todo: Vec<usize> = (0..n).filter(|&f| labels[f].is_none() && stats[f].is_live()).collect();
    if !todo.is_empty() {
        let journal = Journal::open(&path, "atlas labels", todo.len() as u64)?;
        // Without the generation prompt: each request opens its own user turn.
        let prefix_tokens = model
            .tokenizer
            .encode(&model.tokenizer.apply_chat_template(&prefix_messages(), false)?, true);
        let workers = single_thread_pools(args.workers)?;
        let shares = shares(&todo, workers.len());
        // Per latent to do: its text candidates and the words the model is shown.
        let texts: Vec<(Label, Vec<String>)> = (0..stats.len())
            .map(|f| {
                if todo.binary_search(&f).is_ok() {
                    let mut shown = prompt_words(model, acts, &stats[f]);
                    shown.truncate(WORDS_SHOWN);
                    (token_label(model, acts, &stats[f]), shown)
                } else {
                    Default::default()
                }
            })
            .collect();
        let params = SamplingParams::greedy(12);
        let results = run_on_workers(&workers, &(0..workers.len()).collect::<Vec<_>>(), |w| {
            let share = &shares[w];
            let mut prefix = model.llama.new_cache();
            model.llama.forward(&prefix_tokens, &mut prefix, None, Logits::Last)?;
            let requests = share.iter().map(|&f| {
                // The turn after the prefix, rendered as the template renders a user turn.
                let text = format!(
                    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n{PRIME}",
                    question(&texts[f].1.join(", "))
                );
                let mut turn = model.tokenizer.encode(&text, true);
                turn.truncate(200);
                (turn, 0)
            });
            let mut out = Vec::new();
            model.generate_many_after(&prefix, requests, &params, 8, |i, output| {
                let f = share[i];
                let label = Label {
                    model: clean_answer(&output.text),
                    ..texts[f].0.clone()
                };
                let line = json!({ "feature": f, "answer": output.text, "model_label": label.model, "words": texts[f].1 });
                journal
                    .record(&line, &format!("#{f}: {}", label.model.as_deref().unwrap_or("-")))
                    .map_err(|e| kindling_engine::EngineError::Backend(e.to_string()))?;
                out.push((f, label));
                Ok(true)
            })?;
            Ok(out)
        })?;
        for (f, label) in results.into_iter().flatten() {
            labels[f] = Some(label);
        }
        journal.finish();
    }
    Ok(labels.into_iter().map(Option::unwrap_or_default).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_labels_and_rejects_echoes() {
        assert_eq!(clean_answer(" boats and sailing.\nMore text").as_deref(), Some("boats and sailing"));
        assert_eq!(clean_answer("\"Humor\" (jokes)").as_deref(), Some("Humor"));
        assert_eq!(clean_answer("Theme: Words: ship, boat"), None);
        assert_eq!(clean_answer("<<ship>>"), None);
        assert_eq!(clean_answer("  "), None);
        assert_eq!(clean_answer("the the the the"), None);
        assert_eq!(clean_answer("one two three four five six seven eight nine"), None);
        assert_eq!(clean_answer(", , ; ,"), None);
    }

    #[test]
    fn candidates_put_the_theme_first() {
        let label = Label {
            model: Some("humor".into()),
            words: vec![("funny".into(), 3), ("joke".into(), 2), ("Cadbury".into(), 1)],
            phrases: vec![("so funny".into(), 1)],
            pieces: vec![("funny".into(), 3), ("joke".into(), 2), ("Cadbury".into(), 1)],
        };
        let c: Vec<String> = label.candidates().into_iter().map(|c| c.0).collect();
        // The pieces repeat the words, so they are not a second candidate; the long list
        // keeps only the recurring words.
        assert_eq!(
            c,
            [
                "humor",
                "humor (funny, joke, Cadbury)",
                "funny, joke, Cadbury",
                "so funny",
                "funny, joke"
            ]
        );
        assert_eq!(Label::default().candidates().len(), 0);
    }
}
