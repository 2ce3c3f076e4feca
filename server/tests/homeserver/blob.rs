//! The blob service over real QUIC: streamed uploads and downloads checked by hash, ranges
//! that resume a cut download, limits refusing with typed errors and storing nothing, hostile
//! streams, a disk that fills up mid-upload, and a server killed mid-upload.

use std::path::Path;
use std::time::Duration;

use roost_client::transport::{Connection, RequestError};
use roost_protocol::ErrorCode;
use roost_protocol::frame::encode_frame;
use roost_protocol::messages::ClientRequest;
use roost_protocol::messages::blob::{
    BlobDownloadRequest, BlobRef, BlobUploadRequest, BlobUploadResponse,
};

use roost_server::testing::{Faults, start_with_store_faults};

use crate::common::*;

const MIB: usize = 1024 * 1024;

/// Deterministic bytes that do not compress or repeat (xorshift).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

pub async fn upload(conn: &Connection, bytes: &[u8]) -> Result<BlobUploadResponse, RequestError> {
    let mut upload = conn.start_blob_upload(bytes.len() as u64).await?;
    for chunk in bytes.chunks(256 * 1024) {
        upload.write(chunk).await?;
    }
    upload.finish().await
}

pub async fn download(
    conn: &Connection,
    blob: &BlobRef,
    offset: u64,
    length: Option<u64>,
) -> Result<Vec<u8>, RequestError> {
    let mut download = conn
        .download_blob(BlobDownloadRequest {
            blob: blob.clone(),
            offset,
            length,
        })
        .await?;
    let mut out = Vec::new();
    while let Some(chunk) = download.chunk().await? {
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

pub fn code(err: RequestError) -> ErrorCode {
    match err.wire_error() {
        Some(wire) => wire.code,
        None => panic!("expected a server error, got {err}"),
    }
}

/// The blobs a reader could see: data files (hex names) in the blob directory.
fn visible_blobs(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.len() == 64)
        .collect();
    names.sort();
    names
}

fn temp_files(data: &Path) -> usize {
    std::fs::read_dir(data.join("blobs").join("tmp"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn blobs_of_0_1_and_64_mib_come_back_byte_for_byte_under_their_hash() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (_alice, _client, alice) = new_client(&server, "alice").await;
    let (_bob, _bob_client, bob) = new_client(&server, "bob").await;
    for (len, seed) in [(0, 1), (1, 2), (64 * MIB, 3)] {
        let bytes = pseudo_random(len, seed);
        let stored = upload(&alice, &bytes).await.unwrap();
        assert_eq!(stored.size, len as u64);
        assert_eq!(stored.blob.address, sha256(&bytes), "address of {len} B");
        assert_eq!(stored.blob.domain.as_str(), DOMAIN);
        // Anyone holding the reference reads it (the capability), here another user.
        let back = download(&bob, &stored.blob, 0, None).await.unwrap();
        assert_eq!(back.len(), len);
        assert!(back == bytes, "{len} B blob differs");
    }
    assert_eq!(visible_blobs(dir.path()).len(), 3);
    assert_eq!(temp_files(dir.path()), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_cut_64_mib_download_resumes_from_the_first_missing_byte() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let (_alice, _client, conn) = new_client(&server, "alice").await;
    let bytes = pseudo_random(64 * MIB, 7);
    let stored = upload(&conn, &bytes).await.unwrap();

    // The first download stops (the app was suspended) after 20 MiB or so.
    let mut received = Vec::new();
    let mut first = conn
        .download_blob(BlobDownloadRequest {
            blob: stored.blob.clone(),
            offset: 0,
            length: None,
        })
        .await
        .unwrap();
    assert_eq!(first.head.size, 64 * MIB as u64);
    while received.len() < 20 * MIB {
        received.extend_from_slice(&first.chunk().await.unwrap().unwrap());
    }
    drop(first);
    let resumed_at = received.len() as u64;

    // The rest, asked for by range, on the same connection.
    let rest = download(&conn, &stored.blob, resumed_at, None)
        .await
        .unwrap();
    received.extend_from_slice(&rest);
    assert_eq!(received.len(), 64 * MIB);
    assert_eq!(sha256(&received), stored.blob.address);

    // A bounded range in the middle, and the empty range at the end.
    let middle = download(&conn, &stored.blob, 1000, Some(5000))
        .await
        .unwrap();
    assert!(middle == bytes[1000..6000]);
    let end = download(&conn, &stored.blob, 64 * MIB as u64, None)
        .await
        .unwrap();
    assert!(end.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn size_and_quota_limits_refuse_with_typed_errors_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.blobs.max_blob_size = MIB as u64;
    cfg.blobs.quota_per_user = 3 * MIB as u64 / 2;
    let server = start(cfg).await;
    let (_alice, _client, conn) = new_client(&server, "alice").await;

    let too_large = pseudo_random(MIB + 1, 1);
    assert_eq!(
        code(upload(&conn, &too_large).await.unwrap_err()),
        ErrorCode::BLOB_TOO_LARGE
    );
    assert!(visible_blobs(dir.path()).is_empty());

    let first = pseudo_random(MIB, 2);
    upload(&conn, &first).await.unwrap();
    let second = pseudo_random(MIB, 3);
    assert_eq!(
        code(upload(&conn, &second).await.unwrap_err()),
        ErrorCode::BLOB_QUOTA_EXCEEDED
    );
    assert_eq!(visible_blobs(dir.path()).len(), 1);

    // The connection goes on, and what fits in the quota is stored.
    let small = pseudo_random(MIB / 4, 4);
    let stored = upload(&conn, &small).await.unwrap();
    assert!(download(&conn, &stored.blob, 0, None).await.unwrap() == small);
    // Another user has a quota of their own.
    let (_bob, _bob_client, bob) = new_client(&server, "bob").await;
    upload(&bob, &second).await.unwrap();
    assert_eq!(visible_blobs(dir.path()).len(), 3);
    assert_eq!(temp_files(dir.path()), 0);
    server.shutdown().await;
}

/// Whether `tmp/` of the blob store is empty within 5 s (a failed upload's files are removed
/// once the jobs writing them ended).
async fn no_temp_files_soon(data: &Path) -> bool {
    for _ in 0..500 {
        if temp_files(data) == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    temp_files(data) == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_mid_upload_is_unavailable_stores_nothing_and_the_upload_succeeds_once_space_is_back()
 {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // Exactly one 4 MiB blob fits: a failed upload must not keep any of the quota.
    cfg.blobs.quota_per_user = 4 * MIB as u64;
    let faults = Faults::new();
    let server = start_with_store_faults(cfg.validate().unwrap(), faults.clone())
        .await
        .unwrap();
    let (_alice, _client, conn) = new_client(&server, "alice").await;
    let bytes = pseudo_random(4 * MIB, 7);

    // The disk fills up after the first MiB of the blob's file.
    faults.fail_blob_writes_after(MIB as u64);
    let err = upload(&conn, &bytes).await.unwrap_err();
    assert_eq!(code(err), ErrorCode::UNAVAILABLE);
    assert!(faults.injected() >= 1, "the fault never fired");
    assert!(visible_blobs(dir.path()).is_empty());
    assert!(
        no_temp_files_soon(dir.path()).await,
        "the failed upload's files stayed in tmp/"
    );

    // Space is back: the same connection uploads the same blob, which reads back whole, and
    // the whole quota was still free for it.
    faults.clear();
    let stored = upload(&conn, &bytes).await.unwrap();
    assert_eq!(stored.blob.address, sha256(&bytes));
    assert!(download(&conn, &stored.blob, 0, None).await.unwrap() == bytes);
    assert_eq!(visible_blobs(dir.path()).len(), 1);
    assert_eq!(temp_files(dir.path()), 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_disk_is_not_taken_for_a_stalled_client() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.blobs.stall_timeout_ms = 300;
    let faults = Faults::new();
    let server = start_with_store_faults(cfg.validate().unwrap(), faults.clone())
        .await
        .unwrap();
    let (_alice, _client, conn) = new_client(&server, "alice").await;
    let bytes = pseudo_random(2 * MIB, 9);
    // Each chunk takes longer to reach the disk than the stall timeout while the client sends
    // without a pause: the server waits on itself, not on the client.
    faults.slow_blob_writes(Duration::from_millis(400));
    let stored = upload(&conn, &bytes).await.unwrap();
    assert_eq!(stored.blob.address, sha256(&bytes));
    faults.clear();
    assert!(download(&conn, &stored.blob, 0, None).await.unwrap() == bytes);
    server.shutdown().await;
}

/// Writes an upload request declaring `declared` bytes, then `bytes`, then finishes.
async fn raw_upload(conn: &Connection, declared: u64, bytes: &[u8]) -> ErrorCode {
    let (mut send, mut recv) = conn.open_raw_stream().await.unwrap();
    let frame = encode_frame(&ClientRequest::BlobUpload(BlobUploadRequest {
        size: declared,
    }))
    .unwrap();
    send.write_all(&frame).await.unwrap();
    // The server may refuse before everything is written.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let response = recv.read_to_end(4096).await.unwrap();
    let body = roost_protocol::frame::decode_body::<roost_protocol::messages::Response>(
        response.get(4..).unwrap(),
    )
    .unwrap();
    match body {
        roost_protocol::messages::Response::Error(err) => err.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn hostile_transfers_get_typed_errors_store_nothing_and_leave_the_connection_usable() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.blobs.stall_timeout_ms = 300;
    let server = start(cfg).await;
    let (_alice, _client, conn) = new_client(&server, "alice").await;

    // More bytes than declared, fewer bytes than declared.
    assert_eq!(
        raw_upload(&conn, 10, &[7u8; 20]).await,
        ErrorCode::BLOB_SIZE_MISMATCH
    );
    assert_eq!(
        raw_upload(&conn, 100, &[7u8; 20]).await,
        ErrorCode::BLOB_SIZE_MISMATCH
    );
    // A stream cut in the middle of an upload.
    let mut cut = conn.start_blob_upload(10 * MIB as u64).await.unwrap();
    cut.write(&pseudo_random(3 * MIB, 5)).await.unwrap();
    cut.abort();
    // An upload whose bytes stop arriving.
    let mut stalled = conn.start_blob_upload(1000).await.unwrap();
    stalled.write(&[1u8; 10]).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), stalled.finish_after_stall())
        .await
        .unwrap();
    assert_eq!(err, ErrorCode::REQUEST_TIMEOUT);

    // Nothing of these is visible, and their temporary files are gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while temp_files(dir.path()) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "temporary files stay"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(visible_blobs(dir.path()).is_empty());

    // The connection still works.
    let bytes = pseudo_random(1000, 9);
    let stored = upload(&conn, &bytes).await.unwrap();

    // A range past the end.
    assert_eq!(
        code(download(&conn, &stored.blob, 1001, None).await.unwrap_err()),
        ErrorCode::BLOB_RANGE_NOT_SATISFIABLE
    );
    // Someone else's blob without its read token: indistinguishable from no blob.
    let (_eve, _eve_client, eve) = new_client(&server, "eve").await;
    let mut guessed = stored.blob.clone();
    guessed.token = [0u8; 32];
    assert_eq!(
        code(download(&eve, &guessed, 0, None).await.unwrap_err()),
        ErrorCode::BLOB_NOT_FOUND
    );
    let mut unknown = stored.blob.clone();
    unknown.address = sha256(b"never uploaded");
    assert_eq!(
        code(download(&eve, &unknown, 0, None).await.unwrap_err()),
        ErrorCode::BLOB_NOT_FOUND
    );
    // Without authentication, neither upload nor download.
    let anonymous = connect(&server).await;
    assert_eq!(
        code(upload(&anonymous, b"x").await.unwrap_err()),
        ErrorCode::UNAUTHENTICATED
    );
    assert_eq!(
        code(
            download(&anonymous, &stored.blob, 0, None)
                .await
                .unwrap_err()
        ),
        ErrorCode::UNAUTHENTICATED
    );
    assert!(download(&conn, &stored.blob, 0, None).await.unwrap() == bytes);
    assert_eq!(visible_blobs(dir.path()).len(), 1);
    server.shutdown().await;
}

trait FinishAfterStall {
    async fn finish_after_stall(self) -> ErrorCode;
}

impl FinishAfterStall for roost_client::transport::BlobUpload {
    /// Waits (writing nothing more) for the server to give up on the upload.
    async fn finish_after_stall(mut self) -> ErrorCode {
        // Nothing for longer than the stall timeout; then writing again, once the server
        // stopped reading, returns its answer.
        tokio::time::sleep(Duration::from_secs(1)).await;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Err(err) = self.write(&[1u8]).await {
                return code(err);
            }
        }
    }
}

#[tokio::test]
async fn a_flood_of_small_uploads_is_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.blobs.upload_burst = 5;
    cfg.blobs.upload_rate_per_minute = 1;
    let server = start(cfg).await;
    let (_alice, _client, conn) = new_client(&server, "alice").await;
    for i in 0..5u8 {
        upload(&conn, &[i]).await.unwrap();
    }
    for i in 5..20u8 {
        assert_eq!(
            code(upload(&conn, &[i]).await.unwrap_err()),
            ErrorCode::RATE_LIMITED
        );
    }
    assert_eq!(visible_blobs(dir.path()).len(), 5);
    server.shutdown().await;
}

#[tokio::test]
async fn blobs_expire_after_the_configured_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.blobs.expiry_secs = 3600;
    let clock = ManualClock::new();
    let server = start_with_clock(cfg, &clock).await;
    let (_alice, _client, conn) = new_client(&server, "alice").await;
    let stored = upload(&conn, b"soon gone").await.unwrap();
    assert!(stored.expires_at >= now_secs() + 3500);
    assert_eq!(
        download(&conn, &stored.blob, 0, None).await.unwrap(),
        b"soon gone"
    );
    clock.advance(Duration::from_secs(3601));
    assert_eq!(
        code(download(&conn, &stored.blob, 0, None).await.unwrap_err()),
        ErrorCode::BLOB_NOT_FOUND
    );
    server.shutdown().await;
}

/// Starts the `roost` binary with `args` (after `serve`) and waits until it listens.
pub fn spawn_roost(args: &[&std::ffi::OsStr]) -> std::process::Child {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_roost"))
        .arg("serve")
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("homeserver listening") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "roost exited");
    }
    // Its log goes on until it exits: keep reading it.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    child
}

/// Registers alice on the server at `port` (certificate in `cert`), logs her client in and
/// starts uploading 32 MiB of which 8 are sent.
pub async fn upload_in_progress(
    port: std::net::SocketAddr,
    cert: &Path,
) -> (TestClient, roost_client::transport::BlobUpload) {
    use roost_client::transport::{ConnectConfig, Endpoint, TrustConfig};
    let certs = roost_client::transport::load_certificates_pem(cert).unwrap();
    let endpoint = Endpoint::for_server(port).unwrap();
    let config = ConnectConfig::new(port, DOMAIN, TrustConfig::PinnedCertificates(certs));
    let conn = endpoint.connect(&config).await.unwrap();
    let user = register(&conn, "alice").await;
    let client = add_client(&conn, &user, "phone").await;
    login(&conn, &client).await;
    let mut upload = conn.start_blob_upload(32 * MIB as u64).await.unwrap();
    upload.write(&pseudo_random(8 * MIB, 3)).await.unwrap();
    (client, upload)
}

/// Kills `child` as soon as `in_progress` says its upload reached storage, then drops the
/// upload.
pub async fn kill_when(
    child: &mut std::process::Child,
    upload: roost_client::transport::BlobUpload,
    in_progress: impl Fn() -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !in_progress() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no upload in progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    upload.abort();
}

#[test]
fn a_server_killed_mid_upload_leaves_no_visible_blob_and_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let port_arg = port.to_string();
    let mut child = spawn_roost(&[
        "--data".as_ref(),
        data.as_os_str(),
        "--listen".as_ref(),
        port_arg.as_ref(),
        "--domain".as_ref(),
        DOMAIN.as_ref(),
    ]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (_client, upload) =
            upload_in_progress(port, &data.join(roost_server::identity::CERT_FILE)).await;
        // Killed once the bytes reached the server's temporary file.
        kill_when(&mut child, upload, || {
            std::fs::read_dir(data.join("blobs").join("tmp"))
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().len())
                .sum::<u64>()
                > 0
        })
        .await;
    });
    assert!(visible_blobs(&data).is_empty());
    // At the next start, what the killed process left is removed.
    runtime.block_on(async {
        let server = start(config(&data)).await;
        assert!(visible_blobs(&data).is_empty());
        assert_eq!(temp_files(&data), 0);
        server.shutdown().await;
    });
}

