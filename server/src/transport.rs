//! The QUIC endpoint: the only module that touches quinn. One request per bidirectional
//! stream, read under a deadline with the size checked before allocation; every failure is a
//! typed error response on that stream, and the connection stays usable. A QueueListen stream
//! stays open both ways: the server pushes events, the client may write acks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use quinn::{RecvStream, SendStream, VarInt};
use roost_protocol::frame::{
    FRAME_HEADER_LEN, FrameDecoder, PROTOCOL_VERSION, decode_body, encode_frame, frame_len,
};
use roost_protocol::messages::auth::{EXPORTER_LABEL, EXPORTER_LEN};
use roost_protocol::messages::queue::{
    ListenControl, ListenEvent, MAX_LISTEN_CONTROL_LEN, QueueListenResponse, listen_message_head,
};
use roost_protocol::messages::{ClientRequest, RequestKind, Response};
use roost_protocol::{ErrorCode, WireError};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::Authenticated;
use crate::dispatch::{ConnectionContext, Outcome, dispatch};
use crate::identity::TlsIdentity;
use crate::queue::Fresh;
use crate::{ServerError, State};

/// UDP socket buffer size: the default (about 208 KiB) drops packets under fan-in.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Builds and binds the endpoint.
pub(crate) fn bind(state: &State, tls: TlsIdentity) -> Result<quinn::Endpoint, ServerError> {
    let settings = &state.settings;
    let limits = &settings.limits;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let builder = if state.federation.enabled {
        // Peers present certificates; clients do not (offered, not required).
        builder.with_client_cert_verifier(state.federation.verifier.clone())
    } else {
        builder.with_no_client_auth()
    };
    let mut crypto = builder
        .with_single_cert(tls.cert_chain, tls.key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    crypto.alpn_protocols = vec![roost_protocol::ALPN_CLIENT.to_vec()];
    if state.federation.enabled {
        crypto
            .alpn_protocols
            .push(roost_protocol::ALPN_FEDERATION.to_vec());
    }
    // No 0-RTT: early data can be replayed.
    crypto.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
        .map_err(|e| ServerError::Tls(e.to_string()))?;

    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(limits.idle_timeout())
                .map_err(|e| ServerError::Tls(e.to_string()))?,
        ))
        // Client connections; a peer's is raised to `federation.max_concurrent_streams` once
        // its ALPN is known (`serve_connection`).
        .max_concurrent_bidi_streams(VarInt::from_u32(limits.max_concurrent_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(limits.stream_receive_window))
        .receive_window(VarInt::from_u32(limits.connection_receive_window));
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server_config.transport_config(Arc::new(transport));

    let addr = settings.listen;
    let bind_err = |source| ServerError::Bind { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(bind_err)?;
    // Best effort: the kernel caps these at net.core.rmem_max / wmem_max.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into()).map_err(bind_err)?;
    let socket: std::net::UdpSocket = socket.into();
    let reset_secret = crate::identity::load_or_create_reset_secret(&settings.identity_dir)?;
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset_secret);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    // quinn's default generator only accepts connection ids keyed by this process, so after a
    // restart it drops packets of lost connections before it can reset them.
    endpoint_config.cid_generator(|| Box::new(RestartableCids));
    quinn::Endpoint::new(
        endpoint_config,
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_err)
}

/// Random 8-byte connection ids that any process of this server accepts as its own, so that a
/// restarted server answers packets of connections it lost with a stateless reset (keyed by
/// the persisted reset secret) and peers reconnect at once instead of after their idle timeout.
struct RestartableCids;

