//! Idempotent submission: receipts of accepted DS requests.
//!
//! A SendMessage, Commit, ExternalJoin or LeaveGroup is identified by a digest the server
//! derives from what it carries: the request kind, the authenticated sender, the group and the
//! MLS message bytes (an MLS PrivateMessage or commit is unique per send, so the digest names
//! a retry of the *same bytes*, never a new message). When such a request is accepted, its
//! receipt (digest → answer) is written in the transaction that applies it, so a crash between
//! the write and the answer cannot let a retry apply it twice. A repeat within
//! `receipt_window_secs` finds the receipt under the group's lock and gets the original
//! answer; nothing is enqueued. A refused request leaves no receipt: its repeat is judged
//! afresh. A request forwarded by a member's home server carries the same bytes and sender, so
//! the hub derives the same digest however many homeservers a retry passed through.
//!
//! A SendCounted also carries the sender's send counter. Its receipt carries a
//! [`SendCounter`]: the engine stores, per (group, sender), the highest counter accepted with
//! the digest and answer of the message that carried it, in the same transaction, and refuses
//! the write (GROUP_MOVED, writing nothing: the operation runs again and the DS answers
//! SEND_COUNTER_USED) when the stored counter is not below the new one. The row is never
//! pruned: the sender's last accepted message is recognised however late it is repeated.

use roost_protocol::{ClientId, GroupId};
use tls_codec::Serialize as _;

use crate::State;
use crate::error::ServiceError;

/// Which request a receipt answers (part of the digest: the same bytes sent as another
/// request kind are another request).
#[derive(Debug, Clone, Copy)]
#[repr(u16)]
pub(crate) enum Kind {
    SendMessage = 1,
    Commit = 2,
    ExternalJoin = 3,
    LeaveGroup = 4,
    UploadKeyPackages = 5,
}

/// What the original answer was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// A fixed value (a commit's new epoch; 0 for LeaveGroup).
    Value(u64),
    /// The recipients the write's first fan-out reached (SendMessage), known once it is written.
    Reached,
}

/// A counted send's place in its sender's sequence (SendCounted), written with its receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SendCounter {
    /// The (group, sender) pair: see [`member_key`].
    pub(crate) member: [u8; 32],
    pub(crate) counter: u64,
}

/// What the store holds for one (group, sender): its highest accepted counter, and the digest
/// and answer of the message that carried it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CounterRow {
    pub(crate) counter: u64,
    pub(crate) key: [u8; 32],
    pub(crate) answer: u64,
}

/// A receipt to write with a DS operation's effect.
#[derive(Debug, Clone)]
pub(crate) struct Receipt {
    /// The request's digest.
    pub(crate) key: [u8; 32],
    pub(crate) answer: Answer,
    /// When it was accepted (unix ms).
    pub(crate) accepted_ms: u64,
    /// A stored receipt for the same key accepted before this time is out of the window: it is
    /// replaced. One accepted at or after it means the request was applied already: the write
    /// is refused (GROUP_MOVED, writing nothing) and the operation runs again, finding it.
    pub(crate) fresh_after_ms: u64,
    /// A SendCounted's counter: stored with the receipt; a stored counter not below it
    /// refuses the write like a fresh receipt does. Boxed: only counted sends have one, and
    /// a DS write travels by value through the engines' write queues.
    pub(crate) counter: Option<Box<SendCounter>>,
}

/// What the DS needs from storage for receipts (implemented by every engine in `storage`).
pub(crate) trait ReceiptStore {
    /// The answer of the receipt for `key` if one was accepted at or after `fresh_after_ms`.
    async fn receipt(
        &self,
        key: [u8; 32],
        fresh_after_ms: u64,
    ) -> Result<Option<u64>, ServiceError>;
    /// Deletes receipts accepted before `before_ms`, then the oldest ones while more than
    /// `max_kept` remain (send counters are kept). Returns how many were deleted.
    async fn prune_receipts(&self, before_ms: u64, max_kept: u64) -> Result<u64, ServiceError>;
    /// The highest send counter accepted for `member` (see [`member_key`]), if any.
    async fn send_counter(&self, member: [u8; 32]) -> Result<Option<CounterRow>, ServiceError>;
}

