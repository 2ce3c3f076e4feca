//! The scenario suite: federation behaviour as users notice it, each scenario against fresh
//! homeserver processes ([`crate::harness`]) with SDK clients whose profiles live in the
//! scenario's temporary directory.
//!
//! Every scenario runs in its own task under its own timeout; a failure (error, panic or
//! timeout) fails that scenario only, and its directory (configurations, server logs,
//! profiles) is kept for inspection. [`run_suite`] prints one line per scenario and the
//! summary line `N passed, M failed`.

mod groups;
mod nodes;
mod outage;
mod trust;

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::harness::{Harness, HarnessConfig, ServerSpec, Storage};
use crate::member::{EVENT_TIMEOUT, Member};
use roost_client::Event;
use roost_protocol::GroupId;

/// What a scenario function returns.
pub type ScenarioFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// One scenario of the suite.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Its name (`roost-interop run --scenario NAME`).
    pub name: &'static str,
    /// What it shows.
    pub about: &'static str,
    /// The longest it may take, servers' start included.
    pub timeout: Duration,
    /// Nodes per domain it needs (1 for most; the scale-out scenarios need 2).
    pub min_nodes: usize,
    run: fn(Ctx) -> ScenarioFuture,
}

const fn scenario(
    name: &'static str,
    about: &'static str,
    timeout_secs: u64,
    run: fn(Ctx) -> ScenarioFuture,
) -> Scenario {
    Scenario {
        name,
        about,
        timeout: Duration::from_secs(timeout_secs),
        min_nodes: 1,
        run,
    }
}

const fn multi_node(
    name: &'static str,
    about: &'static str,
    timeout_secs: u64,
    run: fn(Ctx) -> ScenarioFuture,
) -> Scenario {
    Scenario {
        min_nodes: 2,
        ..scenario(name, about, timeout_secs, run)
    }
}

/// Where a suite's servers keep their data and how many nodes each domain runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// Storage engine of every server.
    pub storage: Storage,
    /// Nodes per domain (more than 1 needs PostgreSQL).
    pub nodes: usize,
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            storage: Storage::Redb,
            nodes: 1,
        }
    }
}

impl Topology {
    /// Whether `scenario` runs on this topology.
    pub fn runs(&self, scenario: &Scenario) -> bool {
        self.nodes >= scenario.min_nodes
    }
}

/// Every scenario, in the order the suite runs them.
pub const SCENARIOS: &[Scenario] = &[
    scenario(
        "discovery",
        "users and their devices are discovered across domains, AS keys relayed unchanged",
        60,
        trust::discovery,
    ),
    scenario(
        "one-to-one",
        "1:1 groups across two servers, hosted on either side, messages both ways",
        60,
        groups::one_to_one,
    ),
    scenario(
        "three-servers",
        "members on three servers with several devices: adds, removes, leave, messages",
        90,
        groups::three_servers,
    ),
    scenario(
        "creator-leaves",
        "the group lives on after its creator (on the hub's server) leaves",
        60,
        groups::creator_leaves,
    ),
    scenario(
        "commit-race",
        "members on three servers commit at once; every commit lands, all converge",
        60,
        groups::commit_race,
    ),
    scenario(
        "recipient-down",
        "recipient's server stopped while messages are sent: all arrive once after restart",
        60,
        outage::recipient_down,
    ),
    scenario(
        "recipient-killed",
        "recipient's server killed (SIGKILL) mid-burst: all arrive once after restart",
        90,
        outage::recipient_killed,
    ),
    scenario(
        "commits-in-flight",
        "commits reach a member's server late: its message refused for its epoch waits for \
         them instead of rejoining, and it misses nothing",
        90,
        outage::commits_in_flight,
    ),
    scenario(
        "commit-after-commits-in-flight",
        "a member commits while the hub's commits are still on their way to its server: the \
         commit waits for them and lands, without a rejoin",
        90,
        outage::commit_after_commits_in_flight,
    ),
    scenario(
        "hub-restart",
        "the group's hub restarts mid-conversation; the conversation and commits go on",
        60,
        outage::hub_restart,
    ),
    scenario(
        "outgoing-queue",
        "a member sends while its own server is down and the hub restarts; its queue goes out \
         in order, once, and a lost answer is not a duplicate",
        90,
        outage::outgoing_queue,
    ),
    scenario(
        "wrong-certificate",
        "a server presenting a certificate for another domain is refused both ways",
        60,
        trust::wrong_certificate,
    ),
    scenario(
        "foreign-forwarding",
        "a peer forwarding or delivering on behalf of another domain is refused",
        60,
        trust::foreign_forwarding,
    ),
    multi_node(
        "cross-node",
        "members on different nodes of two domains talk; every message pushed exactly once",
        90,
        nodes::cross_node,
    ),
    multi_node(
        "node-commit-races",
        "1,000 same-epoch commit pairs sent to two nodes at once: one winner each",
        300,
        nodes::node_commit_races,
    ),
    multi_node(
        "node-killed",
        "a node is killed under load: its clients fail over, nothing acknowledged is lost or doubled",
        180,
        nodes::node_killed,
    ),
    multi_node(
        "outbox-node-killed",
        "the node draining the outbox is killed: another node delivers, exactly once, in order",
        180,
        nodes::outbox_node_killed,
    ),
];