impl quinn::ConnectionIdGenerator for RestartableCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; 8]>())
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// Accepts connections until shutdown.
pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    state: Arc<State>,
    tracker: TaskTracker,
) {
    let handshaking = Arc::new(AtomicUsize::new(0));
    let connected = Arc::new(AtomicUsize::new(0));
    let limits = &state.settings.limits;
    loop {
        let incoming = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        // Handshakes in progress count: a burst of them must not get past the limit.
        let open = connected.load(Ordering::Relaxed) + handshaking.load(Ordering::Relaxed);
        if open >= limits.max_connections as usize {
            metrics::counter!("roost_connections_refused_total").increment(1);
            incoming.refuse();
            continue;
        }
        if !incoming.remote_address_validated()
            && handshaking.load(Ordering::Relaxed) >= limits.retry_threshold as usize
        {
            // Make the peer prove its address before we spend a handshake on it.
            if incoming.may_retry() {
                let _ = incoming.retry();
            } else {
                incoming.refuse();
            }
            continue;
        }
        let state = state.clone();
        // Counted here, before the next incoming connection is looked at.
        handshaking.fetch_add(1, Ordering::Relaxed);
        let (handshaking, connected) = (handshaking.clone(), connected.clone());
        let streams = tracker.clone();
        // Boxed, and the box dropped once the handshake starts: a captured `Incoming` (about
        // 400 bytes) would stay in the task's state for the connection's whole life.
        let incoming = Box::new(incoming);
        tracker.spawn(async move {
            let remote = incoming.remote_address();
            let connecting = {
                let incoming = incoming;
                (*incoming).accept()
            };
            let result = match connecting {
                Ok(connecting) => connecting.await,
                Err(err) => Err(err),
            };
            let conn = match result {
                Ok(conn) => conn,
                Err(err) => {
                    handshaking.fetch_sub(1, Ordering::Relaxed);
                    tracing::debug!(%remote, %err, "handshake failed");
                    return;
                }
            };
            // From handshaking to connected without a moment in neither.
            connected.fetch_add(1, Ordering::Relaxed);
            handshaking.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!("roost_connections").increment(1.0);
            let span = tracing::info_span!("conn", %remote);
            serve_connection(conn, remote, state, streams)
                .instrument(span)
                .await;
            connected.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!("roost_connections").decrement(1.0);
        });
    }
}

async fn serve_connection(
    conn: quinn::Connection,
    remote: SocketAddr,
    state: Arc<State>,
    tracker: TaskTracker,
) {
    let alpn = conn
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol);
    if alpn.as_deref() == Some(roost_protocol::ALPN_FEDERATION) {
        // A peer's connection carries many clients' requests: it gets more streams than the
        // transport's default, which is sized for one client.
        let streams = state.settings.federation.max_concurrent_streams.max(1);
        conn.set_max_concurrent_bi_streams(VarInt::from_u32(streams));
        // On the heap: a client connection's task need not be sized for a peer's.
        Box::pin(serve_peer(conn, state, tracker)).await;
        return;
    }
    let mut exporter = [0u8; EXPORTER_LEN];
    if conn
        .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .is_err()
    {
        conn.close(VarInt::from_u32(0), b"internal error");
        return;
    }
    let ctx = Arc::new(ConnectionContext::new(remote, exporter));
    tracing::debug!("connected");
    loop {
        let (send, recv) = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            stream = conn.accept_bi() => match stream {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::debug!(%err, "connection ended");
                    return;
                }
            },
        };
        let (state, ctx) = (state.clone(), ctx.clone());
        let listens = tracker.clone();
        tracker.spawn(serve_stream(state, ctx, send, recv, listens).in_current_span());
    }
}

/// How large a request body buffer is made before its bytes arrive: at most a stream's share
/// of the connection receive window (and its own window), so that headers claiming the maximum
/// on every concurrent stream reserve no more than the peer may actually have in flight.
/// `streams`: the most concurrent streams a connection may have (a peer's, if larger).
fn body_presize_cap(limits: &crate::config::Limits, streams: u32) -> usize {
    let share = limits.connection_receive_window / streams.max(1);
    share.min(limits.stream_receive_window) as usize
}

/// The most concurrent streams any connection may have: a client's or a peer's.
fn max_streams(state: &State) -> u32 {
    let settings = &state.settings;
    let (client, peer) = (
        settings.limits.max_concurrent_streams,
        settings.federation.max_concurrent_streams,
    );
    client.max(peer)
}

/// Whether a complete request body is a QueueListen request: the one request after which the
/// client may keep writing (ListenControl frames), so its stream is not read to the end.
fn is_listen_request(body: &[u8]) -> bool {
    is_request_of(body, RequestKind::QueueListen)
}

fn is_request_of(body: &[u8], of: RequestKind) -> bool {
    let version = PROTOCOL_VERSION.to_be_bytes();
    let kind = (of as u16).to_be_bytes();
    body.get(..2) == Some(&version[..]) && body.get(2..4) == Some(&kind[..])
}

