//! The HTTP/1.1 side of an upgrade, shared by the DERP dialer
//! (`Upgrade: DERP`), the websocket dialer and the simulator's DERP
//! acceptor: read a message head with a size bound, read (part of) an error
//! body when the server said no, and hand back the upgraded stream with any
//! bytes that arrived after the head replayed first.
//!
//! A refusal's body says why (coderd answers with Coder's error JSON), and
//! it often arrives in a later TCP segment than the head: reading it here,
//! bounded in size and time, keeps the error message independent of how the
//! server's writes were split.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Largest response head (status line + headers) we read.
pub const MAX_RESPONSE_HEAD: usize = 16 << 10;
/// Largest part of an error body we keep.
pub const MAX_ERROR_BODY: usize = 8 << 10;
/// How long we wait for the rest of an error body.
pub const ERROR_BODY_WAIT: Duration = Duration::from_secs(2);

/// A parsed response head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseHead {
    pub code: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    /// The first value of a header (names compare case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a response head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the server sent a malformed HTTP response: {0}")]
    Bad(&'static str),
    #[error("the HTTP response head exceeds {MAX_RESPONSE_HEAD} bytes")]
    TooLarge,
}

/// Reads a response head from `io`; returns it and the bytes that came
/// after it.
pub async fn read_response_head<S>(io: &mut S) -> Result<(ResponseHead, Bytes), HeadError>
where
    S: AsyncRead + Unpin,
{
    let (head, rest) = read_head(io).await?;
    Ok((parse_response_head(&head)?, rest))
}

/// Reads an HTTP/1 message head (request or response, up to the blank line;
/// at most [`MAX_RESPONSE_HEAD`] bytes) and returns it as text with the
/// bytes that came after it.
pub async fn read_head<S>(io: &mut S) -> Result<(String, Bytes), HeadError>
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(pos) = find_head_end(&buf) {
            break pos;
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(HeadError::TooLarge);
        }
        let mut chunk = [0u8; 2048];
        let want = chunk.len().min(MAX_RESPONSE_HEAD + 4 - buf.len());
        let n = io.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(HeadError::Bad("connection closed before the head ended"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| HeadError::Bad("the head is not UTF-8"))?
        .to_string();
    Ok((head, Bytes::copy_from_slice(&buf[head_end + 4..])))
}

/// Reads what a refusal's body holds, up to [`MAX_ERROR_BODY`] bytes and
/// [`ERROR_BODY_WAIT`]: all of a `Content-Length` body, else (chunked, or
/// delimited by the connection's close) whatever arrives in that time.
/// `already` is what came with the head. Chunk framing is removed.
pub async fn read_error_body<S>(io: &mut S, head: &ResponseHead, already: Bytes) -> Vec<u8>
where
    S: AsyncRead + Unpin,
{
    let want = head
        .header("Content-Length")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(|n| n.min(MAX_ERROR_BODY));
    let chunked = head
        .header("Transfer-Encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let mut body = already.to_vec();
    let read_more = async {
        let mut chunk = [0u8; 2048];
        loop {
            if want.is_some_and(|n| body.len() >= n) || body.len() >= MAX_ERROR_BODY {
                break;
            }
            if chunked && body.windows(5).any(|w| w == b"0\r\n\r\n") {
                break;
            }
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(ERROR_BODY_WAIT, read_more).await;
    if chunked {
        body = dechunk(&body);
    }
    body.truncate(want.unwrap_or(MAX_ERROR_BODY).min(MAX_ERROR_BODY));
    body
}

/// Removes chunked transfer framing from as much as arrived.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size_text = std::str::from_utf8(&raw[..eol]).unwrap_or("");
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            break;
        };
        raw = &raw[eol + 2..];
        if size == 0 {
            break;
        }
        let take = size.min(raw.len());
        out.extend_from_slice(&raw[..take]);
        if take < size || raw.len() < size + 2 {
            break;
        }
        raw = &raw[size + 2..];
    }
    out
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Parses a response head (status line and headers, without the blank
/// line), for callers that read the head themselves.
pub fn parse_response_head(head: &str) -> Result<ResponseHead, HeadError> {
    let mut lines = head.split("\r\n");
    let status = lines.next().ok_or(HeadError::Bad("empty response"))?;
    let mut parts = status.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(HeadError::Bad("not an HTTP/1.x status line"));
    }
    let code = parts
        .next()
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or(HeadError::Bad("bad status code"))?;
    let reason = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or(HeadError::Bad("header line without a colon"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(ResponseHead {
        code,
        reason,
        headers,
    })
}

/// A stream after an upgrade: replays bytes read past the response head,
/// then reads from the inner stream. Writes go straight through.
#[derive(Debug)]
pub struct Upgraded<S> {
    prefix: Bytes,
    io: S,
}

impl<S> Upgraded<S> {
    pub fn new(prefix: Bytes, io: S) -> Self {
        Upgraded { prefix, io }
    }

    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.io)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Upgraded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Upgraded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_body_that_arrives_after_the_head_is_read_whole() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let body = br#"{"message":"Unknown or unsupported API version"}"#;
        let head = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let srv = tokio::spawn(async move {
            server.write_all(head.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            server.write_all(body).await.unwrap();
            server
        });
        let (h, rest) = read_response_head(&mut client).await.unwrap();
        assert_eq!(h.code, 400);
        assert_eq!(h.header("content-type"), Some("application/json"));
        let got = read_error_body(&mut client, &h, rest).await;
        assert_eq!(got, body);
        drop(srv.await.unwrap());
    }

    #[tokio::test]
    async fn a_chunked_body_loses_its_framing() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        server
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            .await
            .unwrap();
        let (h, rest) = read_response_head(&mut client).await.unwrap();
        assert_eq!(h.code, 502);
        assert_eq!(read_error_body(&mut client, &h, rest).await, b"hello world");
    }

    #[tokio::test]
    async fn a_silent_server_costs_at_most_the_wait() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        server
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 100\r\n\r\npartial")
            .await
            .unwrap();
        let (h, rest) = read_response_head(&mut client).await.unwrap();
        let t = std::time::Instant::now();
        assert_eq!(read_error_body(&mut client, &h, rest).await, b"partial");
        assert!(t.elapsed() < ERROR_BODY_WAIT + Duration::from_secs(1));
        drop(server);
    }

    #[tokio::test]
    async fn oversized_and_malformed_heads_fail() {
        let (mut client, mut server) = tokio::io::duplex(64 << 10);
        let big = format!(
            "HTTP/1.1 200 OK\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_RESPONSE_HEAD)
        );
        server.write_all(big.as_bytes()).await.unwrap();
        assert!(matches!(
            read_response_head(&mut client).await,
            Err(HeadError::TooLarge)
        ));
        let (mut client, mut server) = tokio::io::duplex(4096);
        server.write_all(b"SSH-2.0-x\r\n\r\n").await.unwrap();
        assert!(matches!(
            read_response_head(&mut client).await,
            Err(HeadError::Bad(_))
        ));
    }
}
