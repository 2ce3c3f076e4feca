//! roost client SDK.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod event;
mod mls;
mod store;
pub mod transport;

pub use event::Event;
pub use store::StoreError;
