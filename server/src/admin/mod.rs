//! Administration: the operations behind `roost admin` (users, devices, registration tokens,
//! counts, backup), run either inside the server, reached through its admin socket
//! ([`socket`]), or by the `roost admin` process on a store it opened itself while no server
//! holds it. Both run the same [`execute`].

pub mod cli;
mod socket;
pub(crate) mod store;
mod table;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use roost_protocol::{ClientId, Domain, UserName};
use serde::{Deserialize, Serialize};

use crate::State;
use crate::auth::AuthStore as _;
use crate::auth::tokens;
use crate::error::ServiceError;
use crate::storage::Backend;
use store::{AdminStore as _, BackupOutcome, StoreStats, UserSummary};

pub(crate) use socket::serve;

/// File name of the admin socket in the data directory.
pub const SOCKET_FILE: &str = "admin.sock";

/// One administration request, as it crosses the admin socket (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
    UserList,
    UserShow { name: String },
    UserDeactivate { name: String },
    DeviceList { user: String },
    DeviceRemove { user: String, device: String },
    TokenList,
    Stats,
    Backup { dir: PathBuf },
}

/// A device (client) of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Device {
    pub(crate) device: String,
    pub(crate) client: String,
    /// When its current credential expires (s since the Unix epoch).
    pub(crate) credential_not_after: u64,
}

/// A registration token as listed: never the token itself, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TokenInfo {
    /// The first 16 hex digits of its SHA-256: what `token revoke` takes.
    pub(crate) id: String,
    pub(crate) uses_allowed: u64,
    pub(crate) used: u64,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Reply {
    Users {
        users: Vec<UserSummary>,
    },
    User {
        user: UserSummary,
        devices: Vec<Device>,
    },
    Deactivated {
        name: String,
        removed_clients: u64,
    },
    Devices {
        user: String,
        devices: Vec<Device>,
    },
    DeviceRemoved {
        client: String,
    },
    Tokens {
        tokens: Vec<TokenInfo>,
    },
    Stats {
        domain: String,
        #[serde(flatten)]
        stats: StoreStats,
    },
    Backup {
        dir: PathBuf,
        database_bytes: u64,
        files: Vec<String>,
    },
}

/// Why an administration request failed: one line for the operator.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// A name or argument that cannot be right.
    #[error("{0}")]
    Usage(String),
    /// The user, device or token does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The store failed; nothing was written.
    #[error("{0}")]
    Service(String),
    /// A file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// The engine is backed up with its own tools.
    #[error("{0}")]
    External(String),
}

impl From<ServiceError> for AdminError {
    fn from(err: ServiceError) -> Self {
        match err {
            ServiceError::Store(store) => AdminError::Service(format!("storage failure: {store}")),
            other => AdminError::Service(other.to_string()),
        }
    }
}

/// What the operations run against.
pub(crate) struct Ctx {
    pub(crate) store: Backend,
    pub(crate) domain: Domain,
    pub(crate) identity_dir: PathBuf,
    /// The blob files' directory, copied into backups (`None` with PostgreSQL, whose dump
    /// holds the blobs).
    pub(crate) blob_dir: Option<PathBuf>,
    /// The running server, whose connections and listeners of removed clients must be cut
    /// off; `None` when `roost admin` opened the store itself (with PostgreSQL the other
    /// nodes hear removals through the bus either way).
    pub(crate) live: Option<Arc<State>>,
}

impl Ctx {
    fn revoke(&self, client_num: u64) {
        if let Some(state) = &self.live {
            state.revoke(client_num);
            state.queues.close_listeners(client_num);
        }
    }
}

fn user_name(name: &str) -> Result<UserName, AdminError> {
    // Accept `alice` and `alice@domain`.
    let local = name.split_once('@').map_or(name, |(local, _)| local);
    local
        .parse()
        .map_err(|_| AdminError::Usage(format!("{name:?} is not a valid user name")))
}

fn check_domain(ctx: &Ctx, name: &str) -> Result<(), AdminError> {
    match name.split_once('@') {
        Some((_, domain)) if domain != ctx.domain.as_str() => Err(AdminError::Usage(format!(
            "{name:?} is not a user of this homeserver ({})",
            ctx.domain
        ))),
        _ => Ok(()),
    }
}

async fn devices(ctx: &Ctx, name: &UserName) -> Result<Vec<Device>, AdminError> {
    let user = roost_protocol::UserId {
        name: name.clone(),
        domain: ctx.domain.clone(),
    };
    Ok(ctx
        .store
        .active_clients_of(&user)
        .await?
        .into_iter()
        .map(|record| Device {
            device: record.credential.client.device.to_string(),
            client: record.credential.client.to_string(),
            credential_not_after: record.credential.not_after,
        })
        .collect())
}

async fn summary(ctx: &Ctx, name: &str) -> Result<(UserName, UserSummary), AdminError> {
    check_domain(ctx, name)?;
    let parsed = user_name(name)?;
    match ctx.store.user(&parsed).await? {
        Some(summary) => Ok((parsed, summary)),
        None => Err(AdminError::NotFound(format!(
            "no user {parsed}@{}",
            ctx.domain
        ))),
    }
}

