//! Push notifications: register where the homeserver sends wake-ups while this client has no
//! listen stream open (the app is suspended). A wake-up carries nothing but "connect and
//! fetch"; the app then opens the profile and calls [`Client::sync`] (docs/CLIENT.md).

use roost_protocol::Opaque;
use roost_protocol::messages::push::{
    ApnsToken, FcmToken, PushEndpoint, PushInfoRequest, RegisterPushRequest, UnregisterPushRequest,
    WebPushSubscription,
};

use crate::error::ClientError;

/// Where this client's wake-ups go: what the platform's push API handed the app.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PushTarget {
    /// A Web Push subscription (a browser's `PushSubscription`, or a UnifiedPush
    /// distributor's endpoint with its keys). Make it with [`PushInfo::vapid_public_key`] as
    /// the `applicationServerKey`.
    WebPush {
        /// The push resource URL (`https://`).
        endpoint: String,
        /// The subscription's P-256 public key, uncompressed (65 bytes).
        p256dh: Vec<u8>,
        /// The subscription's authentication secret (16 bytes).
        auth: Vec<u8>,
    },
    /// An APNs device token (raw bytes) and the app's bundle id.
    Apns {
        /// The device token, as bytes (not hex).
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

impl PushTarget {
    /// A Web Push subscription from its standard JSON form (`PushSubscription.toJSON()`:
    /// `{"endpoint": "...", "keys": {"p256dh": "<base64url>", "auth": "<base64url>"}}`).
    pub fn from_web_push_json(json: &str) -> Result<PushTarget, ClientError> {
        let bad =
            |what: &str| ClientError::InvalidOperation(format!("Web Push subscription: {what}"));
        let value: serde_json::Value = serde_json::from_str(json).map_err(|_| bad("not JSON"))?;
        let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        let endpoint = text(&value["endpoint"]).ok_or_else(|| bad("no endpoint"))?;
        let p256dh = text(&value["keys"]["p256dh"])
            .and_then(|k| base64url_decode(&k))
            .ok_or_else(|| bad("no keys.p256dh"))?;
        let auth = text(&value["keys"]["auth"])
            .and_then(|k| base64url_decode(&k))
            .ok_or_else(|| bad("no keys.auth"))?;
        Ok(PushTarget::WebPush {
            endpoint,
            p256dh,
            auth,
        })
    }

    fn into_endpoint(self) -> PushEndpoint {
        match self {
            PushTarget::WebPush {
                endpoint,
                p256dh,
                auth,
            } => PushEndpoint::WebPush(WebPushSubscription {
                endpoint: endpoint.into_bytes().into(),
                p256dh: p256dh.into(),
                auth: auth.into(),
            }),
            PushTarget::Apns {
                device_token,
                topic,
            } => PushEndpoint::Apns(ApnsToken {
                device_token: device_token.into(),
                topic: topic.into_bytes().into(),
            }),
            PushTarget::Fcm { token } => PushEndpoint::Fcm(FcmToken {
                token: Opaque::from(token.into_bytes()),
            }),
        }
    }
}

/// Decodes base64url, with or without padding (Web Push keys come either way).
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// What the homeserver offers for push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushInfo {
    /// The VAPID public key (uncompressed P-256) to subscribe with; empty if the server does
    /// not do Web Push.
    pub vapid_public_key: Vec<u8>,
    /// The server sends to APNs.
    pub apns: bool,
    /// The server sends to FCM.
    pub fcm: bool,
}

impl super::Client {
    /// Registers (or replaces) this client's push endpoint. Refused with
    /// PUSH_ENDPOINT_REJECTED (malformed, not https, or an address the server does not
    /// connect to) or PUSH_PROVIDER_DISABLED; nothing is stored then.
    pub async fn register_push(&self, target: PushTarget) -> Result<(), ClientError> {
        self.inner
            .conn
            .call(RegisterPushRequest {
                endpoint: target.into_endpoint(),
            })
            .await?;
        Ok(())
    }

    /// Deletes this client's push endpoint; whether there was one.
    pub async fn unregister_push(&self) -> Result<bool, ClientError> {
        let response = self.inner.conn.call(UnregisterPushRequest {}).await?;
        Ok(response.removed != 0)
    }

    /// The server's push providers and VAPID key.
    pub async fn push_info(&self) -> Result<PushInfo, ClientError> {
        let info = self.inner.conn.call(PushInfoRequest {}).await?;
        Ok(PushInfo {
            vapid_public_key: info.vapid_public_key.into_vec(),
            apns: info.apns != 0,
            fcm: info.fcm != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn web_push_json_is_read_as_browsers_write_it() {
        let json = r#"{"endpoint":"https://push.example.net/s/1","expirationTime":null,
            "keys":{"p256dh":"BAEC","auth":"AAECAwQFBgcICQoLDA0ODw=="}}"#;
        let target = PushTarget::from_web_push_json(json).unwrap();
        assert_eq!(
            target,
            PushTarget::WebPush {
                endpoint: "https://push.example.net/s/1".into(),
                p256dh: vec![4, 1, 2],
                auth: (0..16).collect(),
            }
        );
        assert!(!format!("{target:?}").contains("push.example.net"));
        for bad in [
            "",
            "{}",
            r#"{"endpoint":"x"}"#,
            r#"{"endpoint":"x","keys":{"p256dh":"*","auth":"AA"}}"#,
        ] {
            assert!(PushTarget::from_web_push_json(bad).is_err(), "{bad}");
        }
    }
}
