//! The server's clock: every decision the services make by time (credential validity and
//! renewal, KeyPackage lifetimes, queue message age, the expiry sweep's cutoffs, rate
//! limiters' refill) reads it from `State` rather than from the system. The type is the
//! SDK's, so one [`ManualClock`] can drive both in a test.

pub use roost_client::clock::{Clock, ManualClock};
