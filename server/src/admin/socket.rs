//! The admin socket: a Unix stream socket `admin.sock` in the data directory through which
//! `roost admin` reaches the running server. Access is the file system's: the socket is
//! made 0600 (owner only) right after it is bound, and every connection's peer credentials
//! (SO_PEERCRED) are checked: only the socket's owner (the server's user) and root are
//! served, anyone else is closed without a reply. One request per connection: one JSON line
//! in (at most [`MAX_REQUEST`] bytes, within [`REQUEST_DEADLINE`]), one JSON line out.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio_util::task::TaskTracker;

use super::{AdminError, Ctx, Reply, Request, execute};
use crate::State;

/// Largest request line.
pub(crate) const MAX_REQUEST: u64 = 64 * 1024;
/// How long a connection may take to send its request.
pub(crate) const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// A reply line.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    Ok(Reply),
    Error(String),
}

/// Binds the admin socket in the data directory and serves it until shutdown (then removes
/// it). A socket file left by a server that died is replaced; one that answers (another
/// live server on this data directory) is left alone and this server serves none.
#[cfg(unix)]
pub(crate) async fn serve(state: Arc<State>, tracker: &TaskTracker) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    let path = state.settings.data_dir.join(super::SOCKET_FILE);
    if path.exists() {
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} answers: another server uses this data directory",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let owner = std::fs::metadata(&path)?.uid();
    let served = path.clone();
    let inner = tracker.clone();
    tracker.spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = state.shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        tracing::warn!(%err, "admin socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let uid = match stream.peer_cred() {
                Ok(cred) => cred.uid(),
                Err(err) => {
                    tracing::warn!(%err, "admin socket: no peer credentials; closed");
                    continue;
                }
            };
            if uid != owner && uid != 0 {
                tracing::warn!(uid, "admin socket: connection of another user refused");
                continue;
            }
            let state = state.clone();
            inner.spawn(async move {
                if let Err(err) = handle(state, stream).await {
                    tracing::debug!(%err, "admin connection failed");
                }
            });
        }
        let _ = std::fs::remove_file(&served);
    });
    Ok(path)
}

#[cfg(not(unix))]
pub(crate) async fn serve(_state: Arc<State>, _tracker: &TaskTracker) -> std::io::Result<PathBuf> {
    Err(std::io::Error::other(
        "the admin socket needs a Unix system",
    ))
}

#[cfg(unix)]
async fn handle(state: Arc<State>, stream: tokio::net::UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let outcome =
        match tokio::time::timeout(REQUEST_DEADLINE, reader.read_until(b'\n', &mut line)).await {
            Err(_) => Outcome::Error("request not received in time".into()),
            Ok(Err(err)) => return Err(err),
            Ok(Ok(_)) if !line.ends_with(b"\n") => Outcome::Error(format!(
                "request not one line of at most {MAX_REQUEST} bytes"
            )),
            Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
                Err(err) => Outcome::Error(format!("malformed request: {err}")),
                Ok(request) => {
                    tracing::info!(?request, "admin request");
                    let ctx = Ctx {
                        store: state.store.clone(),
                        domain: state.settings.domain.clone(),
                        identity_dir: state.settings.identity_dir.clone(),
                        blob_dir: crate::blob::Blobs::backup_dir(&state.settings),
                        live: Some(state.clone()),
                    };
                    match execute(&ctx, request).await {
                        Ok(reply) => Outcome::Ok(reply),
                        Err(err) => Outcome::Error(err.to_string()),
                    }
                }
            },
        };
    let mut out = serde_json::to_vec(&outcome).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Sends one request to the server listening on `path`. `Ok(None)` when nothing listens
/// there (no socket file, or a stale one): the caller opens the store itself.
#[cfg(unix)]
pub(crate) async fn request(path: &Path, request: &Request) -> Result<Option<Reply>, AdminError> {
    let stream = match tokio::net::UnixStream::connect(path).await {
        Ok(stream) => stream,
        Err(err)
            if matches!(
                err.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(err) => return Err(AdminError::Io(format!("{}: {err}", path.display()))),
    };
    // The server closes a connection it refuses (another user's) without a word: the write
    // or the read then fails, or the answer is empty.
    let refused = || {
        AdminError::Io(format!(
            "the server closed the admin socket {} without answering (run roost admin as the \
             server's user)",
            path.display()
        ))
    };
    let io = |err: std::io::Error| match err.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => refused(),
        _ => AdminError::Io(format!("admin socket {}: {err}", path.display())),
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(|err| AdminError::Io(err.to_string()))?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(io)?;
    let mut answer = Vec::new();
    BufReader::new(read)
        .take(16 * 1024 * 1024)
        .read_to_end(&mut answer)
        .await
        .map_err(io)?;
    if answer.is_empty() {
        return Err(refused());
    }
    match serde_json::from_slice::<Outcome>(&answer) {
        Ok(Outcome::Ok(reply)) => Ok(Some(reply)),
        Ok(Outcome::Error(message)) => Err(AdminError::Service(message)),
        Err(err) => Err(AdminError::Io(format!(
            "unreadable answer from the server: {err}"
        ))),
    }
}

#[cfg(not(unix))]
pub(crate) async fn request(_path: &Path, _request: &Request) -> Result<Option<Reply>, AdminError> {
    Ok(None)
}
