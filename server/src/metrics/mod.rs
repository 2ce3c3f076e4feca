//! What the server exports for Prometheus: the catalogue of every series (name, type, help
//! text), the process-wide recorder that renders them, the executor probe, and the gauges
//! read from storage (users, clients, groups, queued messages, outbox backlog per peer).
//! [`http`] serves them, with `/health`, when `metrics_listen` is configured.

mod http;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::task::TaskTracker;

use crate::State;
use crate::admin::store::AdminStore as _;

/// What kind of series a metric is (its `# TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    /// Rendered as a Prometheus histogram (`_bucket`, `_sum`, `_count`) when [`BUCKETS`] lists
    /// it, as a summary (quantiles, `_sum`, `_count`) otherwise.
    Histogram,
}

/// One exported metric: its name, kind, and `# HELP` text.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Metric {
    pub(crate) name: &'static str,
    pub(crate) kind: Kind,
    pub(crate) help: &'static str,
    /// Whether every series of it carries labels (it appears once the first labelled value is
    /// recorded); the others are exported from the start, at zero.
    pub(crate) labelled: bool,
}

const fn m(name: &'static str, kind: Kind, help: &'static str) -> Metric {
    Metric {
        name,
        kind,
        help,
        labelled: false,
    }
}

const fn l(name: &'static str, kind: Kind, help: &'static str) -> Metric {
    Metric {
        name,
        kind,
        help,
        labelled: true,
    }
}

/// Every metric the server records. A metric recorded anywhere must be listed here (the
/// tests in `http` check that every series served has a `# HELP` line).
pub(crate) const CATALOGUE: &[Metric] = &[
    l(
        "roost_build_info",
        Kind::Gauge,
        "Always 1; the labels say which build runs (version, profile).",
    ),
    l(
        "roost_requests_total",
        Kind::Counter,
        "Client requests handled, by request kind and outcome (OK or the error code name).",
    ),
    l(
        "roost_request_duration_seconds",
        Kind::Histogram,
        "Time from a decoded client request to its answer, by request kind.",
    ),
    l(
        "roost_bad_frames_total",
        Kind::Counter,
        "Request frames refused before dispatch (malformed, too large, too slow), by error code.",
    ),
    m(
        "roost_connections",
        Kind::Gauge,
        "Client and federation QUIC connections open now.",
    ),
    m(
        "roost_connections_refused_total",
        Kind::Counter,
        "QUIC connections refused because limits.max_connections was reached.",
    ),
    m(
        "roost_listeners",
        Kind::Gauge,
        "Queue listen streams open now.",
    ),
    m(
        "roost_listen_acks_total",
        Kind::Counter,
        "Acknowledgements received on listen streams.",
    ),
    l(
        "roost_group_state_bytes_total",
        Kind::Counter,
        "Bytes of hosted groups' states written durably, by form: full (a new base) or delta.",
    ),
    l(
        "roost_group_state_writes_total",
        Kind::Counter,
        "Writes of hosted groups' states, by form: full (a new base) or delta.",
    ),
    m(
        "roost_fanout_recipients",
        Kind::Histogram,
        "Queues a message or commit reached (local and remote recipients) per accepted send.",
    ),
    m(
        "roost_queue_depth",
        Kind::Histogram,
        "Depth of the deepest queue written by one enqueue, after the enqueue.",
    ),
    m(
        "roost_queue_full_drops_total",
        Kind::Counter,
        "Messages not delivered to a recipient because its queue was full (limits.max_queue_depth).",
    ),
    m(
        "roost_repeated_requests_total",
        Kind::Counter,
        "Submissions repeated within the receipt window, answered from the receipt.",
    ),
    m(
        "roost_group_moved_retries_total",
        Kind::Counter,
        "DS operations run again because the group's state moved on under them (another node's write) or their write found them applied already (a repeated send).",
    ),
    m(
        "roost_credential_check_timeouts_total",
        Kind::Counter,
        "Commits refused because a remote AS did not confirm a new member's credential in time.",
    ),
    l(
        "roost_federation_forwarded_total",
        Kind::Counter,
        "Requests forwarded to another homeserver, by request kind.",
    ),
    m(
        "roost_federation_delivered_total",
        Kind::Counter,
        "Outbox deliveries (one per recipient) accepted by the receiving homeserver.",
    ),
    m(
        "roost_federation_dropped_total",
        Kind::Counter,
        "Outbox deliveries (one per recipient) refused for good by the receiving homeserver.",
    ),
    m(
        "roost_federation_expired_total",
        Kind::Counter,
        "Outbox deliveries (one per recipient) dropped as older than limits.max_message_age_secs.",
    ),
    l(
        "roost_outbox_batch",
        Kind::Gauge,
        "Entries in the last outbox batch sent to a peer homeserver, by domain.",
    ),
    l(
        "roost_outbox_backlog",
        Kind::Gauge,
        "Outbox entries waiting for a peer homeserver, by domain (each is one message for up to \
         1,024 recipients); configured peers show 0 when nothing waits. Refreshed every 15 s.",
    ),
    l(
        "roost_storage_failures_total",
        Kind::Counter,
        "Storage operations that failed (I/O error, lost connection, timeout), by engine.",
    ),
    m(
        "roost_users",
        Kind::Gauge,
        "Registered local users, deactivated ones included. Refreshed every 15 s.",
    ),
    m(
        "roost_users_deactivated",
        Kind::Gauge,
        "Deactivated local users. Refreshed every 15 s.",
    ),
    m(
        "roost_clients",
        Kind::Gauge,
        "Active (not removed) clients of local users. Refreshed every 15 s.",
    ),
    m(
        "roost_groups",
        Kind::Gauge,
        "Groups hosted by this homeserver. Refreshed every 15 s.",
    ),
    m(
        "roost_queued_messages",
        Kind::Gauge,
        "Messages waiting in local clients' queues. Refreshed every 15 s.",
    ),
    m(
        "roost_stats_refresh_seconds",
        Kind::Gauge,
        "How long the last refresh of the storage gauges took (the next follows after 15 s or 100 times this, whichever is longer).",
    ),
    m(
        "roost_executor_probes_total",
        Kind::Counter,
        "Executor probes run (one every 10 ms).",
    ),
    m(
        "roost_executor_lag_microseconds_total",
        Kind::Counter,
        "Sum of the probes' lateness; divided by roost_executor_probes_total it is the mean lag.",
    ),
    l(
        "roost_executor_stalls_total",
        Kind::Counter,
        "Probes that ran later than the `over` threshold (the async executor was blocked or saturated).",
    ),
    m(
        "roost_executor_lag_seconds",
        Kind::Histogram,
        "Lateness of the executor probe.",
    ),
    m(
        "roost_blob_uploaded_bytes_total",
        Kind::Counter,
        "Bytes of blobs stored (uploads that completed and were answered).",
    ),
    m(
        "roost_blob_downloaded_bytes_total",
        Kind::Counter,
        "Bytes of blobs served, to clients and to peers.",
    ),
    m(
        "roost_blob_proxied_total",
        Kind::Counter,
        "Blob downloads fetched from another domain's homeserver for a client of ours.",
    ),
    m(
        "roost_pending_fanouts_dropped_total",
        Kind::Counter,
        "Pending commit fan-outs dropped because their record did not decode (stays 0).",
    ),
    l(
        "roost_push_total",
        Kind::Counter,
        "Push wake-ups, by outcome: sent, retry, gone (registration dropped), failed, not_needed.",
    ),
    m(
        "roost_push_connections_total",
        Kind::Counter,
        "HTTP/2 connections opened to APNs (one is kept and reused; more mean it failed or was closed).",
    ),
    m(
        "roost_push_recovered_total",
        Kind::Counter,
        "Push wake-ups scheduled by the recovery sweep: lost by a node that stopped between a queue commit and the push outbox.",
    ),
];