/// The key of a (group, sender) pair's send counter: SHA-256 over a label of its own, the
/// sender's and the group's TLS encodings, each length-prefixed (uint64, big-endian).
pub(crate) fn member_key(sender: &ClientId, group: &GroupId) -> [u8; 32] {
    let group = group.tls_serialize_detached().unwrap_or_default();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"roost send counter v1");
    for part in [sender.tls_serialize_detached().unwrap_or_default(), group] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(&part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The digest identifying a DS request: see [`digest`], with parts the group's TLS encoding
/// and the message bytes.
pub(crate) fn key(kind: Kind, sender: &ClientId, group: &GroupId, bytes: &[u8]) -> [u8; 32] {
    let group = group.tls_serialize_detached().unwrap_or_default();
    digest(kind, sender, &[&group, bytes])
}

/// SHA-256 over a label, the kind, the sender's TLS encoding and `parts`, each
/// length-prefixed (uint64, big-endian).
fn digest(kind: Kind, sender: &ClientId, parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"roost receipt v1");
    ctx.update(&(kind as u16).to_be_bytes());
    let sender = sender.tls_serialize_detached().unwrap_or_default();
    for part in std::iter::once(sender.as_slice()).chain(parts.iter().copied()) {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// A request being handled: its digest and the start of the window it is looked up in.
pub(crate) struct Submission {
    key: [u8; 32],
    /// When the request arrived, by the server's clock.
    now_ms: u64,
    fresh_after_ms: u64,
}

impl Submission {
    pub(crate) fn new(
        state: &State,
        kind: Kind,
        sender: &ClientId,
        group: &GroupId,
        bytes: &[u8],
    ) -> Self {
        Self {
            key: key(kind, sender, group, bytes),
            now_ms: state.clock.unix_millis(),
            fresh_after_ms: window_start(state),
        }
    }

    /// An UploadKeyPackages: parts are the ordinary KeyPackages' bytes in order, then the
    /// last-resort one's (an empty part when there is none; a KeyPackage is never empty).
    pub(crate) fn for_upload(
        state: &State,
        sender: &ClientId,
        ordinary: &[(u64, Vec<u8>)],
        last_resort: &Option<(u64, Vec<u8>)>,
    ) -> Self {
        let mut parts: Vec<&[u8]> = ordinary.iter().map(|(_, kp)| kp.as_slice()).collect();
        parts.push(
            last_resort
                .as_ref()
                .map_or(&[][..], |(_, kp)| kp.as_slice()),
        );
        Self {
            key: digest(Kind::UploadKeyPackages, sender, &parts),
            now_ms: state.clock.unix_millis(),
            fresh_after_ms: window_start(state),
        }
    }

    /// The original answer if this request was accepted within the window. Call it holding
    /// the group's lock.
    pub(crate) async fn repeated(&self, state: &State) -> Result<Option<u64>, ServiceError> {
        let found = state.store.receipt(self.key, self.fresh_after_ms).await?;
        if found.is_some() {
            metrics::counter!("roost_repeated_requests_total").increment(1);
        }
        Ok(found)
    }

    /// The receipt to write with the request's effect.
    pub(crate) fn receipt(&self, answer: Answer) -> Receipt {
        Receipt {
            key: self.key,
            answer,
            accepted_ms: self.now_ms,
            fresh_after_ms: self.fresh_after_ms,
            counter: None,
        }
    }

    /// The request's digest.
    pub(crate) fn key(&self) -> [u8; 32] {
        self.key
    }
}

/// Receipts accepted before this time (unix ms) are out of the window.
fn window_start(state: &State) -> u64 {
    let window_ms = state
        .settings
        .limits
        .receipt_window_secs
        .saturating_mul(1000);
    state.clock.unix_millis().saturating_sub(window_ms)
}

/// Prunes receipts out of the window or beyond `max_receipts` (run by the sweeper).
pub(crate) async fn prune(state: &State) -> Result<u64, ServiceError> {
    let max = state.settings.limits.max_receipts;
    state.store.prune_receipts(window_start(state), max).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_separates_kind_sender_group_and_bytes() {
        let domain: roost_protocol::Domain = "example.org".parse().unwrap();
        let alice: ClientId = "alice@example.org/phone".parse().unwrap();
        let bob: ClientId = "bob@example.org/phone".parse().unwrap();
        let g1 = GroupId::new([1; 16], domain.clone());
        let g2 = GroupId::new([2; 16], domain);
        let base = key(Kind::SendMessage, &alice, &g1, b"m");
        assert_eq!(base, key(Kind::SendMessage, &alice, &g1, b"m"));
        assert_ne!(base, key(Kind::Commit, &alice, &g1, b"m"));
        assert_ne!(base, key(Kind::SendMessage, &bob, &g1, b"m"));
        assert_ne!(base, key(Kind::SendMessage, &alice, &g2, b"m"));
        assert_ne!(base, key(Kind::SendMessage, &alice, &g1, b"n"));
    }
}
