//! End-to-end tests of one homeserver over real QUIC on 127.0.0.1:0: Authentication,
//! KeyPackage and Queuing services, restart, and hostile input. One test binary, so openmls is
//! linked once.
#![allow(clippy::unwrap_used, unreachable_pub)]

mod auth;
mod bad_input;
mod common;
mod delivery;
mod federation;
mod keypackages;
mod mls_member;
mod mls_member_external;
mod multinode;
mod operations;
mod pki;
mod queue;
mod restart;