/// Histogram buckets of the metrics rendered as Prometheus histograms (aggregatable across
/// nodes); every other histogram is a summary.
const BUCKETS: &[(&str, &[f64])] = &[
    (
        "roost_request_duration_seconds",
        &[
            0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ],
    ),
    (
        "roost_fanout_recipients",
        &[
            1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 2_000.0, 5_000.0,
            10_000.0,
        ],
    ),
    (
        "roost_queue_depth",
        &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0],
    ),
];

/// How often the storage gauges are read again (at least: see [`stats_wait`]).
const STATS_PERIOD: Duration = Duration::from_secs(15);

/// A read of the storage counts is followed by at least this many times its own duration
/// before the next, so that counting takes at most 1 % of one core however much is stored.
const STATS_SPACING: u32 = 100;

/// The wait before the next read of the storage counts when the last took `took`:
/// [`STATS_PERIOD`], or [`STATS_SPACING`] times `took` where that is longer (redb reads the
/// counts of 10,000 users in ≈ 7 ms, well inside the period; of a million, in ≈ 0.7 s).
fn stats_wait(took: Duration) -> Duration {
    STATS_PERIOD.max(took.saturating_mul(STATS_SPACING))
}

/// The process-wide recorder's handle, installed on first use. Metrics are process-wide:
/// every server in a process (tests) renders the same recorder.
fn handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Refused only for an empty bucket list, which BUCKETS has none of (a unit test
            // checks); were it to happen, every histogram would be a summary.
            let builder = BUCKETS
                .iter()
                .try_fold(PrometheusBuilder::new(), |builder, (name, buckets)| {
                    builder.set_buckets_for_metric(Matcher::Full((*name).to_owned()), buckets)
                })
                .unwrap_or_else(|err| {
                    tracing::warn!(%err, "histogram buckets refused; histograms are summaries");
                    PrometheusBuilder::new()
                });
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "another metrics recorder is installed in this process; /metrics shows none of it"
                );
            }
            for metric in CATALOGUE {
                describe(metric);
            }
            handle
        })
        .clone()
}

