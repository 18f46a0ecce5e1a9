//! The variant as JSON: view, import, export, and share links (the whole variant in the URL
//! fragment, which never reaches a server; API keys are never part of it).

use std::collections::HashMap;

use kindling_ember::units::STRENGTH_UNIT;
use kindling_ember::variant::{FeatureRef, Mismatch, SavedVariant};
use leptos::prelude::*;
use serde_json::json;
use wasm_bindgen::JsCast;

use crate::Session;
use crate::client::Client;

/// The URL fragment's key for a shared variant: `#v=k1.…`.
const LINK_KEY: &str = "v=";

/// Restores a variant from `#v=…` when the page opens with one; a broken link changes
/// nothing and says why.
pub(crate) fn restore_from_location(session: Session) {
    let Some(location) = web_sys::window().map(|w| w.location()) else {
        return;
    };
    let hash = location.hash().unwrap_or_default();
    let Some(payload) = hash.strip_prefix('#').and_then(|h| h.strip_prefix(LINK_KEY)) else {
        return;
    };
    match SavedVariant::from_link(payload) {
        Ok(variant) => {
            let (edits, rules) = (variant.edits.len(), variant.rules.len());
            session.variant.set(variant);
            session.info(format!(
                "Opened a shared variant: {edits} edits, {rules} rules (its labels are checked against the atlas once the model is ready)"
            ));
            // The link's ids and labels are the sharer's claims: once an endpoint answers, each
            // feature is looked up by its index and what differs is shown.
            check_when_ready(session);
        }
        Err(e) => session.error(format!("This share link cannot be opened: {e}. Nothing was changed.")),
    }
}

/// Runs [`check_labels`] once an endpoint is ready (at once when one is).
fn check_when_ready(session: Session) {
    let checked = StoredValue::new(false);
    Effect::new(move |_| {
        if let Some(client) = session.client.get()
            && !checked.get_value()
        {
            checked.set_value(true);
            leptos::task::spawn_local(check_labels(session, client));
        }
    });
}

