//! Integration tests of the high-level client against an in-process homeserver over real
//! QUIC on 127.0.0.1. One binary, so openmls is linked once.

// Test helpers outside `#[test]` functions may panic on setup failures.
#![allow(clippy::unwrap_used)]

mod common;
mod content;
mod crash;
mod failover;
mod forged;
mod groups;
mod minimal;
mod outage;
mod outbox;
mod profile;
