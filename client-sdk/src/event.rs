//! What the SDK tells the app: [`Event`]s, and how they are kept on disk until the app has
//! taken them.
//!
//! Events are written in the same database transaction as the state change that caused them
//! (a decrypted message, a new epoch, a join), so none is lost in a crash: the app receives
//! each one at least once (see [`Client::next_event`](crate::Client::next_event)).

use roost_protocol::content::{Content, ContentError};
use roost_protocol::{ClientId, ErrorCode, GroupId};
use tls_codec::{TlsDeserializeBytes, TlsSerialize, TlsSize};

use crate::outgoing::{MessageId, OutgoingState, SendFailure};

/// Something that happened in one of the client's groups.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// An application message was received and decrypted.
    Message {
        /// The group it was sent to.
        group: GroupId,
        /// The client that sent it (authenticated by MLS).
        sender: ClientId,
        /// The sender's id of the message: what its `send` returned (its [`Event::Outgoing`]
        /// names the same id), carried in the MLS message's authenticated data. Unique per
        /// sender and group: the SDK drops a message whose id it received already (among the
        /// last 65,536 ids it received). Events are delivered at least once (the one being
        /// handled when the app died comes again), so an app that must not show a message
        /// twice keeps the ids it showed. `None` when the sender's client sets no id (another
        /// implementation, PROTOCOL.md §4.5).
        id: Option<MessageId>,
        /// The plaintext: the encoding of a `MessageContent` (PROTOCOL.md §4.5) if the sender
        /// follows the protocol. [`Event::content`] decodes it.
        bytes: Vec<u8>,
    },
    /// This client joined a group (by a Welcome from `inviter`).
    Joined {
        /// The group.
        group: GroupId,
        /// The member whose commit added this client.
        inviter: ClientId,
    },
    /// Members were added to a group by someone else's commit.
    MembersAdded {
        /// The group.
        group: GroupId,
        /// The committer.
        by: ClientId,
        /// The new members.
        members: Vec<ClientId>,
    },
    /// Members were removed from a group by another member. (Members who asked to leave are
    /// [`Event::MembersLeft`].)
    MembersRemoved {
        /// The group.
        group: GroupId,
        /// The committer.
        by: ClientId,
        /// The removed members.
        members: Vec<ClientId>,
    },
    /// This client was removed from a group by another member. The group's state is deleted.
    /// (A leave this client asked for is [`Event::LeftGroup`].)
    RemovedFromGroup {
        /// The group.
        group: GroupId,
        /// The committer.
        by: ClientId,
    },
    /// A member credential did not check out against its AS credential (RFC 9420 §5.3.1), so
    /// the Welcome, commit or KeyPackage carrying it was refused.
    CredentialRejected {
        /// The group concerned.
        group: GroupId,
        /// The client the bad leaf claims to be (if its identity decoded).
        client: Option<ClientId>,
        /// Why it was refused.
        reason: String,
    },
    /// A message for a group could not be processed (undecryptable, invalid, of an epoch this
    /// client never reached). If the group's state fell behind, [`Client::rejoin_group`]
    /// resynchronises it.
    ///
    /// [`Client::rejoin_group`]: crate::Client::rejoin_group
    GroupError {
        /// The group.
        group: GroupId,
        /// What went wrong.
        reason: String,
    },
    /// A message of this client's outgoing queue changed state: it was sent (durably accepted
    /// by the hub) or can never be sent.
    Outgoing {
        /// The group it is for.
        group: GroupId,
        /// The id `send_*` returned.
        id: MessageId,
        /// [`OutgoingState::Sent`] or [`OutgoingState::Failed`].
        state: OutgoingState,
    },
    /// This client's state of the group could not be used any more (it missed commits that
    /// are gone from its queue, its profile was restored from an old copy, it was offline
    /// longer than the queue keeps messages), so the SDK rejoined the group by external
    /// commit on its own. Messages sent to the group while this client was behind are not
    /// readable by it.
    Rejoined {
        /// The group.
        group: GroupId,
    },
    /// Another member rejoined the group by external commit (its device had fallen behind):
    /// it cannot read what was sent while it was behind.
    MemberRejoined {
        /// The group.
        group: GroupId,
        /// The member that rejoined.
        member: ClientId,
    },
    /// Members left a group: each asked to (`Client::leave_group`), and `by` committed it (this
    /// client too, when it committed their leave itself).
    MembersLeft {
        /// The group.
        group: GroupId,
        /// The member whose commit applied the leaves.
        by: ClientId,
        /// The members who left.
        members: Vec<ClientId>,
    },
    /// This client's leave ([`Client::leave_group`](crate::Client::leave_group)) was committed
    /// by `by`. The group's state is deleted.
    LeftGroup {
        /// The group.
        group: GroupId,
        /// The member whose commit applied it.
        by: ClientId,
    },
    /// A commit of this client that was left pending (the app stopped, or the homeserver
    /// was unreachable, before its outcome was known) was accepted by the hub and is now
    /// applied: these members were added and removed by it.
    CommitSettled {
        /// The group.
        group: GroupId,
        /// Members the commit added.
        added: Vec<ClientId>,
        /// Members the commit removed.
        removed: Vec<ClientId>,
    },
}

