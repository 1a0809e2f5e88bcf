//! Our yamux client against our yamux server over an in-memory pipe: many
//! concurrent streams, large transfers both ways (content checked byte for
//! byte), half-close, reset, GoAway, pings, streams opened by the server.

use std::time::{Duration, Instant};

use coder_tailnet::yamux::{Config, Error, Session, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(60);

/// xorshift64 byte stream; the receiver regenerates it to check content.
struct Pattern {
    s: u64,
    buf: [u8; 8],
    off: usize,
}

impl Pattern {
    fn new(seed: u64) -> Self {
        Pattern {
            s: if seed == 0 {
                0x9E37_79B9_7F4A_7C15
            } else {
                seed
            },
            buf: [0; 8],
            off: 8,
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.off == 8 {
                self.s ^= self.s << 13;
                self.s ^= self.s >> 7;
                self.s ^= self.s << 17;
                self.buf = self.s.to_le_bytes();
                self.off = 0;
            }
            *b = self.buf[self.off];
            self.off += 1;
        }
    }
}

async fn send_pattern<W: AsyncWriteExt + Unpin>(w: &mut W, seed: u64, len: usize) {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 48 * 1024 + 7];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await.expect("write pattern");
        left -= n;
    }
}

/// Reads to EOF, checking every byte against the pattern.
async fn expect_pattern<R: AsyncReadExt + Unpin>(r: &mut R, seed: u64, len: usize) {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 40 * 1024 + 3];
    let mut want = vec![0u8; buf.len()];
    let mut got = 0usize;
    loop {
        let n = r.read(&mut buf).await.expect("read pattern");
        if n == 0 {
            break;
        }
        p.fill(&mut want[..n]);
        assert!(buf[..n] == want[..n], "content differs near offset {got}");
        got += n;
        assert!(got <= len, "more bytes than sent");
    }
    assert_eq!(got, len, "length");
}

fn quiet() -> Config {
    Config {
        keepalive_interval: None,
        ..Config::default()
    }
}

fn pair(config: Config) -> (Session, Session) {
    let (a, b) = tokio::io::duplex(256 * 1024);
    (
        Session::client(a, config.clone()),
        Session::server(b, config),
    )
}

/// Server side that echoes every stream until EOF, then half-closes.
fn spawn_echo(server: Session) {
    tokio::spawn(async move {
        while let Some(st) = server.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(st);
                tokio::io::copy(&mut r, &mut w).await.expect("echo copy");
                w.shutdown().await.expect("echo fin");
            });
        }
    });
}

