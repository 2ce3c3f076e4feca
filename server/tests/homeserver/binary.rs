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

fn roost_cmd(args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write as _;
    let mut child = Command::new(ROOST)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn the_default_configuration_file_passes_its_own_check() {
    let default = roost_cmd(&["config", "default"], b"");
    assert!(default.status.success(), "{default:?}");
    let text = String::from_utf8(default.stdout).unwrap();
    // Every table and a field of each, with its default.
    for line in [
        "domain = \"localhost\"",
        "[storage]",
        "backend = \"redb\"",
        "[limits]",
        "max_queue_depth = 10000",
        "[federation]",
        "# url = ",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
    let check = roost_cmd(
        &["config", "check", "--config", "/dev/stdin"],
        text.as_bytes(),
    );
    assert!(check.status.success(), "{check:?}");
    let effective = String::from_utf8(check.stdout).unwrap();
    assert!(effective.contains("max_queue_depth = 10000"), "{effective}");

    // A changed value shows in the effective settings; a password does not.
    let custom = "domain = \"example.org\"\n[storage]\nbackend = \"postgres\"\n\
                  url = \"postgresql://roost:hunter2@db:5432/roost\"\n[limits]\nmax_queue_depth = 7\n";
    let check = roost_cmd(&["config", "check", "-c", "-"], custom.as_bytes());
    assert!(check.status.success(), "{check:?}");
    let effective = String::from_utf8(check.stdout).unwrap();
    assert!(
        effective.contains("domain = \"example.org\""),
        "{effective}"
    );
    assert!(effective.contains("max_queue_depth = 7"), "{effective}");
    assert!(!effective.contains("hunter2"), "{effective}");

    // An invalid file: one error line naming the problem, exit 1, nothing on stdout.
    for (bad, says) in [
        ("[limits]\nmax_queue_depth = \"lots\"\n", "max_queue_depth"),
        ("[storage]\nbackend = \"postgres\"\n", "storage.url"),
        ("colour = \"blue\"\n", "colour"),
    ] {
        let check = roost_cmd(&["config", "check", "-c", "-"], bad.as_bytes());
        assert_eq!(check.status.code(), Some(1), "{bad:?}");
        assert!(check.stdout.is_empty(), "{bad:?}");
        let line = assert_one_error_line(&check.stderr);
        assert!(line.contains(says), "{bad:?}: {line}");
    }
}

#[test]
fn completions_and_manual_page_are_generated() {
    let bash = roost_cmd(&["completions", "bash"], b"");
    assert!(bash.status.success(), "{bash:?}");
    let script = String::from_utf8(bash.stdout).unwrap();
    assert!(script.contains("complete -F _roost"), "{script}");
    for subcommand in ["serve", "admin", "config", "completions"] {
        assert!(script.contains(subcommand), "{subcommand} missing");
    }
    let man = roost_cmd(&["man"], b"");
    assert!(man.status.success(), "{man:?}");
    let page = String::from_utf8(man.stdout).unwrap();
    assert!(page.contains(".TH roost 1"), "{page}");
    assert!(page.contains("serve"), "{page}");
    let unknown = roost_cmd(&["completions", "tcsh"], b"");
    assert_eq!(unknown.status.code(), Some(2));
}
