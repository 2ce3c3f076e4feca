//! The push parsers as the `push` fuzz target drives them (`roost_server::fuzzing::push`):
//! what a client registers and what a push service answers. Every input is one case: a kind
//! byte, then that kind's bytes.
//!
//! | kind | bytes | what runs |
//! |---|---|---|
//! | 0 | an endpoint URL | `HttpsUrl::parse`; an accepted URL is canonical (host in lower case, a path) and parses back to itself from its origin and path |
//! | 1 | CIDR ranges, comma-separated | `parse_ranges` (the `forbidden_ranges` setting); each accepted range contains its own address |
//! | 2 | a `Retry-After` value | `retry_after_secs`; delay-seconds are read exactly |
//! | 3 | a TLS-encoded `PushEndpoint` (RegisterPush) | the registration checks (every provider on, no network), then for an accepted one the sealing at rest (seal, open, decode: the same endpoint) and for Web Push the RFC 8291 encryption to its keys |
//! | 4 | a status (u16), then a body | the verdict of each provider on that answer |
//!
//! The functions return whether the case was accepted (for the seeds, which must be), and an
//! error when an invariant is broken (a finding: the target panics).

use roost_protocol::messages::push::PushEndpoint;
use tls_codec::{DeserializeBytes as _, Serialize as _};

use super::crypto::{SealKey, web_push_encrypt};
use super::endpoint::{HttpsUrl, parse_ranges};
use super::http::Answer;
use super::send::{self, retry_after_secs};
use super::{Enabled, check_shape};

/// "Now" for `Retry-After` dates (2026-01-01).
const NOW_SECS: u64 = 1_767_225_600;

/// One case; `Ok(true)` if the input was accepted.
pub(crate) fn run(input: &[u8]) -> Result<bool, String> {
    let Some((&kind, rest)) = input.split_first() else {
        return Ok(false);
    };
    let text = std::str::from_utf8(rest);
    match (kind, text) {
        (0, Ok(text)) => url(text),
        (1, Ok(text)) => ranges(text),
        (2, Ok(text)) => Ok(retry_after(text)?.is_some()),
        (3, _) => registration(rest),
        (4, _) => answer(rest),
        _ => Ok(false),
    }
}

fn url(text: &str) -> Result<bool, String> {
    let Ok(url) = HttpsUrl::parse(text) else {
        return Ok(false);
    };
    if url.host.is_empty() || url.host != url.host.to_ascii_lowercase() {
        return Err(format!("host not canonical: {:?}", url.host));
    }
    if !url.path.starts_with('/') || url.port == 0 {
        return Err(format!("accepted without a path or with port 0: {text:?}"));
    }
    let again = HttpsUrl::parse(&format!("{}{}", url.origin(), url.path))
        .map_err(|e| format!("{text:?}: its origin and path do not parse ({e})"))?;
    if again != url {
        return Err(format!("{text:?} parses back to another URL"));
    }
    if format!("https://{}", url.authority()) != url.origin() {
        return Err(format!("{text:?}: authority and origin disagree"));
    }
    Ok(true)
}

fn ranges(text: &str) -> Result<bool, String> {
    let list: Vec<String> = text.split(',').map(str::to_owned).collect();
    let Ok(parsed) = parse_ranges(&list) else {
        return Ok(false);
    };
    for (range, source) in parsed.iter().zip(&list) {
        let addr = source.split_once('/').map_or(source.as_str(), |(a, _)| a);
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|_| format!("{source:?} accepted without an address"))?;
        if !range.contains(addr) {
            return Err(format!("{source:?} does not contain its own address"));
        }
    }
    Ok(true)
}

fn retry_after(text: &str) -> Result<Option<u64>, String> {
    let secs = retry_after_secs(text, NOW_SECS);
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        let expected = trimmed.parse().unwrap_or(u64::MAX);
        if secs != Some(expected) {
            return Err(format!("{text:?} read as {secs:?}"));
        }
    }
    Ok(secs)
}

fn registration(bytes: &[u8]) -> Result<bool, String> {
    let Ok(endpoint) = PushEndpoint::tls_deserialize_exact_bytes(bytes) else {
        return Ok(false);
    };
    let all = Enabled {
        web_push: true,
        apns: true,
        fcm: true,
    };
    let Ok(url) = check_shape(&endpoint, all) else {
        return Ok(false);
    };
    if let (Some(url), PushEndpoint::WebPush(sub)) = (&url, &endpoint) {
        // What the sender parses again before every wake-up: the same URL.
        let again = std::str::from_utf8(sub.endpoint.as_slice())
            .ok()
            .and_then(|text| HttpsUrl::parse(text).ok());
        if again.as_ref() != Some(url) {
            return Err("the registered URL parses differently when sending".into());
        }
        // The client's keys go to ring: an invalid point is an error, never a panic.
        let _ = web_push_encrypt(sub.p256dh.as_slice(), sub.auth.as_slice(), b"wake");
    }
    let plain = endpoint
        .tls_serialize_detached()
        .map_err(|e| format!("an accepted endpoint does not encode: {e}"))?;
    let key = SealKey::new(&[7; 32]).map_err(|e| e.to_string())?;
    let sealed = key.seal(b"client", &plain).map_err(|e| e.to_string())?;
    let opened = key
        .open(b"client", &sealed)
        .map_err(|e| format!("a sealed registration does not open: {e}"))?;
    if PushEndpoint::tls_deserialize_exact_bytes(&opened).ok() != Some(endpoint) {
        return Err("a sealed registration opens to another endpoint".into());
    }
    if key.open(b"other", &sealed).is_ok() {
        return Err("a sealed registration opens for another client".into());
    }
    Ok(true)
}

