//! The roost wire protocol: ids, frames, every request and response, and error codes.
//!
//! This crate is pure: it encodes, decodes and validates bytes and does no I/O. docs/PROTOCOL.md
//! is the normative description of everything here.
//!
//! ```
//! use roost_protocol::frame::{decode_body, encode_frame};
//! use roost_protocol::messages::{ClientRequest, auth::DiscoverUserRequest};
//!
//! let request = ClientRequest::DiscoverUser(DiscoverUserRequest {
//!     user: "alice@example.org".parse().unwrap(),
//! });
//! let frame = encode_frame(&request).unwrap();
//! assert_eq!(decode_body::<ClientRequest>(&frame[4..]).unwrap(), request);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod content;
pub mod error;
pub mod frame;
pub mod ids;
pub mod messages;
pub mod opaque;

/// ALPN of client connections.
pub const ALPN_CLIENT: &[u8] = b"roost/1";
/// ALPN of server-to-server (federation) connections.
pub const ALPN_FEDERATION: &[u8] = b"roost-fed/1";
/// Default UDP port of a homeserver.
pub const DEFAULT_PORT: u16 = 4433;

pub use error::{ErrorCode, ErrorDetail, WireError};
pub use ids::{ClientId, DeviceName, Domain, GroupId, IdError, MessageId, UserId, UserName};
pub use opaque::Opaque;
