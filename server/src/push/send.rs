//! The three providers: how a wake-up is addressed, authenticated and judged.
//!
//! - Web Push (RFC 8030): `POST` to the subscription's URL with the payload encrypted for it
//!   (RFC 8291) and a VAPID `Authorization` (RFC 8292).
//! - APNs: `POST {apns_url}/3/device/{hex token}` over HTTP/2 with an ES256 provider token
//!   (renewed every 30 minutes), a background push (`content-available`).
//! - FCM HTTP v1: `POST {fcm_url}/v1/projects/{project}/messages:send` with the operator's
//!   OAuth 2 access token as bearer, a high-priority data message.
//!
//! A wake-up never carries message content or a sender: only a fixed marker.

use std::path::PathBuf;
use std::sync::Mutex;

use roost_protocol::messages::push::PushEndpoint;

use super::crypto::{Es256Key, b64url, web_push_encrypt};
use super::endpoint::HttpsUrl;
use super::http::{Answer, HttpClient, HttpError};

/// The Web Push plaintext and the FCM data of a wake-up.
pub(crate) const WAKE_MARKER: &str = "wake";

/// What became of one attempt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The push service accepted it.
    Sent,
    /// The registration is dead (expired subscription, unregistered token): delete it.
    Gone(String),
    /// This wake-up cannot be sent (bad request, forbidden address, provider off); drop it,
    /// keep the registration.
    Failed(String),
    /// Try again later (transport error, 429, 5xx).
    Retry(String),
}

/// APNs provider settings.
pub(crate) struct Apns {
    pub(crate) key: Es256Key,
    pub(crate) key_id: String,
    pub(crate) team_id: String,
    pub(crate) base: HttpsUrl,
    /// (issued at, token), reused for 30 minutes (Apple refuses tokens older than an hour
    /// and renewals more often than every 20 minutes).
    pub(crate) token: Mutex<Option<(u64, String)>>,
}

/// FCM provider settings.
pub(crate) struct Fcm {
    pub(crate) project_id: String,
    pub(crate) access_token_file: PathBuf,
    pub(crate) base: HttpsUrl,
}

/// Everything needed to send.
pub(crate) struct Senders {
    pub(crate) http: HttpClient,
    pub(crate) vapid: Option<(Es256Key, String)>,
    pub(crate) apns: Option<Apns>,
    pub(crate) fcm: Option<Fcm>,
    pub(crate) ttl_secs: u32,
}

const APNS_TOKEN_REUSE_SECS: u64 = 30 * 60;

