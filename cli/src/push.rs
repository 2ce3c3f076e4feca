//! `roost-cli push`: register or delete this device's push endpoint, and show what the
//! homeserver offers. The terminal client never receives wake-ups itself; this is for trying
//! a push setup (a UnifiedPush distributor's subscription, say) and for scripts.

use std::io::Read as _;

use anyhow::{Context as _, anyhow};
use roost_client::PushTarget;
use serde_json::json;

use crate::args::PushCommand;
use crate::errors;
use crate::session::{Check, Context, Session};

/// Base64url without padding.
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

fn target(command: &PushCommand) -> anyhow::Result<PushTarget> {
    let PushCommand::Register {
        web_push,
        apns,
        topic,
        fcm,
    } = command
    else {
        return Err(anyhow!("not a registration"));
    };
    if let Some(path) = web_push {
        let mut json = String::new();
        if path.as_os_str() == "-" {
            std::io::stdin().read_to_string(&mut json)?;
        } else {
            json = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
        }
        return Ok(PushTarget::from_web_push_json(&json)?);
    }
    if let Some(hex_token) = apns {
        let device_token = hex::decode(hex_token.trim())
            .map_err(|_| anyhow!("--apns takes the device token in hex"))?;
        let topic = topic
            .clone()
            .ok_or_else(|| anyhow!("--apns needs --topic"))?;
        return Ok(PushTarget::Apns {
            device_token,
            topic,
        });
    }
    match fcm {
        Some(token) => Ok(PushTarget::Fcm {
            token: token.clone(),
        }),
        None => Err(anyhow!("give one of --web-push, --apns, --fcm")),
    }
}

/// Runs a `push` command.
pub(crate) async fn run(ctx: &Context, command: PushCommand) -> anyhow::Result<()> {
    let target = match &command {
        PushCommand::Register { .. } => Some(target(&command)?),
        _ => None,
    };
    let session = Session::open(ctx, false, Check::Skip).await?;
    let servers = session.settings.servers_text();
    let result = match (command, target) {
        (PushCommand::Register { .. }, Some(target)) => {
            let kind = match &target {
                PushTarget::WebPush { .. } => "web-push",
                PushTarget::Apns { .. } => "apns",
                _ => "fcm",
            };
            session.client.register_push(target).await.map(|()| {
                (
                    format!("registered {kind} push endpoint"),
                    json!({"registered": kind}),
                )
            })
        }
        (PushCommand::Unregister, _) => session.client.unregister_push().await.map(|removed| {
            let text = if removed {
                "push endpoint deleted"
            } else {
                "no push endpoint was registered"
            };
            (text.to_owned(), json!({"removed": removed}))
        }),
        (_, _) => session.client.push_info().await.map(|info| {
            let key = b64url(&info.vapid_public_key);
            (
                format!(
                    "web push: {}\napns: {}\nfcm: {}",
                    if key.is_empty() {
                        "off".to_owned()
                    } else {
                        format!("VAPID key {key}")
                    },
                    if info.apns { "on" } else { "off" },
                    if info.fcm { "on" } else { "off" },
                ),
                json!({"vapid_public_key": key, "apns": info.apns, "fcm": info.fcm}),
            )
        }),
    };
    session.close().await;
    let (text, json) = result.map_err(|err| anyhow!(errors::describe(&err, &servers)))?;
    ctx.out.print(text, json)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_matches_rfc4648_examples() {
        assert_eq!(b64url(b""), "");
        assert_eq!(b64url(b"f"), "Zg");
        assert_eq!(b64url(b"fo"), "Zm8");
        assert_eq!(b64url(b"foo"), "Zm9v");
        assert_eq!(b64url(b"foob"), "Zm9vYg");
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
    }
}
