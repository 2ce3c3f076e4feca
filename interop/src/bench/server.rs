//! The homeservers a benchmark runs against: a [`Harness`] whose servers get limits that do
//! not throttle a load generator sending from one address.
//!
//! The harness writes each server's configuration with scenario limits; the bench rewrites the
//! `[limits]` and `[federation]` tables of every `config.toml` with [`BENCH_LIMITS`] and
//! restarts the servers (same port, same, still empty, data directory) before any load.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use roost_client::transport::ConnectConfig;

use crate::harness::{Harness, HarnessConfig, Storage};

/// `[limits]` of a benchmarked server: rate limits out of the way (every client of the load
/// generator registers and claims from 127.0.0.1 and sends as fast as it can), room for
/// 10,000 listeners and a 10,000-member group. Everything else keeps its default.
pub const BENCH_LIMITS: &[(&str, i64)] = &[
    ("registration_rate_per_minute", 1_000_000_000),
    ("registration_burst", 1_000_000_000),
    ("claim_rate_per_minute", 1_000_000_000),
    ("claim_burst", 1_000_000_000),
    ("send_rate_per_sec", 1_000_000_000),
    ("send_burst", 1_000_000_000),
    ("max_connections", 40_000),
    ("retry_threshold", 40_000),
    ("max_group_size", 20_000),
    ("max_frame_len", 33_554_432),
    ("shutdown_grace_ms", 2_000),
];

/// `[federation]` fields of a benchmarked server: the peer rate limit out of the way.
const BENCH_FEDERATION: &[(&str, i64)] = &[
    ("peer_rate_per_sec", 1_000_000_000),
    ("peer_burst", 1_000_000_000),
];

/// Running homeservers for a benchmark.
pub struct BenchServers {
    /// The harness (its servers run with [`BENCH_LIMITS`]).
    pub harness: Harness,
    /// Where each server serves `/metrics` (Prometheus text).
    metrics: Vec<SocketAddr>,
}

impl BenchServers {
    /// Starts `count` homeservers of `roost` in `dir` with the bench limits, on `storage`
    /// with `nodes` nodes each. Node 0 of each serves `/metrics`.
    pub async fn start(
        roost: &Path,
        dir: &Path,
        count: usize,
        storage: Storage,
        nodes: usize,
    ) -> anyhow::Result<Self> {
        let mut config = HarnessConfig::new(roost, dir, count);
        config.log_filter = Some("warn".into());
        // Under valgrind (the instructions workload) a start takes much longer.
        config.start_timeout = std::time::Duration::from_secs(180);
        config.storage = storage;
        config.nodes = nodes;
        let mut harness = Harness::start(config).await?;
        let mut metrics = Vec::with_capacity(count);
        for index in 0..count {
            for node in (0..harness.node_count(index)).rev() {
                let file = harness.node(index, node)?.config_file.clone();
                let addr = free_tcp_port()?;
                apply_bench_limits(&file, addr)?;
                if node == 0 {
                    metrics.push(addr);
                }
                harness.stop_node(index, node).await?;
            }
        }
        for index in 0..count {
            for node in 0..harness.node_count(index) {
                harness.restart_node(index, node).await?;
            }
        }
        Ok(Self { harness, metrics })
    }

    /// How clients reach node `node` of server `index` first (then the others), with the
    /// request timeout and frame size of [`BenchServers::connect_config`].
    pub fn node_connect_config(&self, index: usize, node: usize) -> anyhow::Result<ConnectConfig> {
        let mut config = self.harness.node_connect_config(index, node)?;
        config.request_timeout = std::time::Duration::from_secs(120);
        config.max_frame_len = 1 << 25;
        Ok(config)
    }

    /// Nodes of server `index`.
    pub fn nodes(&self, index: usize) -> usize {
        self.harness.node_count(index)
    }

    /// A new database on the harness's PostgreSQL cluster (for raw baselines), if it has one.
    pub fn scratch_database(&self, name: &str) -> anyhow::Result<Option<String>> {
        self.harness
            .cluster()
            .map(|cluster| cluster.create_database(name))
            .transpose()
    }

    /// The `/metrics` address of server `index`.
    pub fn metrics_addr(&self, index: usize) -> Option<SocketAddr> {
        self.metrics.get(index).copied()
    }

    /// How clients reach server `index` (trusting the harness CA), with a request timeout long
    /// enough for the largest commits.
    pub fn connect_config(&self, index: usize) -> anyhow::Result<ConnectConfig> {
        self.node_connect_config(index, 0)
    }

    /// The process id of server `index`.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.harness.server(index).ok().and_then(|s| s.pid())
    }

    /// The domain of server `index`.
    pub fn domain(&self, index: usize) -> anyhow::Result<String> {
        Ok(self.harness.server(index)?.domain.clone())
    }

    /// The data directory of server `index` (node 0).
    pub fn data_dir(&self, index: usize) -> anyhow::Result<std::path::PathBuf> {
        Ok(self.harness.server(index)?.data_dir.clone())
    }

    /// Stops server `index` (node 0) gracefully.
    pub async fn stop(&mut self, index: usize) -> anyhow::Result<()> {
        self.harness.stop_node(index, 0).await?;
        Ok(())
    }

    /// Starts server `index` (node 0) again without waiting for it to answer.
    pub fn launch(&mut self, index: usize) -> anyhow::Result<()> {
        self.harness.launch_node(index, 0)
    }

    /// Stops every server.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.harness.shutdown().await
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_tcp_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("no free TCP port")?;
    Ok(listener.local_addr()?)
}

/// Rewrites the `[limits]` and `[federation]` tables of a server configuration file and turns
/// on `/metrics` at `metrics`.
fn apply_bench_limits(file: &Path, metrics: SocketAddr) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut config: toml::Table = text
        .parse()
        .with_context(|| format!("cannot parse {}", file.display()))?;
    config.insert(
        "metrics_listen".into(),
        toml::Value::String(metrics.to_string()),
    );
    set_fields(&mut config, "limits", BENCH_LIMITS);
    set_fields(&mut config, "federation", BENCH_FEDERATION);
    let text = toml::to_string(&config).context("cannot encode a configuration")?;
    std::fs::write(file, text).with_context(|| format!("cannot write {}", file.display()))
}

fn set_fields(config: &mut toml::Table, table: &str, fields: &[(&str, i64)]) {
    let entry = config
        .entry(table)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(section) = entry {
        for (name, value) in fields {
            section.insert((*name).to_owned(), toml::Value::Integer(*value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_merged_into_the_existing_tables() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(
            &file,
            "domain = \"alpha.test\"\n[limits]\nclaim_burst = 10\nidle_timeout_ms = 5\n\
             [federation]\nenabled = true\n",
        )
        .unwrap();
        apply_bench_limits(&file, "127.0.0.1:9999".parse().unwrap()).unwrap();
        let config: toml::Table = std::fs::read_to_string(&file).unwrap().parse().unwrap();
        assert_eq!(config["domain"].as_str(), Some("alpha.test"));
        assert_eq!(config["metrics_listen"].as_str(), Some("127.0.0.1:9999"));
        assert_eq!(
            config["limits"]["claim_burst"].as_integer(),
            Some(1_000_000_000)
        );
        assert_eq!(config["limits"]["idle_timeout_ms"].as_integer(), Some(5));
        assert_eq!(config["federation"]["enabled"].as_bool(), Some(true));
        assert_eq!(
            config["federation"]["peer_burst"].as_integer(),
            Some(1_000_000_000)
        );
    }
}
