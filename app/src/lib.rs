//! The Kindling playground: steer SmolLM2 by its SAE features, in the browser.
//!
//! The page holds the UI only; the model runs in a Web Worker (`client::LocalEngine`) or on a
//! hosted Ember-compatible endpoint (`client::Hosted`), or is Neuronpedia's, called from the
//! page (`neuronpedia`). Every panel talks to either through
//! one `client::Client` in the Goodfire wire format, and edits one shared
//! [`kindling_ember::variant::SavedVariant`] (Goodfire terms: feature UUIDs and labels), which is also what is
//! exported, imported and shared as a link.

pub mod logic;
pub mod map;

// The UI and its glue: only for the browser (natively they would pull in a DOM for no use).
#[cfg(target_arch = "wasm32")]
mod boot;
#[cfg(target_arch = "wasm32")]
pub mod client;
#[cfg(target_arch = "wasm32")]
mod components;
#[cfg(target_arch = "wasm32")]
pub mod neuronpedia;
#[cfg(target_arch = "wasm32")]
mod session;

#[cfg(target_arch = "wasm32")]
pub use components::App;
pub use logic::feature_ref;
#[cfg(target_arch = "wasm32")]
pub use session::{Notice, Session, use_session};
