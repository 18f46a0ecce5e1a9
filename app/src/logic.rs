//! The page's logic that needs no DOM: reading event streams and error bodies, AutoSteer's trials,
//! chat datasets, token shading. Compiled on every target, so `cargo test` checks it natively;
//! the components and the worker glue around it are wasm32 only.

use kindling_ember::variant::FeatureRef;
use serde_json::{Value, json};

/// The message of an error body: Goodfire/Kindling's `{"error": {"message"}}`, `{"detail"}`,
/// or the status text.
pub fn error_message(body: &str, status_text: &str) -> String {
    let value: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    value["error"]["message"]
        .as_str()
        .or_else(|| value["detail"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| {
            if status_text.is_empty() {
                "request failed".into()
            } else {
                status_text.into()
            }
        })
}

/// Splits a server-sent-event byte stream into the `data:` payloads of whole frames.
#[derive(Default)]
pub struct SseFrames {
    buffer: String,
}

impl SseFrames {
    pub fn push(&mut self, text: &str) -> Vec<String> {
        self.buffer.push_str(&text.replace("\r\n", "\n"));
        let mut out = Vec::new();
        while let Some(end) = self.buffer.find("\n\n") {
            let frame: String = self.buffer.drain(..end + 2).collect();
            let data: Vec<&str> = frame
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
        out
    }
}

/// One row of the page's AutoSteer trials table, read from a trial of `features/auto-edits`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialRow {
    pub features: String,
    pub strengths: String,
    pub effect: f64,
    pub perplexity: String,
    pub distinct: f64,
    pub verdict: &'static str,
    pub chosen: bool,
    pub sample: String,
}

impl TrialRow {
    pub fn from_json(trial: &Value, chosen_edits: &Value) -> Self {
        let edits = trial["edits"].as_array().cloned().unwrap_or_default();
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let features = edits
            .iter()
            .map(|e| format!("#{} {}", e["index_in_sae"], text(&e["label"])))
            .collect::<Vec<_>>()
            .join(" & ");
        let strengths = edits
            .iter()
            .map(|e| format!("{:+.2}", e["value"].as_f64().unwrap_or(0.0)))
            .collect::<Vec<_>>()
            .join(" & ");
        // The chosen edits: `[[feature, value], …]` with the feature's `index_in_sae`.
        let picked: Vec<(u64, f64)> = chosen_edits
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|pair| Some((pair[0]["index_in_sae"].as_u64()?, pair[1].as_f64()?)))
            .collect();
        let mine: Vec<(u64, f64)> = edits
            .iter()
            .filter_map(|e| Some((e["index_in_sae"].as_u64()?, e["value"].as_f64()?)))
            .collect();
        let chosen =
            !mine.is_empty() && mine.len() == picked.len() && mine.iter().zip(&picked).all(|(a, b)| a.0 == b.0 && (a.1 - b.1).abs() < 1e-4);
        let effect = trial["effect"].as_f64().unwrap_or(0.0);
        // JSON has no infinity: a trial without effect, or too repetitive, was never scored
        // for perplexity (null).
        let ratio = trial["perplexity_ratio"].as_f64();
        let accepted = trial["accepted"].as_bool().unwrap_or(false);
        let verdict = if chosen {
            "chosen"
        } else if accepted {
            "weaker"
        } else if effect <= 0.0 {
            "no effect"
        } else {
            "incoherent"
        };
        Self {
            features,
            strengths,
            effect,
            perplexity: ratio.map_or("—".into(), |r| format!("{r:.1}")),
            distinct: trial["distinct_bigrams"].as_f64().unwrap_or(0.0),
            verdict,
            chosen,
            sample: text(&trial["sample"]),
        }
    }
}

