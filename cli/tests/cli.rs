//! End to end: the built `roost-cli` binary, run as a process, against a homeserver started
//! in-process on 127.0.0.1:0 (domain `localhost`), with one profile directory per identity.

// Test helpers outside `#[test]` functions may panic on setup failures.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use roost_server::Server;
use roost_server::config::Config;
use serde_json::Value;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_roost-cli");

/// A homeserver on its own runtime, and a directory for the profiles.
struct Harness {
    runtime: tokio::runtime::Runtime,
    server: Option<Server>,
    dir: tempfile::TempDir,
}

impl Harness {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = start_server(&runtime, &dir.path().join("server"));
        Self {
            runtime,
            server: Some(server),
            dir,
        }
    }

    fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    fn addr(&self) -> String {
        self.server().local_addr().to_string()
    }

    fn cert(&self) -> String {
        self.server()
            .certificate_path()
            .to_str()
            .unwrap()
            .to_owned()
    }

    /// Stops the homeserver; its address, to start it again on.
    fn stop_server(&mut self) -> String {
        let addr = self.addr();
        let server = self.server.take().unwrap();
        self.runtime.block_on(server.shutdown());
        addr
    }

    /// Starts the homeserver again on `addr` with the same data.
    fn start_server_again(&mut self, addr: &str) {
        let data_dir = self.dir.path().join("server");
        self.server = Some(start_server_at(&self.runtime, &data_dir, addr));
    }

    fn profile(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, profile: &str, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .arg("--profile")
            .arg(self.profile(profile))
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("ROOST_PROFILE")
            .stdin(Stdio::null());
        command
    }

    /// Runs `roost-cli --profile DIR/<profile> args...`.
    fn run(&self, profile: &str, args: &[&str]) -> Output {
        self.command(profile, args).output().unwrap()
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, profile: &str, args: &[&str]) -> String {
        let out = self.run(profile, args);
        assert!(
            out.status.success(),
            "roost-cli {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and expects failure; returns the (single) stderr line.
    fn fails(&self, profile: &str, args: &[&str]) -> String {
        let out = self.run(profile, args);
        assert!(!out.status.success(), "roost-cli {args:?} succeeded");
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
        assert!(stderr.starts_with("error: "), "{stderr:?}");
        stderr.trim_end().to_owned()
    }

    fn register(&self, name: &str) {
        let user = format!("{name}@localhost");
        let out = self.ok(
            name,
            &[
                "register",
                &user,
                "--server",
                &self.addr(),
                "--server-cert",
                &self.cert(),
            ],
        );
        assert!(
            out.starts_with(&format!("registered {user}/cli on ")),
            "{out}"
        );
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server.shutdown());
        }
    }
}

/// Some tests stop the server and start it again on its address: the port is one that no
/// client socket can take meanwhile.
fn start_server(runtime: &tokio::runtime::Runtime, data_dir: &Path) -> Server {
    let addr = roost_server::testing::restartable_addr().unwrap();
    start_server_at(runtime, data_dir, &addr.to_string())
}

fn start_server_at(runtime: &tokio::runtime::Runtime, data_dir: &Path, listen: &str) -> Server {
    let config = Config {
        domain: "localhost".into(),
        listen: listen.parse().unwrap(),
        data_dir: data_dir.to_owned(),
        ..Config::default()
    };
    runtime
        .block_on(Server::start(config.validate().unwrap()))
        .unwrap()
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// alice and bob (registered) in alice's group "team", bob joined; the group's id.
fn alice_and_bob_in_team(h: &Harness) -> String {
    h.register("alice");
    h.register("bob");
    let group = h.ok("alice", &["group", "create", "--name", "team"]);
    h.ok("alice", &["group", "invite", "team", "bob@localhost"]);
    h.ok("bob", &["recv"]);
    group.trim().to_owned()
}

/// A `roost-cli --json chat` process: lines typed on its input, JSON objects read from its
/// output. One that does not end within 90 s is killed, so a test fails instead of hanging.
struct Chat {
    child: std::process::Child,
    typed: Option<std::process::ChildStdin>,
    shown: std::io::BufReader<std::process::ChildStdout>,
    ended: std::sync::mpsc::Sender<()>,
}

impl Chat {
    fn start(h: &Harness, profile: &str, args: &[&str]) -> Self {
        let mut child = h
            .command(profile, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id().to_string();
        let (ended, watch) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let timeout = std::time::Duration::from_secs(90);
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watch.recv_timeout(timeout) {
                let _ = Command::new("kill").args(["-9", &pid]).status();
            }
        });
        Self {
            typed: child.stdin.take(),
            shown: std::io::BufReader::new(child.stdout.take().unwrap()),
            child,
            ended,
        }
    }

    fn type_line(&mut self, text: &str) {
        use std::io::Write as _;
        writeln!(self.typed.as_mut().unwrap(), "{text}").unwrap();
    }

    fn next(&mut self) -> Value {
        use std::io::BufRead as _;
        let mut line = String::new();
        assert_ne!(self.shown.read_line(&mut line).unwrap(), 0, "chat ended");
        serde_json::from_str(&line).unwrap()
    }

    /// Ends the input; the chat's exit and what it wrote on stderr.
    fn quit(mut self) -> Output {
        drop(self.typed.take());
        let out = self.child.wait_with_output().unwrap();
        let _ = self.ended.send(());
        out
    }
}

