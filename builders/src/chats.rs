//! `kindling-build chats`: the model-generated chat part of the SAE corpus.
//!
//! Reads prompts (`tools/corpus/chat_prompts.py` writes them), lets SmolLM2 answer them in
//! batches, and appends each finished conversation, rendered as ChatML, to a JSONL file. A run
//! that is cut off resumes where the file ends (conversations are appended one batch at a
//! time, and a torn last line is dropped). It stops once the generated conversations reach
//! the target share of the whole corpus, then records itself in the corpus manifest.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use kindling_engine::{ChatMessage, FinishReason, Model, SamplingParams};
use serde_json::{Value, json};

use crate::progress::Progress;
use crate::{BuildError, sha256_file};

pub struct ChatsArgs {
    pub model_path: PathBuf,
    pub prompts: PathBuf,
    pub out: PathBuf,
    pub manifest: PathBuf,
    pub min_fraction: f64,
    pub min_total_tokens: u64,
    pub batch: usize,
    /// Single-threaded workers generating side by side (0: one per core).
    pub workers: usize,
    pub params: SamplingParams,
    pub command: String,
}

struct Prompt {
    id: u64,
    kind: String,
    system: Option<String>,
    user: String,
}

fn read_prompts(path: &Path) -> Result<Vec<Prompt>, BuildError> {
    let file = File::open(path).map_err(|e| BuildError::io(path, e))?;
    let mut prompts = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| BuildError::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| BuildError::Input(format!("{}:{}: {what}", path.display(), n + 1));
        let v: Value = serde_json::from_str(&line).map_err(|e| bad(&e.to_string()))?;
        prompts.push(Prompt {
            id: v["id"].as_u64().ok_or_else(|| bad("missing integer \"id\""))?,
            kind: v["kind"].as_str().unwrap_or("unknown").to_string(),
            system: v["system"].as_str().map(str::to_string),
            user: v["user"].as_str().ok_or_else(|| bad("missing string \"user\""))?.to_string(),
        });
    }
    Ok(prompts)
}

/// Conversations already generated: their ids and token total. A torn last line (the run was
/// killed while writing) is cut off so that appending continues on a clean line.
fn resume(out: &Path) -> Result<(HashSet<u64>, u64), BuildError> {
    let mut done = HashSet::new();
    let mut tokens = 0;
    let Ok(text) = fs::read_to_string(out) else {
        return Ok((done, tokens));
    };
    let mut good_len = 0;
    for line in text.split_inclusive('\n') {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            break;
        };
        if !line.ends_with('\n') {
            break;
        }
        if let (Some(id), Some(t)) = (v["id"].as_u64(), v["tokens"].as_u64()) {
            done.insert(id);
            tokens += t;
        }
        good_len += line.len();
    }
    if good_len < text.len() {
        eprintln!("[chats] dropping a torn last line of {}", out.display());
        let file = OpenOptions::new().write(true).open(out).map_err(|e| BuildError::io(out, e))?;
        file.set_len(good_len as u64).map_err(|e| BuildError::io(out, e))?;
    }
    Ok((done, tokens))
}

fn text_tokens(manifest: &Value) -> u64 {
    manifest["sources"]
        .as_array()
        .map(|s| s.iter().filter(|x| x["kind"] == "text").filter_map(|x| x["tokens"].as_u64()).sum())
        .unwrap_or(0)
}

/// Generated-chat tokens needed so that they make up `fraction` of a corpus of at least
/// `min_total` tokens, next to `text` tokens of general text.
pub fn tokens_needed(text: u64, fraction: f64, min_total: u64) -> u64 {
    let for_fraction = (fraction / (1.0 - fraction) * text as f64).ceil() as u64;
    for_fraction.max(min_total.saturating_sub(text))
}

