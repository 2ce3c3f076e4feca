//! Turns SDK and transport failures into one-line messages a user can act on: the server is
//! unreachable, its certificate is not the pinned one, the user does not exist, this profile
//! is not a member, and so on. Commands that know more (which user, which group) say so
//! themselves before falling back to [`describe`].

use roost_client::ClientError;
use roost_client::transport::{RequestError, TransportError};
use roost_protocol::{ErrorCode, WireError};

/// A failure with a stable machine-readable code (what `--json` prints on stderr beside the
/// message). Codes: a server's error code name in lower case (`user_not_found`,
/// `rate_limited`, ...), or one of `unreachable`, `bad_certificate`, `not_member`,
/// `profile_in_use`, `no_user_key`, `wrong_domain`, `left_group`, `already_member`, `token_refused`,
/// `profile_exists`, `usage` (a command-line mistake) and `error` (anything else).
#[derive(Debug)]
pub(crate) struct Coded {
    pub(crate) code: String,
    pub(crate) message: String,
}

impl std::fmt::Display for Coded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Coded {}

/// An error with `code` and `message`.
pub(crate) fn coded(code: &str, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Coded {
        code: code.to_owned(),
        message: message.into(),
    })
}

/// The stable code of a command's failure: the [`Coded`] one in its chain, else `error`.
pub(crate) fn code_of(err: &anyhow::Error) -> &str {
    err.chain()
        .find_map(|cause| cause.downcast_ref::<Coded>())
        .map_or("error", |coded| coded.code.as_str())
}

/// The stable code of an SDK failure.
pub(crate) fn code(err: &ClientError) -> String {
    match err {
        ClientError::Request(RequestError::Server(err)) => err
            .code
            .name()
            .map_or_else(|| "error".to_owned(), str::to_lowercase),
        ClientError::Request(RequestError::Transport(TransportError::UntrustedCertificate(_)))
        | ClientError::Request(RequestError::Transport(
            TransportError::Pem { .. } | TransportError::Config(_),
        )) => "bad_certificate".into(),
        ClientError::Request(RequestError::Transport(_)) => "unreachable".into(),
        ClientError::ProfileInUse(_) => "profile_in_use".into(),
        ClientError::UnknownGroup(_) => "not_member".into(),
        ClientError::LeftGroup(_) => "left_group".into(),
        ClientError::NoUserKey => "no_user_key".into(),
        ClientError::WrongDomain { .. } => "wrong_domain".into(),
        _ => "error".into(),
    }
}

/// `describe(err)` with its code.
pub(crate) fn coded_client_error(err: &ClientError, server: &str) -> anyhow::Error {
    coded(&code(err), describe(err, server))
}

/// One line describing `err`; `server` is the homeserver's address as configured.
pub(crate) fn describe(err: &ClientError, server: &str) -> String {
    match err {
        ClientError::Request(RequestError::Transport(err)) => describe_transport(err, server),
        ClientError::Request(RequestError::Server(err)) => describe_server(err),
        ClientError::ProfileInUse(_) => {
            "the profile is in use by another roost-cli (chat or recv --follow?)".into()
        }
        ClientError::UnknownGroup(group) => format!("not a member of {group}"),
        ClientError::LeftGroup(group) => format!(
            "you left {group}: nothing more can be sent there (it goes once a member commits \
             your removal)"
        ),
        ClientError::NoUserKey => {
            "this device does not hold the user key (export it from the user's first device)".into()
        }
        ClientError::WrongDomain { user, server } => {
            format!("{user} is not a user of the homeserver {server}: use a user of its domain")
        }
        other => other.to_string(),
    }
}

/// One line for a failure to reach or trust the server.
pub(crate) fn describe_transport(err: &TransportError, server: &str) -> String {
    match err {
        TransportError::UntrustedCertificate(reason) => format!(
            "bad certificate: the server at {server} did not present the pinned certificate or \
             one the CA vouches for ({reason})"
        ),
        TransportError::Pem { .. } | TransportError::Config(_) => {
            format!("bad certificate configuration: {err}")
        }
        TransportError::Timeout
        | TransportError::Handshake(_)
        | TransportError::ConnectionLost(_)
        | TransportError::Connect(_)
        | TransportError::Io(_) => format!("server unreachable: {server}: {err}"),
        other => format!("connection to {server} failed: {other}"),
    }
}

fn describe_server(err: &WireError) -> String {
    let reason = err.reason();
    match err.code {
        ErrorCode::USER_NOT_FOUND => "unknown user".into(),
        ErrorCode::USER_EXISTS => "the user exists already".into(),
        ErrorCode::CLIENT_EXISTS => {
            "this device name is taken (or was used before) for this user: choose another with \
             --device"
                .into()
        }
        ErrorCode::REGISTRATION_TOKEN_REQUIRED => {
            "the server requires a registration token: pass --token TOKEN".into()
        }
        ErrorCode::CLIENT_NOT_FOUND => {
            "no such device: it is not (or no longer) a device of this user".into()
        }
        ErrorCode::BAD_SIGNATURE => "the server refused the signature (wrong user key?)".into(),
        ErrorCode::NOT_MEMBER => "not a member of the group".into(),
        ErrorCode::GROUP_NOT_FOUND => "the server does not know this group".into(),
        ErrorCode::UNKNOWN_DOMAIN => {
            format!("unknown domain: this server neither is nor federates with it ({reason})")
        }
        ErrorCode::PEER_UNREACHABLE => {
            format!("the other homeserver is unreachable, try again later ({reason})")
        }
        ErrorCode::RATE_LIMITED => "rate limited by the server: try again later".into(),
        ErrorCode::NO_KEY_PACKAGE => "the user has no KeyPackage left to be invited".into(),
        ErrorCode::UNAVAILABLE => "the server is unavailable (shutting down?)".into(),
        _ => format!("the server refused: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line_and_specific() {
        let unknown = ClientError::Request(RequestError::Server(WireError::new(
            ErrorCode::USER_NOT_FOUND,
            "user not found",
        )));
        assert_eq!(describe(&unknown, "h:1"), "unknown user");
        let timeout = ClientError::Request(RequestError::Transport(TransportError::Timeout));
        assert_eq!(
            describe(&timeout, "127.0.0.1:9"),
            "server unreachable: 127.0.0.1:9: timed out"
        );
        let cert = TransportError::UntrustedCertificate("invalid peer certificate".into());
        assert!(describe_transport(&cert, "h:1").starts_with("bad certificate: "));
        let locked = ClientError::ProfileInUse("p.redb".into());
        assert!(describe(&locked, "h:1").contains("in use"));
        assert_eq!(code(&locked), "profile_in_use");
        for err in [unknown, timeout, locked] {
            assert!(!describe(&err, "h:1").contains('\n'));
        }
    }
}
