//! Outage scenarios: the recipient's homeserver stopped or killed while the hub fans out to
//! it, and the hub itself restarted mid-conversation. Users must get every message exactly
//! once, in order, once the servers are back.

use std::time::Duration;

use anyhow::Context as _;
use roost_protocol::GroupId;

use super::{Ctx, ScenarioFuture, barrier, check, deliver, each_once, quiesce, received};
use crate::harness::Harness;
use crate::member::Member;

const ALPHA: usize = 0;
const BETA: usize = 1;
const GAMMA: usize = 2;
/// Longest wait for messages held back by an outage. A client whose server was killed
/// notices only when its QUIC connection times out (idle timeout, 30 s by default).
const OUTAGE_WAIT: Duration = Duration::from_secs(60);

/// alice (alpha, hub) and bob (beta) in a group; returns the group.
async fn pair_group(ctx: &Ctx, h: &Harness) -> anyhow::Result<(Member, Member, GroupId)> {
    pair_group_with(ctx, h, h.client_config(BETA)?).await
}

/// [`pair_group`] with bob's client configured by `bob_config`.
async fn pair_group_with(
    ctx: &Ctx,
    h: &Harness,
    bob_config: roost_client::ClientConfig,
) -> anyhow::Result<(Member, Member, GroupId)> {
    let alice = ctx.member(h, ALPHA, "alice").await?;
    std::fs::create_dir_all(ctx.profiles())?;
    let bob_id = format!("bob@{}", h.server(BETA)?.domain);
    let bob = Member::register(bob_config, &ctx.profiles(), &bob_id, "phone").await?;
    let group = alice.client().create_group().await?;
    alice
        .client()
        .invite(&group, std::slice::from_ref(bob.user()))
        .await
        .context("alice inviting bob")?;
    bob.wait_joined(Some(&group)).await?;
    deliver(&group, &alice, "before", &[&bob]).await?;
    Ok((alice, bob, group))
}

/// Waits until `member` holds exactly `expected` (texts, in order) in `group`, then checks
/// that nothing more arrives.
async fn exactly(
    from: &Member,
    member: &Member,
    group: &GroupId,
    expected: &[String],
) -> anyhow::Result<()> {
    let got = member
        .wait_until(
            &format!("{} messages", expected.len()),
            OUTAGE_WAIT,
            |events| {
                let got = crate::member::texts(events, group);
                (got.len() >= expected.len()).then_some(got)
            },
        )
        .await?;
    check(got == expected, || {
        format!("{} got {got:?}, expected {expected:?}", member.id())
    })?;
    // A duplicate of any of them would be queued before a later message of the same sender.
    barrier(group, from, &[member]).await?;
    let after = member.messages(group).len();
    check(after == expected.len(), || {
        format!(
            "{} got {after} messages, expected exactly {}",
            member.id(),
            expected.len()
        )
    })
}

/// Bob's server is stopped (SIGTERM) while alice sends ten messages, then started again.
pub(super) fn recipient_down(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let mut h = ctx.harness(2).await?;
        let (alice, bob, group) = pair_group(&ctx, &h).await?;
        h.stop(BETA).await.context("stopping beta")?;
        let mut expected = vec!["before".to_owned()];
        for n in 0..10 {
            let text = format!("while beta is down {n}");
            alice
                .client()
                .send(&group, text.as_bytes())
                .await
                .with_context(|| format!("alice sending {text:?} (the hub must accept it)"))?;
            expected.push(text);
        }
        // Give the hub's outbox time to try beta and fail (what this scenario is about); no
        // check below depends on how long this is.
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.restart(BETA).await.context("restarting beta")?;
        exactly(&alice, &bob, &group, &expected).await?;
        deliver(&group, &bob, "I am back", &[&alice]).await?;
        each_once(&group, &[&alice, &bob])?;
        Ok(())
    })
}

