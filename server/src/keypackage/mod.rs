//! KeyPackage service: upload (validated), claim per client or per user (each ordinary
//! KeyPackage handed out at most once: a claim is a delete inside a write transaction), a
//! last-resort KeyPackage per client that is served when none is left and never consumed,
//! counts, and expiry.

use redb::{ReadableTable, WriteTransaction};
use roost_protocol::messages::keypackage::*;
use roost_protocol::{ClientId, Opaque};
use tls_codec::Serialize as _;

use crate::State;
use crate::auth::{Authenticated, ClientRecord, active_client, active_clients_of};
use crate::error::ServiceError;
use crate::mls::{KeyPackagePolicy, validate_key_package};
use crate::storage::StoreError;
use crate::storage::tables::{CLIENTS, KEY_PACKAGE_COUNTS, KEY_PACKAGES, LAST_RESORT};

fn now_secs() -> u64 {
    crate::unix_millis() / 1000
}

/// UploadKeyPackages.
pub(crate) async fn upload(
    state: &State,
    me: &Authenticated,
    req: UploadKeyPackagesRequest,
) -> Result<UploadKeyPackagesResponse, ServiceError> {
    let limits = &state.settings.limits;
    if req.key_packages.len() > limits.max_key_packages_per_upload as usize {
        return Err(ServiceError::LimitExceeded(format!(
            "at most {} KeyPackages per upload",
            limits.max_key_packages_per_upload
        )));
    }
    // The credential the KeyPackages must match.
    let client = me.client.clone();
    let record = state
        .store
        .read(move |txn| {
            let clients = txn.open_table(CLIENTS).map_err(StoreError::from)?;
            active_client(&clients, &client)?.ok_or(ServiceError::Unauthenticated)
        })
        .await?;
    let identity = me
        .client
        .tls_serialize_detached()
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    let (skew, max_lifetime) = (
        limits.key_package_clock_skew_secs,
        limits.key_package_max_lifetime_secs,
    );
    // Signature checks cost ~0.1 ms each: run them off the executor.
    let validated = tokio::task::spawn_blocking(move || {
        let policy = KeyPackagePolicy {
            identity: &identity,
            signature_key: record.credential.signature_key.as_slice(),
            now: now_secs(),
            clock_skew: skew,
            max_lifetime,
        };
        let check = |kp: Opaque| -> Result<(u64, Vec<u8>), ServiceError> {
            let not_after = validate_key_package(kp.as_slice(), &policy)
                .map_err(ServiceError::InvalidKeyPackage)?;
            Ok((not_after, kp.into_vec()))
        };
        let ordinary = req
            .key_packages
            .into_iter()
            .map(check)
            .collect::<Result<Vec<_>, _>>()?;
        let last_resort = req.last_resort.map(check).transpose()?;
        Ok::<_, ServiceError>((ordinary, last_resort))
    })
    .await
    .map_err(|_| ServiceError::Internal("KeyPackage validation failed".into()))??;

    let (ordinary, last_resort) = validated;
    let max_held = u64::from(limits.max_key_packages_per_client);
    let client_num = me.client_num;
    let remaining = state
        .store
        .write(move |txn| {
            let mut counts = txn.open_table(KEY_PACKAGE_COUNTS)?;
            let (mut next, mut held) = counts.get(client_num)?.map(|v| v.value()).unwrap_or((1, 0));
            if held + ordinary.len() as u64 > max_held {
                return Ok(Err(ServiceError::LimitExceeded(format!(
                    "at most {max_held} KeyPackages held"
                ))));
            }
            let mut kps = txn.open_table(KEY_PACKAGES)?;
            for (not_after, bytes) in &ordinary {
                kps.insert((client_num, next), (*not_after, bytes.as_slice()))?;
                next += 1;
                held += 1;
            }
            counts.insert(client_num, (next, held))?;
            if let Some((not_after, bytes)) = &last_resort {
                txn.open_table(LAST_RESORT)?
                    .insert(client_num, (*not_after, bytes.as_slice()))?;
            }
            Ok(Ok(held))
        })
        .await?;
    Ok(UploadKeyPackagesResponse {
        remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
    })
}

