//! The engine's integration tests, one binary (ripgrep's layout): the real model, SAE and
//! atlas load once for all of them (`common`). `hostile_files.rs` stays a binary of its own:
//! it installs a counting global allocator with limits, which must not meet other tests'
//! allocations.

mod common;

mod atlas;
mod embed;
mod engine;
mod inspect;
mod llama_cpp;
mod sae;
mod steer;
