//! Writing a binary message whose payload is already in pieces (DATA frames as they were
//! queued, a frame header beside the packet it came with) without copying them together: the
//! WebSocket header and the pieces go to the socket in as few `writev`s as it takes.
//!
//! The I/O vectors are built on the stack of each poll, never held across an await, so the
//! future stays a few words long: a tokio connection task embeds it whether or not the
//! connection ever sends data.

use crate::{frame_header_into, MAX_HEADER};
use bytes::Bytes;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::Poll;
use tokio::io::AsyncWrite;

/// I/O vectors per `writev` at most (a message of more pieces takes several).
const IOV: usize = 64;

/// Writes one final, unmasked binary message (a server's) whose payload is `parts` in order;
/// returns the payload's length.
pub async fn write_binary_message<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, parts: &[Bytes]) -> io::Result<usize> {
    let len: usize = parts.iter().map(Bytes::len).sum();
    let mut h = [0u8; MAX_HEADER];
    let head: &[u8] = frame_header_into(0x2, len, &mut h);
    let total = head.len() + len;
    let mut done = 0;
    poll_fn(|cx| {
        while done < total {
            let mut iov = [IoSlice::new(&[]); IOV];
            let n = fill(&mut iov, head, parts, done);
            match Pin::new(&mut *w).poll_write_vectored(cx, &iov[..n]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(k)) => done += k,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(len))
    })
    .await
}

/// Fills `iov` with what is left of `head` then `parts` after the first `skip` bytes; returns
/// how many vectors it used.
fn fill<'a>(iov: &mut [IoSlice<'a>; IOV], head: &'a [u8], parts: &'a [Bytes], mut skip: usize) -> usize {
    let mut n = 0;
    for piece in std::iter::once(head).chain(parts.iter().map(|b| &b[..])) {
        if skip >= piece.len() {
            skip -= piece.len();
            continue;
        }
        iov[n] = IoSlice::new(&piece[skip..]);
        skip = 0;
        n += 1;
        if n == IOV {
            break;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Context;

    /// Takes at most `max` bytes per write, the way a full socket does.
    struct Trickle {
        out: Vec<u8>,
        max: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
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
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    #[test]
    fn a_message_arrives_whole_and_in_order_through_short_writes() {
        // More pieces than one writev takes, an empty one among them, lengths past 125.
        let parts: Vec<Bytes> =
            (0..150u32).map(|i| Bytes::from(vec![i as u8; if i == 7 { 0 } else { 1 + (i as usize % 9) }])).collect();
        let payload: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let mut want = Vec::new();
        crate::frame_header(0x2, payload.len(), &mut want);
        want.extend_from_slice(&payload);
        for max in [1, 2, 7, 64, 100_000] {
            let mut w = Trickle { out: Vec::new(), max };
            assert_eq!(block_on(write_binary_message(&mut w, &parts)).unwrap(), payload.len());
            assert_eq!(w.out, want, "max {max}");
        }
    }

    #[test]
    fn a_socket_that_takes_nothing_is_an_error_not_a_spin() {
        let mut w = Trickle { out: Vec::new(), max: 0 };
        let e = block_on(write_binary_message(&mut w, &[Bytes::from_static(b"x")])).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WriteZero);
    }

    #[test]
    fn the_future_holds_no_vectors() {
        let mut w = Trickle { out: Vec::new(), max: 1 };
        let parts = [Bytes::from_static(b"x")];
        let size = std::mem::size_of_val(&write_binary_message(&mut w, &parts));
        assert!(size <= 160, "{size} bytes: the I/O vectors must live on the stack of a poll");
    }
}
