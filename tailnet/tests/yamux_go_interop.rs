//! Our yamux client against HashiCorp's Go yamux — the implementation
//! coderd uses — via the peer in `tailnet/interop/yamux-go/`, a Go module
//! pinned to the `github.com/hashicorp/yamux` version Coder's own go.mod
//! requires (v0.1.2), built with the machine's Go (`GOTOOLCHAIN=local`) and
//! the module proxy.
//!
//! Exercised: many concurrent streams, 8 MiB echo / sink (FNV-1a checked by
//! Go) / generate (content checked here) with a slow reader, streams opened
//! by the Go server and served by our client, pings both ways (Go's
//! keepalive at 100 ms with a 3 s reply deadline in the second run), a
//! reset stream, a larger window announced on SYN/ACK by both sides, and a
//! clean close (Go must see EOF, not a keepalive failure).
//!
//! Without Go the test skips loudly, unless `CODER_PROXY_REQUIRE_GO=1` (CI)
//! turns that into a failure; a failing build (no module proxy and no
//! cached module) always fails.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use coder_tailnet::yamux::{Config, Session, Stream};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(120);
const BIG: usize = 8 << 20;

/// xorshift64 byte stream, identical to `pattern` in main.go.
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

fn fnv1a64(h: u64, data: &[u8]) -> u64 {
    data.iter().fold(h, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

async fn send_pattern<W: AsyncWriteExt + Unpin>(w: &mut W, seed: u64, len: usize) -> u64 {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 32 * 1024 + 5];
    let mut left = len;
    let mut h = FNV_OFFSET;
    while left > 0 {
        let n = left.min(buf.len());
        p.fill(&mut buf[..n]);
        h = fnv1a64(h, &buf[..n]);
        w.write_all(&buf[..n]).await.expect("write pattern");
        left -= n;
    }
    h
}

/// Reads to EOF checking content; `pause` slows the reader down every MiB
/// so the sender has to wait for window updates.
async fn expect_pattern<R: AsyncReadExt + Unpin>(r: &mut R, seed: u64, len: usize, pause: bool) {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 24 * 1024 + 1];
    let mut want = vec![0u8; buf.len()];
    let mut got = 0usize;
    let mut next_pause = 1 << 20;
    loop {
        let n = r.read(&mut buf).await.expect("read pattern");
        if n == 0 {
            break;
        }
        p.fill(&mut want[..n]);
        assert!(buf[..n] == want[..n], "content differs near offset {got}");
        got += n;
        assert!(got <= len, "more bytes than sent");
        if pause && got >= next_pause {
            next_pause += 1 << 20;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(got, len, "length");
}

fn go_missing(why: &str) -> Option<PathBuf> {
    if std::env::var("CODER_PROXY_REQUIRE_GO").as_deref() == Ok("1") {
        panic!("{why}; CODER_PROXY_REQUIRE_GO=1 requires the Go interop test (Go 1.26 on PATH)");
    }
    // Straight to the process's stderr: libtest would swallow eprintln!
    // output of a passing test, and a skip must not go unnoticed.
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n!!! SKIPPED yamux Go interop test: {why}.\n\
         !!! Put Go 1.26 on PATH to run it;\n\
         !!! set CODER_PROXY_REQUIRE_GO=1 to make this a failure.\n"
    );
    None
}

/// Go's module cache, shared with the real-Coder suite (scripts/interop.sh).
fn go_cache(kind: &str, var: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        home.join(".cache/coder-proxy").join(kind)
    })
}

