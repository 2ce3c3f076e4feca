//! `roost-cli`: a terminal client for roost homeservers, on top of the roost-client SDK.
//!
//! `main` parses the command line, installs tracing (stderr, `RUST_LOG`, errors only by
//! default), runs one command and turns a failure into a single `error: ...` line on stderr
//! and exit code 1 (2 for command-line mistakes, from clap).
#![forbid(unsafe_code)]

mod args;
mod commands;
mod errors;
mod events;
mod output;
mod profile;
mod session;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;

use crate::output::Output;
use crate::profile::ProfileDir;
use crate::session::Context;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
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

fn fail(err: &anyhow::Error) -> ExitCode {
    let broken_pipe = err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if !broken_pipe {
        // `{:#}` joins the causes with ": "; one line whatever they contain.
        let message = format!("{err:#}").replace(['\n', '\r'], " ");
        eprintln!("error: {message}");
    }
    ExitCode::FAILURE
}
