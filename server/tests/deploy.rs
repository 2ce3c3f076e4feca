//! The deployment kit (Dockerfile, deploy/roost.service) names real things: every flag it
//! passes is a flag of `roost serve`, the health check reaches the /health the command line
//! turns on, the runtime user is not root, the state lives in a volume or StateDirectory.
//! (.ci/run also runs `systemd-analyze verify` on the unit; no Docker daemon runs here, so
//! the Dockerfile is checked by reading it.)
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

const ROOST: &str = env!("CARGO_BIN_EXE_roost");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `roost serve --help`.
fn serve_help() -> String {
    let out = Command::new(ROOST)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// The value following `flag` in an argument list.
fn arg_after<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| *a == flag)
        .and_then(|i| args.get(i + 1).copied())
}

/// Checks a `roost serve ...` argument list against the real command line.
fn check_serve_args(args: &[&str], what: &str) {
    assert_eq!(args.first(), Some(&"serve"), "{what}: {args:?}");
    let help = serve_help();
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(&format!("{flag} <")),
            "{what}: `roost serve` has no flag {flag}"
        );
    }
}

/// Dockerfile instructions with continuation lines joined and comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, rest) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((keyword.to_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    assert!(current.is_empty(), "Dockerfile ends in a continuation");
    out
}

/// A JSON-array (exec form) argument list.
fn exec_form(rest: &str) -> Vec<String> {
    serde_json::from_str(rest).unwrap_or_else(|e| panic!("not exec form: {rest}: {e}"))
}

#[test]
fn the_dockerfile_builds_the_binaries_and_runs_them_as_a_user_with_a_health_check() {
    let dockerfile = read("Dockerfile");
    let steps = instructions(&dockerfile);
    const KNOWN: &[&str] = &[
        "FROM",
        "RUN",
        "COPY",
        "WORKDIR",
        "USER",
        "VOLUME",
        "EXPOSE",
        "HEALTHCHECK",
        "ENTRYPOINT",
        "CMD",
        "ENV",
        "ARG",
        "LABEL",
    ];
    for (keyword, _) in &steps {
        assert!(
            KNOWN.contains(&keyword.as_str()),
            "unknown instruction {keyword}"
        );
    }

    // Two stages: the build one is named and is what the final stage copies from.
    let froms: Vec<&String> = steps
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, r)| r)
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    let build = froms[0].split_whitespace().collect::<Vec<_>>();
    assert_eq!(
        build.get(1).map(|s| s.to_lowercase()),
        Some("as".into()),
        "{build:?}"
    );
    let stage = build[2];
    // The Rust image is at least the workspace's rust-version.
    let image_version = build[0]
        .strip_prefix("rust:")
        .and_then(|tag| tag.split('-').next())
        .unwrap();
    let msrv = read("Cargo.toml")
        .lines()
        .find_map(|l| {
            l.strip_prefix("rust-version = ")
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap();
    let minor = |v: &str| v.split('.').nth(1).unwrap().parse::<u32>().unwrap();
    assert!(
        minor(image_version) >= minor(&msrv),
        "{image_version} < {msrv}"
    );

    let build_cmd = steps
        .iter()
        .find(|(k, r)| k == "RUN" && r.contains("cargo build"))
        .map(|(_, r)| r.clone())
        .unwrap();
    assert!(
        build_cmd.contains("--locked") && build_cmd.contains("--release"),
        "{build_cmd}"
    );
    for package in ["roost-server", "roost-cli"] {
        assert!(build_cmd.contains(&format!("-p {package}")), "{build_cmd}");
    }
    let final_stage: Vec<&(String, String)> = steps
        .iter()
        .skip_while(|(k, r)| !(k == "FROM" && *r == *froms[1]))
        .collect();
    for binary in ["roost", "roost-cli"] {
        assert!(
            final_stage.iter().any(|(k, r)| k == "COPY"
                && r.contains(&format!("--from={stage}"))
                && r.contains(&format!("/target/release/{binary} "))),
            "{binary} is not copied from {stage}"
        );
    }

    // Not root, after everything that needs root.
    let user_at = final_stage.iter().position(|(k, _)| k == "USER").unwrap();
    let user = &final_stage[user_at].1;
    assert!(user != "root" && user != "0", "{user}");
    assert!(
        final_stage[user_at..].iter().all(|(k, _)| k != "RUN"),
        "RUN after USER"
    );

    // The command: flags of `roost serve`; its data dir is the volume, its metrics port is
    // exposed and is what the health check asks for /health.
    let entrypoint = exec_form(
        &final_stage
            .iter()
            .find(|(k, _)| k == "ENTRYPOINT")
            .unwrap()
            .1,
    );
    assert_eq!(entrypoint, vec!["roost"]);
    let cmd = exec_form(&final_stage.iter().find(|(k, _)| k == "CMD").unwrap().1);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    check_serve_args(&cmd, "Dockerfile CMD");
    let data = arg_after(&cmd, "--data").unwrap();
    let volume = exec_form(&final_stage.iter().find(|(k, _)| k == "VOLUME").unwrap().1);
    assert_eq!(volume, vec![data.to_owned()]);
    let listen_port = arg_after(&cmd, "--listen")
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap();
    let metrics_port = arg_after(&cmd, "--metrics")
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap();
    let expose = &final_stage.iter().find(|(k, _)| k == "EXPOSE").unwrap().1;
    assert!(expose.contains(&format!("{listen_port}/udp")), "{expose}");
    assert!(expose.contains(&format!("{metrics_port}/tcp")), "{expose}");
    let health = &final_stage
        .iter()
        .find(|(k, _)| k == "HEALTHCHECK")
        .unwrap()
        .1;
    assert!(
        health.contains(&format!("127.0.0.1:{metrics_port}/health")),
        "{health}"
    );
    assert!(
        health.contains("--fail"),
        "a failing /health must fail the check: {health}"
    );

    // What the build copies leaves the local build and data out.
    let ignore = read(".dockerignore");
    for entry in ["target", "roost-data"] {
        assert!(ignore.lines().any(|l| l.trim() == entry), "{entry}");
    }
}

#[test]
fn the_systemd_unit_runs_the_server_as_its_user_in_a_hardened_sandbox() {
    let unit = read("deploy/roost.service");
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("deploy/roost.service has no {key}="))
    };
    let exec: Vec<&str> = value("ExecStart").split_whitespace().collect();
    assert_eq!(exec[0], "/usr/local/bin/roost");
    check_serve_args(&exec[1..], "ExecStart");
    // The data dir is the state directory systemd makes for the service.
    assert_eq!(
        arg_after(&exec, "--data"),
        Some(format!("/var/lib/{}", value("StateDirectory")).as_str())
    );
    assert!(
        arg_after(&exec, "--config")
            .unwrap()
            .starts_with(&format!("/etc/{}/", value("ConfigurationDirectory")))
    );
    assert_ne!(value("User"), "root");
    assert_eq!(value("KillSignal"), "SIGTERM");
    for (key, expected) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("UMask", "0077"),
        ("StateDirectoryMode", "0700"),
    ] {
        assert_eq!(value(key), expected, "{key}");
    }
}
