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
    smoke_with(domains, cycles, seed, 0)
}

fn smoke_with(domains: usize, cycles: usize, seed: u64, killed_clients: usize) -> ChaosReport {
    smoke_config(domains, cycles, seed, killed_clients, |_| {})
}

/// One smoke at a time: each asserts that its kinds of traffic happened (a key update went
/// through, files were sent), which a run sharing the two cores with another may not reach.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn smoke_config(
    domains: usize,
    cycles: usize,
    seed: u64,
    killed_clients: usize,
    adjust: impl FnOnce(&mut ChaosConfig),
) -> ChaosReport {
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut config = ChaosConfig::new(common::roost());
    config.killed_clients = killed_clients;
    // Their key updates (self-update commits) often enough that a short run has some.
    config.client_updates = 0.3;
    // And invite or remove the rover now and then (m0 does too).
    config.client_membership = 0.15;
    // Attachments often enough that a short run has several (uploads and downloads across
    // the kills; with two domains, downloads through the other homeserver).
    config.files = 0.1;
    config.client_up = (Duration::from_millis(200), Duration::from_millis(1_000));
    config.cycles = cycles;
    config.clients = 3;
    config.domains = domains;
    config.seed = seed;
    config.up = (Duration::from_millis(300), Duration::from_millis(1_000));
    config.down = (Duration::ZERO, Duration::from_millis(300));
    config.commit_interval = (Duration::from_millis(200), Duration::from_millis(800));
    config.settle_timeout = Duration::from_secs(60);
    config.progress = false;
    adjust(&mut config);
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
    // Attachments went out, and every one received was downloaded byte-identical (passed()
    // fails on a corrupt or undownloadable one; this says some were there to check).
    let f = &report.files;
    assert!(f.sent > 0 && f.received > 0, "no attachment: {report:?}");
    assert_eq!(f.downloaded, f.received, "{report:?}");
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

/// Members whose `roost-cli chat` processes are SIGKILLed at random (writing their profiles,
/// sending, printing) and restarted on the same profile, while the homeserver is killed too:
/// what `chat` answered `queued` is delivered exactly once, the only event a restarted
/// process hands out again is the one its killed predecessor was printing, and their key
/// updates (`/update`) and their invites and removals of the rover (`/invite`, `/remove`),
/// killed at any point of them too, leave every member in the group; their
/// files (`/file`, killed mid-upload too) arrive like their lines, and every file their chats
/// are shown is saved (killed mid-download too).
#[test]
fn killed_members_lose_and_duplicate_nothing() {
    // Eight cycles: the members type only while the kills go on, and each kind of line
    // (message, /update, /invite or /remove, /file) is drawn at random, so a short run may
    // not type every kind.
    let report = smoke_with(1, 8, 17, 2);
    let kills = &report.member_kills;
    assert!(kills.kills >= 2, "{report:?}");
    assert!(kills.starts > kills.kills, "{report:?}");
    assert!(
        kills.acknowledged > 0,
        "the killed members sent nothing: {report:?}"
    );
    assert!(kills.repeated <= kills.kills, "{report:?}");
    assert!(kills.updated > 0, "no key update went through: {report:?}");
    assert!(
        kills.membership_done + kills.membership_refused + kills.membership_unknown > 0,
        "no /invite or /remove typed: {report:?}"
    );
    assert_eq!(report.group_errors, 0, "{report:?}");
    let t = &report.deliveries;
    assert_eq!(
        (t.lost, t.duplicated, t.out_of_order, t.phantom, t.partial),
        (0, 0, 0, 0, 0)
    );
    // Three members, the rover and the two killed members each sent once more afterwards.
    assert_eq!(report.sent_after, 6);
    let f = &report.files;
    assert!(f.sent > 0 && f.received > 0, "no attachment: {report:?}");
    assert_eq!(f.downloaded, f.received, "{report:?}");
    // The killed members' chats (`--download-dir`) saved every file they showed.
    assert!(f.saved_by_killed > 0, "{report:?}");
    assert_eq!(f.not_saved_by_killed, 0, "{report:?}");
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["member_kills"]["kills"].as_u64().is_some(), "{json}");
}

/// Two nodes on PostgreSQL, and the database server itself killed (as a crash) in half the
/// cycles: the nodes answer UNAVAILABLE meanwhile and recover by themselves once it is back;
/// nothing acknowledged is lost, files uploaded before a kill are downloaded after it.
#[test]
fn database_kills_under_load_lose_and_duplicate_nothing() {
    let report = smoke_config(1, 6, 19, 1, |config| {
        config.storage = roost_interop::harness::Storage::Postgres;
        config.nodes = 2;
        config.database_kills = 0.5;
    });
    assert!(report.database_kills > 0, "{report:?}");
    assert_eq!(report.restarts, report.kills);
    let t = &report.deliveries;
    assert!(t.acknowledged > 0, "nothing was sent: {report:?}");
    assert_eq!(
        (t.lost, t.duplicated, t.out_of_order, t.phantom, t.partial),
        (0, 0, 0, 0, 0)
    );
    assert_eq!(report.group_errors, 0, "{report:?}");
    // Three members, the rover and the killed member each sent once more afterwards.
    assert_eq!(report.sent_after, 5);
    assert_eq!(report.files.downloaded, report.files.received, "{report:?}");
}
