//! The commands: enrollment (register, device add, export of the user key), `whoami`, group
//! management and `send`. `recv` and `chat` live in [`crate::events`].

use std::fs;
use std::io::{Read as _, Write as _};
use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use roost_client::{Client, ClientError, OutgoingState, UserKey};
use roost_protocol::{ClientId, DeviceName, ErrorCode, GroupId, UserId};
use serde_json::json;

use crate::args::{Command, DeviceCommand, GroupCommand, ServerArgs};
use crate::errors;
use crate::events;
use crate::profile::{self, Settings, TrustKind};
use crate::session::{self, Check, Context, Session};

/// The first line of a user key file, before the key in hex.
const USER_KEY_PREFIX: &str = "roost-user-key-v1 ";

/// Runs one command.
pub(crate) async fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Register {
            user,
            server,
            device,
            token,
        } => enroll(ctx, user, device, server, Enrollment::Register { token }).await,
        Command::Device {
            command:
                DeviceCommand::Add {
                    user,
                    user_key,
                    server,
                    device,
                },
        } => {
            let key = read_user_key(ctx, &user_key)?;
            if key.user() != &user {
                bail!(
                    "the user key in {} is of {}, not {user}",
                    user_key.display(),
                    key.user()
                );
            }
            enroll(ctx, user, device, server, Enrollment::AddDevice(key)).await
        }
        Command::Device {
            command: DeviceCommand::ExportUserKey { out },
        } => export_user_key(ctx, &out).await,
        Command::Device {
            command: DeviceCommand::List,
        } => list_devices(ctx).await,
        Command::Device {
            command: DeviceCommand::Remove { device },
        } => remove_device(ctx, &device).await,
        Command::Whoami => whoami(ctx),
        Command::Push { command } => crate::push::run(ctx, command).await,
        Command::Group { command } => group(ctx, command).await,
        Command::Send { group, text, file } => {
            let check = if file.is_some() {
                Check::Required
            } else {
                Check::Tolerant
            };
            let session = Session::open(ctx, false, check).await?;
            let result = match (file, text) {
                (Some(file), _) => send_file(ctx, &session, &group, &file).await,
                (None, Some(text)) => send(ctx, &session, &group, &text).await,
                (None, None) => Err(anyhow::anyhow!("pass a message or --file PATH")),
            };
            session.close().await;
            result
        }
        Command::Outbox => {
            let session = Session::open(ctx, false, Check::Tolerant).await?;
            let result = outbox(ctx, &session).await;
            session.close().await;
            result
        }
        Command::Recv {
            wait,
            follow,
            download_dir,
        } => events::recv(ctx, wait, follow, download_dir).await,
        Command::Chat {
            group,
            download_dir,
        } => events::chat(ctx, &group, download_dir).await,
        // Handled in main before a profile is opened.
        Command::Completions { .. } | Command::Man => Ok(()),
    }
}

enum Enrollment {
    Register { token: Option<String> },
    AddDevice(UserKey),
}

