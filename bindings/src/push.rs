//! Push notifications: [`RoostClient::register_push`], [`RoostClient::unregister_push`],
//! [`RoostClient::push_info`] and the [`PushTarget`] an app registers (docs/CLIENT.md, Push).

use crate::client::RoostClient;
use crate::error::RoostError;
use crate::run;

/// Where the homeserver sends this client's wake-ups: what the platform's push API handed the
/// app. A wake-up carries nothing but "connect and fetch": the app then opens its profile and
/// calls `sync`.
#[derive(Clone, PartialEq, Eq, uniffi::Enum)]
pub enum PushTarget {
    /// A Web Push subscription (a browser's, or a UnifiedPush distributor's endpoint with its
    /// keys), made with [`PushInfo::vapid_public_key`] as the application server key.
    /// [`web_push_target`] reads the subscription's standard JSON form.
    WebPush {
        /// The push resource URL (`https://`).
        endpoint: String,
        /// The subscription's P-256 public key, uncompressed (65 bytes).
        p256dh: Vec<u8>,
        /// The subscription's authentication secret (16 bytes).
        auth: Vec<u8>,
    },
    /// An APNs device token (raw bytes, not hex) and the app's bundle id.
    Apns {
        /// The device token.
        device_token: Vec<u8>,
        /// The app's bundle id.
        topic: String,
    },
    /// An FCM registration token.
    Fcm {
        /// The registration token.
        token: String,
    },
}

// Push tokens reach a device: keep them out of logs.
impl std::fmt::Debug for PushTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PushTarget::WebPush { .. } => "PushTarget::WebPush(..)",
            PushTarget::Apns { .. } => "PushTarget::Apns(..)",
            PushTarget::Fcm { .. } => "PushTarget::Fcm(..)",
        })
    }
}

impl From<PushTarget> for roost_client::PushTarget {
    fn from(target: PushTarget) -> Self {
        match target {
            PushTarget::WebPush {
                endpoint,
                p256dh,
                auth,
            } => roost_client::PushTarget::WebPush {
                endpoint,
                p256dh,
                auth,
            },
            PushTarget::Apns {
                device_token,
                topic,
            } => roost_client::PushTarget::Apns {
                device_token,
                topic,
            },
            PushTarget::Fcm { token } => roost_client::PushTarget::Fcm { token },
        }
    }
}

/// What the homeserver offers for push.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct PushInfo {
    /// The VAPID public key (uncompressed P-256, 65 bytes) to make Web Push subscriptions
    /// with; empty if the homeserver does not do Web Push.
    pub vapid_public_key: Vec<u8>,
    /// The homeserver sends to APNs.
    pub apns: bool,
    /// The homeserver sends to FCM.
    pub fcm: bool,
}

/// A Web Push target from a subscription's standard JSON form (`PushSubscription.toJSON()`:
/// `{"endpoint": "...", "keys": {"p256dh": "<base64url>", "auth": "<base64url>"}}`).
/// `InvalidArgument` if it is not that.
#[uniffi::export]
pub fn web_push_target(subscription_json: String) -> Result<PushTarget, RoostError> {
    let invalid = |message: String| RoostError::InvalidArgument { message };
    match roost_client::PushTarget::from_web_push_json(&subscription_json) {
        Ok(roost_client::PushTarget::WebPush {
            endpoint,
            p256dh,
            auth,
        }) => Ok(PushTarget::WebPush {
            endpoint,
            p256dh,
            auth,
        }),
        Ok(other) => Err(invalid(format!("not a Web Push subscription: {other:?}"))),
        Err(err) => Err(invalid(err.to_string())),
    }
}

#[uniffi::export]
impl RoostClient {
    /// Registers (or replaces) where this client's wake-ups go. Fails with `Server`:
    /// `PUSH_ENDPOINT_REJECTED` (620: malformed, not `https`, or an address the homeserver
    /// refuses to connect to, e.g. loopback or private ranges) or `PUSH_PROVIDER_DISABLED`
    /// (621: see [`RoostClient::push_info`]); nothing is stored then.
    pub async fn register_push(&self, target: PushTarget) -> Result<(), RoostError> {
        let client = self.client()?;
        run(async move { Ok(client.register_push(target.into()).await?) }).await
    }

    /// Deletes this client's push registration; whether there was one.
    pub async fn unregister_push(&self) -> Result<bool, RoostError> {
        let client = self.client()?;
        run(async move { Ok(client.unregister_push().await?) }).await
    }

    /// The homeserver's push providers and VAPID key.
    pub async fn push_info(&self) -> Result<PushInfo, RoostError> {
        let client = self.client()?;
        run(async move {
            let info = client.push_info().await?;
            Ok(PushInfo {
                vapid_public_key: info.vapid_public_key,
                apns: info.apns,
                fcm: info.fcm,
            })
        })
        .await
    }
}
