//! Bounded waits: every "until this holds, or give up" of the test bed goes through here, so
//! that a timeout always names what was awaited and how long.

use std::fmt::Display;
use std::thread;
use std::time::{Duration, Instant};

/// How often [`poll`] and [`wait_until`] look again.
pub const EVERY: Duration = Duration::from_millis(20);

/// Calls `check` until it holds or `within` has passed, sleeping `every` between calls; how
/// long it took, or `None`. `check` runs at least once, and once more at the deadline.
pub fn poll_every(
    every: Duration,
    within: Duration,
    mut check: impl FnMut() -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if check() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= within {
            return None;
        }
        thread::sleep(every.min(within.saturating_sub(start.elapsed())));
    }
}

/// [`poll_every`] at [`EVERY`].
pub fn poll(within: Duration, check: impl FnMut() -> bool) -> Option<Duration> {
    poll_every(EVERY, within, check)
}

/// Like [`poll`], but a timeout fails the test naming `what`; how long it took.
pub fn wait_until(what: impl Display, within: Duration, check: impl FnMut() -> bool) -> Duration {
    poll(within, check).unwrap_or_else(|| panic!("{what}: not within {within:?}"))
}

/// Calls `attempt` until it returns `Some` or `within` has passed, sleeping `every` between
/// calls; the value, or `None`.
pub fn poll_for<T>(
    every: Duration,
    within: Duration,
    mut attempt: impl FnMut() -> Option<T>,
) -> Option<T> {
    let mut found = None;
    poll_every(every, within, || {
        found = attempt();
        found.is_some()
    });
    found
}