pub fn run(args: &ChatsArgs) -> Result<(), BuildError> {
    let manifest_text = fs::read_to_string(&args.manifest).map_err(|e| BuildError::io(&args.manifest, e))?;
    let mut manifest: Value =
        serde_json::from_str(&manifest_text).map_err(|e| BuildError::Input(format!("{}: {e}", args.manifest.display())))?;
    let text = text_tokens(&manifest);
    if text == 0 {
        return Err(BuildError::Input(format!(
            "{} lists no general-text tokens; build that part first",
            args.manifest.display()
        )));
    }
    let target = tokens_needed(text, args.min_fraction, args.min_total_tokens);
    // Already recorded for exactly this file: leave the manifest (and so every harvest made
    // from it) untouched.
    let recorded = manifest["sources"]
        .as_array()
        .and_then(|s| s.iter().find(|x| x["kind"] == "generated-chat"))
        .cloned();
    if let Some(entry) = recorded
        && entry["tokens"].as_u64().is_some_and(|t| t >= target)
        && args.out.exists()
        && entry["sha256"].as_str() == Some(sha256_file(&args.out)?.as_str())
    {
        eprintln!(
            "[chats] complete: {} conversations, {} tokens recorded in {}",
            entry["documents"],
            entry["tokens"],
            args.manifest.display()
        );
        return Ok(());
    }
    let prompts = read_prompts(&args.prompts)?;
    let (done, tokens) = resume(&args.out)?;
    eprintln!(
        "[chats] general text {text} tokens; target {target} generated-chat tokens ({:.0}% of at least {} in all); {} conversations ({tokens} tokens) already done",
        100.0 * args.min_fraction,
        args.min_total_tokens,
        done.len()
    );
    let model = Model::load(&args.model_path, kindling_engine::Backend::Cpu)?;
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .map_err(|e| BuildError::io(&args.out, e))?;
    let todo: Vec<&Prompt> = prompts.iter().filter(|p| !done.contains(&p.id)).collect();
    let conversation = |p: &Prompt| {
        let mut messages = Vec::new();
        if let Some(s) = &p.system {
            messages.push(ChatMessage::new("system", s.clone()));
        }
        messages.push(ChatMessage::user(p.user.clone()));
        messages
    };
    /// What the workers share: the output file and the running totals.
    struct Shared {
        out: File,
        tokens: u64,
        written: usize,
        generated_tokens: u64,
        progress: Progress,
        failure: Option<BuildError>,
    }
    let shared = std::sync::Mutex::new(Shared {
        out,
        tokens,
        written: done.len(),
        generated_tokens: 0,
        progress: Progress::new("chats", "tokens", target, tokens),
        failure: None,
    });
    let started = std::time::Instant::now();
    let workers = crate::workers::single_thread_pools(args.workers)?;
    // Prompts are dealt round-robin to the workers; each decodes its own batch.
    let shares: Vec<Vec<&Prompt>> = (0..workers.len())
        .map(|w| todo.iter().copied().skip(w).step_by(workers.len()).collect())
        .collect();
    let worker_ids: Vec<usize> = (0..workers.len()).collect();
    if tokens < target {
        crate::workers::run_on_workers(&workers, &worker_ids, |w| {
            let mine = &shares[w];
            let inputs = mine
                .iter()
                .map(|p| Ok((model.tokenizer.encode_chat(&conversation(p))?, args.params.seed.wrapping_add(p.id))))
                .collect::<Result<Vec<_>, BuildError>>()?;
            model.generate_many(inputs, &args.params, args.batch, |i, output| {
                let p = mine[i];
                let reply = output.text.trim().to_string();
                let mut messages = conversation(p);
                messages.push(ChatMessage::new("assistant", reply.clone()));
                let chatml = model.tokenizer.apply_chat_template(&messages, false)?;
                let n = model.tokenizer.encode(&chatml, true).len() as u64;
                let finish = match output.finish {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                    FinishReason::Cancelled => "cancelled",
                    FinishReason::Aborted => "aborted",
                };
                let line = json!({
                    "id": p.id, "kind": p.kind, "source": "generated-chat", "system": p.system, "user": p.user,
                    "assistant": reply, "finish": finish, "tokens": n, "text": chatml,
                });
                let mut s = shared.lock().expect("no worker panics while holding the lock");
                s.generated_tokens += output.tokens.len() as u64;
                if reply.is_empty() {
                    return Ok(s.tokens < target);
                }
                // One whole line per write: a kill between writes leaves the file resumable.
                if let Err(e) = s.out.write_all(format!("{line}\n").as_bytes()).and_then(|_| s.out.flush()) {
                    s.failure = Some(BuildError::io(&args.out, e));
                    return Ok(false);
                }
                s.tokens += n;
                s.written += 1;
                let rate = s.generated_tokens as f64 / started.elapsed().as_secs_f64();
                let (tokens, written) = (s.tokens, s.written);
                s.progress
                    .update(tokens, &format!("{written} conversations · {rate:.0} generated tok/s"), false);
                Ok(tokens < target)
            })?;
            Ok(())
        })?;
    }
    let Shared {
        tokens,
        written,
        mut progress,
        failure,
        ..
    } = shared.into_inner().expect("workers are done");
    if let Some(e) = failure {
        return Err(e);
    }
    progress.update(tokens, &format!("{written} conversations"), true);
    if tokens < target {
        return Err(BuildError::Input(format!(
            "the prompts ran out at {tokens} of {target} tokens; write more with tools/corpus/chat_prompts.py --count"
        )));
    }
    record_in_manifest(&mut manifest, args, written, tokens, text)?;
    let tmp = args.manifest.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_string_pretty(&manifest).expect("JSON") + "\n").map_err(|e| BuildError::io(&tmp, e))?;
    fs::rename(&tmp, &args.manifest).map_err(|e| BuildError::io(&args.manifest, e))?;
    eprintln!(
        "[chats] recorded {written} conversations, {tokens} tokens in {}",
        args.manifest.display()
    );
    Ok(())
}

