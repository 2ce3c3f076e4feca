//! Proxy downloads against a peer that lies: alpha fetches a blob of `liar.test` for its
//! client from a scripted "homeserver" (a bare QUIC endpoint holding a real certificate for
//! that domain from the federation CA). An honest answer comes through byte for byte; a head
//! that names another range than the one asked for reaches the client as an error and none of
//! the bytes behind it, and the client's connection stays usable.

use std::net::SocketAddr;
use std::sync::Arc;

use roost_protocol::frame::{FRAME_HEADER_LEN, decode_body, encode_frame, frame_len};
use roost_protocol::messages::Response;
use roost_protocol::messages::blob::{BlobDownloadRequest, BlobDownloadResponse, BlobRef};
use roost_protocol::messages::federation::FederationRequest;
use roost_protocol::{ALPN_FEDERATION, ErrorCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;

use crate::blob::{code, download, pseudo_random};
use crate::common::*;
use crate::federation::{free_port, server_config};
use crate::pki::Pki;

const LIAR: &str = "liar.test";

/// What the scripted peer sends back for one download: a head and the bytes after it.
struct Answer {
    head: BlobDownloadResponse,
    bytes: Vec<u8>,
}

/// Starts the scripted peer; it answers the n-th download stream with the n-th answer and
/// reports each request it read.
fn scripted_peer(
    pki: &Pki,
    dir: &std::path::Path,
    answers: Vec<Answer>,
) -> (SocketAddr, mpsc::UnboundedReceiver<BlobDownloadRequest>) {
    let (cert, key) = pki.issue(dir, LIAR, &[LIAR]);
    let certs = CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tls.alpn_protocols = vec![ALPN_FEDERATION.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (seen, requests) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut answers = answers.into_iter();
        while let Some(incoming) = endpoint.accept().await {
            let Ok(connection) = incoming.await else {
                continue;
            };
            while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                let mut header = [0u8; FRAME_HEADER_LEN];
                recv.read_exact(&mut header).await.unwrap();
                let mut body = vec![0u8; frame_len(header, 1 << 20).unwrap()];
                recv.read_exact(&mut body).await.unwrap();
                let FederationRequest::BlobDownload(request) = decode_body(&body).unwrap() else {
                    panic!("the peer was asked for something else than a blob");
                };
                seen.send(request).unwrap();
                let answer = answers
                    .next()
                    .expect("more downloads than scripted answers");
                let head = encode_frame(&Response::BlobDownload(answer.head)).unwrap();
                send.write_all(&head).await.unwrap();
                send.write_all(&answer.bytes).await.unwrap();
                send.finish().unwrap();
                let _ = send.stopped().await;
            }
        }
    });
    (addr, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_head_names_another_range_gets_its_client_an_error_not_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "federation");
    let blob_bytes = pseudo_random(10_000, 71);
    let honest = |offset: u64, length: u64| Answer {
        head: BlobDownloadResponse {
            size: blob_bytes.len() as u64,
            offset,
            length,
        },
        bytes: blob_bytes[offset as usize..(offset + length) as usize].to_vec(),
    };
    let answers = vec![
        // 1. Honest, whole blob: the setup works and the bytes come through.
        honest(0, 10_000),
        // 2. Asked from 4,000: answers from 0 (a lie about which bytes follow).
        honest(0, 10_000),
        // 3. Asked for 100 bytes from 4,000: sends 6,000.
        honest(4_000, 6_000),
        // 4. A range past the end of the blob its own head names.
        Answer {
            head: BlobDownloadResponse {
                size: 10,
                offset: 0,
                length: 10_000,
            },
            bytes: blob_bytes.clone(),
        },
        // 5. Honest again, a range: the connections on both sides are still usable.
        honest(4_000, 100),
    ];
    let (liar_addr, mut asked) = scripted_peer(&pki, dir.path(), answers);
    let alpha = start(server_config(
        dir.path(),
        &pki,
        "alpha.test",
        free_port(),
        (LIAR, liar_addr),
    ))
    .await;
    let (_alice, _client, conn) = new_client_in(&alpha, "alice", "alpha.test").await;
    let blob = BlobRef {
        domain: LIAR.parse().unwrap(),
        address: [5; 32],
        token: [6; 32],
    };

    let whole = download(&conn, &blob, 0, None).await.unwrap();
    assert_eq!(whole, blob_bytes);
    for (offset, length) in [(4_000, None), (4_000, Some(100)), (0, None)] {
        let err = download(&conn, &blob, offset, length).await.unwrap_err();
        assert_eq!(code(err), ErrorCode::PEER_UNREACHABLE, "offset {offset}");
    }
    let range = download(&conn, &blob, 4_000, Some(100)).await.unwrap();
    assert_eq!(range, blob_bytes[4_000..4_100]);

    // Every download reached the peer as the client asked it, capability included.
    let mut requests = Vec::new();
    while let Ok(request) = asked.try_recv() {
        requests.push((request.blob == blob, request.offset, request.length));
    }
    assert_eq!(
        requests,
        [
            (true, 0, None),
            (true, 4_000, None),
            (true, 4_000, Some(100)),
            (true, 0, None),
            (true, 4_000, Some(100)),
        ]
    );
    alpha.shutdown().await;
}
