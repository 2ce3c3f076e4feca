//! `roost-interop chaos`: real SDK clients send numbered messages and make membership commits
//! while homeserver processes are killed with SIGKILL and started again at random; afterwards
//! every acknowledged message must have reached every member exactly once, in each sender's
//! order, nothing must arrive that was not sent, every server must have reopened its database
//! after every kill, and every member must still be able to send.
//!
//! The run, with `clients` members `m0`, `m1`, ... spread over the domains (and nodes) and one
//! more member, the *rover*, on the last domain:
//!
//! 1. `m0` creates a group on `alpha.test` (the hub) and invites everyone.
//! 2. Every `m<i>` sends `chaos <i> <n>` for n = 1, 2, ... without pause beyond
//!    [`ChaosConfig::send_interval`]; each send is recorded as acknowledged, refused or unknown
//!    ([`ledger::SendOutcome`]). A number is never reused: after a lost answer the next send
//!    has the next number, so an unknown send may arrive once or not at all, never twice.
//! 3. Meanwhile `m0` removes the rover and invites it back, again and again (each commit is
//!    a real MLS commit through the DS, with a Welcome when adding).
//! 4. Meanwhile the controller runs `cycles` kill cycles: wait a random time, SIGKILL one
//!    homeserver process (with several nodes, one node), wait a random time, start it again
//!    on the same port and data directory and wait until it answers (its database reopened).
//!    With two domains, some cycles kill the other domain's server, restart it, and kill the
//!    hub right after, while the hub drains its federation outbox to it.
//! 5. Then the senders stop, the rover is made a member again, every member (the rover too)
//!    sends one more message until it is acknowledged, and the run waits until every member
//!    has everything it must have. [`ledger::analyze`] counts what is lost, duplicated, out of
//!    order, phantom or half-delivered.
//!
//! With PostgreSQL, [`ChaosConfig::database_kills`] of the cycles kill the database server
//! instead (`pg_ctl stop -m immediate`: every backend gone at once, no checkpoint, WAL replayed
//! at the restart), for every node of every domain at once; the homeservers are not touched
//! and must recover by themselves once it is back.
//!
//! The kill schedule (which server, how long up and down) comes from [`ChaosConfig::seed`];
//! the interleaving with the clients' traffic depends on timing and is not reproducible.
//!
//! With [`ChaosConfig::killed_clients`], more members run as `roost-cli --json chat`
//! processes that are SIGKILLed and restarted on their profiles at random ([`killed`]): what
//! their chat answered `queued` must arrive exactly once like any acknowledged message.
//! The in-process members are only ever disconnected.
//!
//! With [`ChaosConfig::files`], a member sends some of its numbered messages as attachments
//! ([`Client::send_file`]; `/file` in a killed member's chat): the file's name carries the
//! number and its bytes follow from it ([`ledger::file_bytes`]). The message counts like a text
//! one; in addition every in-process member downloads every attachment it receives (the
//! members of the other domain through their own homeserver's proxy download), retrying while
//! servers are down, and compares the bytes. An upload that fails sends nothing (the number
//! counts as refused). The run fails if an attachment is never downloaded or differs.

mod killed;
pub mod ledger;

pub use killed::KillTally;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use roost_client::transport::RequestError;
use roost_client::{
    Attachment, Client, ClientConfig, ClientError, Content, DownloadTarget, Event, FileSource,
    MessageId, OutgoingState,
};
use roost_protocol::{ClientId, ErrorCode, GroupId, UserId};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::harness::{Harness, HarnessConfig, Storage};
use ledger::{Receipt, SendOutcome, Tally};

/// The hub: the domain whose server hosts the group.
const HUB: usize = 0;
/// Longest one SDK operation may take before it counts as hung (its answer unknown).
const OPERATION_LIMIT: Duration = Duration::from_secs(60);
/// Attempts of each member's final send.
const FINAL_ATTEMPTS: u32 = 30;

/// How to run the chaos test.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// The `roost` binary.
    pub roost: PathBuf,
    /// Directory for servers and profiles (default: a temporary directory, kept on failure).
    pub dir: Option<PathBuf>,
    /// Kill cycles.
    pub cycles: usize,
    /// Sending members (the rover comes on top).
    pub clients: usize,
    /// Seed of the kill schedule.
    pub seed: u64,
    /// Domains: 1, or 2 (federation: the group lives on the first, members on both).
    pub domains: usize,
    /// Storage engine of every homeserver.
    pub storage: Storage,
    /// Nodes per domain (more than one needs PostgreSQL; single nodes are killed).
    pub nodes: usize,
    /// How long the servers run between kills (uniformly random in this range).
    pub up: (Duration, Duration),
    /// How long a killed server stays down.
    pub down: (Duration, Duration),
    /// Pause between two acknowledged sends of one member.
    pub send_interval: Duration,
    /// Pause between two membership commits.
    pub commit_interval: (Duration, Duration),
    /// How long the end of the run waits for every member to have everything.
    pub settle_timeout: Duration,
    /// Progress lines on stderr.
    pub progress: bool,
    /// `RUST_LOG` filter of the homeservers.
    pub server_log: String,
    /// Members run as `roost-cli --json chat` processes that are killed with SIGKILL at
    /// random (on top of `clients`; see [`killed`]). 0: none.
    pub killed_clients: usize,
    /// The `roost-cli` binary for them (default: built like the homeserver).
    pub roost_cli: Option<PathBuf>,
    /// How long each of their processes lives before it is killed (random in between).
    pub client_up: (Duration, Duration),
    /// How long a killed member stays dead.
    pub client_down: (Duration, Duration),
    /// The chance that a killed member types `/update` (a self-update commit) instead of its
    /// next message line. 0: they commit nothing.
    pub client_updates: f64,
    /// The chance that a member sends its next message as an attachment. 0: text only.
    pub files: f64,
    /// The chance that a killed member types `/invite ROVER` or `/remove ROVER` (half each)
    /// instead of its next line. 0: only `m0` changes the membership.
    pub client_membership: f64,
    /// With PostgreSQL: the chance that a cycle kills the database server (down as long as a
    /// killed homeserver) instead of a homeserver. Ignored with redb.
    pub database_kills: f64,
}

impl ChaosConfig {
    /// The long run's defaults: 200 cycles, 4 members, one domain on redb.
    pub fn new(roost: PathBuf) -> Self {
        Self {
            roost,
            dir: None,
            cycles: 200,
            clients: 4,
            seed: rand::random(),
            domains: 1,
            storage: Storage::Redb,
            nodes: 1,
            up: (Duration::from_millis(300), Duration::from_millis(2_000)),
            down: (Duration::from_millis(0), Duration::from_millis(500)),
            send_interval: Duration::from_millis(20),
            commit_interval: (Duration::from_millis(500), Duration::from_millis(2_500)),
            settle_timeout: Duration::from_secs(120),
            progress: true,
            server_log: "info".into(),
            killed_clients: 0,
            roost_cli: None,
            client_up: (Duration::from_millis(300), Duration::from_millis(3_000)),
            client_down: (Duration::ZERO, Duration::from_millis(300)),
            client_updates: 0.1,
            files: 0.02,
            client_membership: 0.05,
            database_kills: 0.1,
        }
    }
}

