//! The state every panel shares.

use kindling_ember::variant::{FeatureRef, SavedVariant};
use leptos::prelude::*;

use crate::client::Client;

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
    /// Messages for the user, oldest first. An error stays until dismissed (a later notice
    /// must not hide why a share link did not open); a notice replaces the previous notice.
    pub notices: RwSignal<Vec<Notice>>,
    /// Where the engine runs and its build, for the footer: the in-page worker's build id
    /// (as its loader said it), or "hosted".
    pub engine_build: RwSignal<Option<String>>,
    /// Restarts the in-page engine (set while one runs): the only way to stop its work, since
    /// the worker's one thread hears no message until a call ends.
    pub restart_engine: StoredValue<Option<std::rc::Rc<dyn Fn()>>, LocalStorage>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub id: u64,
    pub error: bool,
    pub text: String,
}

/// How many errors stay on screen at once.
const MAX_ERRORS: usize = 3;

impl Session {
    pub fn client(&self) -> Option<Client> {
        self.client.get_untracked()
    }

    pub fn error(&self, text: impl std::fmt::Display) {
        self.push_notice(true, text.to_string());
    }

    pub fn info(&self, text: impl Into<String>) {
        self.push_notice(false, text.into());
    }

    pub fn dismiss(&self, id: u64) {
        self.notices.update(|n| n.retain(|notice| notice.id != id));
    }

    fn push_notice(&self, error: bool, text: String) {
        self.notices.update(|notices| {
            let id = notices.iter().map(|n| n.id + 1).max().unwrap_or(0);
            if error {
                let errors = notices.iter().filter(|n| n.error).count();
                if errors >= MAX_ERRORS {
                    let oldest = notices.iter().position(|n| n.error).expect("an error exists");
                    notices.remove(oldest);
                }
            } else {
                notices.retain(|n| n.error);
            }
            notices.push(Notice { id, error, text });
        });
    }

    /// Why the connected endpoint cannot serve `route` (tracked: panels grey out with it).
    pub fn limitation(&self, route: kindling_ember::Route) -> Option<String> {
        self.client.with(|c| c.as_ref().and_then(|c| c.limitation(route)))
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
