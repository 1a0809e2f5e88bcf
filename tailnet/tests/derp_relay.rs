//! DERP client ↔ in-process server: login, relaying, PeerGone, pings,
//! unknown and oversized frames, fault hooks, and the HTTP upgrade path
//! (in-memory and over real TCP).

use std::time::Duration;

use coder_tailnet::derp::frame::{kind, FrameReader, CLIENT_INFO_MAX_FRAME_LEN};
use coder_tailnet::derp::{
    connect_http, upgrade, ClientOptions, DerpClient, DerpError, DerpServer, Event, Frame,
    NodePrivate, NodePublic, PeerGoneReason, ServerOptions, UpgradeError, MAX_PACKET_SIZE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const T: Duration = Duration::from_secs(5);

type Client = DerpClient<DuplexStream>;

/// Connects a fresh client to `server` over an in-memory pipe.
async fn connect(server: &DerpServer) -> (Client, NodePrivate) {
    let key = NodePrivate::generate();
    let (a, b) = tokio::io::duplex(1 << 17);
    let srv = server.clone();
    tokio::spawn(async move {
        let _ = srv.accept(b).await;
    });
    let c = DerpClient::handshake(a, &key, ClientOptions::default())
        .await
        .expect("login");
    (c, key)
}

async fn next(c: &mut Client) -> Event {
    tokio::time::timeout(T, c.recv())
        .await
        .expect("event in time")
        .expect("event")
}

/// Next event that is not a keep-alive.
async fn next_real(c: &mut Client) -> Event {
    loop {
        match next(c).await {
            Event::KeepAlive => continue,
            e => return e,
        }
    }
}

#[tokio::test]
async fn login_reports_server_key_and_registers() {
    let server = DerpServer::new();
    let (c, key) = connect(&server).await;
    assert_eq!(c.server_key(), server.public_key());
    assert_eq!(c.public_key(), key.public());
    assert_eq!(c.server_info().version, 2);
    // ServerInfo is sent after registration, so login implies presence.
    assert!(server.is_connected(&key.public()));
    c.note_preferred(true).await.unwrap();
    let mut ok = false;
    for _ in 0..100 {
        if server.is_preferred(&key.public()) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "NotePreferred(true) reached the server");
}

#[tokio::test]
async fn two_clients_exchange_packets() {
    let server = DerpServer::new();
    let (mut a, ka) = connect(&server).await;
    let (mut b, kb) = connect(&server).await;

    a.send(&kb.public(), b"hello b").await.unwrap();
    assert_eq!(
        next_real(&mut b).await,
        Event::Packet {
            src: ka.public(),
            data: b"hello b".to_vec()
        }
    );
    b.send(&ka.public(), b"hello a").await.unwrap();
    assert_eq!(
        next_real(&mut a).await,
        Event::Packet {
            src: kb.public(),
            data: b"hello a".to_vec()
        }
    );

    // Full-size packet and an empty one.
    let big = vec![0x5a; MAX_PACKET_SIZE];
    a.send(&kb.public(), &big).await.unwrap();
    a.send(&kb.public(), &[]).await.unwrap();
    match next_real(&mut b).await {
        Event::Packet { data, .. } => assert_eq!(data, big),
        e => panic!("{e:?}"),
    }
    match next_real(&mut b).await {
        Event::Packet { data, .. } => assert!(data.is_empty()),
        e => panic!("{e:?}"),
    }
    assert!(server.stats().packets_forwarded >= 4);
}

#[tokio::test]
async fn many_packets_in_order_with_concurrent_send_and_recv() {
    let server = DerpServer::new();
    let (a, _ka) = connect(&server).await;
    let (b, kb) = connect(&server).await;
    let (_bs, mut br) = b.into_split();
    let sender = a.sender();
    let dst = kb.public();
    let n = 200u32;
    let send = tokio::spawn(async move {
        for i in 0..n {
            sender.send(&dst, &i.to_be_bytes()).await.unwrap();
        }
    });
    let mut got = 0u32;
    while got < n {
        let ev = tokio::time::timeout(T, br.recv()).await.unwrap().unwrap();
        if let Event::Packet { data, .. } = ev {
            assert_eq!(data, got.to_be_bytes());
            got += 1;
        }
    }
    send.await.unwrap();
    drop(a);
}

#[tokio::test]
async fn peer_gone_not_here_and_disconnected() {
    let server = DerpServer::new();
    let (mut a, ka) = connect(&server).await;
    let absent = NodePublic::from_raw([7; 32]);
    a.send(&absent, b"anyone?").await.unwrap();
    assert_eq!(
        next_real(&mut a).await,
        Event::PeerGone {
            peer: absent,
            reason: PeerGoneReason::NotHere
        }
    );
    assert_eq!(server.stats().packets_unknown_dst, 1);

    // B sends to A, then leaves: A (whom B had sent to) hears
    // PeerGone(Disconnected), as on Tailscale's relay.
    let (b, kb) = connect(&server).await;
    b.send(&ka.public(), b"hi").await.unwrap();
    assert!(matches!(next_real(&mut a).await, Event::Packet { .. }));
    drop(b);
    assert_eq!(
        next_real(&mut a).await,
        Event::PeerGone {
            peer: kb.public(),
            reason: PeerGoneReason::Disconnected
        }
    );
    assert!(server.wait_connected(&kb.public(), false, T).await);
}

#[tokio::test]
async fn server_ping_answered_and_client_ping_gets_pong() {
    // Scripted server end: log in by hand, send a Ping, expect the Pong.
    let server_key = NodePrivate::generate();
    let client_key = NodePrivate::generate();
    let (client_io, server_io) = tokio::io::duplex(4096);
    let (sr, mut sw) = tokio::io::split(server_io);
    let ck = client_key.clone();
    let login = tokio::spawn(async move {
        DerpClient::handshake(client_io, &ck, ClientOptions::default()).await
    });
    sw.write_all(
        &Frame::ServerKey {
            key: server_key.public(),
            extra: b"extra bytes for future use".to_vec(),
        }
        .encode(),
    )
    .await
    .unwrap();
    let mut r = FrameReader::new(sr);
    let (k, _) = r.expect_frame(CLIENT_INFO_MAX_FRAME_LEN).await.unwrap();
    assert_eq!(k, kind::CLIENT_INFO);
    let si = Frame::ServerInfo {
        sealed: server_key.seal_to(&client_key.public(), br#"{"version":2}"#),
    };
    // An unknown frame before ServerInfo is skipped by the login.
    sw.write_all(
        &Frame::Unknown {
            kind: 0x60,
            payload: vec![1, 2, 3],
        }
        .encode(),
    )
    .await
    .unwrap();
    sw.write_all(&si.encode()).await.unwrap();
    let mut c = login.await.unwrap().unwrap();

    sw.write_all(&Frame::Ping(*b"12345678").encode())
        .await
        .unwrap();
    assert_eq!(next(&mut c).await, Event::Ping(*b"12345678"));
    let (k, p) = tokio::time::timeout(T, r.expect_frame(1024))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((k, p), (kind::PONG, b"12345678".to_vec()));

    // And the real server answers our ping.
    let server = DerpServer::new();
    let (mut c2, _) = connect(&server).await;
    c2.sender().send_ping(*b"pingpong").await.unwrap();
    assert_eq!(next_real(&mut c2).await, Event::Pong(*b"pingpong"));
}

#[tokio::test]
async fn unknown_frames_tolerated_both_ways() {
    let server = DerpServer::new();
    let (mut a, ka) = connect(&server).await;
    let (b, kb) = connect(&server).await;

    // Server → client: unknown type, a mesh-only type, and a malformed
    // (short) RecvPacket, then a real packet.
    assert!(server.send_frame_to(
        &ka.public(),
        &Frame::Unknown {
            kind: 0x7e,
            payload: vec![0; 100]
        }
    ));
    assert!(server.send_frame_to(
        &ka.public(),
        &Frame::Unknown {
            kind: kind::RECV_PACKET,
            payload: vec![1; 5]
        }
    ));
    // A stray greeting with a bad magic mid-stream is dropped, not fatal.
    assert!(server.send_frame_to(
        &ka.public(),
        &Frame::Unknown {
            kind: kind::SERVER_KEY,
            payload: vec![0; 40]
        }
    ));
    // Client → server: unknown type is skipped, connection stays up.
    b.sender()
        .send_frame(&Frame::Unknown {
            kind: 0x7d,
            payload: vec![1, 2, 3],
        })
        .await
        .unwrap();
    b.send(&ka.public(), b"after unknown").await.unwrap();
    assert_eq!(
        next_real(&mut a).await,
        Event::Packet {
            src: kb.public(),
            data: b"after unknown".to_vec()
        }
    );
}

#[tokio::test]
async fn oversized_frames_rejected() {
    // Client side: a server announcing a 2 MiB frame is refused.
    let server_key = NodePrivate::generate();
    let client_key = NodePrivate::generate();
    let (client_io, server_io) = tokio::io::duplex(4096);
    let (sr, mut sw) = tokio::io::split(server_io);
    let ck = client_key.clone();
    let login = tokio::spawn(async move {
        DerpClient::handshake(client_io, &ck, ClientOptions::default()).await
    });
    sw.write_all(
        &Frame::ServerKey {
            key: server_key.public(),
            extra: vec![],
        }
        .encode(),
    )
    .await
    .unwrap();
    let mut r = FrameReader::new(sr);
    r.expect_frame(CLIENT_INFO_MAX_FRAME_LEN).await.unwrap();
    let si = Frame::ServerInfo {
        sealed: server_key.seal_to(&client_key.public(), br#"{"version":2}"#),
    };
    sw.write_all(&si.encode()).await.unwrap();
    let mut c = login.await.unwrap().unwrap();
    sw.write_all(&[kind::RECV_PACKET, 0x00, 0x20, 0x00, 0x00])
        .await
        .unwrap();
    match tokio::time::timeout(T, c.recv()).await.unwrap() {
        Err(DerpError::FrameTooLarge { len, .. }) => assert_eq!(len, 2 << 20),
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }

    // Client refuses to send a packet over 64 KiB.
    let server = DerpServer::new();
    let (a, _) = connect(&server).await;
    let (mut b, kb) = connect(&server).await;
    assert!(matches!(
        a.send(&kb.public(), &vec![0; MAX_PACKET_SIZE + 1]).await,
        Err(DerpError::PacketTooLarge(_))
    ));

    // Server side: a raw SendPacket over the limit closes that connection.
    let mut payload = kb.public().as_bytes().to_vec();
    payload.extend(vec![0u8; MAX_PACKET_SIZE + 1]);
    a.sender()
        .send_frame(&Frame::Unknown {
            kind: kind::SEND_PACKET,
            payload,
        })
        .await
        .unwrap();
    let (_as, mut ar) = a.into_split();
    let end = tokio::time::timeout(T, async {
        loop {
            match ar.recv().await {
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("server closed the connection");
    assert!(
        matches!(end, DerpError::Closed | DerpError::Io(_)),
        "{end:?}"
    );
    // The other client is unaffected.
    b.sender().send_ping([1; 8]).await.unwrap();
    assert_eq!(next_real(&mut b).await, Event::Pong([1; 8]));
}

#[tokio::test]
async fn login_rejects_bad_magic_and_bad_box() {
    // Not a DERP server: wrong magic.
    let (client_io, mut server_io) = tokio::io::duplex(4096);
    let mut body = b"HTTP/1.1".to_vec();
    body.extend([0u8; 32]);
    server_io
        .write_all(
            &Frame::Unknown {
                kind: kind::SERVER_KEY,
                payload: body,
            }
            .encode(),
        )
        .await
        .unwrap();
    let r = DerpClient::handshake(
        client_io,
        &NodePrivate::generate(),
        ClientOptions::default(),
    )
    .await;
    assert!(matches!(r, Err(DerpError::BadMagic)), "{r:?}");

    // ServerInfo sealed with the wrong key.
    let server_key = NodePrivate::generate();
    let (client_io, server_io) = tokio::io::duplex(4096);
    let (sr, mut sw) = tokio::io::split(server_io);
    let ck = NodePrivate::generate();
    let login = tokio::spawn(async move {
        DerpClient::handshake(client_io, &ck, ClientOptions::default()).await
    });
    sw.write_all(
        &Frame::ServerKey {
            key: server_key.public(),
            extra: vec![],
        }
        .encode(),
    )
    .await
    .unwrap();
    let mut r = FrameReader::new(sr);
    r.expect_frame(CLIENT_INFO_MAX_FRAME_LEN).await.unwrap();
    let wrong = NodePrivate::generate();
    sw.write_all(
        &Frame::ServerInfo {
            sealed: server_key.seal_to(&wrong.public(), b"{}"),
        }
        .encode(),
    )
    .await
    .unwrap();
    assert!(matches!(
        login.await.unwrap(),
        Err(DerpError::BadBox("server info"))
    ));

    // A silent server: the login times out.
    let (client_io, _keep) = tokio::io::duplex(4096);
    let opts = ClientOptions {
        handshake_timeout: Duration::from_millis(100),
        ..ClientOptions::default()
    };
    let r = DerpClient::handshake(client_io, &NodePrivate::generate(), opts).await;
    assert!(matches!(r, Err(DerpError::Timeout(_))), "{r:?}");
}

#[tokio::test]
async fn server_rejects_client_info_from_wrong_key() {
    let server = DerpServer::new();
    let (client_io, server_io) = tokio::io::duplex(4096);
    let srv = server.clone();
    let task = tokio::spawn(async move { srv.accept(server_io).await });
    let (cr, mut cw) = tokio::io::split(client_io);
    let mut r = FrameReader::new(cr);
    let (k, p) = r.expect_frame(1024).await.unwrap();
    assert_eq!(k, kind::SERVER_KEY);
    let server_pub = match Frame::decode(k, &p).unwrap() {
        Frame::ServerKey { key, .. } => key,
        f => panic!("{f:?}"),
    };
    // Claims key X but seals with key Y.
    let x = NodePrivate::generate();
    let y = NodePrivate::generate();
    let hello = Frame::ClientInfo {
        key: x.public(),
        sealed: y.seal_to(&server_pub, br#"{"version":2}"#),
    };
    cw.write_all(&hello.encode()).await.unwrap();
    let res = tokio::time::timeout(T, task).await.unwrap().unwrap();
    assert!(
        matches!(res, Err(DerpError::BadBox("client info"))),
        "{res:?}"
    );
    assert!(!server.is_connected(&x.public()));
}

#[tokio::test]
async fn keepalive_health_restarting_and_drop_all() {
    let opts = ServerOptions {
        keepalive: Duration::from_millis(50),
        ..ServerOptions::default()
    };
    let server = DerpServer::with_options(NodePrivate::generate(), opts);
    let (mut a, ka) = connect(&server).await;
    let (mut b, _kb) = connect(&server).await;

    assert_eq!(next(&mut a).await, Event::KeepAlive);

    assert_eq!(server.send_health(Some(&ka.public()), "duplicate"), 1);
    assert_eq!(
        next_real(&mut a).await,
        Event::Health {
            problem: "duplicate".into()
        }
    );
    assert_eq!(server.send_health(None, ""), 2);
    assert_eq!(
        next_real(&mut a).await,
        Event::Health {
            problem: String::new()
        }
    );
    assert_eq!(
        server.send_restarting(Duration::from_millis(1500), Duration::from_secs(30)),
        2
    );
    let want = Event::Restarting {
        reconnect_in: Duration::from_millis(1500),
        try_for: Duration::from_secs(30),
    };
    assert_eq!(next_real(&mut a).await, want);
    loop {
        match next_real(&mut b).await {
            Event::Health { .. } => continue,
            e => {
                assert_eq!(e, want);
                break;
            }
        }
    }

    assert_eq!(server.drop_all(), 2);
    for c in [&mut a, &mut b] {
        let end = tokio::time::timeout(T, async {
            loop {
                match c.recv().await {
                    Ok(_) => continue,
                    Err(e) => return e,
                }
            }
        })
        .await
        .expect("connection dropped");
        assert!(
            matches!(end, DerpError::Closed | DerpError::Io(_)),
            "{end:?}"
        );
    }
    assert!(server.wait_connected(&ka.public(), false, T).await);
    assert_eq!(server.stats().current_connections, 0);
}

#[tokio::test]
async fn duplicate_key_newest_connection_receives() {
    let server = DerpServer::new();
    let (a, _) = connect(&server).await;
    let shared = NodePrivate::generate();
    let mk = |server: &DerpServer| {
        let (x, y) = tokio::io::duplex(1 << 16);
        let srv = server.clone();
        tokio::spawn(async move {
            let _ = srv.accept(y).await;
        });
        x
    };
    let mut old = DerpClient::handshake(mk(&server), &shared, ClientOptions::default())
        .await
        .unwrap();
    let mut new = DerpClient::handshake(mk(&server), &shared, ClientOptions::default())
        .await
        .unwrap();
    a.send(&shared.public(), b"to newest").await.unwrap();
    match tokio::time::timeout(T, new.recv()).await.unwrap().unwrap() {
        Event::Packet { data, .. } => assert_eq!(data, b"to newest"),
        e => panic!("{e:?}"),
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(100), old.recv())
            .await
            .is_err(),
        "old connection gets nothing"
    );
    // When the newest leaves, delivery falls back to the older one.
    drop(new);
    let mut ok = false;
    for _ in 0..100 {
        a.send(&shared.public(), b"to old").await.unwrap();
        if let Ok(Ok(Event::Packet { data, .. })) =
            tokio::time::timeout(Duration::from_millis(50), old.recv()).await
        {
            assert_eq!(data, b"to old");
            ok = true;
            break;
        }
    }
    assert!(ok, "older duplicate took over");
}

#[tokio::test]
async fn http_upgrade_in_memory_and_extra_headers() {
    let server = DerpServer::new();
    let key = NodePrivate::generate();

    // Capture the request the dialer writes, then answer like a relay: the
    // 101 head and the ServerKey frame arrive in one write, so the dialer
    // must hand bytes it read past the head to the DERP login.
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let srv = server.clone();
    let relay = tokio::spawn(async move {
        let (mut r, w) = tokio::io::split(server_io);
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            r.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        let io = tokio::io::join(r, w);
        // Reuse the server's own upgrade answer path by replaying the head.
        let replay = Replay {
            head: head.clone(),
            io,
        };
        let _ = srv.accept_http(replay).await;
        String::from_utf8(head).unwrap()
    });
    let headers = vec![
        ("X-Custom".to_string(), "yes".to_string()),
        ("Upgrade".to_string(), "websocket".to_string()),
    ];
    let mut c = connect_http(
        client_io,
        "coder.example.com:8443",
        &headers,
        &key,
        ClientOptions::default(),
    )
    .await
    .expect("upgrade + login");
    assert_eq!(c.server_key(), server.public_key());
    c.sender().send_ping([2; 8]).await.unwrap();
    loop {
        match tokio::time::timeout(T, c.recv()).await.unwrap().unwrap() {
            Event::Pong(d) => {
                assert_eq!(d, [2; 8]);
                break;
            }
            _ => continue,
        }
    }
    drop(c);
    let head = tokio::time::timeout(T, relay).await.unwrap().unwrap();
    assert!(head.starts_with("GET /derp HTTP/1.1\r\n"), "{head}");
    assert!(
        head.contains("\r\nHost: coder.example.com:8443\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nX-Custom: yes\r\n"), "{head}");
    assert!(head.contains("\r\nUpgrade: DERP\r\n"), "{head}");
    assert!(head.contains("\r\nConnection: Upgrade\r\n"), "{head}");
    assert!(
        !head.contains("websocket"),
        "caller's Upgrade header dropped: {head}"
    );
}

/// Replays a captured request head before the live stream.
struct Replay<S> {
    head: Vec<u8>,
    io: S,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Replay<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            let chunk: Vec<u8> = self.head.drain(..n).collect();
            buf.put_slice(&chunk);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn http_upgrade_keeps_bytes_read_past_the_head() {
    let key = NodePublic::from_raw([0x42; 32]);
    let (client_io, mut server_io) = tokio::io::duplex(4096);
    let hex = key.to_untyped_hex();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let _ = server_io.read(&mut buf).await.unwrap();
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\
             Derp-Version: 2\r\nDerp-Public-Key: {hex}\r\n\r\nDERP-BYTES"
        );
        server_io.write_all(answer.as_bytes()).await.unwrap();
        server_io.write_all(b"-MORE").await.unwrap();
        server_io
    });
    let (mut up, resp) = upgrade(client_io, "h", &[]).await.unwrap();
    assert_eq!(resp.derp_version, Some(2));
    assert_eq!(resp.derp_public_key, Some(key));
    let mut got = vec![0u8; 15];
    up.read_exact(&mut got).await.unwrap();
    assert_eq!(got, b"DERP-BYTES-MORE");
}

#[tokio::test]
async fn http_upgrade_4xx_is_a_websocket_fallback_signal() {
    // A proxy that refuses the upgrade.
    let (client_io, mut server_io) = tokio::io::duplex(4096);
    let proxy = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let _ = server_io.read(&mut buf).await.unwrap();
        server_io
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\nno way")
            .await
            .unwrap();
        server_io
    });
    let err = upgrade(client_io, "h", &[]).await.unwrap_err();
    assert!(err.should_try_websocket(), "{err}");
    match &err {
        UpgradeError::Status { code, body, .. } => {
            assert_eq!(*code, 403);
            assert_eq!(body, "no way");
        }
        e => panic!("{e:?}"),
    }
    drop(proxy.await.unwrap());

    // Our own server answers 426 to a non-upgrade GET.
    let server = DerpServer::new();
    let (mut client_io, server_io) = tokio::io::duplex(4096);
    let srv = server.clone();
    let t = tokio::spawn(async move { srv.accept_http(server_io).await });
    client_io
        .write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    client_io.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 426 "), "{resp}");
    t.await.unwrap().unwrap();

    // 5xx is not a websocket signal; malformed and oversized heads error.
    for (answer, fallback) in [
        (&b"HTTP/1.1 502 Bad Gateway\r\n\r\n"[..], false),
        (&b"SSH-2.0-OpenSSH\r\n\r\n"[..], false),
    ] {
        let (client_io, mut server_io) = tokio::io::duplex(4096);
        let a = answer.to_vec();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let _ = server_io.read(&mut buf).await;
            let _ = server_io.write_all(&a).await;
            let _ = server_io.read(&mut buf).await;
        });
        let e = upgrade(client_io, "h", &[]).await.unwrap_err();
        assert_eq!(e.should_try_websocket(), fallback, "{e}");
    }
    let (client_io, mut server_io) = tokio::io::duplex(1 << 16);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let _ = server_io.read(&mut buf).await;
        let mut junk = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
        junk.extend(std::iter::repeat_n(b'a', 40_000));
        let _ = server_io.write_all(&junk).await;
        let _ = server_io.read(&mut buf).await;
    });
    assert!(matches!(
        upgrade(client_io, "h", &[]).await,
        Err(UpgradeError::HeadTooLarge)
    ));

    // Header injection is refused before anything is written.
    let (client_io, _s) = tokio::io::duplex(4096);
    let bad = vec![("X-A".to_string(), "1\r\nEvil: 1".to_string())];
    assert!(matches!(
        upgrade(client_io, "h", &bad).await,
        Err(UpgradeError::BadHeader(_))
    ));
}

