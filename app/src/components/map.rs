//! The feature map: every live feature as a point on a canvas, placed by what its label means
//! (`GET features/map`), coloured by region. Search hits light up; hovering names a feature,
//! clicking opens its card; drag pans, the wheel zooms.

use std::collections::VecDeque;
use std::rc::Rc;

use kindling_ember::Route;
use leptos::html::Canvas;
use leptos::prelude::*;
use serde_json::json;
use wasm_bindgen::JsCast;
use wasm_bindgen::closure::Closure;
use web_sys::{CanvasRenderingContext2d, MouseEvent, WheelEvent};

use crate::map::{MapData, MapView};

/// How near the pointer a point must be to be hovered, in CSS pixels.
const HOVER_RADIUS: f64 = 7.0;
/// Draw times kept for the median the canvas reports (`data-draw-ms`).
const DRAW_TIMES: usize = 60;

/// What the canvas shows now, besides the data.
#[derive(Default)]
struct Scene {
    data: Option<Rc<MapData>>,
    view: MapView,
    hovered: Option<usize>,
    /// Where a drag started (CSS pixels) and whether it moved (a drag is not a click).
    drag: Option<(f64, f64, bool)>,
    draw_ms: VecDeque<f64>,
}

#[component]
pub(crate) fn FeatureMap(
    /// The features to light up (search hits), by index.
    #[prop(into)]
    highlight: Signal<Vec<u32>>,
) -> impl IntoView {
    let session = crate::use_session();
    let canvas = NodeRef::<Canvas>::new();
    let scene = StoredValue::new_local(Scene::default());
    let status = RwSignal::new(String::from("The map appears once the features are loaded."));
    let hover = RwSignal::new(None::<(String, f64, f64)>);
    let loaded = RwSignal::new(false);

    let redraw = move || {
        let Some(canvas) = canvas.get_untracked() else { return };
        let started = now();
        let highlight = highlight.get_untracked();
        scene.update_value(|s| {
            if let Some(data) = s.data.clone() {
                draw(&canvas, &data, &mut s.view, &highlight, s.hovered);
                s.draw_ms.push_back(now() - started);
                if s.draw_ms.len() > DRAW_TIMES {
                    s.draw_ms.pop_front();
                }
                let mut sorted: Vec<f64> = s.draw_ms.iter().copied().collect();
                sorted.sort_by(f64::total_cmp);
                let _ = canvas.set_attribute("data-draw-ms", &format!("{:.2}", sorted[sorted.len() / 2]));
                let _ = canvas.set_attribute("data-zoom", &format!("{:.3}", s.view.zoom));
                let shown = highlight.iter().filter(|&&i| data.position_of(i).is_some()).count();
                let _ = canvas.set_attribute("data-highlighted", &shown.to_string());
            }
        });
    };

    // The map is fetched once per endpoint; an endpoint without one says why.
    Effect::new(move |_| {
        let Some(client) = session.client.get() else { return };
        if let Some(why) = session.limitation(Route::Map) {
            status.set(format!("No feature map here: {why}"));
            return;
        }
        leptos::task::spawn_local(async move {
            let path = format!("/features/map?model={}", js_sys::encode_uri_component(&client.model()));
            match client
                .get(&path)
                .await
                .map_err(|e| e.to_string())
                .and_then(|answer| MapData::from_answer(&answer))
            {
                Ok(data) => {
                    let count = data.len();
                    scene.update_value(|s| {
                        s.data = Some(Rc::new(data));
                        s.view = MapView::default();
                        s.hovered = None;
                    });
                    if let Some(c) = canvas.get_untracked() {
                        let _ = c.set_attribute("data-points", &count.to_string());
                    }
                    status.set(format!(
                        "{count} features, placed by what their labels mean. Drag to pan, scroll to zoom, click a point to open its card."
                    ));
                    loaded.set(true);
                    redraw();
                }
                Err(e) => status.set(format!("No feature map: {e}")),
            }
        });
    });
    // Search hits light up.
    Effect::new(move |_| {
        highlight.track();
        redraw();
    });
    // Drawn again whenever the canvas changes size, which includes being shown: a canvas in
    // a hidden tab has no size to draw at.
    Effect::new(move |_| {
        let Some(element) = canvas.get() else { return };
        let on_resize = Closure::<dyn FnMut()>::new(redraw);
        if let Ok(observer) = web_sys::ResizeObserver::new(on_resize.as_ref().unchecked_ref()) {
            observer.observe(&element);
        }
        // The canvas lives as long as the page: so do its observer and callback.
        on_resize.forget();
    });

    let pointer = |ev: &MouseEvent| (ev.offset_x() as f64, ev.offset_y() as f64);
    let on_move = move |ev: MouseEvent| {
        let (x, y) = pointer(&ev);
        let mut changed = false;
        scene.update_value(|s| {
            if let Some((sx, sy, moved)) = s.drag.as_mut() {
                if *moved || (x - *sx).hypot(y - *sy) > 3.0 {
                    s.view.pan(x - *sx, y - *sy);
                    (*sx, *sy, *moved) = (x, y, true);
                    changed = true;
                }
                return;
            }
            let Some(data) = s.data.clone() else { return };
            let near = data.nearest(&s.view, x, y, HOVER_RADIUS);
            if near != s.hovered {
                s.hovered = near;
                changed = true;
                hover.set(near.map(|n| {
                    let (index, label) = data.feature(n);
                    (format!("#{index} {label}"), x, y)
                }));
            }
        });
        if changed {
            redraw();
        }
    };
    let on_down = move |ev: MouseEvent| {
        let (x, y) = pointer(&ev);
        scene.update_value(|s| s.drag = Some((x, y, false)));
    };
    let on_up = move |_: MouseEvent| {
        let mut clicked = None;
        scene.update_value(|s| {
            if let Some((_, _, false)) = s.drag {
                clicked = s.hovered.zip(s.data.clone()).map(|(n, data)| data.feature(n).0);
            }
            s.drag = None;
        });
        if let Some(index) = clicked {
            open_card(session, index);
        }
    };
    let on_leave = move |_: MouseEvent| {
        scene.update_value(|s| {
            s.drag = None;
            s.hovered = None;
        });
        hover.set(None);
        redraw();
    };
    let on_wheel = move |ev: WheelEvent| {
        ev.prevent_default();
        let (x, y) = (ev.offset_x() as f64, ev.offset_y() as f64);
        // One notch (100 px of scroll) zooms by a fifth.
        let factor = (-ev.delta_y() / 500.0).exp();
        scene.update_value(|s| s.view.zoom_at(x, y, factor));
        redraw();
    };
    let reset = move |_| {
        scene.update_value(|s| s.view = MapView::default());
        redraw();
    };

    view! {
        <section class="feature-map" aria-label="Feature map">
            <h3>"Feature map"</h3>
            <p class="meta" data-testid="map-status">{move || status.get()}</p>
            <div class="map-frame" class:hidden=move || !loaded.get()>
                <canvas
                    node_ref=canvas
                    data-testid="feature-map"
                    role="img"
                    aria-label="Map of the features: related labels sit together"
                    on:mousemove=on_move
                    on:mousedown=on_down
                    on:mouseup=on_up
                    on:mouseleave=on_leave
                    on:wheel=on_wheel
                ></canvas>
                {move || {
                    hover.get().map(|(text, x, y)| {
                        view! {
                            <div class="map-hover" data-testid="map-hover" style=format!("left:{:.0}px;top:{:.0}px", x + 12.0, y + 12.0)>
                                {text}
                            </div>
                        }
                    })
                }}
                <button class="map-reset" on:click=reset>"Reset view"</button>
            </div>
        </section>
    }
}

