//! `roost`: the homeserver binary. Parses the command line and configuration, installs
//! tracing, and runs the server until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use roost_server::config::Config;

#[derive(Parser)]
#[command(
    name = "roost",
    version,
    about = "roost: a federated MLS homeserver over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the homeserver. With no options: 127.0.0.1:4433 (UDP), domain `localhost`, data in
    /// ./roost-data; the database, AS key and a self-signed certificate are made on first start.
    Serve {
        /// TOML configuration file (every field optional; see README.md).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Data directory (overrides `data_dir`).
        #[arg(long)]
        data: Option<PathBuf>,
        /// UDP listen address (overrides `listen`).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// The domain this server serves (overrides `domain`).
        #[arg(long)]
        domain: Option<String>,
        /// TCP address for /metrics and /health (overrides `metrics_listen`).
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Storage engine, `redb` or `postgres` (overrides `storage.backend`).
        #[arg(long)]
        backend: Option<roost_server::config::StorageBackend>,
        /// PostgreSQL connection string (overrides `storage.url`). Prefer the configuration
        /// file or ROOST_DATABASE_URL for one with a password: command lines are visible to
        /// other users.
        #[arg(long, env = "ROOST_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Database connections per node (overrides `storage.pool_size`).
        #[arg(long)]
        pool_size: Option<u32>,
        /// Directory of the identity files shared by every node of the domain (overrides
        /// `identity_dir`).
        #[arg(long)]
        identity: Option<PathBuf>,
    },
    /// Administration.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Registration tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a registration token and print it (only its hash is stored). Works while the
    /// server runs.
    Create {
        /// TOML configuration file, for its identity_dir (else data_dir).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Directory of the token file (overrides the configuration's identity_dir, else
        /// data_dir).
        #[arg(long)]
        data: Option<PathBuf>,
        /// How many registrations the token allows.
        #[arg(long, default_value_t = 1)]
        uses: u64,
    },
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Serve {
            config,
            data,
            listen,
            domain,
            metrics,
            backend,
            database_url,
            pool_size,
            identity,
        } => {
            let mut config = load_config(config.as_ref())?;
            if let Some(data) = data {
                config.data_dir = data;
            }
            if let Some(listen) = listen {
                config.listen = listen;
            }
            if let Some(domain) = domain {
                config.domain = domain;
            }
            if metrics.is_some() {
                config.metrics_listen = metrics;
            }
            if let Some(backend) = backend {
                config.storage.backend = backend;
            }
            if database_url.is_some() {
                config.storage.url = database_url;
            }
            if let Some(pool_size) = pool_size {
                config.storage.pool_size = pool_size;
            }
            if identity.is_some() {
                config.identity_dir = identity;
            }
            let settings = config.validate()?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(roost_server::run(settings, shutdown_signal()))?;
        }
        Command::Admin {
            command:
                AdminCommand::Token {
                    command: TokenCommand::Create { config, data, uses },
                },
        } => {
            let config = load_config(config.as_ref())?;
            // Tokens live with the identity files, which every node of a domain shares.
            let dir = data.unwrap_or(config.identity_dir.unwrap_or(config.data_dir));
            let token = roost_server::create_registration_token(&dir, uses.max(1))?;
            println!("{token}");
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