/// Reads a chat dataset: conversations separated by blank lines, each line `user: …` or
/// `assistant: …` (a line without a role continues the previous message).
pub fn parse_dataset(text: &str) -> Result<Vec<Vec<Value>>, String> {
    let mut conversations = Vec::new();
    for (n, block) in text.split("\n\n").map(str::trim).filter(|b| !b.is_empty()).enumerate() {
        let mut messages: Vec<(String, String)> = Vec::new();
        for line in block.lines() {
            let (role, rest) = match line.split_once(':') {
                Some((r, rest)) if ["user", "assistant", "system"].contains(&r.trim().to_lowercase().as_str()) => {
                    (r.trim().to_lowercase(), rest.trim())
                }
                _ => match messages.last_mut() {
                    Some(last) => {
                        last.1.push('\n');
                        last.1.push_str(line);
                        continue;
                    }
                    None => return Err(format!("conversation {}: start each message with “user:” or “assistant:”", n + 1)),
                },
            };
            messages.push((role, rest.to_string()));
        }
        conversations.push(
            messages
                .into_iter()
                .map(|(role, content)| json!({ "role": role, "content": content }))
                .collect(),
        );
    }
    Ok(conversations)
}

/// Shades a token by how strongly a feature fires on it (activation in max-activation units).
pub fn shade(activation: f32) -> String {
    let alpha = (activation.clamp(0.0, 1.0) * 0.85).max(0.0);
    format!("background-color: rgba(255, 128, 0, {alpha:.3})")
}

/// A token's text made visible: newlines and leading spaces would otherwise vanish.
pub fn visible_token(text: &str) -> String {
    text.replace('\n', "⏎")
}

/// A feature named in an API answer (`id` in search-style answers, `uuid` in lookups).
pub fn feature_ref(value: &serde_json::Value) -> Option<FeatureRef> {
    Some(FeatureRef {
        uuid: value["id"].as_str().or_else(|| value["uuid"].as_str())?.to_string(),
        label: value["label"].as_str().unwrap_or_default().to_string(),
        index_in_sae: value["index_in_sae"].as_u64()? as u32,
    })
}

/// The provider behind an endpoint and what it cannot do (route path → why), from its
/// `GET models` answer (`kindling_provider`, which `kindling-server --upstream` sends);
/// `None` when it names none.
pub fn provider_limitations(models: &Value) -> Option<(String, std::collections::BTreeMap<String, String>)> {
    let provider = &models["kindling_provider"];
    let name = provider["name"].as_str()?.to_string();
    let limits = provider["limitations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(path, why)| Some((path.clone(), why.as_str()?.to_string())))
        .collect();
    Some((name, limits))
}

/// One token of a `compute-features` answer and its active features: (index, id,
/// activation in activation units), strongest first as the answer lists them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenFeatures {
    pub text: String,
    pub features: Vec<(u32, String, f32)>,
}

/// Every token of a `compute-features` answer with its features.
pub fn token_features(answer: &Value) -> Vec<TokenFeatures> {
    answer["tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| TokenFeatures {
            text: t["token"].as_str().unwrap_or_default().to_string(),
            features: t["attributions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| {
                    Some((
                        a["index_in_sae"].as_u64()? as u32,
                        a["id"].as_str()?.to_string(),
                        a["activation_strength"].as_f64()? as f32,
                    ))
                })
                .collect(),
        })
        .collect()
}

/// A feature that fires on an example text.
#[derive(Debug, Clone, PartialEq)]
pub struct ExampleHit {
    pub index: u32,
    pub id: String,
    /// Its strongest activation on the example (activation units).
    pub peak: f32,
    /// The example's tokens it fires on.
    pub tokens: usize,
}

/// What fires on an example text, read from `compute-features` of a conversation that holds
/// it: the example's own tokens, each with its features (index, activation units), and the
/// features strongest on them, strongest first. The chat template's tokens around the text
/// are left out: every text has them, so what fires there says nothing of this one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExampleReading {
    pub tokens: Vec<(String, Vec<(u32, f32)>)>,
    pub hits: Vec<ExampleHit>,
}

