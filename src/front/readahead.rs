//! The read-ahead under rustls: a TLS socket read in large blocks.

use tokio::io::{AsyncRead, AsyncWrite};

/// A TLS connection's socket, read up to [`READ_AHEAD`] bytes at a time.
///
/// rustls asks its transport for at most 4 KiB per read, so a device
/// streaming chunks (~2 KiB each) cost one `recv` system call per two
/// chunks — the largest part of the front's kernel time. The buffer exists
/// only while the socket has data: it is freed when a read would block, so
/// an idle connection (most of 1,000) holds none.
pub(super) struct ReadAhead<S> {
    inner: S,
    buf: Option<Box<[std::mem::MaybeUninit<u8>]>>,
    /// `buf[pos..end]` is read and not yet handed out.
    pos: usize,
    end: usize,
    /// Size of the next buffer: 4 KiB until a read fills one (handshakes,
    /// CONNECT, a few commands), then [`READ_AHEAD`].
    cap: usize,
}

const READ_AHEAD: usize = 64 * 1024;

impl<S> ReadAhead<S> {
    pub(super) fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: None,
            pos: 0,
            end: 0,
            cap: 4096,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let me = self.get_mut();
        if me.pos == me.end {
            if out.remaining() >= READ_AHEAD {
                me.buf = None;
                return std::pin::Pin::new(&mut me.inner).poll_read(cx, out);
            }
            let cap = me.cap;
            if me.buf.as_ref().is_some_and(|b| b.len() < cap) {
                me.buf = None;
            }
            let buf = me.buf.get_or_insert_with(|| Box::new_uninit_slice(cap));
            let mut rb = tokio::io::ReadBuf::uninit(buf);
            match std::pin::Pin::new(&mut me.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    (me.pos, me.end) = (0, rb.filled().len());
                    if me.end == me.cap && me.cap < READ_AHEAD {
                        me.cap = READ_AHEAD;
                    }
                    if me.end == 0 {
                        me.buf = None;
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(e)) => {
                    me.buf = None;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    me.buf = None;
                    return Poll::Pending;
                }
            }
        }
        let Some(buf) = me.buf.as_ref() else {
            return Poll::Ready(Ok(()));
        };
        let n = out.remaining().min(me.end - me.pos);
        // SAFETY: `buf[..end]` was filled by the read above.
        let filled = unsafe { std::slice::from_raw_parts(buf[me.pos..].as_ptr().cast::<u8>(), n) };
        out.put_slice(filled);
        me.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// rustls' 4 KiB reads through the read-ahead get every byte in order,
    /// and the buffer is gone once the socket has nothing more.
    #[tokio::test]
    async fn read_ahead_passes_every_byte_and_frees_when_idle() {
        let (mut w, r) = tokio::io::duplex(8 * 1024);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for part in sent.chunks(3_000) {
                w.write_all(part).await.unwrap();
            }
            w
        });
        let mut ra = ReadAhead::new(r);
        let mut got = Vec::new();
        while got.len() < data.len() {
            let mut b = [0u8; 4096];
            let n = ra.read(&mut b).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&b[..n]);
        }
        assert_eq!(got, data);
        // A filled 4 KiB buffer moved it to the full size.
        assert_eq!(ra.cap, READ_AHEAD);
        let _w = writer.await.unwrap();
        // Nothing left to read: the read is pending and the buffer freed.
        let mut b = [0u8; 16];
        let mut b = tokio::io::ReadBuf::new(&mut b);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(std::pin::Pin::new(&mut ra)
            .poll_read(&mut cx, &mut b)
            .is_pending());
        assert!(ra.buf.is_none());
    }
}
