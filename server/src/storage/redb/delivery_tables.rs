//! The tables a delivery writes: a fan-out (group version and state, receipts, queues, outbox, pending
//! fan-outs) and an acknowledgement (the queue tables). Each is opened the first time it is
//! used and stays open while the set lives; a batch holds the set for all its delivery jobs
//! ([`super::Held::delivery`]), so a batch of N sends opens each table once instead of N times.

use redb::{Key, ReadableTable, Table, TableDefinition, Value, WriteTransaction};

use super::StoreError;
use super::tables::*;

/// One table of the set: its definition, and the table once opened.
pub(crate) struct Slot<'t, K: Key + 'static, V: Value + 'static> {
    definition: TableDefinition<'static, K, V>,
    table: Option<Table<'t, K, V>>,
}

impl<'t, K: Key + 'static, V: Value + 'static> Slot<'t, K, V> {
    fn new(definition: TableDefinition<'static, K, V>) -> Self {
        Self {
            definition,
            table: None,
        }
    }

    /// The table, opened in `txn` unless it is open already.
    pub(crate) fn open(
        &mut self,
        txn: &'t WriteTransaction,
    ) -> Result<&mut Table<'t, K, V>, StoreError> {
        if self.table.is_none() {
            self.table = Some(txn.open_table(self.definition)?);
        }
        self.table.as_mut().ok_or(StoreError::Unavailable)
    }
}

/// The delivery tables of a write transaction, each opened on first use.
pub(crate) struct DeliveryTables<'t> {
    pub(crate) txn: &'t WriteTransaction,
    pub(crate) meta: Slot<'t, &'static str, u64>,
    pub(crate) heads: Slot<'t, u64, (u64, u64)>,
    pub(crate) entries: Slot<'t, (u64, u64), (u64, u64, [u8; 16])>,
    pub(crate) dedups: Slot<'t, (u64, [u8; 16]), (u64, u64)>,
    pub(crate) payloads: Slot<'t, u64, &'static [u8]>,
    pub(crate) refs: Slot<'t, u64, u64>,
    pub(crate) expiry: Slot<'t, (u64, u64), ExpiryRow<'static>>,
    pub(crate) groups: Slot<'t, &'static [u8], &'static [u8]>,
    pub(crate) versions: Slot<'t, &'static [u8], u64>,
    pub(crate) deltas: Slot<'t, DeltaKey<'static>, (u64, &'static [u8])>,
    pub(crate) receipts: Slot<'t, [u8; 32], (u64, u64)>,
    pub(crate) receipt_times: Slot<'t, (u64, [u8; 32]), ()>,
    pub(crate) counters: Slot<'t, [u8; 32], (u64, [u8; 32], u64)>,
    pub(crate) outbox: Slot<'t, (&'static str, u64), &'static [u8]>,
    pub(crate) pending: Slot<'t, u64, &'static [u8]>,
}

impl<'t> DeliveryTables<'t> {
    /// The set for `txn`, nothing opened yet. No other handle to these tables may be open in
    /// `txn` while the set lives (redb opens a table once at a time).
    pub(crate) fn new(txn: &'t WriteTransaction) -> Self {
        Self {
            txn,
            meta: Slot::new(META),
            heads: Slot::new(QUEUE_HEADS),
            entries: Slot::new(QUEUE_ENTRIES),
            dedups: Slot::new(QUEUE_DEDUP),
            payloads: Slot::new(PAYLOADS),
            refs: Slot::new(PAYLOAD_REFS),
            expiry: Slot::new(QUEUE_EXPIRY),
            groups: Slot::new(GROUPS),
            versions: Slot::new(GROUP_VERSIONS),
            deltas: Slot::new(GROUP_DELTAS),
            receipts: Slot::new(RECEIPTS),
            receipt_times: Slot::new(RECEIPT_TIMES),
            counters: Slot::new(SEND_COUNTERS),
            outbox: Slot::new(OUTBOX),
            pending: Slot::new(FANOUT_PENDING),
        }
    }

    /// [`super::next_counter`] through the set's META table.
    pub(crate) fn next_counter(&mut self, name: &str) -> Result<u64, StoreError> {
        let meta = self.meta.open(self.txn)?;
        let value = meta.get(name)?.map(|v| v.value()).unwrap_or(1);
        meta.insert(name, value + 1)?;
        Ok(value)
    }
}
