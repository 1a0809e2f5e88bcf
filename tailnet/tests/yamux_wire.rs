//! yamux at the byte level: header vectors, and a session driven by a
//! hand-written peer on the other end of an in-memory pipe, checking the
//! exact frames it sends (SYN/ACK, pings, window accounting, GoAway, RST).

use std::time::Duration;

use coder_tailnet::yamux::{
    flags, go_away, Config, Error, FrameType, Header, HeaderError, Session, HEADER_LEN,
    INITIAL_WINDOW,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(5);

fn hdr(t: FrameType, f: u16, id: u32, len: u32) -> [u8; HEADER_LEN] {
    Header::new(t, f, id, len).encode()
}

/// A session on one end of a pipe, the raw peer on the other.
fn pair(client: bool, config: Config) -> (Session, DuplexStream) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let s = if client {
        Session::client(a, config)
    } else {
        Session::server(a, config)
    };
    (s, b)
}

fn quiet() -> Config {
    Config {
        keepalive_interval: None,
        ..Config::default()
    }
}

async fn read_frame(io: &mut DuplexStream) -> (Header, Vec<u8>) {
    let mut raw = [0u8; HEADER_LEN];
    timeout(T, io.read_exact(&mut raw))
        .await
        .expect("frame in time")
        .expect("read header");
    let h = Header::decode(&raw).expect("valid header");
    let mut payload = Vec::new();
    if h.frame_type == FrameType::Data {
        payload.resize(h.length as usize, 0);
        io.read_exact(&mut payload).await.expect("read payload");
    }
    (h, payload)
}

async fn read_raw(io: &mut DuplexStream) -> [u8; HEADER_LEN] {
    let mut raw = [0u8; HEADER_LEN];
    timeout(T, io.read_exact(&mut raw))
        .await
        .expect("frame in time")
        .expect("read header");
    raw
}

async fn send(io: &mut DuplexStream, h: [u8; HEADER_LEN], payload: &[u8]) {
    io.write_all(&h).await.expect("write header");
    io.write_all(payload).await.expect("write payload");
}

/// Round-trips a ping through the session so that everything the peer sent
/// before it has been processed.
async fn sync_peer(io: &mut DuplexStream) {
    send(io, hdr(FrameType::Ping, flags::SYN, 0, 0x5151), &[]).await;
    loop {
        let (h, _) = read_frame(io).await;
        if h.frame_type == FrameType::Ping && h.length == 0x5151 {
            assert_eq!(h.flags, flags::ACK);
            return;
        }
    }
}

