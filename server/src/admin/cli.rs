//! `roost admin ...`: the command-line side. Registration tokens are files (created and
//! revoked here directly); everything else goes to the running server through its admin
//! socket, or, when no server answers there, to the store opened directly (with redb that is
//! possible only while no server holds the database).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::{AdminError, Ctx, Reply, Request, SOCKET_FILE, execute, socket};
use crate::config::{Config, Settings, StorageSettings};

/// `roost admin`'s arguments.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// TOML configuration file of the server (for data_dir, identity_dir and storage).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// Data directory of the server (overrides the configuration's data_dir).
    #[arg(long, global = true)]
    pub data: Option<PathBuf>,
    /// Print the result as one JSON object instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// What to administer.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Users of this homeserver.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Devices (clients) of a user.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Registration tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Counts: users, clients, groups, queued messages, federation outbox per peer.
    Stats,
    /// Write a consistent copy of the homeserver (database and identity files) into DIR, a
    /// new or empty directory, while the server runs or not. DIR is then a data directory a
    /// server starts on (see README.md, Backup and restore).
    Backup {
        /// Where to write the copy.
        dir: PathBuf,
    },
}

/// `roost admin user ...`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Every user, with their number of active devices.
    List,
    /// One user and their devices.
    Show {
        /// User name (`alice` or `alice@domain`).
        name: String,
    },
    /// Remove every device of the user (queues and KeyPackages deleted, connections cut off)
    /// and refuse new ones; the name stays taken.
    Deactivate {
        /// User name.
        name: String,
    },
}

/// `roost admin device ...`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// The user's active devices.
    List {
        /// User name.
        user: String,
    },
    /// Remove a device: its queue and KeyPackages are deleted, its connections cut off; its
    /// name is never used again.
    Remove {
        /// User name.
        user: String,
        /// Device name.
        device: String,
    },
}

/// `roost admin token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a registration token and print it (only its hash is stored).
    Create {
        /// How many registrations the token allows.
        #[arg(long, default_value_t = 1)]
        uses: u64,
    },
    /// Every token (by id: the start of its hash), with its uses allowed and used.
    List,
    /// Revoke a token, by the id `token list` shows or by the token itself.
    Revoke {
        /// Token id or token.
        id: String,
    },
}

/// Why `roost admin` could not start on this directory.
fn no_homeserver(dir: &Path, missing: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "no homeserver in {} ({} is missing): pass --data DIR (or --config FILE) naming the \
         data directory of a server that has started once",
        dir.display(),
        missing.display()
    )
}

/// The settings `roost admin` works with, after checking that they name a homeserver. A
/// data directory whose admin socket exists is one (the server there knows its identity
/// directory and database) unless the command works on the files itself (`files`).
fn settings(args: &AdminArgs, files: bool) -> anyhow::Result<Settings> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(data) = &args.data {
        config.data_dir = data.clone();
    }
    let settings = config.validate()?;
    if !files && settings.data_dir.join(SOCKET_FILE).exists() {
        return Ok(settings);
    }
    let as_key = settings.identity_dir.join(crate::identity::AS_KEY_FILE);
    if !as_key.is_file() {
        return Err(no_homeserver(&settings.data_dir, &as_key));
    }
    if matches!(settings.storage, StorageSettings::Redb) {
        let database = settings.data_dir.join(crate::DATABASE_FILE);
        if !database.is_file() {
            return Err(no_homeserver(&settings.data_dir, &database));
        }
    }
    Ok(settings)
}

/// Runs `roost admin`.
pub fn run(args: AdminArgs) -> anyhow::Result<()> {
    let files = matches!(
        args.command,
        AdminCommand::Token {
            command: TokenCommand::Create { .. } | TokenCommand::Revoke { .. }
        }
    );
    let settings = settings(&args, files)?;
    let request = match &args.command {
        AdminCommand::Token { command } => match command {
            TokenCommand::Create { uses } => {
                let token = crate::auth::tokens::create(&settings.identity_dir, (*uses).max(1))?;
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({ "token": token, "uses": (*uses).max(1) })
                    );
                } else {
                    println!("{token}");
                }
                return Ok(());
            }
            TokenCommand::Revoke { id } => {
                crate::auth::tokens::revoke(&settings.identity_dir, id)?;
                if args.json {
                    println!("{}", serde_json::json!({ "revoked": id }));
                } else {
                    println!("revoked {id}");
                }
                return Ok(());
            }
            TokenCommand::List => Request::TokenList,
        },
        AdminCommand::User { command } => match command {
            UserCommand::List => Request::UserList,
            UserCommand::Show { name } => Request::UserShow { name: name.clone() },
            UserCommand::Deactivate { name } => Request::UserDeactivate { name: name.clone() },
        },
        AdminCommand::Device { command } => match command {
            DeviceCommand::List { user } => Request::DeviceList { user: user.clone() },
            DeviceCommand::Remove { user, device } => Request::DeviceRemove {
                user: user.clone(),
                device: device.clone(),
            },
        },
        AdminCommand::Stats => Request::Stats,
        AdminCommand::Backup { dir } => Request::Backup {
            dir: std::path::absolute(dir)?,
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = runtime.block_on(send(&settings, request))?;
    if args.json {
        println!("{}", serde_json::to_string(&reply)?);
    } else {
        print!("{}", super::table::render(&reply));
    }
    Ok(())
}

/// Through the socket if a server answers there, else on the store opened here.
async fn send(settings: &Settings, request: Request) -> anyhow::Result<Reply> {
    let path = settings.data_dir.join(SOCKET_FILE);
    if let Some(reply) = socket::request(&path, &request).await? {
        return Ok(reply);
    }
    let (store, closer) = open_store(settings).await?;
    let ctx = Ctx {
        store,
        domain: settings.domain.clone(),
        identity_dir: settings.identity_dir.clone(),
        blob_dir: crate::blob::Blobs::backup_dir(settings),
        live: None,
    };
    let result = execute(&ctx, request).await;
    drop(ctx);
    tokio::task::spawn_blocking(move || closer.join()).await?;
    Ok(result?)
}

/// Opens the store of a server that is not running (redb), or the shared database
/// (PostgreSQL, whose nodes hear removals through the bus).
async fn open_store(
    settings: &Settings,
) -> anyhow::Result<(crate::storage::Backend, crate::storage::Closer)> {
    let database = settings.data_dir.join(crate::DATABASE_FILE);
    let mut settings = settings.clone();
    if matches!(settings.storage, StorageSettings::Redb) {
        let domain = crate::storage::redb_stored_domain(&database).map_err(|err| {
            anyhow::anyhow!(
                "cannot open {} ({err}): if the server runs, its admin socket {} did not \
                 answer; run roost admin as the server's user with the server's --data",
                database.display(),
                settings.data_dir.join(SOCKET_FILE).display()
            )
        })?;
        if let Some(domain) = domain {
            settings.domain = domain
                .parse()
                .map_err(|_| AdminError::Service(format!("stored domain {domain:?} is invalid")))?;
        }
    }
    let as_key = crate::identity::AsKey::load_or_create(&settings.identity_dir)?;
    let sink = crate::bus::BusSink {
        queues: Default::default(),
        revoked: Default::default(),
        nodes_gone: Default::default(),
    };
    Ok(crate::storage::open(&settings, &database, &as_key.public_key(), sink, None).await?)
}
