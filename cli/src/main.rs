//! `roost-cli`: a terminal client for roost homeservers, on top of the roost-client SDK.
//!
//! `main` parses the command line, installs tracing (stderr, `RUST_LOG`, errors only by
//! default, coloured only on a terminal), runs one command and turns a failure into a single
//! `error: ...` line on stderr and exit code 1 (2 for a command-line mistake).
#![forbid(unsafe_code)]

mod args;
mod commands;
mod errors;
mod events;
mod output;
mod profile;
mod push;
mod session;

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;

use crate::output::Output;
use crate::profile::ProfileDir;
use crate::session::Context;

fn main() -> ExitCode {
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    // These need no profile, server or runtime.
    match &cli.command {
        args::Command::Completions { shell } => {
            use clap::CommandFactory as _;
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut args::Cli::command(), "roost-cli", &mut script);
            return write_stdout(&script);
        }
        args::Command::Man => {
            use clap::CommandFactory as _;
            let mut page = Vec::new();
            if let Err(err) = clap_mangen::Man::new(args::Cli::command()).render(&mut page) {
                return fail(&err.into());
            }
            return write_stdout(&page);
        }
        _ => {}
    }
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(&anyhow::anyhow!("cannot start the runtime: {err}")),
    };
    let result = runtime.block_on(async {
        let ctx = Context {
            profile: ProfileDir::new(cli.profile)?,
            out: Output { json: cli.json },
            timeout: Duration::from_secs(cli.timeout.max(1)),
        };
        commands::run(&ctx, cli.command).await
    });
    // A read of standard input (chat) may still be blocked in a runtime thread: do not wait
    // for it; everything else is closed by now.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&err),
    }
}

/// Writes generated text to stdout (a closed pipe is not an error: `fail` stays quiet on it).
fn write_stdout(bytes: &[u8]) -> ExitCode {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&err.into()),
    }
}

fn fail(err: &anyhow::Error) -> ExitCode {
    let broken_pipe = err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if !broken_pipe {
        report(errors::code_of(err), &one_line(err));
    }
    ExitCode::FAILURE
}

/// Whether `--json` is on the command line (also when clap could not parse the rest).
fn json_mode() -> bool {
    std::env::args_os()
        .skip(1)
        .take_while(|arg| arg != "--")
        .any(|arg| arg == "--json")
}

/// One error on stderr: `error: MESSAGE`, or with `--json` one object
/// `{"error":{"code":CODE,"message":MESSAGE}}`.
fn report(code: &str, message: &str) {
    if json_mode() {
        eprintln!(
            "{}",
            serde_json::json!({"error": {"code": code, "message": message}})
        );
    } else {
        eprintln!("error: {message}");
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
    // `Usage: roost-cli SUBCOMMAND [OPTIONS] ...`; keep the message and name the help to read.
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
        .unwrap_or("roost-cli")
        .split_whitespace()
        .take_while(|word| !word.starts_with(['[', '<', '-']))
        .collect();
    report(
        "usage",
        &format!("{message} (see `{} --help`)", command.join(" ")),
    );
    ExitCode::from(2)
}
