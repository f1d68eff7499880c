//! Giving memory back to the system after a burst of work.
//!
//! glibc's malloc keeps what a burst freed (hundreds of reconciles at once after a template
//! change, each parsing and writing JSON) in its per-thread arenas, where fragmentation leaves
//! most of it unreturned: `make bench` found the operator's resident memory at twice its live
//! heap after all releases settled, and resident memory is what a pod's memory limit counts.
//! `malloc_trim` hands the free pages of every arena back; it is cheap next to the burst, so
//! the operator calls it once work has happened and then settled.

use std::time::Duration;

/// How often the trimmer checks for work done since its last trim.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Every [`TRIM_EVERY`], if `work_done` (a counter that grows with work, such as reconciles
/// finished) moved since the last trim and then stood still for a whole period, returns freed
/// memory to the system. Never returns; spawn it.
pub async fn give_back_after_bursts(work_done: impl Fn() -> u64) {
    trim_after_bursts(work_done, || async {
        tokio::task::spawn_blocking(trim).await.unwrap_or(false)
    })
    .await
}

async fn trim_after_bursts<F: std::future::Future<Output = bool>>(
    work_done: impl Fn() -> u64,
    trim: impl Fn() -> F,
) {
    let mut trimmed_at = work_done();
    let mut last = trimmed_at;
    let mut ticks = tokio::time::interval(TRIM_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = work_done();
        // Settled after work: trimming in the middle of a burst would only be undone by it.
        if now == last && now != trimmed_at {
            let released = trim().await;
            tracing::debug!(released, "freed memory given back after a burst");
            trimmed_at = now;
        }
        last = now;
    }
}

/// Returns the free pages of every malloc arena to the system; whether any were.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim() -> bool {
    // SAFETY: malloc_trim takes no pointers and is thread-safe: it locks each arena in turn.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators (musl's, macOS's) give memory back on their own terms.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test(start_paused = true)]
    async fn trims_once_when_a_burst_has_settled_and_never_at_rest() {
        let work = Arc::new(AtomicU64::new(0));
        let trims = Arc::new(AtomicU64::new(0));
        let (w, t) = (work.clone(), trims.clone());
        let trimmer = tokio::spawn(trim_after_bursts(
            move || w.load(Ordering::SeqCst),
            move || {
                t.fetch_add(1, Ordering::SeqCst);
                async { true }
            },
        ));
        let periods = |n: u32| tokio::time::sleep(TRIM_EVERY * n + Duration::from_millis(1));
        periods(5).await;
        assert_eq!(
            trims.load(Ordering::SeqCst),
            0,
            "no work, nothing to give back"
        );

        // A burst lasting three periods: no trim while it runs.
        for _ in 0..3 {
            work.fetch_add(100, Ordering::SeqCst);
            periods(1).await;
        }
        assert_eq!(
            trims.load(Ordering::SeqCst),
            0,
            "still busy at the last look"
        );
        periods(1).await;
        assert_eq!(
            trims.load(Ordering::SeqCst),
            1,
            "settled for a period: trimmed"
        );
        periods(5).await;
        assert_eq!(trims.load(Ordering::SeqCst), 1, "once per burst");
        trimmer.abort();
    }
}