/// Membership commits `m0` made.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CommitTally {
    /// Acknowledged (rover removed or added).
    pub acknowledged: u64,
    /// Failed or outcome unknown.
    pub failed: u64,
    /// The first failures, in words.
    pub failure_samples: Vec<String>,
}

/// Attachments sent and downloaded.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FileTally {
    /// Attachment messages queued after their upload (in-process members' and killed ones').
    pub sent: u64,
    /// Attachments whose upload (or queueing) failed, so that their message was not sent
    /// (counted as refused sends).
    pub upload_failures: u64,
    /// Attachment messages the in-process members received (each is downloaded).
    pub received: u64,
    /// Of those, downloaded and byte-identical to what was sent.
    pub downloaded: u64,
    /// Download attempts that failed and were tried again (a server down, a rate limit).
    pub download_retries: u64,
    /// Downloaded whole, but the bytes differ from what was sent.
    pub corrupt: u64,
    /// Never downloaded by the end of the run.
    pub not_downloaded: u64,
    /// Attachments the killed members' chats were shown, found saved in their download
    /// directory with the bytes sent.
    pub saved_by_killed: u64,
    /// Of those, not found saved (or only with other bytes) although no failure was reported.
    pub not_saved_by_killed: u64,
    /// Not found saved, the chat having reported the download failed (`not_saved`: e.g. the
    /// database was down; roost-cli does not try such a download again).
    pub save_failed_reported: u64,
    /// `.part` files left in the killed members' download directories (downloads cut by a
    /// kill; the next process saved the file under another name).
    pub parts_left: u64,
    /// The first problems, in words.
    pub samples: Vec<String>,
}

impl FileTally {
    fn sample(&mut self, text: impl FnOnce() -> String) {
        if self.samples.len() < 10 {
            self.samples.push(text());
        }
    }
}

type Files = Arc<Mutex<FileTally>>;

/// What a chaos run found.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    /// The seed of the kill schedule.
    pub seed: u64,
    /// Storage engine.
    pub backend: String,
    /// Domains.
    pub domains: usize,
    /// Nodes per domain.
    pub nodes: usize,
    /// Sending members (the rover not counted).
    pub clients: usize,
    /// Kill cycles completed.
    pub cycles: usize,
    /// SIGKILLs sent to homeserver processes.
    pub kills: u64,
    /// Of those, of the hub's processes.
    pub hub_kills: u64,
    /// Of those, hub kills right after the other domain came back (its outbox draining).
    pub hub_kills_mid_drain: u64,
    /// Kills of the PostgreSQL server (every node's database at once).
    pub database_kills: u64,
    /// Restarts after which the server answered again (its database reopened).
    pub restarts: u64,
    /// Restarts that failed, with the server's log tail.
    pub restart_failures: Vec<String>,
    /// Membership commits.
    pub commits: CommitTally,
    /// Refused sends by error code.
    pub refused_codes: BTreeMap<String, u64>,
    /// Message deliveries.
    #[serde(flatten)]
    pub deliveries: Tally,
    /// Members whose send after the run was acknowledged and received by every other member.
    pub sent_after: usize,
    /// `GroupError` events the members reported (e.g. a member that fell behind rejoining).
    pub group_errors: u64,
    /// The first of those, in words.
    pub group_error_samples: Vec<String>,
    /// Members run as `roost-cli` processes and killed at random.
    pub killed_clients: usize,
    /// What their kills did.
    pub member_kills: KillTally,
    /// Attachments.
    pub files: FileTally,
    /// Wall time of the whole run, servers' start included (s).
    pub elapsed_secs: f64,
    /// Why the run failed (empty: it passed).
    pub failures: Vec<String>,
    /// Where the servers' logs and data are (kept when the run failed).
    pub dir: Option<PathBuf>,
}

impl ChaosReport {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The report in words.
    pub fn write_text(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let t = &self.deliveries;
        writeln!(
            out,
            "chaos: seed {}, backend {}, {} domain(s) x {} node(s), {} clients + rover",
            self.seed, self.backend, self.domains, self.nodes, self.clients
        )?;
        writeln!(
            out,
            "cycles {}  kills {} (hub {}, hub mid-drain {}), database kills {}  restarts {} ok, \
             {} failed",
            self.cycles,
            self.kills,
            self.hub_kills,
            self.hub_kills_mid_drain,
            self.database_kills,
            self.restarts,
            self.restart_failures.len()
        )?;
        writeln!(
            out,
            "sends: {} acknowledged, {} unknown ({} of them delivered), {} refused {:?}",
            t.acknowledged, t.unknown, t.unknown_delivered, t.refused, self.refused_codes
        )?;
        writeln!(
            out,
            "commits: {} acknowledged, {} failed",
            self.commits.acknowledged, self.commits.failed
        )?;
        writeln!(
            out,
            "received {}: lost {}, duplicated {}, out of order {}, phantom {}, partial {}",
            t.received, t.lost, t.duplicated, t.out_of_order, t.phantom, t.partial
        )?;
        if self.killed_clients > 0 {
            let k = &self.member_kills;
            writeln!(
                out,
                "killed members {}: {} kills, {} processes started, {} ended on their own, \
                 {} events handed out again after a kill; their sends {} acknowledged, {} unknown; \
                 their key updates {} done, {} refused, {} unknown; their invites and \
                 removals of the rover {} done, {} refused, {} unknown",
                self.killed_clients,
                k.kills,
                k.starts,
                k.exits,
                k.repeated,
                k.acknowledged,
                k.unknown,
                k.updated,
                k.updates_refused,
                k.updates_unknown,
                k.membership_done,
                k.membership_refused,
                k.membership_unknown
            )?;
        }
        let f = &self.files;
        if f.sent + f.upload_failures > 0 {
            writeln!(
                out,
                "files: {} sent, {} uploads failed; received {}: {} downloaded identical ({} \
                 attempts retried), {} corrupt, {} never downloaded; saved by killed members' \
                 chats {}, not saved {}, failed and reported {} ({} .part files left)",
                f.sent,
                f.upload_failures,
                f.received,
                f.downloaded,
                f.download_retries,
                f.corrupt,
                f.not_downloaded,
                f.saved_by_killed,
                f.not_saved_by_killed,
                f.save_failed_reported,
                f.parts_left
            )?;
            for sample in &f.samples {
                writeln!(out, "  file: {sample}")?;
            }
        }
        writeln!(
            out,
            "members able to send afterwards: {}/{}  group errors: {}  time {:.1} s",
            self.sent_after,
            self.clients + 1 + self.killed_clients,
            self.group_errors,
            self.elapsed_secs
        )?;
        for sample in &self.commits.failure_samples {
            writeln!(out, "  commit failed: {sample}")?;
        }
        for sample in &self.group_error_samples {
            writeln!(out, "  group error: {sample}")?;
        }
        for finding in &t.findings {
            writeln!(out, "  finding: {finding}")?;
        }
        for failure in &self.restart_failures {
            writeln!(out, "  restart failed: {failure}")?;
        }
        if self.passed() {
            writeln!(out, "PASSED")?;
        } else {
            for failure in &self.failures {
                writeln!(out, "FAILED: {failure}")?;
            }
            if let Some(dir) = &self.dir {
                writeln!(out, "logs and data kept in {}", dir.display())?;
            }
        }
        Ok(())
    }
}

