//! Shared by the end-to-end tests: the `roost` binary (built once per test binary) and a
//! runner for one scenario of the suite.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use roost_interop::binary::{Profile, locate_roost};
use roost_interop::scenarios;

/// The homeserver binary: `$ROOST_BIN` if set, else `cargo build -p roost-server --bin roost`
/// in this test binary's profile (once per test binary).
pub(crate) fn roost() -> PathBuf {
    static ROOST: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = ROOST.get_or_init(|| {
        let explicit = std::env::var_os("ROOST_BIN").map(PathBuf::from);
        locate_roost(explicit.as_deref(), &Profile::of_current_exe()).map_err(|e| format!("{e:#}"))
    });
    match found {
        Ok(path) => path.clone(),
        Err(err) => panic!("no roost binary: {err}"),
    }
}

/// A tokio runtime like the one a scenario gets from `roost-interop run`.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs the scenario `name` against fresh homeservers and fails the test if it fails.
pub(crate) fn scenario(name: &str) {
    scenario_on(name, scenarios::Topology::default());
}

/// Runs the scenario `name` on `topology` and fails the test if it fails.
pub(crate) fn scenario_on(name: &str, topology: scenarios::Topology) {
    let scenario = scenarios::find(name).unwrap_or_else(|| panic!("no scenario {name}"));
    assert!(
        topology.runs(scenario),
        "{name} does not run on {topology:?}"
    );
    let roost = roost();
    let outcome = runtime().block_on(scenarios::run_scenario(&roost, scenario, topology));
    println!("{}", outcome.line());
    assert!(
        outcome.passed,
        "scenario {name} failed: {}",
        outcome.error.unwrap_or_default()
    );
}