/// Bob's server is killed (SIGKILL) in the middle of a burst, then started again: nothing it
/// acknowledged is lost, nothing the hub retries is queued twice.
pub(super) fn recipient_killed(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let mut h = ctx.harness(2).await?;
        let (alice, bob, group) = pair_group(&ctx, &h).await?;
        let mut expected = vec!["before".to_owned()];
        for n in 0..20 {
            if n == 8 {
                h.kill(BETA).context("killing beta")?;
            }
            let text = format!("burst {n}");
            alice
                .client()
                .send(&group, text.as_bytes())
                .await
                .with_context(|| format!("alice sending {text:?}"))?;
            expected.push(text);
        }
        // Give the hub's outbox time to try beta and fail (what this scenario is about); no
        // check below depends on how long this is.
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.restart(BETA).await.context("restarting beta")?;
        exactly(&alice, &bob, &group, &expected).await?;
        deliver(&group, &bob, "I am back", &[&alice]).await?;
        each_once(&group, &[&alice, &bob])?;
        Ok(())
    })
}

/// Commits reach a member's server late: bob's server (beta) is down while alice updates her
/// keys three times (epoch 1 → 4, beyond the two past epochs the hub accepts messages of) and
/// writes, and the hub's outbox then waits out a 6 s retry delay before it tries beta again.
/// bob, back meanwhile at epoch 1, sends: the hub refuses it for its epoch, and bob's queue
/// does not hold the commits yet. bob must wait for them rather than rejoin (a rejoin skips
/// the epochs whose messages he has not read: alice's would be lost to him). Once they are
/// in, bob writes eight more while his server is down again (encrypted at epoch 4, queued
/// behind the first); when it is back, the first is encrypted again — and so are the eight,
/// so that they leave in order of their generations (a receiver drops a generation more
/// than five behind the newest it read as a replay).
pub(super) fn commits_in_flight(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        // bob's outgoing queue is tried again only when he sends or flushes (and the connection
        // comes back), so the steps below happen in this order.
        let (mut h, alice, bob, group) = slow_outbox_pair(&ctx, |bob_config| {
            bob_config.outbox_retry = Duration::from_secs(600);
        })
        .await?;

        h.stop(BETA).await.context("stopping beta")?;
        for _ in 0..3 {
            alice
                .client()
                .update_keys(&group)
                .await
                .context("alice updating her keys")?;
        }
        alice
            .client()
            .send(&group, b"while beta was down")
            .await
            .context("alice sending while beta is down")?;
        alice.client().flush().await?;
        // The hub's outbox tries beta, fails, and waits 6 s before the next try.
        tokio::time::sleep(Duration::from_millis(500)).await;
        h.restart(BETA).await.context("restarting beta")?;
        bob.client()
            .send(&group, b"from the old epoch")
            .await
            .context("bob queueing his message")?;
        let expected = ["before", "while beta was down"].map(String::from);
        exactly(&alice, &bob, &group, &expected).await?;
        check(bob.client().epoch(&group).await? == 4, || {
            "bob is not at epoch 4".into()
        })?;
        // With one node per domain alpha's outbox is held back, so bob's message still waits
        // for its next try. With several, another node of alpha (or the outbox's rescan) may
        // have delivered the commits at once and bob's message gone out without waiting:
        // then only the absence of loss below is checked.
        let waiting = bob.client().outbox().await?.len();
        if ctx.topology().nodes == 1 {
            check(waiting == 1, || {
                format!("bob has {waiting} messages queued, expected 1")
            })?;
        }

        h.stop(BETA).await.context("stopping beta again")?;
        let mut sent = vec!["from the old epoch".to_owned()];
        for n in 0..8 {
            let text = format!("at epoch 4 #{n}");
            bob.client().send(&group, text.as_bytes()).await?;
            sent.push(text);
        }
        h.restart(BETA).await.context("restarting beta again")?;
        let deadline = tokio::time::Instant::now() + OUTAGE_WAIT;
        while let Err(err) = bob.client().flush().await {
            check(tokio::time::Instant::now() < deadline, || {
                format!("bob's queue not delivered: {err}")
            })?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let got = alice
            .wait_until("bob's messages", OUTAGE_WAIT, |events| {
                let got = crate::member::texts(events, &group);
                (got.len() >= sent.len()).then_some(got)
            })
            .await;
        let got = match got {
            Ok(got) => got,
            Err(_) => crate::member::texts(&alice.events(), &group),
        };
        check(got == sent, || {
            format!("alice got {got:?} from bob, sent {sent:?}")
        })?;
        never_rejoined(&bob)?;
        assert_eq_epoch(&alice, &bob, &group).await
    })
}

