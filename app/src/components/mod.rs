//! The playground's components: one file per panel.

mod chat;
mod connection;
mod edits;
mod features;
mod inspect;
mod map;
mod rules;
mod variant;

use kindling_ember::variant::SavedVariant;
use leptos::prelude::*;

use crate::Session;

/// The tool panels beside the chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tab {
    Features,
    Edits,
    Rules,
    Inspect,
    Variant,
}

impl Tab {
    const ALL: [Tab; 5] = [Tab::Features, Tab::Edits, Tab::Rules, Tab::Inspect, Tab::Variant];

    fn name(self) -> &'static str {
        match self {
            Tab::Features => "Features",
            Tab::Edits => "Edits",
            Tab::Rules => "Rules",
            Tab::Inspect => "Inspect",
            Tab::Variant => "Variant",
        }
    }
}

/// The whole page.
#[component]
pub fn App() -> impl IntoView {
    let session = Session {
        client: RwSignal::new_local(None),
        variant: RwSignal::new(SavedVariant::new(connection::LOCAL_MODEL)),
        known: RwSignal::new(Vec::new()),
        card: RwSignal::new(None),
        conversation: RwSignal::new(Vec::new()),
        notices: RwSignal::new(Vec::new()),
        engine_build: RwSignal::new(None),
        restart_engine: StoredValue::new_local(None),
    };
    provide_context(session);
    let tab = RwSignal::new(Tab::Features);
    // A shared variant in the URL fragment replaces the empty one, or explains why not.
    variant::restore_from_location(session);

    view! {
        <header class="top">
            <h1>"Kindling"</h1>
            <connection::Connection />
        </header>
        <NoticeBar />
        <main class="layout">
            <section class="chat-panel" aria-label="Chat">
                <chat::Chat />
            </section>
            <section class="tools-panel" aria-label="Tools">
                <nav class="tabs" role="tablist">
                    {Tab::ALL
                        .into_iter()
                        .map(|t| {
                            view! {
                                <button
                                    role="tab"
                                    data-testid=format!("tab-{}", t.name().to_lowercase())
                                    class:active=move || tab.get() == t
                                    aria-selected=move || (tab.get() == t).to_string()
                                    on:click=move |_| tab.set(t)
                                >
                                    {t.name()}
                                </button>
                            }
                        })
                        .collect_view()}
                </nav>
                // Panels stay mounted so their inputs and results survive a tab switch.
                <div class="tab-body" class:hidden=move || tab.get() != Tab::Features>
                    <features::Features />
                </div>
                <div class="tab-body" class:hidden=move || tab.get() != Tab::Edits>
                    <edits::Edits />
                </div>
                <div class="tab-body" class:hidden=move || tab.get() != Tab::Rules>
                    <rules::Rules />
                </div>
                <div class="tab-body" class:hidden=move || tab.get() != Tab::Inspect>
                    <inspect::Inspect />
                </div>
                <div class="tab-body" class:hidden=move || tab.get() != Tab::Variant>
                    <variant::VariantPanel />
                </div>
            </section>
        </main>
        <footer class="footer">
            <span data-testid="build">
                {move || {
                    let page = crate::client::page_build().unwrap_or_else(|| "unstamped".into());
                    match session.engine_build.get() {
                        Some(engine) => format!("page build {page} · engine build {engine}"),
                        None => format!("page build {page}"),
                    }
                }}
            </span>
        </footer>
    }
}

/// Why a part of a panel is greyed out: what the connected endpoint cannot do (nothing while
/// it can).
#[component]
fn Unavailable(route: kindling_ember::Route, #[prop(optional)] what: &'static str) -> impl IntoView {
    let session = crate::use_session();
    move || {
        session.limitation(route).map(|why| {
            view! {
                <p class="unavailable" data-testid="unavailable">
                    {if what.is_empty() { why } else { format!("{what}: {why}") }}
                </p>
            }
        })
    }
}

/// The open errors and the latest notice, each dismissible.
#[component]
fn NoticeBar() -> impl IntoView {
    let session = crate::use_session();
    view! {
        <For each=move || session.notices.get() key=|notice| notice.id let:notice>
            <div class="notice" class:error=notice.error role=if notice.error { "alert" } else { "status" } data-testid="notice">
                <span>{notice.text}</span>
                <button aria-label="Dismiss" on:click=move |_| session.dismiss(notice.id)>
                    "×"
                </button>
            </div>
        </For>
    }
}