#[test]
fn header_vectors() {
    let cases: &[(Header, [u8; 12])] = &[
        (
            Header::new(FrameType::Data, 0, 1, 5),
            [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5],
        ),
        (
            Header::new(FrameType::Data, flags::SYN, 1, 5),
            [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 5],
        ),
        (
            Header::new(FrameType::WindowUpdate, flags::SYN, 1, 0),
            [0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0],
        ),
        (
            Header::new(FrameType::WindowUpdate, flags::ACK, 2, 0x0004_0000),
            [0, 1, 0, 2, 0, 0, 0, 2, 0, 4, 0, 0],
        ),
        (
            Header::new(FrameType::WindowUpdate, flags::FIN, 3, 0),
            [0, 1, 0, 4, 0, 0, 0, 3, 0, 0, 0, 0],
        ),
        (
            Header::new(FrameType::WindowUpdate, flags::RST, 0x0102_0304, 0),
            [0, 1, 0, 8, 1, 2, 3, 4, 0, 0, 0, 0],
        ),
        (
            Header::new(FrameType::Ping, flags::SYN, 0, 0xdead_beef),
            [0, 2, 0, 1, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef],
        ),
        (
            Header::new(FrameType::Ping, flags::ACK, 0, 0xdead_beef),
            [0, 2, 0, 2, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef],
        ),
        (
            Header::new(FrameType::GoAway, 0, 0, go_away::NORMAL),
            [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
        (
            Header::new(FrameType::GoAway, 0, 0, go_away::PROTOCOL_ERROR),
            [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        ),
        (
            Header::new(FrameType::GoAway, 0, 0, go_away::INTERNAL_ERROR),
            [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        ),
        (
            Header::new(
                FrameType::Data,
                flags::SYN | flags::ACK | flags::FIN | flags::RST,
                u32::MAX,
                u32::MAX,
            ),
            [
                0, 0, 0, 0x0f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        ),
    ];
    for (h, bytes) in cases {
        assert_eq!(&h.encode(), bytes, "{h:?}");
        assert_eq!(Header::decode(bytes).as_ref(), Ok(h));
    }
    // Unknown flag bits survive decoding (the session ignores them).
    let h = Header::decode(&[0, 1, 0x80, 0x11, 0, 0, 0, 7, 0, 0, 0, 0]).expect("decodes");
    assert_eq!(h.flags, 0x8011);
    assert_eq!(
        Header::decode(&[1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]),
        Err(HeaderError::Version(1))
    );
    assert_eq!(
        Header::decode(&[0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        Err(HeaderError::FrameType(4))
    );
}

#[tokio::test]
async fn open_sends_syn_window_update_then_data() {
    let (s, mut peer) = pair(true, quiet());
    let mut st = s.open().await.expect("open");
    assert_eq!(st.id(), 1);
    st.write_all(b"hello").await.expect("write");
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]
    );
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5]
    );
    let mut body = [0u8; 5];
    peer.read_exact(&mut body).await.expect("payload");
    assert_eq!(&body, b"hello");
    let st2 = s.open().await.expect("open 2");
    assert_eq!(st2.id(), 3, "client IDs are odd and increase by 2");
    drop((st, st2, s));
}

#[tokio::test]
async fn larger_window_is_announced_additively() {
    let config = Config {
        max_stream_window: 1 << 20,
        ..quiet()
    };
    let (s, mut peer) = pair(false, config);
    let st = s.open().await.expect("open");
    assert_eq!(st.id(), 2, "server IDs are even");
    // 1 MiB - 256 KiB = 0x000c0000 on top of the implicit initial window.
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 1, 0, 1, 0, 0, 0, 2, 0, 0x0c, 0, 0]
    );
    // The peer may now send the full 1 MiB without a protocol error.
    let chunk = vec![7u8; 256 * 1024];
    for _ in 0..4 {
        send(
            &mut peer,
            hdr(FrameType::Data, 0, 2, chunk.len() as u32),
            &chunk,
        )
        .await;
    }
    sync_peer(&mut peer).await;
    assert!(!s.is_closed());
    drop(st);
}

#[tokio::test]
async fn server_accepts_syn_on_a_data_frame_and_acks() {
    let (s, mut peer) = pair(false, quiet());
    send(&mut peer, [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 5], b"hello").await;
    let mut st = timeout(T, s.accept())
        .await
        .expect("in time")
        .expect("stream");
    assert_eq!(st.id(), 1);
    let mut body = [0u8; 5];
    st.read_exact(&mut body).await.expect("read");
    assert_eq!(&body, b"hello");
    // ACK as a window update with delta 0 (default window).
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 1, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0]
    );
}

#[tokio::test]
async fn ping_is_echoed_with_ack() {
    let (_s, mut peer) = pair(true, quiet());
    send(
        &mut peer,
        [0, 2, 0, 1, 0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78],
        &[],
    )
    .await;
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 2, 0, 2, 0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78]
    );
}

#[tokio::test]
async fn our_ping_waits_for_matching_ack() {
    let (s, mut peer) = pair(true, quiet());
    let pinger = tokio::spawn({
        let s = s.clone();
        async move { s.ping().await }
    });
    let (h, _) = read_frame(&mut peer).await;
    assert_eq!(
        (h.frame_type, h.flags, h.stream_id),
        (FrameType::Ping, flags::SYN, 0)
    );
    // A reply with another value must not complete it.
    send(
        &mut peer,
        hdr(FrameType::Ping, flags::ACK, 0, h.length.wrapping_add(9)),
        &[],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!pinger.is_finished());
    send(
        &mut peer,
        hdr(FrameType::Ping, flags::ACK, 0, h.length),
        &[],
    )
    .await;
    let rtt = timeout(T, pinger).await.expect("in time").expect("join");
    assert!(rtt.is_ok(), "{rtt:?}");
}

#[tokio::test]
async fn ping_times_out_without_killing_the_session() {
    let config = Config {
        ping_timeout: Duration::from_millis(100),
        ..quiet()
    };
    let (s, mut peer) = pair(true, config);
    let res = s.ping().await;
    assert_eq!(res, Err(Error::PingTimeout(Duration::from_millis(100))));
    let _ = read_frame(&mut peer).await;
    assert!(!s.is_closed());
}

