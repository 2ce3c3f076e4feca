//! The federation scenario suite of roost-interop, one test per scenario: real `roost`
//! processes on 127.0.0.1 (two or three per scenario) federating over QUIC with certificates
//! from a CA the harness makes, and SDK clients.
#![allow(clippy::unwrap_used)]

mod common;

use common::scenario;

#[test]
fn discovery() {
    scenario("discovery");
}

#[test]
fn one_to_one() {
    scenario("one-to-one");
}

#[test]
fn three_servers() {
    scenario("three-servers");
}

#[test]
fn creator_leaves() {
    scenario("creator-leaves");
}

#[test]
fn commit_race() {
    scenario("commit-race");
}

#[test]
fn recipient_down() {
    scenario("recipient-down");
}

#[test]
fn recipient_killed() {
    scenario("recipient-killed");
}

#[test]
fn commits_in_flight() {
    scenario("commits-in-flight");
}

#[test]
fn commit_after_commits_in_flight() {
    scenario("commit-after-commits-in-flight");
}

#[test]
fn hub_restart() {
    scenario("hub-restart");
}

#[test]
fn outgoing_queue() {
    scenario("outgoing-queue");
}

#[test]
fn wrong_certificate() {
    scenario("wrong-certificate");
}

#[test]
fn foreign_forwarding() {
    scenario("foreign-forwarding");
}

/// A scenario added to the suite needs a test here too (scale-out scenarios, which need two
/// nodes per domain, are in scale_out.rs).
#[test]
fn every_scenario_has_a_test() {
    let source = include_str!("federation.rs");
    for s in roost_interop::scenarios::SCENARIOS
        .iter()
        .filter(|s| s.min_nodes == 1)
    {
        assert!(
            source.contains(&format!("scenario(\"{}\")", s.name)),
            "no test runs scenario {}",
            s.name
        );
    }
}