#[tokio::test]
async fn over_real_tcp_with_http_upgrade() {
    let server = DerpServer::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = server.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let srv = srv.clone();
            tokio::spawn(async move {
                let _ = srv.accept_http(sock).await;
            });
        }
    });
    let host = addr.to_string();
    let ka = NodePrivate::generate();
    let kb = NodePrivate::generate();
    let mut a = connect_http(
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        &host,
        &[],
        &ka,
        ClientOptions::default(),
    )
    .await
    .unwrap();
    let mut b = connect_http(
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        &host,
        &[],
        &kb,
        ClientOptions::default(),
    )
    .await
    .unwrap();
    a.note_preferred(true).await.unwrap();
    for i in 0..50u8 {
        a.send(&kb.public(), &[i; 1200]).await.unwrap();
    }
    for i in 0..50u8 {
        loop {
            match tokio::time::timeout(T, b.recv()).await.unwrap().unwrap() {
                Event::Packet { src, data } => {
                    assert_eq!(src, ka.public());
                    assert_eq!(data, vec![i; 1200]);
                    break;
                }
                _ => continue,
            }
        }
    }
    b.send(&ka.public(), b"done").await.unwrap();
    loop {
        if let Event::Packet { data, .. } =
            tokio::time::timeout(T, a.recv()).await.unwrap().unwrap()
        {
            assert_eq!(data, b"done");
            break;
        }
    }
}

