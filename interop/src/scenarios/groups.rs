//! Group scenarios across servers: 1:1 groups, a group spread over three servers with
//! multi-device users, a group whose creator leaves, and concurrent commits.

use anyhow::Context as _;
use roost_client::{ClientError, Event};
use roost_protocol::ClientId;

use super::{Ctx, ScenarioFuture, check, deliver, each_once, quiesce};
use crate::member::Member;

const ALPHA: usize = 0;
const BETA: usize = 1;
const GAMMA: usize = 2;

fn sorted(mut ids: Vec<ClientId>) -> Vec<ClientId> {
    ids.sort();
    ids
}

fn expect_added(added: Vec<ClientId>, expected: &[&Member]) -> anyhow::Result<()> {
    let want = sorted(expected.iter().map(|m| m.id().clone()).collect());
    let added = sorted(added);
    check(added == want, || {
        format!(
            "invite added [{}] instead of [{}]",
            crate::member::ids(&added),
            crate::member::ids(&want)
        )
    })
}

/// alice@alpha and bob@beta: a group hosted on alpha, then one hosted on beta.
pub(super) fn one_to_one(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let h = ctx.harness(2).await?;
        let alice = ctx.member(&h, ALPHA, "alice").await?;
        let bob = ctx.member(&h, BETA, "bob").await?;

        for (host, guest, tag) in [(&alice, &bob, "on alpha"), (&bob, &alice, "on beta")] {
            let group = host.client().create_group().await?;
            let added = host
                .client()
                .invite(&group, std::slice::from_ref(guest.user()))
                .await
                .with_context(|| format!("inviting {} to the group {tag}", guest.user()))?;
            expect_added(added, &[guest])?;
            guest.wait_joined(Some(&group)).await?;
            for member in [host, guest] {
                member
                    .wait_members(&group, &[host.id(), guest.id()])
                    .await?;
            }
            // Interleaved both ways; each side receives the other's in order.
            for n in 0..3 {
                let (a, b) = (format!("{tag}: host {n}"), format!("{tag}: guest {n}"));
                host.client().send(&group, a.as_bytes()).await?;
                guest.client().send(&group, b.as_bytes()).await?;
            }
            let to_guest = guest.wait_messages(&group, 3).await?;
            let to_host = host.wait_messages(&group, 3).await?;
            let texts = |got: &[(ClientId, Vec<u8>)]| -> Vec<String> {
                got.iter()
                    .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
                    .collect()
            };
            let want = |who: &str| -> Vec<String> {
                (0..3).map(|n| format!("{tag}: {who} {n}")).collect()
            };
            check(texts(&to_guest) == want("host"), || {
                format!("guest got {:?}", texts(&to_guest))
            })?;
            check(texts(&to_host) == want("guest"), || {
                format!("host got {:?}", texts(&to_host))
            })?;
            check(to_guest.iter().all(|(s, _)| s == host.id()), || {
                "a message to the guest has the wrong sender".into()
            })?;
            quiesce(&group, &[host, guest]).await?;
            each_once(&group, &[host, guest])?;
            check(host.messages(&group).len() == 3, || {
                format!("host has {} messages, not 3", host.messages(&group).len())
            })?;
        }
        Ok(())
    })
}

