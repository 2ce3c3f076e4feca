//! Members that the run kills: each is a `roost-cli --json chat` process with a profile of its
//! own, fed numbered lines on its standard input and read on its standard output. At random
//! times the run SIGKILLs the process (wherever it is: writing its profile, sending, printing)
//! and starts another one on the same profile a little later.
//!
//! What counts, as an app would see it:
//!
//! - a line answered `queued` is **acknowledged**: the SDK holds it in the profile's outgoing
//!   queue and promises to deliver it exactly once, also across the kill (the next process
//!   sends it); an `outgoing` event that says it failed turns it into a refusal;
//! - a line answered `not_sent` is refused; a line the process was killed before answering is
//!   **unknown** (it may or may not have been queued);
//! - events are handed out at least once: the event the process was printing when it was
//!   killed comes again from the next process. So the first event a restarted process prints
//!   is dropped when it is the killed one's last (an app does the same by message id); it is
//!   counted in [`KillTally::repeated`], and any other repeat is a duplicate.
//!
//! Now and then a member types `/update` instead of a message: a self-update commit, made
//! durable as the profile's pending commit before it leaves, so a kill at any point of it (before
//! the hub's answer, between the answer and the merge, while printing `keys_updated`) must
//! leave the member in the group, able to read and send, without a group error: the next
//! process sends the same commit again and merges it, or learns it lost. The run's usual
//! checks (every acknowledged message delivered once and in order, no group error, every
//! member able to send at the end) cover it.
//!
//! With [`Schedule::membership`], a member also changes the membership: it types
//! `/remove ROVER` or `/invite ROVER` (the rover that `m0` removes and invites back too), a
//! commit with a Welcome when it adds, killed anywhere in it like `/update`. Whichever of them
//! and `m0` commits first wins the epoch; the others are answered with a refusal (already a
//! member, not a member) or retried by the SDK.
//!
//! With [`Schedule::files`], a member sends some numbered messages as files: the run writes
//! the file (its name carries the number) and types `/file PATH`; the answer is `queued` or
//! `not_sent` like a line's, and a kill during the upload leaves the line unknown. Their chats
//! run with `--download-dir`: every file they are shown is saved (a kill mid-download shows
//! the message again in the next process, which saves it again); at the end each one must be
//! in the directory with the bytes sent.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use roost_client::MessageId;
use roost_protocol::{ClientId, GroupId, UserId};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::ledger::{self, Receipt, SendOutcome};
use super::{Files, Inbox, Ledger, SentIds, lock, random_between};

/// How long a killed member's process may take to answer one line before the line counts as
/// unknown and the process is killed (it hangs).
const ANSWER_LIMIT: Duration = Duration::from_secs(60);

/// What the kills of the members did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KillTally {
    /// SIGKILLs sent to members' processes.
    pub kills: u64,
    /// Processes started (the first of each member included).
    pub starts: u64,
    /// Processes that ended on their own (e.g. the chat could not reach its server at start).
    pub exits: u64,
    /// Events a restarted process handed out again: the one its killed predecessor printed
    /// last (at least once, as documented; dropped like an app drops it by id).
    pub repeated: u64,
    /// Their lines answered `queued` (counted in the run's acknowledged sends too).
    pub acknowledged: u64,
    /// Their lines whose process was killed before it answered.
    pub unknown: u64,
    /// Their `/update` lines answered `keys_updated`.
    pub updated: u64,
    /// Their `/update` lines answered `keys_not_updated` (e.g. the server was down).
    pub updates_refused: u64,
    /// Their `/update` lines whose process was killed (or ended) before it answered.
    pub updates_unknown: u64,
    /// Their `/invite ROVER` / `/remove ROVER` lines answered `invited` / `removed_members`.
    pub membership_done: u64,
    /// Those answered `not_invited` / `not_removed` (the rover was already in or out, the
    /// server was down).
    pub membership_refused: u64,
    /// Those whose process was killed (or ended) before it answered.
    pub membership_unknown: u64,
}