impl Event {
    /// The content of a [`Event::Message`] (`None` for other events). A content type this
    /// version does not know is [`Content::Unknown`]; bytes that are no `MessageContent` are a
    /// [`ContentError`]. Neither affects the group: show the message as unsupported or
    /// unreadable and go on.
    pub fn content(&self) -> Option<Result<Content, ContentError>> {
        match self {
            Event::Message { bytes, .. } => Some(Content::decode(bytes)),
            _ => None,
        }
    }

    /// The group the event is about.
    pub fn group(&self) -> &GroupId {
        match self {
            Event::Message { group, .. }
            | Event::Joined { group, .. }
            | Event::MembersAdded { group, .. }
            | Event::MembersRemoved { group, .. }
            | Event::RemovedFromGroup { group, .. }
            | Event::CredentialRejected { group, .. }
            | Event::GroupError { group, .. }
            | Event::Outgoing { group, .. }
            | Event::Rejoined { group }
            | Event::MemberRejoined { group, .. }
            | Event::CommitSettled { group, .. }
            | Event::MembersLeft { group, .. }
            | Event::LeftGroup { group, .. } => group,
        }
    }
}

/// The on-disk form of an [`Event`] (TLS encoding, like everything else in roost).
#[derive(Debug, Clone, TlsSize, TlsSerialize, TlsDeserializeBytes)]
#[repr(u16)]
pub(crate) enum StoredEvent {
    #[tls_codec(discriminant = 1)]
    Message {
        group: GroupId,
        sender: ClientId,
        bytes: Vec<u8>,
    },
    #[tls_codec(discriminant = 2)]
    Joined { group: GroupId, inviter: ClientId },
    #[tls_codec(discriminant = 3)]
    MembersAdded {
        group: GroupId,
        by: ClientId,
        members: Vec<ClientId>,
    },
    #[tls_codec(discriminant = 4)]
    MembersRemoved {
        group: GroupId,
        by: ClientId,
        members: Vec<ClientId>,
    },
    #[tls_codec(discriminant = 5)]
    RemovedFromGroup { group: GroupId, by: ClientId },
    #[tls_codec(discriminant = 6)]
    CredentialRejected {
        group: GroupId,
        client: Option<ClientId>,
        reason: Vec<u8>,
    },
    #[tls_codec(discriminant = 7)]
    GroupError { group: GroupId, reason: Vec<u8> },
    #[tls_codec(discriminant = 8)]
    Outgoing {
        group: GroupId,
        id: u64,
        state: StoredOutgoingState,
    },
    #[tls_codec(discriminant = 9)]
    Rejoined { group: GroupId },
    #[tls_codec(discriminant = 10)]
    MemberRejoined { group: GroupId, member: ClientId },
    #[tls_codec(discriminant = 11)]
    CommitSettled {
        group: GroupId,
        added: Vec<ClientId>,
        removed: Vec<ClientId>,
    },
    #[tls_codec(discriminant = 12)]
    MembersLeft {
        group: GroupId,
        by: ClientId,
        members: Vec<ClientId>,
    },
    #[tls_codec(discriminant = 13)]
    LeftGroup { group: GroupId, by: ClientId },
    /// A message with the sender's id (events stored before ids were kept are `Message`).
    #[tls_codec(discriminant = 14)]
    MessageWithId {
        group: GroupId,
        sender: ClientId,
        id: Option<u64>,
        bytes: Vec<u8>,
    },
}

/// The on-disk form of an [`OutgoingState`] (also used in the outgoing queue's records).
#[derive(Debug, Clone, TlsSize, TlsSerialize, TlsDeserializeBytes)]
#[repr(u16)]
pub(crate) enum StoredOutgoingState {
    #[tls_codec(discriminant = 1)]
    Queued,
    #[tls_codec(discriminant = 2)]
    Sent,
    #[tls_codec(discriminant = 3)]
    Failed(StoredFailure),
}

