//! Trust between homeservers: discovery across domains, a server presenting a certificate
//! for another domain, and a peer acting for another domain's users.

use anyhow::Context as _;
use roost_client::Event;
use roost_client::transport::{Endpoint, TrustConfig};
use roost_protocol::messages::auth::{AsKeysRequest, ClientCredential, DiscoverUserRequest};
use roost_protocol::messages::delivery::{LeaveGroupRequest, SendMessageRequest};
use roost_protocol::messages::federation::{
    DeliverRequest, Delivery, FederationRequest, ForwardRequest,
};
use roost_protocol::messages::keypackage::ClaimUserKeyPackagesRequest;
use roost_protocol::messages::queue::{GroupMessage, QueuePayload};
use roost_protocol::messages::{ClientRequest, Response};
use roost_protocol::{ClientId, ErrorCode, GroupId, MessageId, UserId};

use super::{Ctx, ScenarioFuture, check, deliver, quiesce};
use crate::harness::{ServerSpec, small_client_config};
use crate::member::Member;
use crate::raw::{RawClient, code_name, error_code, peer_connection};

const ALPHA: usize = 0;
const BETA: usize = 1;
const GAMMA: usize = 2;

fn by_client(mut credentials: Vec<ClientCredential>) -> Vec<ClientCredential> {
    credentials.sort_by(|a, b| a.client.cmp(&b.client));
    credentials
}

fn expect_code(what: &str, got: Option<ErrorCode>, want: ErrorCode) -> anyhow::Result<()> {
    check(got == Some(want), || {
        format!(
            "{what}: expected {}, got {}",
            code_name(Some(want)),
            code_name(got)
        )
    })
}

/// Users of beta (two devices) and gamma are found from alpha and from each other's
/// servers; alpha relays beta's AS keys exactly as beta serves them.
pub(super) fn discovery(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let h = ctx.harness(3).await?;
        let bob = ctx.member(&h, BETA, "bob").await?;
        let tablet = ctx.device(&h, BETA, &bob, "tablet").await?;
        let carol = ctx.member(&h, GAMMA, "carol").await?;
        let scout = RawClient::register(&h.connect_config(ALPHA)?, "scout@alpha.test").await?;
        let lookout = RawClient::register(&h.connect_config(GAMMA)?, "lookout@gamma.test").await?;

        let found = scout
            .conn
            .call(DiscoverUserRequest {
                user: bob.user().clone(),
            })
            .await
            .context("alpha discovering bob@beta.test")?;
        let want = by_client(vec![
            bob.client().credential().clone(),
            tablet.client().credential().clone(),
        ]);
        check(by_client(found.clients) == want, || {
            "bob's devices as discovered from alpha differ from the credentials beta issued".into()
        })?;

        let found = lookout
            .conn
            .call(DiscoverUserRequest {
                user: scout.id.user.clone(),
            })
            .await
            .context("gamma discovering scout@alpha.test")?;
        check(found.clients == vec![scout.credential.clone()], || {
            "scout as discovered from gamma differs".into()
        })?;
        let found = scout
            .conn
            .call(DiscoverUserRequest {
                user: carol.user().clone(),
            })
            .await
            .context("alpha discovering carol@gamma.test")?;
        check(
            found.clients == vec![carol.client().credential().clone()],
            || "carol as discovered from alpha differs".into(),
        )?;

        let nobody: UserId = "nobody@beta.test".parse()?;
        let unknown = scout.conn.call(DiscoverUserRequest { user: nobody }).await;
        expect_code(
            "discovering an unknown user of beta",
            unknown.err().and_then(|e| e.wire_error().map(|w| w.code)),
            ErrorCode::USER_NOT_FOUND,
        )?;

        let relayed = scout
            .conn
            .call(AsKeysRequest {
                domain: "beta.test".parse()?,
            })
            .await
            .context("beta's AS keys through alpha")?;
        let endpoint = Endpoint::for_server(h.server(BETA)?.addr)?;
        let direct = endpoint
            .connect(&h.connect_config(BETA)?)
            .await?
            .call(AsKeysRequest {
                domain: "beta.test".parse()?,
            })
            .await
            .context("beta's AS keys from beta")?;
        check(
            !direct.keys.is_empty() && relayed.keys == direct.keys,
            || "alpha relays other AS keys for beta.test than beta serves".into(),
        )?;
        scout.close();
        lookout.close();
        endpoint.close();
        Ok(())
    })
}

