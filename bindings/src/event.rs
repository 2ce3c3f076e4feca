//! [`Event`]: what the SDK tells the app, in foreign form; [`MessageContent`]: a received
//! message's content, decoded.

use roost_client::Content;

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
    /// Members were removed (or left).
    MembersRemoved {
        /// The group.
        group: String,
        /// The committer.
        by: String,
        /// The removed members.
        members: Vec<String>,
    },
    /// This client was removed from the group, or its leave was committed. The group is gone
    /// from this client.
    RemovedFromGroup {
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
                bytes,
            } => Event::Message {
                group: group.to_string(),
                sender: sender.to_string(),
                content: match content {
                    Some(Ok(Content::Text(text))) => MessageContent::Text { text },
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
            other => Event::Other {
                group: other.group().to_string(),
                description: format!("{other:?}"),
            },
        }
    }
}
