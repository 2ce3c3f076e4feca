//! redb implementation of the federation outbox: entries keyed by (destination domain, seq).

use redb::{ReadableTable, WriteTransaction};
use roost_protocol::messages::federation::Delivery;
use roost_protocol::messages::queue::QueuePayload;
use roost_protocol::{ClientId, Domain, MessageId};
use tls_codec::{DeserializeBytes, Serialize as _, TlsDeserializeBytes, TlsSize};

use super::delivery_tables::DeliveryTables;
use super::tables::OUTBOX;
use super::{Store, StoreError};
use crate::error::ServiceError;
use crate::federation::outbox::{MAX_RECIPIENTS_PER_DELIVERY, OutboxStore};

/// Adds one message for `recipients` (all of `domain`) through `t`: one entry per
/// [`MAX_RECIPIENTS_PER_DELIVERY`] recipients, each holding the payload once.
pub(crate) fn add_in(
    t: &mut DeliveryTables<'_>,
    domain: &Domain,
    recipients: &[ClientId],
    id: MessageId,
    timestamp_ms: u64,
    payload: &QueuePayload,
) -> Result<(), StoreError> {
    for chunk in recipients.chunks(MAX_RECIPIENTS_PER_DELIVERY) {
        let delivery = Delivery {
            recipients: chunk.to_vec(),
            id,
            timestamp_ms,
            payload: payload.clone(),
        };
        let bytes = delivery
            .tls_serialize_detached()
            .map_err(|_| StoreError::Corrupt("delivery encoding"))?;
        let seq = t.next_counter("next_outbox_seq")?;
        t.outbox
            .open(t.txn)?
            .insert((domain.as_str(), seq), bytes.as_slice())?;
    }
    Ok(())
}

/// An outbox entry of schema version 2: one recipient per entry.
#[derive(TlsDeserializeBytes, TlsSize)]
#[cfg_attr(test, derive(tls_codec::TlsSerialize))]
struct DeliveryV2 {
    recipient: ClientId,
    id: MessageId,
    timestamp_ms: u64,
    payload: QueuePayload,
}

/// Rewrites the outbox entries of a schema version 2 database as single-recipient deliveries
/// (same keys, so their order and seqs stay).
pub(super) fn upgrade_from_v2(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut outbox = txn.open_table(OUTBOX)?;
    let mut rewritten = Vec::new();
    for entry in outbox.iter()? {
        let (key, value) = entry?;
        let (domain, seq) = key.value();
        let old = match DeliveryV2::tls_deserialize_bytes(value.value()) {
            Ok((old, [])) => old,
            _ => return Err(StoreError::Corrupt("outbox (schema version 2)")),
        };
        let delivery = Delivery {
            recipients: vec![old.recipient],
            id: old.id,
            timestamp_ms: old.timestamp_ms,
            payload: old.payload,
        };
        let bytes = delivery
            .tls_serialize_detached()
            .map_err(|_| StoreError::Corrupt("delivery encoding"))?;
        rewritten.push((domain.to_owned(), seq, bytes));
    }
    for (domain, seq, bytes) in rewritten {
        outbox.insert((domain.as_str(), seq), bytes.as_slice())?;
    }
    Ok(())
}

