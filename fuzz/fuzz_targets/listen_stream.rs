//! A listen stream as a client receives it: bytes fed to a `FrameDecoder` in chunks, each
//! frame decoded as a `ListenEvent`. The first input byte picks the chunk size (1-64).
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_protocol::frame::{FRAME_HEADER_LEN, FrameDecoder, FrameError};
use roost_protocol::messages::queue::ListenEvent;
use roost_protocol_fuzz::decode_and_check;

/// Small enough that inputs can exceed it and exercise the refusal.
const MAX_FRAME_LEN: u32 = 2048;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(selector % 64) + 1;
    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut consumed = 0usize;
    for piece in stream.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(body)) => {
                    // The body is exactly the bytes after its header in the stream.
                    let start = consumed + FRAME_HEADER_LEN;
                    assert!(body.len() <= MAX_FRAME_LEN as usize);
                    assert_eq!(stream.get(start..start + body.len()), Some(&body[..]));
                    consumed = start + body.len();
                    decode_and_check::<ListenEvent>(&body);
                }
                Ok(None) => break,
                Err(FrameError::TooLarge { len, max }) => {
                    assert!(len > max);
                    return;
                }
                Err(other) => panic!("next_frame: unexpected {other}"),
            }
        }
        // Never more than one partial frame plus the last chunk.
        assert!(decoder.buffered() <= FRAME_HEADER_LEN + MAX_FRAME_LEN as usize + chunk);
    }
    // At the end either everything was consumed or a partial frame is reported.
    assert_eq!(decoder.finish().is_ok(), consumed == stream.len());
});
