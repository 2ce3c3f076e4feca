//! The persistent outgoing queue's public types: [`MessageId`], [`OutgoingState`],
//! [`SendFailure`] and [`OutgoingMessage`].
//!
//! [`Client::send`](crate::Client::send) (and `send_text`, `send_content`) encrypts a message
//! and stores it in the profile's outgoing queue in the same transaction that uses up its
//! ratchet generation, and returns its [`MessageId`] at once. A background task delivers the
//! queue, in order per group, across reconnects and restarts, with the same bytes on every
//! retry; [`Event::Outgoing`](crate::Event::Outgoing) reports each message's fate.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use roost_protocol::{ErrorCode, GroupId};

/// A message's id in this device's outgoing queue: local (it never goes on the wire), random,
/// shown as 16 lowercase hexadecimal digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(u64);

impl MessageId {
    /// A fresh random id.
    pub(crate) fn random() -> Self {
        Self(rand::random())
    }

    /// The id as a number (its stored form).
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// The id from [`MessageId::as_u64`].
    pub fn from_u64(value: u64) -> Self {
        Self(value)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A string that is no [`MessageId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a message id (16 hexadecimal digits)")]
pub struct MessageIdError;

impl FromStr for MessageId {
    type Err = MessageIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(MessageIdError);
        }
        u64::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| MessageIdError)
    }
}

/// Where a message of the outgoing queue stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutgoingState {
    /// In the queue, not yet known to be accepted by the hub (the state when `send_*`
    /// returns).
    Queued,
    /// Durably accepted by the group's hub, which delivers it to every other member. The
    /// message has left the queue.
    Sent,
    /// It can never be sent; it stays listed by [`Client::outbox`](crate::Client::outbox)
    /// until [`Client::dismiss`](crate::Client::dismiss).
    Failed(SendFailure),
}

/// Why a queued message can never be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendFailure {
    /// This client was removed from the group (or its leave was committed) before the message
    /// went out.
    RemovedFromGroup,
    /// The group is gone from this client's state (or the hub does not know it).
    NoSuchGroup,
    /// The hub refused the message for a reason a retry cannot change.
    Refused {
        /// The hub's error code (PROTOCOL.md §10).
        code: ErrorCode,
        /// The hub's short reason.
        reason: String,
    },
    /// The message kept being refused for its epoch although the client caught up each time.
    TooManyAttempts,
}

impl fmt::Display for SendFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendFailure::RemovedFromGroup => f.write_str("removed from the group"),
            SendFailure::NoSuchGroup => f.write_str("no such group"),
            SendFailure::Refused { code, reason } => write!(f, "refused ({code:?}): {reason}"),
            SendFailure::TooManyAttempts => f.write_str("refused for its epoch too many times"),
        }
    }
}

/// One message of the outgoing queue, as [`Client::outbox`](crate::Client::outbox) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutgoingMessage {
    /// Its local id (returned by `send_*`).
    pub id: MessageId,
    /// The group it is for.
    pub group: GroupId,
    /// [`OutgoingState::Queued`] or [`OutgoingState::Failed`] (sent messages leave the queue).
    pub state: OutgoingState,
    /// When `send_*` queued it (this device's clock).
    pub queued_at: SystemTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_print_and_parse_as_16_hex_digits() {
        let id = MessageId::from_u64(0x00ab_cdef_0123_4567);
        assert_eq!(id.to_string(), "00abcdef01234567");
        assert_eq!("00abcdef01234567".parse::<MessageId>(), Ok(id));
        assert_eq!("00ABCDEF01234567".parse::<MessageId>(), Ok(id));
        for bad in [
            "",
            "abc",
            "00abcdef012345678",
            "00abcdef0123456g",
            "+0abcdef01234567",
        ] {
            assert_eq!(bad.parse::<MessageId>(), Err(MessageIdError), "{bad:?}");
        }
        let random = MessageId::random();
        assert_eq!(random.to_string().parse::<MessageId>(), Ok(random));
    }
}
