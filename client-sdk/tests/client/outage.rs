//! The homeserver crashes (no CONNECTION_CLOSE, like SIGKILL) and comes back on the same port
//! and data directory: a listening client must get new messages long before its QUIC idle
//! timeout (30 s) would have told it that its connection is gone.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use roost_client::transport::{ConnectConfig, TrustConfig};
use roost_client::{Client, ClientConfig};
use roost_server::Server;
use roost_server::config::Config;
use rustls::pki_types::CertificateDer;

use crate::common::{DOMAIN, user, wait_joined, wait_message};

/// Far below the 30 s idle timeout that the client needed before.
const RECOVERY_BOUND: Duration = Duration::from_secs(15);
/// The clients' keep-alive: an idle listener sends nothing else, so this is how soon its
/// dead connection meets the restarted server (which answers with a stateless reset).
const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// A homeserver on its own runtime, so that it can be made to vanish without a word.
struct CrashableServer {
    runtime: Option<tokio::runtime::Runtime>,
    server: Option<Server>,
    addr: SocketAddr,
    certificate: CertificateDer<'static>,
    data_dir: PathBuf,
}

impl CrashableServer {
    /// A new server with its data in `dir/server`, on a port it can be restarted on.
    async fn start_in(dir: &std::path::Path) -> Self {
        let addr = roost_server::testing::restartable_addr().unwrap();
        Self::start(addr, dir.join("server")).await
    }

    async fn start(listen: SocketAddr, data_dir: PathBuf) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let dir = data_dir.clone();
            let started = tokio::task::spawn_blocking(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                let config = Config {
                    domain: DOMAIN.into(),
                    listen,
                    data_dir: dir,
                    ..Config::default()
                };
                let settings = config.validate().unwrap();
                runtime
                    .block_on(Server::start(settings))
                    .map(|server| (runtime, server))
            })
            .await
            .unwrap();
            match started {
                Ok((runtime, server)) => {
                    return Self {
                        addr: server.local_addr(),
                        certificate: server.certificate().clone(),
                        runtime: Some(runtime),
                        server: Some(server),
                        data_dir,
                    };
                }
                // The crashed instance may still be letting go of the port or the database.
                Err(err) if Instant::now() < deadline => {
                    eprintln!("restart failed, retrying: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => panic!("cannot start the homeserver: {err}"),
            }
        }
    }

    /// Drops the runtime (its tasks are never polled again, so nothing is sent), then the
    /// server: the socket and the database are released without a goodbye.
    async fn crash(mut self) -> (SocketAddr, PathBuf) {
        let runtime = self.runtime.take();
        let server = self.server.take();
        tokio::task::spawn_blocking(move || {
            drop(runtime);
            drop(server);
        })
        .await
        .unwrap();
        (self.addr, self.data_dir.clone())
    }

    fn client_config(&self) -> ClientConfig {
        let trust = TrustConfig::PinnedCertificates(vec![self.certificate.clone()]);
        let mut connect = ConnectConfig::new(self.addr, DOMAIN, trust);
        connect.keep_alive_interval = Some(KEEP_ALIVE);
        let mut config = ClientConfig::new(connect);
        config.key_package_target = 3;
        config.key_package_low_water = 2;
        config
    }
}

impl Drop for CrashableServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// alice and bob registered on `server` (profiles `alice.redb`, `bob.redb` in `dir`), in a
/// group of alice's that bob has joined.
async fn alice_and_bob(
    server: &CrashableServer,
    dir: &std::path::Path,
) -> (Client, Client, roost_protocol::GroupId) {
    let register = |name: &'static str| {
        Client::register(
            server.client_config(),
            dir.join(format!("{name}.redb")),
            user(name),
            "phone".parse().unwrap(),
        )
    };
    let alice = register("alice").await.unwrap();
    let bob = register("bob").await.unwrap();
    let group = alice.create_group().await.unwrap();
    alice.invite(&group, &[user("bob")]).await.unwrap();
    assert_eq!(wait_joined(&bob).await, group);
    (alice, bob, group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_recovers_quickly_after_a_server_crash() {
    let dir = tempfile::tempdir().unwrap();
    let server = CrashableServer::start_in(dir.path()).await;
    let (alice, bob, group) = alice_and_bob(&server, dir.path()).await;
    let alice_path = dir.path().join("alice.redb");
    alice.send(&group, b"before").await.unwrap();
    assert_eq!(wait_message(&bob, &group).await.1, b"before");
    alice.close().await;

    let (addr, data_dir) = server.crash().await;
    let crashed = Instant::now();
    let server = CrashableServer::start(addr, data_dir).await;
    assert_eq!(server.addr, addr);

    let alice = Client::open(server.client_config(), &alice_path)
        .await
        .unwrap();
    alice.send(&group, b"after the crash").await.unwrap();
    let received = tokio::time::timeout(RECOVERY_BOUND, wait_message(&bob, &group))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "bob got nothing {:?} after the crash (the listener kept its dead connection)",
                crashed.elapsed()
            )
        });
    assert_eq!(received.1, b"after the crash");
    eprintln!(
        "bob got the message {:?} after the crash",
        crashed.elapsed()
    );
    bob.close().await;
    alice.close().await;
}

/// The homeserver crashes a quarter into an upload from a file and comes back: `send_file`
/// uploads the file again from its start (progress starts again from 0) and the attachment
/// arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_by_a_server_crash_is_uploaded_again_from_the_file() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use roost_client::{DownloadTarget, FileSource};

    use crate::files::{next_attachment, pseudo_random};

    let dir = tempfile::tempdir().unwrap();
    let server = CrashableServer::start_in(dir.path()).await;
    let (alice, bob, group) = alice_and_bob(&server, dir.path()).await;

    let bytes = pseudo_random(8 * 1024 * 1024 + 5, 7);
    let path = dir.path().join("voice.ogg");
    std::fs::write(&path, &bytes).unwrap();
    // The upload stops (in its progress callback) a quarter in until the server has crashed
    // and come back, so the crash lands mid-upload whatever the machine's speed.
    let quarter = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sending = {
        let (quarter, restarted) = (quarter.clone(), restarted.clone());
        let (seen, group) = (seen.clone(), group.clone());
        tokio::spawn(async move {
            let source = FileSource::path(&path).await.unwrap();
            let progress = |done: u64, total: u64| {
                if done >= total / 4 && !quarter.swap(true, Ordering::SeqCst) {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while !restarted.load(Ordering::SeqCst) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                seen.lock().unwrap().push(done);
            };
            alice
                .send_file(&group, source, progress)
                .await
                .map(|sent| (sent, alice))
        })
    };
    while !quarter.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (addr, data_dir) = server.crash().await;
    let server = CrashableServer::start(addr, data_dir).await;
    restarted.store(true, Ordering::SeqCst);

    let ((_, sent), alice) = tokio::time::timeout(Duration::from_secs(60), sending)
        .await
        .expect("the upload ended")
        .unwrap()
        .expect("send_file uploaded the file again after the crash");
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.windows(2).any(|pair| pair[1] < pair[0]),
        "the upload did not start again: {seen:?}"
    );
    assert_eq!(
        seen.last().copied(),
        Some(roost_client::attachment::ciphertext_len(bytes.len() as u64))
    );

    let got = next_attachment(&bob, &group).await;
    assert_eq!(got, sent);
    let target = dir.path().join("received.ogg");
    bob.download(&got, DownloadTarget::Path(target.clone()), |_, _| {})
        .await
        .unwrap();
    assert!(std::fs::read(&target).unwrap() == bytes, "the file differs");
    alice.close().await;
    bob.close().await;
    drop(server);
}
