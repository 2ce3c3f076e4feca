//! KeyPackage service: upload (validated), claim per client or per user (each ordinary
//! KeyPackage handed out at most once: a claim takes it inside a write transaction), a
//! last-resort KeyPackage per client that is served when none is left and never consumed,
//! counts, and expiry.

use roost_protocol::messages::keypackage::*;
use roost_protocol::{ClientId, Opaque, UserId};
use tls_codec::Serialize as _;

use crate::State;
use crate::auth::{AuthStore, Authenticated};
use crate::delivery::receipt;
use crate::error::ServiceError;
use crate::mls::{KeyPackagePolicy, validate_key_package};

/// What the KeyPackage service needs from storage (implemented for redb in
/// `storage::keypackage`).
pub(crate) trait KeyPackageStore {
    /// Adds validated KeyPackages (not_after, bytes) of a client, refusing (LIMIT_EXCEEDED) if
    /// it would then hold more than `max_held`; a last-resort one replaces the previous one.
    /// Returns how many ordinary ones it holds. With a receipt (see `delivery::receipt`): if
    /// one for `receipt.key` accepted at or after `receipt.fresh_after_ms` is stored, writes
    /// nothing and returns its answer; otherwise stores the receipt (answer: the count
    /// returned) in the same transaction.
    async fn add(
        &self,
        client_num: u64,
        ordinary: Vec<(u64, Vec<u8>)>,
        last_resort: Option<(u64, Vec<u8>)>,
        max_held: u64,
        receipt: Option<receipt::Receipt>,
    ) -> Result<u64, ServiceError>;
    /// Hands out one KeyPackage of an active client: the oldest unexpired ordinary one
    /// (deleted), else the unexpired last-resort one (kept); NO_KEY_PACKAGE or
    /// CLIENT_NOT_FOUND otherwise. Atomic: never the same ordinary one twice.
    async fn claim_one(
        &self,
        target: &ClientId,
        now: u64,
    ) -> Result<ClaimedKeyPackage, ServiceError>;
    /// One KeyPackage for each active client of a user that has one, atomically.
    async fn claim_for_user(
        &self,
        user: &UserId,
        now: u64,
    ) -> Result<Vec<ClaimedKeyPackage>, ServiceError>;
    /// (ordinary unexpired KeyPackages held, whether an unexpired last-resort one is held).
    async fn count(&self, client_num: u64, now: u64) -> Result<(u32, bool), ServiceError>;
    /// Deletes expired KeyPackages; returns how many.
    async fn purge_expired(&self, now: u64) -> Result<u64, ServiceError>;
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
    let record = state
        .store
        .active_client(&me.client)
        .await?
        .ok_or(ServiceError::ClientNotFound)?;
    let identity = me
        .client
        .tls_serialize_detached()
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    let (skew, max_lifetime) = (
        limits.key_package_clock_skew_secs,
        limits.key_package_max_lifetime_secs,
    );
    let now = state.clock.unix_secs();
    // Signature checks cost ~0.1 ms each: run them off the executor.
    let validated = tokio::task::spawn_blocking(move || {
        let policy = KeyPackagePolicy {
            identity: &identity,
            signature_key: record.credential.signature_key.as_slice(),
            now,
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
    let receipt = receipt::Submission::for_upload(state, &me.client, &ordinary, &last_resort)
        .receipt(receipt::Answer::Value(0));
    let remaining = state
        .store
        .add(
            me.client_num,
            ordinary,
            last_resort,
            max_held,
            Some(receipt),
        )
        .await?;
    Ok(UploadKeyPackagesResponse {
        remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
    })
}

/// ClaimClientKeyPackage for a local client, on behalf of `claimer`. Rate limited per
/// (claiming user, target client): a user's devices share one budget, so adding devices buys
/// no extra claims.
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
        .check((claimer.user.clone(), req.client.clone()))
        .map_err(ServiceError::RateLimited)?;
    let key_package = state
        .store
        .claim_one(&req.client, state.clock.unix_secs())
        .await?;
    Ok(ClaimClientKeyPackageResponse { key_package })
}

/// ClaimUserKeyPackages for a local user: one KeyPackage per active client, in one
/// transaction. Rate limited per (claiming user, target client), all or nothing.
pub(crate) async fn claim_user(
    state: &State,
    claimer: &ClientId,
    req: ClaimUserKeyPackagesRequest,
) -> Result<ClaimUserKeyPackagesResponse, ServiceError> {
    if req.user.domain != state.settings.domain {
        return Err(ServiceError::UnknownDomain(req.user.domain.to_string()));
    }
    let targets = state.store.active_clients_of(&req.user).await?;
    if targets.is_empty() {
        return Err(ServiceError::UserNotFound);
    }
    let keys: Vec<_> = targets
        .iter()
        .map(|r| (claimer.user.clone(), r.credential.client.clone()))
        .collect();
    state
        .claim_limiter
        .check_all(&keys)
        .map_err(ServiceError::RateLimited)?;
    let key_packages = state
        .store
        .claim_for_user(&req.user, state.clock.unix_secs())
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
    let (remaining, has_last_resort) = state
        .store
        .count(me.client_num, state.clock.unix_secs())
        .await?;
    Ok(KeyPackageCountResponse {
        remaining,
        has_last_resort: u8::from(has_last_resort),
    })
}
