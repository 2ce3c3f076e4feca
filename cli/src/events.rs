//! Receiving: `recv` (print what arrived, optionally waiting or following) and `chat` (an
//! interactive loop over standard input lines and SDK events), and how each [`Event`] is
//! shown.
//!
//! The SDK keeps every event until the app asks for the next one, so an event is printed at
//! least once: one printed just before a crash may be printed again by the next `recv`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use roost_client::{ClientError, Content, Event, OutgoingState};
use roost_protocol::{ClientId, GroupId, UserId};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;
use tokio::time::Instant;

use crate::output::{Output, one_line};
use crate::profile::Names;
use crate::session::{Check, Context, Session};

/// After the first message of `recv --wait`, how long to keep collecting messages that
/// arrive right behind it.
const GRACE: Duration = Duration::from_millis(300);

/// How long `chat` waits at its end for the messages still queued to go out.
const QUIT_FLUSH: Duration = Duration::from_secs(10);

/// `recv`: prints what is waiting; with `wait`, waits up to that many seconds for a first
/// message; with `follow`, prints until Ctrl-C.
pub(crate) async fn recv(
    ctx: &Context,
    wait: Option<u64>,
    follow: bool,
    download_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let check = if follow {
        Check::Waiting
    } else {
        Check::Required
    };
    let session = Session::open(ctx, wait.is_some() || follow, check).await?;
    if let Some(dir) = &download_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let result = recv_in(ctx.out, &session, wait, follow, download_dir.as_deref()).await;
    session.close().await;
    result
}

async fn recv_in(
    out: Output,
    session: &Session,
    wait: Option<u64>,
    follow: bool,
    download_dir: Option<&Path>,
) -> anyhow::Result<()> {
    if follow {
        // Offline, what is queued comes once the listener is connected.
        session.sync_or_wait(out).await?;
    } else {
        session.sync().await?;
    }
    let mut deadline = (!follow).then(|| Instant::now() + Duration::from_secs(wait.unwrap_or(0)));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let next = async {
            match deadline {
                // timeout_at polls the event first, so events already stored are returned
                // even when the deadline has passed.
                Some(deadline) => tokio::time::timeout_at(deadline, session.client.next_event())
                    .await
                    .ok(),
                None => Some(session.client.next_event().await),
            }
        };
        let event = tokio::select! {
            // The event first: taking the next event is what lets the SDK delete the previous
            // one, so the last printed event is not printed again by the next recv.
            biased;
            event = next => match event {
                Some(event) => event.map_err(|err| session.fail(&err))?,
                None => break,
            },
            _ = &mut ctrl_c => break,
        };
        show(out, &session.names, &event, None)?;
        if let (Some(dir), Some(Ok(Content::Attachment(attachment)))) =
            (download_dir, event.content())
        {
            save(out, session, &event, &attachment, dir).await?;
        }
        if let (Event::Message { .. }, Some(until)) = (&event, deadline) {
            deadline = Some(until.min(Instant::now() + GRACE));
        }
    }
    Ok(())
}

/// A path in `dir` for `name` that does not exist yet: `name`, else `name (1)`, ...
fn free_path(dir: &Path, name: &str) -> PathBuf {
    let (stem, extension) = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem, format!(".{ext}")),
        _ => (name, String::new()),
    };
    let mut path = dir.join(name);
    let mut n = 1;
    while path.exists() || part_path(&path).exists() {
        path = dir.join(format!("{stem} ({n}){extension}"));
        n += 1;
    }
    path
}

fn part_path(path: &Path) -> PathBuf {
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    PathBuf::from(part)
}

/// Downloads an attachment into `dir` and prints the saved path (`saved PATH`, or a `saved`
/// event with `--json`). A failed download is a note (and a `not_saved` event with `file` and
/// `error` with `--json`); `recv` goes on.
async fn save(
    out: Output,
    session: &Session,
    event: &Event,
    attachment: &roost_client::Attachment,
    dir: &Path,
) -> anyhow::Result<()> {
    let path = free_path(dir, &attachment.safe_file_name());
    let mut bar: Option<indicatif::ProgressBar> = None;
    let result = session
        .client
        .download(
            attachment,
            roost_client::DownloadTarget::Path(path.clone()),
            |done, total| {
                bar.get_or_insert_with(|| crate::commands::progress_bar(total))
                    .set_position(done);
            },
        )
        .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(size) => out.print(
            format!("saved {}", path.display()),
            json!({
                "event": "saved",
                "group": event.group().to_string(),
                "path": path.display().to_string(),
                "size": size,
            }),
        )?,
        Err(err) => {
            let err = session.fail(&err);
            out.json(json!({
                "event": "not_saved",
                "group": event.group().to_string(),
                "file": attachment.name(),
                "error": {"code": crate::errors::code_of(&err), "message": format!("{err:#}")},
            }))?;
            out.note(format!(
                "error: {} not saved: {err}",
                one_line(attachment.name())
            ));
        }
    }
    Ok(())
}

