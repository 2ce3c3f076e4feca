//! Every redb table of the homeserver, in one place, with the schema version.
//!
//! Keys are chosen so that hot writes append: queue entries are keyed by (client number,
//! sequence number), KeyPackages by (client number, upload sequence), and a fanned-out payload
//! is stored once under a sequential id and referenced from each recipient's queue.

use redb::TableDefinition;

/// Bumped whenever a table's layout changes; checked when the database opens. Version 2
/// databases are upgraded in place (their outbox entries named one recipient each), and so are
/// version 3 ones (their expiry indexes, [`QUEUE_EXPIRY`] and [`KEY_PACKAGE_EXPIRY`], are
/// built once from what they hold), and so are version 4 ones ([`KEY_PACKAGE_COUNTS`] gains the
/// claim cursor; no [`GROUP_DELTAS`]: every group is its base alone); older ones are refused.
pub(crate) const SCHEMA_VERSION: u64 = 5;

/// Counters and settings: "schema_version", "next_client_num", "next_payload_id".
pub(crate) const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

/// What the database belongs to: "domain", recorded at its first start (or the first start
/// of a database made before it was kept); a start under another domain is refused.
pub(crate) const SETTINGS: TableDefinition<'_, &str, &str> = TableDefinition::new("settings");

/// Local users by name: TLS-encoded `UserRecord`.
pub(crate) const USERS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("users");

/// Local clients by `name/device`: TLS-encoded `ClientRecord`. Revoked clients stay as
/// tombstones so their device name is never reused.
pub(crate) const CLIENTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("clients");

/// Queue heads by client number: (highest seq assigned, entries held).
pub(crate) const QUEUE_HEADS: TableDefinition<'_, u64, (u64, u64)> =
    TableDefinition::new("queue_heads");

/// Queue entries by (client number, seq): (payload id, timestamp ms, message id).
pub(crate) const QUEUE_ENTRIES: TableDefinition<'_, (u64, u64), (u64, u64, [u8; 16])> =
    TableDefinition::new("queue_entries");

/// Enqueue idempotency by (client number, message id): (seq, timestamp ms).
pub(crate) const QUEUE_DEDUP: TableDefinition<'_, (u64, [u8; 16]), (u64, u64)> =
    TableDefinition::new("queue_dedup");

/// Payloads by id: TLS-encoded `QueuePayload`.
pub(crate) const PAYLOADS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("payloads");

/// Number of queue entries referencing a payload, when more than one: a payload without a row
/// has one (a 1:1 message writes no row, so its acknowledgement deletes none).
pub(crate) const PAYLOAD_REFS: TableDefinition<'_, u64, u64> = TableDefinition::new("payload_refs");

/// What the expiry sweep reads instead of every queue: one row per enqueued payload, by
/// (timestamp ms, payload id): (message id, whether dedup records were written, the (client
/// number, seq) pairs it was queued as, 16 bytes each, big-endian). Written with the entries;
/// deleted with the payload once every entry is gone, unless it names dedup records (kept
/// until they expire). The sweep takes the rows older than the age limit from the front, so
/// its work is what expires, never what is stored.
pub(crate) const QUEUE_EXPIRY: TableDefinition<'_, (u64, u64), ExpiryRow<'_>> =
    TableDefinition::new("queue_expiry");

/// A row of [`QUEUE_EXPIRY`].
pub(crate) type ExpiryRow<'a> = ([u8; 16], bool, &'a [u8]);

/// Ordinary KeyPackages by (client number, upload seq): (not_after, KeyPackage bytes). Rows
/// below their client's cursor ([`KEY_PACKAGE_COUNTS`]) were handed out (or expired) and wait
/// to be deleted.
pub(crate) const KEY_PACKAGES: TableDefinition<'_, (u64, u64), (u64, &[u8])> =
    TableDefinition::new("key_packages");

/// Per-client KeyPackage counters: (next upload seq, ordinary KeyPackages held and not yet
/// handed out, cursor). The cursor is the lowest upload seq that may still be handed out: a
/// claim moves it past the KeyPackage it takes, and the rows below it are deleted later, a
/// few at a time (`storage::redb::keypackage`, `prune`), so a claim writes one row instead of
/// deleting two. Readers of `KEY_PACKAGES` start at the cursor.
pub(crate) const KEY_PACKAGE_COUNTS: TableDefinition<'_, u64, (u64, u64, u64)> =
    TableDefinition::new("key_package_counts");