impl OutboxStore for Store {
    async fn pending_domains(&self) -> Result<Vec<Domain>, ServiceError> {
        self.read(|txn| {
            let outbox = txn.open_table(OUTBOX)?;
            // One seek per destination, not a walk over every entry: keys are (domain, seq),
            // so the first key at or after (domain, u64::MAX) belongs to the next domain.
            let mut domains: Vec<Domain> = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let mut range = match &after {
                    None => outbox.iter()?,
                    Some(name) => outbox.range((name.as_str(), u64::MAX)..)?,
                };
                let Some(entry) = range.next() else {
                    break;
                };
                let (key, _) = entry?;
                let (name, seq) = key.value();
                if after.as_deref() == Some(name) && seq == u64::MAX {
                    // An entry at the very end of the previous domain: step past it.
                    match range.next() {
                        Some(entry) => {
                            let (key, _) = entry?;
                            let name = key.value().0.to_owned();
                            if let Ok(domain) = name.parse::<Domain>() {
                                domains.push(domain);
                            }
                            after = Some(name);
                        }
                        None => break,
                    }
                    continue;
                }
                let name = name.to_owned();
                if let Ok(domain) = name.parse::<Domain>() {
                    domains.push(domain);
                }
                after = Some(name);
            }
            Ok::<_, StoreError>(domains)
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn outbox_batch(
        &self,
        domain: &Domain,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Delivery)>, ServiceError> {
        let name = domain.as_str().to_owned();
        self.read(move |txn| {
            let outbox = txn.open_table(OUTBOX)?;
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            for entry in outbox.range((name.as_str(), 0)..=(name.as_str(), u64::MAX))? {
                let (key, value) = entry?;
                let len = value.value().len();
                if !batch.is_empty() && bytes.saturating_add(len) > max_bytes {
                    break;
                }
                bytes = bytes.saturating_add(len);
                match Delivery::tls_deserialize_bytes(value.value()) {
                    Ok((delivery, [])) => batch.push((key.value().1, delivery)),
                    _ => return Err(StoreError::Corrupt("outbox")),
                }
                if batch.len() >= max {
                    break;
                }
            }
            Ok::<_, StoreError>(batch)
        })
        .await
        .map_err(ServiceError::from)
    }

    async fn outbox_remove(&self, domain: &Domain, seqs: Vec<u64>) -> Result<(), ServiceError> {
        let name = domain.as_str().to_owned();
        self.write(move |txn| {
            let mut outbox = txn.open_table(OUTBOX)?;
            for seq in seqs {
                outbox.remove((name.as_str(), seq))?;
            }
            Ok(Ok(()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableDatabase as _};
    use roost_protocol::messages::queue::GroupMessage;

    use super::*;
    use crate::storage::redb::tables::{META, SCHEMA_VERSION};

    fn schema_version(path: &std::path::Path) -> Option<u64> {
        let db = Database::open(path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        meta.get("schema_version").unwrap().map(|v| v.value())
    }

    /// A database as schema version `version` left it, with one outbox entry in the version 2
    /// layout.
    fn old_database(path: &std::path::Path, version: u64) -> DeliveryV2 {
        let old = DeliveryV2 {
            recipient: "bob@beta.test/phone".parse().unwrap(),
            id: MessageId([5; 16]),
            timestamp_ms: 1_700_000_000_000,
            payload: QueuePayload::GroupMessage(GroupMessage {
                group: "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@alpha.test"
                    .parse()
                    .unwrap(),
                message: vec![1, 2, 3].into(),
            }),
        };
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", version)
                .unwrap();
            let bytes = old.tls_serialize_detached().unwrap();
            txn.open_table(OUTBOX)
                .unwrap()
                .insert(("beta.test", 7), bytes.as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
        old
    }

    #[tokio::test]
    async fn a_version_2_outbox_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let old = old_database(&path, 2);
        let (store, writer) = Store::open(&path, "example.org", 8).unwrap();
        let beta: Domain = "beta.test".parse().unwrap();
        let batch = store.outbox_batch(&beta, 10, usize::MAX).await.unwrap();
        let expected = Delivery {
            recipients: vec![old.recipient],
            id: old.id,
            timestamp_ms: old.timestamp_ms,
            payload: old.payload,
        };
        assert_eq!(batch, vec![(7, expected)]);
        drop(store);
        writer.join();
        assert_eq!(schema_version(&path), Some(SCHEMA_VERSION));
        // Opening again is an ordinary open.
        let (store, writer) = Store::open(&path, "example.org", 8).unwrap();
        assert_eq!(
            store
                .outbox_batch(&beta, 10, usize::MAX)
                .await
                .unwrap()
                .len(),
            1
        );
        drop(store);
        writer.join();
    }

    #[test]
    fn older_schemas_are_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        old_database(&path, 1);
        assert!(matches!(
            Store::open(&path, "example.org", 8),
            Err(StoreError::Schema {
                found: 1,
                expected: SCHEMA_VERSION
            })
        ));
        assert_eq!(schema_version(&path), Some(1));
    }
}