/// The scenario called `name`.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// What a scenario gets: the homeserver binary and a fresh directory of its own.
#[derive(Debug, Clone)]
pub struct Ctx {
    roost: PathBuf,
    dir: PathBuf,
    topology: Topology,
}

impl Ctx {
    /// A context for `dir`, starting servers from `roost` (redb, one node per domain).
    pub fn new(roost: &Path, dir: &Path) -> Self {
        Self::with_topology(roost, dir, Topology::default())
    }

    /// A context whose servers run on `topology`.
    pub fn with_topology(roost: &Path, dir: &Path, topology: Topology) -> Self {
        Self {
            roost: roost.to_owned(),
            dir: dir.to_owned(),
            topology,
        }
    }

    /// The topology the servers run on.
    pub fn topology(&self) -> Topology {
        self.topology
    }

    fn harness_config(&self, count: usize) -> HarnessConfig {
        let mut config = HarnessConfig::new(&self.roost, self.dir.join("servers"), count);
        config.storage = self.topology.storage;
        config.nodes = self.topology.nodes;
        config
    }

    /// Starts `count` federating servers (`alpha.test`, `beta.test`, ...).
    pub async fn harness(&self, count: usize) -> anyhow::Result<Harness> {
        Harness::start(self.harness_config(count)).await
    }

    /// Starts the servers `specs` describes.
    pub async fn harness_with(&self, specs: Vec<ServerSpec>) -> anyhow::Result<Harness> {
        let mut config = self.harness_config(0);
        config.servers = specs;
        Harness::start(config).await
    }

    /// Where client profiles go.
    pub fn profiles(&self) -> PathBuf {
        self.dir.join("profiles")
    }

    /// Registers `name@<domain of server>` with device `phone`.
    pub async fn member(&self, h: &Harness, server: usize, name: &str) -> anyhow::Result<Member> {
        let domain = &h.server(server)?.domain;
        std::fs::create_dir_all(self.profiles())?;
        Member::register(
            h.client_config(server)?,
            &self.profiles(),
            &format!("{name}@{domain}"),
            "phone",
        )
        .await
    }

    /// Adds `device` to `of`'s user (on server `server`, its user's server).
    pub async fn device(
        &self,
        h: &Harness,
        server: usize,
        of: &Member,
        device: &str,
    ) -> anyhow::Result<Member> {
        of.add_device(h.client_config(server)?, &self.profiles(), device)
            .await
    }
}