/// Registers a user or adds a device, and writes the profile directory.
async fn enroll(
    ctx: &Context,
    user: UserId,
    device: DeviceName,
    server: ServerArgs,
    how: Enrollment,
) -> anyhow::Result<()> {
    let profile = &ctx.profile;
    if profile.is_enrolled() {
        bail!(
            "a profile exists already at {}: pass another --profile DIR",
            profile.path().display()
        );
    }
    let (trust_file, kind) = match (server.trust.server_cert, server.trust.ca) {
        (Some(file), _) => (file, TrustKind::Pinned),
        (None, Some(file)) => (file, TrustKind::Ca),
        (None, None) => bail!("pass --server-cert FILE or --ca FILE"),
    };
    let trust = profile::load_trust(&trust_file, kind)?;
    let mut servers = server.server;
    if servers.is_empty() {
        servers.push(format!("{}:{}", user.domain, roost_protocol::DEFAULT_PORT));
    }
    let server = servers.join(",");
    let (addrs, unresolved) = session::resolve_all(&servers).await;
    if let Some(err) = unresolved.into_iter().next() {
        return Err(err);
    }
    let mut config = session::client_config(addrs, user.domain.as_str(), trust, ctx.timeout, false);
    session::probe(&mut config.connect, &server).await?;
    profile.create()?;
    let database = profile.database();
    let client_id = ClientId::new(user.clone(), device.clone());
    let verb = match how {
        Enrollment::Register { .. } => "registered",
        Enrollment::AddDevice(_) => "added device",
    };
    let token_given = matches!(&how, Enrollment::Register { token: Some(_) });
    let result = match how {
        Enrollment::Register { token } => {
            config.registration_token = token;
            Client::register(config.clone(), &database, user.clone(), device).await
        }
        Enrollment::AddDevice(key) => {
            Client::add_device(config.clone(), &database, &key, device).await
        }
    };
    let client = match result {
        Ok(client) => client,
        Err(err) => {
            // A failure after the device was enrolled (e.g. the first KeyPackage upload) still
            // leaves a usable profile: keep it rather than lose the new device's keys.
            let enrolled = match &err {
                ClientError::ProfileExists(_) => None,
                _ => Client::open(config, &database)
                    .await
                    .ok()
                    .filter(|client| client.client_id() == &client_id),
            };
            match enrolled {
                Some(client) => {
                    ctx.out
                        .note(format!("warning: {}", errors::describe(&err, &server)));
                    client
                }
                None => {
                    return Err(enroll_error(
                        &err,
                        &client_id,
                        &server,
                        profile.path(),
                        token_given,
                    ));
                }
            }
        }
    };
    let settings = Settings {
        client: client_id.to_string(),
        servers: servers.clone(),
        domain: user.domain.to_string(),
        trust: kind,
    };
    let saved = profile
        .install_trust(&trust_file, kind)
        .and_then(|()| profile.save_settings(&settings));
    client.close().await;
    saved?;
    ctx.out.print(
        format!(
            "{verb} {client_id} on {server}; profile {}",
            profile.path().display()
        ),
        json!({
            "client": client_id.to_string(),
            "user": user.to_string(),
            "device": client_id.device.to_string(),
            "servers": servers,
            "profile": profile.path().display().to_string(),
        }),
    )?;
    Ok(())
}

fn enroll_error(
    err: &ClientError,
    client: &ClientId,
    server: &str,
    dir: &Path,
    token_given: bool,
) -> anyhow::Error {
    let code = errors::code(err);
    let message = match (err, err.server_code()) {
        (_, Some(ErrorCode::USER_EXISTS)) => format!("user {} exists already", client.user),
        (_, Some(ErrorCode::USER_NOT_FOUND)) => format!("unknown user {}", client.user),
        // The server answers an unknown user like a wrong key (no existence oracle).
        (_, Some(ErrorCode::BAD_SIGNATURE)) => format!(
            "the server refused the user signature: {} does not exist there, or the user key is not theirs",
            client.user
        ),
        (_, Some(ErrorCode::CLIENT_EXISTS)) => format!(
            "device name {} is taken (or was used before) for {}: choose another with --device",
            client.device, client.user
        ),
        // The server does not say whether a token is wrong or used up (it would help guessing).
        (_, Some(ErrorCode::REGISTRATION_TOKEN_REQUIRED)) if token_given => {
            return errors::coded(
                "token_refused",
                "the registration token was refused: it is wrong or used up; ask the server's \
                 operator for a new one",
            );
        }
        (ClientError::ProfileExists(_), _) => {
            return errors::coded(
                "profile_exists",
                format!(
                    "a profile exists already at {}: pass another --profile DIR",
                    dir.display()
                ),
            );
        }
        _ => errors::describe(err, server),
    };
    errors::coded(&code, message)
}

