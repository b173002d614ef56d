//! The frame codec: a 4-byte big-endian length followed by that many bytes of payload.
//!
//! Pure bytes in, frames out: it knows nothing of sockets or JSON. An incomplete buffer is
//! `Ok(None)`; a clean end of stream between frames is a normal end, an end inside a frame
//! is an error (tokio-util's default `decode_eof`). A length above the limit is rejected
//! from the 4-byte prefix alone, before anything is allocated for it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Default largest payload accepted in one frame: 16 MiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

const PREFIX_LEN: usize = 4;

/// Errors of the frame codec.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A frame announced (or was given) a payload larger than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// The underlying stream failed, or ended inside a frame.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Length-prefixed framing with a payload size limit.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_len: usize,
}

impl FrameCodec {
    /// A codec that refuses frames above `max_len` bytes of payload.
    pub fn new(max_len: usize) -> Self {
        Self { max_len }
    }

    /// The payload size limit.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_LEN)
    }
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        if src.len() < PREFIX_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_len {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        let total = PREFIX_LEN + len;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(PREFIX_LEN);
        Ok(Some(src.split_to(len).freeze()))
    }
}

impl<T: AsRef<[u8]>> Encoder<T> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: T, dst: &mut BytesMut) -> Result<(), FrameError> {
        let payload = item.as_ref();
        if payload.len() > self.max_len {
            return Err(FrameError::TooLarge {
                len: payload.len(),
                max: self.max_len,
            });
        }
        dst.reserve(PREFIX_LEN + payload.len());
        dst.put_u32(payload.len() as u32);
        dst.put_slice(payload);
        Ok(())
    }
}

/// Encodes one payload as a complete frame (prefix and payload) in a new buffer.
pub fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX_LEN + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(codec: &mut FrameCodec, bytes: &[u8]) -> Result<Vec<Bytes>, FrameError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(frame) = codec.decode(&mut buf)? {
            out.push(frame);
        }
        Ok(out)
    }

    #[test]
    fn round_trips_several_frames() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        codec.encode(b"hello", &mut buf).unwrap();
        codec.encode(b"", &mut buf).unwrap();
        codec.encode(b"world", &mut buf).unwrap();
        let frames = decode_all(&mut codec, &buf).unwrap();
        assert_eq!(frames, vec![&b"hello"[..], &b""[..], &b"world"[..]]);
    }

    #[test]
    fn incomplete_input_is_not_an_error() {
        let mut codec = FrameCodec::default();
        let frame = encode_frame(b"abcdef");
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            assert!(codec.decode(&mut buf).unwrap().is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn huge_prefix_is_refused_without_allocating() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len, max: 1024 } if len == u32::MAX as usize));
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn eof_inside_a_frame_is_an_error_and_between_frames_is_not() {
        let mut codec = FrameCodec::default();
        let mut empty = BytesMut::new();
        assert!(codec.decode_eof(&mut empty).unwrap().is_none());
        let frame = encode_frame(b"abc");
        let mut partial = BytesMut::from(&frame[..5]);
        assert!(codec.decode_eof(&mut partial).is_err());
    }

    #[test]
    fn encoder_refuses_oversized_payload() {
        let mut codec = FrameCodec::new(3);
        let mut buf = BytesMut::new();
        assert!(codec.encode(b"abcd", &mut buf).is_err());
        assert!(buf.is_empty());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the bytes, decoding never panics, never yields a frame above the
            /// limit, and never grows the buffer much beyond the limit.
            #[test]
            fn arbitrary_bytes_never_panic_or_overallocate(
                data in proptest::collection::vec(any::<u8>(), 0..4096),
                max in 0usize..1024,
            ) {
                let mut codec = FrameCodec::new(max);
                let mut buf = BytesMut::from(&data[..]);
                let bound = 2 * buf.capacity().max(max + PREFIX_LEN);
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(frame)) => prop_assert!(frame.len() <= max),
                        Ok(None) | Err(_) => break,
                    }
                    prop_assert!(buf.capacity() <= bound);
                }
                prop_assert!(buf.capacity() <= bound);
            }

            /// Frames survive encoding and decoding, however the bytes are split.
            #[test]
            fn frames_round_trip_across_any_split(
                frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
                cut in any::<proptest::sample::Index>(),
            ) {
                let mut codec = FrameCodec::new(300);
                let mut wire = BytesMut::new();
                for f in &frames {
                    codec.encode(f, &mut wire).unwrap();
                }
                let at = if wire.is_empty() { 0 } else { cut.index(wire.len() + 1) };
                let mut buf = BytesMut::from(&wire[..at]);
                let mut out = Vec::new();
                while let Some(f) = codec.decode(&mut buf).unwrap() {
                    out.push(f.to_vec());
                }
                buf.extend_from_slice(&wire[at..]);
                while let Some(f) = codec.decode(&mut buf).unwrap() {
                    out.push(f.to_vec());
                }
                prop_assert_eq!(out, frames);
            }
        }
    }
}
