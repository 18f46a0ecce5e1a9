//! Forward passes on a rayon pool whose idle workers spin rather than sleep.
//!
//! The CPU kernels fan out over rayon's threads some 120 times per token, with serial work
//! between them; rayon's idle workers fall asleep in those gaps and each fan-out would wait for
//! a wake-up. So a CPU pass runs on a pool worker while the other workers keep stealing until it
//! ends (llama.cpp's threads spin the same way). The browser has no rayon pool: there a pass
//! just runs.

use crate::backend::Backend;

/// Runs the forward pass `pass` on `backend`: on the spinning pool when the CPU kernels will
/// fan out over it (unless already on one of its workers), else here.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn run<R: Send>(backend: Backend, pass: impl FnOnce() -> R + Send) -> R {
    if backend == Backend::Cpu && rayon::current_thread_index().is_none() {
        on_spinning_pool(pass)
    } else {
        pass()
    }
}

/// Runs the forward pass `pass` (the browser has no thread pool).
#[cfg(target_arch = "wasm32")]
pub(crate) fn run<R>(_backend: Backend, pass: impl FnOnce() -> R) -> R {
    pass()
}

/// Runs `f` on a rayon worker while the pool's other workers spin, stealing work, until it
/// returns.
#[cfg(not(target_arch = "wasm32"))]
fn on_spinning_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let done = std::sync::atomic::AtomicBool::new(false);
    rayon::scope(|scope| {
        for _ in 1..rayon::current_num_threads() {
            scope.spawn(|_| steal_until(&done));
        }
        let out = f();
        done.store(true, std::sync::atomic::Ordering::Release);
        out
    })
}

/// Runs pending rayon jobs on this worker, spinning between them, until `done` is set.
#[cfg(not(target_arch = "wasm32"))]
fn steal_until(done: &std::sync::atomic::AtomicBool) {
    while !done.load(std::sync::atomic::Ordering::Acquire) {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::hint::spin_loop();
        }
    }
}