/// A request body, and for a QueueListen request the receive side, still open for the
/// client's ListenControl frames.
type Received = (Vec<u8>, Option<RecvStream>);

/// Reads one request frame: header, size check, then the body. Any request but QueueListen
/// must end right after its frame (bytes after it are MALFORMED); a QueueListen request is
/// returned as soon as its body is complete, with the stream, whose further bytes are
/// ListenControl frames.
///
/// The body buffer is sized from the checked header, up to `presize_cap`; past that it grows
/// only as bytes arrive (doubling, never beyond the declared length), so memory follows what
/// the peer actually sent, not what the header claims. Bodies up to `presize_cap` are read
/// without regrowing the buffer (`read_to_end` started empty and regrew it as chunks came).
async fn read_request(
    mut recv: RecvStream,
    max_frame_len: u32,
    presize_cap: usize,
) -> Result<Received, WireError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut header).await.map_err(|_| {
        WireError::new(ErrorCode::MALFORMED, "stream ended inside the frame header")
    })?;
    let len = frame_len(header, max_frame_len).map_err(|e| e.to_wire())?;
    let mut body = Vec::with_capacity(len.min(presize_cap));
    let failed = || WireError::new(ErrorCode::MALFORMED, "stream failed inside the frame");
    while body.len() < len {
        // Never past the frame: what follows a QueueListen request is not part of it.
        let room = len - body.len();
        let chunk = match recv.read_chunk(room, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => {
                return Err(WireError::new(
                    ErrorCode::MALFORMED,
                    "stream ended inside the frame",
                ));
            }
            Err(_) => return Err(failed()),
        };
        if body.capacity() - body.len() < chunk.len() {
            body.reserve_exact(body.capacity().max(chunk.len()).min(room));
        }
        // Copied at once: holding quinn's chunks instead would pin the packet buffers they
        // point into, beyond quinn's own accounting.
        body.extend_from_slice(&chunk);
    }
    // A blob upload's bytes follow its frame on the same stream.
    if is_listen_request(&body) || is_request_of(&body, RequestKind::BlobUpload) {
        return Ok((body, Some(recv)));
    }
    match recv.read_chunk(1, true).await {
        Ok(None) => Ok((body, None)),
        Ok(Some(_)) => Err(WireError::new(
            ErrorCode::MALFORMED,
            "bytes after the request frame",
        )),
        Err(_) => Err(failed()),
    }
}

/// Reads a request under the per-request deadline. On failure the error response is written,
/// the stream finished, and None returned.
async fn receive(state: &State, send: &mut SendStream, recv: RecvStream) -> Option<Received> {
    let limits = &state.settings.limits;
    let err = match tokio::time::timeout(
        limits.request_read_timeout(),
        read_request(
            recv,
            limits.max_frame_len,
            body_presize_cap(limits, max_streams(state)),
        ),
    )
    .await
    {
        Ok(Ok(received)) => return Some(received),
        Ok(Err(err)) => err,
        Err(_) => WireError::new(
            ErrorCode::REQUEST_TIMEOUT,
            "request not received within the deadline",
        ),
    };
    // The receive side was dropped with the failed read, which stops it.
    metrics::counter!("roost_bad_frames_total", "code" => err.code.name().unwrap_or("UNKNOWN"))
        .increment(1);
    write_frame(send, &Response::Error(err)).await;
    finish(send);
    None
}