#[test]
fn two_users_talk_both_ways() {
    let h = Harness::start();
    h.register("alice");
    h.register("bob");

    let group = h.ok("alice", &["group", "create", "--name", "team"]);
    let group = group.trim();
    assert!(group.ends_with("@localhost"), "{group}");
    assert_eq!(
        h.ok("alice", &["group", "invite", "team", "bob@localhost"]),
        "added bob@localhost/cli\n"
    );
    h.ok("alice", &["send", "team", "hello bob"]);

    // bob joins from the Welcome and gets the message; the join is a note on stderr.
    let out = h.run("bob", &["recv"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{group}\talice@localhost/cli\thello bob\n")
    );
    let notes = String::from_utf8(out.stderr).unwrap();
    assert!(
        notes.contains(&format!("{group}: joined, invited by alice@localhost/cli")),
        "{notes}"
    );
    // Taken once: a second recv prints nothing.
    assert_eq!(h.ok("bob", &["recv"]), "");

    // bob names the group locally and answers, with a tab and a newline in the text.
    h.ok("bob", &["group", "name", group, "with-alice"]);
    let sent = json_lines(&h.ok("bob", &["--json", "send", "with-alice", "hi\talice\n:)"]));
    let [sent] = sent.as_slice() else {
        panic!("{sent:?}")
    };
    assert_eq!(
        (&sent["group"], &sent["sent"]),
        (&group.into(), &true.into())
    );
    let id = sent["id"].as_str().unwrap();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );

    let out = h.ok("alice", &["--json", "recv"]);
    let events = json_lines(&out);
    // alice's own "hello bob" was reported sent when the hub took it.
    assert_eq!(events.len(), 2, "{out}");
    assert_eq!(events[0]["event"], "outgoing");
    assert_eq!(events[0]["state"], "sent");
    let events = &events[1..];
    assert_eq!(events[0]["event"], "message");
    assert_eq!(events[0]["group"], group);
    assert_eq!(events[0]["name"], "team");
    assert_eq!(events[0]["sender"], "bob@localhost/cli");
    // The id bob's send printed.
    assert_eq!(events[0]["id"], id);
    assert_eq!(events[0]["text"], "hi\talice\n:)");

    // Plain output keeps one message per line.
    h.ok("bob", &["send", "with-alice", "two\nlines"]);
    assert_eq!(
        h.ok("alice", &["recv"]),
        "team\tbob@localhost/cli\ttwo\\nlines\n"
    );

    assert_eq!(
        h.ok("alice", &["group", "list"]),
        format!("{group}\tteam\n")
    );
    let members = json_lines(&h.ok("bob", &["--json", "group", "members", "with-alice"]));
    let members: Vec<&str> = members
        .iter()
        .map(|m| m["member"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["alice@localhost/cli", "bob@localhost/cli"]);
}

#[test]
fn chat_json_answers_each_line_with_its_message_id() {
    let h = Harness::start();
    let group = alice_and_bob_in_team(&h);
    let mut chat = Chat::start(&h, "alice", &["--json", "chat", "team"]);
    // The answer to each line comes before the next line is read: a script can tell which
    // line is queued (it goes out, once, even if the chat dies now) under which id.
    let mut queued = |text: &str| -> String {
        chat.type_line(text);
        loop {
            let event = chat.next();
            if event["event"] == "queued" {
                assert_eq!(
                    (&event["group"], &event["name"], &event["text"]),
                    (&group.as_str().into(), &"team".into(), &text.into())
                );
                return event["id"].as_str().unwrap().to_owned();
            }
            // Only the hub's acceptance of an earlier line may come in between.
            assert_eq!(event["event"], "outgoing", "{event}");
        }
    };
    let first = queued("first from chat");
    let second = queued("second from chat");
    assert_ne!(first, second);
    chat.type_line("/quit");
    assert!(chat.quit().status.success());

    let events = json_lines(&h.ok("bob", &["--json", "recv", "--wait", "10"]));
    let got: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["event"] == "message")
        .map(|e| (e["id"].as_str().unwrap(), e["text"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            (first.as_str(), "first from chat"),
            (second.as_str(), "second from chat")
        ]
    );
}

#[test]
fn keys_are_updated_from_the_command_line_and_in_a_chat_and_the_group_goes_on() {
    let h = Harness::start();
    let group = alice_and_bob_in_team(&h);
    let updated: Value =
        serde_json::from_str(&h.ok("alice", &["--json", "group", "update", "team"])).unwrap();
    assert_eq!(updated["group"], group.as_str());
    assert_eq!(updated["epoch"], 2);

    // In a chat, /update is answered like a line (before the next is read), then a message.
    let mut chat = Chat::start(&h, "bob", &["--json", "chat", &group]);
    chat.type_line("/update");
    let answer = loop {
        let event = chat.next();
        if event["event"] != "outgoing" {
            break event;
        }
    };
    assert_eq!(
        (&answer["event"], &answer["group"], &answer["epoch"]),
        (&"keys_updated".into(), &group.as_str().into(), &3.into()),
        "{answer}"
    );
    chat.type_line("after both updates");
    chat.type_line("/quit");
    assert!(chat.quit().status.success());

    let events = json_lines(&h.ok("alice", &["--json", "recv", "--wait", "10"]));
    let texts: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "message")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["after both updates"]);
    h.ok("alice", &["send", "team", "and me"]);
    assert!(h.ok("bob", &["recv"]).contains("and me"));
}

