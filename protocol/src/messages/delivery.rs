//! Delivery Service messages. MLS objects travel as the TLS encoding of an RFC 9420
//! `MLSMessage` (GroupInfo, Welcome, PublicMessage, PrivateMessage) or of a ratchet tree
//! (`optional<Node> ratchet_tree<V>`).

use tls_codec::{TlsDeserializeBytes, TlsSerialize, TlsSize};

use crate::ids::GroupId;
use crate::opaque::Opaque;

/// Create a group hosted on the client's homeserver.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct CreateGroupRequest {
    /// The group id; its domain must be the server's and its encoding the MLS group id.
    pub group: GroupId,
    /// `MLSMessage` with the epoch-0 GroupInfo, signed by the creator.
    pub group_info: Opaque,
    /// The ratchet tree.
    pub ratchet_tree: Opaque,
}

/// Result of [`CreateGroupRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct CreateGroupResponse {
    /// The group's epoch (0).
    pub epoch: u64,
}

/// A commit bundle: accepted as a whole or not at all.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct CommitRequest {
    /// The group.
    pub group: GroupId,
    /// `MLSMessage` with a PublicMessage Commit from a member.
    pub commit: Opaque,
    /// `MLSMessage` with the Welcome; required when the commit adds members.
    pub welcome: Option<Opaque>,
    /// `MLSMessage` with the GroupInfo of the new epoch.
    pub group_info: Opaque,
}

/// Result of [`CommitRequest`] and [`ExternalJoinRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct CommitResponse {
    /// The group's new epoch.
    pub epoch: u64,
}

/// Send an application message to the other members.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct SendMessageRequest {
    /// The group.
    pub group: GroupId,
    /// `MLSMessage` with a PrivateMessage of content type application.
    pub message: Opaque,
}

/// [`SendMessageRequest`] with the sender's send counter for the group (PROTOCOL.md §7.4,
/// "Send counters"): the hub refuses a counter not above the highest it accepted from this
/// sender in this group (SEND_COUNTER_USED), so a message encrypted from an old copy of the
/// sender's state never reaches receivers that would drop it as a reused generation.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct SendCountedRequest {
    /// The group.
    pub group: GroupId,
    /// Strictly increasing per (sender, group) across everything the sender sends; 0 is never
    /// used.
    pub counter: u64,
    /// `MLSMessage` with a PrivateMessage of content type application.
    pub message: Opaque,
}

/// Result of [`SendMessageRequest`] and [`SendCountedRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct SendMessageResponse {
    /// Number of recipient clients the message was queued for.
    pub recipients: u32,
}

/// Leave a group: a Remove proposal of the sender's own leaf, as a PublicMessage.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct LeaveGroupRequest {
    /// The group.
    pub group: GroupId,
    /// `MLSMessage` with a PublicMessage Remove proposal for the sender's own leaf.
    pub proposal: Opaque,
}

/// Result of [`LeaveGroupRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct LeaveGroupResponse {}

/// Fetch the current GroupInfo and ratchet tree (members, and clients whose id is in the
/// tree, e.g. to rejoin after losing state).
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct FetchGroupInfoRequest {
    /// The group.
    pub group: GroupId,
}

/// Result of [`FetchGroupInfoRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct FetchGroupInfoResponse {
    /// Current epoch.
    pub epoch: u64,
    /// `MLSMessage` with the GroupInfo of the current epoch.
    pub group_info: Opaque,
    /// The ratchet tree of the current epoch.
    pub ratchet_tree: Opaque,
}

/// Join or rejoin by external commit.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct ExternalJoinRequest {
    /// The group.
    pub group: GroupId,
    /// `MLSMessage` with a PublicMessage Commit whose sender is `new_member_commit`.
    pub commit: Opaque,
    /// `MLSMessage` with the GroupInfo of the new epoch.
    pub group_info: Opaque,
}
