//! The Kindling playground: steer SmolLM2 by its SAE features, in the browser.
//!
//! The page holds the UI only; the model runs in a Web Worker ([`client::LocalEngine`]) or on a
//! hosted Ember-compatible endpoint ([`client::Hosted`]). Every panel talks to either through
//! one [`client::Client`] in the Goodfire wire format, and edits one shared
//! [`SavedVariant`] (Goodfire terms: feature UUIDs and labels), which is also what is
//! exported, imported and shared as a link.

#![cfg(target_arch = "wasm32")]

pub mod client;
mod components;

use kindling_engine::share::{FeatureRef, SavedVariant};
use leptos::prelude::*;

use crate::client::Client;
pub use components::App;

/// The state every panel shares, provided as context by [`App`].
#[derive(Clone, Copy)]
pub struct Session {
    /// The endpoint, once connected (`None` while the model loads or after a failure).
    pub client: RwSignal<Option<Client>, LocalStorage>,
    /// The variant being built: edits and rules.
    pub variant: RwSignal<SavedVariant>,
    /// Features met in this session (searched, opened, in rules), for the rule builder and
    /// the inspector's pickers.
    pub known: RwSignal<Vec<FeatureRef>>,
    /// The feature whose dashboard card is open.
    pub card: RwSignal<Option<FeatureRef>>,
    /// The last conversation, for the inspector: (role, content) pairs.
    pub conversation: RwSignal<Vec<(String, String)>>,
    /// A message for the user (errors, notices), shown until replaced.
    pub notice: RwSignal<Option<Notice>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub error: bool,
    pub text: String,
}

impl Session {
    pub fn client(&self) -> Option<Client> {
        self.client.get_untracked()
    }

    pub fn error(&self, text: impl std::fmt::Display) {
        self.notice.set(Some(Notice {
            error: true,
            text: text.to_string(),
        }));
    }

    pub fn info(&self, text: impl Into<String>) {
        self.notice.set(Some(Notice {
            error: false,
            text: text.into(),
        }));
    }

    /// The request `controller` of the current variant (none for the base model).
    pub fn controller(&self) -> Option<serde_json::Value> {
        let variant = self.variant.get_untracked();
        (!variant.is_base()).then(|| variant.to_controller())
    }
}

pub fn use_session() -> Session {
    expect_context::<Session>()
}

/// A feature named in an API answer (`id` in search-style answers, `uuid` in lookups).
pub fn feature_ref(value: &serde_json::Value) -> Option<FeatureRef> {
    Some(FeatureRef {
        uuid: value["id"].as_str().or_else(|| value["uuid"].as_str())?.to_string(),
        label: value["label"].as_str().unwrap_or_default().to_string(),
        index_in_sae: value["index_in_sae"].as_u64()? as u32,
    })
}
