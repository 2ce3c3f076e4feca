//! CI smoke run of the load generator (`roost-interop bench`): every workload with tiny
//! parameters against real `roost` processes, in a few seconds. It checks that the bench keeps
//! working and reports what it should; it asserts nothing about speed.
#![allow(clippy::unwrap_used)]

mod common;

use roost_interop::bench::{self, BenchConfig, WORKLOADS};
use roost_interop::harness::Storage;

#[test]
fn every_workload_runs_and_reports() {
    let config = BenchConfig {
        roost: Some(common::roost()),
        ..BenchConfig::smoke()
    };
    let results = bench::run(config).unwrap();
    for workload in WORKLOADS {
        assert!(
            results.iter().any(|r| r.workload == workload),
            "no result for {workload}"
        );
    }
    for r in &results {
        assert!(r.ops_per_sec > 0.0, "{} measured nothing", r.workload);
        // alpha's executor probe ran while the workload did.
        let probes = r.details["alpha_executor"]["probes"].as_f64();
        assert!(probes.is_some_and(|p| p > 0.0), "{r:?}");
        assert!(r.p50_us <= r.p99_us && r.p99_us <= r.p999_us);
        assert!(!r.baseline.is_empty() && r.baseline_value > 0.0, "{r:?}");
        assert!(r.server_peak_rss_bytes > 0, "{r:?}");
    }
    // Correctness, not speed: no KeyPackage was handed out twice.
    let claims = results
        .iter()
        .find(|r| r.workload == "keypackages")
        .unwrap();
    assert_eq!(claims.details["duplicates"], 0, "{claims:?}");
    assert_eq!(claims.details["refused"], 0, "{claims:?}");

    // The new workloads' own checks.
    let find = |workload: &str| results.iter().find(|r| r.workload == workload).unwrap();
    let busy = find("busy-group");
    assert_eq!(busy.details["recipients_out_of_order"], 0, "{busy:?}");
    assert!(busy.details["messages"].as_u64().unwrap() > 0, "{busy:?}");
    let idle = results
        .iter()
        .find(|r| r.workload == "idle-connections" && r.params.get("load").is_none())
        .unwrap();
    assert!(
        idle.details["quinn_rss_per_connection_bytes"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{idle:?}"
    );
    // The largest fan-out group is measured beside a bare quinn server pushing as many
    // listeners a frame of the pushed entry's size.
    let largest = results
        .iter()
        .filter(|r| r.workload == "fanout")
        .max_by_key(|r| r.params["members"].as_u64())
        .unwrap();
    assert!(
        largest.details["push_frame_bytes"].as_u64().unwrap() > 0,
        "{largest:?}"
    );
    assert!(
        largest.details["bare_quinn_all_pushed_p50_us"]
            .as_u64()
            .is_some_and(|us| us > 0),
        "{largest:?}"
    );
    let storm = find("reconnect-storm");
    assert_eq!(storm.params["clients"], 20, "{storm:?}");
    let cold = find("cold-start");
    assert!(
        cold.params["queued_messages"].as_u64().unwrap() >= 200,
        "{cold:?}"
    );
    // The blobs the restarts start with are in alpha's store.
    assert_eq!(cold.details["blob_files_added"], 20, "{cold:?}");
    let joins: Vec<_> = results
        .iter()
        .filter(|r| r.workload == "join-large")
        .collect();
    assert_eq!(joins.len(), 2, "{joins:?}");
    assert!(
        joins
            .iter()
            .all(|r| r.details["welcome_bytes"].as_u64().unwrap() > 0),
        "{joins:?}"
    );

    // send-1to1 was measured again with the idle listeners held.
    let among_idle = results
        .iter()
        .find(|r| r.workload == "idle-connections" && r.params["load"] == "send-1to1 half")
        .unwrap();
    assert!(
        among_idle.details["messages"].as_u64().unwrap() > 0,
        "{among_idle:?}"
    );

    // The JSON lines carry the documented keys.
    let mut out = Vec::new();
    bench::print_json(&results, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), results.len());
    for line in text.lines() {
        let object: serde_json::Value = serde_json::from_str(line).unwrap();
        for key in [
            "workload",
            "params",
            "ops_per_sec",
            "p50_us",
            "p99_us",
            "p999_us",
            "server_peak_rss_bytes",
            "baseline",
            "baseline_value",
            "ratio",
            "target",
            "met",
        ] {
            assert!(object.get(key).is_some(), "{key} missing in {line}");
        }
        assert!(object["params"].is_object() && object["met"].is_boolean());
    }
}

