//! The `roost` binary as an operator sees it: a failure is one `error:` line on stderr and
//! exit code 1, logs go to stderr without colour codes when it is not a terminal, and
//! `--log-format json` writes one JSON object per line.

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const ROOST: &str = env!("CARGO_BIN_EXE_roost");

fn roost(data: &Path) -> Command {
    let mut command = Command::new(ROOST);
    command
        .arg("serve")
        .arg("--data")
        .arg(data)
        .env_remove("RUST_LOG")
        .env_remove("ROOST_DATABASE_URL")
        .env_remove("NO_COLOR")
        // A backtrace must not reach the operator either.
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null());
    command
}

fn assert_one_error_line(stderr: &[u8]) -> String {
    assert!(!stderr.contains(&0x1b), "escape codes: {stderr:?}");
    let stderr = String::from_utf8(stderr.to_vec()).unwrap();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(stderr.starts_with("error: "), "{stderr:?}");
    assert!(stderr.ends_with('\n'), "{stderr:?}");
    stderr
}

#[test]
fn a_failed_start_is_one_error_line_and_exit_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let out = roost(&dir.path().join("data"))
        .arg("--listen")
        .arg(addr.to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
    let line = assert_one_error_line(&out.stderr);
    assert!(line.contains(&addr.to_string()), "{line:?}");
    // The operating system's reason once, not once per layer that wraps it.
    assert_eq!(line.matches("os error").count(), 1, "{line:?}");
}

#[test]
fn a_command_line_mistake_is_one_error_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = roost(dir.path())
        .args(["--listen", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let line = assert_one_error_line(&out.stderr);
    assert!(line.contains("--listen"), "{line:?}");
    assert!(line.contains("--help"), "{line:?}");
}

/// Starts `roost serve` with `args`, waits for its first log line on stderr, kills it and
/// returns everything it wrote on stdout and stderr.
fn first_log_lines(data: &Path, args: &[&str]) -> (Vec<u8>, String) {
    let mut child = roost(data)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let (sender, receiver) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut first = String::new();
        stderr.read_line(&mut first).unwrap();
        sender.send(()).unwrap();
        let mut rest = String::new();
        stderr.read_to_string(&mut rest).unwrap();
        first + &rest
    });
    let started = receiver.recv_timeout(Duration::from_secs(60));
    child.kill().unwrap();
    child.wait().unwrap();
    let text = reader.join().unwrap();
    started.unwrap_or_else(|_| panic!("no log line within 60 s: {text:?}"));
    let mut stdout = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    (stdout, text)
}

#[test]
fn json_logs_are_one_object_per_line_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, stderr) = first_log_lines(dir.path(), &["--log-format", "json"]);
    assert!(stdout.is_empty(), "stdout: {stdout:?}");
    assert!(!stderr.is_empty());
    for line in stderr.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line:?}"));
        for key in ["timestamp", "level", "target", "fields"] {
            assert!(value.get(key).is_some(), "no {key}: {line:?}");
        }
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&value["level"].as_str().unwrap()),
            "{line:?}"
        );
    }
}

#[test]
fn text_logs_have_no_escape_codes_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, stderr) = first_log_lines(dir.path(), &[]);
    assert!(stdout.is_empty(), "stdout: {stdout:?}");
    assert!(stderr.contains("INFO"), "{stderr:?}");
    assert!(!stderr.contains('\x1b'), "escape codes: {stderr:?}");
}
