//! roost-interop: several real roost homeservers on 127.0.0.1 that federate with each other,
//! and what runs against them.
//!
//! - [`harness`]: starts N `roost` processes with a CA and certificates made here ([`pki`]),
//!   a configuration per server whose peer table points at the others, and stops, kills and
//!   restarts any of them on the same port and data directory.
//! - [`binary`]: finds or builds the `roost` binary.
//! - [`scenarios`]: the federation scenario suite (SDK clients, one fresh set of servers per
//!   scenario), used by `roost-interop run` and by the workspace's end-to-end tests.
//! - [`member`]: an SDK client with its events collected, as scenarios use it; [`raw`]:
//!   connections below the SDK (raw authenticated clients, peer homeservers).
//! - [`demo`]: a short conversation across two homeservers, printed as it happens.
//! - [`postgres`]: a throwaway PostgreSQL cluster (tests, `--backend postgres`).
//! - [`chaos`]: kill -9 and restart homeservers under real client traffic and check every
//!   acknowledged message arrives exactly once (`roost-interop chaos`).
//! - [`bench`]: the load generator (`roost-interop bench`), its workloads and baselines.
#![forbid(unsafe_code)]

pub mod bench;
pub mod binary;
pub mod chaos;
pub mod demo;
pub mod harness;
pub mod member;
pub mod pki;
pub mod postgres;
pub mod raw;
pub mod scenarios;