/// One member run as `roost-cli` processes.
pub(super) struct Killable {
    pub(super) index: usize,
    pub(super) name: String,
    pub(super) client: ClientId,
    pub(super) user: UserId,
    pub(super) inbox: Arc<Inbox>,
    profile: PathBuf,
    log: PathBuf,
    cli: PathBuf,
    /// Where its chats save the files they are shown.
    pub(super) downloads: PathBuf,
}

/// What every member's line handler needs.
pub(super) struct Shared {
    pub(super) group: GroupId,
    pub(super) ids: Arc<HashMap<ClientId, usize>>,
    pub(super) ledger: Ledger,
    pub(super) sent: SentIds,
    pub(super) refused_codes: Arc<Mutex<BTreeMap<String, u64>>>,
    pub(super) tally: Arc<Mutex<KillTally>>,
    pub(super) files: Files,
    /// The rover's user, for `/invite` and `/remove`.
    pub(super) rover: UserId,
    /// Where the files the members send are written for their `/file` lines.
    pub(super) file_dir: PathBuf,
}

/// A running `chat` process.
pub(super) struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Each typed line answered (the reader records the answer itself).
    answers: mpsc::UnboundedReceiver<Answered>,
    /// Ends with the last event line the process printed.
    reader: JoinHandle<Option<String>>,
}

impl Killable {
    /// Registers `user` with `roost-cli` (device `cli`) on the server at `servers`.
    pub(super) async fn register(
        index: usize,
        cli: PathBuf,
        profiles: &std::path::Path,
        user: UserId,
        servers: &[std::net::SocketAddr],
        ca: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let local = user.to_string();
        let short = local.split('@').next().unwrap_or("k").to_owned();
        let profile = profiles.join(&short);
        let log = profiles.join(format!("{short}.log"));
        let downloads = profiles.join(format!("{short}-downloads"));
        let servers: Vec<String> = servers.iter().map(ToString::to_string).collect();
        let out = Command::new(&cli)
            .arg("--profile")
            .arg(&profile)
            .args(["--timeout", "2", "register", &local, "--server"])
            .arg(servers.join(","))
            .arg("--ca")
            .arg(ca)
            .env_remove("ROOST_PROFILE")
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("cannot run {}", cli.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "roost-cli register {local}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let client = ClientId::from_str(&format!("{local}/cli"))
            .map_err(|err| anyhow::anyhow!("client id of {local}: {err}"))?;
        Ok(Self {
            index,
            name: local,
            client,
            user,
            inbox: Arc::new(Inbox::default()),
            profile,
            log,
            cli,
            downloads,
        })
    }

    fn command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = Command::new(&self.cli);
        command
            .arg("--profile")
            .arg(&self.profile)
            .args(["--json", "--timeout", "2"])
            .args(args)
            .env_remove("ROOST_PROFILE")
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        Ok(command)
    }

    /// Runs `recv` until this member has joined the group (at the start: nothing is sent yet,
    /// but what arrives is recorded all the same).
    pub(super) async fn join(&self, shared: &Shared, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.inbox.with(|s| s.in_group) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not join the group",
                self.name
            );
            let out = self
                .command(&["recv", "--wait", "5"])?
                .stdin(Stdio::null())
                .output()
                .await?;
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                absorb(self, shared, line);
            }
        }
        Ok(())
    }

    /// Starts a `chat` process; `last` is the last event line of the process before it.
    fn start(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        last: Option<String>,
    ) -> anyhow::Result<Session> {
        let group = shared.group.to_string();
        let downloads = self.downloads.to_string_lossy().into_owned();
        let mut child = self
            .command(&["chat", &group, "--download-dir", &downloads])?
            .stdin(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting a chat of {}", self.name))?;
        lock(&shared.tally).starts += 1;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("no stdout")?;
        let (answers_tx, answers) = mpsc::unbounded_channel();
        let (member, shared) = (self.clone(), shared.clone());
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut last = last;
            let mut first = true;
            while let Ok(Some(line)) = lines.next_line().await {
                match absorb_or_answer(&member, &shared, &line, first, last.as_deref()) {
                    Line::Answer(answered) => {
                        let _ = answers_tx.send(answered);
                    }
                    Line::Event => {
                        first = false;
                        last = Some(line);
                    }
                    Line::Other => {}
                }
            }
            last
        });
        Ok(Session {
            child,
            stdin,
            answers,
            reader,
        })
    }
}

