//! Dispatch: one `match` over the request enum, connection authentication state, and request
//! metrics.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;

use roost_protocol::messages::auth::EXPORTER_LEN;
use roost_protocol::messages::{ClientRequest, RequestKind, Response};

use crate::auth::Authenticated;
use crate::error::ServiceError;
use crate::{State, auth, blob, delivery, federation, keypackage, push, queue};

/// Per-connection state.
pub(crate) struct ConnectionContext {
    pub(crate) remote: SocketAddr,
    /// The connection's TLS exporter value for connection authentication.
    pub(crate) exporter: [u8; EXPORTER_LEN],
    authenticated: Mutex<Option<Authenticated>>,
}

impl ConnectionContext {
    pub(crate) fn new(remote: SocketAddr, exporter: [u8; EXPORTER_LEN]) -> Self {
        Self {
            remote,
            exporter,
            authenticated: Mutex::new(None),
        }
    }

    fn current(&self) -> Option<Authenticated> {
        match self.authenticated.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn me(&self, state: &State) -> Result<Authenticated, ServiceError> {
        let me = self.current().ok_or(ServiceError::Unauthenticated)?;
        if state.is_revoked(me.client_num) {
            return Err(ServiceError::ClientNotFound);
        }
        Ok(me)
    }

    fn set(&self, auth: Authenticated) -> Result<(), ServiceError> {
        let mut guard = match self.authenticated.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        match &*guard {
            Some(existing) if existing.client != auth.client => {
                Err(ServiceError::AlreadyAuthenticated)
            }
            _ => {
                *guard = Some(auth);
                Ok(())
            }
        }
    }
}

/// What the transport does with a request.
pub(crate) enum Outcome {
    /// Write this response and finish the stream.
    Reply(Response),
    /// Turn the stream into a listen stream.
    Listen { me: Authenticated, after_seq: u64 },
}

fn error_response(err: ServiceError) -> Response {
    match &err {
        ServiceError::Store(_) | ServiceError::Internal(_) => {
            tracing::error!(%err, "request failed")
        }
        _ => tracing::debug!(%err, "request refused"),
    }
    Response::Error(err.to_wire())
}

fn reply<T>(result: Result<T, ServiceError>, wrap: impl FnOnce(T) -> Response) -> Response {
    result.map_or_else(error_response, wrap)
}

/// Handles one client request.
pub(crate) async fn dispatch(
    state: &State,
    ctx: &ConnectionContext,
    request: ClientRequest,
) -> Outcome {
    let kind = request.kind();
    let started = Instant::now();
    let outcome = dispatch_inner(state, ctx, request).await;
    let code = match &outcome {
        Outcome::Reply(Response::Error(err)) => err.code.name().unwrap_or("UNKNOWN"),
        _ => "OK",
    };
    record(kind, code, started);
    outcome
}

pub(crate) fn record(kind: RequestKind, code: &'static str, started: Instant) {
    metrics::counter!("roost_requests_total", "kind" => kind.name(), "outcome" => code)
        .increment(1);
    metrics::histogram!("roost_request_duration_seconds", "kind" => kind.name())
        .record(started.elapsed().as_secs_f64());
}

/// Each handler's future is boxed: this future then holds a pointer instead of the largest
/// handler's state, so creating it (and boxing it in the transport) copies a few bytes, and
/// each request copies only its own handler's state once. Unboxed, every request copied the
/// largest state (≈ 10,000 instructions per request: docs/BENCHMARKS.md).
async fn dispatch_inner(state: &State, ctx: &ConnectionContext, request: ClientRequest) -> Outcome {
    use ClientRequest as R;
    // Requests that act as a client use `me?`; the others ignore it.
    let me = ctx.me(state);
    if let Some(domain) = federation::remote_target(&state.settings.domain, &request).cloned() {
        return Outcome::Reply(Box::pin(forward(state, me, domain, request)).await);
    }
    let response = match request {
        R::RegisterUser(req) => reply(
            Box::pin(auth::register(state, ctx.remote.ip(), req)).await,
            Response::RegisterUser,
        ),
        R::AddClient(req) => reply(
            Box::pin(auth::add_client(state, req)).await,
            Response::AddClient,
        ),
        R::RemoveClient(req) => reply(
            Box::pin(auth::remove_client(state, req)).await,
            Response::RemoveClient,
        ),
        R::AsKeys(req) => reply(auth::as_keys(state, req), Response::AsKeys),
        R::Authenticate(req) => {
            let result = Box::pin(async {
                let (who, response) = auth::authenticate(state, &ctx.exporter, req).await?;
                ctx.set(who)?;
                Ok(response)
            });
            reply(result.await, Response::Authenticate)
        }
        R::DiscoverUser(req) => {
            let result = Box::pin(async {
                me?;
                auth::discover(state, req).await
            });
            reply(result.await, Response::DiscoverUser)
        }
        R::UploadKeyPackages(req) => reply(
            Box::pin(async { keypackage::upload(state, &me?, req).await }).await,
            Response::UploadKeyPackages,
        ),
        R::ClaimUserKeyPackages(req) => reply(
            Box::pin(async { keypackage::claim_user(state, &me?.client, req).await }).await,
            Response::ClaimUserKeyPackages,
        ),
        R::ClaimClientKeyPackage(req) => reply(
            Box::pin(async { keypackage::claim_client(state, &me?.client, req).await }).await,
            Response::ClaimClientKeyPackage,
        ),
        R::KeyPackageCount(_) => reply(
            Box::pin(async { keypackage::count(state, &me?).await }).await,
            Response::KeyPackageCount,
        ),
        R::QueueFetch(req) => reply(
            Box::pin(async { queue::fetch(state, &me?, req).await }).await,
            Response::QueueFetch,
        ),
        R::QueueAck(req) => reply(
            Box::pin(async { queue::ack(state, &me?, req).await }).await,
            Response::QueueAck,
        ),
        R::QueueListen(req) => match me {
            Ok(me) => {
                return Outcome::Listen {
                    me,
                    after_seq: req.after_seq,
                };
            }
            Err(err) => error_response(err),
        },
        R::CreateGroup(req) => reply(
            Box::pin(async { delivery::create(state, &me?.client, req).await }).await,
            Response::CreateGroup,
        ),
        R::Commit(req) => reply(
            Box::pin(async { delivery::commit(state, &me?.client, req).await }).await,
            Response::Commit,
        ),
        R::SendMessage(req) => reply(
            Box::pin(async { delivery::send_message(state, &me?.client, req).await }).await,
            Response::SendMessage,
        ),
        R::SendCounted(req) => reply(
            Box::pin(async { delivery::send_counted(state, &me?.client, req).await }).await,
            Response::SendCounted,
        ),
        R::LeaveGroup(req) => reply(
            Box::pin(async { delivery::leave(state, &me?.client, req).await }).await,
            Response::LeaveGroup,
        ),
        R::FetchGroupInfo(req) => reply(
            Box::pin(async { delivery::fetch_group_info(state, &me?.client, req).await }).await,
            Response::FetchGroupInfo,
        ),
        R::ExternalJoin(req) => reply(
            Box::pin(async { delivery::external_join(state, &me?.client, req).await }).await,
            Response::ExternalJoin,
        ),
        // The transport serves these on their streams before dispatch.
        R::BlobUpload(_) | R::BlobDownload(_) => error_response(ServiceError::WrongStream(
            "blob transfers are served on their own stream",
        )),
        R::RegisterPush(req) => reply(
            Box::pin(async { push::register(state, &me?, req).await }).await,
            Response::RegisterPush,
        ),
        R::UnregisterPush(_) => reply(
            Box::pin(async { push::unregister(state, &me?).await }).await,
            Response::UnregisterPush,
        ),
        R::PushInfo(_) => reply(me.map(|_| push::info(state)), Response::PushInfo),
    };
    Outcome::Reply(response)
}

/// Serves a blob upload: the bytes follow the request on `body` (absent if the stream ended
/// with the frame).
pub(crate) async fn blob_upload(
    state: &State,
    ctx: &ConnectionContext,
    request: roost_protocol::messages::blob::BlobUploadRequest,
    body: Option<quinn::RecvStream>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let me = ctx.me(state)?;
        match body {
            Some(mut body) => blob::upload(state, &me, request, &mut body).await,
            None if request.size == 0 => blob::upload(state, &me, request, &mut blob::NoBody).await,
            None => Err(ServiceError::BlobSizeMismatch),
        }
    };
    let response = reply(result.await, Response::BlobUpload);
    let code = match &response {
        Response::Error(err) => err.code.name().unwrap_or("UNKNOWN"),
        _ => "OK",
    };
    record(RequestKind::BlobUpload, code, started);
    response
}