async fn serve_stream(
    state: Arc<State>,
    ctx: Arc<ConnectionContext>,
    mut send: SendStream,
    recv: RecvStream,
    tracker: TaskTracker,
) {
    let started = Instant::now();
    let Some((body, listen_recv)) = receive(&state, &mut send, recv).await else {
        return;
    };
    let request = match decode_body::<ClientRequest>(&body) {
        Ok(request) => request,
        Err(err) => {
            metrics::counter!("roost_bad_frames_total", "code" => "MALFORMED").increment(1);
            write_frame(&mut send, &Response::Error(err.to_wire())).await;
            finish(&mut send);
            return;
        }
    };
    drop(body);
    let kind = request.kind();
    let span = tracing::debug_span!("request", kind = kind.name());
    let request = match request {
        ClientRequest::BlobUpload(req) => {
            let response = Box::pin(crate::dispatch::blob_upload(&state, &ctx, req, listen_recv))
                .instrument(span)
                .await;
            write_frame(&mut send, &response).await;
            finish(&mut send);
            return;
        }
        ClientRequest::BlobDownload(req) => {
            let complete = Box::pin(crate::dispatch::blob_download(&state, &ctx, req, &mut send))
                .instrument(span)
                .await;
            if complete {
                finish(&mut send);
            } else {
                let _ = send.reset(VarInt::from_u32(0));
            }
            return;
        }
        request => request,
    };
    // The handlers' futures live on the heap: this task's own future stays small, so spawning
    // it (one per stream) does not copy the largest handler's state several times over
    // (those copies were a fifth of the server's instructions per message: docs/BENCHMARKS.md).
    match Box::pin(dispatch(&state, &ctx, request))
        .instrument(span.clone())
        .await
    {
        Outcome::Reply(response) => {
            write_frame(&mut send, &response).await;
            finish(&mut send);
        }
        Outcome::Listen { me, after_seq } => {
            crate::dispatch::record(kind, "OK", started);
            let control = Control::new(listen_recv);
            // A task of its own, sized to what a listen holds: this request's task is sized
            // for the largest request's state, and every idle listener would keep that.
            tracker.spawn(
                async move { listen(&state, send, control, me, after_seq).await }.instrument(span),
            );
        }
    }
}

fn finish(send: &mut SendStream) {
    let _ = send.finish();
}

/// Writes one frame. Errors mean the peer went away; there is nobody to tell.
async fn write_frame<T: tls_codec::Serialize + tls_codec::Size>(
    send: &mut SendStream,
    message: &T,
) -> bool {
    let frame = match encode_frame(message) {
        Ok(frame) => frame,
        Err(err) => {
            tracing::error!(%err, "response cannot be encoded");
            match encode_frame(&Response::Error(err.to_wire())) {
                Ok(frame) => frame,
                Err(_) => return false,
            }
        }
    };
    // Handed over as is: `write_all` would copy the frame into the stream's buffer.
    send.write_chunk(Bytes::from(frame)).await.is_ok()
}

/// Pushes one queue entry as a `ListenEvent::Message` frame: only the few bytes before the
/// payload are this listener's; the payload's bytes are shared with every other listener.
/// Ok(false) if the peer went away.
async fn push(send: &mut SendStream, entry: &Fresh) -> Result<bool, WireError> {
    let head = listen_message_head(
        entry.seq,
        &entry.id,
        entry.timestamp_ms,
        entry.payload.len(),
    )
    .map_err(|err| {
        tracing::error!(%err, "queue entry cannot be pushed");
        err.to_wire()
    })?;
    let mut chunks = [Bytes::from(head), entry.payload.clone()];
    Ok(send.write_all_chunks(&mut chunks).await.is_ok())
}

/// The client's side of a listen stream: ListenControl frames after the request.
struct Control {
    /// None once the client finished its send side (no more acks) or never could write.
    recv: Option<RecvStream>,
    decoder: FrameDecoder,
}

/// What one read of the client's side of a listen stream asks for.
enum ControlRead {
    /// Nothing to do (a partial frame, or the client finished its send side cleanly).
    Idle,
    /// Ack up to this seq: the highest of the Ack frames the read completed.
    Ack(u64),
    /// A frame that is not a valid ListenControl: the listen ends with this error.
    Malformed(WireError),
    /// The client reset its send side: the listen ends.
    Gone,
}

impl Control {
    fn new(recv: Option<RecvStream>) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(MAX_LISTEN_CONTROL_LEN),
        }
    }

    /// Reads one chunk and decodes every frame it completes. Cancel safe: quinn hands a chunk
    /// over only when this future completes, and decoding is synchronous. Pending forever
    /// once the client finished its send side.
    async fn read(&mut self) -> ControlRead {
        let Some(recv) = self.recv.as_mut() else {
            return std::future::pending().await;
        };
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                self.decoder.push(&chunk.bytes);
                self.decode()
            }
            Ok(None) => {
                self.recv = None;
                match self.decoder.finish() {
                    Ok(()) => ControlRead::Idle,
                    Err(err) => ControlRead::Malformed(err.to_wire()),
                }
            }
            Err(_) => {
                self.recv = None;
                ControlRead::Gone
            }
        }
    }

    /// Like [`Control::read`], but only what has already arrived: never waits.
    async fn read_ready(&mut self) -> ControlRead {
        tokio::select! {
            biased;
            read = self.read() => read,
            () = std::future::ready(()) => ControlRead::Idle,
        }
    }

    /// Coalesces the complete frames in the buffer into one Ack (acks are cumulative).
    fn decode(&mut self) -> ControlRead {
        let mut up_to = None;
        loop {
            match self.decoder.next_frame() {
                Ok(Some(body)) => match decode_body::<ListenControl>(&body) {
                    Ok(ListenControl::Ack(ack)) => {
                        up_to = Some(up_to.map_or(ack.up_to_seq, |u: u64| u.max(ack.up_to_seq)));
                    }
                    Err(err) => return ControlRead::Malformed(err.to_wire()),
                },
                Ok(None) => break,
                Err(err) => return ControlRead::Malformed(err.to_wire()),
            }
        }
        up_to.map_or(ControlRead::Idle, ControlRead::Ack)
    }
}