#[test]
fn a_file_sent_with_slash_file_in_a_chat_is_saved_byte_identical_and_the_chat_goes_on() {
    let h = Harness::start();
    let group = alice_and_bob_in_team(&h);
    let dir = tempfile::tempdir().unwrap();
    let bytes = pseudo_random(200_000);
    let notes = dir.path().join("notes.pdf");
    std::fs::write(&notes, &bytes).unwrap();

    let mut chat = Chat::start(&h, "bob", &["--json", "chat", &group]);
    chat.type_line(&format!("/file {}", notes.display()));
    let answer = chat.next();
    assert_eq!(
        (&answer["event"], &answer["file"], &answer["size"]),
        (&"queued".into(), &"notes.pdf".into(), &bytes.len().into()),
        "{answer}"
    );
    assert!(answer["id"].is_string(), "{answer}");
    // A file that is not there: refused, nothing queued, and the chat goes on.
    let missing = dir.path().join("missing.txt");
    chat.type_line(&format!("/file {}", missing.display()));
    let refused = loop {
        let event = chat.next();
        if event["event"] != "outgoing" {
            break event;
        }
    };
    assert_eq!(
        (&refused["event"], &refused["file"]),
        (&"not_sent".into(), &"missing.txt".into()),
        "{refused}"
    );
    chat.type_line("and a line after the files");
    chat.type_line("/quit");
    assert!(chat.quit().status.success());

    let downloads = dir.path().join("downloads");
    let events = json_lines(&h.ok(
        "alice",
        &[
            "--json",
            "recv",
            "--wait",
            "10",
            "--download-dir",
            downloads.to_str().unwrap(),
        ],
    ));
    let shown: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "message" || e["event"] == "saved")
        .collect();
    assert_eq!(shown.len(), 3, "{events:?}");
    assert_eq!(shown[0]["file"]["name"], "notes.pdf");
    assert_eq!(shown[0]["file"]["media_type"], "application/pdf");
    assert_eq!(shown[1]["event"], "saved");
    assert_eq!(shown[2]["text"], "and a line after the files");
    assert!(std::fs::read(downloads.join("notes.pdf")).unwrap() == bytes);

    // A chat with --download-dir saves a file that arrives, as recv does.
    let saved_by_chat = dir.path().join("bob-downloads");
    let mut chat = Chat::start(
        &h,
        "bob",
        &[
            "--json",
            "chat",
            &group,
            "--download-dir",
            saved_by_chat.to_str().unwrap(),
        ],
    );
    h.ok(
        "alice",
        &["send", "team", "--file", notes.to_str().unwrap()],
    );
    let saved = loop {
        let event = chat.next();
        if event["event"] == "saved" {
            break event;
        }
    };
    let path = saved_by_chat.join("notes.pdf");
    assert_eq!(saved["path"], path.display().to_string());
    assert!(std::fs::read(&path).unwrap() == bytes);
    chat.type_line("/quit");
    assert!(chat.quit().status.success());
}

#[test]
fn members_are_invited_and_removed_from_a_chat_and_mistakes_keep_it_open() {
    let h = Harness::start();
    let group = alice_and_bob_in_team(&h);
    h.register("carol");
    let mut chat = Chat::start(&h, "bob", &["--json", "chat", &group]);
    // The next answer to a typed line (events of other kinds are skipped).
    let answer = |chat: &mut Chat| loop {
        let event = chat.next();
        let kind = event["event"].as_str().unwrap_or_default().to_owned();
        if !["outgoing", "members_added", "members_removed", "message"].contains(&kind.as_str()) {
            break event;
        }
    };
    chat.type_line("/invite carol@localhost");
    let invited = answer(&mut chat);
    assert_eq!(invited["event"], "invited", "{invited}");
    assert_eq!(invited["users"], serde_json::json!(["carol@localhost"]));
    assert_eq!(
        invited["clients"],
        serde_json::json!(["carol@localhost/cli"])
    );
    assert_eq!(invited["epoch"], 2);
    // Twice: refused with the same code as `group invite`, and the chat goes on.
    chat.type_line("/invite carol@localhost");
    let again = answer(&mut chat);
    assert_eq!(
        (&again["event"], &again["error"]["code"]),
        (&"not_invited".into(), &"already_member".into()),
        "{again}"
    );
    chat.type_line("/invite nobody@localhost");
    let unknown = answer(&mut chat);
    assert_eq!(unknown["event"], "not_invited", "{unknown}");
    chat.type_line("/remove not-a-user-id");
    let usage = answer(&mut chat);
    assert_eq!(
        (&usage["event"], &usage["error"]["code"]),
        (&"not_removed".into(), &"usage".into()),
        "{usage}"
    );
    chat.type_line("carol is in");
    assert_eq!(answer(&mut chat)["event"], "queued");
    chat.type_line("/remove carol@localhost");
    let removed = answer(&mut chat);
    assert_eq!(removed["event"], "removed_members", "{removed}");
    assert_eq!(
        removed["clients"],
        serde_json::json!(["carol@localhost/cli"])
    );
    assert_eq!(removed["epoch"], 3);
    chat.type_line("carol is out");
    assert_eq!(answer(&mut chat)["event"], "queued");
    chat.type_line("/quit");
    assert!(chat.quit().status.success());

    // carol joined, got what was sent while she was in, and learnt she was removed.
    let events = json_lines(&h.ok("carol", &["--json", "recv", "--wait", "10"]));
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["joined", "message", "removed"], "{events:?}");
    assert_eq!(events[1]["text"], "carol is in");
    let texts: Vec<String> = json_lines(&h.ok("alice", &["--json", "recv", "--wait", "10"]))
        .iter()
        .filter(|e| e["event"] == "message")
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts, ["carol is in", "carol is out"]);
}