/// Serves a blob download on `out`; false if the stream must be reset (cut mid-way).
pub(crate) async fn blob_download<W: tokio::io::AsyncWrite + Unpin>(
    state: &State,
    ctx: &ConnectionContext,
    request: roost_protocol::messages::blob::BlobDownloadRequest,
    out: &mut W,
) -> bool {
    let started = Instant::now();
    let me = match ctx.me(state) {
        Ok(me) => me,
        Err(err) => {
            record(RequestKind::BlobDownload, "UNAUTHENTICATED", started);
            let frame = roost_protocol::frame::encode_frame(&error_response(err));
            return match frame {
                Ok(frame) => tokio::io::AsyncWriteExt::write_all(out, &frame)
                    .await
                    .is_ok(),
                Err(_) => false,
            };
        }
    };
    let complete = blob::download(state, blob::Downloader::Client(&me), request, out).await;
    record(
        RequestKind::BlobDownload,
        if complete { "OK" } else { "CUT" },
        started,
    );
    complete
}

/// Sends a request about another domain to that domain's homeserver, on behalf of the
/// authenticated client (AsKeys needs no client; DiscoverUser needs one here but is forwarded
/// without naming it).
async fn forward(
    state: &State,
    me: Result<Authenticated, ServiceError>,
    domain: roost_protocol::Domain,
    request: ClientRequest,
) -> Response {
    let sender = match request.kind() {
        RequestKind::AsKeys => None,
        RequestKind::DiscoverUser => match me {
            Ok(_) => None,
            Err(err) => return error_response(err),
        },
        _ => match me {
            Ok(me) => Some(me.client),
            Err(err) => return error_response(err),
        },
    };
    match state.federation.forward(&domain, sender, request).await {
        Ok(response) => response,
        Err(err) => error_response(err),
    }
}