impl ExampleReading {
    pub fn read(answer: &Value, text: &str) -> Self {
        let all: Vec<(String, Vec<(u32, String, f32)>)> = token_features(answer).into_iter().map(|t| (t.text, t.features)).collect();
        // Where the text lies in the tokens' concatenation; without a match (a tokenizer that
        // normalises), every token but the special ones.
        let joined: String = all.iter().map(|(t, _)| t.as_str()).collect();
        let wanted = text.trim();
        let span = (!wanted.is_empty())
            .then(|| joined.find(wanted))
            .flatten()
            .map(|s| s..s + wanted.len());
        let mut offset = 0;
        let mut reading = Self::default();
        let mut hits: Vec<ExampleHit> = Vec::new();
        for (token, features) in all {
            let (start, end) = (offset, offset + token.len());
            offset = end;
            let inside = match &span {
                Some(span) => start < span.end && end > span.start,
                None => !(token.starts_with("<|") && token.ends_with("|>")),
            };
            if !inside {
                continue;
            }
            for (index, id, activation) in &features {
                if *activation <= 0.0 {
                    continue;
                }
                match hits.iter_mut().find(|h| h.index == *index) {
                    Some(hit) => {
                        hit.peak = hit.peak.max(*activation);
                        hit.tokens += 1;
                    }
                    None => hits.push(ExampleHit {
                        index: *index,
                        id: id.clone(),
                        peak: *activation,
                        tokens: 1,
                    }),
                }
            }
            reading.tokens.push((token, features.into_iter().map(|(i, _, a)| (i, a)).collect()));
        }
        hits.sort_by(|a, b| b.peak.total_cmp(&a.peak).then(b.tokens.cmp(&a.tokens)).then(a.index.cmp(&b.index)));
        reading.hits = hits;
        reading
    }

