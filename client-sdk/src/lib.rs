//! roost client SDK.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod transport;