impl Session {
    /// Types `text`, which is answered by `expected`; whether it was answered before the
    /// process ended and before `until`. Late answers to earlier lines are skipped.
    async fn type_line(&mut self, text: &str, expected: Answered, until: Instant) -> bool {
        let Some(stdin) = self.stdin.as_mut() else {
            return false;
        };
        let line = format!("{text}\n");
        if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
            return false;
        }
        let answered = async {
            while let Some(answered) = self.answers.recv().await {
                if answered == expected {
                    return true;
                }
            }
            false
        };
        tokio::time::timeout_at(until, answered)
            .await
            .unwrap_or(false)
    }

    /// SIGKILL; returns the last event line the process printed.
    async fn kill(mut self) -> Option<String> {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        self.reader.await.ok().flatten()
    }

    /// Ends the chat as a person does (end of input), or kills it if it does not end.
    pub(super) async fn quit(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        let _ = self.reader.await;
    }

    /// Whether the process ended on its own.
    fn ended(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

/// How to run a killed member.
#[derive(Clone, Copy)]
pub(super) struct Schedule {
    /// How long each process lives before its kill.
    pub(super) up: (Duration, Duration),
    /// How long the member stays dead.
    pub(super) down: (Duration, Duration),
    /// Pause after each acknowledged line.
    pub(super) send_interval: Duration,
    /// The chance of typing `/update` instead of the next message line.
    pub(super) updates: f64,
    /// The chance of sending the next message as a file (`/file`).
    pub(super) files: f64,
    /// The chance of typing `/invite ROVER` or `/remove ROVER` instead of the next line.
    pub(super) membership: f64,
    pub(super) seed: u64,
}

/// Sends numbered lines through chat processes killed and restarted at random until `stop`;
/// returns a running process for the end of the run.
pub(super) async fn run(
    member: Arc<Killable>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    schedule: Schedule,
) -> anyhow::Result<Session> {
    let mut rng = StdRng::seed_from_u64(schedule.seed);
    let mut last = None;
    loop {
        let mut session = member.start(&shared, last.take())?;
        if stop.load(Ordering::Relaxed) {
            return Ok(session);
        }
        let kill_at = Instant::now() + random_between(&mut rng, schedule.up);
        let mut backoff = Duration::from_millis(100);
        let killed = loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(session);
            }
            if Instant::now() >= kill_at {
                break true;
            }
            if session.ended() {
                break false;
            }
            if rng.random_bool(schedule.updates) {
                update(&shared, &mut session, kill_at).await;
                continue;
            }
            if rng.random_bool(schedule.membership) {
                let verb = if rng.random_bool(0.5) {
                    "/invite"
                } else {
                    "/remove"
                };
                let line = format!("{verb} {}", shared.rover);
                let until = kill_at.min(Instant::now() + ANSWER_LIMIT);
                if !session.type_line(&line, Answered::Membership, until).await {
                    lock(&shared.tally).membership_unknown += 1;
                }
                continue;
            }
            let file = rng.random_bool(schedule.files);
            let (outcome, _) = send_line(&member, &shared, &mut session, kill_at, file).await;
            let pause = match outcome {
                Some(SendOutcome::Acknowledged) => {
                    backoff = Duration::from_millis(100);
                    schedule.send_interval
                }
                Some(_) => {
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    backoff
                }
                // Killed or ended while the line waited for its answer.
                None => Duration::ZERO,
            };
            tokio::time::sleep_until((Instant::now() + pause).min(kill_at)).await;
        };
        if killed {
            lock(&shared.tally).kills += 1;
        } else {
            lock(&shared.tally).exits += 1;
        }
        last = session.kill().await;
        tokio::time::sleep(random_between(&mut rng, schedule.down)).await;
    }
}

/// Types `/update`; the reader counts the answer, this counts a line left unanswered.
async fn update(shared: &Shared, session: &mut Session, until: Instant) {
    let until = until.min(Instant::now() + ANSWER_LIMIT);
    if !session.type_line("/update", Answered::Update, until).await {
        lock(&shared.tally).updates_unknown += 1;
    }
}

