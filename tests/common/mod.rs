//! Shared harness for end-to-end tests: a coder-sim deployment, a Coder
//! config directory, the real OpenSSH client running coder-proxy as its
//! ProxyCommand, a scripted raw HTTP server for answers coder-sim cannot
//! give, a real HTTP proxy ([`proxy`]), and the assertions every test file
//! uses.
#![allow(dead_code)]

pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use coder_sim::{Sim, SimOptions, WorkspaceSpec};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Path of the coder-proxy binary under test.
pub const PROXY: &str = env!("CARGO_BIN_EXE_coder-proxy");

/// Whether the real OpenSSH client is here; with CODER_PROXY_REQUIRE_OPENSSH=1
/// its absence fails the test instead of skipping it.
pub fn have_openssh() -> bool {
    let ok = std::process::Command::new("ssh")
        .arg("-V")
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("CODER_PROXY_REQUIRE_OPENSSH").as_deref() == Ok("1") {
            panic!("OpenSSH client (ssh) is required but missing: apt-get install openssh-client");
        }
        eprintln!("SKIPPED: OpenSSH client (ssh) not found; set CODER_PROXY_REQUIRE_OPENSSH=1 to make this a failure");
    }
    ok
}

/// One deployment plus a logged-in config directory.
pub struct Env {
    pub sim: Sim,
    pub dir: tempfile::TempDir,
}

impl Env {
    pub async fn new(specs: Vec<WorkspaceSpec>) -> Env {
        Self::with_options(SimOptions::default(), specs).await
    }

    pub async fn with_options(opts: SimOptions, specs: Vec<WorkspaceSpec>) -> Env {
        let sim = Sim::start(opts).await.expect("start coder-sim");
        for s in specs {
            sim.add_workspace(s).await.expect("add workspace");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("coderv2");
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::write(cfg.join("url"), format!("{}\n", sim.url())).unwrap();
        std::fs::write(cfg.join("session"), format!("{}\n", sim.token())).unwrap();
        Env { sim, dir }
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("coderv2")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The ProxyCommand for a workspace's agent, with extra proxy flags.
    pub fn proxy_command(&self, ws: &str, agent: &str, extra: &str) -> String {
        let tunnel = self.sim.tunnel(ws, agent).expect("agent tunnel");
        format!(
            "{PROXY} --global-config {} --tunnel {tunnel} {extra} %h",
            self.config_dir().display()
        )
    }

    /// An `ssh` command through coder-proxy to `host`.
    pub fn ssh(&self, ws: &str, agent: &str, extra: &str, host: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(ssh_opts())
            .arg("-o")
            .arg(format!(
                "ProxyCommand={}",
                self.proxy_command(ws, agent, extra)
            ))
            .arg(host)
            .env_remove("CODER_SESSION_TOKEN")
            .env_remove("CODER_URL")
            .kill_on_drop(true);
        if let Some(k) = self.sim.client_key_path(ws, agent) {
            c.arg("-i").arg(k);
        }
        c
    }

    /// A bare coder-proxy (no ssh) for `host`.
    pub fn proxy(&self, ws: &str, agent: &str, host: &str) -> Command {
        let tunnel = self.sim.tunnel(ws, agent).expect("agent tunnel");
        let mut c = Command::new(PROXY);
        c.arg("--global-config")
            .arg(self.config_dir())
            .arg("--tunnel")
            .arg(tunnel)
            .arg(host)
            .env_remove("CODER_SESSION_TOKEN")
            .env_remove("CODER_URL")
            .kill_on_drop(true);
        c
    }
}

/// Options that make ssh non-interactive and quiet about host keys.
pub fn ssh_opts() -> Vec<String> {
    [
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=60",
        "-o",
        "User=root",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Run a command to completion with optional stdin bytes.
pub async fn run(mut cmd: Command, stdin: Option<&[u8]>, limit: Duration) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Some(data) = stdin {
        let mut w = child.stdin.take().unwrap();
        let data = data.to_vec();
        tokio::spawn(async move {
            let _ = w.write_all(&data).await;
            drop(w);
        });
    }
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(r) => r.expect("wait"),
        Err(_) => panic!("command did not finish within {limit:?}"),
    }
}

/// Everything an exited (or killed) child wrote to its piped stderr.
pub async fn read_stderr(child: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt;
    let mut err = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_end(&mut err).await;
    }
    text(&err)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Write `n` bytes of deterministic pseudo-random data.
pub fn random_file(path: &Path, n: usize, seed: u64) {
    let mut x = seed | 1;
    let mut data = Vec::with_capacity(n);
    while data.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(n);
    std::fs::write(path, data).unwrap();
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let data = std::fs::read(path).unwrap();
    hex(&sha2::Sha256::digest(&data))
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(data))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Poll until `f` holds or `limit` passes.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// Bytes a proxy sends before the server's banner can come back: nothing
/// useful, but it keeps the stream open until we close stdin.
pub const BANNER: &[u8] = b"SSH-2.0-setup_probe\r\n";

/// Assert a clean setup failure: exit code, nothing on stdout, one line.
pub fn assert_fails(out: &Output, code: i32, needle: &str) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", text(&out.stdout));
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Like [`assert_fails`], but retry lines may come before the final one.
pub fn assert_fails_after_retries(out: &Output, code: i32, needle: &str) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", text(&out.stdout));
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(
        last.starts_with("coder-proxy: ") && last.contains(needle),
        "expected {needle:?} last in {err:?}"
    );
    for l in err.trim_end().lines() {
        assert!(l == last || l.contains("retrying"), "unexpected line {l:?}");
    }
    err
}

/// Assert the proxy connected: the agent's SSH banner came back on stdout.
pub fn assert_connected(out: &Output) {
    assert!(
        out.stdout.starts_with(b"SSH-2.0-"),
        "no SSH banner; code {:?} stderr: {}",
        out.status.code(),
        text(&out.stderr)
    );
}

/// One request a [`RawServer`] received.
#[derive(Clone, Debug)]
pub struct RawRequest {
    pub method: String,
    /// The request target, query included.
    pub path: String,
    /// Request line and headers as received.
    pub head: String,
}

impl RawRequest {
    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// What a [`RawServer`] does with one request. Every reply ends its
/// connection, so canned heads should say `Connection: close`.
pub enum Reply {
    /// Write these bytes, then close.
    Close(Vec<u8>),
    /// Write these bytes, then keep the connection open and silent until the
    /// client goes away.
    Hold(Vec<u8>),
    /// Write `head`, then `chunk` again and again until the client goes away.
    Endless { head: Vec<u8>, chunk: Vec<u8> },
}

/// A complete response with `Content-Length` and `Connection: close`.
pub fn http_response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// [`http_response`] with a JSON body, as a [`Reply`].
pub fn json_reply(status: u16, body: &str) -> Reply {
    Reply::Close(http_response(status, "application/json", body.as_bytes()))
}

type Handler = dyn Fn(&RawRequest) -> Reply + Send + Sync;

/// A scripted HTTP/1.1 server on 127.0.0.1: `handler` picks the reply to
/// each request, and every request is recorded. It stops accepting when
/// dropped.
pub struct RawServer {
    pub addr: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<RawRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawServer {
    pub async fn start(
        handler: impl Fn(&RawRequest) -> Reply + Send + Sync + 'static,
    ) -> RawServer {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let handler: std::sync::Arc<Handler> = std::sync::Arc::new(handler);
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(serve_one(s, handler.clone(), seen2.clone()));
            }
        });
        RawServer { addr, seen, task }
    }