#[tokio::test]
async fn sender_never_exceeds_the_peer_window() {
    let (s, mut peer) = pair(true, quiet());
    let mut st = s.open().await.expect("open");
    let total = 300 * 1024;
    let writer = tokio::spawn(async move {
        st.write_all(&vec![1u8; total]).await.expect("write");
        st.shutdown().await.expect("fin");
        st
    });
    let (syn, _) = read_frame(&mut peer).await;
    assert_eq!(syn.flags, flags::SYN);
    let mut got = 0usize;
    while got < INITIAL_WINDOW as usize {
        let (h, p) = read_frame(&mut peer).await;
        assert_eq!(h.frame_type, FrameType::Data);
        got += p.len();
    }
    assert_eq!(got, INITIAL_WINDOW as usize, "exactly one window, no more");
    // Nothing more may arrive until we open the window.
    let mut one = [0u8; 1];
    assert!(
        timeout(Duration::from_millis(200), peer.read_exact(&mut one))
            .await
            .is_err(),
        "data beyond the window"
    );
    send(
        &mut peer,
        hdr(FrameType::WindowUpdate, flags::ACK, 1, 64 * 1024),
        &[],
    )
    .await;
    while got < total {
        let (h, p) = read_frame(&mut peer).await;
        assert_eq!(h.frame_type, FrameType::Data);
        got += p.len();
    }
    assert_eq!(got, total);
    let (fin, _) = read_frame(&mut peer).await;
    assert_eq!(
        (fin.frame_type, fin.flags),
        (FrameType::WindowUpdate, flags::FIN)
    );
    let _st = timeout(T, writer).await.expect("in time").expect("join");
}

#[tokio::test]
async fn window_update_sent_when_half_the_window_is_consumed() {
    let (s, mut peer) = pair(false, quiet());
    send(
        &mut peer,
        hdr(FrameType::WindowUpdate, flags::SYN, 1, 0),
        &[],
    )
    .await;
    let chunk = vec![9u8; 64 * 1024];
    for _ in 0..4 {
        send(
            &mut peer,
            hdr(FrameType::Data, 0, 1, chunk.len() as u32),
            &chunk,
        )
        .await;
    }
    let mut st = timeout(T, s.accept())
        .await
        .expect("in time")
        .expect("stream");
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 1, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0]
    );

    let mut buf = vec![0u8; 128 * 1024 - 1];
    st.read_exact(&mut buf).await.expect("read");
    let mut probe = [0u8; 1];
    assert!(
        timeout(Duration::from_millis(150), peer.read_exact(&mut probe))
            .await
            .is_err(),
        "no window update before half the window is consumed"
    );
    st.read_exact(&mut probe).await.expect("read one more");
    // Delta = everything consumed so far = 128 KiB.
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 1, 0, 0, 0, 0, 0, 1, 0, 2, 0, 0]
    );

    // The peer may now send 128 KiB more, but not a byte beyond that.
    let big = vec![1u8; 128 * 1024];
    send(
        &mut peer,
        hdr(FrameType::Data, 0, 1, big.len() as u32),
        &big,
    )
    .await;
    sync_peer(&mut peer).await;
    assert!(!s.is_closed());
    send(&mut peer, hdr(FrameType::Data, 0, 1, 1), &[1]).await;
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    );
    assert!(matches!(
        timeout(T, s.closed()).await.expect("in time"),
        Error::Protocol(_)
    ));
}

#[tokio::test]
async fn unknown_flags_are_ignored() {
    let (s, mut peer) = pair(false, quiet());
    send(
        &mut peer,
        hdr(FrameType::WindowUpdate, flags::SYN | 0x0100, 1, 0),
        &[],
    )
    .await;
    send(&mut peer, hdr(FrameType::Data, 0x8000, 1, 2), b"ok").await;
    let mut st = timeout(T, s.accept())
        .await
        .expect("in time")
        .expect("stream");
    let mut body = [0u8; 2];
    st.read_exact(&mut body).await.expect("read");
    assert_eq!(&body, b"ok");
    assert!(!s.is_closed());
}