/// Takes one KeyPackage of a client inside `txn`: the oldest unexpired ordinary one (deleted),
/// else the unexpired last-resort one (kept).
fn take_one(
    txn: &WriteTransaction,
    client_num: u64,
    now: u64,
) -> Result<Option<(Vec<u8>, KeyPackageKind)>, StoreError> {
    let mut kps = txn.open_table(KEY_PACKAGES)?;
    let mut expired = Vec::new();
    let mut found = None;
    for entry in kps.range((client_num, 0)..=(client_num, u64::MAX))? {
        let (key, value) = entry?;
        let (not_after, bytes) = value.value();
        if not_after <= now {
            expired.push(key.value().1);
            continue;
        }
        found = Some((key.value().1, bytes.to_vec()));
        break;
    }
    let taken = u64::from(found.is_some()) + expired.len() as u64;
    for seq in expired {
        kps.remove((client_num, seq))?;
    }
    if let Some((seq, _)) = &found {
        kps.remove((client_num, *seq))?;
    }
    if taken > 0 {
        let mut counts = txn.open_table(KEY_PACKAGE_COUNTS)?;
        let current = counts.get(client_num)?.map(|v| v.value());
        if let Some((next, held)) = current {
            counts.insert(client_num, (next, held.saturating_sub(taken)))?;
        }
    }
    if let Some((_, bytes)) = found {
        return Ok(Some((bytes, KeyPackageKind::Ordinary)));
    }
    let last = txn.open_table(LAST_RESORT)?;
    let Some(guard) = last.get(client_num)? else {
        return Ok(None);
    };
    let (not_after, bytes) = guard.value();
    Ok((not_after > now).then(|| (bytes.to_vec(), KeyPackageKind::LastResort)))
}

fn claimed(
    record: ClientRecord,
    taken: Option<(Vec<u8>, KeyPackageKind)>,
) -> Option<ClaimedKeyPackage> {
    taken.map(|(bytes, kind)| ClaimedKeyPackage {
        credential: record.credential,
        key_package: bytes.into(),
        kind,
    })
}

/// ClaimClientKeyPackage for a local client, on behalf of `claimer`.
pub(crate) async fn claim_client(
    state: &State,
    claimer: &ClientId,
    req: ClaimClientKeyPackageRequest,
) -> Result<ClaimClientKeyPackageResponse, ServiceError> {
    if req.client.domain() != &state.settings.domain {
        return Err(ServiceError::UnknownDomain(req.client.domain().to_string()));
    }
    state
        .claim_limiter
        .check((claimer.clone(), req.client.clone()))
        .map_err(ServiceError::RateLimited)?;
    let target = req.client;
    let key_package = state
        .store
        .write(move |txn| {
            let clients = txn.open_table(CLIENTS)?;
            let Some(record) = active_client(&clients, &target)? else {
                return Ok(Err(ServiceError::ClientNotFound));
            };
            drop(clients);
            let taken = take_one(txn, record.client_num, now_secs())?;
            Ok(claimed(record, taken).ok_or(ServiceError::NoKeyPackage))
        })
        .await?;
    Ok(ClaimClientKeyPackageResponse { key_package })
}

