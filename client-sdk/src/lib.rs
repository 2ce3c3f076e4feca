//! roost client SDK: an async (tokio) client for roost homeservers, with end-to-end
//! encrypted MLS (RFC 9420) groups.
//!
//! A [`Client`] is one device of one user. It keeps everything in one local database file
//! (the *profile*): its keys, the openmls state of every group and the SDK's own state, so an
//! app restart ([`Client::open`]) continues every conversation.
//!
//! - Enrollment: [`Client::register`] (new user and first device), [`Client::add_device`]
//!   (another device of an existing user, with the [`UserKey`] from a device that has it).
//! - Groups: [`Client::create_group`], [`Client::invite`] (by user: every device of the user
//!   is added), [`Client::remove_users`], [`Client::send_text`] and [`Client::send_content`]
//!   (application messages, a [`Content`] each: PROTOCOL.md §4.5), [`Client::leave_group`],
//!   [`Client::rejoin_group`] (external commit after lost state), [`Client::groups`],
//!   [`Client::members`].
//! - Events: [`Client::next_event`] (or the stream [`Client::events`]) yields each [`Event`] (messages, joins, membership
//!   changes, refused credentials, group errors) at least once, across restarts.
//! - A background listener processes the client's queue as messages arrive (or call
//!   [`Client::sync`]); KeyPackages are replenished automatically.
//! - Every new member's MLS credential is checked against the AS credential of its ClientId
//!   before it is accepted; a commit that loses against a concurrent one is rebuilt on the new
//!   epoch and sent again, invisibly to the caller.
//!
//! docs/CLIENT.md describes the design (storage, crash safety, retries); docs/PROTOCOL.md the
//! wire protocol. The [`transport`] module is the QUIC request layer underneath, also used by
//! the homeserver for federation.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use roost_client::transport::{ConnectConfig, TrustConfig};
//! use roost_client::{Client, ClientConfig, Content, Event};
//!
//! let trust = TrustConfig::pinned_from_pem_file("server-cert.pem")?;
//! let connect = ConnectConfig::new("127.0.0.1:4433".parse()?, "example.org", trust);
//! let alice = Client::register(
//!     ClientConfig::new(connect),
//!     "alice-phone.roost",
//!     "alice@example.org".parse()?,
//!     "phone".parse()?,
//! )
//! .await?;
//!
//! let group = alice.create_group().await?;
//! alice.invite(&group, &["bob@example.org".parse()?]).await?;
//! alice.send_text(&group, "hello bob").await?;
//!
//! loop {
//!     match alice.next_event().await? {
//!         event @ Event::Message { .. } => match event.content() {
//!             Some(Ok(Content::Text(text))) => println!("{}: {text}", event.group()),
//!             // A newer kind of content, or bytes that are no MessageContent: not an error.
//!             _ => println!("{}: (a message this app cannot show)", event.group()),
//!         },
//!         Event::CredentialRejected { client, reason, .. } => {
//!             eprintln!("refused {client:?}: {reason}");
//!         }
//!         other => println!("{other:?}"),
//!     }
//! }
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
pub mod clock;
mod config;
mod credential;
mod error;
mod event;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod mls;
mod outgoing;
mod store;
pub mod transport;

pub use client::{Client, UserKey};
pub use config::ClientConfig;
pub use error::ClientError;
pub use event::Event;
pub use outgoing::{MessageId, MessageIdError, OutgoingMessage, OutgoingState, SendFailure};
pub use roost_protocol::content::{Content, ContentError, ContentType};
pub use store::StoreError;

/// The identifiers apps handle (users, devices, clients, groups, domains), so an app needs no
/// direct dependency on roost-protocol.
pub use roost_protocol::{
    ClientId, DeviceName, Domain, ErrorCode, GroupId, IdError, UserId, UserName,
};