/// A group hosted on alpha with alice (phone, laptop), bob (phone, tablet) on beta and carol
/// on gamma; then dave (beta) added by carol, carol removed by bob's tablet, dave leaves.
pub(super) fn three_servers(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let h = ctx.harness(3).await?;
        let alice = ctx.member(&h, ALPHA, "alice").await?;
        let laptop = ctx.device(&h, ALPHA, &alice, "laptop").await?;
        let bob = ctx.member(&h, BETA, "bob").await?;
        let tablet = ctx.device(&h, BETA, &bob, "tablet").await?;
        let carol = ctx.member(&h, GAMMA, "carol").await?;
        let dave = ctx.member(&h, BETA, "dave").await?;

        let group = alice.client().create_group().await?;
        let added = alice
            .client()
            .invite(
                &group,
                &[
                    bob.user().clone(),
                    carol.user().clone(),
                    alice.user().clone(),
                ],
            )
            .await
            .context("alice inviting bob, carol and her laptop")?;
        expect_added(added, &[&bob, &tablet, &carol, &laptop])?;
        for joiner in [&laptop, &bob, &tablet, &carol] {
            joiner.wait_joined(Some(&group)).await?;
        }
        let everyone = [&alice, &laptop, &bob, &tablet, &carol];
        let ids: Vec<&ClientId> = everyone.iter().map(|m| m.id()).collect();
        for member in everyone {
            member.wait_members(&group, &ids).await?;
        }

        // Every device sends; every other device, on every server, receives.
        for sender in everyone {
            let others: Vec<&Member> = everyone
                .iter()
                .copied()
                .filter(|m| m.id() != sender.id())
                .collect();
            deliver(
                &group,
                sender,
                &format!("hello from {}", sender.id()),
                &others,
            )
            .await?;
        }

        // A member on gamma adds a user of beta: the commit goes gamma → alpha (hub).
        let added = carol
            .client()
            .invite(&group, std::slice::from_ref(dave.user()))
            .await
            .context("carol inviting dave")?;
        expect_added(added, &[&dave])?;
        dave.wait_joined(Some(&group)).await?;
        for member in [&alice, &laptop, &bob, &tablet] {
            member
                .wait_event("dave added", |e| {
                    matches!(e, Event::MembersAdded { members, .. } if members == &vec![dave.id().clone()])
                })
                .await?;
        }
        deliver(
            &group,
            &dave,
            "dave here",
            &[&alice, &laptop, &bob, &tablet, &carol],
        )
        .await?;

        // Bob's second device removes carol (beta → alpha, fan-out to gamma).
        let removed = tablet
            .client()
            .remove_users(&group, std::slice::from_ref(carol.user()))
            .await
            .context("bob's tablet removing carol")?;
        check(removed == vec![carol.id().clone()], || {
            format!("removed [{}]", crate::member::ids(&removed))
        })?;
        carol
            .wait_event("removal", |e| matches!(e, Event::RemovedFromGroup { .. }))
            .await?;
        check(carol.client().groups()?.is_empty(), || {
            "carol still has the group".into()
        })?;

        // Dave leaves: the remaining member with the lowest leaf commits his proposal.
        dave.client()
            .leave_group(&group)
            .await
            .context("dave leaving")?;
        dave.wait_event("his leave committed", |e| {
            matches!(e, Event::LeftGroup { .. })
        })
        .await?;
        let remaining = [&alice, &laptop, &bob, &tablet];
        let ids: Vec<&ClientId> = remaining.iter().map(|m| m.id()).collect();
        for member in remaining {
            member.wait_members(&group, &ids).await?;
        }
        let carol_before = carol.messages(&group).len();
        let dave_before = dave.messages(&group).len();
        deliver(
            &group,
            &tablet,
            "without carol and dave",
            &[&alice, &laptop, &bob],
        )
        .await?;
        deliver(&group, &laptop, "laptop again", &[&alice, &bob, &tablet]).await?;
        match carol.client().send(&group, b"still here?").await {
            Err(ClientError::UnknownGroup(_)) => {}
            other => anyhow::bail!("carol's send after removal: {other:?}"),
        }
        quiesce(&group, &[&alice, &laptop, &bob, &tablet]).await?;
        // Carol's and dave's SDKs dropped their state with their removal and would ignore the
        // group's messages anyway: the server's side is tested in server/tests (delivery.rs).
        check(
            carol.messages(&group).len() == carol_before
                && dave.messages(&group).len() == dave_before,
            || "a removed member received a later message".into(),
        )?;
        each_once(&group, &[&alice, &laptop, &bob, &tablet, &carol, &dave])?;
        Ok(())
    })
}

