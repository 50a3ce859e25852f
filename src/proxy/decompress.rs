//! `Decompress: true`: an answer whose `Content-Encoding` is `gzip` (or `x-gzip`) or `deflate`
//! reaches the caller decoded, still streamed. Each write into the decoder yields at most one
//! decoder buffer of output, so a small compressed chunk that inflates to a lot (a compression
//! bomb) is handed on in pieces, never held whole. Without the header the answer's bytes and
//! its `Content-Encoding` pass through unchanged.

use std::io::{self, Write};

use bytes::{Buf, Bytes};
use flate2::write::{MultiGzDecoder, ZlibDecoder};
use futures_util::{Stream, StreamExt};

/// A content coding the proxy can decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    /// `deflate` as HTTP means it: a zlib stream (RFC 9110 §8.4.1.2).
    Deflate,
}

impl Coding {
    /// The coding of a `Content-Encoding` value, when it is one coding this module decodes
    /// (several codings, or another one, pass through as they are).
    pub fn of(content_encoding: &str) -> Option<Self> {
        match content_encoding.trim().to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Some(Self::Gzip),
            "deflate" => Some(Self::Deflate),
            _ => None,
        }
    }
}

/// What the proxy asks for when the caller wants a decoded answer.
pub const ACCEPT_ENCODING: &str = "gzip, deflate";

enum Decoder {
    Gzip(MultiGzDecoder<Vec<u8>>),
    Deflate(ZlibDecoder<Vec<u8>>),
}

impl Decoder {
    fn new(coding: Coding) -> Self {
        match coding {
            Coding::Gzip => Self::Gzip(MultiGzDecoder::new(Vec::new())),
            Coding::Deflate => Self::Deflate(ZlibDecoder::new(Vec::new())),
        }
    }

    /// Feeds some of `input`; returns how much was taken.
    fn write(&mut self, input: &[u8]) -> io::Result<usize> {
        match self {
            Self::Gzip(d) => d.write(input),
            Self::Deflate(d) => d.write(input),
        }
    }

    /// The end of the input: a stream cut short is an error.
    fn finish(&mut self) -> io::Result<()> {
        match self {
            Self::Gzip(d) => d.try_finish(),
            Self::Deflate(d) => d.try_finish(),
        }
    }

    /// The output decoded so far, taken out.
    fn take(&mut self) -> Vec<u8> {
        match self {
            Self::Gzip(d) => std::mem::take(d.get_mut()),
            Self::Deflate(d) => std::mem::take(d.get_mut()),
        }
    }
}

struct Decoding<S> {
    upstream: S,
    decoder: Decoder,
    pending: Bytes,
}

/// `body` decoded from `coding`, as a stream of chunks. A corrupt or truncated body ends the
/// stream with an error (the caller sees the body cut off, as with an upstream that closed
/// mid-body).
pub fn decode<S, E>(coding: Coding, body: S) -> impl Stream<Item = io::Result<Bytes>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    let start = Decoding {
        upstream: body,
        decoder: Decoder::new(coding),
        pending: Bytes::new(),
    };
    futures_util::stream::unfold(Some(start), |state| async move {
        let mut s = state?;
        loop {
            if !s.pending.is_empty() {
                match s.decoder.write(&s.pending) {
                    // Past the end of the compressed data: what follows is not part of it.
                    Ok(0) => s.pending.clear(),
                    Ok(taken) => s.pending.advance(taken),
                    Err(e) => return Some((Err(e), None)),
                }
                let out = s.decoder.take();
                if !out.is_empty() {
                    return Some((Ok(Bytes::from(out)), Some(s)));
                }
                continue;
            }
            match s.upstream.next().await {
                Some(Ok(chunk)) => s.pending = chunk,
                Some(Err(e)) => return Some((Err(io::Error::other(e)), None)),
                None => {
                    if let Err(e) = s.decoder.finish() {
                        return Some((Err(e), None));
                    }
                    let out = s.decoder.take();
                    return (!out.is_empty()).then(|| (Ok(Bytes::from(out)), None));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use flate2::Compression;
    use flate2::write::{GzEncoder, ZlibEncoder};

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(data).expect("write");
        encoder.finish().expect("finish")
    }

    /// The body cut into `size`-byte chunks, as the network might deliver it.
    fn chunks(body: &[u8], size: usize) -> impl Stream<Item = Result<Bytes, io::Error>> + Unpin {
        let chunks: Vec<_> = body
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures_util::stream::iter(chunks)
    }

    async fn collect(
        stream: impl Stream<Item = io::Result<Bytes>>,
    ) -> (Vec<u8>, Vec<usize>, Option<io::Error>) {
        let mut out = Vec::new();
        let mut sizes = Vec::new();
        let mut stream = std::pin::pin!(stream);
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    sizes.push(chunk.len());
                    out.extend_from_slice(&chunk);
                }
                Err(e) => return (out, sizes, Some(e)),
            }
        }
        (out, sizes, None)
    }

    #[test]
    fn codings_are_recognized_one_at_a_time() {
        assert_eq!(Coding::of("gzip"), Some(Coding::Gzip));
        assert_eq!(Coding::of(" X-GZIP "), Some(Coding::Gzip));
        assert_eq!(Coding::of("deflate"), Some(Coding::Deflate));
        for other in ["br", "zstd", "gzip, br", "identity", ""] {
            assert_eq!(Coding::of(other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn a_gzip_body_in_any_chunking_decodes_to_the_original() {
        let original: Vec<u8> = (0..200_000u32).flat_map(|n| n.to_le_bytes()).collect();
        let compressed = gzip(&original);
        for size in [1, 7, 4096, compressed.len()] {
            let (out, _, error) = collect(decode(Coding::Gzip, chunks(&compressed, size))).await;
            assert!(error.is_none(), "{error:?}");
            assert_eq!(out, original, "chunks of {size}");
        }
        // Two gzip members one after the other are one body.
        let twice = [gzip(b"hello "), gzip(b"world")].concat();
        let (out, _, _) = collect(decode(Coding::Gzip, chunks(&twice, 5))).await;
        assert_eq!(out, b"hello world");
    }

    #[tokio::test]
    async fn a_deflate_body_decodes() {
        let mut encoder = ZlibEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(b"deflated text").expect("write");
        let compressed = encoder.finish().expect("finish");
        let (out, _, error) = collect(decode(Coding::Deflate, chunks(&compressed, 3))).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(out, b"deflated text");
    }

    #[tokio::test]
    async fn a_bomb_comes_out_in_bounded_pieces() {
        let original = vec![0u8; 32 * 1024 * 1024];
        let compressed = gzip(&original);
        assert!(compressed.len() < 64 * 1024, "{}", compressed.len());
        let (out, sizes, error) =
            collect(decode(Coding::Gzip, chunks(&compressed, compressed.len()))).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(out.len(), original.len());
        let largest = sizes.iter().max().copied().unwrap_or_default();
        assert!(largest <= 128 * 1024, "a piece of {largest} bytes");
    }

    #[tokio::test]
    async fn a_truncated_or_corrupt_body_ends_in_an_error() {
        let compressed = gzip(&vec![b'x'; 100_000]);
        let cut = &compressed[..compressed.len() / 2];
        let (_, _, error) = collect(decode(Coding::Gzip, chunks(cut, 1024))).await;
        assert!(error.is_some(), "a cut body is an error");
        let mut corrupt = compressed.clone();
        corrupt[20..60].fill(0xff);
        let (_, _, error) = collect(decode(Coding::Gzip, chunks(&corrupt, 1024))).await;
        assert!(error.is_some(), "a corrupt body is an error");
    }
}
