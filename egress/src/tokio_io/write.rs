//! Writing a message of DATA frames without copying them: the header and the frames as they are
//! queued, in as few `writev`s as the socket takes.

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// DATA frames in one message at most (one `writev` takes them all with the header).
pub(super) const MAX_BATCH: usize = 64;

/// Writes `head` then every frame of `body`, in as few `writev`s as the socket takes.
pub(super) async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    head: &[u8],
    body: &[Bytes],
) -> std::io::Result<()> {
    let mut iov = [std::io::IoSlice::new(&[]); MAX_BATCH + 1];
    iov[0] = std::io::IoSlice::new(head);
    for (slot, f) in iov[1..].iter_mut().zip(body) {
        *slot = std::io::IoSlice::new(f);
    }
    let mut iov = &mut iov[..=body.len().min(MAX_BATCH)];
    while !iov.is_empty() {
        let n = w.write_vectored(iov).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut iov, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Takes at most `max` bytes per write, the way a full socket does.
    struct Trickle {
        out: Vec<u8>,
        max: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut left = self.max;
            for b in bufs {
                let n = b.len().min(left);
                self.out.extend_from_slice(&b[..n]);
                left -= n;
            }
            Poll::Ready(Ok(self.max - left))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_batch_arrives_whole_and_in_order_through_short_writes() {
        let frames: Vec<Bytes> =
            (0..5u8).map(|i| Bytes::from(vec![i; 3 + 5 * i as usize])).chain([Bytes::new()]).collect();
        let mut want = vec![0x82, 65];
        for f in &frames {
            want.extend_from_slice(f);
        }
        for max in [1, 2, 7, 64, 1000] {
            let mut w = Trickle { out: Vec::new(), max };
            write_all_vectored(&mut w, &[0x82, 65], &frames).await.unwrap();
            assert_eq!(w.out, want, "max {max}");
        }
    }

    #[tokio::test]
    async fn a_socket_that_takes_nothing_is_an_error_not_a_spin() {
        let mut w = Trickle { out: Vec::new(), max: 0 };
        let e = write_all_vectored(&mut w, &[0x82, 1], &[Bytes::from_static(b"x")]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WriteZero);
    }
}