fn answer(bytes: &[u8]) -> Result<bool, String> {
    let Some((status, body)) = bytes.split_first_chunk::<2>() else {
        return Ok(false);
    };
    let answer = Answer {
        status: u16::from_be_bytes(*status),
        retry_after: None,
        body: bytes::Bytes::copy_from_slice(body),
    };
    let success = (200..300).contains(&answer.status);
    for outcome in send::verdicts(&answer) {
        if matches!(outcome, send::Outcome::Sent) != success {
            return Err(format!("HTTP {} judged {outcome:?}", answer.status));
        }
    }
    // Accepted: an answer that is not a success, judged.
    Ok(!success)
}

#[cfg(test)]
mod seeds {
    //! Seeds for the `push` fuzz target; each must be accepted. With
    //! `ROOST_SEED_FUZZ_CORPUS=1` they go to `fuzz/corpus/push/` (see fuzz/README.md).

    use roost_protocol::Opaque;
    use roost_protocol::messages::push::{ApnsToken, FcmToken, PushEndpoint, WebPushSubscription};
    use tls_codec::Serialize as _;

    use super::run;
    use crate::push::crypto::Es256Key;

    /// The case of `kind` with `bytes`.
    fn encode(kind: u8, bytes: &[u8]) -> Vec<u8> {
        let mut input = vec![kind];
        input.extend_from_slice(bytes);
        input
    }

    #[test]
    fn push_fuzz_seeds_are_accepted() {
        let key = Es256Key::from_pkcs8(&Es256Key::generate_pkcs8().unwrap()).unwrap();
        let registration = |endpoint: PushEndpoint| endpoint.tls_serialize_detached().unwrap();
        let web_push = registration(PushEndpoint::WebPush(WebPushSubscription {
            endpoint: Opaque::from(&b"https://push.example.net/wpush/v2/gAAAAABk"[..]),
            p256dh: Opaque::from(key.public_key()),
            auth: Opaque::from(&[9u8; 16][..]),
        }));
        let apns = registration(PushEndpoint::Apns(ApnsToken {
            device_token: Opaque::from(&[0xab; 32][..]),
            topic: Opaque::from(&b"org.example.roost"[..]),
        }));
        let fcm = registration(PushEndpoint::Fcm(FcmToken {
            token: Opaque::from(&b"fcm:registration-token-1"[..]),
        }));
        let mut answer_410 = 410u16.to_be_bytes().to_vec();
        answer_410.extend_from_slice(br#"{"reason":"Unregistered"}"#);
        let mut answer_404 = 404u16.to_be_bytes().to_vec();
        answer_404.extend_from_slice(
            br#"{"error":{"status":"NOT_FOUND","details":[{"errorCode":"UNREGISTERED"}]}}"#,
        );
        let seeds: Vec<(&str, Vec<u8>)> = vec![
            (
                "url",
                encode(0, b"https://Push.Example.net/wpush/v2/abc?x=1"),
            ),
            ("url-v6", encode(0, b"https://[2001:db8::1]:8443/p/1")),
            ("url-v4", encode(0, b"https://192.0.2.7:8443")),
            (
                "ranges",
                encode(1, b"127.0.0.0/8,10.0.0.0/8,::1/128,fc00::/7,192.0.2.1"),
            ),
            ("retry-after-seconds", encode(2, b"120")),
            (
                "retry-after-date",
                encode(2, b"Sun, 06 Nov 1994 08:49:37 GMT"),
            ),
            (
                "retry-after-rfc850",
                encode(2, b"Sunday, 06-Nov-94 08:49:37 GMT"),
            ),
            (
                "retry-after-asctime",
                encode(2, b"Sun Nov  6 08:49:37 1994"),
            ),
            ("register-web-push", encode(3, &web_push)),
            ("register-apns", encode(3, &apns)),
            ("register-fcm", encode(3, &fcm)),
            ("answer-410", encode(4, &answer_410)),
            ("answer-404", encode(4, &answer_404)),
        ];
        for (name, input) in &seeds {
            assert_eq!(run(input), Ok(true), "seed {name}");
        }
        // A few refusals, so that the target is known to tell them apart.
        for refused in [
            encode(0, b"http://push.example.net/"),
            encode(1, b"10.0.0.0/33"),
            encode(2, b"soon"),
            encode(3, &apns[..apns.len() - 1]),
            encode(4, &200u16.to_be_bytes()),
        ] {
            assert_eq!(run(&refused), Ok(false), "{refused:?}");
        }
        if std::env::var_os("ROOST_SEED_FUZZ_CORPUS").is_some() {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/push");
            std::fs::create_dir_all(&dir).unwrap();
            for (name, input) in &seeds {
                std::fs::write(dir.join(format!("seed-{name}")), input).unwrap();
            }
        }
    }
}