impl Senders {
    /// Sends one wake-up to `endpoint`.
    pub(crate) async fn send(&self, endpoint: &PushEndpoint, now_secs: u64) -> Outcome {
        match endpoint {
            PushEndpoint::WebPush(sub) => {
                let Some((vapid, subject)) = &self.vapid else {
                    return Outcome::Failed("web push is off".into());
                };
                let url = match std::str::from_utf8(sub.endpoint.as_slice())
                    .map_err(|_| "endpoint is not UTF-8".to_owned())
                    .and_then(HttpsUrl::parse)
                {
                    Ok(url) => url,
                    Err(err) => return Outcome::Gone(err),
                };
                let body = match web_push_encrypt(
                    sub.p256dh.as_slice(),
                    sub.auth.as_slice(),
                    WAKE_MARKER.as_bytes(),
                ) {
                    Ok(body) => body,
                    Err(err) => return Outcome::Gone(err.to_string()),
                };
                let jwt = vapid.jwt(
                    &serde_json::json!({"typ": "JWT", "alg": "ES256"}),
                    &serde_json::json!({
                        "aud": url.origin(),
                        "exp": now_secs + 12 * 3600,
                        "sub": subject,
                    }),
                );
                let jwt = match jwt {
                    Ok(jwt) => jwt,
                    Err(err) => return Outcome::Retry(err.to_string()),
                };
                let headers = [
                    (
                        "authorization",
                        format!("vapid t={jwt}, k={}", b64url(vapid.public_key())),
                    ),
                    ("content-encoding", "aes128gcm".to_owned()),
                    ("content-type", "application/octet-stream".to_owned()),
                    ("ttl", self.ttl_secs.to_string()),
                    ("urgency", "high".to_owned()),
                ];
                judge(self.http.post(&url, &headers, body).await, web_push_verdict)
            }
            PushEndpoint::Apns(token) => {
                let Some(apns) = &self.apns else {
                    return Outcome::Failed("APNs is off".into());
                };
                let Ok(topic) = std::str::from_utf8(token.topic.as_slice()) else {
                    return Outcome::Gone("topic is not UTF-8".into());
                };
                let bearer = match apns_token(apns, now_secs) {
                    Ok(bearer) => bearer,
                    Err(err) => return Outcome::Retry(err),
                };
                let mut url = apns.base.clone();
                url.path = format!(
                    "{}/3/device/{}",
                    url.path.trim_end_matches('/'),
                    hex::encode(token.device_token.as_slice())
                );
                let headers = [
                    ("authorization", format!("bearer {bearer}")),
                    ("apns-topic", topic.to_owned()),
                    ("apns-push-type", "background".to_owned()),
                    ("apns-priority", "5".to_owned()),
                    (
                        "apns-expiration",
                        (now_secs + u64::from(self.ttl_secs)).to_string(),
                    ),
                    ("content-type", "application/json".to_owned()),
                ];
                let body = br#"{"aps":{"content-available":1}}"#.to_vec();
                let outcome = judge(self.http.post(&url, &headers, body).await, apns_verdict);
                if matches!(&outcome, Outcome::Retry(r) if r.contains("ProviderToken")) {
                    // Make a new provider token for the next attempt.
                    *lock(&apns.token) = None;
                }
                outcome
            }
            PushEndpoint::Fcm(token) => {
                let Some(fcm) = &self.fcm else {
                    return Outcome::Failed("FCM is off".into());
                };
                let Ok(token) = std::str::from_utf8(token.token.as_slice()) else {
                    return Outcome::Gone("token is not UTF-8".into());
                };
                let file = fcm.access_token_file.clone();
                let access =
                    tokio::task::spawn_blocking(move || std::fs::read_to_string(file)).await;
                let access = match access {
                    Ok(Ok(access)) if !access.trim().is_empty() => access.trim().to_owned(),
                    _ => return Outcome::Retry("no FCM access token".into()),
                };
                let mut url = fcm.base.clone();
                url.path = format!(
                    "{}/v1/projects/{}/messages:send",
                    url.path.trim_end_matches('/'),
                    fcm.project_id
                );
                let body = serde_json::json!({
                    "message": {
                        "token": token,
                        "data": {"roost": WAKE_MARKER},
                        "android": {"priority": "HIGH", "ttl": format!("{}s", self.ttl_secs)},
                    }
                });
                let headers = [
                    ("authorization", format!("Bearer {access}")),
                    ("content-type", "application/json".to_owned()),
                ];
                judge(
                    self.http
                        .post(&url, &headers, body.to_string().into_bytes())
                        .await,
                    fcm_verdict,
                )
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn apns_token(apns: &Apns, now_secs: u64) -> Result<String, String> {
    let mut cached = lock(&apns.token);
    if let Some((iat, token)) = &*cached
        && now_secs.saturating_sub(*iat) < APNS_TOKEN_REUSE_SECS
    {
        return Ok(token.clone());
    }
    let token = apns
        .key
        .jwt(
            &serde_json::json!({"alg": "ES256", "kid": apns.key_id}),
            &serde_json::json!({"iss": apns.team_id, "iat": now_secs}),
        )
        .map_err(|e| e.to_string())?;
    *cached = Some((now_secs, token.clone()));
    Ok(token)
}

fn judge(answer: Result<Answer, HttpError>, verdict: fn(&Answer) -> Outcome) -> Outcome {
    match answer {
        Ok(answer) if (200..300).contains(&answer.status) => Outcome::Sent,
        Ok(answer) => verdict(&answer),
        Err(HttpError::Refused(reason)) => Outcome::Failed(reason),
        Err(HttpError::Transport(reason)) => Outcome::Retry(reason),
    }
}

fn transient(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

fn described(answer: &Answer) -> String {
    let body = String::from_utf8_lossy(&answer.body);
    let body: String = body.chars().take(200).collect();
    format!("HTTP {} {body}", answer.status)
}

fn web_push_verdict(answer: &Answer) -> Outcome {
    match answer.status {
        404 | 410 => Outcome::Gone(described(answer)),
        s if transient(s) => Outcome::Retry(described(answer)),
        _ => Outcome::Failed(described(answer)),
    }
}

fn apns_verdict(answer: &Answer) -> Outcome {
    let body = String::from_utf8_lossy(&answer.body);
    match answer.status {
        410 => Outcome::Gone(described(answer)),
        400 if body.contains("BadDeviceToken") || body.contains("DeviceTokenNotForTopic") => {
            Outcome::Gone(described(answer))
        }
        403 if body.contains("ProviderToken") => Outcome::Retry(described(answer)),
        s if transient(s) => Outcome::Retry(described(answer)),
        _ => Outcome::Failed(described(answer)),
    }
}

fn fcm_verdict(answer: &Answer) -> Outcome {
    let body = String::from_utf8_lossy(&answer.body);
    match answer.status {
        404 => Outcome::Gone(described(answer)),
        _ if body.contains("UNREGISTERED") => Outcome::Gone(described(answer)),
        401 => Outcome::Retry(described(answer)),
        s if transient(s) => Outcome::Retry(described(answer)),
        _ => Outcome::Failed(described(answer)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    #[test]
    fn provider_answers_are_judged_as_their_documentation_says() {
        assert!(matches!(
            web_push_verdict(&answer(410, "")),
            Outcome::Gone(_)
        ));
        assert!(matches!(
            web_push_verdict(&answer(404, "")),
            Outcome::Gone(_)
        ));
        assert!(matches!(
            web_push_verdict(&answer(429, "")),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            web_push_verdict(&answer(503, "")),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            web_push_verdict(&answer(413, "")),
            Outcome::Failed(_)
        ));
        let unregistered = r#"{"reason":"Unregistered"}"#;
        assert!(matches!(
            apns_verdict(&answer(410, unregistered)),
            Outcome::Gone(_)
        ));
        let bad = r#"{"reason":"BadDeviceToken"}"#;
        assert!(matches!(apns_verdict(&answer(400, bad)), Outcome::Gone(_)));
        let expired = r#"{"reason":"ExpiredProviderToken"}"#;
        assert!(matches!(
            apns_verdict(&answer(403, expired)),
            Outcome::Retry(_)
        ));
        let payload = r#"{"reason":"PayloadEmpty"}"#;
        assert!(matches!(
            apns_verdict(&answer(400, payload)),
            Outcome::Failed(_)
        ));
        let fcm_gone =
            r#"{"error":{"status":"NOT_FOUND","details":[{"errorCode":"UNREGISTERED"}]}}"#;
        assert!(matches!(
            fcm_verdict(&answer(404, fcm_gone)),
            Outcome::Gone(_)
        ));
        assert!(matches!(fcm_verdict(&answer(401, "")), Outcome::Retry(_)));
        assert!(matches!(
            fcm_verdict(&answer(400, "INVALID_ARGUMENT")),
            Outcome::Failed(_)
        ));
    }
}
