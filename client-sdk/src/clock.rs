//! A clock that decisions by time read instead of the system: the SDK checks member
//! credentials' validity by it ([`ClientConfig::clock`](crate::ClientConfig::clock)), and the
//! homeserver decides credential renewal, KeyPackage lifetimes, queue message age and rate
//! limiters' refill by it (roost-server re-exports these types).
//!
//! In production it is the system clock. Tests use a [`ManualClock`] and advance it instead
//! of sleeping, so what they check does not depend on how fast the machine runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock and monotonic time, as the services see it.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    manual: Option<ManualClock>,
}

impl Clock {
    /// The system clock (the default).
    pub fn system() -> Self {
        Self { manual: None }
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_millis(&self) -> u64 {
        match &self.manual {
            None => system_unix_millis(),
            Some(manual) => manual.unix_millis(),
        }
    }

    /// Seconds since the Unix epoch.
    pub fn unix_secs(&self) -> u64 {
        self.unix_millis() / 1000
    }

    /// A monotonic instant (what rate limiters measure refill against).
    pub fn instant(&self) -> Instant {
        match &self.manual {
            None => Instant::now(),
            Some(manual) => manual.instant(),
        }
    }
}

impl From<ManualClock> for Clock {
    fn from(manual: ManualClock) -> Self {
        Self {
            manual: Some(manual),
        }
    }
}

/// A clock that stands still until it is advanced; for tests. Clones share the same time.
///
/// It starts at the system's current wall time (so KeyPackages and credentials made with the
/// real time, e.g. by openmls, make sense against it) and moves only by [`advance`](Self::advance).
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<Manual>,
}

#[derive(Debug)]
struct Manual {
    start_unix_millis: u64,
    start_instant: Instant,
    /// Milliseconds advanced since the start.
    advanced_ms: AtomicU64,
}

impl ManualClock {
    /// A clock standing at the current system time.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Manual {
                start_unix_millis: system_unix_millis(),
                start_instant: Instant::now(),
                advanced_ms: AtomicU64::new(0),
            }),
        }
    }

    /// Moves the clock (and every clone of it) forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        // Saturating: a clock advanced past the end of time stays there.
        let _ = self
            .inner
            .advanced_ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_add(ms))
            });
    }

    /// The [`Clock`] that reads this one.
    pub fn clock(&self) -> Clock {
        Clock::from(self.clone())
    }

    fn advanced(&self) -> u64 {
        self.inner.advanced_ms.load(Ordering::SeqCst)
    }

    fn unix_millis(&self) -> u64 {
        self.inner.start_unix_millis.saturating_add(self.advanced())
    }

    fn instant(&self) -> Instant {
        let start = self.inner.start_instant;
        start
            .checked_add(Duration::from_millis(self.advanced()))
            .unwrap_or(start)
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

/// Milliseconds since the Unix epoch by the system clock.
fn system_unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced_and_clones_share_it() {
        let manual = ManualClock::new();
        let clock = manual.clock();
        let (wall, mono) = (clock.unix_millis(), clock.instant());
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(clock.unix_millis(), wall);
        assert_eq!(clock.instant(), mono);
        manual.clone().advance(Duration::from_secs(90));
        assert_eq!(clock.unix_millis(), wall + 90_000);
        assert_eq!(clock.unix_secs(), (wall + 90_000) / 1000);
        assert_eq!(clock.instant(), mono + Duration::from_secs(90));
    }

    #[test]
    fn the_system_clock_follows_real_time() {
        let clock = Clock::system();
        let before = system_unix_millis();
        let read = clock.unix_millis();
        assert!(read >= before && read <= system_unix_millis());
        assert!(clock.instant() <= Instant::now());
    }
}
