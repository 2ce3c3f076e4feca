//! End-to-end tests of one homeserver over real QUIC on 127.0.0.1:0: Authentication,
//! KeyPackage and Queuing services, restart, hostile input, and the `roost` binary's errors
//! and logs. One test binary, so openmls is linked once.
#![allow(clippy::unwrap_used, unreachable_pub)]

mod admin;
mod auth;
mod bad_input;
mod binary;
mod blob;
mod blob_postgres;
mod blob_proxy;
mod common;
mod delivery;
mod federation;
mod group_info_rules;
mod idempotency;
mod keypackages;
mod metrics;
mod mls_member;
mod mls_member_external;
mod multinode;
mod operations;
mod pki;
mod push;
mod push_receiver;
mod queue;
mod restart;
mod store_faults;