/// The result of one scenario.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The scenario's name.
    pub name: &'static str,
    /// Whether it passed.
    pub passed: bool,
    /// How long it took.
    pub elapsed: Duration,
    /// Why it failed (and where its directory was kept).
    pub error: Option<String>,
}

impl Outcome {
    /// `name  PASS  1.23s` (the line `roost-interop run` prints).
    pub fn line(&self) -> String {
        format!(
            "{:<20} {}  {:>6.2}s",
            self.name,
            if self.passed { "PASS" } else { "FAIL" },
            self.elapsed.as_secs_f64()
        )
    }
}

/// Runs one scenario in a fresh temporary directory (kept if it fails).
pub async fn run_scenario(roost: &Path, scenario: &Scenario, topology: Topology) -> Outcome {
    let started = Instant::now();
    let dir = match tempfile::Builder::new()
        .prefix(&format!("roost-interop-{}-", scenario.name))
        .tempdir()
    {
        Ok(dir) => dir,
        Err(err) => {
            return Outcome {
                name: scenario.name,
                passed: false,
                elapsed: started.elapsed(),
                error: Some(format!("cannot create a temporary directory: {err}")),
            };
        }
    };
    let ctx = Ctx::with_topology(roost, dir.path(), topology);
    let task = tokio::spawn(tokio::time::timeout(scenario.timeout, (scenario.run)(ctx)));
    let result = match task.await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(err))) => Err(format!("{err:#}")),
        Ok(Err(_)) => Err(format!("timed out after {:?}", scenario.timeout)),
        Err(join) if join.is_panic() => Err(format!("panicked: {join}")),
        Err(join) => Err(format!("task failed: {join}")),
    };
    let elapsed = started.elapsed();
    match result {
        Ok(()) => Outcome {
            name: scenario.name,
            passed: true,
            elapsed,
            error: None,
        },
        Err(error) => {
            let kept = dir.keep();
            Outcome {
                name: scenario.name,
                passed: false,
                elapsed,
                error: Some(format!("{error}\n(files kept in {})", kept.display())),
            }
        }
    }
}