/// ClaimUserKeyPackages for a local user: one KeyPackage per active client, in one
/// transaction. Rate limited per (claimer, target client), all or nothing.
pub(crate) async fn claim_user(
    state: &State,
    claimer: &ClientId,
    req: ClaimUserKeyPackagesRequest,
) -> Result<ClaimUserKeyPackagesResponse, ServiceError> {
    if req.user.domain != state.settings.domain {
        return Err(ServiceError::UnknownDomain(req.user.domain.to_string()));
    }
    let user = req.user.clone();
    let targets = state
        .store
        .read(move |txn| {
            let clients = txn.open_table(CLIENTS).map_err(StoreError::from)?;
            Ok::<_, ServiceError>(active_clients_of(&clients, &user)?)
        })
        .await?;
    if targets.is_empty() {
        return Err(ServiceError::UserNotFound);
    }
    let keys: Vec<_> = targets
        .iter()
        .map(|r| (claimer.clone(), r.credential.client.clone()))
        .collect();
    state
        .claim_limiter
        .check_all(&keys)
        .map_err(ServiceError::RateLimited)?;
    let user = req.user;
    let key_packages = state
        .store
        .write(move |txn| {
            // Re-read inside the transaction: a client may have been removed meanwhile.
            let clients = txn.open_table(CLIENTS)?;
            let records = active_clients_of(&clients, &user)?;
            drop(clients);
            let now = now_secs();
            let mut out = Vec::with_capacity(records.len());
            for record in records {
                let taken = take_one(txn, record.client_num, now)?;
                out.extend(claimed(record, taken));
            }
            Ok(Ok::<_, ServiceError>(out))
        })
        .await?;
    if key_packages.is_empty() {
        return Err(ServiceError::NoKeyPackage);
    }
    Ok(ClaimUserKeyPackagesResponse { key_packages })
}

/// KeyPackageCount.
pub(crate) async fn count(
    state: &State,
    me: &Authenticated,
) -> Result<KeyPackageCountResponse, ServiceError> {
    let client_num = me.client_num;
    let now = now_secs();
    state
        .store
        .read(move |txn| {
            let kps = txn.open_table(KEY_PACKAGES).map_err(StoreError::from)?;
            let mut remaining = 0u32;
            for entry in kps
                .range((client_num, 0)..=(client_num, u64::MAX))
                .map_err(StoreError::from)?
            {
                let (_, value) = entry.map_err(StoreError::from)?;
                if value.value().0 > now {
                    remaining = remaining.saturating_add(1);
                }
            }
            let last = txn.open_table(LAST_RESORT).map_err(StoreError::from)?;
            let has_last_resort = last
                .get(client_num)
                .map_err(StoreError::from)?
                .is_some_and(|v| v.value().0 > now);
            Ok::<_, ServiceError>(KeyPackageCountResponse {
                remaining,
                has_last_resort: u8::from(has_last_resort),
            })
        })
        .await
}

/// Deletes every KeyPackage of a client (client removed).
pub(crate) fn delete_all(txn: &WriteTransaction, client_num: u64) -> Result<(), StoreError> {
    let mut kps = txn.open_table(KEY_PACKAGES)?;
    kps.retain_in((client_num, 0)..=(client_num, u64::MAX), |_, _| false)?;
    txn.open_table(KEY_PACKAGE_COUNTS)?.remove(client_num)?;
    txn.open_table(LAST_RESORT)?.remove(client_num)?;
    Ok(())
}

/// Deletes expired KeyPackages of every client. Returns how many.
pub(crate) fn purge_expired(txn: &WriteTransaction, now: u64) -> Result<u64, StoreError> {
    let mut kps = txn.open_table(KEY_PACKAGES)?;
    let mut per_client: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    kps.retain(|(client_num, _), (not_after, _)| {
        let keep = not_after > now;
        if !keep {
            *per_client.entry(client_num).or_default() += 1;
        }
        keep
    })?;
    let mut counts = txn.open_table(KEY_PACKAGE_COUNTS)?;
    let mut total = 0;
    for (client_num, gone) in per_client {
        total += gone;
        let current = counts.get(client_num)?.map(|v| v.value());
        if let Some((next, held)) = current {
            counts.insert(client_num, (next, held.saturating_sub(gone)))?;
        }
    }
    txn.open_table(LAST_RESORT)?
        .retain(|_, (not_after, _)| not_after > now)?;
    Ok(total)
}