    /// A server that answers every request with the same bytes, then closes.
    pub async fn fixed(reply: impl Into<Vec<u8>>) -> RawServer {
        let reply = reply.into();
        Self::start(move |_| Reply::Close(reply.clone())).await
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// How many requests so far had a path containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path.contains(needle))
            .count()
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_one(
    mut s: tokio::net::TcpStream,
    handler: std::sync::Arc<Handler>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<RawRequest>>>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16384];
    let mut got = Vec::new();
    let end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        // A TLS ClientHello: answer as a plain HTTP server would.
        if got.first() == Some(&0x16) {
            let _ = s
                .write_all(&http_response(400, "text/plain", b"Bad Request\n"))
                .await;
            return;
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&got[..end]).into_owned();
    let mut words = head.split_whitespace();
    let req = RawRequest {
        method: words.next().unwrap_or("").to_string(),
        path: words.next().unwrap_or("").to_string(),
        head: head.clone(),
    };
    // Read the body too: closing with unread bytes would reset the
    // connection before the client reads the reply.
    let want: usize = req
        .header("Content-Length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut have = got.len() - end;
    while have < want {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
    }
    seen.lock().unwrap().push(req.clone());
    match handler(&req) {
        Reply::Close(bytes) => {
            let _ = s.write_all(&bytes).await;
            let _ = s.shutdown().await;
        }
        Reply::Hold(bytes) => {
            let _ = s.write_all(&bytes).await;
            // Until the client leaves.
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        }
        Reply::Endless { head, chunk } => {
            if s.write_all(&head).await.is_ok() {
                while s.write_all(&chunk).await.is_ok() {}
            }
        }
    }
}

/// Spawn a bare coder-proxy and wait until the agent's SSH banner arrives
/// on its stdout; returns the child and its (still open) stdin.
pub async fn spawn_until_banner(
    mut cmd: Command,
) -> (tokio::process::Child, tokio::process::ChildStdin) {
    use tokio::io::AsyncReadExt;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn coder-proxy");
    let stdin = child.stdin.take().expect("stdin");
    let mut out = child.stdout.take().expect("stdout");
    let mut banner = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(60), out.read_exact(&mut banner))
        .await
        .expect("no SSH banner within 60s")
        .expect("stdout ended before the SSH banner");
    assert_eq!(&banner, b"SSH-2.0-");
    (child, stdin)
}
