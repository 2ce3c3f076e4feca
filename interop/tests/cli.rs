//! The `roost-interop` binary: listing, an unknown scenario, one scenario's output format,
//! and `up` (servers.json, reachable servers, SIGTERM stops everything).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use roost_client::transport::{ConnectConfig, Endpoint, TrustConfig};
use roost_interop::binary::{Profile, locate_roost};
use roost_interop::harness::ServersFile;

const BIN: &str = env!("CARGO_BIN_EXE_roost-interop");

fn roost() -> PathBuf {
    static ROOST: OnceLock<PathBuf> = OnceLock::new();
    ROOST
        .get_or_init(|| {
            let explicit = std::env::var_os("ROOST_BIN").map(PathBuf::from);
            locate_roost(explicit.as_deref(), &Profile::of_current_exe()).unwrap()
        })
        .clone()
}

fn interop(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("ROOST_BIN", roost())
        .output()
        .unwrap()
}

#[test]
fn run_prints_a_line_per_scenario_and_the_summary() {
    let output = interop(&["run", "--scenario", "discovery"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("discovery") && lines[0].contains("PASS"),
        "{stdout}"
    );
    assert_eq!(lines.last(), Some(&"1 passed, 0 failed"));

    let output = interop(&["run", "--scenario", "no-such-scenario"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no scenario"));

    let output = interop(&["run", "--list"]);
    assert!(output.status.success());
    let listed = String::from_utf8_lossy(&output.stdout);
    for scenario in roost_interop::scenarios::SCENARIOS {
        assert!(listed.contains(scenario.name), "{listed}");
    }
}

#[test]
fn up_serves_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["up", "--servers", "3", "--dir"])
        .arg(dir.path())
        .env("ROOST_BIN", roost())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let json = dir.path().join("servers.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    let file: ServersFile = loop {
        assert!(Instant::now() < deadline, "no servers.json");
        assert!(
            child.try_wait().unwrap().is_none(),
            "roost-interop up exited"
        );
        if let Ok(text) = std::fs::read_to_string(&json)
            && let Ok(file) = serde_json::from_str(&text)
        {
            break file;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let domains: Vec<&str> = file.servers.iter().map(|s| s.domain.as_str()).collect();
    assert_eq!(domains, ["alpha.test", "beta.test", "gamma.test"]);

    // Each server answers a client that trusts the CA of servers.json.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        for server in &file.servers {
            let trust = TrustConfig::roots_from_pem_file(&server.ca_file).unwrap();
            let config = ConnectConfig::new(server.address, server.domain.clone(), trust);
            let endpoint = Endpoint::for_server(server.address).unwrap();
            endpoint.connect(&config).await.unwrap().close();
            endpoint.close();
        }
    });

    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "roost-interop up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    // The servers are gone with it.
    for server in &file.servers {
        let pid =
            rustix::process::Pid::from_raw(i32::try_from(server.pid.unwrap()).unwrap()).unwrap();
        assert!(
            rustix::process::test_kill_process(pid).is_err(),
            "{} still runs",
            server.domain
        );
    }
}