/// Connects with `opts` over a pipe of `pipe` bytes each way.
async fn connect_with(
    server: &DerpServer,
    opts: ClientOptions,
    pipe: usize,
) -> (Client, NodePrivate) {
    let key = NodePrivate::generate();
    let (a, b) = tokio::io::duplex(pipe);
    let srv = server.clone();
    tokio::spawn(async move {
        let _ = srv.accept(b).await;
    });
    let c = DerpClient::handshake(a, &key, opts).await.expect("login");
    (c, key)
}

/// A silent but healthy connection is probed and stays up: the relay
/// answers the Ping (and nothing else arrives meanwhile).
#[tokio::test]
async fn a_silent_healthy_connection_is_probed_and_kept() {
    let server = DerpServer::new();
    let opts = ClientOptions {
        probe_after: Some(Duration::from_millis(500)),
        probe_timeout: Duration::from_millis(1500),
        ..ClientOptions::default()
    };
    let (mut c, _) = connect_with(&server, opts, 1 << 17).await;
    let got = tokio::time::timeout(Duration::from_secs(4), c.recv())
        .await
        .expect("the probe's pong")
        .expect("a live connection");
    assert!(matches!(got, Event::Pong(_)), "{got:?}");
}

/// A frozen relay connection (open, nothing read or written) fails `recv`
/// with NoPong once the probe goes unanswered.
#[tokio::test]
async fn a_silently_dead_connection_fails_recv_with_no_pong() {
    let server = DerpServer::new();
    let opts = ClientOptions {
        probe_after: Some(Duration::from_millis(500)),
        probe_timeout: Duration::from_millis(1500),
        ..ClientOptions::default()
    };
    let (mut c, key) = connect_with(&server, opts, 1 << 17).await;
    assert_eq!(server.freeze_client(&key.public()), 1);
    let t = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(6), c.recv())
        .await
        .expect("recv must fail within the probe bounds")
        .expect_err("a frozen connection is dead");
    assert!(matches!(err, DerpError::NoPong(_)), "{err}");
    assert!(err.to_string().contains("no answer to ping"), "{err}");
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    // The frozen connection is still registered until the relay drops it.
    assert_eq!(server.conns_of(&key.public()), 1);
    server.drop_all();
}

