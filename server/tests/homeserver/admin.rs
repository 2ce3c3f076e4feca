//! `roost admin` against a real homeserver: through the admin socket while it runs, on the
//! store directly while it is stopped, refusing a directory that holds no homeserver, and a
//! backup taken under writes that a fresh server starts on.

use std::path::Path;
use std::process::Command;

use roost_client::transport::RequestError;
use roost_protocol::ErrorCode;
use roost_protocol::messages::auth::DiscoverUserRequest;
use roost_protocol::messages::queue::*;
use roost_protocol::{GroupId, MessageId};

use crate::common::*;

const ROOST: &str = env!("CARGO_BIN_EXE_roost");

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `roost admin --data DATA ARGS...` off the runtime (the server runs on it).
async fn admin(data: &Path, args: &[&str]) -> Out {
    let mut command = Command::new(ROOST);
    command
        .arg("admin")
        .arg("--data")
        .arg(data)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("ROOST_DATABASE_URL");
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    Out {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

async fn admin_ok(data: &Path, args: &[&str]) -> String {
    let out = admin(data, args).await;
    assert_eq!(out.code, Some(0), "{args:?}: {}", out.stderr);
    out.stdout
}

pub(crate) async fn admin_json(data: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&admin_ok(data, &all).await).unwrap()
}

fn code<T: std::fmt::Debug>(result: Result<T, RequestError>) -> ErrorCode {
    match result {
        Err(RequestError::Server(err)) => err.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

fn payload(n: u8) -> QueuePayload {
    let group: GroupId = "2f1c0d3e-8a5b-4c7d-9e0f-112233445566@example.org"
        .parse()
        .unwrap();
    QueuePayload::GroupMessage(GroupMessage {
        group,
        message: vec![n; 10].into(),
    })
}

fn fetch_all() -> QueueFetchRequest {
    QueueFetchRequest {
        after_seq: 0,
        max_messages: 1000,
        max_bytes: 1 << 24,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_reach_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let server = start(config(data)).await;
    let (alice, phone, alice_conn) = new_client(&server, "alice").await;
    let laptop = add_client(&alice_conn, &alice, "laptop").await;
    let (_bob, _bob_phone, bob_conn) = new_client(&server, "bob").await;

    // The socket is the owner's only.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(data.join(roost_server::admin::SOCKET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let table = admin_ok(data, &["user", "list"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("USER"), "{table}");
    assert!(
        lines[1].starts_with("alice") && lines[1].contains(" 2 "),
        "{table}"
    );
    assert!(
        lines[2].starts_with("bob") && lines[2].contains(" 1 "),
        "{table}"
    );
    let users = admin_json(data, &["user", "list"]).await;
    assert_eq!(users["users"][0]["name"], "alice");
    assert_eq!(users["users"][0]["clients"], 2);
    assert_eq!(users["users"][0]["deactivated"], false);

    let devices = admin_json(data, &["device", "list", "alice"]).await;
    let names: Vec<&str> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["laptop", "phone"]);

    // Removing a device cuts its connection off and frees nothing.
    let laptop_conn = connect(&server).await;
    login(&laptop_conn, &laptop).await;
    assert!(laptop_conn.call(fetch_all()).await.is_ok());
    let removed = admin_ok(data, &["device", "remove", "alice", "laptop"]).await;
    assert!(removed.contains("alice@example.org/laptop"), "{removed}");
    assert_eq!(
        code(laptop_conn.call(fetch_all()).await),
        ErrorCode::CLIENT_NOT_FOUND
    );
    let again = admin(data, &["device", "remove", "alice", "laptop"]).await;
    assert_eq!(again.code, Some(1));
    assert!(again.stderr.starts_with("error: ") && again.stderr.lines().count() == 1);
    assert_eq!(
        code(
            alice_conn
                .call(add_client_request(&alice, &laptop.id, &keypair()))
                .await
        ),
        ErrorCode::CLIENT_EXISTS
    );

    server
        .enqueue(&phone.id, MessageId([1; 16]), payload(1))
        .await
        .unwrap();
    let stats = admin_json(data, &["stats"]).await;
    assert_eq!(stats["domain"], DOMAIN);
    assert_eq!(
        (
            &stats["users"],
            &stats["clients"],
            &stats["queued_messages"]
        ),
        (&2.into(), &2.into(), &1.into())
    );
    assert!(admin_ok(data, &["stats"]).await.contains("QUEUED"));

    // Deactivation: alice's connection is cut off, her devices are gone, the name stays taken
    // and her user key adds nothing any more.
    assert!(alice_conn.call(fetch_all()).await.is_ok());
    let out = admin_ok(data, &["user", "deactivate", "alice"]).await;
    assert!(out.contains("1 device"), "{out}");
    assert_eq!(
        code(alice_conn.call(fetch_all()).await),
        ErrorCode::CLIENT_NOT_FOUND
    );
    assert_eq!(
        code(
            bob_conn
                .call(DiscoverUserRequest {
                    user: alice.id.clone()
                })
                .await
        ),
        ErrorCode::USER_NOT_FOUND
    );
    let fresh = connect(&server).await;
    assert_eq!(
        code(
            fresh
                .call(register_request(&alice.id, &keypair(), None))
                .await
        ),
        ErrorCode::USER_EXISTS
    );
    let tablet = "alice@example.org/tablet".parse().unwrap();
    assert_eq!(
        code(
            fresh
                .call(add_client_request(&alice, &tablet, &keypair()))
                .await
        ),
        ErrorCode::BAD_SIGNATURE
    );
    let shown = admin_json(data, &["user", "show", "alice@example.org"]).await;
    assert_eq!(shown["user"]["deactivated"], true);
    assert_eq!(shown["devices"].as_array().unwrap().len(), 0);
    let stats = admin_json(data, &["stats"]).await;
    assert_eq!(
        (&stats["clients"], &stats["deactivated_users"]),
        (&1.into(), &1.into())
    );

    let unknown = admin(data, &["user", "show", "carol"]).await;
    assert_eq!(unknown.code, Some(1));
    assert!(
        unknown.stderr.contains("no user carol"),
        "{}",
        unknown.stderr
    );
    server.shutdown().await;
    assert!(!data.join(roost_server::admin::SOCKET_FILE).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_work_while_the_server_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let server = start(config(data)).await;
    let (alice, phone, _conn) = new_client(&server, "alice").await;
    let (_bob, _bob_phone, _bob_conn) = new_client(&server, "bob").await;
    server.shutdown().await;

    let users = admin_json(data, &["user", "list"]).await;
    assert_eq!(users["users"].as_array().unwrap().len(), 2);
    let devices = admin_ok(data, &["device", "list", "alice"]).await;
    assert!(devices.contains("alice@example.org/phone"), "{devices}");
    let stats = admin_json(data, &["stats"]).await;
    assert_eq!(stats["clients"], 2);
    admin_ok(data, &["user", "deactivate", "alice"]).await;

    // The server started again knows: alice's device cannot log in, her name stays taken.
    let server = start(config(data)).await;
    let conn = connect(&server).await;
    let denied = conn
        .authenticate(&phone.id, |input| sign(&phone.key, input))
        .await;
    assert!(denied.is_err(), "a deactivated user's device logged in");
    assert_eq!(
        code(
            conn.call(register_request(&alice.id, &keypair(), None))
                .await
        ),
        ErrorCode::USER_EXISTS
    );
    // And the running server answers the same command through its socket.
    let users = admin_json(data, &["user", "list"]).await;
    assert_eq!(users["users"][0]["deactivated"], true);
    server.shutdown().await;
}

#[tokio::test]
async fn admin_refuses_a_directory_without_a_homeserver() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("nothing-here");
    std::fs::create_dir(&empty).unwrap();
    let never = dir.path().join("never");
    let never_text = never.to_str().unwrap();
    for args in [
        &["token", "create"][..],
        &["user", "list"],
        &["stats"],
        &["backup", never_text],
    ] {
        let out = admin(&empty, args).await;
        assert_eq!(out.code, Some(1), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {}", out.stdout);
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.starts_with("error: no homeserver in"),
            "{}",
            out.stderr
        );
        assert!(out.stderr.contains("--data"), "{}", out.stderr);
    }
    assert_eq!(
        std::fs::read_dir(&empty).unwrap().count(),
        0,
        "files were created"
    );
    assert!(!never.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_tokens_are_listed_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let mut config = config(data);
    config.require_registration_token = true;
    let server = start(config).await;
    let first = admin_ok(data, &["token", "create", "--uses", "2"]).await;
    let first = first.trim();
    let second = admin_ok(data, &["token", "create"]).await;
    let second = second.trim();
    let conn = connect(&server).await;
    let alice: roost_protocol::UserId = "alice@example.org".parse().unwrap();
    conn.call(register_request(&alice, &keypair(), Some(first)))
        .await
        .unwrap();
    let tokens = admin_json(data, &["token", "list"]).await;
    let tokens = tokens["tokens"].as_array().unwrap().clone();
    assert_eq!(tokens.len(), 2);
    assert_eq!(
        (&tokens[0]["uses_allowed"], &tokens[0]["used"]),
        (&2.into(), &1.into())
    );
    assert_eq!(
        (&tokens[1]["uses_allowed"], &tokens[1]["used"]),
        (&1.into(), &0.into())
    );
    assert!(!admin_ok(data, &["token", "list"]).await.contains(first));

    // Revoked by its listed id and by its text: neither registers anyone any more.
    let id = tokens[0]["id"].as_str().unwrap();
    admin_ok(data, &["token", "revoke", id]).await;
    admin_ok(data, &["token", "revoke", second]).await;
    for (name, token) in [("bob", first), ("carol", second)] {
        let user = format!("{name}@example.org").parse().unwrap();
        assert_eq!(
            code(
                conn.call(register_request(&user, &keypair(), Some(token)))
                    .await
            ),
            ErrorCode::REGISTRATION_TOKEN_REQUIRED
        );
    }
    assert_eq!(
        admin_json(data, &["token", "list"]).await["tokens"],
        serde_json::json!([])
    );
    let missing = admin(data, &["token", "revoke", id]).await;
    assert_eq!(missing.code, Some(1));
    server.shutdown().await;
}

/// A backup taken while messages are being enqueued is a data directory a new server starts
/// on, holding the users and a gap-free prefix of every queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_writes_restores_into_a_working_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = std::sync::Arc::new(start(config(&data)).await);
    let (_alice, phone, _conn) = new_client(&server, "alice").await;
    let (_bob, _bob_phone, _bob_conn) = new_client(&server, "bob").await;
    for n in 1..=20u8 {
        server
            .enqueue(&phone.id, MessageId([n; 16]), payload(n))
            .await
            .unwrap();
    }
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (server, writing, phone) = (server.clone(), writing.clone(), phone.id.clone());
        tokio::spawn(async move {
            let mut n: u64 = 20;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&n.to_be_bytes());
                server
                    .enqueue(&phone, MessageId(id), payload(n as u8))
                    .await
                    .unwrap();
            }
            n
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let backup = dir.path().join("backup");
    let out = admin_json(&data, &["backup", backup.to_str().unwrap()]).await;
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(out["database_bytes"].as_u64().unwrap() > 0);
    assert!(written > 21, "no writes ran during the backup");
    let not_empty = admin(&data, &["backup", backup.to_str().unwrap()]).await;
    assert_eq!(not_empty.code, Some(1), "a backup over a backup");
    std::sync::Arc::into_inner(server).unwrap().shutdown().await;

    // Restore: the backup directory, copied as it is, is the new data directory.
    let restored = dir.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    for entry in std::fs::read_dir(&backup).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), restored.join(entry.file_name())).unwrap();
    }
    let server = start(config(&restored)).await;
    let users = admin_json(&restored, &["user", "list"]).await;
    let names: Vec<&str> = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    let conn = connect(&server).await;
    login(&conn, &phone).await;
    let fetched = conn.call(fetch_all()).await.unwrap();
    let seqs: Vec<u64> = fetched.messages.iter().map(|m| m.seq).collect();
    assert!(seqs.len() >= 20, "{} messages", seqs.len());
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "not a prefix"
    );
    assert_eq!(fetched.head_seq, seqs.len() as u64);
    assert_eq!(fetched.messages[4].payload, payload(5));
    server.shutdown().await;
}

