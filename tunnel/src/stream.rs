//! Moving a proxied connection's bytes between a TCP socket and a QUIC stream without copying
//! them through a buffer of ours: what QUIC reassembled goes to the socket as the chunks quinn
//! holds, and socket reads land in shared buffers quinn keeps as they are until acknowledged.
//! Both ends of the tunnel (the egress towards destinations, the consumer towards its local
//! applications) splice with these.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Size of the buffers socket reads land in; a new one is started when less than `READ_MIN`
/// is left, so a chunk quinn holds wastes at most that much of its buffer.
const READ_BUF: usize = 64 * 1024;
const READ_MIN: usize = 16 * 1024;

/// Copies `recv` to `w` until the stream ends, then shuts `w` down; returns the bytes moved.
pub async fn quic_to_tcp<W: AsyncWrite + Unpin>(recv: &mut quinn::RecvStream, w: &mut W) -> std::io::Result<u64> {
    let mut n = 0;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.map_err(std::io::Error::other)? {
        w.write_all(&chunk.bytes).await?;
        n += chunk.bytes.len() as u64;
    }
    w.shutdown().await?;
    Ok(n)
}

/// Copies `r` to `send` until end of file, then finishes the stream; returns the bytes moved.
pub async fn tcp_to_quic<R: AsyncRead + Unpin>(r: &mut R, send: &mut quinn::SendStream) -> std::io::Result<u64> {
    let mut buf = bytes::BytesMut::new();
    let mut n = 0;
    loop {
        if buf.capacity() - buf.len() < READ_MIN {
            buf.reserve(READ_BUF);
        }
        let k = r.read_buf(&mut buf).await?;
        if k == 0 {
            break;
        }
        send.write_chunk(buf.split().freeze()).await.map_err(std::io::Error::other)?;
        n += k as u64;
    }
    send.finish().map_err(std::io::Error::other)?;
    Ok(n)
}