/// Instructions per operation under valgrind's callgrind: a few send-1to1 messages and a few
/// KeyPackage claims counted in the homeserver, as many echo requests of each one's sizes in
/// the bare quinn server. Needs valgrind (the Debian
/// package; .ci/run installs it).
#[test]
fn instructions_are_counted_under_callgrind() {
    let config = BenchConfig {
        roost: Some(common::roost()),
        workloads: vec!["instructions".into()],
        callgrind_messages: 4,
        callgrind_pairs: 1,
        ..BenchConfig::smoke()
    };
    let results = bench::run(config).unwrap();
    assert_eq!(results.len(), 3, "{results:?}");
    for (row, op, unit) in [
        (&results[0], "send-1to1", "message"),
        (&results[1], "claim", "claim"),
    ] {
        assert_eq!(row.workload, "instructions");
        assert_eq!(row.params["op"], op, "{row:?}");
        let per_op = row.details[format!("instructions_per_{unit}").as_str()]
            .as_f64()
            .unwrap();
        let per_echo = row.details["echo_instructions_per_request"]
            .as_f64()
            .unwrap();
        // A message (validated, stored durably, pushed, acked) or a claim (a durable delete)
        // costs the homeserver more than an echo costs bare quinn; equal or less would mean
        // the wrong process was counted.
        assert!(per_echo > 0.0 && per_op > per_echo, "{row:?}");
        assert_eq!(row.baseline_value, per_echo);
    }
    // A federated message costs both servers something: alpha (DS, outbox, Deliver request)
    // and beta (inbound Deliver, queue, push).
    let federated = &results[2];
    assert_eq!(federated.params["op"], "federated-send", "{federated:?}");
    for server in ["alpha", "beta"] {
        let per_message = federated.details[format!("{server}_instructions_per_message").as_str()]
            .as_f64()
            .unwrap();
        assert!(per_message > 0.0, "{federated:?}");
    }
    assert_eq!(
        federated.baseline_value,
        results[0].details["instructions_per_message"]
            .as_f64()
            .unwrap()
    );
}

/// The scale-out bench: two nodes per domain on PostgreSQL (a cluster the harness starts),
/// send-1to1 beside redb's in the same run and spread over the nodes beside one node, fan-out
/// beside a raw PostgreSQL insert. Tiny parameters; nothing about speed is asserted.
#[test]
fn postgres_with_two_nodes_reports_its_baselines() {
    let config = BenchConfig {
        roost: Some(common::roost()),
        workloads: vec!["send-1to1".into(), "fanout".into(), "busy-group".into()],
        storage: Storage::Postgres,
        nodes: 2,
        ..BenchConfig::smoke()
    };
    let results = bench::run(config).unwrap();
    for r in &results {
        assert!(r.ops_per_sec > 0.0, "{r:?}");
        assert!(!r.baseline.is_empty() && r.baseline_value > 0.0, "{r:?}");
    }
    let max_rows = |backend: &str| -> Vec<&bench::WorkloadResult> {
        results
            .iter()
            .filter(|r| {
                r.workload == "send-1to1"
                    && r.params["load"] == "max"
                    && r.params["backend"] == backend
            })
            .collect()
    };
    let redb = max_rows("redb");
    assert_eq!(redb.len(), 1, "{results:?}");
    let postgres = max_rows("postgres");
    let one_node = postgres
        .iter()
        .find(|r| r.params["spread"] == 1 && r.params.get("compared").is_none())
        .expect("send-1to1 on one node");
    let versus_redb = postgres
        .iter()
        .find(|r| r.params["compared"] == "postgres vs redb")
        .expect("the comparison with redb");
    assert_eq!(versus_redb.baseline_value, redb[0].ops_per_sec);
    assert_eq!(versus_redb.ops_per_sec, one_node.ops_per_sec);
    let spread = postgres
        .iter()
        .find(|r| r.params["spread"] == 2 && r.params.get("compared").is_some())
        .expect("send-1to1 spread over two nodes, compared with one node");
    assert_eq!(spread.baseline_value, one_node.ops_per_sec);
    // One group's members spread over both nodes, all sending at once: every recipient
    // has the group's messages in the same order.
    let busy = results
        .iter()
        .find(|r| r.workload == "busy-group")
        .expect("busy-group");
    assert_eq!(busy.params["nodes"], 2, "{busy:?}");
    assert_eq!(busy.details["recipients_out_of_order"], 0, "{busy:?}");
    assert!(busy.details["messages"].as_u64().unwrap() > 0, "{busy:?}");
    let fanout: Vec<_> = results.iter().filter(|r| r.workload == "fanout").collect();
    assert!(!fanout.is_empty());
    assert!(
        fanout.iter().all(|r| r.baseline.starts_with("PostgreSQL")),
        "{fanout:?}"
    );
}
