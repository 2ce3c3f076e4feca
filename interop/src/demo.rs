//! `roost-interop demo`: two homeservers, alice on one and bob on the other, and a short
//! conversation between them, printed as it happens.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;

use crate::member::Member;
use crate::scenarios::Ctx;

const LINES: [(usize, &str); 4] = [
    (0, "Hi Bob, Alice here, on alpha.test."),
    (
        1,
        "Hi Alice! Bob on beta.test. Your message came through two homeservers.",
    ),
    (
        0,
        "Over QUIC, between servers that checked each other's certificates.",
    ),
    (
        1,
        "And end-to-end encrypted with MLS: the servers only saw ciphertext.",
    ),
];

/// Runs the demo in a temporary directory, writing what happens to `out`.
pub async fn run(roost: &Path, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("roost-interop-demo-")
        .tempdir()?;
    let ctx = Ctx::new(roost, dir.path());
    let say = |out: &mut (dyn Write + Send), text: String| -> anyhow::Result<()> {
        writeln!(out, "[{:>6.2}s] {text}", started.elapsed().as_secs_f64())?;
        out.flush()?;
        Ok(())
    };
    let h = ctx.harness(2).await?;
    for server in h.servers() {
        say(
            out,
            format!("homeserver {} listening on {}", server.domain, server.addr),
        )?;
    }
    let alice = ctx.member(&h, 0, "alice").await?;
    say(out, format!("{} registered on alpha.test", alice.id()))?;
    let bob = ctx.member(&h, 1, "bob").await?;
    say(out, format!("{} registered on beta.test", bob.id()))?;

    let group = alice.client().create_group().await?;
    say(
        out,
        format!("alice created group {group} (hosted on alpha.test)"),
    )?;
    alice
        .client()
        .invite(&group, std::slice::from_ref(bob.user()))
        .await
        .context("alice inviting bob")?;
    say(
        out,
        "alice invited bob@beta.test (alpha.test claimed his KeyPackage from beta.test)".into(),
    )?;
    bob.wait_joined(Some(&group)).await?;
    say(
        out,
        "bob joined the group (Welcome delivered by alpha.test to beta.test)".into(),
    )?;

    let people: [&Member; 2] = [&alice, &bob];
    for (count, (from, text)) in LINES.iter().enumerate() {
        let (sender, receiver) = (people[*from], people[1 - from]);
        let sent = Instant::now();
        sender.client().send(&group, text.as_bytes()).await?;
        say(out, format!("{} says: {text}", sender.id()))?;
        let got = receiver.wait_messages(&group, count / 2 + 1).await?;
        let (from_id, bytes) = got.last().context("no message")?;
        say(
            out,
            format!(
                "    {} received from {from_id} after {} ms: {}",
                receiver.id(),
                sent.elapsed().as_millis(),
                String::from_utf8_lossy(bytes)
            ),
        )?;
    }
    alice.close().await;
    bob.close().await;
    h.shutdown().await?;
    say(out, "both homeservers stopped".into())?;
    Ok(())
}
