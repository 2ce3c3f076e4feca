//! [`Event`]: what the SDK tells the app, in foreign form; [`MessageContent`]: a received
//! message's content, decoded.

use roost_client::Content;

use crate::files::Attachment;

/// Something that happened in one of the client's groups. Events are delivered at least once
/// and in order (docs/CLIENT.md, Events).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum Event {
    /// A message was received and decrypted.
    Message {
        /// The group.
        group: String,
        /// The sending client (`user@domain/device`), authenticated by MLS.
        sender: String,
        /// The sender's id of the message (what its `send_text` returned, 16 hexadecimal
        /// digits), unique per sender and group; `None` if the sender's client sets none.
        /// Events come at least once: the one being handled when the app died comes again,
        /// so an app that must not show a message twice keeps the ids it showed.
        id: Option<String>,
        /// The content, decoded.
        content: MessageContent,
    },
    /// This client joined a group (a member invited it).
    Joined {
        /// The group.
        group: String,
        /// The client that invited it.
        inviter: String,
    },
    /// Someone else added members.
    MembersAdded {
        /// The group.
        group: String,
        /// The committer.
        by: String,
        /// The new members.
        members: Vec<String>,
    },
    /// Members were removed by another member (members who left: `MembersLeft`).
    MembersRemoved {
        /// The group.
        group: String,
        /// The committer.
        by: String,
        /// The removed members.
        members: Vec<String>,
    },
    /// This client was removed from the group by another member. The group is gone from this
    /// client.
    RemovedFromGroup {
        /// The group.
        group: String,
        /// The committer.
        by: String,
    },
    /// Members left the group (each asked to); `by` committed it.
    MembersLeft {
        /// The group.
        group: String,
        /// The committer.
        by: String,
        /// The members who left.
        members: Vec<String>,
    },
    /// This client's leave was committed by `by`. The group is gone from this client.
    LeftGroup {
        /// The group.
        group: String,
        /// The committer.
        by: String,
    },
    /// A member credential did not check out against the AS; what carried it was refused.
    CredentialRejected {
        /// The group.
        group: String,
        /// The client the credential claims to be, if known.
        client: Option<String>,
        /// Why.
        reason: String,
    },
    /// A message for the group could not be processed; `rejoin_group` resynchronises.
    GroupError {
        /// The group.
        group: String,
        /// What went wrong.
        reason: String,
    },
    /// A message of this client's outgoing queue was sent (durably accepted by the hub) or can
    /// never be sent.
    Outgoing {
        /// The group.
        group: String,
        /// The id `send_text` returned.
        id: String,
        /// `Sent` or `Failed`.
        state: OutgoingState,
    },
    /// The SDK rejoined the group on its own (this client's state could not be used any
    /// more); messages sent while it was behind are not readable by it.
    Rejoined {
        /// The group.
        group: String,
    },
    /// Another member rejoined the group: it cannot read what was sent while it was behind.
    MemberRejoined {
        /// The group.
        group: String,
        /// The member.
        member: String,
    },
    /// A commit of this client that was left pending (app stopped, homeserver unreachable) was
    /// accepted by the hub and is now applied.
    CommitSettled {
        /// The group.
        group: String,
        /// Members it added.
        added: Vec<String>,
        /// Members it removed.
        removed: Vec<String>,
    },
    /// An event of a kind this version of the bindings does not know yet (a newer SDK).
    Other {
        /// The group.
        group: String,
        /// A description, for logs.
        description: String,
    },
}

/// The content of a received message (docs/PROTOCOL.md §4.5). Neither `Unsupported` nor
/// `Unreadable` is an error: show a placeholder and go on.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum MessageContent {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// A file: download it with `download`.
    Attachment {
        /// The file's description and what `download` needs.
        attachment: Attachment,
    },
    /// A content type this version does not know (e.g. from a newer app).
    Unsupported {
        /// Its content type.
        content_type: u16,
        /// Its body, undecoded.
        body: Vec<u8>,
    },
    /// Bytes that are no valid content.
    Unreadable {
        /// Why.
        reason: String,
        /// The plaintext as received.
        bytes: Vec<u8>,
    },
}

/// Where a sent message is: `Queued` when `send_text` returns, then `Sent` or `Failed`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum OutgoingState {
    /// In the profile's outgoing queue, waiting to be delivered.
    Queued,
    /// Durably accepted by the hub.
    Sent,
    /// Can never be sent; stays listed by `outbox` until dismissed.
    Failed {
        /// Why.
        failure: SendFailure,
    },
}

/// Why a queued message can never be sent.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum SendFailure {
    /// This client was removed from the group (or left it).
    RemovedFromGroup,
    /// The group does not exist (any more).
    NoSuchGroup,
    /// The hub refused the message for good, with this wire error code.
    Refused {
        /// The wire error code.
        code: u16,
        /// Its name in docs/PROTOCOL.md.
        code_name: String,
        /// The hub's reason.
        reason: String,
    },
    /// It was refused for its epoch too many times.
    TooManyAttempts,
    /// A reason this version of the bindings does not know yet.
    Other {
        /// A description, for logs.
        description: String,
    },
}

