//! Shared test utilities: the real model (loaded once per backend) and the llama.cpp fixture.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use kindling_engine::{Backend, Model};
use serde_json::Value;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn model_path() -> PathBuf {
    std::env::var_os("KINDLING_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("public/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// The shipped model on `backend`, loaded once per test binary. A missing file fails the test
/// with instructions rather than skipping it.
pub fn model(backend: Backend) -> &'static Model {
    static CPU: OnceLock<Model> = OnceLock::new();
    static WGPU: OnceLock<Model> = OnceLock::new();
    let cell = match backend {
        Backend::Cpu => &CPU,
        Backend::Wgpu => &WGPU,
    };
    cell.get_or_init(|| {
        let path = model_path();
        assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh first", path.display());
        Model::load(&path, backend).unwrap_or_else(|e| panic!("loading the model on {backend}: {e}"))
    })
}

/// `tests/fixtures/llama_cpp_reference.json`: llama.cpp's outputs on the same GGUF.
pub fn fixture() -> &'static Value {
    static FIXTURE: OnceLock<Value> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path = repo_root().join("tests/fixtures/llama_cpp_reference.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).expect("valid fixture JSON")
    })
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn prompt(name: &str) -> &'static Value {
    fixture()["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("prompt {name} in fixture"))
}
