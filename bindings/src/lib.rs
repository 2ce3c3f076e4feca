//! roost-ffi: the roost client SDK ([`roost_client`]) for apps written in Swift, Kotlin and
//! Python, through UniFFI (proc-macro interface).
//!
//! A thin layer, never a second SDK: every call converts its arguments (ids cross as strings,
//! in the SDK's text forms), runs the SDK call and converts the result. What it adds:
//!
//! - **A runtime of its own.** The SDK is async on tokio; foreign callers have no tokio
//!   runtime. roost-ffi owns one multi-threaded runtime ([`runtime`]); every exported async
//!   function spawns its work there and the foreign side only awaits the task's completion.
//!   No SDK work, blocking or not, ever runs on the caller's thread.
//! - **No panic crosses the boundary.** A panic in SDK code ends its task; the awaiting side
//!   sees [`RoostError::Internal`] (see [`run`]). The event listener calls foreign code from
//!   a blocking thread of the runtime, never from a worker.
//! - **One typed error** ([`RoostError`]) with the server's wire error code where the server
//!   answered with one.
//!
//! Modules: `client` (the [`RoostClient`] object and the enrollment functions), `config`
//! (how to reach and trust the homeserver), `event` (events and message content), `files`
//! (sending and downloading files), `push` (push registration), `error`.
//! docs/BINDINGS.md has the build commands and an example per language.
#![forbid(unsafe_code)]

mod client;
mod config;
mod error;
mod event;
mod files;
mod push;

use std::future::Future;
use std::sync::OnceLock;

pub use client::{
    Device, EventListener, ListenerError, RoostClient, add_device, open_profile, register,
};
pub use config::{ServerConfig, Trust};
pub use error::RoostError;
pub use event::{Event, MessageContent, OutgoingMessage, OutgoingState, SendFailure};
pub use files::{Attachment, ProgressListener, SentFile};
pub use push::{PushInfo, PushTarget, web_push_target};

uniffi::setup_scaffolding!("roost");

/// The runtime every SDK call runs on: created on first use, lives as long as the process
/// (a foreign library cannot know when the app is done with it).
fn runtime() -> Result<&'static tokio::runtime::Runtime, RoostError> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .thread_name("roost-ffi")
                .enable_all()
                .build()
                .map_err(|err| err.to_string())
        })
        .as_ref()
        .map_err(|reason| RoostError::Internal {
            message: format!("cannot start the SDK runtime: {reason}"),
        })
}

/// Runs `work` on the SDK runtime and waits for it. A panic in `work` becomes
/// [`RoostError::Internal`]. If the foreign side stops waiting (cancels its task), `work`
/// still runs to its end: an MLS operation is never cut off half-way.
async fn run<T, F>(work: F) -> Result<T, RoostError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, RoostError>> + Send + 'static,
{
    outcome(runtime()?.spawn(work).await)
}

/// Like [`run`], but if the foreign side stops waiting, `work` is stopped too: for waits that
/// must not finish unseen (an event taken by an abandoned `next_event` would be lost).
async fn run_cancellable<T, F>(work: F) -> Result<T, RoostError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, RoostError>> + Send + 'static,
{
    struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
    impl<T> Drop for AbortOnDrop<T> {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = AbortOnDrop(runtime()?.spawn(work));
    outcome((&mut task.0).await)
}

fn outcome<T>(
    joined: Result<Result<T, RoostError>, tokio::task::JoinError>,
) -> Result<T, RoostError> {
    match joined {
        Ok(result) => result,
        Err(err) if err.is_panic() => {
            tracing::error!("an SDK call panicked");
            Err(RoostError::Internal {
                message: "the SDK failed unexpectedly (a bug: please report it)".into(),
            })
        }
        Err(_) => Err(RoostError::Closed),
    }
}
