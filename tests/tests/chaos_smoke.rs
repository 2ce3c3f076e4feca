//! CI smoke run of `roost-interop chaos`: a few kill -9 cycles against real `roost` processes
//! while SDK clients send numbered messages and commit membership changes. Every check of
//! the long run applies: every acknowledged message delivered exactly once in each sender's
//! order, nothing phantom, every killed server back with its database, every member able to
//! send afterwards. docs/RELIABILITY.md records the long runs.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use roost_interop::chaos::{self, ChaosConfig, ChaosReport};

fn smoke(domains: usize, cycles: usize, seed: u64) -> ChaosReport {
    let mut config = ChaosConfig::new(common::roost());
    config.cycles = cycles;
    config.clients = 3;
    config.domains = domains;
    config.seed = seed;
    config.up = (Duration::from_millis(300), Duration::from_millis(1_000));
    config.down = (Duration::ZERO, Duration::from_millis(300));
    config.commit_interval = (Duration::from_millis(200), Duration::from_millis(800));
    config.settle_timeout = Duration::from_secs(60);
    config.progress = false;
    let report = common::runtime().block_on(chaos::run(config)).unwrap();
    let mut text = Vec::new();
    report.write_text(&mut text).unwrap();
    println!("{}", String::from_utf8_lossy(&text));
    assert!(
        report.passed(),
        "chaos smoke failed:\n{}",
        String::from_utf8_lossy(&text)
    );
    report
}

/// Federation: two domains, the hub and the other killed at random, sometimes the hub right
/// after the other came back.
#[test]
fn kill_cycles_lose_and_duplicate_nothing() {
    let report = smoke(2, 4, 13);
    assert_eq!(report.cycles, 4);
    // Each cycle killed at least one process, and every kill was followed by a restart that
    // answered (the database reopened).
    assert!(report.kills >= 4, "{report:?}");
    assert_eq!(report.restarts, report.kills);
    assert!(report.restart_failures.is_empty());
    let t = &report.deliveries;
    assert!(t.acknowledged > 0, "nothing was sent: {report:?}");
    assert!(t.received >= t.acknowledged, "{report:?}");
    assert_eq!(
        (t.lost, t.duplicated, t.out_of_order, t.phantom, t.partial),
        (0, 0, 0, 0, 0)
    );
    assert!(
        report.commits.acknowledged > 0,
        "no membership commit: {report:?}"
    );
    // Three members and the rover each sent once more, and everyone got it.
    assert_eq!(report.sent_after, 4);
    // The report is machine-readable with the figures docs/RELIABILITY.md records.
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "cycles",
        "kills",
        "acknowledged",
        "unknown",
        "lost",
        "duplicated",
        "out_of_order",
        "phantom",
        "elapsed_secs",
    ] {
        assert!(json.get(key).is_some(), "{key} missing in {json}");
    }
}