/// Types the member's next numbered line (`/file PATH` when `file`) and records its fate; the
/// outcome is None when the answer did not come before `until` (or the process ended): the line
/// stays unknown.
pub(super) async fn send_line(
    member: &Killable,
    shared: &Shared,
    session: &mut Session,
    until: Instant,
    file: bool,
) -> (Option<SendOutcome>, u64) {
    let seq = {
        let mut ledger = lock(&shared.ledger);
        let mine = &mut ledger[member.index];
        let seq = mine.keys().next_back().map_or(1, |last| last + 1);
        mine.insert(seq, SendOutcome::Unknown);
        seq
    };
    let until = until.min(Instant::now() + ANSWER_LIMIT);
    // The reader records the answer (also one that comes after `until`).
    let mut text = ledger::message_text(member.index, seq);
    if file {
        let path = shared.file_dir.join(ledger::file_name(member.index, seq));
        let written = tokio::fs::create_dir_all(&shared.file_dir)
            .await
            .and(tokio::fs::write(&path, ledger::file_bytes(member.index, seq)).await);
        if written.is_ok() {
            text = format!("/file {}", path.display());
        }
    }
    if session.type_line(&text, Answered::Line(seq), until).await {
        (lock(&shared.ledger)[member.index].get(&seq).copied(), seq)
    } else {
        (None, seq)
    }
}

/// Records the answer to line `seq` unless the line's fate is known already (a refusal by an
/// `outgoing` event is not overwritten).
fn settle(shared: &Shared, member: usize, seq: u64, outcome: SendOutcome) {
    let mut ledger = lock(&shared.ledger);
    if let Some(entry) = ledger[member].get_mut(&seq)
        && *entry == SendOutcome::Unknown
    {
        *entry = outcome;
    }
}

/// What a typed line's answer was to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answered {
    /// Message line number .0.
    Line(u64),
    /// An `/update` line.
    Update,
    /// An `/invite` or `/remove` line.
    Membership,
}

enum Line {
    /// The answer to a typed line.
    Answer(Answered),
    /// An event of the SDK (handed out at least once).
    Event,
    Other,
}

fn absorb_or_answer(
    member: &Killable,
    shared: &Shared,
    line: &str,
    first: bool,
    last: Option<&str>,
) -> Line {
    let Ok(value) = serde_json::from_str::<Value>(line) else {
        return Line::Other;
    };
    match value.get("event").and_then(Value::as_str) {
        Some(answer @ ("queued" | "not_sent")) => {
            let file = value.get("file").and_then(Value::as_str);
            let seq = match file {
                Some(name) => ledger::parse_file_name(name),
                None => value
                    .get("text")
                    .and_then(Value::as_str)
                    .and_then(|text| ledger::parse_message(text.as_bytes())),
            }
            .filter(|(index, _)| *index == member.index)
            .map(|(_, seq)| seq);
            let id = value
                .get("id")
                .and_then(Value::as_str)
                .and_then(|id| MessageId::from_str(id).ok());
            let Some(seq) = seq else {
                return Line::Other;
            };
            if file.is_some() {
                let mut files = lock(&shared.files);
                if answer == "queued" {
                    files.sent += 1;
                } else {
                    files.upload_failures += 1;
                }
            }
            if answer == "queued"
                && let Some(id) = id
            {
                lock(&shared.sent).insert((member.index, seq), id);
                settle(shared, member.index, seq, SendOutcome::Acknowledged);
                Line::Answer(Answered::Line(seq))
            } else {
                let code = value
                    .pointer("/error/code")
                    .and_then(Value::as_str)
                    .unwrap_or("queued without an id");
                *lock(&shared.refused_codes)
                    .entry(format!("cli: {code}"))
                    .or_insert(0) += 1;
                settle(shared, member.index, seq, SendOutcome::Refused);
                Line::Answer(Answered::Line(seq))
            }
        }
        Some(answer @ ("keys_updated" | "keys_not_updated")) => {
            if value.get("group").and_then(Value::as_str) != Some(&shared.group.to_string()) {
                return Line::Other;
            }
            if answer == "keys_updated" {
                lock(&shared.tally).updated += 1;
            } else {
                lock(&shared.tally).updates_refused += 1;
                count_refusal(shared, &value, "cli update");
            }
            Line::Answer(Answered::Update)
        }
        Some(answer @ ("invited" | "removed_members" | "not_invited" | "not_removed")) => {
            if value.get("group").and_then(Value::as_str) != Some(&shared.group.to_string()) {
                return Line::Other;
            }
            if matches!(answer, "invited" | "removed_members") {
                lock(&shared.tally).membership_done += 1;
            } else {
                lock(&shared.tally).membership_refused += 1;
                count_refusal(shared, &value, &format!("cli {answer}"));
            }
            Line::Answer(Answered::Membership)
        }
        // The file of the message event before it, saved: part of that event (a process
        // killed after printing it shows the message again, and saves it again).
        Some("saved") => Line::Other,
        // A download that failed, and said so (e.g. the database was down).
        Some("not_saved") => {
            if let Some(file) = value
                .get("file")
                .and_then(Value::as_str)
                .and_then(ledger::parse_file_name)
            {
                member.inbox.with(|s| s.files_not_saved.push(file));
            }
            Line::Other
        }
        Some(_) => {
            if first && last == Some(line) {
                lock(&shared.tally).repeated += 1;
            } else {
                absorb_value(member, shared, &value);
            }
            Line::Event
        }
        None => Line::Other,
    }
}

