// Shared by every target: feed the input in uneven chunks, as a serial port
// delivers it; the decoder must not panic and its buffer must stay bounded.
use bytes::BytesMut;
use edgefn_drivers::codec::{FrameDecoder, Framing};
use tokio_util::codec::Decoder;

pub fn run(framing: Framing, max: usize, data: &[u8]) {
    let Some((&step, data)) = data.split_first() else { return };
    let mut decoder = FrameDecoder::new(framing);
    let mut buf = BytesMut::new();
    for chunk in data.chunks(usize::from(step).max(1)) {
        buf.extend_from_slice(chunk);
        while let Ok(Some(frame)) = decoder.decode(&mut buf) {
            assert!(frame.len() <= max);
        }
        assert!(buf.len() <= 2 * max + 300, "buffer grew to {}", buf.len());
    }
}