#[tokio::test]
async fn bad_version_is_a_protocol_error() {
    let (s, mut peer) = pair(true, quiet());
    send(&mut peer, [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[]).await;
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    );
    assert!(matches!(
        timeout(T, s.closed()).await.expect("in time"),
        Error::Protocol(_)
    ));
    assert!(s.open().await.is_err());
}

#[tokio::test]
async fn syn_in_our_id_space_or_duplicate_is_a_protocol_error() {
    let (s, mut peer) = pair(true, quiet());
    // Clients own odd IDs; a server must open even ones.
    send(
        &mut peer,
        hdr(FrameType::WindowUpdate, flags::SYN, 3, 0),
        &[],
    )
    .await;
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    );
    assert!(matches!(s.closed().await, Error::Protocol(_)));

    let (s, mut peer) = pair(true, quiet());
    send(
        &mut peer,
        hdr(FrameType::WindowUpdate, flags::SYN, 2, 0),
        &[],
    )
    .await;
    send(
        &mut peer,
        hdr(FrameType::WindowUpdate, flags::SYN, 2, 0),
        &[],
    )
    .await;
    loop {
        let (h, _) = read_frame(&mut peer).await;
        if h.frame_type == FrameType::GoAway {
            assert_eq!(h.length, go_away::PROTOCOL_ERROR);
            break;
        }
    }
    assert!(matches!(s.closed().await, Error::Protocol(_)));
}

#[tokio::test]
async fn goaway_normal_refuses_new_streams_but_keeps_old_ones() {
    let (s, mut peer) = pair(true, quiet());
    let mut st = s.open().await.expect("open");
    send(
        &mut peer,
        hdr(FrameType::GoAway, 0, 0, go_away::NORMAL),
        &[],
    )
    .await;
    sync_peer(&mut peer).await;
    assert_eq!(s.open().await.err(), Some(Error::GoAwayReceived));
    send(&mut peer, hdr(FrameType::Data, flags::ACK, 1, 3), b"abc").await;
    let mut body = [0u8; 3];
    st.read_exact(&mut body)
        .await
        .expect("old stream still works");
    assert_eq!(&body, b"abc");
    assert!(!s.is_closed());
}

#[tokio::test]
async fn goaway_error_ends_the_session() {
    let (s, mut peer) = pair(true, quiet());
    let mut st = s.open().await.expect("open");
    send(
        &mut peer,
        hdr(FrameType::GoAway, 0, 0, go_away::INTERNAL_ERROR),
        &[],
    )
    .await;
    assert_eq!(
        timeout(T, s.closed()).await.expect("in time"),
        Error::RemoteGoAway(2)
    );
    let mut buf = [0u8; 1];
    assert!(
        st.read(&mut buf).await.is_err(),
        "streams fail with the session"
    );
}

#[tokio::test]
async fn unanswered_keepalive_ends_the_session() {
    let config = Config {
        keepalive_interval: Some(Duration::from_millis(50)),
        ping_timeout: Duration::from_millis(150),
        ..Config::default()
    };
    let (s, mut peer) = pair(true, config);
    // Swallow everything, answer nothing.
    tokio::spawn(async move {
        let mut sink = vec![0u8; 4096];
        while matches!(peer.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    assert_eq!(
        timeout(T, s.closed()).await.expect("in time"),
        Error::KeepAliveTimeout(Duration::from_millis(150))
    );
}

#[tokio::test]
async fn answered_keepalive_keeps_the_session() {
    let config = Config {
        keepalive_interval: Some(Duration::from_millis(30)),
        ping_timeout: Duration::from_millis(200),
        ..Config::default()
    };
    let (s, mut peer) = pair(true, config);
    let mut pings = 0;
    while pings < 5 {
        let (h, _) = read_frame(&mut peer).await;
        if h.frame_type == FrameType::Ping && h.flags == flags::SYN {
            send(
                &mut peer,
                hdr(FrameType::Ping, flags::ACK, 0, h.length),
                &[],
            )
            .await;
            pings += 1;
        }
    }
    assert!(!s.is_closed());
}

#[tokio::test]
async fn rst_from_peer_fails_reads_and_writes() {
    let (s, mut peer) = pair(false, quiet());
    send(
        &mut peer,
        hdr(FrameType::WindowUpdate, flags::SYN, 1, 0),
        &[],
    )
    .await;
    let mut st = timeout(T, s.accept())
        .await
        .expect("in time")
        .expect("stream");
    send(&mut peer, hdr(FrameType::Data, 0, 1, 4), b"lost").await;
    send(
        &mut peer,
        hdr(FrameType::WindowUpdate, flags::RST, 1, 0),
        &[],
    )
    .await;
    sync_peer(&mut peer).await;
    let mut buf = [0u8; 8];
    let err = st.read(&mut buf).await.expect_err("reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    let err = st.write_all(b"x").await.expect_err("reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(!s.is_closed(), "a reset ends one stream, not the session");
}

#[tokio::test]
async fn our_reset_sends_rst() {
    let (s, mut peer) = pair(true, quiet());
    let st = s.open().await.expect("open");
    st.reset();
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]
    );
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 1, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0]
    );
    assert_eq!(s.num_streams(), 0);
}