fn record_in_manifest(manifest: &mut Value, args: &ChatsArgs, documents: usize, tokens: u64, text: u64) -> Result<(), BuildError> {
    let p = &args.params;
    let entry = json!({
        "name": "generated-chat",
        "kind": "generated-chat",
        "description": "ChatML conversations (system, user, assistant) whose assistant turns SmolLM2-135M-Instruct generated from tools/corpus/chat_prompts.py prompts",
        "license": "Apache-2.0 (model output of SmolLM2-135M-Instruct; prompts drawn from the sources above)",
        "file": args.out.file_name().map(|f| f.to_string_lossy().into_owned()),
        "sha256": sha256_file(&args.out)?,
        "documents": documents,
        "tokens": tokens,
        "prompts": { "file": args.prompts.display().to_string(), "sha256": sha256_file(&args.prompts)? },
        "model_sha256": sha256_file(&args.model_path)?,
        "sampling": { "temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens, "seed": "base + prompt id", "base_seed": p.seed, "batch_per_worker": args.batch },
        "counted_as": "each conversation's ChatML text encoded with control tokens",
        "created_by": args.command,
    });
    let sources = manifest["sources"]
        .as_array_mut()
        .ok_or_else(|| BuildError::Input("manifest has no sources list".into()))?;
    sources.retain(|s| s["kind"] != "generated-chat");
    sources.push(entry);
    let total = text + tokens;
    manifest["total_tokens"] = json!(total);
    manifest["generated_chat"]["status"] = json!("complete");
    manifest["generated_chat"]["fraction_of_total_tokens"] = json!((tokens as f64 / total as f64 * 1e4).round() / 1e4);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_covers_both_the_share_and_the_minimum_total() {
        // 15% of the whole next to 3.4 M tokens of text is exactly 600 k.
        assert_eq!(tokens_needed(3_400_000, 0.15, 0), 600_000);
        assert_eq!(tokens_needed(3_400_000, 0.15, 4_100_000), 700_000);
        assert_eq!(tokens_needed(10_000_000, 0.15, 4_000_000), 1_764_706);
    }
}
