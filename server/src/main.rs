//! `roost`: the homeserver binary. Parses the command line and configuration, installs
//! tracing (stderr; text, coloured only on a terminal, or JSON lines), and runs the server
//! until SIGINT or SIGTERM. A failure is one `error: ...` line on stderr and exit code 1
//! (2 for a command-line mistake).

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use roost_server::config::{Config, LogFormat};

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
        /// Log lines on stderr: `text` or `json` (overrides `log_format`).
        #[arg(long)]
        log_format: Option<LogFormat>,
    },
    /// Administration of a homeserver, running or stopped (see README.md, Administration).
    Admin(roost_server::admin::cli::AdminArgs),
    /// Check a configuration file, or print one with every field and its default.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to stdout: `roost man > roost.1`.
    Man,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and validate a configuration file (default: none, so the defaults) and print the
    /// effective settings as TOML (a database password shown as ***). Exit 1 if it is invalid.
    Check {
        /// TOML configuration file (`-` or /dev/stdin for standard input).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print a commented TOML file with every field set to its default.
    Default,
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(path) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| anyhow::anyhow!("cannot read the configuration from stdin: {e}"))?;
            Config::from_toml(&text)?
        }
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The causes joined with ": ", each once (many errors already print their source), on one
/// line whatever they contain.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace(['\n', '\r'], " ")
}

/// Help and version go out as clap prints them; a mistake becomes one `error:` line and
/// exit code 2.
fn usage_error(err: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = err.print();
        return ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2));
    }
    // clap's text: the message (perhaps continued on indented lines), a blank line, tips,
    // `Usage: roost SUBCOMMAND [OPTIONS] ...`; keep the message and name the help to read.
    let rendered = err.render().to_string();
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    let command: Vec<&str> = rendered
        .lines()
        .find_map(|line| line.strip_prefix("Usage: "))
        .unwrap_or("roost")
        .split_whitespace()
        .take_while(|word| !word.starts_with(['[', '<', '-']))
        .collect();
    eprintln!("error: {message} (see `{} --help`)", command.join(" "));
    ExitCode::from(2)
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`); colour only when stderr is a
/// terminal and `NO_COLOR` is unset, so files and pipes get plain text.
fn install_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().with_ansi(false).init(),
        _ => {
            let ansi = std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
            builder.with_ansi(ansi).init();
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
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
            log_format,
        } => {
            let mut config = load_config(config.as_ref())?;
            install_tracing(log_format.unwrap_or(config.log_format));
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
            let served = runtime.block_on(roost_server::run(settings, shutdown_signal()));
            // The server has shut its stores, or given up waiting for them after its grace
            // periods; blocking jobs still running (a blob sweep deleting a large backlog) end
            // as a crash would, which every store recovers from.
            runtime.shutdown_timeout(std::time::Duration::from_secs(5));
            served?;
        }
        Command::Admin(args) => {
            install_tracing(LogFormat::Text);
            roost_server::admin::cli::run(args)?;
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let config = load_config(config.as_ref())?;
            config.clone().validate()?;
            print!(
                "{}",
                roost_server::config_reference::effective_toml(&config)
            );
        }
        Command::Config {
            command: ConfigCommand::Default,
        } => print!("{}", roost_server::config_reference::default_toml()),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "roost", &mut script);
            write_stdout(&script)?;
        }
        Command::Man => {
            use clap::CommandFactory as _;
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut page)?;
            write_stdout(&page)?;
        }
    }
    Ok(())
}

/// Writes generated text to stdout; a reader that went away early (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(bytes) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
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
