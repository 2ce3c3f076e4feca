//! The LISTEN side of the PostgreSQL bus: one connection of its own (outside the pool) that
//! listens on the wake-up channels and hands what the other nodes committed to the
//! [`BusSink`]. When the connection fails it reconnects with backoff and then resyncs every
//! listener of this node, since notifications sent meanwhile are lost.
//!
//! LISTEN/NOTIFY is PostgreSQL's own; distributed engines that speak its wire protocol
//! mostly lack it (docs/ARCHITECTURE.md says what to use there).

use std::time::Duration;

use tokio_postgres::{AsyncMessage, NoTls};

use crate::bus::{BusSink, QUEUES_CHANNEL, REVOKED_CHANNEL, decode_heads};

/// Listens until aborted; `ready` is told once the first LISTEN is in place.
pub(super) async fn run(
    config: tokio_postgres::Config,
    node: std::sync::Arc<str>,
    sink: BusSink,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    let mut ready = Some(ready);
    loop {
        match listen_once(&config, &node, &sink, first, &mut ready).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(err) => tracing::warn!(%err, "wake-up bus connection lost; reconnecting"),
        }
        first = false;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    node: &str,
    sink: &BusSink,
    first: bool,
    ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (messages, mut incoming) = tokio::sync::mpsc::unbounded_channel();
    // The connection must be polled for the LISTEN statements to complete, and it is where
    // notifications arrive.
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(message)) => {
                    if messages.send(message).is_err() {
                        return;
                    }
                }
                Some(Err(err)) => {
                    tracing::warn!(%err, "wake-up bus connection failed");
                    return;
                }
                None => return,
            }
        }
    });
    client
        .batch_execute(&format!(
            "LISTEN {QUEUES_CHANNEL}; LISTEN {REVOKED_CHANNEL};"
        ))
        .await?;
    if let Some(ready) = ready.take() {
        let _ = ready.send(());
    }
    if !first {
        // Anything committed while we were not listening: every listener reads again.
        sink.resync();
    }
    while let Some(message) = incoming.recv().await {
        let AsyncMessage::Notification(note) = message else {
            continue;
        };
        match note.channel() {
            QUEUES_CHANNEL => {
                let (from, heads) = decode_heads(note.payload());
                if from != node {
                    sink.queue_heads(&heads);
                }
            }
            REVOKED_CHANNEL => {
                if let Ok(client_num) = note.payload().parse() {
                    sink.client_removed(client_num);
                }
            }
            _ => {}
        }
    }
    driver.abort();
    drop(client);
    Ok(())
}
