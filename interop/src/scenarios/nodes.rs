//! Scale-out scenarios: domains served by several nodes over one PostgreSQL database
//! (`roost-interop run --backend postgres --nodes 2`). Users must not be able to tell which
//! node they, or the others, are connected to, nor notice one of them dying.

use std::time::Duration;

use anyhow::Context as _;
use indicatif::ProgressBar;
use roost_protocol::messages::delivery::CommitRequest;
use roost_protocol::{ErrorCode, ErrorDetail, GroupId};

use super::{Ctx, ScenarioFuture, barrier, check, deliver, each_once, quiesce};
use crate::bench::clients::{self, BenchClient};
use crate::bench::mls::GroupOwner;
use crate::harness::{Harness, ServerSpec, domain_name};
use crate::member::Member;

const ALPHA: usize = 0;
const BETA: usize = 1;
/// Same-epoch commit races of `node-commit-races`, and the clients running them at once.
const RACES: usize = 1_000;
const RACERS: usize = 10;
/// Longest wait for messages held back by a node's death (detected by the QUIC idle timeout
/// the scenario's clients use, then a lease or a reconnect).
const FAILOVER_WAIT: Duration = Duration::from_secs(60);
/// Idle timeout of the clients of the kill scenarios: how soon they notice a dead node.
const CLIENT_IDLE: Duration = Duration::from_secs(3);

impl Ctx {
    /// Registers `name@<domain>` with device `phone`, its client trying node `node` first.
    pub async fn member_on(
        &self,
        h: &Harness,
        server: usize,
        node: usize,
        name: &str,
    ) -> anyhow::Result<Member> {
        let domain = &h.server(server)?.domain;
        std::fs::create_dir_all(self.profiles())?;
        let mut config = h.node_client_config(server, node)?;
        config.connect.idle_timeout = CLIENT_IDLE;
        config.connect.keep_alive_interval = Some(CLIENT_IDLE / 3);
        Member::register(
            config,
            &self.profiles(),
            &format!("{name}@{domain}"),
            "phone",
        )
        .await
    }
}

/// alice and bob on different nodes of alpha, rita on a node of beta: a conversation in
/// which every message is pushed to every other member exactly once.
pub(super) fn cross_node(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let h = ctx.harness(2).await?;
        let alice = ctx.member_on(&h, ALPHA, 0, "alice").await?;
        let bob = ctx.member_on(&h, ALPHA, 1, "bob").await?;
        let rita = ctx.member_on(&h, BETA, 1, "rita").await?;
        let group = alice.client().create_group().await?;
        alice
            .client()
            .invite(&group, &[bob.user().clone(), rita.user().clone()])
            .await
            .context("alice inviting bob and rita")?;
        bob.wait_joined(Some(&group)).await?;
        rita.wait_joined(Some(&group)).await?;
        for round in 0..3 {
            deliver(&group, &alice, &format!("alice {round}"), &[&bob, &rita]).await?;
            deliver(&group, &bob, &format!("bob {round}"), &[&alice, &rita]).await?;
            deliver(&group, &rita, &format!("rita {round}"), &[&alice, &bob]).await?;
        }
        // bob removes rita through node 1; alice (node 0) sees it and keeps talking to bob.
        bob.client()
            .remove_users(&group, std::slice::from_ref(rita.user()))
            .await
            .context("bob removing rita")?;
        alice
            .wait_members(&group, &[alice.id(), bob.id()])
            .await
            .context("alice seeing rita removed")?;
        deliver(&group, &alice, "just us", &[&bob]).await?;
        quiesce(&group, &[&alice, &bob]).await?;
        // Rita's SDK dropped her state with her removal and would ignore the group's messages
        // anyway: the server's side of this is tested in server/tests (delivery.rs).
        check(
            !crate::member::texts(&rita.events(), &group).contains(&"just us".to_owned()),
            || "rita got a message after her removal".into(),
        )?;
        each_once(&group, &[&alice, &bob, &rita])
    })
}

/// `RACES` groups, each with two commits for the same epoch sent at once to two different
/// nodes: exactly one wins every time, the other gets STALE_EPOCH with the new epoch.
pub(super) fn node_commit_races(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let h = ctx.harness(1).await?;
        let domain = domain_name(ALPHA);
        let hidden = ProgressBar::hidden();
        let on_0 = h.node_connect_config(ALPHA, 0)?;
        let mut first = clients::register(&on_0, &domain, "racer", RACERS, &hidden).await?;
        let mut second = first.clone();
        clients::connect_all(&on_0, &mut first, &hidden).await?;
        clients::connect_all(&h.node_connect_config(ALPHA, 1)?, &mut second, &hidden).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for (racer, (a, b)) in first.into_iter().zip(second).enumerate() {
            tasks.spawn(races(racer, a, b, RACES / RACERS));
        }
        let mut wins = [0usize; 2];
        while let Some(done) = tasks.join_next().await {
            let [on_0, on_1] = done.context("a racer panicked")??;
            wins[0] += on_0;
            wins[1] += on_1;
        }
        check(wins[0] + wins[1] == RACES, || {
            format!("{} races decided, expected {RACES}", wins[0] + wins[1])
        })?;
        // Both nodes won some: the races really were between the nodes.
        check(wins[0] > 0 && wins[1] > 0, || {
            format!("wins by node {wins:?}: one node never won a race")
        })
    })
}