/// Applies what a read of the client's side asks for. `Err(Some(error))` ends the listen with
/// `ListenEvent::Closed(error)`, `Err(None)` ends it silently.
/// `reached`: the highest seq the listener knows the queue's head reached.
async fn apply_control(
    state: &State,
    me: &Authenticated,
    read: ControlRead,
    reached: u64,
) -> Result<(), Option<WireError>> {
    match read {
        ControlRead::Idle => Ok(()),
        ControlRead::Ack(up_to_seq) => {
            metrics::counter!("roost_listen_acks_total").increment(1);
            // On the heap while it runs, like the listen's store reads.
            Box::pin(crate::queue::ack_listened(state, me, up_to_seq, reached))
                .await
                .map_err(|err| Some(err.to_wire()))
        }
        ControlRead::Malformed(err) => {
            metrics::counter!("roost_bad_frames_total", "code" => err.code.name().unwrap_or("UNKNOWN"))
                .increment(1);
            Err(Some(err))
        }
        ControlRead::Gone => Err(None),
    }
}

/// Serves a listen stream: backlog, then each new message once durable; meanwhile applies the
/// client's acks written on the same stream.
async fn listen(
    state: &State,
    mut send: SendStream,
    mut control: Control,
    me: Authenticated,
    after_seq: u64,
) {
    let mut signal = state.queues.subscribe(me.client_num);
    signal.borrow_and_update();
    // The store's futures (a PostgreSQL query's state is kilobytes) live on the heap while
    // they run: the listen future itself is what every idle listener holds all the time.
    let (mut pending, head_seq) =
        match Box::pin(crate::queue::listen_page(state, me.client_num, after_seq)).await {
            Ok(page) => page,
            Err(err) => {
                write_frame(&mut send, &Response::Error(err.to_wire())).await;
                finish(&mut send);
                return;
            }
        };
    if !write_frame(
        &mut send,
        &Response::QueueListen(QueueListenResponse { head_seq }),
    )
    .await
    {
        return;
    }
    metrics::gauge!("roost_listeners").increment(1.0);
    // Pinned once: a cancellation future made anew on every wake-up would register with the
    // token (shared by every listener) and leave it again each time.
    let stopped = send.stopped();
    tokio::pin!(stopped);
    let shutdown = state.shutdown.cancelled();
    tokio::pin!(shutdown);
    let mut last = after_seq;
    // The highest seq the queue's head is known to have reached: what the store said, and
    // every entry pushed (acks up to it may be applied lazily).
    let mut reached = head_seq;
    // Whether the queue may hold entries after `last` without a wake-up saying so: after a
    // page of the store (a backlog is read a page at a time). A page from memory reaches the
    // head as the window knew it, and any later entry changes `signal`, so the listener
    // waits for that instead of looking again.
    let mut from_store = true;
    let close = 'pushing: loop {
        let pushed = !pending.is_empty();
        for entry in pending.drain(..) {
            last = entry.seq;
            reached = reached.max(last);
            match push(&mut send, &entry).await {
                Ok(true) => {}
                Ok(false) => break 'pushing None,
                Err(err) => break 'pushing Some(err),
            }
        }
        if pushed && from_store {
            // A backlog keeps this loop busy: apply the acks that came in meanwhile, then
            // read on.
            let read = control.read_ready().await;
            if let Err(close) = apply_control(state, &me, read, reached).await {
                break close;
            }
        } else {
            tokio::select! {
                changed = signal.changed() => {
                    if changed.is_err() || signal.borrow_and_update().closed {
                        break Some(WireError::new(ErrorCode::CLIENT_NOT_FOUND, "client removed"));
                    }
                }
                _ = &mut shutdown => {
                    break Some(WireError::new(ErrorCode::UNAVAILABLE, "server shutting down"));
                }
                _ = &mut stopped => break None,
                read = control.read() => {
                    if let Err(close) = apply_control(state, &me, read, reached).await {
                        break close;
                    }
                    continue;
                }
            }
        }
        // Caught-up listeners take new entries from memory; anything else comes from the store.
        let page = match state.queues.recent_after(me.client_num, last) {
            Some(page) => {
                from_store = false;
                Ok(page)
            }
            None => Box::pin(crate::queue::listen_page(state, me.client_num, last))
                .await
                .map(|(page, head)| {
                    from_store = true;
                    reached = reached.max(head);
                    page
                }),
        };
        match page {
            Ok(page) => pending = page,
            Err(err) => break Some(err.to_wire()),
        }
    };
    if let Some(err) = close {
        write_frame(&mut send, &ListenEvent::Closed(err)).await;
        finish(&mut send);
    }
    metrics::gauge!("roost_listeners").decrement(1.0);
}

