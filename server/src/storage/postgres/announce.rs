//! The announcer: sends the queue heads this node committed to the other nodes, as `NOTIFY`s
//! on a connection of its own, after the writing transactions committed. Whatever queued up
//! while one batch was being sent goes out in the next (at most [`MAX_BATCH`] heads), so a
//! busy node sends few notifications. If the connection fails, the heads of that batch are
//! dropped and it reconnects, then asks every node to resync (`listen::RESYNC`): a lost
//! wake-up only delays.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::NoTls;
use tokio_postgres::types::Type;

use super::listen::RESYNC;
use crate::bus::{QUEUES_CHANNEL, encode_heads};

/// Most heads announced in one round.
const MAX_BATCH: usize = 16_384;

/// Announces until the store (every sender) is gone.
pub(super) async fn run(
    config: tokio_postgres::Config,
    node: Arc<str>,
    mut heads: UnboundedReceiver<Vec<(u64, u64)>>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut lost = false;
    loop {
        let client = match config.connect(NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::warn!(%err, "wake-up announcer connection failed");
                    }
                });
                backoff = Duration::from_millis(100);
                client
            }
            Err(err) => {
                tracing::warn!(%err, "wake-up announcer cannot connect; retrying");
                // Meanwhile, heads are dropped rather than piled up.
                while heads.try_recv().is_ok() {}
                lost = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if lost {
            let resync = format!("{node} {RESYNC}");
            if client
                .execute("SELECT pg_notify($1, $2)", &[&QUEUES_CHANNEL, &resync])
                .await
                .is_err()
            {
                continue;
            }
        }
        loop {
            let Some(first) = heads.recv().await else {
                return;
            };
            let mut batch = first;
            while batch.len() < MAX_BATCH {
                match heads.try_recv() {
                    Ok(more) => batch.extend(more),
                    Err(_) => break,
                }
            }
            let payloads = encode_heads(&node, &batch);
            // One statement, one round trip, however many payloads.
            let sent = client
                .execute_typed(
                    "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
                    &[(&QUEUES_CHANNEL, Type::TEXT), (&payloads, Type::TEXT_ARRAY)],
                )
                .await;
            if let Err(err) = sent {
                tracing::warn!(%err, "wake-ups not announced; reconnecting");
                lost = true;
                break;
            }
        }
    }
}