/// `count` races by one client connected to both nodes; returns the wins per node.
async fn races(
    racer: usize,
    on_0: BenchClient,
    on_1: BenchClient,
    count: usize,
) -> anyhow::Result<[usize; 2]> {
    let mut wins = [0; 2];
    for n in 0..count {
        let mut uuid = [0u8; 16];
        uuid[..8].copy_from_slice(&(racer as u64).to_be_bytes());
        uuid[8..].copy_from_slice(&(n as u64).to_be_bytes());
        let mut owner = GroupOwner::create(on_0.clone(), uuid).await?;
        let x = owner.commit(vec![], &[])?;
        owner.discard()?;
        let y = owner.commit(vec![], &[])?;
        let request = |bundle: &crate::bench::mls::Bundle| CommitRequest {
            group: owner.gid.clone(),
            commit: bundle.commit.clone().into(),
            welcome: None,
            group_info: bundle.group_info.clone().into(),
        };
        let (conn_0, conn_1) = (on_0.conn()?, on_1.conn()?);
        let (r0, r1) = tokio::join!(conn_0.call(request(&x)), conn_1.call(request(&y)));
        let (winner, loser) = match (r0, r1) {
            (Ok(won), Err(lost)) => {
                wins[0] += 1;
                (won, lost)
            }
            (Err(lost), Ok(won)) => {
                wins[1] += 1;
                (won, lost)
            }
            (a, b) => anyhow::bail!(
                "race {n} of {}: exactly one commit must win, got {a:?} and {b:?}",
                owner.gid
            ),
        };
        check(winner.epoch == 1, || {
            format!("the winner moved to epoch {}", winner.epoch)
        })?;
        let wire = loser.wire_error().context("the loser got no wire error")?;
        check(
            wire.code == ErrorCode::STALE_EPOCH
                && wire.detail == ErrorDetail::StaleEpoch { current_epoch: 1 },
            || format!("the loser got {wire:?}, expected STALE_EPOCH with epoch 1"),
        )?;
    }
    Ok(wins)
}

/// alice on node 0, bob and carol on node 1 of alpha; bob keeps sending while node 1 is
/// killed (SIGKILL). bob's and carol's clients fail over to node 0; every message whose send
/// was acknowledged reaches the others exactly once, and no message arrives twice.
pub(super) fn node_killed(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let mut h = ctx.harness(1).await?;
        let alice = ctx.member_on(&h, ALPHA, 0, "alice").await?;
        let bob = ctx.member_on(&h, ALPHA, 1, "bob").await?;
        let carol = ctx.member_on(&h, ALPHA, 1, "carol").await?;
        let group = alice.client().create_group().await?;
        alice
            .client()
            .invite(&group, &[bob.user().clone(), carol.user().clone()])
            .await?;
        bob.wait_joined(Some(&group)).await?;
        carol.wait_joined(Some(&group)).await?;
        deliver(&group, &alice, "before", &[&bob, &carol]).await?;

        let mut acknowledged = Vec::new();
        for n in 0..60 {
            if n == 20 {
                h.kill_node(ALPHA, 1).context("killing alpha's node 1")?;
            }
            let text = format!("bob {n}");
            // Acknowledged: queued and accepted by the hub (the queue delivered). One that is
            // not stays in bob's outgoing queue and goes out later, at most once
            // (`each_once` below).
            let sent = async {
                bob.client().send(&group, text.as_bytes()).await?;
                bob.client().flush().await
            };
            if sent.await.is_ok() {
                acknowledged.push(text);
            }
        }
        check(acknowledged.len() >= 40, || {
            format!(
                "only {} of 60 sends were acknowledged: bob did not fail over",
                acknowledged.len()
            )
        })?;
        for member in [&alice, &carol] {
            member
                .wait_until("every acknowledged message", FAILOVER_WAIT, |events| {
                    let got = crate::member::texts(events, &group);
                    acknowledged.iter().all(|t| got.contains(t)).then_some(())
                })
                .await?;
        }
        quiesce(&group, &[&alice, &bob, &carol]).await?;
        each_once(&group, &[&alice, &bob, &carol])?;
        // The conversation goes on, node 1 still down.
        deliver(&group, &carol, "after", &[&alice, &bob]).await
    })
}

/// beta (one node) is down while alice sends twenty messages through alpha (two nodes); beta
/// comes back and alpha's node 0, which holds the outbox, is killed as it starts draining.
/// Node 1 takes the outbox over: bob gets all twenty, exactly once, in order.
pub(super) fn outbox_node_killed(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let mut beta = ServerSpec::new(domain_name(BETA));
        beta.nodes = Some(1);
        let mut h = ctx
            .harness_with(vec![ServerSpec::new(domain_name(ALPHA)), beta])
            .await?;
        let alice = ctx.member_on(&h, ALPHA, 0, "alice").await?;
        let bob = ctx.member_on(&h, BETA, 0, "bob").await?;
        let group: GroupId = alice.client().create_group().await?;
        alice
            .client()
            .invite(&group, std::slice::from_ref(bob.user()))
            .await?;
        bob.wait_joined(Some(&group)).await?;
        deliver(&group, &alice, "before", &[&bob]).await?;

        h.stop(BETA).await.context("stopping beta")?;
        let mut expected = vec!["before".to_owned()];
        for n in 0..20 {
            let text = format!("while beta is down {n}");
            alice.client().send(&group, text.as_bytes()).await?;
            expected.push(text);
        }
        h.restart(BETA).await.context("restarting beta")?;
        h.kill_node(ALPHA, 0).context("killing alpha's node 0")?;
        let got = bob
            .wait_until("every message", FAILOVER_WAIT, |events| {
                let got = crate::member::texts(events, &group);
                (got.len() >= expected.len()).then_some(got)
            })
            .await?;
        check(got == expected, || {
            format!("bob got {got:?}, expected {expected:?}")
        })?;
        barrier(&group, &alice, &[&bob]).await?;
        each_once(&group, &[&bob])
    })
}