/// `chat`: lines typed are sent to the group; events are shown as they arrive (and files
/// saved into `download_dir`, if given, as `recv` saves them).
pub(crate) async fn chat(
    ctx: &Context,
    group: &str,
    download_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let session = Session::open(ctx, true, Check::Waiting).await?;
    if let Some(dir) = &download_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let result = chat_in(ctx.out, &session, group, download_dir.as_deref()).await;
    // What was typed just before the end goes out now, as `send` would have sent it; what
    // cannot (the server is away) stays queued for the next command.
    let flushed = tokio::time::timeout(QUIT_FLUSH, session.client.flush()).await;
    if !matches!(flushed, Ok(Ok(()))) {
        ctx.out.note(
            "warning: messages not sent yet stay queued: the next command that reaches the \
             server sends them (roost-cli outbox lists them)",
        );
    }
    session.close().await;
    result
}

async fn chat_in(
    out: Output,
    session: &Session,
    group_text: &str,
    download_dir: Option<&Path>,
) -> anyhow::Result<()> {
    // Offline, the chat starts from the profile; the SDK connects once the server is back.
    session.sync_or_wait(out).await?;
    let group = session.member_group(group_text)?;
    out.note(format!(
        "chat in {} as {}: type a message and press Enter; /members lists the members, /invite \
         and /remove USER… change them, /update updates your keys, /file PATH sends a file, \
         /quit (or Ctrl-D) ends",
        session.names.label(&group),
        session.client.client_id()
    ));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            biased;
            event = session.client.next_event() => {
                let event = event.map_err(|err| session.fail(&err))?;
                show(out, &session.names, &event, Some(&group))?;
                if let (Some(dir), Some(Ok(Content::Attachment(attachment)))) =
                    (download_dir, event.content())
                {
                    save(out, session, &event, &attachment, dir).await?;
                }
                if matches!(&event, Event::RemovedFromGroup { group: g, .. } | Event::LeftGroup { group: g, .. } if *g == group) {
                    break;
                }
            }
            line = lines.next_line() => {
                let Some(line) = line.context("cannot read standard input")? else {
                    break;
                };
                if !chat_line(out, session, &group, line.trim_end_matches('\r')).await? {
                    break;
                }
            }
            _ = &mut ctrl_c => break,
        }
    }
    Ok(())
}

/// Handles one typed line; false ends the chat.
async fn chat_line(
    out: Output,
    session: &Session,
    group: &GroupId,
    line: &str,
) -> anyhow::Result<bool> {
    let text = match line.trim() {
        "" => return Ok(true),
        "/quit" => return Ok(false),
        "/members" => {
            let members = session
                .client
                .members(group)
                .await
                .map_err(|err| session.fail(&err))?;
            let list: Vec<String> = members.iter().map(ToString::to_string).collect();
            out.note(format!("members: {}", list.join(", ")));
            return Ok(true);
        }
        "/update" => {
            update_in_chat(out, session, group).await?;
            return Ok(true);
        }
        trimmed if trimmed.starts_with("/invite ") || trimmed.starts_with("/remove ") => {
            let (command, users) = trimmed.split_once(' ').unwrap_or_default();
            membership_in_chat(out, session, group, command, users).await?;
            return Ok(true);
        }
        trimmed if trimmed.starts_with("/file ") => {
            let path = trimmed.strip_prefix("/file ").unwrap_or_default().trim();
            file_in_chat(out, session, group, Path::new(path)).await?;
            return Ok(true);
        }
        _ if line.starts_with("//") => line.strip_prefix('/').unwrap_or(line),
        _ if line.starts_with('/') => {
            out.note(
                "commands: /members, /invite USER…, /remove USER…, /update (your keys), /file \
                 PATH (send a file), /quit (start a message with // to send a leading /)",
            );
            return Ok(true);
        }
        _ => line,
    };
    // With --json, every line sent gets its answer on stdout before the next line is read:
    // `queued` (in the profile's outgoing queue: it will be sent, once, also if this process
    // dies now; `outgoing` events follow) or `not_sent`.
    match session.client.send_text(group, text).await {
        Ok(id) => {
            let extra = json!({"text": text, "id": id.to_string()});
            out.json(chat_answer(session, group, "queued", extra))?;
            Ok(true)
        }
        Err(err @ ClientError::UnknownGroup(_)) => Err(session.fail(&err)),
        Err(err) => {
            // Keep the chat open: the next line may go through (e.g. after a reconnect).
            let (error, err) = chat_failure(session, &err);
            let extra = json!({"text": text, "error": error});
            out.json(chat_answer(session, group, "not_sent", extra))?;
            out.note(format!("error: not sent: {err}"));
            Ok(true)
        }
    }
}