/// The on-disk form of a [`SendFailure`].
#[derive(Debug, Clone, TlsSize, TlsSerialize, TlsDeserializeBytes)]
#[repr(u16)]
pub(crate) enum StoredFailure {
    #[tls_codec(discriminant = 1)]
    RemovedFromGroup,
    #[tls_codec(discriminant = 2)]
    NoSuchGroup,
    #[tls_codec(discriminant = 3)]
    Refused { code: ErrorCode, reason: Vec<u8> },
    #[tls_codec(discriminant = 4)]
    TooManyAttempts,
}

impl From<&SendFailure> for StoredFailure {
    fn from(failure: &SendFailure) -> Self {
        match failure {
            SendFailure::RemovedFromGroup => StoredFailure::RemovedFromGroup,
            SendFailure::NoSuchGroup => StoredFailure::NoSuchGroup,
            SendFailure::Refused { code, reason } => StoredFailure::Refused {
                code: *code,
                reason: reason.clone().into_bytes(),
            },
            SendFailure::TooManyAttempts => StoredFailure::TooManyAttempts,
        }
    }
}

impl From<StoredFailure> for SendFailure {
    fn from(failure: StoredFailure) -> Self {
        match failure {
            StoredFailure::RemovedFromGroup => SendFailure::RemovedFromGroup,
            StoredFailure::NoSuchGroup => SendFailure::NoSuchGroup,
            StoredFailure::Refused { code, reason } => SendFailure::Refused {
                code,
                reason: String::from_utf8_lossy(&reason).into_owned(),
            },
            StoredFailure::TooManyAttempts => SendFailure::TooManyAttempts,
        }
    }
}

impl From<&OutgoingState> for StoredOutgoingState {
    fn from(state: &OutgoingState) -> Self {
        match state {
            OutgoingState::Queued => StoredOutgoingState::Queued,
            OutgoingState::Sent => StoredOutgoingState::Sent,
            OutgoingState::Failed(failure) => StoredOutgoingState::Failed(failure.into()),
        }
    }
}

impl From<StoredOutgoingState> for OutgoingState {
    fn from(state: StoredOutgoingState) -> Self {
        match state {
            StoredOutgoingState::Queued => OutgoingState::Queued,
            StoredOutgoingState::Sent => OutgoingState::Sent,
            StoredOutgoingState::Failed(failure) => OutgoingState::Failed(failure.into()),
        }
    }
}

impl From<&Event> for StoredEvent {
    fn from(event: &Event) -> Self {
        match event.clone() {
            Event::Message {
                group,
                sender,
                id,
                bytes,
            } => StoredEvent::MessageWithId {
                group,
                sender,
                id: id.map(MessageId::as_u64),
                bytes,
            },
            Event::Joined { group, inviter } => StoredEvent::Joined { group, inviter },
            Event::MembersAdded { group, by, members } => {
                StoredEvent::MembersAdded { group, by, members }
            }
            Event::MembersRemoved { group, by, members } => {
                StoredEvent::MembersRemoved { group, by, members }
            }
            Event::RemovedFromGroup { group, by } => StoredEvent::RemovedFromGroup { group, by },
            Event::CredentialRejected {
                group,
                client,
                reason,
            } => StoredEvent::CredentialRejected {
                group,
                client,
                reason: reason.into_bytes(),
            },
            Event::GroupError { group, reason } => StoredEvent::GroupError {
                group,
                reason: reason.into_bytes(),
            },
            Event::Outgoing { group, id, state } => StoredEvent::Outgoing {
                group,
                id: id.as_u64(),
                state: (&state).into(),
            },
            Event::Rejoined { group } => StoredEvent::Rejoined { group },
            Event::MemberRejoined { group, member } => {
                StoredEvent::MemberRejoined { group, member }
            }
            Event::CommitSettled {
                group,
                added,
                removed,
            } => StoredEvent::CommitSettled {
                group,
                added,
                removed,
            },
            Event::MembersLeft { group, by, members } => {
                StoredEvent::MembersLeft { group, by, members }
            }
            Event::LeftGroup { group, by } => StoredEvent::LeftGroup { group, by },
        }
    }
}