/// Serves a federation connection: the peer must have presented a certificate.
async fn serve_peer(conn: quinn::Connection, state: Arc<State>, tracker: TaskTracker) {
    let chain = conn
        .peer_identity()
        .and_then(|identity| {
            identity
                .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .map(|chain| *chain)
        .unwrap_or_default();
    let Some(peer) = crate::federation::inbound::PeerContext::new(&state, chain) else {
        tracing::info!("federation connection without a certificate refused");
        conn.close(VarInt::from_u32(0), b"certificate required");
        return;
    };
    let peer = Arc::new(peer);
    tracing::debug!("peer connected");
    loop {
        let (send, recv) = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            stream = conn.accept_bi() => match stream {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::debug!(%err, "peer connection ended");
                    return;
                }
            },
        };
        let (state, peer) = (state.clone(), peer.clone());
        tracker.spawn(serve_peer_stream(state, peer, send, recv).in_current_span());
    }
}

async fn serve_peer_stream(
    state: Arc<State>,
    peer: Arc<crate::federation::inbound::PeerContext>,
    mut send: SendStream,
    recv: RecvStream,
) {
    // A federation request is never a listen: the receive side is already at its end.
    let Some((body, _)) = receive(&state, &mut send, recv).await else {
        return;
    };
    use roost_protocol::messages::federation::FederationRequest;
    let response = match decode_body::<FederationRequest>(&body) {
        Ok(FederationRequest::BlobDownload(req)) => {
            let complete =
                crate::federation::inbound::blob_download(&state, &peer, req, &mut send).await;
            if complete {
                finish(&mut send);
            } else {
                let _ = send.reset(VarInt::from_u32(0));
            }
            return;
        }
        // On the heap, as in `serve_stream`.
        Ok(request) => Box::pin(crate::federation::inbound::handle(&state, &peer, request)).await,
        Err(err) => Response::Error(err.to_wire()),
    };
    write_frame(&mut send, &response).await;
    finish(&mut send);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presized_request_buffers_stay_within_the_receive_windows() {
        let config = crate::config::Config::default();
        let limits = &config.limits;
        // A peer's connection may have more streams than a client's.
        let streams = limits
            .max_concurrent_streams
            .max(config.federation.max_concurrent_streams);
        let cap = body_presize_cap(limits, streams);
        // Lying headers on every concurrent stream reserve at most the connection window.
        assert!(
            cap * config.federation.max_concurrent_streams as usize
                <= limits.connection_receive_window as usize
        );
        assert!(
            cap * limits.max_concurrent_streams as usize
                <= limits.connection_receive_window as usize
        );
        // With the defaults a commit at N=1000 (83 KB) is read without regrowing the buffer.
        assert!(cap >= 83 * 1024, "{cap}");
        let mut small = limits.clone();
        small.stream_receive_window = 16 * 1024;
        assert_eq!(body_presize_cap(&small, 128), 16 * 1024);
        small.connection_receive_window = 8 * 1024;
        assert_eq!(body_presize_cap(&small, 0), 8 * 1024);
    }
}
