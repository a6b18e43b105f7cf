//! The gRPC codec of darkcore's services: prost, with small starting buffers. Every stream
//! keeps one encode and one decode buffer for its whole life, and tonic starts both at 8 KiB,
//! which an operator holding tens of thousands of agent streams pays per stream.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Where each stream's encode and decode buffers start. Most messages (heartbeats, task
/// statuses, owner states) fit; a larger one grows its buffer as it needs.
pub const STARTING_BUFFER_BYTES: usize = 1024;
/// Encoded bytes a stream gathers before it hands them to the transport (tonic's default).
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

/// prost encoding with [`STARTING_BUFFER_BYTES`] buffers; named by the generated services.
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(PhantomData)
    }
}

fn buffers() -> BufferSettings {
    BufferSettings::new(STARTING_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(buffers())
    }
}