impl From<StoredEvent> for Event {
    fn from(event: StoredEvent) -> Self {
        let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
        match event {
            StoredEvent::Message {
                group,
                sender,
                bytes,
            } => Event::Message {
                group,
                sender,
                id: None,
                bytes,
            },
            StoredEvent::MessageWithId {
                group,
                sender,
                id,
                bytes,
            } => Event::Message {
                group,
                sender,
                id: id.map(MessageId::from_u64),
                bytes,
            },
            StoredEvent::Joined { group, inviter } => Event::Joined { group, inviter },
            StoredEvent::MembersAdded { group, by, members } => {
                Event::MembersAdded { group, by, members }
            }
            StoredEvent::MembersRemoved { group, by, members } => {
                Event::MembersRemoved { group, by, members }
            }
            StoredEvent::RemovedFromGroup { group, by } => Event::RemovedFromGroup { group, by },
            StoredEvent::CredentialRejected {
                group,
                client,
                reason,
            } => Event::CredentialRejected {
                group,
                client,
                reason: text(reason),
            },
            StoredEvent::GroupError { group, reason } => Event::GroupError {
                group,
                reason: text(reason),
            },
            StoredEvent::Outgoing { group, id, state } => Event::Outgoing {
                group,
                id: MessageId::from_u64(id),
                state: state.into(),
            },
            StoredEvent::Rejoined { group } => Event::Rejoined { group },
            StoredEvent::MemberRejoined { group, member } => {
                Event::MemberRejoined { group, member }
            }
            StoredEvent::CommitSettled {
                group,
                added,
                removed,
            } => Event::CommitSettled {
                group,
                added,
                removed,
            },
            StoredEvent::MembersLeft { group, by, members } => {
                Event::MembersLeft { group, by, members }
            }
            StoredEvent::LeftGroup { group, by } => Event::LeftGroup { group, by },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tls_codec::{DeserializeBytes, Serialize};

    fn group_and_member() -> (GroupId, ClientId) {
        let group = "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
            .parse()
            .unwrap();
        (group, "alice@example.org/phone".parse().unwrap())
    }

    #[test]
    fn events_survive_their_stored_form() {
        let (group, alice) = group_and_member();
        let events = [
            Event::Message {
                group: group.clone(),
                sender: alice.clone(),
                id: Some(MessageId::from_u64(0x0123_4567_89ab_cdef)),
                bytes: b"hi".to_vec(),
            },
            Event::Message {
                group: group.clone(),
                sender: alice.clone(),
                id: None,
                bytes: Vec::new(),
            },
            Event::MembersAdded {
                group: group.clone(),
                by: alice.clone(),
                members: vec![alice.clone()],
            },
            Event::CredentialRejected {
                group: group.clone(),
                client: None,
                reason: "key mismatch".into(),
            },
            Event::Outgoing {
                group: group.clone(),
                id: MessageId::from_u64(7),
                state: OutgoingState::Sent,
            },
            Event::Outgoing {
                group: group.clone(),
                id: MessageId::from_u64(u64::MAX),
                state: OutgoingState::Failed(SendFailure::Refused {
                    code: ErrorCode::NOT_MEMBER,
                    reason: "not a member".into(),
                }),
            },
            Event::Rejoined {
                group: group.clone(),
            },
            Event::MemberRejoined {
                group: group.clone(),
                member: alice.clone(),
            },
            Event::CommitSettled {
                group: group.clone(),
                added: vec![alice.clone()],
                removed: Vec::new(),
            },
            Event::MembersLeft {
                group: group.clone(),
                by: alice.clone(),
                members: vec![alice.clone()],
            },
            Event::LeftGroup {
                group: group.clone(),
                by: alice.clone(),
            },
        ];
        for event in events {
            let bytes = StoredEvent::from(&event).tls_serialize_detached().unwrap();
            let back = StoredEvent::tls_deserialize_exact_bytes(&bytes).unwrap();
            assert_eq!(Event::from(back), event);
        }
    }

    /// A profile written before messages carried their id holds `Message` events (stored
    /// form 1): they still read, without an id.
    #[test]
    fn a_message_event_stored_without_its_id_still_reads() {
        let (group, alice) = group_and_member();
        let old = StoredEvent::Message {
            group: group.clone(),
            sender: alice.clone(),
            bytes: b"hi".to_vec(),
        };
        let bytes = old.tls_serialize_detached().unwrap();
        assert_eq!(bytes[..2], [0, 1]);
        let back = StoredEvent::tls_deserialize_exact_bytes(&bytes).unwrap();
        assert_eq!(
            Event::from(back),
            Event::Message {
                group,
                sender: alice,
                id: None,
                bytes: b"hi".to_vec(),
            }
        );
    }
}