/// Every KeyPackage by expiry: (not_after, client number, upload seq; 0 for the last-resort
/// one). Written and deleted with the KeyPackage's row, so the sweep reads only what expired.
pub(crate) const KEY_PACKAGE_EXPIRY: TableDefinition<'_, (u64, u64, u64), ()> =
    TableDefinition::new("key_package_expiry");

/// Last-resort KeyPackage by client number: (not_after, KeyPackage bytes).
pub(crate) const LAST_RESORT: TableDefinition<'_, u64, (u64, &[u8])> =
    TableDefinition::new("last_resort");

/// Groups hosted here by MLS group id (TLS-encoded GroupId): TLS-encoded `GroupRecord`
/// (epoch, `DsGroup` snapshot).
pub(crate) const GROUPS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("groups");

/// Version of each hosted group's stored state (see `delivery`), by MLS group id; bumped
/// with every write of the state. Absent for groups stored before versions were kept: 0.
pub(crate) const GROUP_VERSIONS: TableDefinition<'_, &[u8], u64> =
    TableDefinition::new("group_versions");

/// Deltas on a hosted group's base in [`GROUPS`] (see `storage::group_delta`), by (MLS group
/// id, version of the state they lead to): (epoch of that state, delta on the state of the
/// version before). Deleted when the group's base is written again.
pub(crate) const GROUP_DELTAS: TableDefinition<'_, DeltaKey<'_>, (u64, &[u8])> =
    TableDefinition::new("group_deltas");

/// A key of [`GROUP_DELTAS`]: (MLS group id, version).
pub(crate) type DeltaKey<'a> = (&'a [u8], u64);

/// Federation outbox by (destination domain, outbox seq): TLS-encoded `Delivery` (one message
/// for up to 1,024 recipients of that domain). Written in the transaction that accepts the
/// message; deleted when the peer acknowledged it.
pub(crate) const OUTBOX: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("outbox");

/// Receipts of accepted DS requests (see `delivery::receipt`) by digest: (accepted ms,
/// answer).
pub(crate) const RECEIPTS: TableDefinition<'_, [u8; 32], (u64, u64)> =
    TableDefinition::new("receipts");

/// The same receipts by (accepted ms, digest), for pruning the oldest first.
pub(crate) const RECEIPT_TIMES: TableDefinition<'_, (u64, [u8; 32]), ()> =
    TableDefinition::new("receipt_times");

/// Send counters (see `delivery::receipt`) by (group, sender) key: (highest accepted counter,
/// digest of the message that carried it, its answer). Never pruned.
pub(crate) const SEND_COUNTERS: TableDefinition<'_, [u8; 32], (u64, [u8; 32], u64)> =
    TableDefinition::new("send_counters");

/// Fan-outs accepted but not yet queued, by sequential id: TLS-encoded pending fan-outs of
/// one operation (`storage::fan_out::Pending`). Written in the operation's transaction,
/// turned into queue entries and deleted at the start of the writer's next batch (and when
/// the database opens, before any job), so they are queued before anything later.
pub(crate) const FANOUT_PENDING: TableDefinition<'_, u64, &[u8]> =
    TableDefinition::new("fanout_pending");

/// Registration tokens already used, by SHA-256 (hex): times used.
pub(crate) const TOKEN_USES: TableDefinition<'_, &str, u64> = TableDefinition::new("token_uses");

/// Push registrations by client number: (last wake-up sent, ms; the registration sealed
/// with the push key).
pub(crate) const PUSH_REGISTRATIONS: TableDefinition<'_, u64, (u64, &[u8])> =
    TableDefinition::new("push_registrations");

/// The push outbox: pending wake-ups by client number: (due ms, failed attempts, messages
/// arrived while it was claimed).
pub(crate) const PUSH_JOBS: TableDefinition<'_, u64, (u64, u32, bool)> =
    TableDefinition::new("push_jobs");

/// The same wake-ups by (due ms, client number), for taking the due ones in order.
pub(crate) const PUSH_DUE: TableDefinition<'_, (u64, u64), ()> = TableDefinition::new("push_due");

/// When a wake-up was last scheduled for a client, by client number (ms; its due time): queue
/// entries enqueued up to then are covered by it. Queue entries after it with no wake-up
/// pending are wake-ups a stopped node lost (see `push`, the recovery sweep).
pub(crate) const PUSH_NOTED: TableDefinition<'_, u64, u64> = TableDefinition::new("push_noted");
