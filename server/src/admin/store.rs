//! What administration needs from storage (implemented by every engine in `storage`): listing
//! users, deactivating one, counts for `roost admin stats`, registration-token uses, and a
//! consistent backup.

use std::path::PathBuf;

use roost_protocol::UserName;

use crate::error::ServiceError;

/// A local user as `roost admin user list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct UserSummary {
    /// The user name (without the domain).
    pub(crate) name: String,
    /// When the user registered, ms since the Unix epoch.
    pub(crate) created_ms: u64,
    /// Deactivated by an administrator: the name stays taken, no client can be added.
    pub(crate) deactivated: bool,
    /// Active (not removed) clients.
    pub(crate) clients: u64,
}

/// Counts over the whole store.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct StoreStats {
    /// Registered users, deactivated ones included.
    pub(crate) users: u64,
    /// Of which deactivated.
    pub(crate) deactivated_users: u64,
    /// Active clients.
    pub(crate) clients: u64,
    /// Groups hosted here.
    pub(crate) groups: u64,
    /// Messages waiting in local clients' queues.
    pub(crate) queued_messages: u64,
    /// Federation outbox entries waiting, per destination domain (in domain order). An entry
    /// is one message for up to 1,024 recipients of that domain.
    pub(crate) outbox: Vec<(String, u64)>,
}

/// What a backup request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BackupOutcome {
    /// The database was copied to the file; its size in bytes.
    Written(u64),
    /// This engine's database is backed up with its own tools; what to run.
    External(&'static str),
}

/// A deactivated user keeps their row with an empty user key: the name stays taken
/// (registering it again is USER_EXISTS) and no user signature can verify (AddClient and
/// RemoveClient answer BAD_SIGNATURE). No schema change was needed on either engine.
pub(crate) const DEACTIVATED_KEY: &[u8] = &[];

pub(crate) trait AdminStore {
    /// Every local user, in name order.
    async fn users(&self) -> Result<Vec<UserSummary>, ServiceError>;
    /// One local user.
    async fn user(&self, name: &UserName) -> Result<Option<UserSummary>, ServiceError>;
    /// In one transaction: marks the user deactivated and removes every active client (queue
    /// and KeyPackages deleted, device names kept used), as RemoveClient does for one; returns
    /// the removed clients' numbers (empty if already deactivated). USER_NOT_FOUND for an
    /// unknown user.
    async fn deactivate_user(&self, name: &UserName) -> Result<Vec<u64>, ServiceError>;
    /// Registration-token uses: (SHA-256 hex, times used).
    async fn token_uses(&self) -> Result<Vec<(String, u64)>, ServiceError>;
    /// Counts for `roost admin stats`.
    async fn stats(&self) -> Result<StoreStats, ServiceError>;
    /// Writes a consistent copy of the database (one read snapshot) to a new file `dest`.
    async fn backup(&self, dest: PathBuf) -> Result<BackupOutcome, ServiceError>;
}