/// A message of the outgoing queue that is still queued, or failed and not yet dismissed.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct OutgoingMessage {
    /// Its id (`send_text` returned it).
    pub id: String,
    /// The group.
    pub group: String,
    /// Its state.
    pub state: OutgoingState,
    /// When it was queued (Unix milliseconds).
    pub queued_at_ms: u64,
}

impl From<roost_client::OutgoingState> for OutgoingState {
    fn from(state: roost_client::OutgoingState) -> Self {
        use roost_client::OutgoingState as S;
        match state {
            S::Queued => OutgoingState::Queued,
            S::Sent => OutgoingState::Sent,
            S::Failed(failure) => OutgoingState::Failed {
                failure: failure.into(),
            },
            other => OutgoingState::Failed {
                failure: SendFailure::Other {
                    description: format!("{other:?}"),
                },
            },
        }
    }
}

impl From<roost_client::SendFailure> for SendFailure {
    fn from(failure: roost_client::SendFailure) -> Self {
        use roost_client::SendFailure as F;
        match failure {
            F::RemovedFromGroup => SendFailure::RemovedFromGroup,
            F::NoSuchGroup => SendFailure::NoSuchGroup,
            F::Refused { code, reason } => SendFailure::Refused {
                code: code.0,
                code_name: code.name().unwrap_or("UNKNOWN").to_owned(),
                reason,
            },
            F::TooManyAttempts => SendFailure::TooManyAttempts,
            other => SendFailure::Other {
                description: other.to_string(),
            },
        }
    }
}

impl From<roost_client::OutgoingMessage> for OutgoingMessage {
    fn from(message: roost_client::OutgoingMessage) -> Self {
        let queued_at_ms = message
            .queued_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        OutgoingMessage {
            id: message.id.to_string(),
            group: message.group.to_string(),
            state: message.state.into(),
            queued_at_ms,
        }
    }
}

fn ids<T: ToString>(ids: &[T]) -> Vec<String> {
    ids.iter().map(ToString::to_string).collect()
}

impl From<roost_client::Event> for Event {
    fn from(event: roost_client::Event) -> Self {
        use roost_client::Event as E;
        let content = event.content();
        match event {
            E::Message {
                group,
                sender,
                id,
                bytes,
            } => Event::Message {
                group: group.to_string(),
                sender: sender.to_string(),
                id: id.map(|id| id.to_string()),
                content: match content {
                    Some(Ok(Content::Text(text))) => MessageContent::Text { text },
                    Some(Ok(Content::Attachment(attachment))) => MessageContent::Attachment {
                        attachment: attachment.into(),
                    },
                    Some(Ok(Content::Unknown { content_type, body })) => {
                        MessageContent::Unsupported {
                            content_type: content_type.0,
                            body,
                        }
                    }
                    Some(Ok(other)) => MessageContent::Unreadable {
                        reason: format!("content this version cannot show: {other:?}"),
                        bytes,
                    },
                    Some(Err(err)) => MessageContent::Unreadable {
                        reason: err.to_string(),
                        bytes,
                    },
                    None => MessageContent::Unreadable {
                        reason: "no content".into(),
                        bytes,
                    },
                },
            },
            E::Joined { group, inviter } => Event::Joined {
                group: group.to_string(),
                inviter: inviter.to_string(),
            },
            E::MembersAdded { group, by, members } => Event::MembersAdded {
                group: group.to_string(),
                by: by.to_string(),
                members: ids(&members),
            },
            E::MembersRemoved { group, by, members } => Event::MembersRemoved {
                group: group.to_string(),
                by: by.to_string(),
                members: ids(&members),
            },
            E::RemovedFromGroup { group, by } => Event::RemovedFromGroup {
                group: group.to_string(),
                by: by.to_string(),
            },
            E::MembersLeft { group, by, members } => Event::MembersLeft {
                group: group.to_string(),
                by: by.to_string(),
                members: ids(&members),
            },
            E::LeftGroup { group, by } => Event::LeftGroup {
                group: group.to_string(),
                by: by.to_string(),
            },
            E::CredentialRejected {
                group,
                client,
                reason,
            } => Event::CredentialRejected {
                group: group.to_string(),
                client: client.map(|client| client.to_string()),
                reason,
            },
            E::GroupError { group, reason } => Event::GroupError {
                group: group.to_string(),
                reason,
            },
            E::Outgoing { group, id, state } => Event::Outgoing {
                group: group.to_string(),
                id: id.to_string(),
                state: state.into(),
            },
            E::Rejoined { group } => Event::Rejoined {
                group: group.to_string(),
            },
            E::MemberRejoined { group, member } => Event::MemberRejoined {
                group: group.to_string(),
                member: member.to_string(),
            },
            E::CommitSettled {
                group,
                added,
                removed,
            } => Event::CommitSettled {
                group: group.to_string(),
                added: ids(&added),
                removed: ids(&removed),
            },
            other => Event::Other {
                group: other.group().to_string(),
                description: format!("{other:?}"),
            },
        }
    }
}
