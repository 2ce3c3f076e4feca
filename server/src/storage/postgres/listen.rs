//! The LISTEN side of the PostgreSQL bus: one connection of its own (outside the pool) that
//! listens on the wake-up channels and hands what the other nodes committed to the
//! [`BusSink`]. Wake-ups can be lost in three ways, and each makes every listener of this
//! node read from its cursor again ([`BusSink::resync`]):
//! - this connection failed: after reconnecting;
//! - another node's announcer lost a batch: it says so ([`RESYNC`]) once it reconnected;
//! - another node died between a commit and its announcement: every [`LIVENESS_PERIOD`] the
//!   listener looks which nodes have connections (their `application_name`), and resyncs
//!   when one it saw is gone (and wakes the federation outbox, which may now take over the
//!   destinations that node drained: `outbox`).
//!
//! LISTEN/NOTIFY is PostgreSQL's own; distributed engines that speak its wire protocol
//! mostly lack it (docs/ARCHITECTURE.md says what to use there).

use std::time::Duration;

use tokio_postgres::{AsyncMessage, NoTls};

use crate::bus::{BusSink, QUEUES_CHANNEL, REVOKED_CHANNEL, decode_heads};

/// `application_name` of every connection of a node: this, then the node's id.
pub(super) const NODE_PREFIX: &str = "roost node ";
/// A queue-channel payload item asking every node to resync (a node lost wake-ups).
pub(super) const RESYNC: &str = "*";
/// How often the nodes still connected are looked at.
const LIVENESS_PERIOD: Duration = Duration::from_secs(3);

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
    let mut nodes = live_nodes(&client).await?;
    let mut liveness = tokio::time::interval(LIVENESS_PERIOD);
    liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            message = incoming.recv() => message,
            _ = liveness.tick() => {
                let now = live_nodes(&client).await?;
                if nodes.iter().any(|n| !now.contains(n)) {
                    tracing::info!(
                        "a node of the domain is gone; listeners read again, the outbox looks \
                         for its destinations"
                    );
                    sink.node_gone();
                }
                nodes = now;
                continue;
            }
        };
        let Some(message) = message else {
            break;
        };
        let AsyncMessage::Notification(note) = message else {
            continue;
        };
        match note.channel() {
            QUEUES_CHANNEL => {
                let payload = note.payload();
                let (from, heads) = decode_heads(payload);
                if from == node {
                    continue;
                }
                if payload.split(' ').skip(1).any(|item| item == RESYNC) {
                    sink.resync();
                } else {
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

/// The ids of the nodes that have a connection to the database now.
async fn live_nodes(
    client: &tokio_postgres::Client,
) -> Result<std::collections::BTreeSet<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT DISTINCT application_name FROM pg_stat_activity
             WHERE application_name LIKE $1",
            &[&format!("{NODE_PREFIX}%")],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| row.try_get::<_, String>(0).ok())
        .filter_map(|name| name.strip_prefix(NODE_PREFIX).map(str::to_owned))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::postgres::{Options, PgStore};

    async fn node(url: &str, sink: BusSink) -> (PgStore, crate::storage::postgres::PgCloser) {
        let options = Options {
            url,
            pool_size: 2,
            timeout: Duration::from_secs(10),
            domain: "example.org",
            as_public_key: &[7; 32],
        };
        PgStore::connect(options, sink).await.expect("a node")
    }

    /// A node that dies may have committed entries it never announced: the others' listeners
    /// read again when they see it gone, and their outboxes look for its destinations.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listeners_read_again_when_a_node_is_gone() {
        let cluster = roost_interop::postgres::Cluster::start().expect("PostgreSQL cluster");
        let url = cluster.create_database("liveness").unwrap();
        let sink = BusSink::default();
        let (_b, closer_b) = node(&url, sink.clone()).await;
        let (a, closer_a) = node(&url, BusSink::default()).await;
        let mut listener = sink.queues.subscribe(7);
        listener.borrow_and_update();
        // B has seen A (at its next look), then A goes away without a word.
        tokio::time::sleep(LIVENESS_PERIOD + Duration::from_millis(500)).await;
        assert!(!listener.has_changed().unwrap());
        drop(a);
        closer_a.join();
        let woken = tokio::time::timeout(LIVENESS_PERIOD * 4, listener.changed()).await;
        assert!(matches!(woken, Ok(Ok(()))), "B's listener was not woken");
        // And B's federation outbox is told to look for A's destinations.
        let told = tokio::time::timeout(Duration::from_secs(1), sink.nodes_gone.notified()).await;
        assert!(told.is_ok(), "B's outbox was not told");
        closer_b.join();
    }
}