/// Opens the card of feature `index` (its id comes from a lookup).
fn open_card(session: crate::Session, index: u32) {
    let Some(client) = session.client() else { return };
    leptos::task::spawn_local(async move {
        let body = json!({ "indices": [index], "model": client.model() });
        match client.post("/features/lookup", body).await {
            Ok(answer) => match answer["features"].get(0).and_then(crate::feature_ref) {
                Some(feature) => {
                    session.known.update(|k| {
                        if !k.iter().any(|f| f.uuid == feature.uuid) {
                            k.push(feature.clone());
                        }
                    });
                    session.card.set(Some(feature));
                }
                None => session.error(format!("Feature #{index} was not found")),
            },
            Err(e) => session.error(format!("Opening feature #{index} failed: {e}")),
        }
    });
}

fn now() -> f64 {
    web_sys::window().and_then(|w| w.performance()).map_or(0.0, |p| p.now())
}

/// Region colours: hues a golden angle apart, so neighbouring region numbers differ.
fn region_colour(region: u8, alpha: f64) -> String {
    format!("hsla({:.0}, 60%, 48%, {alpha})", (region as f64 * 137.508) % 360.0)
}

/// Draws the map at the canvas's size (sized to its box, times the device pixel ratio).
fn draw(canvas: &web_sys::HtmlCanvasElement, data: &MapData, view: &mut MapView, highlight: &[u32], hovered: Option<usize>) {
    let ratio = web_sys::window().map_or(1.0, |w| w.device_pixel_ratio());
    let (width, height) = (canvas.client_width() as f64, canvas.client_height() as f64);
    if width <= 0.0 || height <= 0.0 {
        return;
    }
    let (pixels_w, pixels_h) = ((width * ratio).round() as u32, (height * ratio).round() as u32);
    if canvas.width() != pixels_w || canvas.height() != pixels_h {
        canvas.set_width(pixels_w);
        canvas.set_height(pixels_h);
    }
    view.resize(width, height);
    let Some(ctx) = canvas
        .get_context("2d")
        .ok()
        .flatten()
        .and_then(|c| c.dyn_into::<CanvasRenderingContext2d>().ok())
    else {
        return;
    };
    let _ = ctx.set_transform(ratio, 0.0, 0.0, ratio, 0.0, 0.0);
    ctx.clear_rect(0.0, 0.0, width, height);

    let lit = !highlight.is_empty();
    let size = (2.2 * view.zoom.sqrt()).clamp(2.0, 7.0);
    // One fill style per region: points are grouped by region.
    for (region, points) in data.by_region() {
        ctx.set_fill_style_str(&region_colour(region, if lit { 0.25 } else { 0.85 }));
        for &n in points {
            let (x, y) = view.to_screen(data.position(n));
            if x >= -size && y >= -size && x <= width + size && y <= height + size {
                ctx.fill_rect(x - size / 2.0, y - size / 2.0, size, size);
            }
        }
    }
    ctx.set_font("600 11px system-ui, sans-serif");
    ctx.set_text_align("center");
    ctx.set_line_width(3.0);
    ctx.set_stroke_style_str("rgba(255, 255, 255, 0.85)");
    ctx.set_fill_style_str("rgba(30, 30, 30, 0.8)");
    for (name, centre) in data.regions() {
        let (x, y) = view.to_screen(centre);
        let _ = ctx.stroke_text(name, x, y);
        let _ = ctx.fill_text(name, x, y);
    }
    let ring = |x: f64, y: f64, r: f64, fill: &str| {
        ctx.begin_path();
        let _ = ctx.arc(x, y, r, 0.0, std::f64::consts::TAU);
        ctx.set_fill_style_str(fill);
        ctx.fill();
        ctx.set_stroke_style_str("white");
        ctx.set_line_width(1.5);
        ctx.stroke();
    };
    for &index in highlight {
        if let Some(position) = data.position_of(index) {
            let (x, y) = view.to_screen(position);
            ring(x, y, 4.5, "rgb(200, 30, 30)");
        }
    }
    if let Some(n) = hovered {
        let (x, y) = view.to_screen(data.position(n));
        ring(x, y, 6.0, "rgb(20, 20, 20)");
    }
}