/// Runs the scenarios of `topology` (all that run on it, or the one named `only`) one after
/// another, printing a line per scenario (with the error under a failed one) and then
/// `N passed, M failed`. The scale-out scenarios belong to suites of two nodes or more.
pub async fn run_suite(
    roost: &Path,
    only: Option<&str>,
    topology: Topology,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<Vec<Outcome>> {
    let selected: Vec<&Scenario> = match only {
        Some(name) => {
            let scenario = find(name).with_context(|| {
                let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
                format!("no scenario {name:?}; scenarios: {}", names.join(", "))
            })?;
            if !topology.runs(scenario) {
                anyhow::bail!(
                    "{name} needs {} nodes per domain: --backend postgres --nodes {}",
                    scenario.min_nodes,
                    scenario.min_nodes
                );
            }
            vec![scenario]
        }
        None => SCENARIOS.iter().filter(|s| topology.runs(s)).collect(),
    };
    let mut outcomes = Vec::with_capacity(selected.len());
    for scenario in selected {
        let outcome = run_scenario(roost, scenario, topology).await;
        writeln!(out, "{}", outcome.line())?;
        if let Some(error) = &outcome.error {
            for line in error.lines() {
                writeln!(out, "    {line}")?;
            }
        }
        out.flush()?;
        outcomes.push(outcome);
    }
    writeln!(out, "{}", summary(&outcomes))?;
    Ok(outcomes)
}

/// `N passed, M failed`.
pub fn summary(outcomes: &[Outcome]) -> String {
    let passed = outcomes.iter().filter(|o| o.passed).count();
    format!("{passed} passed, {} failed", outcomes.len() - passed)
}

/// `from` sends `text` to `group`; waits until every member of `to` received it.
pub(crate) async fn deliver(
    group: &GroupId,
    from: &Member,
    text: &str,
    to: &[&Member],
) -> anyhow::Result<()> {
    from.client()
        .send(group, text.as_bytes())
        .await
        .with_context(|| format!("{} sending {text:?}", from.id()))?;
    for member in to {
        received(member, group, from, text).await?;
    }
    Ok(())
}

/// Waits until `member` received `text` from `from` in `group`.
pub(crate) async fn received(
    member: &Member,
    group: &GroupId,
    from: &Member,
    text: &str,
) -> anyhow::Result<()> {
    let sender = from.id().clone();
    member
        .wait_until(
            &format!("message {text:?} from {sender}"),
            EVENT_TIMEOUT,
            |events| {
                events
                    .iter()
                    .any(|e| {
                        matches!(e, Event::Message { group: g, sender: s, bytes, .. }
                            if g == group && *s == sender && bytes == text.as_bytes())
                    })
                    .then_some(())
            },
        )
        .await
}

/// Fails if any member received some message of `group` more than once (every scenario
/// sends distinct texts).
pub(crate) fn each_once(group: &GroupId, members: &[&Member]) -> anyhow::Result<()> {
    for member in members {
        let mut seen = std::collections::BTreeSet::new();
        for (sender, bytes) in member.messages(group) {
            check(seen.insert((sender.clone(), bytes.clone())), || {
                format!(
                    "{} received {:?} from {sender} twice",
                    member.id(),
                    String::from_utf8_lossy(&bytes)
                )
            })?;
        }
    }
    Ok(())
}

/// Fails with `what` unless `condition` holds.
pub(crate) fn check(condition: bool, what: impl FnOnce() -> String) -> anyhow::Result<()> {
    if condition {
        Ok(())
    } else {
        Err(anyhow::anyhow!(what()))
    }
}

/// [`barrier`] from each of `members` to the others: afterwards every message any of them sent
/// before the call, and any duplicate of one, has been processed by all of them.
pub(crate) async fn quiesce(group: &GroupId, members: &[&Member]) -> anyhow::Result<()> {
    for (i, from) in members.iter().enumerate() {
        let others: Vec<&Member> = members
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, m)| *m)
            .collect();
        barrier(group, from, &others).await?;
    }
    Ok(())
}

/// Returns once everything sent to `members` in `group` before the call has arrived: `from`
/// (a member) sends a marker and each of `members` waits for it. A recipient's queue is
/// ordered, and so is the outbox towards each domain, so anything queued for a recipient
/// before the marker — a late message, a duplicate — is processed before the marker is. What
/// is checked after a barrier does not depend on how long anything took. Markers are not
/// counted by `Member::messages` or `texts`.
pub(crate) async fn barrier(
    group: &GroupId,
    from: &Member,
    members: &[&Member],
) -> anyhow::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut marker = crate::member::BARRIER_PREFIX.to_vec();
    marker.extend_from_slice(format!("{n}").as_bytes());
    from.client()
        .send(group, &marker)
        .await
        .with_context(|| format!("{} sending barrier {n}", from.id()))?;
    let sender = from.id().clone();
    for member in members {
        member
            .wait_until(
                &format!("barrier {n} from {sender}"),
                EVENT_TIMEOUT,
                |events| {
                    events
                        .iter()
                        .any(|e| {
                            matches!(e, Event::Message { group: g, sender: s, bytes, .. }
                            if g == group && s == &sender && bytes == &marker)
                        })
                        .then_some(())
                },
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_the_summary_is_exact() {
        let mut names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SCENARIOS.len());
        assert!(find("hub-restart").is_some());
        assert!(find("nope").is_none());
        let outcome = |passed| Outcome {
            name: "x",
            passed,
            elapsed: Duration::from_millis(1500),
            error: None,
        };
        assert_eq!(
            summary(&[outcome(true), outcome(false), outcome(true)]),
            "2 passed, 1 failed"
        );
        assert_eq!(outcome(true).line(), "x                    PASS    1.50s");
    }
}
