//! Progress lines for long jobs: done/total, rate and ETA, at most every few seconds.

use std::time::{Duration, Instant};

pub struct Progress {
    what: &'static str,
    unit: &'static str,
    total: u64,
    start: Instant,
    start_done: u64,
    last_print: Option<Instant>,
    every: Duration,
}

impl Progress {
    /// `start_done` is what an interrupted earlier run already finished: the rate and ETA
    /// count only this run's work.
    pub fn new(what: &'static str, unit: &'static str, total: u64, start_done: u64) -> Self {
        Self {
            what,
            unit,
            total,
            start: Instant::now(),
            start_done,
            last_print: None,
            every: Duration::from_secs(5),
        }
    }

    /// Prints a line if enough time passed since the last (or if `force`).
    pub fn update(&mut self, done: u64, extra: &str, force: bool) {
        let now = Instant::now();
        if !force && self.last_print.is_some_and(|t| now - t < self.every) {
            return;
        }
        self.last_print = Some(now);
        let elapsed = (now - self.start).as_secs_f64().max(1e-9);
        let rate = done.saturating_sub(self.start_done) as f64 / elapsed;
        let left = self.total.saturating_sub(done) as f64;
        let eta = if rate > 0.0 { format_duration(left / rate) } else { "?".into() };
        let pct = 100.0 * done as f64 / self.total.max(1) as f64;
        let rate = if rate < 10.0 { format!("{rate:.2}") } else { format!("{rate:.0}") };
        eprintln!(
            "[{}] {done}/{} {} ({pct:.1}%) · {rate} {}/s · elapsed {} · ETA {eta}{}{extra}",
            self.what,
            self.total,
            self.unit,
            self.unit,
            format_duration(elapsed),
            if extra.is_empty() { "" } else { " · " },
        );
    }
}

pub fn format_duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