/// Reads a user key file (or standard input for `-`).
fn read_user_key(ctx: &Context, path: &Path) -> anyhow::Result<UserKey> {
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the user key from standard input")?;
        text
    } else {
        #[cfg(unix)]
        if let Ok(meta) = fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt as _;
            if meta.permissions().mode() & 0o077 != 0 {
                ctx.out.note(format!(
                    "warning: {} is readable by other users; it holds a secret key",
                    path.display()
                ));
            }
        }
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
    };
    let not_a_key = || {
        anyhow!(
            "{} is not a user key file (made by roost-cli device export-user-key)",
            path.display()
        )
    };
    let hex_key = text
        .trim()
        .strip_prefix(USER_KEY_PREFIX)
        .ok_or_else(not_a_key)?;
    let bytes = hex::decode(hex_key.trim()).map_err(|_| not_a_key())?;
    UserKey::from_bytes(&bytes).map_err(|_| not_a_key())
}

/// Writes the user key to a new file (mode 0600) or to standard output.
async fn export_user_key(ctx: &Context, path: &Path) -> anyhow::Result<()> {
    let session = Session::open(ctx, false, Check::Skip).await?;
    let key = session.client.user_key();
    session.close().await;
    let key = key.ok_or_else(|| {
        anyhow!("this device does not hold the user key (export it from the user's first device)")
    })?;
    let text = format!("{USER_KEY_PREFIX}{}\n", hex::encode(key.to_bytes()));
    if path == Path::new("-") {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
        return Ok(());
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|err| match err.kind() {
        std::io::ErrorKind::AlreadyExists => {
            anyhow!("{} exists already; not overwriting it", path.display())
        }
        _ => anyhow!("cannot create {}: {err}", path.display()),
    })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    ctx.out.note(format!(
        "{} holds the user key of {}: whoever has it can add devices to this user. Move it only \
         over a channel you trust, run `roost-cli device add` with it, then delete it.",
        path.display(),
        key.user()
    ));
    ctx.out.json(json!({
        "user": key.user().to_string(),
        "file": path.display().to_string(),
    }))?;
    Ok(())
}

/// `device list`: DEVICE<TAB>CLIENT, this device marked.
async fn list_devices(ctx: &Context) -> anyhow::Result<()> {
    let session = Session::open(ctx, false, Check::Skip).await?;
    let me = session.client.client_id().clone();
    let devices = session.client.devices().await;
    let servers = session.settings.servers_text();
    session.close().await;
    let devices = devices.map_err(|err| anyhow!(errors::describe(&err, &servers)))?;
    for credential in devices {
        let this = credential.client == me;
        let mark = if this { " *" } else { "" };
        ctx.out.print(
            format!("{}{mark}\t{}", credential.client.device, credential.client),
            json!({
                "device": credential.client.device.to_string(),
                "client": credential.client.to_string(),
                "this_device": this,
                "credential_not_after": credential.not_after,
            }),
        )?;
    }
    Ok(())
}

/// `device remove DEVICE`.
async fn remove_device(ctx: &Context, device: &DeviceName) -> anyhow::Result<()> {
    let session = Session::open(ctx, false, Check::Skip).await?;
    if session.client.client_id().device == *device {
        session.close().await;
        bail!("{device} is this device: remove it from another device of the user");
    }
    let removed = session.client.remove_device(device).await;
    let client = ClientId::new(session.client.user_id().clone(), device.clone());
    let servers = session.settings.servers_text();
    session.close().await;
    removed.map_err(|err| anyhow!(errors::describe(&err, &servers)))?;
    ctx.out.print(
        format!("removed {client}"),
        json!({ "removed": client.to_string() }),
    )?;
    Ok(())
}

fn whoami(ctx: &Context) -> anyhow::Result<()> {
    let settings = ctx.profile.settings()?;
    let dir = ctx.profile.path().display().to_string();
    ctx.out.print(
        format!(
            "{} on {} (domain {}); profile {dir}",
            settings.client,
            settings.servers_text(),
            settings.domain
        ),
        json!({
            "client": settings.client,
            "servers": settings.servers,
            "domain": settings.domain,
            "profile": dir,
        }),
    )?;
    Ok(())
}

