//! The `kindling` command as a user runs it.

use std::path::PathBuf;
use std::process::Command;

fn kindling() -> Command {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kindling"));
    cmd.current_dir(root);
    cmd
}

#[test]
fn chat_streams_llama_cpp_greedy_reply() {
    let out = kindling()
        .args(["chat", "Hi, how are you?", "--max-tokens", "20", "--temperature", "0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // llama.cpp's greedy reply to the template-rendered prompt (tests/fixtures, prompt B).
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("How are you? I'm fine, just enjoying a relaxing day at the beach. What brings you"),
        "{text:?}"
    );
}

#[test]
fn same_seed_same_reply() {
    let run = |seed: &str| {
        let out = kindling()
            .args([
                "chat",
                "Tell me a joke.",
                "--max-tokens",
                "16",
                "--temperature",
                "0.9",
                "--seed",
                seed,
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run("11"), run("11"));
}

#[test]
fn help_explains_the_options() {
    let out = kindling().args(["chat", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in ["--backend", "--temperature", "--max-tokens", "--seed", "greedy"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn missing_model_and_bad_backend_are_clear_errors() {
    let out = kindling().args(["--model", "/nonexistent.gguf", "chat", "hi"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("scripts/fetch-model.sh"));
    let out = kindling().args(["--backend", "tpu", "chat", "hi"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown backend"));
}

#[test]
fn tokens_counts_with_the_model_tokenizer() {
    use std::io::Write;
    let mut child = kindling()
        .args(["tokens"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // tests/fixtures: "Hello, how are you doing today?" is 8 tokens, 31 characters.
    child.stdin.take().unwrap().write_all(b"Hello, how are you doing today?").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "8\t31\t-\n");
}