/// `/file PATH` in a chat: encrypts and uploads the file, then queues the message announcing
/// it, like a typed line. With `--json` the answer is `{"event":"queued",…,"file","size","id"}`
/// (the message is in the outgoing queue; the upload is done) or
/// `{"event":"not_sent",…,"file","error"}` (nothing was queued; the chat goes on).
async fn file_in_chat(
    out: Output,
    session: &Session,
    group: &GroupId,
    path: &Path,
) -> anyhow::Result<()> {
    let file = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let sent = match roost_client::FileSource::path(path).await {
        Ok(source) => {
            let mut bar: Option<indicatif::ProgressBar> = None;
            let sent = session
                .client
                .send_file(group, source, |done, total| {
                    bar.get_or_insert_with(|| crate::commands::progress_bar(total))
                        .set_position(done);
                })
                .await;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            sent
        }
        Err(err) => Err(err),
    };
    match sent {
        Ok((id, attachment)) => {
            let extra = json!({
                "file": attachment.name(),
                "size": attachment.size,
                "id": id.to_string(),
            });
            out.json(chat_answer(session, group, "queued", extra))?;
            out.note(format!(
                "sent {} ({} bytes)",
                one_line(attachment.name()),
                attachment.size
            ));
        }
        Err(err @ ClientError::UnknownGroup(_)) => return Err(session.fail(&err)),
        Err(err) => {
            let (error, err) = chat_failure(session, &err);
            let extra = json!({"file": file, "error": error});
            out.json(chat_answer(session, group, "not_sent", extra))?;
            out.note(format!("error: {} not sent: {err}", one_line(&file)));
        }
    }
    Ok(())
}

/// `/invite USER…` or `/remove USER…` in a chat (`command` is `/invite` or `/remove`): one
/// commit, as `group invite` / `group remove` make it. With `--json` the answer is
/// `{"event":"invited"|"removed_members",…,"users","clients","epoch"}` (the devices added or
/// removed; an invite that added only some users' devices also has `error` for the others) or
/// `{"event":"not_invited"|"not_removed",…,"users","error"}`; the chat goes on either way.
async fn membership_in_chat(
    out: Output,
    session: &Session,
    group: &GroupId,
    command: &str,
    users: &str,
) -> anyhow::Result<()> {
    let (done, failed) = match command {
        "/invite" => ("invited", "not_invited"),
        _ => ("removed_members", "not_removed"),
    };
    let label = session.names.label(group);
    let parsed: Result<Vec<UserId>, _> = users.split_whitespace().map(str::parse).collect();
    let result = match parsed {
        Err(err) => Err(crate::errors::coded(
            "usage",
            format!("{command} USER…: {err}"),
        )),
        Ok(users) if users.is_empty() => {
            Err(crate::errors::coded("usage", format!("{command} USER…")))
        }
        Ok(users) if command == "/invite" => {
            crate::commands::invite(session, group, &label, &users)
                .await
                .map(|invited| (invited.added, invited.problem))
        }
        Ok(users) => crate::commands::remove(session, group, &label, &users)
            .await
            .map(|removed| (removed, None)),
    };
    let error = |err: &anyhow::Error| json!({"code": crate::errors::code_of(err), "message": format!("{err:#}")});
    let users: Vec<&str> = users.split_whitespace().collect();
    match result {
        Ok((clients, problem)) if !clients.is_empty() => {
            let epoch = session.client.epoch(group).await.ok();
            let mut extra = json!({"users": users, "clients": strings(&clients), "epoch": epoch});
            if let (Some(problem), Value::Object(map)) = (&problem, &mut extra) {
                map.insert("error".into(), error(problem));
            }
            out.json(chat_answer(session, group, done, extra))?;
            let verb = if done == "invited" {
                "added"
            } else {
                "removed"
            };
            out.note(format!("{verb} {}", list(&clients)));
            if let Some(problem) = problem {
                out.note(format!("error: {problem:#}"));
            }
        }
        Ok((_, problem)) => {
            let problem = problem.unwrap_or_else(|| anyhow::anyhow!("nobody was {done}"));
            let extra = json!({"users": users, "error": error(&problem)});
            out.json(chat_answer(session, group, failed, extra))?;
            out.note(format!("error: {problem:#}"));
        }
        Err(err) => {
            let extra = json!({"users": users, "error": error(&err)});
            out.json(chat_answer(session, group, failed, extra))?;
            out.note(format!("error: {err:#}"));
        }
    }
    Ok(())
}

