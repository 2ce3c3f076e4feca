use std::collections::HashSet;
use std::sync::Arc;

use roost_protocol::messages::keypackage::*;
use roost_protocol::{ErrorCode, ErrorDetail};

use crate::common::*;

fn code(err: roost_client::transport::RequestError) -> ErrorCode {
    err.wire_error()
        .map(|e| e.code)
        .unwrap_or_else(|| panic!("not a server error: {err}"))
}

#[tokio::test]
async fn upload_claim_last_resort_and_count() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (alice, phone, alice_conn) = new_client(&server, "alice").await;
    let (_bob, _bob_phone, bob_conn) = new_client(&server, "bob").await;

    let uploaded: Vec<_> = (0..3).map(|_| key_package(&phone)).collect();
    let last_resort = key_package_with(&phone, &phone.id, None, true);
    let response = alice_conn
        .call(UploadKeyPackagesRequest {
            key_packages: uploaded.clone(),
            last_resort: Some(last_resort.clone()),
        })
        .await
        .unwrap();
    assert_eq!(response.remaining, 3);
    let count = alice_conn.call(KeyPackageCountRequest {}).await.unwrap();
    assert_eq!((count.remaining, count.has_last_resort), (3, 1));

    // Ordinary ones first, each once, then the last-resort one, which is not consumed.
    let mut claimed = Vec::new();
    for _ in 0..3 {
        let got = bob_conn
            .call(ClaimClientKeyPackageRequest {
                client: phone.id.clone(),
            })
            .await
            .unwrap();
        assert_eq!(got.key_package.kind, KeyPackageKind::Ordinary);
        assert_eq!(got.key_package.credential, phone.credential);
        claimed.push(got.key_package.key_package);
    }
    let claimed_set: HashSet<_> = claimed.iter().cloned().collect();
    assert_eq!(claimed_set, uploaded.iter().cloned().collect());
    for _ in 0..2 {
        let got = bob_conn
            .call(ClaimUserKeyPackagesRequest {
                user: alice.id.clone(),
            })
            .await
            .unwrap();
        assert_eq!(got.key_packages.len(), 1);
        assert_eq!(got.key_packages[0].kind, KeyPackageKind::LastResort);
        assert_eq!(got.key_packages[0].key_package, last_resort);
    }
    let count = alice_conn.call(KeyPackageCountRequest {}).await.unwrap();
    assert_eq!((count.remaining, count.has_last_resort), (0, 1));
    server.shutdown().await;
}