/// alice (alpha, the hub) moves the group on by two key updates and a message while beta is
/// down; beta comes back while alpha's outbox waits 6 s before trying it again. bob's key
/// update, made at once, is refused for its epoch with nothing new in his queue: it waits for
/// the commits (`commit_wait`, 15 s here) and lands at the epoch after them, without a rejoin;
/// bob got alice's message, and alice bob's next one.
pub(super) fn commit_after_commits_in_flight(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let (mut h, alice, bob, group) = slow_outbox_pair(&ctx, |bob_config| {
            bob_config.commit_wait = Duration::from_secs(15);
        })
        .await?;

        h.stop(BETA).await.context("stopping beta")?;
        for _ in 0..2 {
            alice.client().update_keys(&group).await?;
        }
        alice.client().send(&group, b"while beta was down").await?;
        alice.client().flush().await?;
        let hub_epoch = alice.client().epoch(&group).await?;
        // The hub's outbox tries beta (its connection attempt gives up after the federation's
        // 5 s connect timeout) and then waits 6 s before the next try: beta comes back in
        // between, and bob commits before the hub's commits reach him.
        tokio::time::sleep(Duration::from_millis(5_500)).await;
        h.restart(BETA).await.context("restarting beta")?;
        let behind = bob.client().epoch(&group).await? < hub_epoch;
        let epoch = bob
            .client()
            .update_keys(&group)
            .await
            .context("bob's key update while the hub's commits are on their way")?;
        check(epoch == hub_epoch + 1, || {
            format!(
                "bob's update made epoch {epoch}, expected {}",
                hub_epoch + 1
            )
        })?;
        if !behind {
            tracing::warn!("the hub's commits reached bob before his update: no wait exercised");
        }
        let expected = ["before", "while beta was down"].map(String::from);
        exactly(&alice, &bob, &group, &expected).await?;
        never_rejoined(&bob)?;
        deliver(&group, &bob, "after bob's update", &[&alice]).await?;
        assert_eq_epoch(&alice, &bob, &group).await
    })
}

/// Two domains whose outboxes wait 6 s between tries (so the hub's commits reach beta late),
/// and alice (alpha, the hub) and bob (beta, his client configured by `bob_config`) in a group.
async fn slow_outbox_pair(
    ctx: &Ctx,
    bob_config: impl FnOnce(&mut roost_client::ClientConfig),
) -> anyhow::Result<(Harness, Member, Member, GroupId)> {
    let mut config = ctx.harness_config(2);
    config.retry_initial_ms = 6_000;
    config.retry_max_ms = 6_000;
    let h = Harness::start(config).await?;
    let mut bob = h.client_config(BETA)?;
    bob_config(&mut bob);
    let (alice, bob, group) = pair_group_with(ctx, &h, bob).await?;
    Ok((h, alice, bob, group))
}

/// bob waited for the commits on their way: he never rejoined.
fn never_rejoined(bob: &Member) -> anyhow::Result<()> {
    let rejoins = bob
        .events()
        .iter()
        .filter(|e| matches!(e, roost_client::Event::Rejoined { .. }))
        .count();
    check(rejoins == 0, || {
        format!("bob rejoined {rejoins} time(s) instead of waiting for the commits")
    })
}

/// alice and bob are at the same epoch of `group`.
async fn assert_eq_epoch(alice: &Member, bob: &Member, group: &GroupId) -> anyhow::Result<()> {
    let (a, b) = (
        alice.client().epoch(group).await?,
        bob.client().epoch(group).await?,
    );
    check(a == b, || format!("alice is at epoch {a}, bob at {b}"))
}

