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
use super::http::{Answer, H2Pool, HttpClient, HttpError, OriginPools};

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
    /// Try again later (transport error, 429, 5xx); after the seconds the service asked for
    /// with `Retry-After`, if it did (429, 503).
    Retry(String, Option<u64>),
}

impl Outcome {
    fn retry(reason: impl Into<String>) -> Self {
        Outcome::Retry(reason.into(), None)
    }
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
    /// The HTTP/2 connection to `base`, reused across wake-ups.
    pub(crate) pool: H2Pool,
}

/// FCM provider settings.
pub(crate) struct Fcm {
    pub(crate) project_id: String,
    pub(crate) access_token_file: PathBuf,
    pub(crate) base: HttpsUrl,
    /// The HTTP/2 connection to `base`, reused across wake-ups.
    pub(crate) pool: H2Pool,
}

/// Everything needed to send.
pub(crate) struct Senders {
    pub(crate) http: HttpClient,
    pub(crate) vapid: Option<(Es256Key, String)>,
    /// Web Push connections, per push service.
    pub(crate) web_push_pools: OriginPools,
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
                    Err(err) => return Outcome::retry(err.to_string()),
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
                let answer = match self.web_push_pools.get(&url) {
                    Some(pool) => self.http.post_pooled(&pool, &url, &headers, body).await,
                    None => self.http.post(&url, &headers, body).await,
                };
                judge(answer, web_push_verdict, now_secs)
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
                    Err(err) => return Outcome::retry(err),
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
                let outcome = judge(
                    self.http
                        .post_pooled(&apns.pool, &url, &headers, body)
                        .await,
                    apns_verdict,
                    now_secs,
                );
                if matches!(&outcome, Outcome::Retry(r, _) if r.contains("ProviderToken")) {
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
                    _ => return Outcome::retry("no FCM access token"),
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
                        .post_pooled(&fcm.pool, &url, &headers, body.to_string().into_bytes())
                        .await,
                    fcm_verdict,
                    now_secs,
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

fn judge(
    answer: Result<Answer, HttpError>,
    verdict: fn(&Answer) -> Outcome,
    now_secs: u64,
) -> Outcome {
    match answer {
        Ok(answer) if (200..300).contains(&answer.status) => Outcome::Sent,
        Ok(answer) => match verdict(&answer) {
            Outcome::Retry(reason, _) if matches!(answer.status, 429 | 503) => {
                let after = answer
                    .retry_after
                    .as_deref()
                    .and_then(|value| retry_after_secs(value, now_secs));
                Outcome::Retry(reason, after)
            }
            outcome => outcome,
        },
        Err(HttpError::Refused(reason)) => Outcome::Failed(reason),
        Err(HttpError::Transport(reason)) => Outcome::retry(reason),
    }
}

/// Each provider's judgement of an answer: Web Push, APNs, FCM.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn verdicts(answer: &Answer) -> [Outcome; 3] {
    [web_push_verdict, apns_verdict, fcm_verdict]
        .map(|verdict| judge(Ok(answer.clone()), verdict, 0))
}

/// A `Retry-After` value (RFC 9110 §10.2.3) as seconds from `now_secs`: delay-seconds, or an
/// HTTP date (a date already past is 0). None if it is neither.
pub(crate) fn retry_after_secs(value: &str, now_secs: u64) -> Option<u64> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than u64 holds: as long as it gets (the caller bounds it anyway).
        return Some(value.parse().unwrap_or(u64::MAX));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let at = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    Some(at.saturating_sub(now_secs))
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
        s if transient(s) => Outcome::retry(described(answer)),
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
        403 if body.contains("ProviderToken") => Outcome::retry(described(answer)),
        s if transient(s) => Outcome::retry(described(answer)),
        _ => Outcome::Failed(described(answer)),
    }
}

fn fcm_verdict(answer: &Answer) -> Outcome {
    let body = String::from_utf8_lossy(&answer.body);
    match answer.status {
        404 => Outcome::Gone(described(answer)),
        _ if body.contains("UNREGISTERED") => Outcome::Gone(described(answer)),
        401 => Outcome::retry(described(answer)),
        s if transient(s) => Outcome::retry(described(answer)),
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
            ..Answer::default()
        }
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date_on_429_and_503_only() {
        // 1994-11-06 08:49:37 UTC
        let then = 784_111_777;
        assert_eq!(retry_after_secs("120", then), Some(120));
        assert_eq!(retry_after_secs(" 0 ", then), Some(0));
        assert_eq!(
            retry_after_secs("99999999999999999999999", then),
            Some(u64::MAX)
        );
        assert_eq!(
            retry_after_secs("Sun, 06 Nov 1994 08:50:07 GMT", then),
            Some(30)
        );
        // The obsolete forms RFC 9110 asks recipients to accept.
        assert_eq!(
            retry_after_secs("Sunday, 06-Nov-94 08:50:07 GMT", then),
            Some(30)
        );
        assert_eq!(retry_after_secs("Sun Nov  6 08:50:07 1994", then), Some(30));
        assert_eq!(
            retry_after_secs("Sun, 06 Nov 1994 08:00:00 GMT", then),
            Some(0)
        );
        for bad in ["", "-5", "1.5", "soon", "Sun, 06 Nov 1994 25:00:00 GMT"] {
            assert_eq!(retry_after_secs(bad, then), None, "{bad:?}");
        }
        let with = |status| Answer {
            status,
            retry_after: Some("30".into()),
            ..Answer::default()
        };
        for status in [429, 503] {
            assert!(matches!(
                judge(Ok(with(status)), web_push_verdict, then),
                Outcome::Retry(_, Some(30))
            ));
        }
        assert!(matches!(
            judge(Ok(with(500)), web_push_verdict, then),
            Outcome::Retry(_, None)
        ));
        assert!(matches!(
            judge(Ok(with(429)), apns_verdict, then),
            Outcome::Retry(_, Some(30))
        ));
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
            Outcome::Retry(..)
        ));
        assert!(matches!(
            web_push_verdict(&answer(503, "")),
            Outcome::Retry(..)
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
            Outcome::Retry(..)
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
        assert!(matches!(fcm_verdict(&answer(401, "")), Outcome::Retry(..)));
        assert!(matches!(
            fcm_verdict(&answer(400, "INVALID_ARGUMENT")),
            Outcome::Failed(_)
        ));
    }
}
