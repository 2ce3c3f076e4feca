//! Measurement helpers: latency samples and their percentiles, rates, and the resident memory
//! of a process read from `/proc`.

use std::time::Duration;

/// Latency samples in microseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    samples: Vec<u64>,
}

impl Latencies {
    /// No samples yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample.
    pub fn record(&mut self, elapsed: Duration) {
        self.samples
            .push(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: Latencies) {
        self.samples.extend(other.samples);
    }

    /// How many samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The `q`-quantile (0.0..=1.0) in microseconds, 0 without samples (nearest rank).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.samples.is_empty() {
            return 0;
        }
        let mut sorted = self.samples.clone();
        sorted.sort_unstable();
        let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.saturating_sub(1).min(sorted.len() - 1)]
    }

    /// The median in microseconds.
    pub fn median(&self) -> u64 {
        self.quantile(0.5)
    }
}

/// Operations per second.
pub fn rate(ops: usize, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 { 0.0 } else { ops as f64 / secs }
}

/// Memory figures of a process from `/proc/<pid>/status`, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rss {
    /// Resident set size now (VmRSS).
    pub current: u64,
    /// Peak resident set size (VmHWM) since start or the last [`reset_peak`].
    pub peak: u64,
}

/// Reads VmRSS and VmHWM of `pid` (zero where unavailable, e.g. not Linux).
pub fn rss_of(pid: Option<u32>) -> Rss {
    let Some(pid) = pid else {
        return Rss::default();
    };
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Rss::default();
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    Rss {
        current: field("VmRSS:"),
        peak: field("VmHWM:"),
    }
}

/// Resets the peak RSS (VmHWM) of `pid` to its current RSS (`/proc/<pid>/clear_refs`, value 5),
/// so each workload reports its own peak. Best effort: not every kernel allows it.
pub fn reset_peak(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let mut l = Latencies::new();
        for us in 1..=100 {
            l.record(Duration::from_micros(us));
        }
        assert_eq!(l.median(), 50);
        assert_eq!(l.quantile(0.99), 99);
        assert_eq!(l.quantile(0.999), 100);
        assert_eq!(Latencies::new().quantile(0.5), 0);
    }

    #[test]
    fn own_rss_is_readable() {
        let rss = rss_of(Some(std::process::id()));
        assert!(rss.current > 0 && rss.peak >= rss.current);
        assert_eq!(rate(10, Duration::from_secs(2)), 5.0);
    }
}
