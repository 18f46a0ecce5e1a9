//! The Ember protocol: what Kindling says on the wire, between the engine and its shells.
//!
//! ```text
//! kindling-engine (model, SAE, steering, inspection, contrast, AutoSteer, attribution)
//!     └─▶ kindling-ember
//!           ├─ wire      request and reply bodies of the Goodfire API, limits, stream chunks
//!           ├─ variant   the one variant wire model: files, share links, `controller` JSON
//!           ├─ routes    the route table, request parsing, the Provider trait, dispatch
//!           ├─ error     EmberError and its HTTP status
//!           ├─ ids       feature ids: UUIDs from the SAE's sha256 and the latent's index
//!           ├─ neuronpedia  Neuronpedia's API behind the same routes (no I/O: a Transport)
//!           └─ local     (feature `engine`) the engine as a Provider
//!                 └─▶ shells: kindling-server (axum), the browser worker, the page
//! ```
//!
//! Without the `engine` feature this crate does not depend on burn, so the page (which only
//! reads variants, share links and units) compiles none of it.

pub mod error;
pub mod ids;
#[cfg(feature = "engine")]
pub mod local;
pub mod neuronpedia;
pub mod replies;
pub mod routes;
pub mod units;
pub mod variant;
pub mod wire;
pub mod worker;

pub use error::EmberError;
#[cfg(feature = "engine")]
pub use local::Ember;
pub use routes::{Method, Provider, Request, Route, dispatch};

/// The model Kindling runs, as requests name it.
pub const MODEL_NAME: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
