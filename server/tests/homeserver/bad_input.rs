//! Hostile input: each gets its typed error, nothing is stored, nothing panics, and the same
//! connection serves the next valid request.

use std::time::{Duration, Instant};

use roost_protocol::frame::{decode_body, encode_frame};
use roost_protocol::messages::auth::AsKeysRequest;
use roost_protocol::messages::queue::QueueFetchRequest;
use roost_protocol::messages::{ClientRequest, Response};
use roost_protocol::{ErrorCode, ErrorDetail};

use crate::common::*;

fn error_code(body: &[u8]) -> ErrorCode {
    match decode_body::<Response>(body) {
        Ok(Response::Error(err)) => err.code,
        other => panic!("expected an error response, got {other:?}"),
    }
}

fn valid_frame() -> Vec<u8> {
    encode_frame(&ClientRequest::AsKeys(AsKeysRequest {
        domain: DOMAIN.parse().unwrap(),
    }))
    .unwrap()
}

#[tokio::test]
async fn malformed_frames_get_typed_errors_and_the_connection_survives() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_frame_len = 64 * 1024;
    let server = start(cfg).await;
    let (_alice, _phone, conn) = new_client(&server, "alice").await;

    let frame = valid_frame();
    // Version 1, QueueFetch, then one byte where sixteen are needed.
    let garbage = vec![0, 0, 0, 5, 0, 1, 0, 40, 0xff];
    let mut trailing = frame.clone();
    trailing.push(0);
    let mut in_body_trailing = frame.clone();
    in_body_trailing.push(0);
    let len = u32::from_be_bytes(in_body_trailing[..4].try_into().unwrap()) + 1;
    in_body_trailing[..4].copy_from_slice(&len.to_be_bytes());
    let mut bad_version = frame.clone();
    bad_version[5] = 9;
    let mut unknown_kind = frame.clone();
    unknown_kind[6..8].copy_from_slice(&0xfffeu16.to_be_bytes());
    let mut bad_id = frame.clone();
    let at = bad_id.iter().position(|&b| b == b'e').unwrap();
    bad_id[at] = b'E';

    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("garbage body", garbage, ErrorCode::MALFORMED),
        ("empty stream", vec![], ErrorCode::MALFORMED),
        ("half a header", vec![0, 0], ErrorCode::MALFORMED),
        (
            "truncated body",
            frame[..frame.len() - 3].to_vec(),
            ErrorCode::MALFORMED,
        ),
        ("bytes after the frame", trailing, ErrorCode::MALFORMED),
        (
            "trailing bytes inside the body",
            in_body_trailing,
            ErrorCode::MALFORMED,
        ),
        (
            "oversized length prefix",
            u32::MAX.to_be_bytes().to_vec(),
            ErrorCode::FRAME_TOO_LARGE,
        ),
        (
            "just over the maximum",
            (64 * 1024 + 1u32).to_be_bytes().to_vec(),
            ErrorCode::FRAME_TOO_LARGE,
        ),
        (
            "unsupported version",
            bad_version,
            ErrorCode::UNSUPPORTED_VERSION,
        ),
        ("unknown request kind", unknown_kind, ErrorCode::MALFORMED),
        ("invalid id", bad_id, ErrorCode::MALFORMED),
    ];
    for (name, bytes, expected) in cases {
        let body = conn
            .request_raw(&bytes)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(error_code(&body), expected, "{name}");
        // The same connection still serves a valid request, as the same client.
        conn.call(QueueFetchRequest {
            after_seq: 0,
            max_messages: 1,
            max_bytes: 1,
        })
        .await
        .unwrap_or_else(|e| panic!("after {name}: {e}"));
    }

    // The size limit is reported with the server's maximum.
    let body = conn.request_raw(&u32::MAX.to_be_bytes()).await.unwrap();
    match decode_body::<Response>(&body) {
        Ok(Response::Error(err)) => {
            assert_eq!(
                err.detail,
                ErrorDetail::FrameTooLarge {
                    max_frame_len: 64 * 1024
                }
            )
        }
        other => panic!("{other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_request_that_trickles_in_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.request_read_timeout_ms = 600;
    let server = start(cfg).await;
    let conn = connect(&server).await;
    let (mut send, mut recv) = conn.open_raw_stream().await.unwrap();
    let frame = valid_frame();
    let started = Instant::now();
    let trickle = async {
        for byte in &frame {
            if send.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let read = async {
        let mut header = [0u8; 4];
        recv.read_exact(&mut header).await.unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
        recv.read_exact(&mut body).await.unwrap();
        body
    };
    let body = tokio::select! {
        body = read => body,
        _ = trickle => panic!("the server waited for the whole trickled request"),
    };
    assert_eq!(error_code(&body), ErrorCode::REQUEST_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(5));
    // The connection is still usable.
    conn.call(AsKeysRequest {
        domain: DOMAIN.parse().unwrap(),
    })
    .await
    .unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn many_concurrent_requests_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (_alice, _phone, conn) = new_client(&server, "alice").await;
    let mut tasks = Vec::new();
    for i in 0..300 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            if i % 3 == 0 {
                let body = conn.request_raw(&[0, 0, 0, 1, 7]).await.unwrap();
                assert_eq!(error_code(&body), ErrorCode::MALFORMED);
            } else {
                conn.call(QueueFetchRequest {
                    after_seq: 0,
                    max_messages: 1,
                    max_bytes: 1,
                })
                .await
                .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    server.shutdown().await;
}
