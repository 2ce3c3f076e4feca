//! The scenario suite on the scale-out topology: every domain served by two `roost` nodes over
//! one PostgreSQL database (a cluster the harness starts), as
//! `roost-interop run --backend postgres --nodes 2` runs it. The suite's ordinary scenarios
//! must pass unchanged there, and the scale-out scenarios prove what several nodes must keep.
#![allow(clippy::unwrap_used)]

mod common;

use common::scenario_on;
use roost_interop::harness::Storage;
use roost_interop::scenarios::Topology;

const TWO_NODES: Topology = Topology {
    storage: Storage::Postgres,
    nodes: 2,
};

macro_rules! on_two_nodes {
    ($($test:ident => $name:literal,)*) => {$(
        #[test]
        fn $test() {
            scenario_on($name, TWO_NODES);
        }
    )*};
}

on_two_nodes! {
    discovery => "discovery",
    one_to_one => "one-to-one",
    three_servers => "three-servers",
    creator_leaves => "creator-leaves",
    commit_race => "commit-race",
    recipient_down => "recipient-down",
    recipient_killed => "recipient-killed",
    hub_restart => "hub-restart",
    wrong_certificate => "wrong-certificate",
    foreign_forwarding => "foreign-forwarding",
    cross_node => "cross-node",
    node_commit_races => "node-commit-races",
    node_killed => "node-killed",
    outbox_node_killed => "outbox-node-killed",
    outgoing_queue => "outgoing-queue",
    commits_in_flight => "commits-in-flight",
    commit_after_commits_in_flight => "commit-after-commits-in-flight",
}

/// Every scenario runs on two nodes too.
#[test]
fn every_scenario_runs_on_two_nodes() {
    let source = include_str!("scale_out.rs");
    for s in roost_interop::scenarios::SCENARIOS {
        assert!(
            source.contains(&format!("=> \"{}\",", s.name)),
            "no two-node test runs scenario {}",
            s.name
        );
    }
}
