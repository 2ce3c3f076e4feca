//! The harness's process control against real `roost` processes: servers.json, SIGKILL and
//! restart on the same port and data directory, graceful stop, and federation afterwards.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use roost_client::transport::Endpoint;
use roost_interop::harness::{Harness, HarnessConfig, ServersFile};
use roost_interop::member::Member;
use roost_interop::raw::RawClient;
use roost_protocol::messages::auth::DiscoverUserRequest;

#[test]
fn servers_are_killed_stopped_and_restarted_in_place() {
    let roost = common::roost();
    common::runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::start(HarnessConfig::new(&roost, dir.path(), 2))
            .await
            .unwrap();

        // servers.json describes what runs.
        let path = h.write_servers_json().unwrap();
        let file: ServersFile =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(file, h.servers_file());
        let domains: Vec<&str> = file.servers.iter().map(|s| s.domain.as_str()).collect();
        assert_eq!(domains, ["alpha.test", "beta.test"]);
        for server in &file.servers {
            assert!(server.address.ip().is_loopback());
            assert!(server.certificate.is_file() && server.data_dir.is_dir());
            assert!(server.pid.is_some());
        }
        let config = std::fs::read_to_string(&h.servers()[0].config_file).unwrap();
        assert!(
            config.contains("[federation.peers.\"beta.test\"]"),
            "{config}"
        );

        let profiles = dir.path().join("profiles");
        std::fs::create_dir_all(&profiles).unwrap();
        let bob = Member::register(
            h.client_config(1).unwrap(),
            &profiles,
            "bob@beta.test",
            "phone",
        )
        .await
        .unwrap();
        let beta_addr = h.servers()[1].addr;

        // SIGKILL: the process is gone, its port answers nothing.
        h.kill(1).unwrap();
        assert!(!h.is_running(1));
        let endpoint = Endpoint::for_server(beta_addr).unwrap();
        let mut probe = h.connect_config(1).unwrap();
        probe.connect_timeout = Duration::from_millis(300);
        assert!(endpoint.connect(&probe).await.is_err());

        // Restarted on the same port with the same data: bob is still registered.
        h.restart(1).await.unwrap();
        assert_eq!(h.servers()[1].addr, beta_addr);
        let scout = RawClient::register(&h.connect_config(0).unwrap(), "scout@alpha.test")
            .await
            .unwrap();
        let found = scout
            .conn
            .call(DiscoverUserRequest {
                user: bob.user().clone(),
            })
            .await
            .unwrap();
        assert_eq!(found.clients, vec![bob.client().credential().clone()]);

        // SIGTERM: a graceful shutdown exits with success; alpha comes back too.
        let status = h.stop(0).await.unwrap();
        assert!(status.success(), "{status}");
        assert!(
            h.stop(0).await.is_err(),
            "stopping a stopped server is an error"
        );
        h.restart(0).await.unwrap();
        let scout = RawClient::register(&h.connect_config(0).unwrap(), "scout2@alpha.test")
            .await
            .unwrap();
        scout
            .conn
            .call(DiscoverUserRequest {
                user: bob.user().clone(),
            })
            .await
            .unwrap();
        let log = std::fs::read_to_string(&h.servers()[0].log_file).unwrap();
        assert!(log.contains("homeserver listening"), "{log}");
        // The log is a file, not a terminal: plain text, no colour codes.
        assert!(!log.contains('\x1b'), "{log}");
        assert!(log.contains("=== roost-interop: start 2 ==="));

        bob.close().await;
        endpoint.close();
        h.shutdown().await.unwrap();
    });
}