fn describe(metric: &Metric) {
    let (name, help) = (metric.name, metric.help);
    match metric.kind {
        Kind::Counter => metrics::describe_counter!(name, help),
        Kind::Gauge => metrics::describe_gauge!(name, help),
        Kind::Histogram => metrics::describe_histogram!(name, help),
    }
}

/// Registers the series known at start so that they are exported (at zero) before anything
/// happens: a dashboard shows 0 rather than "no data", and `rate()` sees the first increase.
fn register_initial_series(state: &State) {
    for metric in CATALOGUE.iter().filter(|metric| !metric.labelled) {
        match metric.kind {
            Kind::Counter => metrics::counter!(metric.name).increment(0),
            Kind::Gauge => metrics::gauge!(metric.name).increment(0.0),
            Kind::Histogram => {
                // Registering is enough: the empty histogram is rendered with zero counts.
                let _registered = metrics::histogram!(metric.name);
            }
        }
    }
    metrics::gauge!(
        "roost_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "profile" => if cfg!(debug_assertions) { "debug" } else { "release" },
    )
    .set(1.0);
    for (over, _) in STALL_LIMITS {
        metrics::counter!("roost_executor_stalls_total", "over" => over).increment(0);
    }
    metrics::counter!("roost_storage_failures_total", "engine" => state.store.engine())
        .increment(0);
}

/// Installs the recorder (once per process), starts the executor probe and the storage
/// gauges, and serves HTTP on `addr`. Returns the bound address.
pub(crate) async fn start(
    addr: SocketAddr,
    state: Arc<State>,
    tracker: &TaskTracker,
) -> std::io::Result<SocketAddr> {
    let handle = handle();
    register_initial_series(&state);
    let bound = http::serve(addr, state.clone(), handle, tracker).await?;
    tracing::info!(addr = %bound, "metrics and health listening");
    spawn_executor_probe(state.clone(), tracker);
    tracker.spawn(refresh_store_gauges(state));
    Ok(bound)
}

/// Sets the storage gauges at start and then every [`STATS_PERIOD`] from [`AdminStore::stats`]
/// (crate::admin::store::AdminStore::stats), the counts `roost admin stats` shows. Its cost
/// grows with the data (redb counts users, clients, queue heads and outbox entries by reading
/// them; PostgreSQL runs `count(*)` on the same tables), so it runs in the background rather
/// than on every scrape (a scrape never waits for storage), and a slow read spaces the next
/// ([`stats_wait`]): the figures are at most [`STATS_PERIOD`] old, or 100 times the read's
/// duration where that is longer (of the shorter of the last two reads; after a failed read,
/// [`STATS_PERIOD`]).
async fn refresh_store_gauges(state: Arc<State>) {
    let configured: BTreeSet<String> = state.settings.federation.peers.keys().cloned().collect();
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut wait = Duration::ZERO;
    // The duration of the last successful read: a read is spaced by the shorter of its own
    // and this one, so that one stalled read (a paused machine) does not leave the gauges
    // stale for long, while a store whose reads are all slow is still read seldom.
    let mut last_took: Option<Duration> = None;
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let started = Instant::now();
        let read = state.store.stats().await;
        let took = started.elapsed();
        let stats = match read {
            Ok(stats) => stats,
            Err(err) => {
                // A failed read (a database away) says nothing about the data's size.
                tracing::warn!(%err, "cannot read the counts for /metrics");
                wait = STATS_PERIOD;
                continue;
            }
        };
        wait = stats_wait(last_took.map_or(took, |last| last.min(took)));
        last_took = Some(took);
        metrics::gauge!("roost_stats_refresh_seconds").set(took.as_secs_f64());
        metrics::gauge!("roost_users").set(stats.users as f64);
        metrics::gauge!("roost_users_deactivated").set(stats.deactivated_users as f64);
        metrics::gauge!("roost_clients").set(stats.clients as f64);
        metrics::gauge!("roost_groups").set(stats.groups as f64);
        metrics::gauge!("roost_queued_messages").set(stats.queued_messages as f64);
        // A domain whose backlog drained shows 0 rather than its last count.
        let mut now: BTreeSet<String> = configured.clone();
        for (domain, waiting) in &stats.outbox {
            metrics::gauge!("roost_outbox_backlog", "domain" => domain.clone())
                .set(*waiting as f64);
            now.insert(domain.clone());
        }
        for domain in now.iter().chain(&reported) {
            if !stats.outbox.iter().any(|(d, _)| d == domain) {
                metrics::gauge!("roost_outbox_backlog", "domain" => domain.clone()).set(0.0);
            }
        }
        reported = now;
    }
}