/// Runs one request.
pub(crate) async fn execute(ctx: &Ctx, request: Request) -> Result<Reply, AdminError> {
    match request {
        Request::UserList => Ok(Reply::Users {
            users: ctx.store.users().await?,
        }),
        Request::UserShow { name } => {
            let (parsed, user) = summary(ctx, &name).await?;
            let devices = devices(ctx, &parsed).await?;
            Ok(Reply::User { user, devices })
        }
        Request::UserDeactivate { name } => {
            let (parsed, _) = summary(ctx, &name).await?;
            let removed = ctx.store.deactivate_user(&parsed).await?;
            for num in &removed {
                ctx.revoke(*num);
            }
            tracing::info!(user = %parsed, clients = removed.len(), "user deactivated");
            Ok(Reply::Deactivated {
                name: format!("{parsed}@{}", ctx.domain),
                removed_clients: removed.len() as u64,
            })
        }
        Request::DeviceList { user } => {
            let (parsed, _) = summary(ctx, &user).await?;
            Ok(Reply::Devices {
                user: format!("{parsed}@{}", ctx.domain),
                devices: devices(ctx, &parsed).await?,
            })
        }
        Request::DeviceRemove { user, device } => {
            let (parsed, _) = summary(ctx, &user).await?;
            let client: ClientId = format!("{parsed}@{}/{device}", ctx.domain)
                .parse()
                .map_err(|_| AdminError::Usage(format!("{device:?} is not a valid device name")))?;
            let num = match ctx.store.remove_client(&client).await {
                Ok(num) => num,
                Err(ServiceError::ClientNotFound) => {
                    return Err(AdminError::NotFound(format!("no active device {client}")));
                }
                Err(err) => return Err(err.into()),
            };
            ctx.revoke(num);
            tracing::info!(%client, "client removed by an administrator");
            Ok(Reply::DeviceRemoved {
                client: client.to_string(),
            })
        }
        Request::TokenList => {
            let used: std::collections::HashMap<String, u64> =
                ctx.store.token_uses().await?.into_iter().collect();
            let tokens = tokens::list(&ctx.identity_dir)
                .map_err(|err| AdminError::Io(format!("registration tokens: {err}")))?
                .into_iter()
                .map(|(hash, allowed)| TokenInfo {
                    id: hash.chars().take(tokens::ID_LEN).collect(),
                    uses_allowed: allowed,
                    used: used.get(&hash).copied().unwrap_or(0),
                })
                .collect();
            Ok(Reply::Tokens { tokens })
        }
        Request::Stats => Ok(Reply::Stats {
            domain: ctx.domain.to_string(),
            stats: ctx.store.stats().await?,
        }),
        Request::Backup { dir } => backup(ctx, &dir).await,
    }
}

/// Identity files copied next to the database, so that the backup directory is a data
/// directory a server can start on.
const IDENTITY_FILES: [&str; 7] = [
    crate::identity::AS_KEY_FILE,
    crate::identity::RESET_KEY_FILE,
    crate::identity::CERT_FILE,
    crate::identity::CERT_KEY_FILE,
    tokens::TOKENS_FILE,
    crate::push::PUSH_KEY_FILE,
    crate::push::VAPID_KEY_FILE,
];

async fn backup(ctx: &Ctx, dir: &Path) -> Result<Reply, AdminError> {
    if !dir.is_absolute() {
        return Err(AdminError::Usage(format!(
            "backup directory {} must be an absolute path",
            dir.display()
        )));
    }
    let io = |err: std::io::Error| AdminError::Io(format!("{}: {err}", dir.display()));
    let mut created = false;
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(AdminError::Usage(format!(
                    "backup directory {} is not empty: name a new or empty one",
                    dir.display()
                )));
            }
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io)?;
            created = true;
        }
        Err(err) => return Err(io(err)),
    }
    restrict_dir(dir).map_err(io)?;
    let database = dir.join(crate::DATABASE_FILE);
    // A backup that was not written leaves no directory behind that this command made.
    let discard = || {
        if created {
            let _ = std::fs::remove_dir_all(dir);
        }
    };
    let bytes = match ctx.store.backup(database).await {
        Ok(BackupOutcome::Written(bytes)) => bytes,
        Ok(BackupOutcome::External(how)) => {
            discard();
            return Err(AdminError::External(how.to_owned()));
        }
        Err(err) => {
            discard();
            return Err(err.into());
        }
    };
    let mut files = vec![crate::DATABASE_FILE.to_owned()];
    for name in IDENTITY_FILES {
        let from = ctx.identity_dir.join(name);
        match std::fs::copy(&from, dir.join(name)) {
            Ok(_) => files.push(name.to_owned()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(AdminError::Io(format!("{}: {err}", from.display()))),
        }
    }
    if let Some(blob_dir) = ctx.blob_dir.clone() {
        let dest = dir.join(crate::blob::files::DEFAULT_DIR);
        let copied = tokio::task::spawn_blocking(move || {
            crate::blob::files::copy_all(&blob_dir, &dest)
                .map_err(|err| AdminError::Io(format!("blobs {}: {err}", blob_dir.display())))
        })
        .await
        .map_err(|err| AdminError::Io(format!("blob copy: {err}")))??;
        if copied.0 > 0 {
            files.push(format!("{}/", crate::blob::files::DEFAULT_DIR));
        }
        tracing::info!(blobs = copied.0, bytes = copied.1, "blobs copied");
    }
    tracing::info!(dir = %dir.display(), bytes, "backup written");
    Ok(Reply::Backup {
        dir: dir.to_owned(),
        database_bytes: bytes,
        files,
    })
}

#[cfg(unix)]
fn restrict_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(not(unix))]
fn restrict_dir(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}