/// The hub (alpha) is restarted right after accepting a message; the group carries on:
/// held-back deliveries go out, members on every server send and commit again.
pub(super) fn hub_restart(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let mut h = ctx.harness(3).await?;
        let alice = ctx.member(&h, ALPHA, "alice").await?;
        let bob = ctx.member(&h, BETA, "bob").await?;
        let carol = ctx.member(&h, GAMMA, "carol").await?;
        let dave = ctx.member(&h, BETA, "dave").await?;
        let group = alice.client().create_group().await?;
        alice
            .client()
            .invite(&group, &[bob.user().clone(), carol.user().clone()])
            .await?;
        bob.wait_joined(Some(&group)).await?;
        carol.wait_joined(Some(&group)).await?;
        deliver(&group, &alice, "one", &[&bob, &carol]).await?;
        deliver(&group, &bob, "two", &[&alice, &carol]).await?;

        // Mid-conversation: the hub accepts carol's message and goes down at once.
        carol.client().send(&group, b"three").await?;
        h.stop(ALPHA).await.context("stopping the hub")?;
        h.restart(ALPHA).await.context("restarting the hub")?;
        for member in [&alice, &bob] {
            member
                .wait_until("message three", OUTAGE_WAIT, |events| {
                    crate::member::texts(events, &group)
                        .iter()
                        .any(|t| t == "three")
                        .then_some(())
                })
                .await?;
        }
        received(&bob, &group, &carol, "three").await?;

        deliver(&group, &bob, "hub is back", &[&alice, &carol]).await?;
        deliver(&group, &alice, "so am I", &[&bob, &carol]).await?;
        // A commit after the restart: the hub still has the group's state.
        carol
            .client()
            .invite(&group, std::slice::from_ref(dave.user()))
            .await
            .context("carol inviting dave after the restart")?;
        dave.wait_joined(Some(&group)).await?;
        for member in [&alice, &bob, &carol, &dave] {
            member
                .wait_members(&group, &[alice.id(), bob.id(), carol.id(), dave.id()])
                .await?;
        }
        deliver(&group, &dave, "new here", &[&alice, &bob, &carol]).await?;
        quiesce(&group, &[&alice, &bob, &carol, &dave]).await?;
        each_once(&group, &[&alice, &bob, &carol, &dave])?;
        for (member, want) in [(&alice, 4), (&bob, 4), (&carol, 5)] {
            let count = member.messages(&group).len();
            check(count == want, || {
                format!("{} has {count} messages, expected {want}", member.id())
            })?;
        }
        Ok(())
    })
}

/// Bob (beta) sends while his own server is down: the SDK queues in his profile. Meanwhile
/// alice sends to him through the hub (alpha), which is restarted while beta is still down.
/// When beta is back, bob's queue goes out through beta to the hub; one answer is lost on the
/// way back, so the SDK sends the same bytes again and the hub recognises the repeat. Every
/// message arrives once, in order, on both sides.
pub(super) fn outgoing_queue(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let mut h = ctx.harness(2).await?;
        let (alice, bob, group) = pair_group(&ctx, &h).await?;
        h.stop(BETA).await.context("stopping beta")?;

        let mut from_bob = Vec::new();
        for n in 0..5 {
            let text = format!("queued by bob {n}");
            bob.client()
                .send(&group, text.as_bytes())
                .await
                .with_context(|| format!("bob queuing {text:?} with his server down"))?;
            from_bob.push(text);
        }
        let queued = bob.client().outbox().await?;
        check(
            queued.len() == 5
                && queued
                    .iter()
                    .all(|m| m.state == roost_client::OutgoingState::Queued),
            || format!("bob's outgoing queue: {queued:?}"),
        )?;
        let mut from_alice = vec!["before".to_owned()];
        for n in 0..5 {
            let text = format!("for bob {n}");
            alice
                .client()
                .send(&group, text.as_bytes())
                .await
                .with_context(|| format!("alice sending {text:?}"))?;
            from_alice.push(text);
        }
        alice
            .client()
            .flush()
            .await
            .context("alice's messages accepted by the hub")?;

        // The hub restarts while bob's server is still down; then bob's server comes back.
        h.stop(ALPHA).await.context("stopping the hub")?;
        h.restart(ALPHA).await.context("restarting the hub")?;
        bob.client().simulate_lost_answers(1);
        h.restart(BETA).await.context("restarting beta")?;

        exactly(&alice, &bob, &group, &from_alice).await?;
        let expected = from_bob;
        let got = alice
            .wait_until("bob's queued messages", OUTAGE_WAIT, |events| {
                let got = crate::member::texts(events, &group);
                (got.len() >= expected.len()).then_some(got)
            })
            .await?;
        // alice's own messages are not in her log; bob's arrive in the order he queued them.
        check(got == expected, || {
            format!("alice got {got:?}, expected {expected:?}")
        })?;
        let left = bob.client().outbox().await?;
        check(left.is_empty(), || {
            format!("bob's queue still holds {left:?}")
        })?;
        deliver(&group, &alice, "all caught up", &[&bob]).await?;
        each_once(&group, &[&alice, &bob])?;
        Ok(())
    })
}