/// Counts a refused line's error code (`error.code` of the answer) under `label`.
fn count_refusal(shared: &Shared, value: &Value, label: &str) {
    let code = value
        .pointer("/error/code")
        .and_then(Value::as_str)
        .unwrap_or("?");
    *lock(&shared.refused_codes)
        .entry(format!("{label}: {code}"))
        .or_insert(0) += 1;
}

/// Records an event line printed by `recv --json` or `chat --json`.
fn absorb(member: &Killable, shared: &Shared, line: &str) {
    if let Ok(value) = serde_json::from_str::<Value>(line) {
        absorb_value(member, shared, &value);
    }
}

fn absorb_value(member: &Killable, shared: &Shared, value: &Value) {
    let field = |name: &str| value.get(name).and_then(Value::as_str);
    let ours = field("group") == Some(shared.group.to_string().as_str());
    let inbox = &member.inbox;
    match field("event") {
        Some("message") => {
            let sender = field("sender").unwrap_or("?");
            let id = field("id").and_then(|id| MessageId::from_str(id).ok());
            let from = ClientId::from_str(sender)
                .ok()
                .and_then(|c| shared.ids.get(&c).copied());
            let numbered = match value.pointer("/file/name").and_then(Value::as_str) {
                Some(name) => ledger::parse_file_name(name),
                None => field("text").and_then(|text| ledger::parse_message(text.as_bytes())),
            };
            inbox.with(|s| {
                let file = value.pointer("/file/name").is_some();
                let receipt = match numbered {
                    Some((index, seq)) if ours && from == Some(index) => {
                        s.ids.push(((index, seq), id));
                        if file {
                            s.files.push((index, seq));
                        }
                        Receipt::Numbered { sender: index, seq }
                    }
                    _ => Receipt::Garbage(format!("{value} (as printed by roost-cli)")),
                };
                s.receipts.push(receipt);
            });
        }
        Some("joined") if ours => inbox.with(|s| {
            s.in_group = true;
            s.joins += 1;
        }),
        Some("removed") if ours => inbox.with(|s| s.in_group = false),
        Some("group_error" | "credential_rejected") => {
            inbox.with(|s| s.group_errors.push(value.to_string()));
        }
        Some("outgoing") if field("state") == Some("failed") => {
            let failed = field("id").and_then(|id| MessageId::from_str(id).ok());
            let seq = failed.and_then(|failed| {
                lock(&shared.sent)
                    .iter()
                    .find(|((sender, _), id)| *sender == member.index && **id == failed)
                    .map(|((_, seq), _)| *seq)
            });
            if let Some(seq) = seq {
                lock(&shared.ledger)[member.index].insert(seq, SendOutcome::Refused);
                *lock(&shared.refused_codes)
                    .entry("cli: outgoing failed".into())
                    .or_insert(0) += 1;
            }
        }
        _ => return,
    }
    inbox.changed.notify_waiters();
}