/// Silence after we sent packets is suspicious sooner than idle silence:
/// answers were due. A real Coder agent gives up on unacknowledged data
/// after about 12.6 s, so a busy connection's death must be found fast.
#[tokio::test]
async fn a_silent_connection_with_packets_out_is_probed_at_the_busy_bound() {
    let server = DerpServer::new();
    let opts = ClientOptions {
        probe_after: Some(Duration::from_secs(30)),
        probe_after_busy: Duration::from_millis(500),
        probe_timeout: Duration::from_millis(1000),
        ..ClientOptions::default()
    };
    let (c, key) = connect_with(&server, opts, 1 << 17).await;
    let (sender, mut rx) = c.into_split();
    assert_eq!(server.freeze_client(&key.public()), 1);
    let peer = NodePrivate::generate().public();
    sender
        .try_send(&peer, b"a datagram awaiting an answer")
        .expect("queued");
    let t = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.recv().await {
                // Whatever the relay still said before it froze: keep
                // datagrams going out, as a live tunnel would.
                Ok(_) => {
                    let _ = sender.try_send(&peer, b"another datagram");
                }
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the busy bound, not the 30 s idle one");
    assert!(matches!(err, DerpError::NoPong(_)), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "found dead after {:?}",
        t.elapsed()
    );
    server.drop_all();
}

/// A write that cannot make progress (the relay stopped reading and the
/// pipe is full) ends the connection with WriteStalled, even while the
/// probe is off.
#[tokio::test]
async fn a_stalled_write_fails_recv_with_write_stalled() {
    let server = DerpServer::new();
    let opts = ClientOptions {
        probe_after: None,
        write_timeout: Duration::from_millis(1500),
        ..ClientOptions::default()
    };
    let (mut c, key) = connect_with(&server, opts, 4096).await;
    assert_eq!(server.freeze_client(&key.public()), 1);
    // Wait until the relay has parked: then nothing is read any more.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sender = c.sender();
    let dst = NodePrivate::generate().public();
    for _ in 0..64 {
        let _ = sender.try_send(&dst, &[0u8; 1000]);
    }
    let err = tokio::time::timeout(Duration::from_secs(6), c.recv())
        .await
        .expect("recv must fail within the write bound")
        .expect_err("a stalled connection is dead");
    assert!(matches!(err, DerpError::WriteStalled(_)), "{err}");
    assert!(sender.is_closed());
    server.drop_all();
}

/// `try_send` never waits: a full queue is QueueFull; `flush` waits for
/// what was queued to be written.
#[tokio::test]
async fn try_send_refuses_when_full_and_flush_waits_for_the_writer() {
    let server = DerpServer::new();
    let opts = ClientOptions {
        send_queue: 4,
        probe_after: None,
        ..ClientOptions::default()
    };
    let (c, key) = connect_with(&server, opts, 4096).await;
    let sender = c.sender();
    let dst = NodePrivate::generate().public();
    sender.try_send(&dst, b"one").unwrap();
    tokio::time::timeout(T, sender.flush())
        .await
        .expect("flush in time")
        .unwrap();
    server.freeze_client(&key.public());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut full = false;
    for _ in 0..64 {
        match sender.try_send(&dst, &[0u8; 1000]) {
            Ok(()) => {}
            Err(DerpError::QueueFull) => {
                full = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(full, "the queue never filled");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sender.flush())
            .await
            .is_err(),
        "flush returned while the relay reads nothing"
    );
    server.drop_all();
}

/// `refuse_for` drops new connections before the greeting and records
/// when; live ones are untouched; afterwards logins work again.
#[tokio::test]
async fn refusing_relay_drops_new_connections_for_a_while() {
    let server = DerpServer::new();
    let (mut live, _) = connect(&server).await;
    server.refuse_for(Duration::from_millis(500));
    let key = NodePrivate::generate();
    let (a, b) = tokio::io::duplex(1 << 16);
    let srv = server.clone();
    tokio::spawn(async move {
        let _ = srv.accept(b).await;
    });
    assert!(DerpClient::handshake(a, &key, ClientOptions::default())
        .await
        .is_err());
    assert_eq!(server.stats().connections_refused, 1);
    assert_eq!(server.refused_at().len(), 1);
    // The live connection still works (a ping is answered).
    live.sender().send_ping([7; 8]).await.unwrap();
    assert_eq!(next_real(&mut live).await, Event::Pong([7; 8]));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_again, k2) = connect(&server).await;
    assert!(server.is_connected(&k2.public()));
}
