//! dRPC end to end over our yamux on an in-memory pipe, shaped like the
//! tailnet API: each call on its own yamux stream. Unary, server stream,
//! bidi, errors, unimplemented methods, large messages, concurrency, and
//! the exact bytes a unary call puts on its stream.

use std::time::Duration;

use coder_tailnet::drpc::{
    self, accept_invoke, bidi, serve, server_stream, unary, unary_on, DrpcError, Invocation,
    CODE_UNIMPLEMENTED, MAX_MESSAGE_SIZE,
};
use coder_tailnet::yamux::{Config, Session, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(30);

fn pair() -> (Session, Session) {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let config = Config {
        keepalive_interval: None,
        ..Config::default()
    };
    (
        Session::client(a, config.clone()),
        Session::server(b, config),
    )
}

async fn handler(mut call: Invocation<Stream>) {
    let method = call.method().to_string();
    let res: Result<(), DrpcError> = async {
        match method.as_str() {
            "/test.Svc/Reverse" => {
                let mut req = call.recv().await?.unwrap_or_default();
                req.reverse();
                call.reply(&req).await
            }
            "/test.Svc/Big" => {
                let req = call.recv().await?.unwrap_or_default();
                let n = u32::from_be_bytes(req[..4].try_into().unwrap_or([0; 4])) as usize;
                let body: Vec<u8> = (0..n).map(|i| (i % 253) as u8).collect();
                call.reply(&body).await
            }
            "/test.Svc/Count" => {
                let req = call.recv().await?.unwrap_or_default();
                let n = u32::from_be_bytes(req[..4].try_into().unwrap_or([0; 4]));
                for i in 0..n {
                    call.send(&i.to_be_bytes()).await?;
                }
                call.close_send().await
            }
            "/test.Svc/Chat" => {
                let (mut tx, mut rx) = call.split();
                while let Some(msg) = rx.recv().await? {
                    let mut out = b"ack:".to_vec();
                    out.extend(msg);
                    tx.send(&out).await?;
                }
                tx.close_send().await
            }
            "/test.Svc/Fail" => call.send_error(7, "boom").await,
            _ => call.unimplemented().await,
        }
    }
    .await;
    if let Err(e) = res {
        panic!("handler {method}: {e}");
    }
}

fn start() -> Session {
    let (client, server) = pair();
    tokio::spawn(serve(server, handler));
    client
}

#[tokio::test]
async fn unary_calls() {
    let client = start();
    let resp = unary_on(&client, "/test.Svc/Reverse", b"hello")
        .await
        .expect("call");
    assert_eq!(resp, b"olleh");
    // Empty request and response are fine.
    let resp = unary_on(&client, "/test.Svc/Reverse", b"")
        .await
        .expect("call");
    assert!(resp.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unary_calls_each_on_its_own_stream() {
    let client = start();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100u32 {
        let c = client.clone();
        tasks.spawn(async move {
            let req = format!("request {i}");
            let resp = unary_on(&c, "/test.Svc/Reverse", req.as_bytes())
                .await
                .expect("call");
            let want: Vec<u8> = req.bytes().rev().collect();
            assert_eq!(resp, want);
        });
    }
    timeout(T, async {
        while let Some(r) = tasks.join_next().await {
            r.expect("task");
        }
    })
    .await
    .expect("in time");
    // Finished calls leave no streams behind.
    timeout(T, async {
        while client.num_streams() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("streams released");
}

#[tokio::test]
async fn large_messages_are_split_and_reassembled() {
    let client = start();
    for n in [
        64 * 1024 - 1,
        64 * 1024,
        64 * 1024 + 1,
        3 << 20,
        MAX_MESSAGE_SIZE,
    ] {
        let resp = timeout(
            T,
            unary_on(&client, "/test.Svc/Big", &(n as u32).to_be_bytes()),
        )
        .await
        .expect("in time")
        .expect("call");
        assert_eq!(resp.len(), n);
        assert!(resp.iter().enumerate().all(|(i, &b)| b == (i % 253) as u8));
    }
    // Too large to send at all.
    let st = client.open().await.expect("open");
    let err = unary(st, "/test.Svc/Reverse", &vec![0u8; MAX_MESSAGE_SIZE + 1])
        .await
        .expect_err("too large");
    assert!(matches!(err, DrpcError::TooLarge(_)));
}

#[tokio::test]
async fn server_streaming() {
    let client = start();
    let st = client.open().await.expect("open");
    let mut rx = server_stream(st, "/test.Svc/Count", &500u32.to_be_bytes())
        .await
        .expect("start");
    for i in 0..500u32 {
        let msg = rx.recv().await.expect("recv").expect("message");
        assert_eq!(msg, i.to_be_bytes());
    }
    assert_eq!(
        rx.recv().await.expect("end"),
        None,
        "CloseSend ends the stream"
    );
}

#[tokio::test]
async fn bidi_streaming() {
    let client = start();
    let st = client.open().await.expect("open");
    let (mut tx, mut rx) = bidi(st, "/test.Svc/Chat").await.expect("start");
    for i in 0..50 {
        let msg = format!("m{i}");
        tx.send(msg.as_bytes()).await.expect("send");
        let reply = rx.recv().await.expect("recv").expect("reply");
        assert_eq!(reply, format!("ack:m{i}").as_bytes());
    }
    // Concurrent send and receive from separate tasks.
    let sender = tokio::spawn(async move {
        for i in 0..200 {
            tx.send(format!("x{i}").as_bytes()).await.expect("send");
        }
        tx.close_send().await.expect("close send");
        tx
    });
    for i in 0..200 {
        let reply = rx.recv().await.expect("recv").expect("reply");
        assert_eq!(reply, format!("ack:x{i}").as_bytes());
    }
    assert_eq!(rx.recv().await.expect("end"), None);
    let _tx = sender.await.expect("sender");
}

#[tokio::test]
async fn errors_and_unimplemented() {
    let client = start();
    let err = unary_on(&client, "/test.Svc/Fail", b"")
        .await
        .expect_err("error");
    assert!(matches!(err, DrpcError::Remote { code: 7, ref message } if message == "boom"));
    assert!(!err.is_unimplemented());
    let err = unary_on(&client, "/coder.tailnet.v2.Tailnet/PostTelemetry", b"")
        .await
        .expect_err("unimplemented");
    assert_eq!(err.code(), Some(CODE_UNIMPLEMENTED));
    assert!(err.is_unimplemented());
    // A server-streaming call that fails reports it on the first recv.
    let st = client.open().await.expect("open");
    let mut rx = server_stream(st, "/nope/Nope", b"").await.expect("start");
    assert!(rx
        .recv()
        .await
        .expect_err("unimplemented")
        .is_unimplemented());
}

#[tokio::test]
async fn unary_wire_bytes_on_the_yamux_stream() {
    let (client, server) = pair();
    let fake = tokio::spawn(async move {
        let mut st = server.accept().await.expect("accept");
        let name = b"/coder.tailnet.v2.Tailnet/RefreshResumeToken";
        let mut want = vec![0x03, 0x01, 0x01, name.len() as u8];
        want.extend_from_slice(name);
        want.extend_from_slice(&[0x05, 0x01, 0x02, 0x00]); // empty request
        want.extend_from_slice(&[0x0d, 0x01, 0x03, 0x00]); // CloseSend
        let mut got = vec![0u8; want.len()];
        st.read_exact(&mut got).await.expect("request bytes");
        assert_eq!(got, want);
        // The server numbers its own packets from 1.
        st.write_all(&[
            0x05, 0x01, 0x01, 0x03, b'a', b'b', b'c', 0x0d, 0x01, 0x02, 0x00,
        ])
        .await
        .expect("response");
        // The client closes the stream (FIN) once it has the response.
        let mut rest = Vec::new();
        st.read_to_end(&mut rest).await.expect("client FIN");
        assert!(rest.is_empty(), "nothing after CloseSend: {rest:?}");
        server
    });
    let resp = unary_on(&client, "/coder.tailnet.v2.Tailnet/RefreshResumeToken", b"")
        .await
        .expect("call");
    assert_eq!(resp, b"abc");
    let _server = timeout(T, fake)
        .await
        .expect("in time")
        .expect("fake server");
}

#[tokio::test]
async fn server_side_sees_method_and_metadata() {
    let (client, server) = pair();
    let srv = tokio::spawn(async move {
        let st = server.accept().await.expect("accept");
        let mut call = accept_invoke(st).await.expect("invoke");
        assert_eq!(call.method(), "/test.Svc/Meta");
        assert_eq!(call.metadata(), Some(&b"\x0a\x01k"[..]));
        assert_eq!(call.recv().await.expect("recv"), Some(b"req".to_vec()));
        assert_eq!(call.recv().await.expect("recv"), None, "client CloseSend");
        call.reply(b"ok").await.expect("reply");
        server
    });
    let mut st = client.open().await.expect("open");
    // InvokeMetadata (message 1), then the usual unary sequence (2, 3, 4).
    let mut wire = Vec::new();
    drpc::encode_packet(
        &mut wire,
        drpc::Kind::InvokeMetadata,
        false,
        1,
        1,
        b"\x0a\x01k",
        drpc::SPLIT_SIZE,
    );
    drpc::encode_packet(
        &mut wire,
        drpc::Kind::Invoke,
        false,
        1,
        2,
        b"/test.Svc/Meta",
        drpc::SPLIT_SIZE,
    );
    drpc::encode_packet(
        &mut wire,
        drpc::Kind::Message,
        false,
        1,
        3,
        b"req",
        drpc::SPLIT_SIZE,
    );
    drpc::encode_packet(
        &mut wire,
        drpc::Kind::CloseSend,
        false,
        1,
        4,
        &[],
        drpc::SPLIT_SIZE,
    );
    st.write_all(&wire).await.expect("write");
    let mut rx = drpc::MessageReceiver::new(st, 1);
    assert_eq!(rx.recv().await.expect("recv"), Some(b"ok".to_vec()));
    assert_eq!(rx.recv().await.expect("end"), None);
    let _server = timeout(T, srv).await.expect("in time").expect("server");
}

#[tokio::test]
async fn dropping_a_server_stream_ends_the_call() {
    let (client, server) = pair();
    let srv = tokio::spawn(async move {
        let st = server.accept().await.expect("accept");
        let mut call = accept_invoke(st).await.expect("invoke");
        call.recv().await.expect("request");
        // Keep sending until the client goes away.
        let mut sent = 0u32;
        loop {
            if call.send(&[0u8; 1024]).await.is_err() {
                break;
            }
            sent += 1;
            assert!(sent < 100_000, "client never went away");
            tokio::task::yield_now().await;
        }
        server
    });
    let st = client.open().await.expect("open");
    let mut rx = server_stream(st, "/test.Svc/Endless", b"")
        .await
        .expect("start");
    rx.recv().await.expect("recv").expect("one message");
    drop(rx);
    let _server = timeout(T, srv)
        .await
        .expect("server noticed in time")
        .expect("server");
}
