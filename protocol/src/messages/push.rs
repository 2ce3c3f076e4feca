//! Push notification messages: a client registers where its homeserver sends wake-ups while it
//! has no listen stream open (docs/PROTOCOL.md, "Push notifications").
//!
//! A wake-up carries no message content and no sender: it only tells the app to connect and
//! fetch its queue.

use tls_codec::{TlsDeserializeBytes, TlsSerialize, TlsSize};

use crate::opaque::Opaque;

/// Where a client's wake-ups go: one push service subscription or device token.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
#[repr(u16)]
pub enum PushEndpoint {
    /// A Web Push subscription (RFC 8030), as a browser's `PushSubscription` or a UnifiedPush
    /// distributor hands it out.
    #[tls_codec(discriminant = 1)]
    WebPush(WebPushSubscription),
    /// An Apple Push Notification service device token.
    #[tls_codec(discriminant = 2)]
    Apns(ApnsToken),
    /// A Firebase Cloud Messaging registration token.
    #[tls_codec(discriminant = 3)]
    Fcm(FcmToken),
}

/// A Web Push subscription.
#[derive(Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct WebPushSubscription {
    /// The push resource URL (UTF-8, `https://`).
    pub endpoint: Opaque,
    /// The user agent's P-256 public key, uncompressed (65 bytes, `p256dh`).
    pub p256dh: Opaque,
    /// The authentication secret (16 bytes, `auth`).
    pub auth: Opaque,
}

/// An APNs device token.
#[derive(Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct ApnsToken {
    /// The device token as the app received it (raw bytes, not hex).
    pub device_token: Opaque,
    /// The app's bundle id (UTF-8), sent as `apns-topic`.
    pub topic: Opaque,
}

/// An FCM registration token.
#[derive(Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct FcmToken {
    /// The registration token (UTF-8).
    pub token: Opaque,
}

// Push tokens are secrets of the user: never print them, not even in debug output.
macro_rules! redacted_debug {
    ($($ty:ident),*) => {$(
        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($ty), "(..)"))
            }
        }
    )*};
}
redacted_debug!(WebPushSubscription, ApnsToken, FcmToken);

/// Register (or replace) the authenticated client's push endpoint.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct RegisterPushRequest {
    /// Where wake-ups go.
    pub endpoint: PushEndpoint,
}

/// Result of [`RegisterPushRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct RegisterPushResponse {}

/// Delete the authenticated client's push endpoint (succeeds if there is none).
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct UnregisterPushRequest {}

/// Result of [`UnregisterPushRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct UnregisterPushResponse {
    /// 1 if a registration was deleted, 0 if there was none.
    pub removed: u8,
}

/// Ask which push providers the server sends to, and its VAPID key.
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct PushInfoRequest {}

/// Result of [`PushInfoRequest`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerialize, TlsDeserializeBytes)]
pub struct PushInfoResponse {
    /// The server's VAPID public key (uncompressed P-256, 65 bytes; RFC 8292), the
    /// `applicationServerKey` a Web Push subscription must be made with. Empty if Web Push
    /// is off.
    pub vapid_public_key: Opaque,
    /// 1 if the server sends to APNs.
    pub apns: u8,
    /// 1 if the server sends to FCM.
    pub fcm: u8,
}