async fn echo_roundtrip(st: Stream, seed: u64, len: usize) {
    let (mut r, mut w) = tokio::io::split(st);
    let writer = async {
        send_pattern(&mut w, seed, len).await;
        w.shutdown().await.expect("fin");
    };
    tokio::join!(writer, expect_pattern(&mut r, seed, len));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_streams() {
    let (client, server) = pair(quiet());
    spawn_echo(server.clone());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let st = client.open().await.expect("open");
        tasks.spawn(echo_roundtrip(st, i + 1, 20_000 + (i as usize) * 1531));
    }
    timeout(T, async {
        while let Some(r) = tasks.join_next().await {
            r.expect("stream task");
        }
    })
    .await
    .expect("all streams in time");
    eprintln!("200 concurrent echo streams: {:?}", started.elapsed());
    // Every stream ended cleanly on both sides.
    timeout(T, async {
        while client.num_streams() > 0 || server.num_streams() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("streams cleaned up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_both_ways() {
    const LEN: usize = 32 << 20;
    let (client, server) = pair(quiet());
    let started = Instant::now();
    let srv = tokio::spawn(async move {
        let st = server.accept().await.expect("accept");
        let (mut r, mut w) = tokio::io::split(st);
        let writer = async {
            send_pattern(&mut w, 2, LEN).await;
            w.shutdown().await.expect("fin");
        };
        tokio::join!(writer, expect_pattern(&mut r, 1, LEN));
        server
    });
    let st = client.open().await.expect("open");
    let (mut r, mut w) = tokio::io::split(st);
    let writer = async {
        send_pattern(&mut w, 1, LEN).await;
        w.shutdown().await.expect("fin");
    };
    timeout(T, async {
        tokio::join!(writer, expect_pattern(&mut r, 2, LEN))
    })
    .await
    .expect("transfer in time");
    timeout(T, srv)
        .await
        .expect("server in time")
        .expect("server");
    eprintln!("32 MiB each way on one stream: {:?}", started.elapsed());
}

#[tokio::test]
async fn half_close_then_reply() {
    let (client, server) = pair(quiet());
    let srv = tokio::spawn(async move {
        let mut st = server.accept().await.expect("accept");
        let mut req = Vec::new();
        st.read_to_end(&mut req).await.expect("request to EOF");
        // Our read side is done; writing still works.
        st.write_all(format!("got {} bytes", req.len()).as_bytes())
            .await
            .expect("reply");
        st.shutdown().await.expect("fin");
        server
    });
    let mut st = client.open().await.expect("open");
    st.write_all(&[5u8; 1000]).await.expect("write");
    st.shutdown().await.expect("fin");
    let err = st
        .write_all(b"more")
        .await
        .expect_err("write after shutdown");
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    let mut reply = String::new();
    timeout(T, st.read_to_string(&mut reply))
        .await
        .expect("in time")
        .expect("reply");
    assert_eq!(reply, "got 1000 bytes");
    let _server = srv.await.expect("server");
    drop(st);
    assert_eq!(client.num_streams(), 0);
}

#[tokio::test]
async fn reset_reaches_the_other_side() {
    let (client, server) = pair(quiet());
    let mut st = client.open().await.expect("open");
    st.write_all(b"hi").await.expect("write");
    let mut peer = timeout(T, server.accept())
        .await
        .expect("in time")
        .expect("accept");
    let mut two = [0u8; 2];
    peer.read_exact(&mut two).await.expect("read");
    st.reset();
    let mut buf = [0u8; 4];
    let err = timeout(T, peer.read(&mut buf))
        .await
        .expect("in time")
        .expect_err("reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    // The session carries on.
    let mut st2 = client.open().await.expect("open after reset");
    st2.write_all(b"still here").await.expect("write");
    let mut peer2 = server.accept().await.expect("accept");
    let mut got = [0u8; 10];
    peer2.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"still here");
}

#[tokio::test]
async fn dropping_a_stream_is_a_graceful_close() {
    let (client, server) = pair(quiet());
    let mut st = client.open().await.expect("open");
    st.write_all(b"last words").await.expect("write");
    drop(st);
    let mut peer = timeout(T, server.accept())
        .await
        .expect("in time")
        .expect("accept");
    let mut got = Vec::new();
    peer.read_to_end(&mut got).await.expect("data then EOF");
    assert_eq!(got, b"last words");
    // Whatever the server still sends is discarded by the orphan; its FIN
    // ends the stream on both sides.
    peer.write_all(b"unheard").await.expect("write to orphan");
    peer.shutdown().await.expect("fin");
    drop(peer);
    timeout(T, async {
        loop {
            let ping = client.ping().await;
            assert!(ping.is_ok(), "{ping:?}");
            if server.num_streams() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("cleaned up");
}

#[tokio::test]
async fn server_opens_streams_to_the_client() {
    let (client, server) = pair(quiet());
    spawn_echo(client.clone());
    for i in 0..5u64 {
        let st = server.open().await.expect("open");
        assert_eq!(st.id() % 2, 0);
        echo_roundtrip(st, 100 + i, 300_000).await;
    }
}

#[tokio::test]
async fn pings_both_ways() {
    let (client, server) = pair(quiet());
    for _ in 0..3 {
        let rtt = client.ping().await.expect("client ping");
        assert!(rtt < Duration::from_secs(1));
        server.ping().await.expect("server ping");
    }
}

#[tokio::test]
async fn close_is_seen_by_the_peer() {
    let (client, server) = pair(quiet());
    let mut st = client.open().await.expect("open");
    st.write_all(b"x").await.expect("write");
    let mut peer = server.accept().await.expect("accept");
    timeout(T, server.close()).await.expect("close in time");
    assert_eq!(
        timeout(T, client.closed()).await.expect("in time"),
        Error::RemoteClosed
    );
    assert!(client.open().await.is_err());
    let mut buf = [0u8; 1];
    assert!(st.read(&mut buf).await.is_err());
    // Data that arrived before the close stays readable; then the error.
    assert_eq!(peer.read(&mut buf).await.expect("buffered byte"), 1);
    assert!(peer.read(&mut buf).await.is_err());
    assert_eq!(server.closed().await, Error::Closed);
}

#[tokio::test]
async fn keepalive_between_our_own_sides() {
    let config = Config {
        keepalive_interval: Some(Duration::from_millis(20)),
        ping_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    let (client, server) = pair(config);
    // Long enough for an unanswered ping to have timed out.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!client.is_closed());
    assert!(!server.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_does_not_block_other_streams() {
    let (client, server) = pair(quiet());
    let srv = tokio::spawn(async move {
        // First stream: never read. Second: echo.
        let stalled = server.accept().await.expect("accept 1");
        let st = server.accept().await.expect("accept 2");
        let (mut r, mut w) = tokio::io::split(st);
        tokio::io::copy(&mut r, &mut w).await.expect("copy");
        w.shutdown().await.expect("fin");
        (server, stalled)
    });
    let mut blocked = client.open().await.expect("open 1");
    // Fills the window, then blocks: the writer must not hold up others.
    let stuck = tokio::spawn(async move {
        let _ = blocked.write_all(&vec![0u8; 1 << 20]).await;
        blocked
    });
    let st = client.open().await.expect("open 2");
    timeout(Duration::from_secs(20), echo_roundtrip(st, 9, 2 << 20))
        .await
        .expect("second stream unaffected");
    assert!(!stuck.is_finished(), "first writer waits for window");
    client.ping().await.expect("pongs still flow");
    stuck.abort();
    drop(srv);
}
