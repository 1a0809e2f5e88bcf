//! A websocket as a byte stream.
//!
//! Coder wraps the coordinate websocket (and DERP's websocket fallback) as
//! a plain byte stream: every write is one binary message, reads
//! concatenate message payloads, and message boundaries mean nothing. This
//! adapter gives any tungstenite `WebSocketStream` the same shape
//! (`AsyncRead + AsyncWrite`) so yamux and DERP can run over it. Pings are
//! answered by tungstenite itself while we read; a text message is a
//! protocol error; a close frame is EOF.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;

/// Byte-stream view of a websocket.
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// Unread part of the last binary message.
    leftover: Bytes,
    eof: bool,
}

impl<S> WsStream<S> {
    pub fn new(inner: WebSocketStream<S>) -> Self {
        WsStream {
            inner,
            leftover: Bytes::new(),
            eof: false,
        }
    }
}

fn to_io(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::ConnectionClosed | E::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        E::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.leftover.is_empty() {
                let n = self.leftover.len().min(buf.remaining());
                let chunk = self.leftover.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                None => {
                    self.eof = true;
                }
                Some(Ok(Message::Binary(b))) => self.leftover = b,
                Some(Ok(Message::Close(_))) => self.eof = true,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "unexpected text message on a binary websocket stream",
                    )))
                }
                Some(Err(e)) => {
                    use tokio_tungstenite::tungstenite::Error as E;
                    if matches!(e, E::ConnectionClosed | E::AlreadyClosed) {
                        self.eof = true;
                    } else {
                        return Poll::Ready(Err(to_io(e)));
                    }
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.inner).poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut self.inner)
            .start_send(Message::Binary(Bytes::copy_from_slice(data)))
            .map_err(to_io)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.inner).poll_close(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => {
                use tokio_tungstenite::tungstenite::Error as E;
                if matches!(e, E::ConnectionClosed | E::AlreadyClosed) {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Ready(Err(to_io(e)))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    #[tokio::test]
    async fn bytes_cross_message_boundaries() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        let mut c = WsStream::new(client);
        let mut s = WsStream::new(server);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let send = data.clone();
        let w = tokio::spawn(async move {
            for chunk in send.chunks(7777) {
                c.write_all(chunk).await.unwrap();
            }
            c.flush().await.unwrap();
            c.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        w.await.unwrap();
        assert!(got == data);
    }
}