/// `/update` in a chat: commits a self-update; with `--json` the answer is
/// `{"event":"keys_updated",…,"epoch"}` or `{"event":"keys_not_updated",…,"error"}` (the chat
/// goes on either way).
async fn update_in_chat(out: Output, session: &Session, group: &GroupId) -> anyhow::Result<()> {
    match session.client.update_keys(group).await {
        Ok(epoch) => {
            let extra = json!({"epoch": epoch});
            out.json(chat_answer(session, group, "keys_updated", extra))?;
            out.note(format!("updated your keys: epoch {epoch}"));
        }
        Err(err @ ClientError::UnknownGroup(_)) => return Err(session.fail(&err)),
        Err(err) => {
            let (error, err) = chat_failure(session, &err);
            let extra = json!({"error": error});
            out.json(chat_answer(session, group, "keys_not_updated", extra))?;
            out.note(format!("error: keys not updated: {err}"));
        }
    }
    Ok(())
}

/// What `chat --json` answers to a typed line: `event`, the group, its local name, and the
/// fields of `extra`.
fn chat_answer(session: &Session, group: &GroupId, event: &str, extra: Value) -> Value {
    let mut answer = json!({
        "event": event,
        "group": group.to_string(),
        "name": session.names.name_of(group),
    });
    if let (Value::Object(map), Value::Object(extra)) = (&mut answer, extra) {
        map.extend(extra);
    }
    answer
}

/// A refusal as an answer's `error` field (`code`, `message`), and as the error reported.
fn chat_failure(session: &Session, err: &ClientError) -> (Value, anyhow::Error) {
    let code = crate::errors::code(err);
    let err = session.fail(err);
    (json!({"code": code, "message": format!("{err:#}")}), err)
}