/// A server for beta.test whose certificate (from the same CA) is for mallory.test.
pub(super) fn wrong_certificate(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let impostor = ServerSpec {
            domain: "beta.test".into(),
            certificate_names: vec!["mallory.test".into()],
            nodes: None,
        };
        let h = ctx
            .harness_with(vec![ServerSpec::new("alpha.test"), impostor])
            .await?;
        let beta_addr = h.server(BETA)?.addr;

        // A client checking the name refuses it too.
        let endpoint = Endpoint::for_server(beta_addr)?;
        check(
            endpoint.connect(&h.connect_config(BETA)?).await.is_err(),
            || "a client accepted mallory.test's certificate for beta.test".into(),
        )?;

        let alice = ctx.member(&h, ALPHA, "alice").await?;
        std::fs::create_dir_all(ctx.profiles())?;
        let bob = Member::register(
            small_client_config(h.pinned_connect_config(BETA)?),
            &ctx.profiles(),
            "bob@beta.test",
            "phone",
        )
        .await?;

        // alpha does not take the impostor for beta.test.
        let group = alice.client().create_group().await?;
        let invited = alice
            .client()
            .invite(&group, std::slice::from_ref(bob.user()))
            .await;
        expect_code(
            "alice inviting bob@beta.test (served by the impostor)",
            invited.as_ref().err().and_then(|e| e.server_code()),
            ErrorCode::PEER_UNREACHABLE,
        )?;

        // The impostor cannot act for beta.test's users towards alpha.
        let bobs_group = bob.client().create_group().await?;
        let invited = bob
            .client()
            .invite(&bobs_group, std::slice::from_ref(alice.user()))
            .await;
        expect_code(
            "bob (on the impostor) inviting alice",
            invited.as_ref().err().and_then(|e| e.server_code()),
            ErrorCode::FORBIDDEN,
        )?;

        // The same with the impostor's certificate directly: the handshake passes (the CA
        // signed it), every request for beta.test is refused.
        let trust = TrustConfig::roots_from_pem_file(h.ca_file())?;
        let alpha_addr = h.server(ALPHA)?.addr;
        let (peer_endpoint, peer) =
            peer_connection(alpha_addr, "alpha.test", trust, h.peer_identity(BETA)?).await?;
        let deliver = FederationRequest::Deliver(DeliverRequest {
            deliveries: vec![Delivery {
                recipients: vec![alice.id().clone()],
                id: MessageId(rand_bytes()?),
                timestamp_ms: 0,
                payload: QueuePayload::GroupMessage(GroupMessage {
                    group: GroupId::new(rand_bytes()?, "beta.test".parse()?),
                    message: vec![0; 16].into(),
                }),
            }],
        });
        let response = peer.request_federation(&deliver).await?;
        expect_code(
            "a delivery from mallory.test for a beta.test group",
            error_code(&response),
            ErrorCode::FORBIDDEN,
        )?;
        let forward = forward_as(
            bob.id(),
            ClientRequest::SendMessage(SendMessageRequest {
                group: group.clone(),
                message: vec![0; 16].into(),
            }),
        );
        let response = peer.request_federation(&forward).await?;
        expect_code(
            "mallory.test forwarding a message as bob@beta.test",
            error_code(&response),
            ErrorCode::FORBIDDEN,
        )?;
        peer.close();
        peer_endpoint.close();
        endpoint.close();

        // The forged requests were answered FORBIDDEN after the server judged them: whatever
        // they stored would be in the queues now, and a sync processes all of it.
        alice.client().sync().await.context("alice syncing")?;
        bob.client().sync().await.context("bob syncing")?;
        check(alice.events().is_empty(), || {
            format!("alice got events: {:?}", alice.events())
        })?;
        check(bob.events().is_empty(), || {
            format!("bob got events: {:?}", bob.events())
        })?;
        Ok(())
    })
}

fn forward_as(sender: &ClientId, request: ClientRequest) -> FederationRequest {
    FederationRequest::Forward(ForwardRequest {
        sender: Some(sender.clone()),
        request,
    })
}

fn rand_bytes() -> anyhow::Result<[u8; 16]> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    Ok(bytes)
}