    /// Each of the example's tokens with `feature`'s activation on it.
    pub fn shaded(&self, feature: u32) -> Vec<(String, f32)> {
        self.tokens
            .iter()
            .map(|(t, features)| (t.clone(), features.iter().find(|(i, _)| *i == feature).map_or(0.0, |x| x.1)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_behind_an_endpoint_says_what_it_cannot_do() {
        let models = json!({ "object": "list", "data": [], "kindling_provider": { "name": "Neuronpedia", "source": "m/s",
            "limitations": { "/chat-attribution/compute-logits": "no logits", "/x": 3 } } });
        let (name, limits) = provider_limitations(&models).unwrap();
        assert_eq!(name, "Neuronpedia");
        assert_eq!(limits.len(), 1, "a reason that is not text is left out");
        assert_eq!(limits["/chat-attribution/compute-logits"], "no logits");
        assert_eq!(provider_limitations(&json!({ "object": "list", "data": [] })), None);
    }

    #[test]
    fn an_example_is_read_on_its_own_tokens_and_its_features_ranked() {
        let token = |text: &str, features: &[(u32, f64)]| {
            let attributions: Vec<Value> = features
                .iter()
                .map(|(i, a)| json!({ "id": format!("u{i}"), "index_in_sae": i, "activation_strength": a }))
                .collect();
            json!({ "token": text, "attributions": attributions })
        };
        let answer = json!({ "tokens": [
            token("<|im_start|>", &[(1, 9.0)]), token("user", &[(1, 5.0)]), token("\n", &[]),
            token("Arr", &[(7, 2.0), (3, 0.5)]), token(" matey", &[(7, 3.0)]), token("!", &[(3, 0.8)]),
            token("<|im_end|>", &[(1, 9.0)]),
        ] });
        let reading = ExampleReading::read(&answer, "  Arr matey! ");
        let texts: Vec<&str> = reading.tokens.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(texts, ["Arr", " matey", "!"], "the template's tokens are left out");
        let ranked: Vec<(u32, f32, usize)> = reading.hits.iter().map(|h| (h.index, h.peak, h.tokens)).collect();
        assert_eq!(ranked, [(7, 3.0, 2), (3, 0.8, 2)]);
        assert_eq!(
            reading.shaded(7),
            [("Arr".to_string(), 2.0), (" matey".to_string(), 3.0), ("!".to_string(), 0.0)]
        );
        // A text the tokens do not spell out: every token but the special ones.
        let loose = ExampleReading::read(&answer, "something else");
        assert_eq!(loose.tokens.len(), 5);
        assert_eq!(ExampleReading::read(&json!({}), "x"), ExampleReading::default());
    }

    #[test]
    fn error_bodies_give_their_message_in_any_of_the_shapes_servers_send() {
        assert_eq!(error_message(r#"{"detail": "d", "error": {"message": "m"}}"#, "Bad"), "m");
        assert_eq!(error_message(r#"{"detail": "only detail"}"#, "Bad"), "only detail");
        assert_eq!(error_message("<html>gateway</html>", "Bad Gateway"), "Bad Gateway");
        assert_eq!(error_message("", ""), "request failed");
    }

    #[test]
    fn sse_frames_come_out_whole_whatever_the_reads_cut() {
        let mut frames = SseFrames::default();
        assert!(frames.push("data: {\"a\"").is_empty());
        assert_eq!(frames.push(": 1}\r\n\r\ndata: [DONE]\n"), ["{\"a\": 1}"]);
        assert_eq!(frames.push("\n: a comment\n\ndata:x\ndata: y\n\n"), ["[DONE]", "x\ny"]);
    }

    #[test]
    fn trials_read_their_verdict_and_which_one_was_chosen() {
        let trial = |index: u64, value: f64, effect: f64, accepted: bool, ratio: Value| {
            json!({ "edits": [{ "index_in_sae": index, "label": "food", "value": value }], "effect": effect,
                    "perplexity_ratio": ratio, "distinct_bigrams": 0.8, "accepted": accepted, "sample": "I eat" })
        };
        let chosen = json!([[{ "index_in_sae": 7, "label": "food" }, 0.45]]);
        let row = TrialRow::from_json(&trial(7, 0.45, 3.0, true, json!(2.1)), &chosen);
        assert_eq!(
            (row.verdict, row.chosen, row.features.as_str(), row.strengths.as_str()),
            ("chosen", true, "#7 food", "+0.45")
        );
        assert_eq!(row.perplexity, "2.1");
        assert_eq!(
            TrialRow::from_json(&trial(7, 0.3, 2.0, true, json!(1.5)), &chosen).verdict,
            "weaker"
        );
        assert_eq!(
            TrialRow::from_json(&trial(8, 0.45, 0.0, false, Value::Null), &chosen).verdict,
            "no effect"
        );
        let broken = TrialRow::from_json(&trial(9, 0.6, 5.0, false, json!(4.0)), &chosen);
        assert_eq!((broken.verdict, broken.chosen), ("incoherent", false));
        assert_eq!(
            TrialRow::from_json(&trial(8, 0.45, 0.0, false, Value::Null), &chosen).perplexity,
            "—"
        );
    }

    #[test]
    fn datasets_are_conversations_between_blank_lines() {
        let text = "user: hi\nassistant: hello\nthere\n\n\nUser: bye\nassistant: ok";
        let sets = parse_dataset(text).unwrap();
        assert_eq!(sets.len(), 2);
        assert_eq!(sets[0][1], json!({ "role": "assistant", "content": "hello\nthere" }));
        assert_eq!(sets[1][0]["role"], "user");
        assert!(parse_dataset("no role here").unwrap_err().contains("conversation 1"));
        assert!(parse_dataset("").unwrap().is_empty());
    }

    #[test]
    fn shades_are_bounded_and_tokens_show_their_newlines() {
        assert_eq!(shade(-1.0), "background-color: rgba(255, 128, 0, 0.000)");
        assert_eq!(shade(5.0), "background-color: rgba(255, 128, 0, 0.850)");
        assert_eq!(visible_token("a\nb"), "a⏎b");
    }

    #[test]
    fn features_are_read_from_search_and_lookup_answers() {
        let searched = feature_ref(&json!({ "id": "u-1", "label": "food", "index_in_sae": 3 })).unwrap();
        let looked_up = feature_ref(&json!({ "uuid": "u-1", "index_in_sae": 3 })).unwrap();
        assert_eq!((searched.uuid.as_str(), searched.index_in_sae), ("u-1", 3));
        assert_eq!(looked_up.label, "");
        assert_eq!(feature_ref(&json!({ "label": "no id" })), None);
    }
}