/// How long the executor probe sleeps between two measurements.
const PROBE_PERIOD: Duration = Duration::from_millis(10);

/// Lateness above which a probe counts as a stall, by label.
const STALL_LIMITS: [(&str, Duration); 3] = [
    ("5ms", Duration::from_millis(5)),
    ("20ms", Duration::from_millis(20)),
    ("100ms", Duration::from_millis(100)),
];

/// Measures whether the async executor keeps up: a task asks to be woken [`PROBE_PERIOD`]
/// from now and records how much later it actually runs. Work that blocks a worker thread
/// (a store call or MLS processing on the executor instead of a blocking thread) or a
/// saturated runtime shows up as lag. Exported as `roost_executor_probes_total`,
/// `roost_executor_lag_microseconds_total` (their ratio is the mean lag),
/// `roost_executor_stalls_total{over}` and the `roost_executor_lag_seconds` summary. The
/// timer's 1 ms resolution is part of every reading.
fn spawn_executor_probe(state: Arc<State>, tracker: &TaskTracker) {
    tracker.spawn(async move {
        loop {
            let asked = Instant::now();
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tokio::time::sleep(PROBE_PERIOD) => {}
            }
            let lag = asked.elapsed().saturating_sub(PROBE_PERIOD);
            metrics::counter!("roost_executor_probes_total").increment(1);
            metrics::counter!("roost_executor_lag_microseconds_total")
                .increment(u64::try_from(lag.as_micros()).unwrap_or(u64::MAX));
            for (label, limit) in STALL_LIMITS {
                if lag > limit {
                    metrics::counter!("roost_executor_stalls_total", "over" => label).increment(1);
                }
            }
            metrics::histogram!("roost_executor_lag_seconds").record(lag.as_secs_f64());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_read_of_the_storage_counts_spaces_the_next_to_keep_counting_under_one_percent() {
        assert_eq!(stats_wait(Duration::ZERO), STATS_PERIOD);
        assert_eq!(stats_wait(Duration::from_millis(45)), STATS_PERIOD);
        assert_eq!(stats_wait(Duration::from_millis(150)), STATS_PERIOD);
        assert_eq!(
            stats_wait(Duration::from_millis(2_500)),
            Duration::from_secs(250)
        );
        assert_eq!(stats_wait(Duration::MAX), Duration::MAX);
    }

    /// Every `roost_*` metric name recorded in the server's sources, found by reading them.
    fn recorded_in_sources() -> BTreeSet<String> {
        fn walk(dir: &std::path::Path, out: &mut BTreeSet<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for macro_name in ["counter!(", "gauge!(", "histogram!("] {
                        for (at, _) in text.match_indices(macro_name) {
                            let rest = text[at + macro_name.len()..].trim_start();
                            if let Some(name) = rest
                                .strip_prefix('"')
                                .and_then(|r| r.split_once('"'))
                                .map(|(name, _)| name)
                                .filter(|name| name.starts_with("roost_"))
                            {
                                out.insert(name.to_owned());
                            }
                        }
                    }
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut out,
        );
        out
    }

    #[test]
    fn every_recorded_metric_is_in_the_catalogue() {
        let listed: BTreeSet<String> = CATALOGUE.iter().map(|m| m.name.to_owned()).collect();
        assert_eq!(listed.len(), CATALOGUE.len(), "a metric is listed twice");
        let recorded = recorded_in_sources();
        assert!(recorded.len() > 20, "{recorded:?}");
        let missing: Vec<_> = recorded.difference(&listed).collect();
        assert!(
            missing.is_empty(),
            "recorded but not described: {missing:?}"
        );
        let unused: Vec<_> = listed.difference(&recorded).collect();
        assert!(
            unused.is_empty(),
            "described but never recorded: {unused:?}"
        );
    }

    #[test]
    fn bucketed_metrics_are_histograms_with_increasing_bounds() {
        for (name, buckets) in BUCKETS {
            let metric = CATALOGUE.iter().find(|m| m.name == *name).unwrap();
            assert_eq!(metric.kind, Kind::Histogram, "{name}");
            assert!(!buckets.is_empty(), "{name}");
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{name}");
        }
    }
}