/// `roost admin backup` copies the blob files too: a server started on the backup serves the
/// blobs uploaded before it, byte for byte, under their references.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_holds_the_blobs_and_a_server_started_on_it_serves_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(config(&data)).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    let blobs: Vec<Vec<u8>> = vec![pseudo_random(3 * MIB + 1, 31), Vec::new(), vec![7]];
    let mut stored = Vec::new();
    for bytes in &blobs {
        stored.push(upload(&conn, bytes).await.unwrap().blob);
    }
    let backup = dir.path().join("backup");
    let out = crate::admin::admin_json(&data, &["backup", backup.to_str().unwrap()]).await;
    let files: Vec<&str> = out["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(files.contains(&"blobs/"), "{files:?}");
    server.shutdown().await;
    assert_eq!(visible_blobs(&backup), visible_blobs(&data));
    assert_eq!(temp_files(&backup), 0);

    // The original is gone; the backup is the data directory now.
    std::fs::remove_dir_all(&data).unwrap();
    let server = start(config(&backup)).await;
    let conn = connect(&server).await;
    login(&conn, &phone).await;
    for (bytes, blob) in blobs.iter().zip(&stored) {
        let back = download(&conn, blob, 0, None).await.unwrap();
        assert_eq!(sha256(&back), blob.address);
        assert!(back == *bytes);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn the_quota_holds_across_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.blobs.quota_per_user = 3 * MIB as u64 / 2;
    let server = start(cfg.clone()).await;
    let (_alice, phone, conn) = new_client(&server, "alice").await;
    let first = upload(&conn, &pseudo_random(MIB, 41)).await.unwrap();
    server.shutdown().await;
    // The clean shutdown left the count; the start takes it (and removes it).
    let snapshot = dir.path().join("blobs").join("tmp").join("usage.json");
    assert!(snapshot.exists());

    let server = start(cfg).await;
    let conn = connect(&server).await;
    login(&conn, &phone).await;
    assert_eq!(
        code(upload(&conn, &pseudo_random(MIB, 42)).await.unwrap_err()),
        ErrorCode::BLOB_QUOTA_EXCEEDED
    );
    upload(&conn, &pseudo_random(MIB / 4, 43)).await.unwrap();
    assert!(download(&conn, &first.blob, 0, None).await.unwrap() == pseudo_random(MIB, 41));
    assert_eq!(visible_blobs(dir.path()).len(), 2);
    server.shutdown().await;
}
