//! The protobuf codec of the generated `toru.v1` services and clients: prost's, except that a
//! message that fails to decode (invalid UTF-8 in a string field, a truncated field, a wrong
//! wire type) is `INVALID_ARGUMENT` naming the field, not `INTERNAL`.
//!
//! This crate's `build.rs` names this codec for every generated service and client. A request that does
//! not decode is the caller's mistake; prost's error already names the message and field
//! (`GetPluginRequest.plugin_id: invalid string value: data is not UTF-8 encoded`).
//! Generated clients share the codec: an answer that does not decode is reported the same
//! way on the client side. It knows nothing of the services themselves.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

/// Prost encoding, and decoding whose errors are `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec {
            _types: PhantomData,
        }
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder { _type: PhantomData }
    }
}

/// Decodes a `U`; a message that is not a valid `U` is `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct CheckedDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            Status::invalid_argument(format!(
                "{e}; send a valid protobuf message (string fields must be UTF-8)"
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