/// beta (its real certificate) tries to act for carol of gamma.test towards alpha, and to
/// deliver for a group it does not host; alice and carol notice nothing.
pub(super) fn foreign_forwarding(ctx: Ctx) -> ScenarioFuture {
    Box::pin(async move {
        let h = ctx.harness(3).await?;
        let alice = ctx.member(&h, ALPHA, "alice").await?;
        let bob = ctx.member(&h, BETA, "bob").await?;
        let carol = ctx.member(&h, GAMMA, "carol").await?;
        let group = alice.client().create_group().await?;
        alice
            .client()
            .invite(&group, std::slice::from_ref(carol.user()))
            .await?;
        carol.wait_joined(Some(&group)).await?;

        let trust = TrustConfig::roots_from_pem_file(h.ca_file())?;
        let alpha_addr = h.server(ALPHA)?.addr;
        let (endpoint, beta) =
            peer_connection(alpha_addr, "alpha.test", trust, h.peer_identity(BETA)?).await?;
        let attempts = [
            (
                "beta forwarding a message to alice's group as carol@gamma.test",
                forward_as(
                    carol.id(),
                    ClientRequest::SendMessage(SendMessageRequest {
                        group: group.clone(),
                        message: vec![0; 16].into(),
                    }),
                ),
            ),
            (
                "beta forwarding carol's leave",
                forward_as(
                    carol.id(),
                    ClientRequest::LeaveGroup(LeaveGroupRequest {
                        group: group.clone(),
                        proposal: vec![0; 16].into(),
                    }),
                ),
            ),
            (
                "beta claiming alice's KeyPackages as carol",
                forward_as(
                    carol.id(),
                    ClientRequest::ClaimUserKeyPackages(ClaimUserKeyPackagesRequest {
                        user: alice.user().clone(),
                    }),
                ),
            ),
            (
                "beta delivering to alice for a group hosted on gamma",
                FederationRequest::Deliver(DeliverRequest {
                    deliveries: vec![Delivery {
                        recipients: vec![alice.id().clone()],
                        id: MessageId(rand_bytes()?),
                        timestamp_ms: 0,
                        payload: QueuePayload::GroupMessage(GroupMessage {
                            group: GroupId::new(rand_bytes()?, "gamma.test".parse()?),
                            message: vec![0; 16].into(),
                        }),
                    }],
                }),
            ),
            (
                "beta delivering to alice and carol@gamma.test through alpha",
                FederationRequest::Deliver(DeliverRequest {
                    deliveries: vec![Delivery {
                        recipients: vec![alice.id().clone(), carol.id().clone()],
                        id: MessageId(rand_bytes()?),
                        timestamp_ms: 0,
                        payload: QueuePayload::GroupMessage(GroupMessage {
                            group: GroupId::new(rand_bytes()?, "beta.test".parse()?),
                            message: vec![0; 16].into(),
                        }),
                    }],
                }),
            ),
        ];
        for (what, request) in &attempts {
            let response = beta.request_federation(request).await?;
            expect_code(what, error_code(&response), ErrorCode::FORBIDDEN)?;
        }
        // The refusal is about the domain: for its own user bob, beta may claim.
        let own = forward_as(
            bob.id(),
            ClientRequest::ClaimUserKeyPackages(ClaimUserKeyPackagesRequest {
                user: alice.user().clone(),
            }),
        );
        let response = beta.request_federation(&own).await?;
        check(
            matches!(response, Response::ClaimUserKeyPackages(ref r) if !r.key_packages.is_empty()),
            || {
                format!(
                    "beta claiming for its own user bob: {}",
                    code_name(error_code(&response))
                )
            },
        )?;
        beta.close();
        endpoint.close();

        // Nothing changed for the users.
        deliver(&group, &carol, "still me", &[&alice]).await?;
        deliver(&group, &alice, "hi carol", &[&carol]).await?;
        for member in [&alice, &carol] {
            member
                .wait_members(&group, &[alice.id(), carol.id()])
                .await?;
        }
        quiesce(&group, &[&alice, &carol]).await?;
        let events = alice.events();
        let odd: Vec<&Event> = events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Event::GroupError { .. }
                        | Event::MembersRemoved { .. }
                        | Event::CredentialRejected { .. }
                )
            })
            .collect();
        check(odd.is_empty(), || format!("alice saw {odd:?}"))?;
        check(alice.messages(&group).len() == 1, || {
            format!(
                "alice has {} messages, expected 1",
                alice.messages(&group).len()
            )
        })?;
        Ok(())
    })
}