/// alice (alpha) creates a group with bob (beta) and carol (gamma) and leaves; the group,
/// still hosted on alpha, goes on without her.
pub(super) fn creator_leaves(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let h = ctx.harness(3).await?;
        let alice = ctx.member(&h, ALPHA, "alice").await?;
        let bob = ctx.member(&h, BETA, "bob").await?;
        let carol = ctx.member(&h, GAMMA, "carol").await?;
        let dave = ctx.member(&h, ALPHA, "dave").await?;

        let group = alice.client().create_group().await?;
        alice
            .client()
            .invite(&group, &[bob.user().clone(), carol.user().clone()])
            .await?;
        bob.wait_joined(Some(&group)).await?;
        carol.wait_joined(Some(&group)).await?;
        deliver(&group, &alice, "before I go", &[&bob, &carol]).await?;

        alice
            .client()
            .leave_group(&group)
            .await
            .context("alice leaving")?;
        alice
            .wait_event("her leave committed", |e| {
                matches!(e, Event::LeftGroup { .. })
            })
            .await?;
        // Bob, the remaining member with the lowest leaf, commits alice's leave; both he and
        // carol are told she left (not that someone removed her).
        for member in [&bob, &carol] {
            member
                .wait_event("alice left", |e| {
                    matches!(e, Event::MembersLeft { members, .. } if members == &vec![alice.id().clone()])
                })
                .await?;
        }
        for member in [&bob, &carol] {
            member.wait_members(&group, &[bob.id(), carol.id()]).await?;
        }
        check(alice.client().groups()?.is_empty(), || {
            "alice still has the group".into()
        })?;

        deliver(&group, &bob, "just us now", &[&carol]).await?;
        deliver(&group, &carol, "yes", &[&bob]).await?;
        // A new member on the hub's own server, added from gamma.
        carol
            .client()
            .invite(&group, std::slice::from_ref(dave.user()))
            .await
            .context("carol inviting dave")?;
        dave.wait_joined(Some(&group)).await?;
        deliver(&group, &dave, "hi from alpha", &[&bob, &carol]).await?;
        match alice.client().send(&group, b"am I in?").await {
            Err(ClientError::UnknownGroup(_)) => {}
            other => anyhow::bail!("alice's send after leaving: {other:?}"),
        }
        quiesce(&group, &[&bob, &carol, &dave]).await?;
        // Alice's SDK dropped her state when her leave was committed and would ignore the
        // group's messages anyway: the server's side is tested in server/tests (delivery.rs).
        check(alice.messages(&group).is_empty(), || {
            "alice received a message after leaving".into()
        })?;
        each_once(&group, &[&bob, &carol, &dave])?;
        Ok(())
    })
}

/// alice (alpha, the hub), bob (beta) and carol (gamma) each add someone at the same moment.
pub(super) fn commit_race(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let h = ctx.harness(3).await?;
        let alice = ctx.member(&h, ALPHA, "alice").await?;
        let bob = ctx.member(&h, BETA, "bob").await?;
        let carol = ctx.member(&h, GAMMA, "carol").await?;
        let dave = ctx.member(&h, ALPHA, "dave").await?;
        let erin = ctx.member(&h, BETA, "erin").await?;
        let frank = ctx.member(&h, GAMMA, "frank").await?;

        let group = alice.client().create_group().await?;
        alice
            .client()
            .invite(&group, &[bob.user().clone(), carol.user().clone()])
            .await?;
        bob.wait_joined(Some(&group)).await?;
        carol.wait_joined(Some(&group)).await?;

        let (dave_user, erin_user, frank_user) = (
            [dave.user().clone()],
            [erin.user().clone()],
            [frank.user().clone()],
        );
        let (by_alice, by_bob, by_carol) = tokio::join!(
            alice.client().invite(&group, &dave_user),
            bob.client().invite(&group, &erin_user),
            carol.client().invite(&group, &frank_user),
        );
        expect_added(by_alice.context("alice's racing commit")?, &[&dave])?;
        expect_added(by_bob.context("bob's racing commit")?, &[&erin])?;
        expect_added(by_carol.context("carol's racing commit")?, &[&frank])?;
        for joiner in [&dave, &erin, &frank] {
            joiner.wait_joined(Some(&group)).await?;
        }
        let everyone = [&alice, &bob, &carol, &dave, &erin, &frank];
        let ids: Vec<&ClientId> = everyone.iter().map(|m| m.id()).collect();
        for member in everyone {
            member.wait_members(&group, &ids).await?;
        }
        for sender in [&frank, &erin, &dave, &alice] {
            let others: Vec<&Member> = everyone
                .iter()
                .copied()
                .filter(|m| m.id() != sender.id())
                .collect();
            deliver(&group, sender, &format!("from {}", sender.id()), &others).await?;
        }

        // A second race: two removals at once from two servers.
        let (erin_only, dave_only) = ([erin.user().clone()], [dave.user().clone()]);
        let (r1, r2) = tokio::join!(
            carol.client().remove_users(&group, &erin_only),
            bob.client().remove_users(&group, &dave_only),
        );
        r1.context("carol removing erin")?;
        r2.context("bob removing dave")?;
        let rest = [&alice, &bob, &carol, &frank];
        let ids: Vec<&ClientId> = rest.iter().map(|m| m.id()).collect();
        for member in rest {
            member.wait_members(&group, &ids).await?;
        }
        deliver(&group, &bob, "four left", &[&alice, &carol, &frank]).await?;
        each_once(&group, &everyone)?;
        Ok(())
    })
}