#[tokio::test]
async fn full_backlog_refuses_with_rst() {
    let config = Config {
        accept_backlog: 2,
        ..quiet()
    };
    let (s, mut peer) = pair(false, config);
    for id in [1u32, 3, 5] {
        send(
            &mut peer,
            hdr(FrameType::WindowUpdate, flags::SYN, id, 0),
            &[],
        )
        .await;
    }
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 1, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0]
    );
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 1, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0]
    );
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 1, 0, 8, 0, 0, 0, 5, 0, 0, 0, 0]
    );
    assert_eq!(s.accept().await.map(|st| st.id()), Some(1));
    assert_eq!(s.accept().await.map(|st| st.id()), Some(3));
}

#[tokio::test]
async fn data_for_unknown_stream_is_skipped() {
    let (s, mut peer) = pair(true, quiet());
    send(&mut peer, hdr(FrameType::Data, 0, 41, 5), b"stale").await;
    send(&mut peer, hdr(FrameType::WindowUpdate, 0, 43, 100), &[]).await;
    sync_peer(&mut peer).await;
    assert!(!s.is_closed());
}

#[tokio::test]
async fn dropped_stream_sends_fin_and_lingers_until_peer_fin() {
    let (s, mut peer) = pair(true, quiet());
    let st = s.open().await.expect("open");
    drop(st);
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]
    );
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 1, 0, 4, 0, 0, 0, 1, 0, 0, 0, 0]
    );
    assert_eq!(s.num_streams(), 0, "orphans are not counted");
    // Trailing data from the peer is discarded quietly, then its FIN ends it.
    send(&mut peer, hdr(FrameType::Data, flags::ACK, 1, 4), b"late").await;
    send(
        &mut peer,
        hdr(FrameType::WindowUpdate, flags::FIN, 1, 0),
        &[],
    )
    .await;
    sync_peer(&mut peer).await;
    assert!(!s.is_closed());
}

#[tokio::test]
async fn orphan_resets_a_peer_that_fills_the_window() {
    let (s, mut peer) = pair(true, quiet());
    let st = s.open().await.expect("open");
    drop(st);
    let _syn = read_raw(&mut peer).await;
    let _fin = read_raw(&mut peer).await;
    let chunk = vec![0u8; 64 * 1024];
    for _ in 0..4 {
        send(
            &mut peer,
            hdr(FrameType::Data, 0, 1, chunk.len() as u32),
            &chunk,
        )
        .await;
    }
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 1, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0]
    );
    assert!(!s.is_closed());
}

#[tokio::test]
async fn peer_eof_ends_the_session() {
    let (s, peer) = pair(true, quiet());
    drop(peer);
    assert_eq!(
        timeout(T, s.closed()).await.expect("in time"),
        Error::RemoteClosed
    );
    assert_eq!(s.open().await.err(), Some(Error::RemoteClosed));
    assert!(s.accept().await.is_none());
}

#[tokio::test]
async fn close_sends_goaway_then_eof() {
    let (s, mut peer) = pair(true, quiet());
    timeout(T, s.close()).await.expect("close in time");
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).await.expect("eof");
    assert!(rest.is_empty());
    assert_eq!(s.close_reason(), Some(Error::Closed));
}

#[tokio::test]
async fn dropping_the_last_handle_closes() {
    let (s, mut peer) = pair(true, quiet());
    let s2 = s.clone();
    drop(s);
    assert!(!s2.is_closed());
    drop(s2);
    assert_eq!(
        read_raw(&mut peer).await,
        [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
}
