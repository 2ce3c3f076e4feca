//! The wake-up bus between the nodes of one domain: what a node must hear about writes made
//! by the others, so its listeners push at once and its authenticated connections of removed
//! clients are cut off.
//!
//! A bus carries hints, never data: a queue's new head (the listener reads the entries from
//! its cursor in the store) and a removed client's number (the store already refuses it).
//! A lost wake-up therefore only delays: listeners read from their cursor on the next wake-up,
//! and whenever a bus had to reconnect (and may have missed something) it calls
//! [`BusSink::resync`], which wakes every listener of this node.
//!
//! The engine publishes, because only the engine knows when a write committed: the PostgreSQL
//! engine sends a removal's `NOTIFY` inside its transaction (delivered on commit, never for a
//! rolled-back write), announces queue heads right after their commit, and listens on a
//! connection of its own (`storage::postgres::{announce, listen}`).
//! The embedded engine runs one node per domain and needs no bus. Another bus (a message
//! broker, say) would feed the same [`BusSink`].

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use crate::queue::Notifier;

/// Clients removed while this process runs. Connections authenticated before the removal
/// check it on every request; new authentications read the store.
#[derive(Debug, Default, Clone)]
pub(crate) struct Revoked(Arc<RwLock<HashSet<u64>>>);

impl Revoked {
    pub(crate) fn insert(&self, client_num: u64) {
        match self.0.write() {
            Ok(mut set) => set.insert(client_num),
            Err(poisoned) => poisoned.into_inner().insert(client_num),
        };
    }

    pub(crate) fn contains(&self, client_num: u64) -> bool {
        match self.0.read() {
            Ok(set) => set.contains(&client_num),
            Err(poisoned) => poisoned.into_inner().contains(&client_num),
        }
    }
}

/// Where a bus delivers what it heard from the other nodes.
#[derive(Debug, Clone, Default)]
pub(crate) struct BusSink {
    pub(crate) queues: Notifier,
    pub(crate) revoked: Revoked,
    /// Told when another node of the domain stopped: the federation outbox looks at once for
    /// the destinations it was draining (their leases can be taken over now).
    pub(crate) nodes_gone: Arc<tokio::sync::Notify>,
}

impl BusSink {
    /// Another node committed entries up to these heads (client number, seq).
    pub(crate) fn queue_heads(&self, heads: &[(u64, u64)]) {
        self.queues.notify(heads);
    }

    /// Another node removed this client.
    pub(crate) fn client_removed(&self, client_num: u64) {
        self.revoked.insert(client_num);
        self.queues.close_listeners(client_num);
    }

    /// The bus may have missed messages: every listener reads from its cursor again.
    pub(crate) fn resync(&self) {
        self.queues.wake_all();
    }

    /// Another node of the domain stopped (it may have died between a commit and its
    /// announcement, or while it drained a federation destination).
    pub(crate) fn node_gone(&self) {
        self.resync();
        self.nodes_gone.notify_one();
    }
}

/// Channel of queue wake-ups.
pub(crate) const QUEUES_CHANNEL: &str = "roost_queues";
/// Channel of client removals.
pub(crate) const REVOKED_CHANNEL: &str = "roost_revoked";
/// Largest payload of one notification (PostgreSQL's limit is 8000 bytes).
const MAX_PAYLOAD: usize = 7_900;

/// Encodes queue heads as notification payloads: `NODE num:seq num:seq ...`, split so that
/// none is longer than a notification may be. `node` lets a node skip its own wake-ups (it
/// woke its listeners already, with the entries in hand).
pub(crate) fn encode_heads(node: &str, heads: &[(u64, u64)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for (num, seq) in heads {
        if current.is_empty() {
            current.push_str(node);
        }
        let item = format!(" {num}:{seq}");
        if current.len() + item.len() > MAX_PAYLOAD {
            out.push(std::mem::take(&mut current));
            current.push_str(node);
        }
        current.push_str(&item);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Decodes a payload of [`encode_heads`]: the sending node and the heads. Malformed items are
/// skipped (the bus only hints).
pub(crate) fn decode_heads(payload: &str) -> (&str, Vec<(u64, u64)>) {
    let mut parts = payload.split(' ');
    let node = parts.next().unwrap_or("");
    let heads = parts
        .filter_map(|item| {
            let (num, seq) = item.split_once(':')?;
            Some((num.parse().ok()?, seq.parse().ok()?))
        })
        .collect();
    (node, heads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_round_trip_and_split_below_the_notification_limit() {
        let heads: Vec<(u64, u64)> = (0..2_000).map(|n| (n * 1_000_003, n + 7)).collect();
        let payloads = encode_heads("node-a", &heads);
        assert!(payloads.len() > 1);
        let mut back = Vec::new();
        for payload in &payloads {
            assert!(payload.len() <= MAX_PAYLOAD);
            let (node, part) = decode_heads(payload);
            assert_eq!(node, "node-a");
            back.extend(part);
        }
        assert_eq!(back, heads);
        assert!(encode_heads("node-a", &[]).is_empty());
        assert_eq!(decode_heads("n 1:2 junk 3:x 4:5").1, vec![(1, 2), (4, 5)]);
    }
}