async fn group(ctx: &Context, command: GroupCommand) -> anyhow::Result<()> {
    if let GroupCommand::Create { name: Some(name) } = &command {
        profile::check_name(name)?;
    }
    let mut session = Session::open(ctx, false, Check::Required).await?;
    let result = group_in(ctx, &mut session, command).await;
    session.close().await;
    result
}

async fn group_in(
    ctx: &Context,
    session: &mut Session,
    command: GroupCommand,
) -> anyhow::Result<()> {
    let out = ctx.out;
    // Join pending Welcomes and catch up first, so groups and members are current.
    session.sync().await?;
    let current = session.client.groups().map_err(|err| session.fail(&err))?;
    match command {
        GroupCommand::Create { name } => {
            if let Some(name) = &name {
                session.names.check_available(name, None, &current)?;
            }
            let group = session
                .client
                .create_group()
                .await
                .map_err(|err| session.fail(&err))?;
            if let Some(name) = &name {
                session.names.set(name, &group, &current)?;
                ctx.profile.save_names(&session.names)?;
            }
            out.print(&group, json!({"group": group.to_string(), "name": name}))?;
        }
        GroupCommand::Invite { group, users } => {
            let id = session.member_group(&group)?;
            let invited = invite(session, &id, &group, &users).await?;
            print_clients(ctx, "added", &id, &invited.added)?;
            if let Some(problem) = invited.problem {
                return Err(problem);
            }
        }
        GroupCommand::Remove { group, users } => {
            let id = session.member_group(&group)?;
            let removed = remove(session, &id, &group, &users).await?;
            print_clients(ctx, "removed", &id, &removed)?;
        }
        GroupCommand::Update { group } => {
            let id = session.member_group(&group)?;
            let epoch = session
                .client
                .update_keys(&id)
                .await
                .map_err(|err| session.fail(&err))?;
            out.print(
                format!("updated your keys in {group}: epoch {epoch}"),
                json!({"group": id.to_string(), "epoch": epoch}),
            )?;
        }
        GroupCommand::Leave { group } => {
            let id = session.member_group(&group)?;
            session
                .client
                .leave_group(&id)
                .await
                .map_err(|err| session.fail(&err))?;
            let pending = session
                .client
                .groups()
                .map_err(|err| session.fail(&err))?
                .contains(&id);
            let text = if pending {
                format!(
                    "asked to leave {group}: you are out once another member's device \
                     processes it"
                )
            } else {
                format!("left {group}")
            };
            out.print(
                text,
                json!({"group": id.to_string(), "left": !pending, "pending": pending}),
            )?;
        }
        GroupCommand::List => {
            for id in &current {
                let name = session.names.name_of(id);
                out.print(
                    format!("{id}\t{}", name.unwrap_or_default()),
                    json!({"group": id.to_string(), "name": name}),
                )?;
            }
        }
        GroupCommand::Members { group } => {
            let id = session.member_group(&group)?;
            let members = session
                .client
                .members(&id)
                .await
                .map_err(|err| session.fail(&err))?;
            for member in members {
                out.print(
                    &member,
                    json!({"group": id.to_string(), "member": member.to_string()}),
                )?;
            }
        }
        GroupCommand::Name { group, name } => {
            let id = session.member_group(&group)?;
            session.names.set(&name, &id, &current)?;
            ctx.profile.save_names(&session.names)?;
            out.print(
                format!("{id}\t{name}"),
                json!({"group": id.to_string(), "name": name}),
            )?;
        }
    }
    Ok(())
}

