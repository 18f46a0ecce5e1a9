//! The playground page: mounts the UI (the engine starts in its own worker).

#[cfg(target_arch = "wasm32")]
fn main() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(kindling_app::App);
}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    eprintln!("kindling-app runs in the browser: build it with `trunk build --release`");
}