/// Shows one event. Messages go to stdout: `GROUP<TAB>SENDER<TAB>TEXT` (GROUP is the local
/// name if there is one), or `SENDER: TEXT` in a chat about that group. Other events go to
/// stderr as notes. With `--json`, every event is one object on stdout.
pub(crate) fn show(
    out: Output,
    names: &Names,
    event: &Event,
    chat: Option<&GroupId>,
) -> std::io::Result<()> {
    let group = event.group();
    let label = names.label(group);
    let mut fields = json!({
        "group": group.to_string(),
        "name": names.name_of(group),
    });
    let (kind, note, extra) = match event {
        Event::Message {
            sender, id, bytes, ..
        } => {
            // PROTOCOL.md §4.5: text is shown; a content type this version does not know, or
            // bytes that are no MessageContent, are shown as such and the conversation goes on.
            let (text, field, value) = match Content::decode(bytes) {
                Ok(Content::Text(text)) => (one_line(&text), "text", Value::from(text)),
                Ok(Content::Attachment(file)) => (
                    format!(
                        "[file {} ({} bytes, {})]",
                        one_line(file.name()),
                        file.size,
                        one_line(file.media_type())
                    ),
                    "file",
                    json!({
                        "name": file.name(),
                        "size": file.size,
                        "media_type": file.media_type(),
                    }),
                ),
                Ok(Content::Unknown { content_type, .. }) => (
                    format!("[unsupported message: content type {}]", content_type.0),
                    "content_type",
                    Value::from(content_type.0),
                ),
                Ok(other) => (
                    "[unsupported message]".to_string(),
                    "unsupported",
                    Value::from(format!("{other:?}")),
                ),
                Err(err) => (
                    format!("[unreadable message: {err}]"),
                    "unreadable",
                    Value::from(err.to_string()),
                ),
            };
            let line = match chat {
                Some(g) if g == group => format!("{sender}: {text}"),
                Some(_) => format!("[{label}] {sender}: {text}"),
                None => format!("{label}\t{sender}\t{text}"),
            };
            if let Value::Object(map) = &mut fields {
                map.insert("event".into(), "message".into());
                map.insert("sender".into(), sender.to_string().into());
                if let Some(id) = id {
                    map.insert("id".into(), id.to_string().into());
                }
                map.insert(field.into(), value);
            }
            return out.print(line, fields);
        }
        Event::Joined { inviter, .. } => (
            "joined",
            format!("{label}: joined, invited by {inviter}"),
            json!({"by": inviter.to_string()}),
        ),
        Event::MembersAdded { by, members, .. } => (
            "members_added",
            format!("{label}: {by} added {}", list(members)),
            json!({"by": by.to_string(), "members": strings(members)}),
        ),
        Event::MembersRemoved { by, members, .. } => (
            "members_removed",
            format!("{label}: {by} removed {}", list(members)),
            json!({"by": by.to_string(), "members": strings(members)}),
        ),
        Event::RemovedFromGroup { by, .. } => (
            "removed",
            format!("{label}: you are no longer a member (removed by {by})"),
            json!({"by": by.to_string()}),
        ),
        Event::MembersLeft { by, members, .. } => (
            "members_left",
            format!("{label}: {} left", list(members)),
            json!({"by": by.to_string(), "members": strings(members)}),
        ),
        Event::LeftGroup { by, .. } => (
            "left",
            format!("{label}: you left the group"),
            json!({"by": by.to_string()}),
        ),
        Event::CredentialRejected { client, reason, .. } => {
            let who = client
                .as_ref()
                .map_or_else(|| "an unknown client".to_owned(), ToString::to_string);
            (
                "credential_rejected",
                format!("{label}: refused the credential of {who}: {reason}"),
                json!({"client": client.as_ref().map(ToString::to_string), "reason": reason}),
            )
        }
        Event::GroupError { reason, .. } => (
            "group_error",
            format!("{label}: {reason}"),
            json!({"reason": reason}),
        ),
        Event::Outgoing { id, state, .. } => match state {
            OutgoingState::Failed(failure) => (
                "outgoing",
                format!("{label}: message {id} cannot be sent: {failure}"),
                json!({"id": id.to_string(), "state": "failed", "failure": failure.to_string()}),
            ),
            _ => (
                "outgoing",
                format!("{label}: message {id} sent"),
                json!({"id": id.to_string(), "state": "sent"}),
            ),
        },
        Event::Rejoined { .. } => (
            "rejoined",
            format!("{label}: this device had fallen behind and rejoined the group"),
            json!({}),
        ),
        Event::MemberRejoined { member, .. } => (
            "member_rejoined",
            format!("{label}: {member} had fallen behind and rejoined"),
            json!({"member": member.to_string()}),
        ),
        Event::CommitSettled { added, removed, .. } => (
            "commit_settled",
            format!(
                "{label}: your earlier change went through (added: {}; removed: {})",
                list(added),
                list(removed)
            ),
            json!({"added": strings(added), "removed": strings(removed)}),
        ),
        other => (
            "other",
            format!("{label}: {other:?}"),
            json!({"detail": format!("{other:?}")}),
        ),
    };
    if out.json {
        if let (Value::Object(map), Value::Object(extra)) = (&mut fields, extra) {
            map.insert("event".into(), kind.into());
            map.extend(extra);
        }
        out.json(fields)
    } else {
        out.note(one_line(&note));
        Ok(())
    }
}

fn strings(clients: &[ClientId]) -> Vec<String> {
    clients.iter().map(ToString::to_string).collect()
}

fn list(clients: &[ClientId]) -> String {
    strings(clients).join(", ")
}