async fn send(ctx: &Context, session: &Session, group: &str, text: &str) -> anyhow::Result<()> {
    if session.online {
        session.sync().await?;
    }
    let id = session.member_group(group)?;
    let message = session
        .client
        .send_text(&id, text)
        .await
        .map_err(|err| session.fail(&err))?;
    // Durably queued: from here on it goes out with this command or a later one.
    let flushed = if session.online {
        session.client.flush().await
    } else {
        Ok(())
    };
    let state = session
        .client
        .outbox()
        .await
        .map_err(|err| session.fail(&err))?
        .into_iter()
        .find(|m| m.id == message)
        .map(|m| m.state);
    match state {
        None => {
            ctx.out.json(json!({
                "group": id.to_string(), "id": message.to_string(), "sent": true,
            }))?;
        }
        Some(OutgoingState::Failed(failure)) => {
            bail!("message {message} cannot be sent: {failure}");
        }
        Some(_) => {
            let why = match flushed {
                Err(err) => session.fail(&err).to_string(),
                Ok(()) if !session.online => {
                    format!("server unreachable: {}", session.settings.servers_text())
                }
                Ok(()) => "not accepted yet".to_owned(),
            };
            ctx.out.note(format!(
                "queued message {message} ({why}); the next roost-cli command that reaches the \
                 server sends it (`roost-cli outbox` lists what waits)"
            ));
            ctx.out.json(json!({
                "group": id.to_string(), "id": message.to_string(), "sent": false, "queued": true,
            }))?;
        }
    }
    Ok(())
}

/// `outbox`: what waits to be sent, and what failed. Plain: `ID<TAB>GROUP<TAB>STATE<TAB>QUEUED`
/// (QUEUED in seconds since the Unix epoch); JSON: one object per message.
async fn outbox(ctx: &Context, session: &Session) -> anyhow::Result<()> {
    let messages = session
        .client
        .outbox()
        .await
        .map_err(|err| session.fail(&err))?;
    for message in messages {
        let (state, failure) = match &message.state {
            OutgoingState::Failed(failure) => ("failed", Some(failure.to_string())),
            _ => ("queued", None),
        };
        let queued_at = message
            .queued_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let label = session.names.label(&message.group);
        let line = match &failure {
            Some(failure) => format!("{}\t{label}\tfailed: {failure}\t{queued_at}", message.id),
            None => format!("{}\t{label}\t{state}\t{queued_at}", message.id),
        };
        ctx.out.print(
            line,
            json!({
                "id": message.id.to_string(),
                "group": message.group.to_string(),
                "name": session.names.name_of(&message.group),
                "state": state,
                "failure": failure,
                "queued_at": queued_at,
            }),
        )?;
    }
    Ok(())
}

/// Files at least this large get a progress bar (on a terminal).
const PROGRESS_FROM: u64 = 1024 * 1024;

