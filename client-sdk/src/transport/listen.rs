//! Listen streams: the one long-lived request. The client sends a `QueueListenRequest` and
//! keeps its side open for [`ListenControl`] frames (acks, written by [`ListenStream::ack`]);
//! the server answers with a `Response` frame and then keeps writing [`ListenEvent`] frames on
//! the same stream until it ends it.

use std::fmt;
use std::time::Duration;

use roost_protocol::frame::{FrameDecoder, decode_body, encode_frame};
use roost_protocol::messages::queue::{ListenAck, ListenControl, ListenEvent, QueueListenRequest};
use roost_protocol::messages::{ClientRequest, Operation, Response};

use super::error::{RequestError, TransportError};

/// Most bytes taken from the stream per read: bounds what is buffered beyond one frame.
const READ_CHUNK: usize = 64 * 1024;

/// Events pushed by the server on a listen stream, in the order it sent them.
///
/// Dropping it ends the stream: its send side is finished and the server told to stop.
pub struct ListenStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    head_seq: u64,
    done: bool,
}

impl fmt::Debug for ListenStream {
    // Not derived: the decoder's buffer holds message bytes, which are never logged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenStream")
            .field("head_seq", &self.head_seq)
            .field("buffered", &self.decoder.buffered())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl ListenStream {
    pub(crate) async fn open(
        connection: &quinn::Connection,
        after_seq: u64,
        max_frame_len: u32,
        timeout: Duration,
    ) -> Result<Self, RequestError> {
        let opening = async {
            let request = ClientRequest::QueueListen(QueueListenRequest { after_seq });
            let frame = encode_frame(&request).map_err(TransportError::from)?;
            let (mut send, recv) = connection.open_bi().await.map_err(TransportError::from)?;
            send.write_all(&frame).await.map_err(TransportError::from)?;
            let mut stream = ListenStream {
                send,
                recv,
                decoder: FrameDecoder::new(max_frame_len),
                head_seq: 0,
                done: false,
            };
            let body = stream.next_body().await?.ok_or(TransportError::Frame(
                roost_protocol::frame::FrameError::Truncated,
            ))?;
            let response = decode_body::<Response>(&body).map_err(TransportError::from)?;
            match QueueListenRequest::from_response(response) {
                Ok(accepted) => {
                    stream.head_seq = accepted.head_seq;
                    Ok(stream)
                }
                Err(Response::Error(err)) => Err(RequestError::Server(err)),
                Err(_) => Err(RequestError::UnexpectedResponse {
                    expected: QueueListenRequest::KIND,
                }),
            }
        };
        tokio::time::timeout(timeout, opening)
            .await
            .map_err(|_| RequestError::Transport(TransportError::Timeout))?
    }

    /// The queue's head sequence number when listening began (from the server's response).
    pub fn head_seq(&self) -> u64 {
        self.head_seq
    }

    /// Acknowledges (deletes) every queued message with `seq <= up_to_seq`, like a QueueAck
    /// request but without a round trip: one `ListenControl::Ack` frame on this stream, to
    /// which the server writes no reply. Acks are cumulative and idempotent; the server applies
    /// them in order, durably, and ends the stream with [`ListenEvent::Closed`] if one fails.
    /// Returns once the frame is handed to QUIC, not once it is applied: a client that needs
    /// the deletion confirmed uses a QueueAck request.
    pub async fn ack(&mut self, up_to_seq: u64) -> Result<(), TransportError> {
        let frame = encode_frame(&ListenControl::Ack(ListenAck { up_to_seq }))?;
        self.send.write_all(&frame).await?;
        Ok(())
    }

    /// The next event, waiting for it as long as the connection lives. `None` once the server
    /// ended the stream cleanly (normally right after [`ListenEvent::Closed`]), and after any
    /// error. Cancel-safe: dropping the future loses no event.
    pub async fn next(&mut self) -> Option<Result<ListenEvent, TransportError>> {
        if self.done {
            return None;
        }
        let result = match self.next_body().await {
            Ok(Some(body)) => decode_body::<ListenEvent>(&body).map_err(TransportError::from),
            Ok(None) => {
                self.done = true;
                return None;
            }
            Err(err) => Err(err),
        };
        if result.is_err() {
            self.done = true;
            // Tell the server to stop sending; the stream may already be gone.
            let _ = self.recv.stop(quinn::VarInt::from_u32(0));
        }
        Some(result)
    }

    /// The next frame body, `None` at a clean end of stream.
    async fn next_body(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        loop {
            if let Some(body) = self.decoder.next_frame()? {
                return Ok(Some(body));
            }
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    }
}