#[test]
fn recv_wait_returns_when_a_message_arrives() {
    let h = Harness::start();
    h.register("alice");
    h.register("bob");
    let group = h.ok("alice", &["group", "create"]);
    let group = group.trim();
    h.ok("alice", &["group", "invite", group, "bob@localhost"]);
    h.ok("bob", &["recv"]);

    let started = std::time::Instant::now();
    let waiting = h
        .command("bob", &["recv", "--wait", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    h.ok("alice", &["send", group, "are you there?"]);
    let out = waiting.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{group}\talice@localhost/cli\tare you there?\n")
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(15));

    // Nothing pending: --wait 1 gives up after about a second, successfully.
    let started = std::time::Instant::now();
    assert_eq!(h.ok("bob", &["recv", "--wait", "1"]), "");
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
}

#[test]
fn mistakes_get_one_line_errors() {
    let h = Harness::start();
    h.register("alice");
    h.register("bob");
    let group = h.ok("alice", &["group", "create", "--name", "team"]);
    let group = group.trim();

    assert_eq!(
        h.fails("alice", &["group", "invite", "team", "carol@localhost"]),
        "error: unknown user carol@localhost"
    );
    assert_eq!(
        h.fails("bob", &["send", group, "let me in"]),
        format!("error: not a member of {group}")
    );
    assert_eq!(
        h.fails("alice", &["group", "remove", "team", "bob@localhost"]),
        "error: bob@localhost is not a member of team"
    );
    assert!(
        h.fails("alice", &["send", "nope", "x"])
            .starts_with("error: no group named \"nope\"")
    );
    assert!(
        h.fails("nobody", &["group", "list"])
            .starts_with("error: no profile at ")
    );
    let register = |profile: &str, user: &str, server: &str, cert: &str| {
        h.fails(
            profile,
            &[
                "--timeout",
                "1",
                "register",
                user,
                "--server",
                server,
                "--server-cert",
                cert,
            ],
        )
    };
    assert_eq!(
        register("bob2", "bob@localhost", &h.addr(), &h.cert()),
        "error: user bob@localhost exists already"
    );
    assert!(
        register("bob", "bob@localhost", &h.addr(), &h.cert())
            .starts_with("error: a profile exists already at ")
    );

    // bob's profile held by a waiting recv: another command is told so, with its code.
    let wait = || {
        h.command("bob", &["recv", "--wait", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut waiting = wait();
    let refused = (0..200)
        .find_map(|_| {
            // A recv that lost the race for the profile to the command below ends at once:
            // started again.
            if waiting.try_wait().unwrap().is_some() {
                waiting = wait();
            }
            let out = h.run("bob", &["--json", "group", "list"]);
            if out.status.success() {
                std::thread::sleep(std::time::Duration::from_millis(50));
                return None;
            }
            Some(String::from_utf8(out.stderr).unwrap())
        })
        .expect("the waiting recv never held bob's profile");
    waiting.kill().unwrap();
    waiting.wait().unwrap();
    let refused: Value = serde_json::from_str(refused.trim()).unwrap();
    assert_eq!(refused["error"]["code"], "profile_in_use", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in use by another roost-cli"),
        "{refused}"
    );

    // Another server's certificate is not the pinned one.
    let other = start_server(&h.runtime, &h.dir.path().join("other-server"));
    let other_cert = other.certificate_path().to_str().unwrap().to_owned();
    assert!(
        register("carol", "carol@localhost", &h.addr(), &other_cert)
            .starts_with("error: bad certificate: "),
    );
    h.runtime.block_on(other.shutdown());

    // Nobody listens on this port.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    assert_eq!(
        register("carol", "carol@localhost", &closed_addr, &h.cert()),
        format!("error: server unreachable: {closed_addr}: timed out")
    );
}

#[test]
fn command_line_mistakes_get_one_line_errors_and_exit_code_2() {
    let profile = tempfile::tempdir().unwrap();
    for (args, says) in [
        (&["--bogus"][..], "unexpected argument '--bogus'"),
        (&["send"][..], "(see `roost-cli send --help`)"),
        (&["--timeout", "soon", "whoami"][..], "--timeout"),
    ] {
        let out = Command::new(BIN)
            .arg("--profile")
            .arg(profile.path())
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr:?}");
        assert!(stderr.starts_with("error: "), "{stderr:?}");
        assert!(stderr.contains(says), "{stderr:?}");
        assert!(!stderr.contains('\x1b'), "{stderr:?}");
    }
}

#[test]
fn a_second_device_with_the_exported_user_key() {
    let h = Harness::start();
    h.register("alice");
    let key = h.dir.path().join("alice.key");
    let key = key.to_str().unwrap();
    h.ok("alice", &["device", "export-user-key", "--out", key]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Never overwritten.
    assert!(
        h.fails("alice", &["device", "export-user-key", "--out", key])
            .contains("exists already")
    );

    let out = h.ok(
        "laptop",
        &[
            "device",
            "add",
            "alice@localhost",
            "--user-key",
            key,
            "--device",
            "laptop",
            "--server",
            &h.addr(),
            "--server-cert",
            &h.cert(),
        ],
    );
    assert!(
        out.starts_with("added device alice@localhost/laptop on "),
        "{out}"
    );

    let group = h.ok("alice", &["group", "create"]);
    let group = group.trim();
    assert_eq!(
        h.ok("alice", &["group", "invite", group, "alice@localhost"]),
        "added alice@localhost/laptop\n"
    );
    h.ok("alice", &["send", group, "note to self"]);
    assert_eq!(
        h.ok("laptop", &["recv"]),
        format!("{group}\talice@localhost/cli\tnote to self\n")
    );
}

#[test]
fn a_user_lists_and_removes_their_own_devices() {
    let h = Harness::start();
    h.register("alice");
    let key = h.dir.path().join("alice.key");
    let key = key.to_str().unwrap();
    h.ok("alice", &["device", "export-user-key", "--out", key]);
    h.ok(
        "laptop",
        &[
            "device",
            "add",
            "alice@localhost",
            "--user-key",
            key,
            "--device",
            "laptop",
            "--server",
            &h.addr(),
            "--server-cert",
            &h.cert(),
        ],
    );
    assert_eq!(
        h.ok("alice", &["device", "list"]),
        "cli *\talice@localhost/cli\nlaptop\talice@localhost/laptop\n"
    );
    let listed = json_lines(&h.ok("laptop", &["--json", "device", "list"]));
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1]["client"], "alice@localhost/laptop");
    assert_eq!(listed[1]["this_device"], true);
    assert_eq!(listed[0]["this_device"], false);

    assert!(
        h.fails("alice", &["device", "remove", "cli"])
            .contains("is this device")
    );
    assert_eq!(
        h.ok("alice", &["device", "remove", "laptop"]),
        "removed alice@localhost/laptop\n"
    );
    assert_eq!(
        h.ok("alice", &["device", "list"]),
        "cli *\talice@localhost/cli\n"
    );
    // The removed device is cut off, and its name is not free again.
    h.fails("laptop", &["device", "list"]);
    assert!(
        h.fails("alice", &["device", "remove", "laptop"])
            .contains("no such device")
    );
}

/// A UDP port on 127.0.0.1 where nobody listens (it was free a moment ago).
fn dead_addr() -> String {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

#[test]
fn several_server_addresses_skip_a_dead_node_and_old_profiles_still_work() {
    let h = Harness::start();
    let (dead, live) = (dead_addr(), h.addr());
    let cert = h.cert();
    // Comma-separated...
    let both = format!("{dead},{live}");
    let args = [
        "--timeout",
        "1",
        "--json",
        "register",
        "alice@localhost",
        "--server",
        &both,
        "--server-cert",
        &cert,
    ];
    let registered = json_lines(&h.ok("alice", &args));
    assert_eq!(registered[0]["servers"], serde_json::json!([dead, live]));
    let whoami = json_lines(&h.ok("alice", &["--json", "whoami"]));
    assert_eq!(whoami[0]["servers"], serde_json::json!([dead, live]));
    // ... or repeated.
    let args = [
        "--timeout",
        "1",
        "register",
        "bob@localhost",
        "--server",
        &dead,
        "--server",
        &live,
        "--server-cert",
        &cert,
    ];
    h.ok("bob", &args);

    let group = h.ok("alice", &["--timeout", "1", "group", "create"]);
    let group = group.trim();
    h.ok(
        "alice",
        &["--timeout", "1", "group", "invite", group, "bob@localhost"],
    );
    h.ok(
        "alice",
        &["--timeout", "1", "send", group, "past the dead node"],
    );
    assert_eq!(
        h.ok("bob", &["--timeout", "1", "recv"]),
        format!("{group}\talice@localhost/cli\tpast the dead node\n")
    );

    // A profile written before several addresses existed: one `server` string.
    let old = serde_json::json!({
        "client": "bob@localhost/cli",
        "server": live,
        "domain": "localhost",
        "trust": "pinned",
    });
    std::fs::write(h.profile("bob").join("settings.json"), old.to_string()).unwrap();
    let whoami = json_lines(&h.ok("bob", &["--json", "whoami"]));
    assert_eq!(whoami[0]["servers"], serde_json::json!([live]));
    h.ok("bob", &["send", group, "from an old profile"]);
    assert_eq!(
        h.ok("alice", &["--timeout", "1", "recv"]),
        format!("{group}\tbob@localhost/cli\tfrom an old profile\n")
    );
}

/// PROTOCOL.md §4.5: content the CLI cannot show (a content type from a later version, bytes
/// that are no MessageContent) is printed as a placeholder line, and the conversation goes on.
#[test]
fn unsupported_and_unreadable_messages_are_shown_as_such() {
    use roost_client::transport::{ConnectConfig, TrustConfig};
    use roost_client::{Client, ClientConfig, Content, ContentType, Event};

    let h = Harness::start();
    h.register("alice");
    let connect = ConnectConfig::new(
        h.server().local_addr(),
        "localhost",
        TrustConfig::pinned_from_pem_file(h.cert()).unwrap(),
    );
    let carol = h.runtime.block_on(async {
        Client::register(
            ClientConfig::new(connect),
            h.profile("carol-sdk.roost"),
            "carol@localhost".parse().unwrap(),
            "sdk".parse().unwrap(),
        )
        .await
        .unwrap()
    });
    h.ok("alice", &["group", "create", "--name", "team"]);
    h.ok("alice", &["group", "invite", "team", "carol@localhost"]);
    h.runtime.block_on(async {
        let group = loop {
            let event =
                tokio::time::timeout(std::time::Duration::from_secs(20), carol.next_event())
                    .await
                    .expect("carol joins")
                    .unwrap();
            if let Event::Joined { group, .. } = event {
                break group;
            }
        };
        let future = Content::Unknown {
            content_type: ContentType(0x7f01),
            body: vec![1, 2, 3],
        };
        carol.send_content(&group, &future).await.unwrap();
        carol.send(&group, b"raw").await.unwrap();
        carol.send_text(&group, "after").await.unwrap();
    });
    let from = "team\tcarol@localhost/sdk\t";
    assert_eq!(
        h.ok("alice", &["recv"]),
        format!(
            "{from}[unsupported message: content type 32513]\n\
             {from}[unreadable message: the plaintext is not a MessageContent]\n\
             {from}after\n"
        )
    );
    h.runtime.block_on(carol.close());
}

#[test]
fn completions_and_manual_page_need_no_profile() {
    let home = tempfile::tempdir().unwrap();
    let profile = home.path().join("never-made");
    for (args, says) in [
        (&["completions", "fish"][..], "complete -c roost-cli"),
        (&["man"][..], ".TH roost-cli 1"),
    ] {
        let out = Command::new(BIN)
            .arg("--profile")
            .arg(&profile)
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains(says), "{args:?}: {text}");
        assert!(text.contains("send"), "{args:?}");
    }
    assert!(!profile.exists(), "a profile was created");
}

#[test]
fn errors_say_what_to_do_and_json_errors_carry_a_stable_code() {
    let h = Harness::start();
    h.register("alice");
    h.register("bob");
    let group = h.ok("alice", &["group", "create", "--name", "team"]);
    let group = group.trim();
    h.ok("alice", &["group", "invite", "team", "bob@localhost"]);

    // Inviting a member again is an error that says so.
    assert_eq!(
        h.fails("alice", &["group", "invite", "team", "bob@localhost"]),
        "error: already a member of team: bob@localhost"
    );

    // With --json every error is one JSON object on stderr, with a code a script can match.
    let json_error = |profile: &str, args: &[&str], exit: i32| {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = h.run(profile, &all);
        assert_eq!(out.status.code(), Some(exit), "{args:?}: {out:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
        let value: Value = serde_json::from_str(&stderr).unwrap();
        let error = &value["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{value}"
        );
        error["code"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        json_error("alice", &["group", "invite", "team", "bob@localhost"], 1),
        "already_member"
    );
    assert_eq!(json_error("alice", &["send"], 2), "usage");
    assert_eq!(
        json_error(
            "bob2",
            &[
                "register",
                "bob@localhost",
                "--server",
                &h.addr(),
                "--server-cert",
                &h.cert()
            ],
            1
        ),
        "user_exists"
    );
    assert_eq!(
        json_error("alice", &["group", "invite", "team", "carol@localhost"], 1),
        "error"
    );

    // Sending after leaving says so (it was an MLS "PendingProposal" error).
    h.ok("bob", &["recv"]);
    h.ok("bob", &["group", "leave", group]);
    assert_eq!(
        h.fails("bob", &["send", group, "still here?"]),
        format!(
            "error: you left {group}: nothing more can be sent there (it goes once a member \
             commits your removal)"
        )
    );
    // Once alice's client commits the leave, both are told it was a leave, not a removal.
    let alice_saw = h.run("alice", &["recv"]);
    assert!(alice_saw.status.success());
    let alice_saw = String::from_utf8_lossy(&alice_saw.stderr).into_owned();
    assert!(alice_saw.contains("bob@localhost/cli left"), "{alice_saw}");
    let bob_saw = h.run("bob", &["recv"]);
    assert!(bob_saw.status.success());
    let bob_saw = String::from_utf8_lossy(&bob_saw.stderr).into_owned();
    assert!(bob_saw.contains("you left the group"), "{bob_saw}");
    assert!(!bob_saw.contains("removed"), "{bob_saw}");

    // A server that requires registration tokens: no token, and a wrong one, are told apart.
    let config = Config {
        domain: "localhost".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: h.dir.path().join("token-server"),
        require_registration_token: true,
        ..Config::default()
    };
    let server = h
        .runtime
        .block_on(Server::start(config.validate().unwrap()))
        .unwrap();
    let (addr, cert) = (
        server.local_addr().to_string(),
        server.certificate_path().to_str().unwrap().to_owned(),
    );
    let register = |profile: &str, extra: &[&str]| {
        let mut args = vec![
            "register",
            "dan@localhost",
            "--server",
            &addr,
            "--server-cert",
            &cert,
        ];
        args.extend_from_slice(extra);
        h.fails(profile, &args)
    };
    assert_eq!(
        register("dan1", &[]),
        "error: the server requires a registration token: pass --token TOKEN"
    );
    assert_eq!(
        register("dan2", &["--token", "not-a-token"]),
        "error: the registration token was refused: it is wrong or used up; ask the server's \
         operator for a new one"
    );
    h.runtime.block_on(server.shutdown());
}

#[test]
fn send_while_the_server_is_down_queues_and_the_next_command_delivers_once() {
    let mut h = Harness::start();
    let group = alice_and_bob_in_team(&h);

    // The homeserver goes away; sending still works: queued, exit 0.
    let addr = h.stop_server();
    let out = h.run(
        "alice",
        &["--timeout", "1", "send", "team", "written offline"],
    );
    let notes = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{notes}");
    assert!(notes.contains("queued message "), "{notes}");
    assert!(notes.contains("server unreachable"), "{notes}");
    let out = h.run(
        "alice",
        &["--timeout", "1", "--json", "send", "team", "second"],
    );
    assert!(out.status.success());
    let queued = json_lines(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(queued[0]["queued"], true, "{queued:?}");
    assert_eq!(queued[0]["sent"], false, "{queued:?}");

    // Both wait, in order, listed by `outbox` (which needs no server).
    let listed = h.ok("alice", &["--timeout", "1", "outbox"]);
    let lines: Vec<Vec<&str>> = listed.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(
        lines.iter().all(|l| l[1] == "team" && l[2] == "queued"),
        "{listed}"
    );
    let listed = json_lines(&h.ok("alice", &["--timeout", "1", "--json", "outbox"]));
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1]["id"], queued[0]["id"]);
    assert_eq!(listed[1]["group"], group.as_str());
    assert_eq!(listed[1]["state"], "queued");

    // The server comes back on its address; alice's next command delivers the queue.
    h.start_server_again(&addr);
    h.ok("alice", &["group", "list"]);
    assert_eq!(h.ok("alice", &["outbox"]), "");
    assert_eq!(
        h.ok("bob", &["recv"]),
        format!(
            "{group}\talice@localhost/cli\twritten offline\n{group}\talice@localhost/cli\tsecond\n"
        )
    );
    // Exactly once.
    assert_eq!(h.ok("bob", &["recv"]), "");
}

#[test]
fn a_chat_started_while_the_server_is_down_queues_and_delivers_once_it_is_back() {
    let mut h = Harness::start();
    let group = alice_and_bob_in_team(&h);
    let addr = h.stop_server();

    // The chat starts from the profile and takes a line while the server is down.
    let mut chat = Chat::start(&h, "alice", &["--timeout", "1", "--json", "chat", "team"]);
    chat.type_line("typed offline");
    let queued = chat.next();
    assert_eq!(queued["event"], "queued", "{queued}");
    let id = queued["id"].as_str().unwrap().to_owned();

    // The server comes back on its address: the running chat sends the line (once) and
    // shows what bob answers.
    h.start_server_again(&addr);
    let got = json_lines(&h.ok("bob", &["--json", "recv", "--wait", "30"]));
    let got: Vec<(&str, &str)> = got
        .iter()
        .filter(|e| e["event"] == "message")
        .map(|e| (e["id"].as_str().unwrap(), e["text"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [(id.as_str(), "typed offline")]);
    h.ok("bob", &["send", &group, "welcome back"]);
    let answer = loop {
        let event = chat.next();
        if event["event"] == "message" {
            break event;
        }
        assert_eq!(event["event"], "outgoing", "{event}");
    };
    assert_eq!(
        (&answer["sender"], &answer["text"]),
        (&"bob@localhost/cli".into(), &"welcome back".into())
    );
    let out = chat.quit();
    assert!(out.status.success());
    let notes = String::from_utf8_lossy(&out.stderr);
    assert!(notes.contains("server unreachable"), "{notes}");
    assert!(notes.contains("waiting for it"), "{notes}");
    assert_eq!(h.ok("bob", &["recv"]), "");
    assert_eq!(h.ok("alice", &["outbox"]), "");
}

#[test]
fn push_endpoints_are_registered_checked_and_deleted() {
    let h = Harness::start();
    h.register("alice");
    let info = h.ok("alice", &["push", "info"]);
    assert!(info.starts_with("web push: VAPID key B"), "{info}");
    assert!(info.contains("apns: off\nfcm: off"), "{info}");
    let json = json_lines(&h.ok("alice", &["--json", "push", "info"]));
    assert_eq!(json[0]["vapid_public_key"].as_str().unwrap().len(), 87);

    // The default configuration refuses loopback endpoints (SSRF protection).
    let subscription = h.dir.path().join("subscription.json");
    std::fs::write(
        &subscription,
        r#"{"endpoint":"https://127.0.0.1:9/push/1","keys":{"p256dh":"BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB","auth":"AAAAAAAAAAAAAAAAAAAAAA"}}"#,
    )
    .unwrap();
    let err = h.fails(
        "alice",
        &[
            "push",
            "register",
            "--web-push",
            subscription.to_str().unwrap(),
        ],
    );
    assert!(err.contains("forbidden range"), "{err}");
    let err = h.fails("alice", &["push", "register", "--fcm", "token"]);
    assert!(err.contains("push provider"), "{err}");
    let err = h.fails(
        "alice",
        &["push", "register", "--apns", "zz", "--topic", "a.b"],
    );
    assert!(err.contains("hex"), "{err}");
    assert_eq!(
        h.ok("alice", &["push", "unregister"]),
        "no push endpoint was registered\n"
    );
}

#[test]
fn a_file_sent_with_send_file_is_saved_byte_identical_by_recv_download_dir() {
    let h = Harness::start();
    h.register("alice");
    h.register("bob");
    h.ok("alice", &["group", "create", "--name", "team"]);
    h.ok("alice", &["group", "invite", "team", "bob@localhost"]);
    let dir = tempfile::tempdir().unwrap();
    // 2.5 MiB of bytes that do not repeat.
    let bytes = pseudo_random(5 << 19);
    let photo = dir.path().join("photo.jpg");
    std::fs::write(&photo, &bytes).unwrap();
    let sent = json_lines(&h.ok(
        "alice",
        &["--json", "send", "team", "--file", photo.to_str().unwrap()],
    ));
    assert_eq!(sent[0]["file"], "photo.jpg");
    assert_eq!(sent[0]["size"], bytes.len());
    assert_eq!(sent[0]["media_type"], "image/jpeg");

    let downloads = dir.path().join("downloads");
    let out = h.ok(
        "bob",
        &["recv", "--download-dir", downloads.to_str().unwrap()],
    );
    let saved = downloads.join("photo.jpg");
    let group = h.ok("alice", &["group", "list"]);
    let group = group.split('\t').next().unwrap();
    assert_eq!(
        out,
        format!(
            "{group}\talice@localhost/cli\t[file photo.jpg ({} bytes, image/jpeg)]\nsaved {}\n",
            bytes.len(),
            saved.display()
        )
    );
    assert!(std::fs::read(&saved).unwrap() == bytes);

    // The same name again is saved next to it, not over it.
    h.ok(
        "alice",
        &["send", "team", "--file", photo.to_str().unwrap()],
    );
    let out = h.ok(
        "bob",
        &[
            "--json",
            "recv",
            "--download-dir",
            downloads.to_str().unwrap(),
        ],
    );
    let events = json_lines(&out);
    assert_eq!(events[0]["file"]["name"], "photo.jpg");
    assert_eq!(events[1]["event"], "saved");
    let second = downloads.join("photo (1).jpg");
    assert_eq!(events[1]["path"], second.display().to_string());
    assert!(std::fs::read(&second).unwrap() == bytes);

    // Without --download-dir the file is announced, not saved.
    h.ok(
        "alice",
        &["send", "team", "--file", photo.to_str().unwrap()],
    );
    let out = h.ok("bob", &["recv"]);
    assert!(
        out.ends_with(&format!(
            "[file photo.jpg ({} bytes, image/jpeg)]\n",
            bytes.len()
        )),
        "{out}"
    );
    assert_eq!(std::fs::read_dir(&downloads).unwrap().count(), 2);
}

/// `len` bytes that do not repeat (xorshift).
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Two homeservers, `alpha.test` and `beta.test`, federating over QUIC on 127.0.0.1 with
/// certificates from one CA, which the CLI profiles trust too.
struct Federation {
    runtime: tokio::runtime::Runtime,
    servers: Vec<Server>,
    ca_file: PathBuf,
    dir: tempfile::TempDir,
}

impl Federation {
    const DOMAINS: [&str; 2] = ["alpha.test", "beta.test"];

    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let ca_file = dir.path().join("ca.pem");
        let ca = roost_interop::pki::Ca::generate("cli", &ca_file).unwrap();
        let ports: Vec<std::net::SocketAddr> = Self::DOMAINS
            .iter()
            .map(|_| {
                std::net::UdpSocket::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
            })
            .collect();
        let mut servers = Vec::new();
        for (i, domain) in Self::DOMAINS.iter().enumerate() {
            let data_dir = dir.path().join(domain);
            std::fs::create_dir_all(&data_dir).unwrap();
            let issued = ca
                .issue(
                    &[domain.to_string()],
                    &data_dir.join("cert.pem"),
                    &data_dir.join("key.pem"),
                )
                .unwrap();
            let mut config = Config {
                domain: domain.to_string(),
                listen: ports[i],
                data_dir,
                tls_cert: Some(issued.cert_file),
                tls_key: Some(issued.key_file),
                ..Config::default()
            };
            config.federation.enabled = true;
            config.federation.ca_file = Some(ca_file.clone());
            config.federation.retry_initial_ms = 50;
            config.federation.retry_max_ms = 200;
            let peer = 1 - i;
            config.federation.peers.insert(
                Self::DOMAINS[peer].to_string(),
                roost_server::config::PeerConfig {
                    address: Some(ports[peer].to_string()),
                    addresses: Vec::new(),
                    certificate: None,
                },
            );
            let server = runtime
                .block_on(Server::start(config.validate().unwrap()))
                .unwrap();
            servers.push(server);
        }
        Self {
            runtime,
            servers,
            ca_file,
            dir,
        }
    }

    /// Runs `roost-cli --profile DIR/<profile> args...` and expects success; returns stdout.
    fn ok(&self, profile: &str, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .arg("--profile")
            .arg(self.dir.path().join(profile))
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("ROOST_PROFILE")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "roost-cli {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Registers `name` on the homeserver of `DOMAINS[server]`; returns the user id.
    fn register(&self, name: &str, server: usize) -> String {
        let user = format!("{name}@{}", Self::DOMAINS[server]);
        self.ok(
            name,
            &[
                "register",
                &user,
                "--server",
                &self.servers[server].local_addr().to_string(),
                "--ca",
                self.ca_file.to_str().unwrap(),
            ],
        );
        user
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        for server in self.servers.drain(..) {
            self.runtime.block_on(server.shutdown());
        }
    }
}

#[test]
fn a_file_sent_on_one_homeserver_is_saved_byte_identical_by_a_member_on_another() {
    let f = Federation::start();
    f.register("alice", 0);
    let bob = f.register("bob", 1);
    f.ok("alice", &["group", "create", "--name", "team"]);
    f.ok("alice", &["group", "invite", "team", &bob]);
    let files = tempfile::tempdir().unwrap();
    // 3 MiB and a few bytes: several chunks of every stream, and a short last one.
    let bytes = pseudo_random((3 << 20) + 7);
    let photo = files.path().join("photo.jpg");
    std::fs::write(&photo, &bytes).unwrap();
    f.ok(
        "alice",
        &["send", "team", "--file", photo.to_str().unwrap()],
    );

    // Bob's client talks only to beta, which fetches the blob from alpha. Federation is
    // asynchronous: wait until the message has reached bob's queue.
    let downloads = files.path().join("downloads");
    let saved = downloads.join("photo.jpg");
    let mut out = String::new();
    for _ in 0..10 {
        out += &f.ok(
            "bob",
            &[
                "recv",
                "--wait",
                "5",
                "--download-dir",
                downloads.to_str().unwrap(),
            ],
        );
        if out.contains("saved ") {
            break;
        }
    }
    assert!(
        out.ends_with(&format!(
            "\talice@alpha.test/cli\t[file photo.jpg ({} bytes, image/jpeg)]\nsaved {}\n",
            bytes.len(),
            saved.display()
        )),
        "{out}"
    );
    let saved = std::fs::read(&saved).unwrap();
    assert_eq!(saved.len(), bytes.len());
    assert_eq!(
        hex::encode(Sha256::digest(&saved)),
        hex::encode(Sha256::digest(&bytes)),
        "the saved file differs from the sent one"
    );
}