#[tokio::test]
async fn claim_for_a_user_gets_one_per_device_and_nothing_left_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (alice, phone, phone_conn) = new_client(&server, "alice").await;
    let laptop = add_client(&phone_conn, &alice, "laptop").await;
    let laptop_conn = connect(&server).await;
    login(&laptop_conn, &laptop).await;
    let (_bob, _bp, bob_conn) = new_client(&server, "bob").await;

    let err = bob_conn
        .call(ClaimUserKeyPackagesRequest {
            user: alice.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::NO_KEY_PACKAGE);

    phone_conn
        .call(UploadKeyPackagesRequest {
            key_packages: vec![key_package(&phone)],
            last_resort: None,
        })
        .await
        .unwrap();
    laptop_conn
        .call(UploadKeyPackagesRequest {
            key_packages: vec![key_package(&laptop)],
            last_resort: None,
        })
        .await
        .unwrap();
    let got = bob_conn
        .call(ClaimUserKeyPackagesRequest {
            user: alice.id.clone(),
        })
        .await
        .unwrap();
    let mut owners: Vec<_> = got
        .key_packages
        .iter()
        .map(|k| k.credential.client.to_string())
        .collect();
    owners.sort();
    assert_eq!(
        owners,
        ["alice@example.org/laptop", "alice@example.org/phone"]
    );
    let err = bob_conn
        .call(ClaimClientKeyPackageRequest {
            client: phone.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::NO_KEY_PACKAGE);
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_key_packages_are_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_key_packages_per_upload = 4;
    cfg.limits.max_key_packages_per_client = 6;
    let server = start(cfg).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    let (_bob, bob_phone, _bob_conn) = new_client(&server, "bob").await;

    // A KeyPackage whose credential names bob, signed by alice's key.
    let for_bob = key_package_with(&phone, &bob_phone.id, None, false);
    // A KeyPackage of bob's (right identity, other key) uploaded by alice.
    let bobs = key_package(&bob_phone);
    // A KeyPackage with a flipped byte in the signature.
    let mut tampered = key_package(&phone).into_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    // Truncated.
    let truncated = key_package(&phone).into_vec()[..100].to_vec();
    for bad in [
        for_bob,
        bobs,
        tampered.into(),
        truncated.into(),
        vec![0u8; 3].into(),
    ] {
        let err = conn
            .call(UploadKeyPackagesRequest {
                key_packages: vec![key_package(&phone), bad],
                last_resort: None,
            })
            .await
            .unwrap_err();
        assert_eq!(code(err), ErrorCode::INVALID_KEY_PACKAGE);
    }
    let count = conn.call(KeyPackageCountRequest {}).await.unwrap();
    assert_eq!(count.remaining, 0, "a refused upload stores nothing");

    // Limits.
    let five: Vec<_> = (0..5).map(|_| key_package(&phone)).collect();
    let err = conn
        .call(UploadKeyPackagesRequest {
            key_packages: five,
            last_resort: None,
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::LIMIT_EXCEEDED);
    for _ in 0..1 {
        let four: Vec<_> = (0..4).map(|_| key_package(&phone)).collect();
        conn.call(UploadKeyPackagesRequest {
            key_packages: four,
            last_resort: None,
        })
        .await
        .unwrap();
    }
    let three: Vec<_> = (0..3).map(|_| key_package(&phone)).collect();
    let err = conn
        .call(UploadKeyPackagesRequest {
            key_packages: three,
            last_resort: None,
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::LIMIT_EXCEEDED);
    assert_eq!(
        conn.call(KeyPackageCountRequest {})
            .await
            .unwrap()
            .remaining,
        4
    );

    // Unauthenticated uploads.
    let anon = connect(&server).await;
    let err = anon
        .call(UploadKeyPackagesRequest {
            key_packages: vec![key_package(&phone)],
            last_resort: None,
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::UNAUTHENTICATED);
    server.shutdown().await;
}

#[tokio::test]
async fn claims_are_rate_limited_per_claimer_and_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.claim_burst = 2;
    cfg.limits.claim_rate_per_minute = 1;
    let server = start(cfg).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    let kps: Vec<_> = (0..5).map(|_| key_package(&phone)).collect();
    conn.call(UploadKeyPackagesRequest {
        key_packages: kps,
        last_resort: None,
    })
    .await
    .unwrap();
    let (_bob, _bp, bob_conn) = new_client(&server, "bob").await;
    let (_carol, _cp, carol_conn) = new_client(&server, "carol").await;
    for _ in 0..2 {
        bob_conn
            .call(ClaimClientKeyPackageRequest {
                client: phone.id.clone(),
            })
            .await
            .unwrap();
    }
    let err = bob_conn
        .call(ClaimClientKeyPackageRequest {
            client: phone.id.clone(),
        })
        .await
        .unwrap_err();
    let wire = err.wire_error().unwrap();
    assert_eq!(wire.code, ErrorCode::RATE_LIMITED);
    assert!(
        matches!(wire.detail, ErrorDetail::RateLimited { retry_after_ms } if retry_after_ms > 1000)
    );
    // Another claimer is not affected, and the refused claim consumed nothing.
    carol_conn
        .call(ClaimClientKeyPackageRequest {
            client: phone.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        conn.call(KeyPackageCountRequest {})
            .await
            .unwrap()
            .remaining,
        2
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_rate_limited_claimer_is_served_again_once_its_bucket_refilled() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.claim_burst = 1;
    cfg.limits.claim_rate_per_minute = 1;
    let clock = ManualClock::new();
    let server = start_with_clock(cfg, &clock).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    let kps: Vec<_> = (0..3).map(|_| key_package(&phone)).collect();
    conn.call(UploadKeyPackagesRequest {
        key_packages: kps,
        last_resort: None,
    })
    .await
    .unwrap();
    let (_bob, _bp, bob_conn) = new_client(&server, "bob").await;
    let claim = || ClaimClientKeyPackageRequest {
        client: phone.id.clone(),
    };
    bob_conn.call(claim()).await.unwrap();
    let err = bob_conn.call(claim()).await.unwrap_err();
    let Some(ErrorDetail::RateLimited { retry_after_ms }) =
        err.wire_error().map(|w| w.detail.clone())
    else {
        panic!("not rate limited: {err}");
    };
    // Just before the advertised time, still refused; at it, served.
    clock.advance(std::time::Duration::from_millis(
        retry_after_ms.saturating_sub(1000),
    ));
    assert_eq!(
        code(bob_conn.call(claim()).await.unwrap_err()),
        ErrorCode::RATE_LIMITED
    );
    clock.advance(std::time::Duration::from_millis(1000));
    bob_conn.call(claim()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_never_hand_out_a_key_package_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.claim_burst = 1000;
    let server = start(cfg).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    let uploaded: Vec<_> = (0..40).map(|_| key_package(&phone)).collect();
    conn.call(UploadKeyPackagesRequest {
        key_packages: uploaded.clone(),
        last_resort: None,
    })
    .await
    .unwrap();

    let mut claimers = Vec::new();
    for i in 0..4 {
        let (_u, _c, claimer) = new_client(&server, &format!("claimer{i}")).await;
        claimers.push(Arc::new(claimer));
    }
    let mut tasks = Vec::new();
    for round in 0..15 {
        for claimer in &claimers {
            let (claimer, target) = (claimer.clone(), phone.id.clone());
            tasks.push(tokio::spawn(async move {
                let _ = round;
                claimer
                    .call(ClaimClientKeyPackageRequest { client: target })
                    .await
            }));
        }
    }
    let mut got = Vec::new();
    let mut empty = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(response) => got.push(response.key_package.key_package),
            Err(err) => {
                assert_eq!(code(err), ErrorCode::NO_KEY_PACKAGE);
                empty += 1;
            }
        }
    }
    assert_eq!(got.len(), 40, "every KeyPackage handed out");
    assert_eq!(empty, 20);
    let distinct: HashSet<_> = got.iter().cloned().collect();
    assert_eq!(distinct.len(), 40, "no KeyPackage handed out twice");
    assert_eq!(distinct, uploaded.into_iter().collect());
    server.shutdown().await;
}

#[tokio::test]
async fn expired_key_packages_are_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new();
    let server = start_with_clock(config(dir.path()), &clock).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    let (_bob, _bp, bob_conn) = new_client(&server, "bob").await;
    // openmls backdates not_before by an hour; this one expires 60 seconds from now.
    let short = key_package_with(&phone, &phone.id, Some(60), false);
    let long = key_package(&phone);
    conn.call(UploadKeyPackagesRequest {
        key_packages: vec![short, long.clone()],
        last_resort: None,
    })
    .await
    .unwrap();
    assert_eq!(
        conn.call(KeyPackageCountRequest {})
            .await
            .unwrap()
            .remaining,
        2
    );
    clock.advance(std::time::Duration::from_secs(600));
    assert_eq!(
        conn.call(KeyPackageCountRequest {})
            .await
            .unwrap()
            .remaining,
        1
    );
    let got = bob_conn
        .call(ClaimClientKeyPackageRequest {
            client: phone.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(got.key_package.key_package, long);
    let err = bob_conn
        .call(ClaimClientKeyPackageRequest {
            client: phone.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::NO_KEY_PACKAGE);
    // An already expired KeyPackage is refused at upload.
    let err = conn
        .call(UploadKeyPackagesRequest {
            key_packages: vec![key_package_with(&phone, &phone.id, Some(0), false)],
            last_resort: None,
        })
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::INVALID_KEY_PACKAGE);
    server.shutdown().await;
}

#[tokio::test]
async fn lifetimes_tolerate_clock_skew_and_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await; // skew 300 s, max lifetime 366 days
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    let now = now_secs();
    let day = 24 * 3600;
    let upload = |lifetime| UploadKeyPackagesRequest {
        key_packages: vec![key_package_lifetime(
            &phone,
            &phone.id,
            Some(lifetime),
            false,
        )],
        last_resort: None,
    };
    // Another implementation sets not_before to its own "now", a minute ahead of ours.
    conn.call(upload(openmls::prelude::Lifetime::init(
        now + 60,
        now + 30 * day,
    )))
    .await
    .unwrap();
    // An hour ahead is beyond the tolerated skew.
    let err = conn
        .call(upload(openmls::prelude::Lifetime::init(
            now + 3600,
            now + 30 * day,
        )))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::INVALID_KEY_PACKAGE);
    // Longer than the maximum lifetime.
    let err = conn
        .call(upload(openmls::prelude::Lifetime::init(
            now - 60,
            now + 400 * day,
        )))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorCode::INVALID_KEY_PACKAGE);
    assert_eq!(
        conn.call(KeyPackageCountRequest {})
            .await
            .unwrap()
            .remaining,
        1
    );
    server.shutdown().await;
}

#[tokio::test]
async fn extra_devices_share_one_claim_budget_and_the_target_stays_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.claim_burst = 10;
    cfg.limits.claim_rate_per_minute = 1;
    let server = start(cfg).await;
    // The target holds 3 ordinary KeyPackages and a last-resort one.
    let (alice, phone, alice_conn) = new_client(&server, "alice").await;
    let last_resort = key_package_with(&phone, &phone.id, None, true);
    alice_conn
        .call(UploadKeyPackagesRequest {
            key_packages: (0..3).map(|_| key_package(&phone)).collect(),
            last_resort: Some(last_resort.clone()),
        })
        .await
        .unwrap();

    // Mallory adds devices and claims from each of them, by client and by user.
    let (mallory, first, first_conn) = new_client(&server, "mallory").await;
    let mut devices = vec![(first, first_conn)];
    for i in 1..5 {
        let device = add_client(&devices[0].1, &mallory, &format!("d{i}")).await;
        let conn = connect(&server).await;
        login(&conn, &device).await;
        devices.push((device, conn));
    }
    let (mut handed_out, mut refused) = (0, 0);
    for (i, (_device, conn)) in devices.iter().enumerate() {
        for _ in 0..10 {
            let result = if i % 2 == 0 {
                conn.call(ClaimClientKeyPackageRequest {
                    client: phone.id.clone(),
                })
                .await
                .map(|r| vec![r.key_package])
            } else {
                conn.call(ClaimUserKeyPackagesRequest {
                    user: alice.id.clone(),
                })
                .await
                .map(|r| r.key_packages)
            };
            match result {
                Ok(got) => handed_out += got.len(),
                Err(err) => {
                    let wire = err.wire_error().unwrap();
                    assert_eq!(wire.code, ErrorCode::RATE_LIMITED);
                    assert!(matches!(
                        wire.detail,
                        ErrorDetail::RateLimited { retry_after_ms } if retry_after_ms > 0
                    ));
                    refused += 1;
                }
            }
        }
    }
    // All five devices together got no more than one user's burst.
    assert_eq!(
        handed_out, 10,
        "mallory's devices got {handed_out} KeyPackages"
    );
    assert_eq!(refused, 40);

    // The ordinary ones are gone, but anyone else still reaches alice through her
    // last-resort KeyPackage.
    let (_bob, _bp, bob_conn) = new_client(&server, "bob").await;
    let got = bob_conn
        .call(ClaimUserKeyPackagesRequest {
            user: alice.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(got.key_packages.len(), 1);
    assert_eq!(got.key_packages[0].kind, KeyPackageKind::LastResort);
    assert_eq!(got.key_packages[0].key_package, last_resort);
    let count = alice_conn.call(KeyPackageCountRequest {}).await.unwrap();
    assert_eq!((count.remaining, count.has_last_resort), (0, 1));
    server.shutdown().await;
}