/// What one member's event pump collected.
#[derive(Default)]
struct InboxState {
    receipts: Vec<Receipt>,
    /// The message id each numbered message came with (checked at the end against the id
    /// its sender's `send` returned).
    ids: Vec<((usize, u64), Option<MessageId>)>,
    /// Whether this member is in the group, by its last Joined / RemovedFromGroup event.
    in_group: bool,
    joins: u64,
    /// The attachments among the numbered messages (killed members: to find them saved).
    files: Vec<(usize, u64)>,
    /// Attachments whose download a killed member's chat reported failed (`not_saved`).
    files_not_saved: Vec<(usize, u64)>,
    group_errors: Vec<String>,
    stream_error: Option<String>,
}

#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    changed: Notify,
}

impl Inbox {
    fn with<T>(&self, f: impl FnOnce(&mut InboxState) -> T) -> T {
        match self.state.lock() {
            Ok(mut state) => f(&mut state),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }
}

/// One member: its client and what it received.
struct Peer {
    name: String,
    client: Arc<Client>,
    inbox: Arc<Inbox>,
    pump: Option<JoinHandle<()>>,
    /// Downloads the attachments the pump hands it.
    downloader: Option<JoinHandle<()>>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        for task in [self.pump.take(), self.downloader.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}

/// An attachment to download: message `seq` of member `sender`.
struct Download {
    sender: usize,
    seq: u64,
    attachment: Attachment,
}

/// Downloads every attachment `jobs` brings until it arrives intact (or `stop`), and counts.
async fn downloader(
    client: Arc<Client>,
    name: String,
    mut jobs: mpsc::UnboundedReceiver<Download>,
    files: Files,
    stop: Arc<AtomicBool>,
) {
    while let Some(job) = jobs.recv().await {
        let expected = ledger::file_bytes(job.sender, job.seq);
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut bytes = Vec::new();
            let fetch = client.download(
                &job.attachment,
                DownloadTarget::Writer(&mut bytes),
                |_, _| {},
            );
            let result = tokio::time::timeout(OPERATION_LIMIT, fetch).await;
            let done = {
                let mut files = lock(&files);
                match result {
                    Ok(Ok(_)) if bytes == expected => {
                        files.downloaded += 1;
                        true
                    }
                    Ok(Ok(size)) => {
                        files.corrupt += 1;
                        files.sample(|| {
                            format!(
                                "{name}: {} differs from what was sent ({size} bytes, {} \
                                 expected)",
                                job.attachment.name(),
                                expected.len()
                            )
                        });
                        true
                    }
                    Ok(Err(_)) | Err(_) if stop.load(Ordering::Relaxed) => {
                        files.not_downloaded += 1;
                        let why = match result {
                            Ok(Err(err)) => err.to_string(),
                            _ => "timed out".into(),
                        };
                        files.sample(|| {
                            format!("{name}: {} never downloaded: {why}", job.attachment.name())
                        });
                        true
                    }
                    Ok(Err(_)) | Err(_) => {
                        files.download_retries += 1;
                        false
                    }
                }
            };
            if done {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// Every member's sends (index = member).
type Ledger = Arc<Mutex<Vec<BTreeMap<u64, SendOutcome>>>>;

/// The id `send` returned for each (member, number).
type SentIds = Arc<Mutex<HashMap<(usize, u64), MessageId>>>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Keeps every event of `client` that concerns the run.
async fn pump(
    client: Arc<Client>,
    inbox: Arc<Inbox>,
    group: Arc<std::sync::OnceLock<GroupId>>,
    ids: Arc<HashMap<ClientId, usize>>,
    (downloads, files): (mpsc::UnboundedSender<Download>, Files),
) {
    loop {
        let event = match client.next_event().await {
            Ok(event) => event,
            Err(err) => {
                inbox.with(|s| s.stream_error = Some(err.to_string()));
                inbox.changed.notify_waiters();
                return;
            }
        };
        let ours = |g: &GroupId| group.get() == Some(g);
        inbox.with(|s| match event {
            Event::Message {
                group: g,
                sender,
                id,
                bytes,
            } => {
                let (numbered, attachment) = match Content::decode(&bytes) {
                    Ok(Content::Text(text)) => (ledger::parse_message(text.as_bytes()), None),
                    Ok(Content::Attachment(attachment)) => {
                        (ledger::parse_file_name(attachment.name()), Some(attachment))
                    }
                    _ => (None, None),
                };
                let receipt = match numbered {
                    Some((index, seq)) if ours(&g) && ids.get(&sender) == Some(&index) => {
                        s.ids.push(((index, seq), id));
                        if let Some(attachment) = attachment {
                            lock(&files).received += 1;
                            let job = Download {
                                sender: index,
                                seq,
                                attachment,
                            };
                            let _ = downloads.send(job);
                        }
                        Receipt::Numbered { sender: index, seq }
                    }
                    _ => Receipt::Garbage(format!(
                        "{:?} from {sender} in {g}",
                        String::from_utf8_lossy(&bytes)
                    )),
                };
                s.receipts.push(receipt);
            }
            Event::Joined { group: g, .. } if ours(&g) => {
                s.in_group = true;
                s.joins += 1;
            }
            Event::RemovedFromGroup { group: g, .. } if ours(&g) => s.in_group = false,
            Event::GroupError { group: g, reason } => {
                s.group_errors.push(format!("{g}: {reason}"));
            }
            Event::CredentialRejected { reason, .. } => {
                s.group_errors
                    .push(format!("credential rejected: {reason}"));
            }
            _ => {}
        });
        inbox.changed.notify_waiters();
    }
}

/// How a failed send ended: refused by the server (nothing accepted), or unknown.
fn classify(err: &ClientError) -> (SendOutcome, String) {
    match err {
        // A forwarding server's answer when the hub's was lost: "may or may not have been
        // applied" (PROTOCOL.md §8.2).
        ClientError::Request(RequestError::Server(wire))
            if wire.code == ErrorCode::PEER_UNREACHABLE =>
        {
            (SendOutcome::Unknown, String::new())
        }
        ClientError::Request(RequestError::Server(wire)) => {
            (SendOutcome::Refused, format!("{:?}", wire.code))
        }
        // The answer may have been lost after the server accepted the message.
        ClientError::Request(_) => (SendOutcome::Unknown, String::new()),
        // Failed before anything was sent (local state, MLS).
        other => (SendOutcome::Refused, format!("client: {other}")),
    }
}

/// Sends message `seq` of member `index` (as an attachment when `file` is given) and records
/// how it ended.
async fn send_numbered(
    client: &Client,
    group: &GroupId,
    index: usize,
    (ledger, sent): (&Ledger, &SentIds),
    refused_codes: &Mutex<BTreeMap<String, u64>>,
    file: Option<&Files>,
) -> (SendOutcome, u64) {
    let seq = {
        let mut ledger = lock(ledger);
        let mine = &mut ledger[index];
        let seq = mine.keys().next_back().map_or(1, |last| last + 1);
        // Recorded before it leaves: if this task dies, the send counts as unknown.
        mine.insert(seq, SendOutcome::Unknown);
        seq
    };
    let text = ledger::message_text(index, seq);
    let attachment = match file {
        None => None,
        Some(files) => match upload(client, index, seq).await {
            Ok(attachment) => Some(attachment),
            Err(code) => {
                lock(files).upload_failures += 1;
                *lock(refused_codes).entry(code).or_insert(0) += 1;
                lock(ledger)[index].insert(seq, SendOutcome::Refused);
                return (SendOutcome::Refused, seq);
            }
        },
    };
    // Queued, then delivered: acknowledged once the hub accepted it (nothing left to send and
    // the message not failed). One still queued when this gives up goes out later, once.
    let send_and_flush = async {
        // As text content, so that roost-cli members show it as text.
        let id = match &attachment {
            Some(attachment) => {
                let id = client
                    .send_content(group, &Content::Attachment(attachment.clone()))
                    .await?;
                if let Some(files) = file {
                    lock(files).sent += 1;
                }
                id
            }
            None => client.send_text(group, &text).await?,
        };
        lock(sent).insert((index, seq), id);
        let flushed = client.flush().await;
        let left = client.outbox().await?.into_iter().find(|m| m.id == id);
        match flushed {
            // Still queued (the hub unreachable, or the group waiting for commits on their
            // way): the SDK goes on delivering it, once; whether it went is not known here.
            Err(_)
                if left
                    .as_ref()
                    .is_some_and(|m| m.state == OutgoingState::Queued) =>
            {
                Ok(Some((id, OutgoingState::Queued)))
            }
            Err(err) => Err(err),
            Ok(()) => Ok::<_, ClientError>(left.map(|m| (id, m.state))),
        }
    };
    let outcome = match tokio::time::timeout(OPERATION_LIMIT, send_and_flush).await {
        Ok(Ok(None)) => SendOutcome::Acknowledged,
        Ok(Ok(Some((_, OutgoingState::Queued)))) => SendOutcome::Unknown,
        Ok(Ok(Some((id, state)))) => {
            let code = match state {
                OutgoingState::Failed(roost_client::SendFailure::Refused { code, .. }) => {
                    format!("{code:?}")
                }
                other => format!("client: {other:?}"),
            };
            *lock(refused_codes).entry(code).or_insert(0) += 1;
            let _ = client.dismiss(id).await;
            SendOutcome::Refused
        }
        Ok(Err(err)) => {
            let (outcome, code) = classify(&err);
            if outcome == SendOutcome::Refused {
                *lock(refused_codes).entry(code).or_insert(0) += 1;
            }
            outcome
        }
        Err(_) => SendOutcome::Unknown,
    };
    lock(ledger)[index].insert(seq, outcome);
    (outcome, seq)
}

/// Encrypts and uploads attachment `seq` of member `index`; on failure, the refusal's code.
async fn upload(client: &Client, index: usize, seq: u64) -> Result<Attachment, String> {
    let bytes = ledger::file_bytes(index, seq);
    let size = bytes.len() as u64;
    let source = FileSource::reader(
        std::io::Cursor::new(bytes),
        size,
        ledger::file_name(index, seq),
        "application/octet-stream",
    );
    let upload = client.upload_file(source, |_, _| {});
    match tokio::time::timeout(OPERATION_LIMIT, upload).await {
        Ok(Ok(attachment)) => Ok(attachment),
        Ok(Err(ClientError::Request(RequestError::Server(wire)))) => {
            Err(format!("upload: {:?}", wire.code))
        }
        Ok(Err(ClientError::Request(_))) => Err("upload: connection".into()),
        Ok(Err(err)) => Err(format!("upload: client: {err}")),
        Err(_) => Err("upload: timed out".into()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn sender_loop(
    client: Arc<Client>,
    group: GroupId,
    index: usize,
    (ledger, sent): (Ledger, SentIds),
    refused_codes: Arc<Mutex<BTreeMap<String, u64>>>,
    stop: Arc<AtomicBool>,
    interval: Duration,
    (files, chance, seed): (Files, f64, u64),
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Ordering::Relaxed) {
        let file = rng.random_bool(chance).then_some(&files);
        let (outcome, _) = send_numbered(
            &client,
            &group,
            index,
            (&ledger, &sent),
            &refused_codes,
            file,
        )
        .await;
        if outcome == SendOutcome::Acknowledged {
            backoff = Duration::from_millis(100);
            tokio::time::sleep(interval).await;
        } else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// `m0` removes the rover and invites it back, again and again.
#[allow(clippy::too_many_arguments)]
async fn committer_loop(
    client: Arc<Client>,
    group: GroupId,
    rover: (ClientId, UserId),
    stop: Arc<AtomicBool>,
    interval: (Duration, Duration),
    seed: u64,
    tally: Arc<Mutex<CommitTally>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(random_between(&mut rng, interval)).await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let result = toggle_rover(&client, &group, &rover).await;
        let mut tally = lock(&tally);
        match result {
            Ok(_) => tally.acknowledged += 1,
            Err(err) => {
                tally.failed += 1;
                if tally.failure_samples.len() < 10 {
                    tally.failure_samples.push(format!("{err:#}"));
                }
            }
        }
    }
}

/// Removes the rover if it is a member (in `client`'s view), else invites it.
async fn toggle_rover(
    client: &Client,
    group: &GroupId,
    (rover, user): &(ClientId, UserId),
) -> anyhow::Result<bool> {
    let members = client.members(group).await?;
    let users = std::slice::from_ref(user);
    let added = !members.contains(rover);
    let call = async {
        if added {
            client.invite(group, users).await
        } else {
            client.remove_users(group, users).await
        }
    };
    tokio::time::timeout(OPERATION_LIMIT, call)
        .await
        .context("commit hung")??;
    Ok(added)
}

fn random_between(rng: &mut StdRng, (low, high): (Duration, Duration)) -> Duration {
    if high <= low {
        return low;
    }
    let ms = rng.random_range(low.as_millis()..=high.as_millis());
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// A client configuration for the chaos run: a lost server is noticed within ~2 s, not 30.
fn chaos_client_config(mut config: ClientConfig) -> ClientConfig {
    let connect = &mut config.connect;
    connect.idle_timeout = Duration::from_secs(2);
    connect.keep_alive_interval = Some(Duration::from_millis(400));
    connect.connect_timeout = Duration::from_secs(2);
    connect.request_timeout = Duration::from_secs(5);
    config.listen_retry = Duration::from_millis(200);
    config.max_commit_attempts = 16;
    config
}

/// Runs the chaos test; the report says whether it passed. An error means the run could not
/// be set up (servers did not start, registration failed), not that a check failed.
pub async fn run(config: ChaosConfig) -> anyhow::Result<ChaosReport> {
    if !(1..=2).contains(&config.domains) {
        bail!("--domains must be 1 or 2");
    }
    if config.clients < 2 {
        bail!("--clients must be at least 2");
    }
    if config.nodes > 1 && config.storage != Storage::Postgres {
        bail!("--nodes {} needs --backend postgres", config.nodes);
    }
    let cli = match (config.killed_clients, &config.roost_cli) {
        (0, _) => None,
        (_, Some(cli)) => Some(cli.clone()),
        (_, None) => Some(crate::binary::build_cli(
            &crate::binary::Profile::of_current_exe(),
        )?),
    };
    let started = Instant::now();
    let temp = match &config.dir {
        Some(_) => None,
        None => Some(tempfile::Builder::new().prefix("roost-chaos-").tempdir()?),
    };
    let dir = match (&config.dir, &temp) {
        (Some(dir), _) => std::path::absolute(dir)?,
        (None, Some(temp)) => temp.path().to_owned(),
        (None, None) => bail!("no directory"),
    };
    let mut harness_config = HarnessConfig::new(&config.roost, dir.join("servers"), config.domains);
    harness_config.storage = config.storage;
    harness_config.nodes = config.nodes;
    harness_config.log_filter = Some(config.server_log.clone());
    let mut harness = Harness::start(harness_config).await?;
    let mut report = run_with(&config, &mut harness, &dir.join("profiles"), cli).await?;
    if let Err(err) = harness.shutdown().await {
        report
            .failures
            .push(format!("stopping the servers: {err:#}"));
    }
    report.elapsed_secs = started.elapsed().as_secs_f64();
    report.dir = if report.passed() {
        config.dir.clone()
    } else {
        Some(match temp {
            Some(temp) => temp.keep(),
            None => dir,
        })
    };
    Ok(report)
}

async fn run_with(
    config: &ChaosConfig,
    harness: &mut Harness,
    profiles: &std::path::Path,
    cli: Option<PathBuf>,
) -> anyhow::Result<ChaosReport> {
    std::fs::create_dir_all(profiles)?;
    let mut rng = StdRng::seed_from_u64(config.seed);
    // In-process members (the rover last), then the killed ones.
    let total = config.clients + 1;
    let rover_index = config.clients;
    let everyone = total + config.killed_clients;
    // Register everyone (no faults yet).
    let mut clients = Vec::with_capacity(total);
    let mut names = Vec::with_capacity(total);
    for index in 0..total {
        let (domain, node, name) = if index == rover_index {
            (config.domains - 1, config.nodes - 1, "rover".to_owned())
        } else {
            (
                index % config.domains,
                (index / config.domains) % config.nodes,
                format!("m{index}"),
            )
        };
        let domain_name = harness.server(domain)?.domain.clone();
        let user: UserId = format!("{name}@{domain_name}").parse()?;
        let client_config = chaos_client_config(harness.node_client_config(domain, node)?);
        let client = Client::register(
            client_config,
            profiles.join(format!("{name}.redb")),
            user,
            "phone".parse()?,
        )
        .await
        .with_context(|| format!("registering {name}"))?;
        clients.push(Arc::new(client));
        names.push(format!("{name}@{domain_name}"));
    }
    let mut killables = Vec::with_capacity(config.killed_clients);
    if let Some(cli) = &cli {
        for k in 0..config.killed_clients {
            let (domain, node) = (k % config.domains, (k / config.domains) % config.nodes);
            let domain_name = harness.server(domain)?.domain.clone();
            let user: UserId = format!("k{k}@{domain_name}").parse()?;
            let member = killed::Killable::register(
                total + k,
                cli.clone(),
                profiles,
                user,
                &harness.addresses_from(domain, node)?,
                harness.ca_file(),
            )
            .await?;
            names.push(member.name.clone());
            killables.push(Arc::new(member));
        }
    }
    let ids: Arc<HashMap<ClientId, usize>> = Arc::new(
        clients
            .iter()
            .enumerate()
            .map(|(i, c)| (c.client_id().clone(), i))
            .chain(killables.iter().map(|k| (k.client.clone(), k.index)))
            .collect(),
    );
    let group_cell = Arc::new(std::sync::OnceLock::new());
    let files: Files = Arc::default();
    let downloads_stop = Arc::new(AtomicBool::new(false));
    let peers: Vec<Peer> = clients
        .iter()
        .zip(&names)
        .map(|(client, name)| {
            let inbox = Arc::new(Inbox::default());
            let (jobs, queue) = mpsc::unbounded_channel();
            let pump = tokio::spawn(
                pump(
                    client.clone(),
                    inbox.clone(),
                    group_cell.clone(),
                    ids.clone(),
                    (jobs, files.clone()),
                )
                .instrument(tracing::info_span!("member", name = %name)),
            );
            let downloader = tokio::spawn(
                downloader(
                    client.clone(),
                    name.clone(),
                    queue,
                    files.clone(),
                    downloads_stop.clone(),
                )
                .instrument(tracing::info_span!("member", name = %name)),
            );
            Peer {
                name: name.clone(),
                client: client.clone(),
                inbox,
                pump: Some(pump),
                downloader: Some(downloader),
            }
        })
        .collect();
    drop(clients);

    let creator = &peers[0];
    let group = creator
        .client
        .create_group()
        .await
        .context("creating the group")?;
    let _ = group_cell.set(group.clone());
    let others: Vec<UserId> = peers[1..]
        .iter()
        .map(|p| p.client.user_id().clone())
        .chain(killables.iter().map(|k| k.user.clone()))
        .collect();
    creator
        .client
        .invite(&group, &others)
        .await
        .context("inviting the members")?;
    for peer in &peers[1..] {
        wait_for(peer, "joining the group", Duration::from_secs(60), |s| {
            s.in_group
        })
        .await?;
    }
    let ledger: Ledger = Arc::new(Mutex::new(vec![BTreeMap::new(); everyone]));
    let sent: SentIds = Arc::new(Mutex::new(HashMap::new()));
    let refused_codes = Arc::new(Mutex::new(BTreeMap::new()));
    let shared = Arc::new(killed::Shared {
        group: group.clone(),
        ids: ids.clone(),
        ledger: ledger.clone(),
        sent: sent.clone(),
        refused_codes: refused_codes.clone(),
        tally: Arc::new(Mutex::new(KillTally::default())),
        files: files.clone(),
        rover: peers[rover_index].client.user_id().clone(),
        file_dir: profiles.join("files"),
    });
    for member in &killables {
        member.join(&shared, Duration::from_secs(60)).await?;
    }
    let setup_started = Instant::now();
    let progress = |what: String| {
        if config.progress {
            eprintln!(
                "chaos [{:6.1} s]: {what}",
                setup_started.elapsed().as_secs_f64()
            );
        }
    };
    progress(format!(
        "{total} members in {group}; {} kill cycles, seed {}",
        config.cycles, config.seed
    ));

    // Traffic.
    let stop = Arc::new(AtomicBool::new(false));
    let killed_runs: Vec<JoinHandle<anyhow::Result<killed::Session>>> = killables
        .iter()
        .map(|member| {
            let schedule = killed::Schedule {
                up: config.client_up,
                down: config.client_down,
                send_interval: config.send_interval,
                updates: config.client_updates,
                files: config.files,
                membership: config.client_membership,
                seed: config.seed ^ (0xc11e_0000 + member.index as u64),
            };
            tokio::spawn(killed::run(
                member.clone(),
                shared.clone(),
                stop.clone(),
                schedule,
            ))
        })
        .collect();
    let senders: Vec<JoinHandle<()>> = peers[..config.clients]
        .iter()
        .enumerate()
        .map(|(index, peer)| {
            tokio::spawn(
                sender_loop(
                    peer.client.clone(),
                    group.clone(),
                    index,
                    (ledger.clone(), sent.clone()),
                    refused_codes.clone(),
                    stop.clone(),
                    config.send_interval,
                    (
                        files.clone(),
                        config.files,
                        config.seed ^ (0xf11e_0000 + index as u64),
                    ),
                )
                .instrument(tracing::info_span!("member", name = %peer.name)),
            )
        })
        .collect();
    let commits = Arc::new(Mutex::new(CommitTally::default()));
    let rover = &peers[rover_index];
    let rover_id = (
        rover.client.client_id().clone(),
        rover.client.user_id().clone(),
    );
    let committer = tokio::spawn(
        committer_loop(
            creator.client.clone(),
            group.clone(),
            rover_id.clone(),
            stop.clone(),
            config.commit_interval,
            config.seed ^ 0x5eed,
            commits.clone(),
        )
        .instrument(tracing::info_span!("member", name = %creator.name)),
    );

    // Faults.
    let mut report = ChaosReport {
        seed: config.seed,
        backend: match config.storage {
            Storage::Redb => "redb".into(),
            Storage::Postgres => "postgres".into(),
        },
        domains: config.domains,
        nodes: config.nodes,
        clients: config.clients,
        cycles: 0,
        kills: 0,
        hub_kills: 0,
        hub_kills_mid_drain: 0,
        database_kills: 0,
        restarts: 0,
        restart_failures: Vec::new(),
        commits: CommitTally::default(),
        refused_codes: BTreeMap::new(),
        deliveries: Tally::default(),
        sent_after: 0,
        group_errors: 0,
        group_error_samples: Vec::new(),
        killed_clients: config.killed_clients,
        member_kills: KillTally::default(),
        files: FileTally::default(),
        elapsed_secs: 0.0,
        failures: Vec::new(),
        dir: None,
    };
    for cycle in 0..config.cycles {
        tokio::time::sleep(random_between(&mut rng, config.up)).await;
        if config.storage == Storage::Postgres && rng.random_bool(config.database_kills) {
            if let Err(err) = kill_database(harness, config, &mut rng, &mut report).await {
                report.restart_failures.push(format!("{err:#}"));
                break;
            }
            report.cycles = cycle + 1;
            continue;
        }
        let node = rng.random_range(0..config.nodes);
        let domain = rng.random_range(0..config.domains);
        let mid_drain = config.domains == 2 && domain != HUB && rng.random_bool(0.3);
        if let Err(err) =
            kill_and_restart(harness, domain, node, config, &mut rng, &mut report).await
        {
            report.restart_failures.push(format!("{err:#}"));
            break;
        }
        if mid_drain {
            // The other domain is back; the hub retries what it held for it within its
            // federation backoff (≤ 500 ms): kill the hub while it does.
            tokio::time::sleep(random_between(
                &mut rng,
                (Duration::ZERO, Duration::from_millis(300)),
            ))
            .await;
            let hub_node = rng.random_range(0..config.nodes);
            report.hub_kills_mid_drain += 1;
            if let Err(err) =
                kill_and_restart(harness, HUB, hub_node, config, &mut rng, &mut report).await
            {
                report.restart_failures.push(format!("{err:#}"));
                break;
            }
        }
        report.cycles = cycle + 1;
        if (cycle + 1) % 10 == 0 || cycle + 1 == config.cycles {
            let (acked, unknown) = {
                let ledger = lock(&ledger);
                let all = ledger.iter().flat_map(BTreeMap::values);
                all.fold((0, 0), |(a, u), o| match o {
                    SendOutcome::Acknowledged => (a + 1, u),
                    SendOutcome::Unknown => (a, u + 1),
                    SendOutcome::Refused => (a, u),
                })
            };
            progress(format!(
                "cycle {}/{}: {acked} acknowledged, {unknown} unknown",
                cycle + 1,
                config.cycles,
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    progress("kills done; stopping the senders".into());
    for sender in senders {
        sender.await.context("a sender task failed")?;
    }
    committer.await.context("the committer task failed")?;
    report.commits = lock(&commits).clone();
    let mut sessions = Vec::with_capacity(killed_runs.len());
    for (run, member) in killed_runs.into_iter().zip(&killables) {
        match run.await {
            Ok(Ok(session)) => sessions.push(Some(session)),
            Ok(Err(err)) => {
                report.failures.push(format!("{}: {err:#}", member.name));
                sessions.push(None);
            }
            Err(err) => {
                report
                    .failures
                    .push(format!("{}: its task failed: {err}", member.name));
                sessions.push(None);
            }
        }
    }
    let inboxes: Vec<(String, Arc<Inbox>)> = peers
        .iter()
        .map(|p| (p.name.clone(), p.inbox.clone()))
        .chain(killables.iter().map(|k| (k.name.clone(), k.inbox.clone())))
        .collect();
    if !report.restart_failures.is_empty() {
        report
            .failures
            .push("a homeserver did not come back after a kill".into());
        for session in sessions.into_iter().flatten() {
            session.quit().await;
        }
        report.refused_codes = lock(&refused_codes).clone();
        report.member_kills = lock(&shared.tally).clone();
        report.files = lock(&files).clone();
        finish(&mut report, &inboxes, (&ledger, &sent), &[], &names);
        return Ok(report);
    }

    // Afterwards: the rover back in, then one more message from everyone.
    let mut rover_back = false;
    let joins_before = rover.inbox.with(|s| s.joins);
    for _ in 0..FINAL_ATTEMPTS {
        match toggle_rover(&creator.client, &group, &rover_id).await {
            Ok(true) => {
                rover_back = true;
                break;
            }
            // It was a member: removed now, invite it again next round.
            Ok(false) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    if !rover_back
        || wait_for(rover, "rejoining", Duration::from_secs(60), |s| {
            s.in_group && s.joins > joins_before
        })
        .await
        .is_err()
    {
        report
            .failures
            .push("the rover could not be added back after the run".into());
    }
    progress("rover back; last message from everyone".into());
    // The epoch of the rover's add, as its committer knows it (every commit of the run is
    // m0's). A member that still sees the rover from before its last removal (the removal
    // and the add not processed yet) would send at an epoch the rover left: the hub rightly
    // keeps such a message from the rover's new membership.
    let added_at = creator.client.epoch(&group).await.unwrap_or(0);
    let mut final_seq: Vec<Option<u64>> = vec![None; everyone];
    for (index, peer) in peers.iter().enumerate() {
        if !sees_add(
            &peer.client,
            &group,
            &rover_id.0,
            added_at,
            Duration::from_secs(60),
        )
        .await
        {
            report.failures.push(format!(
                "{} does not see the rover's add (epoch {added_at}) after the run",
                peer.name
            ));
        }
        for attempt in 0..FINAL_ATTEMPTS {
            let (outcome, seq) = send_numbered(
                &peer.client,
                &group,
                index,
                (&ledger, &sent),
                &refused_codes,
                None,
            )
            .await;
            if outcome == SendOutcome::Acknowledged {
                final_seq[index] = Some(seq);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(10) + 1))).await;
        }
        if final_seq[index].is_none() {
            report.failures.push(format!(
                "{} could not send after the run ({FINAL_ATTEMPTS} attempts)",
                peer.name
            ));
        }
    }
    // A killed member has seen the rover's add once it has m0's last message (sent after the
    // add, in the add's epoch or later: it comes behind the commit).
    let creator_last = final_seq[0].map(|seq| Receipt::Numbered { sender: 0, seq });
    for (member, session) in killables.iter().zip(sessions.iter_mut()) {
        let Some(session) = session else { continue };
        if let Some(last) = &creator_last {
            let seen = tokio::time::timeout(Duration::from_secs(60), async {
                loop {
                    let changed = member.inbox.changed.notified();
                    if member.inbox.with(|s| s.receipts.contains(last)) {
                        break;
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(250), changed).await;
                }
            })
            .await;
            if seen.is_err() {
                report.failures.push(format!(
                    "{} did not get m0's last message after the run",
                    member.name
                ));
            }
        }
        for attempt in 0..FINAL_ATTEMPTS {
            let until = tokio::time::Instant::now() + OPERATION_LIMIT;
            let (outcome, seq) = killed::send_line(member, &shared, session, until, false).await;
            if outcome == Some(SendOutcome::Acknowledged) {
                final_seq[member.index] = Some(seq);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(10) + 1))).await;
        }
        if final_seq[member.index].is_none() {
            report.failures.push(format!(
                "{} could not send after the run ({FINAL_ATTEMPTS} attempts)",
                member.name
            ));
        }
    }
    // Who must have what: the members everything acknowledged (from the rover only its last
    // message); the rover each member's last message (it was away for the rest).
    let must: Vec<Vec<Option<u64>>> = (0..everyone)
        .map(|r| {
            (0..everyone)
                .map(|s| {
                    if r == rover_index || s == rover_index {
                        final_seq[s]
                    } else {
                        Some(1)
                    }
                })
                .collect()
        })
        .collect();
    progress("waiting for every delivery".into());
    // Wait until everything that must arrive has (or the time is up).
    let deadline = Instant::now() + config.settle_timeout;
    loop {
        let tally = analyze_now(&inboxes, &ledger, &must, &names);
        if tally.lost == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Every attachment received downloaded (the servers are all up now).
    loop {
        let files = lock(&files).clone();
        if files.downloaded + files.corrupt >= files.received || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    downloads_stop.store(true, Ordering::Relaxed);
    let last_try = Instant::now() + Duration::from_secs(10);
    while {
        let files = lock(&files).clone();
        files.downloaded + files.corrupt + files.not_downloaded < files.received
    } && Instant::now() < last_try
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for session in sessions.into_iter().flatten() {
        session.quit().await;
    }
    report.refused_codes = lock(&refused_codes).clone();
    report.member_kills = lock(&shared.tally).clone();
    report.files = lock(&files).clone();
    for member in &killables {
        check_saved(member, &mut report.files);
    }
    if report.files.not_saved_by_killed > 0 {
        report.failures.push(format!(
            "{} attachments shown to killed members not saved",
            report.files.not_saved_by_killed
        ));
    }
    let f = &report.files;
    let missing = f
        .received
        .saturating_sub(f.downloaded + f.corrupt + f.not_downloaded);
    report.files.not_downloaded += missing;
    let f = &report.files;
    if f.corrupt > 0 {
        report
            .failures
            .push(format!("{} attachments downloaded corrupt", f.corrupt));
    }
    if f.not_downloaded > 0 {
        report
            .failures
            .push(format!("{} attachments never downloaded", f.not_downloaded));
    }
    for outcome in lock(&ledger)[total..].iter().flat_map(BTreeMap::values) {
        match outcome {
            SendOutcome::Acknowledged => report.member_kills.acknowledged += 1,
            SendOutcome::Unknown => report.member_kills.unknown += 1,
            SendOutcome::Refused => {}
        }
    }
    finish(&mut report, &inboxes, (&ledger, &sent), &must, &names);
    report.sent_after = (0..everyone)
        .filter(|&s| {
            final_seq[s].is_some_and(|seq| {
                inboxes.iter().enumerate().all(|(r, (_, inbox))| {
                    r == s
                        || inbox
                            .with(|st| st.receipts.contains(&Receipt::Numbered { sender: s, seq }))
                })
            })
        })
        .count();
    if report.sent_after < everyone && report.failures.is_empty() {
        report.failures.push(format!(
            "only {}/{everyone} members' last messages reached everyone",
            report.sent_after
        ));
    }
    Ok(report)
}

fn analyze_now(
    inboxes: &[(String, Arc<Inbox>)],
    ledger: &Ledger,
    must: &[Vec<Option<u64>>],
    names: &[String],
) -> Tally {
    let received: Vec<Vec<Receipt>> = inboxes
        .iter()
        .map(|(_, inbox)| inbox.with(|s| s.receipts.clone()))
        .collect();
    let sent = lock(ledger).clone();
    ledger::analyze(&sent, &received, must, names)
}

/// Fills in the deliveries and the failures they imply.
fn finish(
    report: &mut ChaosReport,
    inboxes: &[(String, Arc<Inbox>)],
    (ledger, sent): (&Ledger, &SentIds),
    must: &[Vec<Option<u64>>],
    names: &[String],
) {
    report.deliveries = analyze_now(inboxes, ledger, must, names);
    let sent = lock(sent);
    let outcomes = lock(ledger).clone();
    let mut wrong_ids = 0u64;
    for (name, inbox) in inboxes {
        inbox.with(|s| {
            // A message whose id is not the one its sender's `send` returned: counted with
            // the phantoms (the app could not tell it from another message).
            for ((sender, seq), id) in &s.ids {
                let expected = sent.get(&(*sender, *seq));
                // A send given up on (OPERATION_LIMIT) before `send` returned its id.
                let never_returned = expected.is_none()
                    && outcomes.get(*sender).and_then(|m| m.get(seq))
                        == Some(&SendOutcome::Unknown);
                if id.as_ref() != expected && !never_returned {
                    report.deliveries.phantom += 1;
                    wrong_ids += 1;
                    if wrong_ids <= 10 {
                        report.failures.push(format!(
                            "{} received {} #{seq} with id {id:?}, sent as {expected:?}",
                            name,
                            names.get(*sender).map_or("?", String::as_str)
                        ));
                    }
                }
            }
            report.group_errors += s.group_errors.len() as u64;
            for error in &s.group_errors {
                if report.group_error_samples.len() < 10 {
                    report
                        .group_error_samples
                        .push(format!("{}: {error}", name));
                }
            }
            if let Some(err) = &s.stream_error {
                report
                    .failures
                    .push(format!("{}: event stream failed: {err}", name));
            }
        });
    }
    let t = &report.deliveries;
    for (count, what) in [
        (t.lost, "acknowledged messages lost"),
        (t.duplicated, "messages duplicated"),
        (t.out_of_order, "messages out of order"),
        (t.phantom, "phantom messages"),
        (t.partial, "unknown sends delivered to some members only"),
    ] {
        if count > 0 {
            report.failures.push(format!("{count} {what}"));
        }
    }
}

/// SIGKILLs node `node` of domain `domain`, leaves it down a while, starts it again and waits
/// until it answers.
async fn kill_and_restart(
    harness: &mut Harness,
    domain: usize,
    node: usize,
    config: &ChaosConfig,
    rng: &mut StdRng,
    report: &mut ChaosReport,
) -> anyhow::Result<()> {
    let name = format!("{} node {node}", harness.node(domain, node)?.domain);
    harness
        .kill_node(domain, node)
        .with_context(|| format!("killing {name}"))?;
    report.kills += 1;
    if domain == HUB {
        report.hub_kills += 1;
    }
    tokio::time::sleep(random_between(rng, config.down)).await;
    if let Err(err) = harness.restart_node(domain, node).await {
        bail!("{name} after kill {}: {err:#}", report.kills);
    }
    report.restarts += 1;
    Ok(())
}

/// Counts the attachments `member`'s chats were shown that are in its download directory
/// with the bytes sent (as `chaos-S-N.bin`, or `chaos-S-N (K).bin` when saved again).
fn check_saved(member: &killed::Killable, files: &mut FileTally) {
    let names: Vec<String> = std::fs::read_dir(&member.downloads)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    files.parts_left += names.iter().filter(|n| n.ends_with(".part")).count() as u64;
    let shown: std::collections::BTreeSet<(usize, u64)> =
        member.inbox.with(|s| s.files.iter().copied().collect());
    let reported: std::collections::BTreeSet<(usize, u64)> = member
        .inbox
        .with(|s| s.files_not_saved.iter().copied().collect());
    for (sender, seq) in shown {
        let stem = format!("chaos-{sender}-{seq}");
        let expected = ledger::file_bytes(sender, seq);
        let saved = names.iter().any(|name| {
            let copy = name == &format!("{stem}.bin")
                || (name.starts_with(&format!("{stem} (")) && name.ends_with(").bin"));
            copy && std::fs::read(member.downloads.join(name)).is_ok_and(|b| b == expected)
        });
        if saved {
            files.saved_by_killed += 1;
        } else if reported.contains(&(sender, seq)) {
            files.save_failed_reported += 1;
        } else {
            files.not_saved_by_killed += 1;
            files.sample(|| format!("{}: {stem}.bin not saved", member.name));
        }
    }
}

/// Kills the PostgreSQL server as a crash would, leaves it down a while and starts it again;
/// the homeservers are left to notice and recover.
async fn kill_database(
    harness: &mut Harness,
    config: &ChaosConfig,
    rng: &mut StdRng,
    report: &mut ChaosReport,
) -> anyhow::Result<()> {
    let cluster = harness.cluster_mut().context("no PostgreSQL cluster")?;
    // pg_ctl waits for the server; the runtime's other workers carry on meanwhile.
    tokio::task::block_in_place(|| cluster.kill()).context("killing PostgreSQL")?;
    report.database_kills += 1;
    tokio::time::sleep(random_between(rng, config.down)).await;
    let cluster = harness.cluster_mut().context("no PostgreSQL cluster")?;
    tokio::task::block_in_place(|| cluster.restart())
        .with_context(|| format!("PostgreSQL after database kill {}", report.database_kills))?;
    Ok(())
}

/// Waits until `client` has reached `epoch` of `group` (or a later one) and sees `member`
/// in it (or is `member`).
async fn sees_add(
    client: &Client,
    group: &GroupId,
    member: &ClientId,
    epoch: u64,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if client.epoch(group).await.is_ok_and(|e| e >= epoch)
            && client
                .members(group)
                .await
                .is_ok_and(|members| members.contains(member))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Waits until `check` holds for `peer`'s inbox.
async fn wait_for(
    peer: &Peer,
    what: &str,
    timeout: Duration,
    check: impl Fn(&InboxState) -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let changed = peer.inbox.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if peer.inbox.with(|s| check(s)) {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            bail!("{}: no {what} within {timeout:?}", peer.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_client::transport::TransportError;
    use roost_protocol::WireError;

    fn server(code: ErrorCode) -> ClientError {
        ClientError::Request(RequestError::Server(WireError::new(code, "test")))
    }

    #[test]
    fn only_definite_refusals_count_as_refused() {
        assert_eq!(
            classify(&server(ErrorCode::STALE_EPOCH)).0,
            SendOutcome::Refused
        );
        assert_eq!(
            classify(&server(ErrorCode::INTERNAL)).0,
            SendOutcome::Refused
        );
        // Forwarded to the hub, answer lost: it may have been applied there.
        assert_eq!(
            classify(&server(ErrorCode::PEER_UNREACHABLE)).0,
            SendOutcome::Unknown
        );
        let lost = ClientError::Request(RequestError::Transport(TransportError::Timeout));
        assert_eq!(classify(&lost).0, SendOutcome::Unknown);
        let local = ClientError::InvalidOperation("no".into());
        assert_eq!(classify(&local).0, SendOutcome::Refused);
    }
}
