//! Throughput jobs run as several single-threaded workers rather than one job on all cores.
//!
//! The engine splits one forward pass over rayon's pool, which pays off for latency but not
//! for throughput at these sizes: on the 2-core reference machine one thread harvests 454
//! rows/s and two threads on the same windows only 491, while two single-threaded workers
//! on different windows reach about twice the one-thread rate (batched decode: 69 vs 93
//! tok/s for one and two threads). Each worker is a rayon pool of one thread, so the
//! engine's kernels run serially inside it.

use crate::BuildError;

/// `n` rayon pools of one thread each (`n` = 0: one per core).
pub fn single_thread_pools(n: usize) -> Result<Vec<rayon::ThreadPool>, BuildError> {
    let n = if n == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        n
    };
    (0..n)
        .map(|i| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(move |_| format!("worker-{i}"))
                .build()
                .map_err(|e| BuildError::Input(format!("starting worker {i}: {e}")))
        })
        .collect()
}

/// `items` dealt out to `n` workers in turn (worker `w` gets items `w`, `w + n`, …), so that
/// each share spans the whole range.
pub fn shares(items: &[usize], n: usize) -> Vec<Vec<usize>> {
    (0..n).map(|w| items.iter().copied().skip(w).step_by(n).collect()).collect()
}

/// Runs `job(item)` for each of `items` (at most one per worker), side by side; results in
/// the items' order.
pub fn run_on_workers<T: Send>(
    workers: &[rayon::ThreadPool],
    items: &[usize],
    job: impl Fn(usize) -> Result<T, BuildError> + Sync,
) -> Result<Vec<T>, BuildError> {
    assert!(items.len() <= workers.len(), "one item per worker");
    let job = &job;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .iter()
            .zip(workers)
            .map(|(&item, pool)| scope.spawn(move || pool.install(|| job(item))))
            .collect();
        handles.into_iter().map(|h| h.join().expect("a worker panicked")).collect()
    })
}