/// Re-resolves the opened variant's features by `index_in_sae` from the loaded atlas
/// (`features/lookup`): the variant takes the atlas's ids and labels, and every difference is
/// reported. A link naming latents this SAE lacks is dropped. Values saved in the old
/// steering unit are converted to the current one with the factors the lookup gives.
pub(crate) async fn check_labels(session: Session, client: Client) {
    let indices = session.variant.with_untracked(SavedVariant::indices);
    if indices.is_empty() {
        return;
    }
    let answer = match client
        .post("/features/lookup", json!({ "indices": indices, "model": client.model() }))
        .await
    {
        Ok(answer) => answer,
        Err(e) if matches!(e.status, 400 | 404 | 422) => {
            session.variant.update(|v| {
                v.edits.clear();
                v.rules.clear();
            });
            return session.error(format!(
                "The shared variant names features this model's SAE does not have ({e}); it was set aside."
            ));
        }
        Err(e) => {
            return session.error(format!(
                "The shared variant's labels could not be checked ({e}): they are the link's, unverified."
            ));
        }
    };
    let atlas: HashMap<u32, FeatureRef> = answer["features"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(crate::feature_ref)
        .map(|f| (f.index_in_sae, f))
        .collect();
    convert_units(session, &answer);
    let mut result = Ok(Vec::new());
    session.variant.update(|v| result = v.resolve(&|i| atlas.get(&i).cloned()));
    match result {
        Ok(mut mismatches) => {
            // A link without labels (the SDK's files may omit them) claims nothing false.
            mismatches.retain(|m| m.other_sae() || !m.claimed.label.is_empty());
            session.known.update(|k| {
                let v = session.variant.get_untracked();
                for rule in &v.rules {
                    k.extend(rule.clauses.iter().flat_map(|c| c.features.iter().cloned()));
                }
            });
            if !mismatches.is_empty() {
                session.error(mismatch_report(&mismatches));
            }
        }
        Err(e) => {
            session.variant.update(|v| {
                v.edits.clear();
                v.rules.clear();
            });
            session.error(format!("The shared variant cannot be used: {e}. It was set aside."));
        }
    }
}

/// Brings a variant saved in an older steering unit to the current one, and says so.
fn convert_units(session: Session, lookup: &serde_json::Value) {
    let old = session.variant.with_untracked(SavedVariant::unit);
    if old == STRENGTH_UNIT {
        return;
    }
    let factors: HashMap<u32, f32> = lookup["features"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| Some((f["index_in_sae"].as_u64()? as u32, f["strength_per_unit_1"].as_f64()? as f32)))
        .collect();
    let mut result = Ok(false);
    session.variant.update(|v| result = v.convert_units(&|i| factors.get(&i).copied()));
    match result {
        Ok(true) => session.info(format!(
            "This variant was saved with steering unit {old}; its values were converted to unit {STRENGTH_UNIT} (docs/STEERING.md), so it steers as it did."
        )),
        Ok(false) => {}
        Err(e) => session.error(format!(
            "This variant was saved with steering unit {old}, and this endpoint gives no conversion ({e}): its values are kept as they were and may steer differently."
        )),
    }
}

/// What the user reads about labels or ids the link got wrong (plain text, never markup).
fn mismatch_report(mismatches: &[Mismatch]) -> String {
    const SHOWN: usize = 5;
    let other_sae = mismatches.iter().any(Mismatch::other_sae);
    let mut text = String::from(if other_sae {
        "This share link was made with another SAE (its feature ids differ), so its edits may mean other things here. "
    } else {
        "This share link's labels do not match this model's atlas. "
    });
    text.push_str("The atlas's labels are used: ");
    let items: Vec<String> = mismatches
        .iter()
        .take(SHOWN)
        .map(|m| {
            format!(
                "#{} is “{}” here, the link says “{}”",
                m.index_in_sae, m.atlas.label, m.claimed.label
            )
        })
        .collect();
    text.push_str(&items.join("; "));
    if mismatches.len() > SHOWN {
        text.push_str(&format!("; and {} more", mismatches.len() - SHOWN));
    }
    text.push('.');
    text
}

/// Saves `text` as a file download.
pub(crate) fn download(name: &str, text: &str) {
    let parts = js_sys::Array::of1(&text.into());
    let options = web_sys::BlobPropertyBag::new();
    options.set_type("application/json");
    let Ok(blob) = web_sys::Blob::new_with_str_sequence_and_options(&parts, &options) else {
        return;
    };
    let Ok(url) = web_sys::Url::create_object_url_with_blob(&blob) else {
        return;
    };
    if let Some(a) = web_sys::window()
        .and_then(|w| w.document())
        .and_then(|d| d.create_element("a").ok())
        .and_then(|a| a.dyn_into::<web_sys::HtmlAnchorElement>().ok())
    {
        a.set_href(&url);
        a.set_download(name);
        a.click();
    }
    let _ = web_sys::Url::revoke_object_url(&url);
}

/// The variant panel.
#[component]
pub fn VariantPanel() -> impl IntoView {
    let session = crate::use_session();
    let json = move || session.variant.with(SavedVariant::to_json_pretty);
    let import_text = RwSignal::new(String::new());
    let link = RwSignal::new(String::new());

    let import = move || match SavedVariant::from_json(&import_text.get_untracked()) {
        Ok(v) => {
            let old_unit = v.unit() != STRENGTH_UNIT;
            session.variant.set(v);
            import_text.set(String::new());
            session.info("Variant imported");
            if old_unit {
                check_when_ready(session);
            }
        }
        Err(e) => session.error(format!("Cannot import: {e}. The variant is unchanged.")),
    };

    let share = move || {
        let Some(window) = web_sys::window() else { return };
        let location = window.location();
        let page = format!(
            "{}{}{}",
            location.origin().unwrap_or_default(),
            location.pathname().unwrap_or_default(),
            location.search().unwrap_or_default()
        );
        let url = format!("{page}#{LINK_KEY}{}", session.variant.get_untracked().to_link());
        link.set(url.clone());
        // Clipboard access may be refused (no user permission, insecure origin); the link is
        // shown either way.
        let _ = window.navigator().clipboard().write_text(&url);
        session.info("Share link created (and copied where the browser allows)");
    };

    view! {
        <section class="variant" aria-label="Variant">
            <h2>"Variant"</h2>
            <pre class="json" data-testid="variant-json">{json}</pre>
            <div class="row">
                <button data-testid="share" on:click=move |_| share()>
                    "Share link"
                </button>
                <button on:click=move |_| download("kindling-variant.json", &json())>"Export JSON"</button>
                <button on:click=move |_| session.variant.update(|v| {
                    v.edits.clear();
                    v.rules.clear();
                })>"Reset variant"</button>
            </div>
            <input class="link-out" data-testid="share-link" readonly aria-label="Share link" prop:value=move || link.get() />
            <h3>"Import"</h3>
            <textarea data-testid="import-json" placeholder="Paste a variant JSON (Kindling's, or the goodfire SDK's Variant.json())" prop:value=move || import_text.get() on:input=move |ev| import_text.set(event_target_value(&ev))></textarea>
            <button data-testid="import" on:click=move |_| import()>
                "Import"
            </button>
        </section>
    }
}
