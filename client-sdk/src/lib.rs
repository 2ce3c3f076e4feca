//! roost client SDK.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod config;
mod credential;
mod error;
mod event;
mod mls;
mod store;
pub mod transport;

pub use client::{Client, UserKey};
pub use config::ClientConfig;
pub use error::ClientError;
pub use event::Event;
pub use store::StoreError;