/// PostgreSQL: `roost admin` opens the shared database itself (no node's socket), and the
/// deactivation reaches the node the user is connected to; the other node's socket answers
/// the same; backup names pg_dump instead of copying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_deactivation_reaches_every_node() {
    use roost_server::config::StorageBackend;

    let cluster = roost_interop::postgres::Cluster::start().expect("a PostgreSQL cluster");
    let url = cluster.create_database("roost").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let identity = dir.path().join("identity");
    let node_config = |name: &str| {
        let mut config = config(&dir.path().join(name));
        config.identity_dir = Some(identity.clone());
        config.storage.backend = StorageBackend::Postgres;
        config.storage.url = Some(url.clone());
        config.storage.pool_size = 4;
        config.storage.timeout_ms = 3_000;
        config
    };
    let a = start(node_config("a")).await;
    let b = start(node_config("b")).await;
    let (_alice, _phone, alice_on_b) = new_client(&b, "alice").await;
    let (_bob, _bob_phone, _bob_on_a) = new_client(&a, "bob").await;
    assert!(alice_on_b.call(fetch_all()).await.is_ok());

    // An operator's configuration: the database and identity, a data directory of no node.
    let admin_data = dir.path().join("admin");
    std::fs::create_dir(&admin_data).unwrap();
    let file = dir.path().join("roost.toml");
    std::fs::write(
        &file,
        format!(
            "domain = {DOMAIN:?}\nidentity_dir = {:?}\n[storage]\nbackend = \"postgres\"\nurl = {url:?}\n",
            identity.to_str().unwrap()
        ),
    )
    .unwrap();
    let config_args = ["--config", file.to_str().unwrap()];
    let mut args = config_args.to_vec();
    args.extend(["user", "deactivate", "alice"]);
    let out = admin_ok(&admin_data, &args).await;
    assert!(out.contains("1 device"), "{out}");

    // Node b hears it through the database's notifications and cuts alice off.
    let mut cut_off = false;
    for _ in 0..100 {
        match alice_on_b.call(fetch_all()).await {
            Err(RequestError::Server(err)) if err.code == ErrorCode::CLIENT_NOT_FOUND => {
                cut_off = true;
                break;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    assert!(
        cut_off,
        "node b still serves the deactivated user's connection"
    );

    // Node a's socket sees the same database.
    let stats = admin_json(&dir.path().join("a"), &["stats"]).await;
    assert_eq!(
        (
            &stats["users"],
            &stats["deactivated_users"],
            &stats["clients"]
        ),
        (&2.into(), &1.into(), &1.into())
    );
    let never = dir.path().join("never-written");
    let backup = admin(&dir.path().join("a"), &["backup", never.to_str().unwrap()]).await;
    assert_eq!(backup.code, Some(1));
    assert!(backup.stderr.contains("pg_dump"), "{}", backup.stderr);
    assert_eq!(backup.stderr.lines().count(), 1);
    assert!(!never.exists());
    a.shutdown().await;
    b.shutdown().await;
}