/// Builds the Go peer once per test binary; `None` = skip.
fn go_peer() -> Option<PathBuf> {
    static PEER: OnceLock<Option<PathBuf>> = OnceLock::new();
    PEER.get_or_init(|| {
        let go_ok = std::process::Command::new("go")
            .arg("version")
            .env("GOTOOLCHAIN", "local")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !go_ok {
            return go_missing("`go` is not installed");
        }
        let out_dir =
            std::env::temp_dir().join(format!("coder-tailnet-yamux-go-{}", std::process::id()));
        std::fs::create_dir_all(&out_dir).expect("temp dir");
        let bin = out_dir.join("yamux-go");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/yamux-go");
        let started = Instant::now();
        // Module mode with the pinned version from go.sum; the module comes
        // from the cache or the module proxy, never a newer toolchain.
        let out = std::process::Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg(".")
            .current_dir(&src)
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=readonly")
            .env("GOMODCACHE", go_cache("go-mod", "CODER_PROXY_GOMODCACHE"))
            .env("GOCACHE", go_cache("go-build", "CODER_PROXY_GOCACHE"))
            .output()
            .expect("run go build");
        assert!(
            out.status.success(),
            "go build of the interop peer failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("built Go yamux peer in {:?}", started.elapsed());
        Some(bin)
    })
    .clone()
}

async fn cmd_stream(session: &Session, cmd: u8) -> Stream {
    let mut st = session.open().await.expect("open");
    st.write_all(&[cmd]).await.expect("command byte");
    st
}

async fn echo(session: Session, seed: u64, len: usize) {
    let st = cmd_stream(&session, b'E').await;
    let (mut r, mut w) = tokio::io::split(st);
    let writer = async {
        send_pattern(&mut w, seed, len).await;
        w.shutdown().await.expect("fin");
    };
    tokio::join!(writer, expect_pattern(&mut r, seed, len, false));
}

async fn sink(session: Session, seed: u64, len: usize) {
    let mut st = cmd_stream(&session, b'S').await;
    let sum = send_pattern(&mut st, seed, len).await;
    st.shutdown().await.expect("fin");
    let mut reply = [0u8; 16];
    st.read_exact(&mut reply).await.expect("sink reply");
    let (count, theirs) = reply.split_at(8);
    assert_eq!(
        u64::from_be_bytes(count.try_into().expect("8")),
        len as u64,
        "Go byte count"
    );
    assert_eq!(
        u64::from_be_bytes(theirs.try_into().expect("8")),
        sum,
        "Go FNV-1a"
    );
    let mut rest = Vec::new();
    st.read_to_end(&mut rest).await.expect("EOF");
    assert!(rest.is_empty());
}

async fn generate(session: Session, seed: u64, len: usize) {
    let mut st = cmd_stream(&session, b'G').await;
    let mut req = [0u8; 16];
    req[..8].copy_from_slice(&(len as u64).to_be_bytes());
    req[8..].copy_from_slice(&seed.to_be_bytes());
    st.write_all(&req).await.expect("request");
    expect_pattern(&mut st, seed, len, true).await;
}

/// Serves the streams the Go side opens: length-prefixed echo.
fn serve_open_back(session: Session) {
    tokio::spawn(async move {
        while let Some(mut st) = session.accept().await {
            assert_eq!(st.id() % 2, 0, "Go server opens even IDs");
            tokio::spawn(async move {
                let mut len = [0u8; 8];
                st.read_exact(&mut len).await.expect("length");
                let mut body = vec![0u8; u64::from_be_bytes(len) as usize];
                st.read_exact(&mut body).await.expect("body");
                st.write_all(&body).await.expect("echo");
                st.shutdown().await.expect("fin");
                let mut rest = Vec::new();
                st.read_to_end(&mut rest).await.expect("Go closes");
            });
        }
    });
}

async fn line_reply(session: Session, cmd: u8, arg: &[u8]) -> String {
    let mut st = cmd_stream(&session, cmd).await;
    st.write_all(arg).await.expect("arg");
    let mut reply = String::new();
    st.read_to_string(&mut reply).await.expect("reply");
    reply
}

async fn run_interop(name: &str, go_args: &[&str], config: Config) {
    let Some(bin) = go_peer() else {
        return;
    };
    let started = Instant::now();
    let mut child = tokio::process::Command::new(&bin)
        .args(go_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start Go peer");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let port: u16 = timeout(T, stdout.next_line())
        .await
        .expect("port in time")
        .expect("read port")
        .expect("port line")
        .trim()
        .parse()
        .expect("port number");
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let session = Session::client(tcp, config);
    serve_open_back(session.clone());

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..32u64 {
        tasks.spawn(echo(
            session.clone(),
            10 + i,
            256 * 1024 + (i as usize) * 777,
        ));
    }
    tasks.spawn(echo(session.clone(), 1, BIG));
    tasks.spawn(sink(session.clone(), 2, BIG));
    tasks.spawn(generate(session.clone(), 3, BIG));
    tasks.spawn({
        let s = session.clone();
        async move {
            let reply = line_reply(s, b'O', &8u32.to_be_bytes()).await;
            assert_eq!(reply, "OK\n", "Go-opened streams");
        }
    });
    tasks.spawn({
        let s = session.clone();
        async move {
            let reply = line_reply(s, b'P', &[]).await;
            assert_eq!(reply, "OK\n", "Go pinging us");
        }
    });
    tasks.spawn({
        let s = session.clone();
        async move {
            for _ in 0..3 {
                let rtt = s.ping().await.expect("ping Go");
                assert!(rtt < Duration::from_secs(5));
            }
        }
    });
    tasks.spawn({
        let s = session.clone();
        async move {
            let mut st = cmd_stream(&s, b'E').await;
            st.write_all(&vec![1u8; 100 * 1024]).await.expect("write");
            st.reset();
        }
    });
    timeout(T, async {
        while let Some(r) = tasks.join_next().await {
            r.expect("interop task");
        }
    })
    .await
    .expect("interop in time");

    // After all that, including a reset, the session is healthy.
    session.ping().await.expect("final ping");
    assert!(!session.is_closed(), "{:?}", session.close_reason());
    let elapsed = started.elapsed();
    session.close().await;

    let end = timeout(T, stdout.next_line())
        .await
        .expect("END in time")
        .expect("read END")
        .expect("END line");
    assert!(end.starts_with("END "), "unexpected Go output: {end}");
    assert!(
        !end.contains("keepalive"),
        "Go gave up on our ping replies: {end}"
    );
    let status = timeout(T, child.wait())
        .await
        .expect("exit in time")
        .expect("wait");
    assert!(status.success(), "Go peer exit: {status}");
    eprintln!("yamux Go interop [{name}]: {elapsed:?} (Go said: {end})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_yamux_default_config() {
    let config = Config {
        keepalive_interval: Some(Duration::from_secs(30)),
        ..Config::default()
    };
    run_interop("default", &[], config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_yamux_large_windows_fast_keepalive() {
    let config = Config {
        keepalive_interval: Some(Duration::from_millis(50)),
        max_stream_window: 1 << 20,
        ..Config::default()
    };
    run_interop(
        "1 MiB windows, 100 ms Go keepalive",
        // Go ends the session if a ping reply takes longer than its write
        // timeout: 3 s instead of 10 s makes a slow pong under load visible.
        &[
            "-window",
            "1048576",
            "-keepalive",
            "100ms",
            "-write-timeout",
            "3s",
        ],
        config,
    )
    .await;
}
