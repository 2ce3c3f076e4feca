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

/// The host's UDP counters from `/proc/net/snmp`: (datagrams sent, receive-buffer drops). On
/// loopback every datagram of the bench and its servers is counted once as sent, so the
/// difference over a phase divided by its operations is the datagrams one operation costs
/// (other traffic on the host counts too). None where unavailable.
pub fn udp_counters() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = text.lines().filter(|line| line.starts_with("Udp: "));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let field = |name: &str| -> Option<u64> {
        let at = names.iter().position(|n| *n == name)?;
        values.get(at)?.parse().ok()
    };
    Some((field("OutDatagrams")?, field("RcvbufErrors")?))
}

/// Datagrams sent per operation and receive-buffer drops between two [`udp_counters`]
/// readings, as JSON (null where unavailable).
pub fn udp_per_op(
    before: Option<(u64, u64)>,
    after: Option<(u64, u64)>,
    ops: usize,
) -> serde_json::Value {
    match (before, after) {
        (Some((sent0, drops0)), Some((sent1, drops1))) if ops > 0 => serde_json::json!({
            "datagrams_per_op": sent1.saturating_sub(sent0) as f64 / ops as f64,
            "receive_buffer_drops": drops1.saturating_sub(drops0),
        }),
        _ => serde_json::Value::Null,
    }
}

/// The executor probe's counters of a homeserver (`roost_executor_*` in its `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExecutorProbe {
    probes: f64,
    lag_us: f64,
    stalls_5ms: f64,
    stalls_20ms: f64,
    stalls_100ms: f64,
}

impl ExecutorProbe {
    /// Reads the counters from Prometheus text.
    pub fn parse(text: &str) -> Self {
        let value = |series: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Self {
            probes: value("roost_executor_probes_total"),
            lag_us: value("roost_executor_lag_microseconds_total"),
            stalls_5ms: value("roost_executor_stalls_total{over=\"5ms\"}"),
            stalls_20ms: value("roost_executor_stalls_total{over=\"20ms\"}"),
            stalls_100ms: value("roost_executor_stalls_total{over=\"100ms\"}"),
        }
    }

    /// Fetches `/metrics` from `addr` and reads the counters (None if it does not answer).
    pub async fn scrape(addr: std::net::SocketAddr) -> Option<Self> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let read = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut text = String::new();
            stream.read_to_string(&mut text).await.ok()?;
            Some(text)
        };
        let text = tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .ok()??;
        Some(Self::parse(&text))
    }

    /// What happened between `self` (earlier) and `later`, as JSON.
    pub fn since(&self, later: &Self) -> serde_json::Value {
        let probes = later.probes - self.probes;
        let mean_lag_us = if probes > 0.0 {
            (later.lag_us - self.lag_us) / probes
        } else {
            0.0
        };
        serde_json::json!({
            "probes": probes,
            "mean_lag_us": mean_lag_us,
            "stalls_over_5ms": later.stalls_5ms - self.stalls_5ms,
            "stalls_over_20ms": later.stalls_20ms - self.stalls_20ms,
            "stalls_over_100ms": later.stalls_100ms - self.stalls_100ms,
        })
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