/// A progress bar on stderr for a transfer of `total` bytes (hidden when stderr is not a
/// terminal or the transfer is small).
pub(crate) fn progress_bar(total: u64) -> indicatif::ProgressBar {
    if total < PROGRESS_FROM {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

async fn send_file(
    ctx: &Context,
    session: &Session,
    group: &str,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    session.sync().await?;
    let id = session.member_group(group)?;
    let source = roost_client::FileSource::path(path)
        .await
        .map_err(|err| anyhow::anyhow!("cannot read {}: {err}", path.display()))?;
    let mut bar: Option<indicatif::ProgressBar> = None;
    let sent = session
        .client
        .send_file(&id, source, |done, total| {
            bar.get_or_insert_with(|| progress_bar(total))
                .set_position(done);
        })
        .await
        .map_err(|err| session.fail(&err));
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let (message, sent) = sent?;
    // The announcing message is queued like a text; a file is sent online, so deliver it now.
    session
        .client
        .flush()
        .await
        .map_err(|err| session.fail(&err))?;
    let failed = session
        .client
        .outbox()
        .await
        .map_err(|err| session.fail(&err))?
        .into_iter()
        .find(|m| m.id == message)
        .and_then(|m| match m.state {
            OutgoingState::Failed(failure) => Some(failure),
            _ => None,
        });
    if let Some(failure) = failed {
        bail!("message {message} announcing the file cannot be sent: {failure}");
    }
    ctx.out.json(json!({
        "group": id.to_string(),
        "sent": true,
        "file": sent.name(),
        "size": sent.size,
        "media_type": sent.media_type(),
    }))?;
    Ok(())
}

/// Plain: one `VERB CLIENT` line per client; JSON: one object with the list.
fn print_clients(
    ctx: &Context,
    verb: &str,
    group: &GroupId,
    clients: &[ClientId],
) -> anyhow::Result<()> {
    if ctx.out.json {
        let list: Vec<String> = clients.iter().map(ToString::to_string).collect();
        ctx.out
            .json(json!({"group": group.to_string(), verb: list}))?;
    } else {
        for client in clients {
            ctx.out.print(format!("{verb} {client}"), json!(null))?;
        }
    }
    Ok(())
}

/// What [`invite`] did: the devices added, and why a user got none (if one did not).
pub(crate) struct Invited {
    pub(crate) added: Vec<ClientId>,
    pub(crate) problem: Option<anyhow::Error>,
}

/// Invites `users` (every device) to group `id`, called `label` in messages. A user none of
/// whose devices was added (already a member, or every KeyPackage refused) is the `problem`.
pub(crate) async fn invite(
    session: &Session,
    id: &GroupId,
    label: &str,
    users: &[UserId],
) -> anyhow::Result<Invited> {
    let added = session
        .client
        .invite(id, users)
        .await
        .map_err(|err| match err.server_code() {
            Some(ErrorCode::USER_NOT_FOUND) => unknown_users(users),
            _ => session.fail(&err),
        })?;
    // A user none of whose devices was added: already in the group (every device), or every
    // KeyPackage was refused (reported as events by recv).
    let members = session
        .client
        .members(id)
        .await
        .map_err(|err| session.fail(&err))?;
    let missing: Vec<&UserId> = users
        .iter()
        .filter(|user| !added.iter().any(|c| &c.user == *user))
        .collect();
    let (already, refused): (Vec<&UserId>, Vec<&UserId>) = missing
        .into_iter()
        .partition(|user| members.iter().any(|c| &c.user == *user));
    let list = |users: &[&UserId]| {
        users
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let problem = if !already.is_empty() {
        Some(errors::coded(
            "already_member",
            format!("already a member of {label}: {}", list(&already)),
        ))
    } else if !refused.is_empty() {
        Some(errors::coded(
            "error",
            format!(
                "no device of {} could be added (their KeyPackages were refused: see roost-cli \
                 recv)",
                list(&refused)
            ),
        ))
    } else {
        None
    };
    Ok(Invited { added, problem })
}

/// Removes every device of `users` from group `id` (called `label` in messages); refuses
/// the profile's own user and users who are not members. The devices removed.
pub(crate) async fn remove(
    session: &Session,
    id: &GroupId,
    label: &str,
    users: &[UserId],
) -> anyhow::Result<Vec<ClientId>> {
    if users.contains(session.client.user_id()) {
        bail!("to remove yourself, use roost-cli group leave {label}");
    }
    let members = session
        .client
        .members(id)
        .await
        .map_err(|err| session.fail(&err))?;
    let missing: Vec<String> = users
        .iter()
        .filter(|u| !members.iter().any(|m| &m.user == *u))
        .map(ToString::to_string)
        .collect();
    if !missing.is_empty() {
        bail!("{} not a member of {label}", join_users(&missing));
    }
    session
        .client
        .remove_users(id, users)
        .await
        .map_err(|err| session.fail(&err))
}

fn unknown_users(users: &[UserId]) -> anyhow::Error {
    match users {
        [user] => anyhow!("unknown user {user}"),
        _ => {
            let names: Vec<String> = users.iter().map(ToString::to_string).collect();
            anyhow!(
                "unknown user among {}: nobody was invited",
                names.join(", ")
            )
        }
    }
}

fn join_users(users: &[String]) -> String {
    match users {
        [one] => format!("{one} is"),
        many => format!("{} are", many.join(", ")),
    }
}
