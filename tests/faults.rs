//! The fault matrix: a live session through coder-proxy survives everything
//! the control plane can throw at it, and ends promptly for the few reasons
//! that should end it. Real `ssh` through coder-proxy to coder-sim; every
//! transfer is checked by sha256 on both ends.
//!
//! Each row that applies to both transports runs twice, as `ROW::tcp`
//! (`--tunnel tcp://`) and `ROW::tailnet` (`--tunnel tailnet`: coordinate
//! websocket, DERP, WireGuard); see [`on_each_transport`]. A row about one
//! transport carries it in its name (`tailnet_…`, `tcp_…`) and says in its
//! comment why it does not apply to the other.
//!
//! `idle_five_minutes_with_flapping` is `#[ignore]`d; run it with
//! `cargo test --test faults -- --ignored`.
//!
//! The tailnet relay rows (`tailnet_*`, in their own block at the end) run
//! by default; the paused-shim row waits out a 3-minute SIGSTOP on almost
//! no CPU. Locally `CODER_PROXY_PAUSE_SECS` and `CODER_PROXY_REFUSE_SECS`
//! shorten the pause and the refusal (keep the pause above 120 s to cover
//! the dead-path bound).

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coder_sim::{AgentStatus, ApiFault, Route, WorkspaceSpec};
use common::proxy::{have_tinyproxy, tcp_peers_of, without_proxy_env, ProxyOptions, Tinyproxy};
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

const MIB: usize = 1024 * 1024;
const LIMIT: Duration = Duration::from_secs(180);

/// Which transport a row runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    /// `--tunnel tcp://…`: a kernel TCP connection to the agent's endpoint.
    Tcp,
    /// `--tunnel tailnet`: coordinate websocket, DERP relay, WireGuard.
    Tailnet,
}

impl Transport {
    /// The `--tunnel` value for agent `dev` of workspace `dev`.
    fn tunnel(self, env: &Env) -> String {
        match self {
            Transport::Tcp => env.sim.tunnel("dev", "dev").expect("agent tunnel"),
            Transport::Tailnet => "tailnet".into(),
        }
    }
}

/// `ssh dev.coder` through coder-proxy over `t`, with extra proxy flags.
fn ssh(env: &Env, t: Transport, extra: &str) -> Command {
    let mut c = Command::new("ssh");
    c.args(ssh_opts());
    if let Some(k) = env.sim.client_key_path("dev", "dev") {
        c.arg("-i").arg(k);
    }
    c.arg("-o")
        .arg(format!(
            "ProxyCommand={PROXY} --global-config {} --tunnel {} {extra} %h",
            env.config_dir().display(),
            t.tunnel(env)
        ))
        .arg("dev.coder")
        .env_remove("CODER_SESSION_TOKEN")
        .env_remove("CODER_URL")
        .kill_on_drop(true);
    without_proxy_env(&mut c);
    c
}

/// A bare coder-proxy (no ssh) for `dev` over `t`.
fn proxy(env: &Env, t: Transport) -> Command {
    let mut c = Command::new(PROXY);
    c.arg("--global-config")
        .arg(env.config_dir())
        .arg("--tunnel")
        .arg(t.tunnel(env))
        .arg("dev")
        .env_remove("CODER_SESSION_TOKEN")
        .env_remove("CODER_URL")
        .kill_on_drop(true);
    without_proxy_env(&mut c);
    c
}

/// Generates `NAME::tcp` and `NAME::tailnet` from `async fn NAME(t: Transport)`.
macro_rules! on_each_transport {
    ($(#[$meta:meta])* $name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$meta])*
            async fn tcp() {
                super::$name(super::Transport::Tcp).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$meta])*
            async fn tailnet() {
                super::$name(super::Transport::Tailnet).await
            }
        }
    };
}

/// Deterministic bytes that compress badly.
fn payload(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 11) as u8
        })
        .collect()
}

/// Flip the agent's control-plane status every `every` until stopped.
fn flapper(env: &Env, every: Duration) -> (Arc<AtomicBool>, tokio::task::JoinHandle<usize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (sim, stop2) = (env.sim.clone(), stop.clone());
    let h = tokio::spawn(async move {
        let cycle = [
            AgentStatus::Disconnected,
            AgentStatus::Timeout,
            AgentStatus::Connected,
            AgentStatus::Connecting,
        ];
        let mut n = 0;
        while !stop2.load(Ordering::Relaxed) {
            sim.set_agent_status("dev", "dev", cycle[n % cycle.len()]);
            n += 1;
            tokio::time::sleep(every).await;
        }
        sim.set_agent_status("dev", "dev", AgentStatus::Connected);
        n
    });
    (stop, h)
}

/// Upload `data` with `ssh host 'sha256sum'` and return the remote digest.
async fn upload_digest(env: &Env, t: Transport, data: &[u8]) -> (std::process::Output, String) {
    let mut cmd = ssh(env, t, "-v");
    cmd.arg("sha256sum | cut -d' ' -f1");
    let out = run(cmd, Some(data), LIMIT).await;
    let d = text(&out.stdout).trim().to_string();
    (out, d)
}

fn assert_no_token(env: &Env, out: &std::process::Output) {
    let tok = env.sim.token();
    assert!(!text(&out.stderr).contains(&tok), "token on stderr");
    assert!(!text(&out.stdout).contains(&tok), "token on stdout");
}

/// The agent's status flaps every 200 ms through a 256 MiB upload and a
/// 256 MiB download: nothing is lost and the session stays up.
async fn agent_flapping_throughout_transfers(t: Transport) {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let data = payload(256 * MIB, 1);
    let want = sha256(&data);
    let (stop, h) = flapper(&env, Duration::from_millis(200));
    let (out, got) = upload_digest(&env, t, &data).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(got, want, "upload corrupted");
    assert_no_token(&env, &out);

    // Download: the remote writes a file, reports its digest on stderr, and
    // streams it on stdout.
    let mut cmd = ssh(&env, t, "");
    let remote = env.path("down.bin");
    cmd.arg(format!(
        "head -c {} /dev/urandom > {f}; sha256sum {f} | cut -d' ' -f1 >&2; cat {f}",
        256 * MIB,
        f = remote.display()
    ));
    let out = run(cmd, None, LIMIT).await;
    stop.store(true, Ordering::Relaxed);
    let flips = h.await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), 256 * MIB);
    let remote_digest = text(&out.stderr)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    assert_eq!(sha256(&out.stdout), remote_digest, "download corrupted");
    assert!(
        flips >= 5,
        "only {flips} flips happened during the transfers"
    );
}
on_each_transport!(agent_flapping_throughout_transfers);

/// 503 for a long stretch mid-session with the watch cut: the session is
/// unaffected, the watch resubscribes with backoff, and a later stop is
/// still noticed.
async fn api_503_and_cut_watch_mid_session(t: Transport) {
    if !have_openssh() {
        return;
    }
    let outage: u64 = std::env::var("CODER_PROXY_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let env = Env::new(vec![
        WorkspaceSpec::new("dev").build_time(Duration::from_millis(300))
    ])
    .await;
    // A session that moves data for the whole outage: the remote echoes
    // stdin back through sha256sum at the end.
    let mut cmd = ssh(&env, t, "-v");
    cmd.arg("sha256sum | cut -d' ' -f1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    assert!(eventually(Duration::from_secs(30), || env.sim.usage_count("dev") >= 1).await);

    env.sim.set_api_fault(ApiFault::Status(503));
    env.sim.cut_watch_streams();
    let fault_at = Instant::now();
    let mut sent = Vec::new();
    let mut seed = 7;
    while fault_at.elapsed() < Duration::from_secs(outage) {
        let chunk = payload(4 * MIB, seed);
        seed += 1;
        stdin.write_all(&chunk).await.unwrap();
        sent.extend_from_slice(&chunk);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    env.sim.set_api_fault(ApiFault::None);
    drop(stdin);
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    assert_eq!(out.trim(), sha256(&sent), "bytes lost during the outage");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());

    // Watch resubscription attempts during the outage backed off: not a
    // storm, but more than one.
    let attempts: Vec<_> = env
        .sim
        .request_log()
        .into_iter()
        .filter(|r| r.path.contains("/watch") && r.status == 503)
        .collect();
    let max = 3 + outage as usize / 4;
    assert!(
        attempts.len() >= 2 && attempts.len() <= max,
        "{} watch attempts during a {outage}s outage",
        attempts.len()
    );

    // A later stop is still noticed by a session whose watch went through
    // an outage.
    let mut cmd = ssh(&env, t, "");
    cmd.arg("echo ready; sleep 120")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut o = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    o.read_exact(&mut buf).await.unwrap();
    env.sim.set_api_fault(ApiFault::Status(503));
    env.sim.cut_watch_streams();
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.sim.set_api_fault(ApiFault::None);
    env.sim.stop_workspace("dev");
    let noticed = Instant::now();
    // The watcher's backoff is at most 15 s.
    let st = tokio::time::timeout(Duration::from_secs(25), child.wait())
        .await
        .expect("stop not noticed");
    assert!(st.is_ok());
    let err = read_stderr(&mut child).await;
    assert!(err.contains("was stopped"), "{err}");
    eprintln!(
        "{t:?}: stop noticed {:?} after the outage ended",
        noticed.elapsed()
    );
}
on_each_transport!(api_503_and_cut_watch_mid_session);

/// The API accepts connections but never answers, mid-session: the
/// transfer takes transfer time only.
async fn api_hang_mid_session(t: Transport) {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let data = payload(64 * MIB, 3);
    let mut cmd = ssh(&env, t, "-v");
    cmd.arg("sleep 1; sha256sum | cut -d' ' -f1");
    let sim = env.sim.clone();
    let hang = tokio::spawn(async move {
        // Once the session is up (its heartbeat arrived), hang the API.
        while sim.usage_count("dev") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sim.set_api_fault(ApiFault::Hang);
        sim.cut_watch_streams();
    });
    let started = Instant::now();
    let out = run(cmd, Some(&data), LIMIT).await;
    hang.await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), sha256(&data));
    // Nothing waited on the hung API: the session took transfer time only.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    env.sim.set_api_fault(ApiFault::None);
}
on_each_transport!(api_hang_mid_session);

/// Every new watch stream first replays the previous build as `stopped`,
/// then (half a second later) the current state. A session that started
/// after an autostart must ignore the stale stop — it is of a build older
/// than the one it connected to — and still close on a real stop.
async fn stale_stopped_replay_does_not_close_a_session_after_autostart(t: Transport) {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")
        .stopped()
        .build_time(Duration::from_millis(300))])
    .await;
    env.sim.set_watch_replays_stale_stop(true);
    let mut cmd = ssh(&env, t, "");
    cmd.arg("echo ready; read line; echo got:$line; sleep 120")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(LIMIT, out.read_line(&mut line))
        .await
        .expect("no output from the session")
        .unwrap();
    assert_eq!(line, "ready\n", "the autostarted session did not come up");

    // A new watch stream (as after any dropped connection): the stale stop
    // of the previous build, then the current running build.
    let before = env.sim.stale_replays_begun();
    env.sim.cut_watch_streams();
    assert!(
        eventually(Duration::from_secs(30), || env.sim.stale_replays_begun()
            > before)
        .await,
        "the watch never resubscribed"
    );
    // Either the stream got to send the current state after the stale one,
    // or the client hung up on the stale one.
    let mut exited = None;
    assert!(
        eventually(Duration::from_secs(30), || {
            exited = child.try_wait().ok().flatten();
            exited.is_some() || env.sim.stale_replays_delivered() > before
        })
        .await
    );
    if exited.is_some() {
        let err = read_stderr(&mut child).await;
        panic!("the stale replay closed the session: {err}");
    }
    stdin.write_all(b"still-here\n").await.unwrap();
    line.clear();
    let n = tokio::time::timeout(Duration::from_secs(30), out.read_line(&mut line))
        .await
        .expect("the session stopped answering")
        .unwrap_or(0);
    if n == 0 {
        let err = read_stderr(&mut child).await;
        panic!("the stale replay closed the session: {err}");
    }
    assert_eq!(line, "got:still-here\n");

    // A real stop still ends it.
    env.sim.stop_workspace("dev");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the stop was not noticed")
        .unwrap();
    let err = read_stderr(&mut child).await;
    assert!(err.contains("was stopped"), "{err}");
    assert!(status.code().is_some());
}
on_each_transport!(stale_stopped_replay_does_not_close_a_session_after_autostart);

/// tailnet only (no coordinate endpoint on tcp://). `/coordinate` answers a
/// load balancer's 502 for a minute before the first connect: coder-proxy
/// keeps retrying with bounded backoff and "retrying" lines, connects once
/// it answers, and the transfer is intact. `/connection` answering 503 is
/// retried the same way. A 403 or 404 on `/coordinate` fails at once with
/// one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailnet_coordinate_502_before_connect_is_retried_until_it_answers() {
    if !have_openssh() {
        return;
    }
    let outage: u64 = std::env::var("CODER_PROXY_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    env.sim
        .fail_route(Route::Coordinate, 502, Duration::from_secs(outage));
    let failing_since = Instant::now();
    let data = payload(16 * MIB, 5);
    let mut cmd = ssh(&env, Transport::Tailnet, "");
    cmd.arg("sha256sum | cut -d' ' -f1");
    let out = run(cmd, Some(&data), LIMIT).await;
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(text(&out.stdout).trim(), sha256(&data), "{err}");
    assert!(
        failing_since.elapsed() >= Duration::from_secs(outage),
        "connected while /coordinate still failed"
    );
    let retries = err.lines().filter(|l| l.contains("retrying")).count();
    assert!(retries >= 3, "no retrying lines:\n{err}");
    eprintln!(
        "{retries} retrying lines over {outage}s, the first: {}",
        err.lines().find(|l| l.contains("retrying")).unwrap_or("")
    );
    assert!(
        err.contains("502"),
        "the retry lines do not say why:\n{err}"
    );
    let coordinate: Vec<_> = env
        .sim
        .request_log()
        .into_iter()
        .filter(|r| r.path.contains("/coordinate"))
        .collect();
    let refused = coordinate.iter().filter(|r| r.status == 502).count();
    assert!(
        coordinate.iter().any(|r| r.status == 101),
        "never upgraded: {coordinate:?}"
    );
    // Backoff up to 4 s: about outage/4 attempts, not a storm.
    let (lo, hi) = (outage as usize / 8, outage as usize / 2 + 6);
    assert!(
        (lo..=hi).contains(&refused),
        "{refused} refused attempts in {outage}s (want {lo}..={hi})"
    );

    // /connection (the DERP map) answering 503 is retried too.
    env.sim
        .fail_route(Route::Connection, 503, Duration::from_secs(3));
    let (mut child, _stdin) = spawn_until_banner(proxy(&env, Transport::Tailnet)).await;
    child.kill().await.unwrap();
    let err = read_stderr(&mut child).await;
    assert!(err.contains("retrying") && err.contains("503"), "{err}");

    // What a retry cannot change fails at once, with one line.
    for status in [403, 404] {
        env.sim
            .fail_route(Route::Coordinate, status, Duration::from_secs(600));
        let started = Instant::now();
        let out = run(proxy(&env, Transport::Tailnet), Some(BANNER), LIMIT).await;
        assert_fails(&out, 1, &status.to_string());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "HTTP {status} took {:?} to fail",
            started.elapsed()
        );
    }
}

/// tailnet only (a `tcp://` tunnel is a direct TCP connection and never
/// uses an HTTP proxy). With `HTTP_PROXY` pointing at a real tinyproxy —
/// without and with Basic auth — the REST calls, the coordinate websocket
/// and the DERP connection all go through it (tinyproxy logs the CONNECTs;
/// coder-proxy holds no connection to anything but the proxy), data flows
/// with sha256 equal, and the proxy password appears in no output or log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailnet_through_an_http_proxy_with_and_without_basic_auth() {
    if !have_openssh() || !have_tinyproxy() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let sim_port = url_port(&env.sim.url());
    for auth in [None, Some(("proxyuser", "pr0xy-s3cret-pw"))] {
        let tp = Tinyproxy::start(ProxyOptions {
            basic_auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
            ..Default::default()
        })
        .await;
        let logs = env.path(&format!("logs-{}", auth.is_some()));
        let data = payload(32 * MIB, 9);
        let mut cmd = ssh(
            &env,
            Transport::Tailnet,
            &format!("-v --log-dir {}", logs.display()),
        );
        cmd.env("HTTP_PROXY", tp.url(auth))
            .env("CODER_PROXY_PROXY_LOOPBACK", "1")
            .arg("sha256sum | cut -d' ' -f1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let ssh_pid = child.id().unwrap();
        // While the session is up: every TCP connection coder-proxy holds
        // goes to the proxy.
        let mut peers = Vec::new();
        assert!(
            eventually(Duration::from_secs(60), || {
                let Some(pid) = child_pid_named(ssh_pid, "coder-proxy") else {
                    return false;
                };
                peers = tcp_peers_of(pid);
                env.sim.tailnet_streams("dev", "dev") > 0 && !peers.is_empty()
            })
            .await,
            "the session never came up"
        );
        assert!(
            peers.iter().all(|p| *p == tp.port),
            "coder-proxy holds connections to ports {peers:?}, not only the proxy's {}",
            tp.port
        );
        let mut stdin = child.stdin.take().unwrap();
        let writer = tokio::spawn(async move {
            stdin.write_all(&data).await.unwrap();
            data
        });
        let out = tokio::time::timeout(LIMIT, child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let data = writer.await.unwrap();
        let err = text(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert_eq!(text(&out.stdout).trim(), sha256(&data), "{err}");

        let requests = tp.requests();
        let connects = requests
            .iter()
            .filter(|r| r.starts_with(&format!("CONNECT 127.0.0.1:{sim_port} ")))
            .count();
        assert!(
            connects >= 2,
            "want CONNECTs for the coordinate websocket and DERP, got {requests:?}"
        );
        eprintln!(
            "basic auth {}: tinyproxy saw {connects} CONNECTs to the sim among {requests:?}; coder-proxy's connections went to ports {peers:?}",
            auth.is_some()
        );
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with(&format!("GET http://127.0.0.1:{sim_port}/api/v2/"))),
            "the REST calls did not go through the proxy: {requests:?}"
        );
        let upgraded = |p: &str| {
            env.sim
                .request_log()
                .iter()
                .any(|r| r.path.contains(p) && r.status == 101)
        };
        assert!(upgraded("/coordinate") && upgraded("/derp"));
        if let Some((_, password)) = auth {
            let mut everything = err.clone();
            for f in std::fs::read_dir(&logs).unwrap().flatten() {
                everything.push_str(&std::fs::read_to_string(f.path()).unwrap_or_default());
            }
            assert!(everything.contains("CONNECT") || everything.contains("proxy"));
            assert!(
                !everything.contains(password),
                "the proxy password leaked into stderr or the log file"
            );
        }
    }
}

/// The port of `http://host:PORT`.
fn url_port(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("a port in the URL")
}

/// The `tcp://` tunnel is reset by the far side: exit 1 at once, one line.
///
/// tcp:// only. Over tailnet there is no kernel connection to reset: the
/// agent bridges our userspace TCP stream to its SSH server, so a reset
/// behind the agent reaches us as the agent closing its side (a FIN) —
/// `close_orders::tailnet` covers that — and a reset of the in-tunnel
/// connection itself is `tailnet_reset_by_the_agent_exits_1_with_one_line`.
/// A dead tailnet data path is the relay-fault rows' business.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_tunnel_reset_exits_at_once_with_one_line() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let (mut child, _stdin) = spawn_until_banner(proxy(&env, Transport::Tcp)).await;
    assert!(env.sim.reset_connections("dev", "dev"));
    let t = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("still running")
        .unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_millis(500), "exit took {took:?}");
    assert_eq!(status.code(), Some(1));
    let err = read_stderr(&mut child).await;
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("connection to the agent broke"), "{err}");
    eprintln!("tcp reset: exit {took:?} after reset");
}

/// SIGHUP, SIGTERM and SIGINT mid-transfer end the shim within 1 s,
/// leaving no process behind. Over tailnet the shim also closes its
/// in-tunnel connection towards the agent before it exits (FIN, or RST
/// after a short bound), so the agent's side of the stream ends instead of
/// lingering.
async fn signals_mid_transfer_end_the_shim_within_a_second(t: Transport) {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    for sig in ["HUP", "TERM", "INT"] {
        let mut cmd = ssh(&env, t, "");
        cmd.arg("cat > /dev/null")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // Keep data flowing.
        let writer = tokio::spawn(async move {
            let chunk = vec![0x5au8; 256 * 1024];
            while stdin.write_all(&chunk).await.is_ok() {}
        });
        let ssh_pid = child.id().unwrap();
        let mut proxy_pid = None;
        assert!(
            eventually(Duration::from_secs(30), || {
                proxy_pid = child_pid_named(ssh_pid, "coder-proxy");
                proxy_pid.is_some()
                    && env.sim.usage_count("dev") > 0
                    && (t == Transport::Tcp || env.sim.tailnet_streams("dev", "dev") == 1)
            })
            .await,
            "SIG{sig}: no session"
        );
        let pid = proxy_pid.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await; // mid-transfer
        std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        let signalled = Instant::now();
        assert!(
            eventually(Duration::from_secs(5), || !std::path::Path::new(&format!(
                "/proc/{pid}"
            ))
            .exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")))
            .await,
            "coder-proxy {pid} still alive after SIG{sig}"
        );
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "SIG{sig}: exit took {:?}",
            signalled.elapsed()
        );
        if t == Transport::Tailnet {
            let closed = eventually(Duration::from_secs(5), || {
                env.sim.tailnet_streams("dev", "dev") == 0
            })
            .await;
            assert!(
                closed,
                "SIG{sig}: the agent's in-tunnel connection still open 5s after the shim exited"
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("ssh hung");
        writer.abort();
        // The shim spawned no lingering children.
        assert!(child_pid_named(pid, "").is_none());
    }
}
on_each_transport!(signals_mid_transfer_end_the_shim_within_a_second);

/// The first child of `parent` whose command name starts with `name`.
fn child_pid_named(parent: u32, name: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = &stat[stat.find('(').map_or(0, |i| i + 1)..close];
        let ppid: u32 = stat[close + 2..]
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == parent && comm.starts_with(name) {
            return Some(pid);
        }
    }
    None
}

/// The remote closes first while stdin stays open: exit promptly. Stdin
/// EOF first: all remaining output still arrives.
async fn close_orders(t: Transport) {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    // Remote closes: the proxy, stdin still open, exits promptly.
    let (mut child, _stdin) = spawn_until_banner(proxy(&env, t)).await;
    assert!(env.sim.kill_connections("dev", "dev"));
    let killed = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("still running")
        .unwrap();
    let took = killed.elapsed();
    eprintln!("{t:?}: exit {took:?} after the remote closed");
    assert!(took < Duration::from_millis(500), "exit took {took:?}");
    assert!(status.code().is_some());

    if !have_openssh() {
        return;
    }
    // Stdin EOF first: all remaining output still arrives.
    let file = env.path("in.bin");
    random_file(&file, 8 * MIB, 11);
    let mut cmd = ssh(&env, t, "");
    cmd.arg("sleep 1; cat")
        .stdin(std::fs::File::open(&file).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::time::timeout(LIMIT, cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(sha256(&out.stdout), sha256_file(&file));
}
on_each_transport!(close_orders);

/// The API is down (503) before connecting: retry, say so, connect when it
/// returns; beyond --wait-timeout, fail with one clear line.
async fn api_down_before_connecting_is_retried(t: Transport) {
    if !have_openssh() {
        return;
    }
    let down: u64 = std::env::var("CODER_PROXY_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    env.sim.set_api_fault(ApiFault::Status(503));
    let sim = env.sim.clone();
    let heal = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(down)).await;
        sim.set_api_fault(ApiFault::None);
        Instant::now()
    });
    let mut cmd = ssh(&env, t, "");
    cmd.arg("echo through");
    let out = run(cmd, None, LIMIT).await;
    let healed = heal.await.unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(text(&out.stdout), "through\n");
    assert!(err.contains("retrying"), "{err}");
    eprintln!(
        "{t:?}: connected {:?} after the API came back",
        healed.elapsed()
    );

    env.sim.set_api_fault(ApiFault::Status(503));
    let mut cmd = proxy(&env, t);
    cmd.arg("--wait-timeout=3s");
    let out = run(cmd, Some(b""), LIMIT).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty());
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(
        last.starts_with("coder-proxy: ") && last.contains("503"),
        "{err}"
    );
}
on_each_transport!(api_down_before_connecting_is_retried);

/// 50 sessions through 50 shims at once.
async fn fifty_concurrent_sessions(t: Transport) {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak_total = 0u64;
        let mut peak_one = 0u64;
        let mut peak_count = 0usize;
        while !stop2.load(Ordering::Relaxed) {
            let rss = proxy_rss_kib();
            peak_total = peak_total.max(rss.iter().sum());
            peak_one = peak_one.max(rss.iter().copied().max().unwrap_or(0));
            peak_count = peak_count.max(rss.len());
            std::thread::sleep(Duration::from_millis(50));
        }
        (peak_total, peak_one, peak_count)
    });
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut cmd = ssh(&env, t, "");
        cmd.arg(format!("echo session-{i}; sleep 2"));
        tasks.push(tokio::spawn(
            async move { (i, run(cmd, None, LIMIT).await) },
        ));
    }
    for t in tasks {
        let (i, out) = t.await.unwrap();
        assert!(out.status.success(), "session {i}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("session-{i}\n"));
    }
    stop.store(true, Ordering::Relaxed);
    let (total, one, count) = sampler.join().unwrap();
    eprintln!(
        "{t:?}: 50 sessions ok; peak {count} shims alive, peak total RSS {:.1} MiB, peak single RSS {:.1} MiB",
        total as f64 / 1024.0,
        one as f64 / 1024.0
    );
    assert!(count >= 10, "sessions did not overlap ({count})");
}
on_each_transport!(fifty_concurrent_sessions);

/// VmRSS (KiB) of every running coder-proxy.
fn proxy_rss_kib() -> Vec<u64> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in dir.flatten() {
        let p = e.path();
        if std::fs::read_to_string(p.join("comm"))
            .map(|c| c.trim() == "coder-proxy")
            .unwrap_or(false)
        {
            if let Ok(status) = std::fs::read_to_string(p.join("status")) {
                if let Some(l) = status.lines().find(|l| l.starts_with("VmRSS:")) {
                    if let Some(k) = l.split_whitespace().nth(1).and_then(|k| k.parse().ok()) {
                        v.push(k);
                    }
                }
            }
        }
    }
    v
}

/// An idle session for 5 minutes while the agent flaps, then used.
async fn idle_five_minutes_with_flapping(t: Transport) {
    if !have_openssh() {
        return;
    }
    let idle: u64 = std::env::var("CODER_PROXY_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let mut cmd = ssh(&env, t, "");
    cmd.arg("read line; echo got:$line")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    assert!(eventually(Duration::from_secs(30), || env.sim.usage_count("dev") >= 1).await);
    let (stop, h) = flapper(&env, Duration::from_secs(2));
    tokio::time::sleep(Duration::from_secs(idle)).await;
    stop.store(true, Ordering::Relaxed);
    h.await.unwrap();
    stdin.write_all(b"still-here\n").await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "got:still-here\n");
}
on_each_transport!(
    #[ignore = "takes 5 minutes; run with --ignored"]
    idle_five_minutes_with_flapping
);

// ===========================================================================
// Tailnet relay faults: the DERP relay connection dies silently, refuses
// redials, or the shim is paused; a reset or a signal ends the session the
// way `tcp://` does. Real `ssh` through `coder-proxy --tunnel tailnet` to
// coder-sim; sha256 on both ends.
// ===========================================================================

/// An upload through `ssh dev.coder sha256sum` in two halves: the first
/// half goes through and is taken by the remote command, then the test
/// injects its fault while the stream is open and quiet, then the second
/// half follows into the fault.
///
/// "Quiet" matters: a real Coder agent's TCP stack gives up on a connection
/// whose data stays unacknowledged for about 12.6 s (coder-sim's agent does
/// the same), so only a connection with nothing of the agent's in flight can
/// outlive a longer outage, whatever the client does. The remote command
/// reports on stderr once it has read the first half, and the fault waits
/// for that.
struct SplitUpload {
    child: tokio::process::Child,
    want: String,
    /// ssh's stderr so far (the remote's and coder-proxy's `-v` log).
    stderr: Arc<std::sync::Mutex<Vec<u8>>>,
    stderr_reader: tokio::task::JoinHandle<()>,
    go: Option<tokio::sync::oneshot::Sender<()>>,
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// What the remote command prints on stderr once it has read the first half.
const HALF_RECEIVED: &str = "split-upload: first half received";

impl SplitUpload {
    async fn start(env: &Env, half: usize, seed: u32) -> SplitUpload {
        let mut cmd = ssh(env, Transport::Tailnet, "-v");
        cmd.arg(format!(
            "{{ head -c {half}; echo '{HALF_RECEIVED}' >&2; cat; }} | sha256sum | cut -d' ' -f1"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let stderr = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = stderr.clone();
        let stderr_reader = tokio::spawn(async move {
            let mut buf = [0u8; 8192];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let (a, b) = (payload(half, seed), payload(half, seed + 1));
        let mut all = a.clone();
        all.extend_from_slice(&b);
        let want = sha256(&all);
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let writer = tokio::spawn(async move {
            stdin.write_all(&a).await?;
            stdin.flush().await?;
            let _ = go_rx.await;
            stdin.write_all(&b).await
            // Dropping stdin ends the upload.
        });
        SplitUpload {
            child,
            want,
            stderr,
            stderr_reader,
            go: Some(go_tx),
            writer,
        }
    }

    fn stderr_text(&self) -> String {
        text(&self.stderr.lock().unwrap())
    }

    /// Waits until the remote command has read the whole first half, then
    /// a moment more for the last acknowledgements: the stream is open and
    /// nothing is in flight either way.
    async fn at_halfway(&mut self, env: &Env) {
        let stderr = self.stderr.clone();
        assert!(
            eventually(Duration::from_secs(60), || {
                text(&stderr.lock().unwrap()).contains(HALF_RECEIVED)
            })
            .await,
            "the remote did not get the first half within 60s:\n{}",
            self.stderr_text()
        );
        assert_eq!(
            env.sim.tailnet_streams("dev", "dev"),
            1,
            "no tailnet stream at the agent"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    /// Lets the second half go.
    fn resume(&mut self) {
        if let Some(g) = self.go.take() {
            let _ = g.send(());
        }
    }

    /// Waits for the end; returns (remote digest, stderr, exit code) after
    /// checking the digest against what was sent.
    async fn finish(mut self, limit: Duration) -> (String, String, Option<i32>) {
        self.resume();
        let mut out = self.child.stdout.take().unwrap();
        let mut o = String::new();
        let res = tokio::time::timeout(limit, async {
            out.read_to_string(&mut o).await.unwrap();
            self.child.wait().await.unwrap()
        })
        .await;
        let status = match res {
            Ok(s) => s,
            Err(_) => panic!(
                "ssh did not finish within {limit:?}; stderr so far:\n{}",
                self.stderr_text()
            ),
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.stderr_reader).await;
        let e = self.stderr_text();
        let wrote = self.writer.await.unwrap();
        assert!(
            wrote.is_ok(),
            "ssh stopped reading its stdin ({wrote:?}), exit {:?}:\n{e}",
            status.code()
        );
        let got = o.trim().to_string();
        assert_eq!(got, self.want, "bytes lost or corrupted:\n{e}");
        (got, e, status.code())
    }

    /// Ends a failed test: kills ssh and returns its stderr so far.
    async fn abandon(mut self) -> String {
        let _ = self.child.start_kill();
        // The shim may hold the pipe open a little longer than ssh.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.stderr_reader).await;
        self.writer.abort();
        self.stderr_text()
    }
}

/// The one relay connection key of the agent's tailnet client.
fn client_key(env: &Env) -> coder_tailnet::derp::NodePublic {
    let keys = env.sim.tailnet_client_keys("dev", "dev");
    assert_eq!(keys.len(), 1, "want one tailnet client: {keys:?}");
    keys[0]
}

/// The client's relay connection, frozen (open, nothing read or written).
struct FrozenRelay {
    key: coder_tailnet::derp::NodePublic,
    relay: coder_tailnet::derp::DerpServer,
    before: u64,
    at: Instant,
}

impl FrozenRelay {
    fn freeze(env: &Env) -> FrozenRelay {
        let key = client_key(env);
        let relay = env.sim.derp_server();
        let before = relay.active_conn(&key).expect("client not on the relay");
        assert_eq!(env.sim.freeze_client_derp("dev", "dev"), 1);
        FrozenRelay {
            key,
            relay,
            before,
            at: Instant::now(),
        }
    }

    /// Waits up to `limit` for a new relay connection of the client;
    /// returns whether it came and the time since the freeze.
    async fn redialed_within(&self, limit: Duration) -> (bool, Duration) {
        let ok = eventually(limit, || {
            self.relay
                .active_conn(&self.key)
                .is_some_and(|c| c != self.before)
        })
        .await;
        (ok, self.at.elapsed())
    }
}

async fn silently_dead_relay_case(force_websockets: bool) {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    env.sim.set_derp_force_websockets(force_websockets);
    let mut up = SplitUpload::start(&env, 8 * MIB, 21).await;
    up.at_halfway(&env).await;
    let frozen = FrozenRelay::freeze(&env);
    up.resume();
    let (redialed, took) = frozen.redialed_within(Duration::from_secs(40)).await;
    eprintln!(
        "tailnet relay fault (websockets: {force_websockets}): relay silent -> new relay connection in {took:?}"
    );
    if !redialed {
        let err = up.abandon().await;
        panic!("no new relay connection within {took:?}:\n{err}");
    }
    // Well inside the ~12.6 s a real agent waits for acknowledgements.
    assert!(took <= Duration::from_secs(10), "redial took {took:?}");
    let (_, err, code) = up.finish(LIMIT).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("DERP region 999 down"), "{err}");
}

/// The relay connection goes silently dead mid-transfer (open, no
/// FIN/RST, nothing read or written): the shim notices within 10 s,
/// redials, and the transfer completes with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailnet_silently_dead_relay_mid_transfer_is_redialed_and_loses_nothing() {
    if !have_openssh() {
        return;
    }
    silently_dead_relay_case(false).await;
}

/// The relay connection goes silently dead while the agent is sending (a
/// download): the agent has data in flight the whole time, so it gives up
/// on the connection about 12.6 s after its first unanswered segment, as a
/// real Coder agent does — the shim must find the dead relay and redial
/// before that, and every byte arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailnet_silently_dead_relay_during_a_download_is_healed_before_the_agent_gives_up() {
    if !have_openssh() {
        return;
    }
    const TOTAL: usize = 48 * MIB;
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let mut cmd = ssh(&env, Transport::Tailnet, "-v");
    cmd.arg(format!("head -c {TOTAL} /dev/zero"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let errs = tokio::spawn(async move {
        let mut e = Vec::new();
        let _ = err.read_to_end(&mut e).await;
        text(&e)
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    while got < 4 * MIB {
        let n = out.read(&mut buf).await.unwrap();
        assert!(n > 0, "the download ended early");
        got += n;
    }
    let frozen = FrozenRelay::freeze(&env);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = got;
        loop {
            match out.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got += n,
            }
        }
    });
    let (redialed, took) = frozen.redialed_within(Duration::from_secs(20)).await;
    eprintln!(
        "tailnet relay fault during a download: relay silent -> new relay connection in {took:?}"
    );
    let total = tokio::time::timeout(LIMIT, reader)
        .await
        .expect("download hung")
        .unwrap();
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .expect("ssh hung")
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), errs)
        .await
        .expect("stderr")
        .unwrap();
    assert!(redialed, "no new relay connection within {took:?}:\n{e}");
    assert!(took <= Duration::from_secs(10), "redial took {took:?}");
    assert_eq!(total, TOTAL, "bytes lost (the agent gave up?):\n{e}");
    assert_eq!(status.code(), Some(0), "{e}");
}

/// The same with the relay reached over a websocket (`derp_force_websockets`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailnet_silently_dead_websocket_relay_mid_transfer_is_redialed_and_loses_nothing() {
    if !have_openssh() {
        return;
    }
    silently_dead_relay_case(true).await;
}

/// The live relay connection is killed and the relay refuses every
/// new connection for a minute (less than WireGuard's 120 s dead-path
/// bound): the stream survives, redials back off (a few at first, then at
/// most ~8 s apart, never a storm), the shim is back within seconds of
/// the relay accepting again, and the transfer completes intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailnet_relay_refusing_redials_for_a_minute_backs_off_and_the_stream_survives() {
    if !have_openssh() {
        return;
    }
    let refuse: u64 = std::env::var("CODER_PROXY_REFUSE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let refuse = Duration::from_secs(refuse);
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let mut up = SplitUpload::start(&env, 8 * MIB, 31).await;
    up.at_halfway(&env).await;
    let key = client_key(&env);
    let relay = env.sim.derp_server();
    let before = relay.active_conn(&key).expect("client not on the relay");
    env.sim.refuse_derp_for(refuse);
    let down_at = Instant::now();
    assert_eq!(env.sim.drop_client_derp("dev", "dev"), 1);
    up.resume();
    let accept_at = down_at + refuse;
    let back = eventually(refuse + Duration::from_secs(20), || {
        relay.active_conn(&key).is_some_and(|c| c != before)
    })
    .await;
    let after_accept = Instant::now().saturating_duration_since(accept_at);
    let attempts: Vec<Instant> = relay
        .refused_at()
        .into_iter()
        .map(tokio::time::Instant::into_std)
        .filter(|t| *t >= down_at)
        .collect();
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!(
        "tailnet relay fault: {} refused redials in {refuse:?}, gaps {gaps:?}; back {after_accept:?} after the relay accepted again",
        attempts.len()
    );
    if !back {
        let err = up.abandon().await;
        panic!("never reconnected to the relay:\n{err}");
    }
    assert!(
        after_accept <= Duration::from_secs(10),
        "reconnected {after_accept:?} after the relay accepted again"
    );
    assert!(attempts.len() >= 3, "only {} redials", attempts.len());
    let storm = 4 + refuse.as_secs() as usize / 3;
    assert!(
        attempts.len() <= storm,
        "{} redials in {refuse:?}: no backoff",
        attempts.len()
    );
    let widest = gaps.iter().max().copied().unwrap_or_default();
    assert!(
        widest <= Duration::from_secs(10),
        "redials {widest:?} apart"
    );
    let (_, err, code) = up.finish(LIMIT).await;
    assert_eq!(code, Some(0), "{err}");
}

/// The shim is stopped (SIGSTOP, as a closed laptop lid does) for
/// three minutes mid-transfer — longer than the 120 s dead-path bound —
/// then continued: the session recovers (relay, WireGuard) and the
/// transfer started before the pause completes intact. Takes > 3 min of
/// wall time but next to no CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailnet_shim_paused_three_minutes_mid_transfer_recovers_and_loses_nothing() {
    if !have_openssh() {
        return;
    }
    let pause: u64 = std::env::var("CODER_PROXY_PAUSE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(180);
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let mut up = SplitUpload::start(&env, 8 * MIB, 41).await;
    up.at_halfway(&env).await;
    let ssh_pid = up.child.id().unwrap();
    let pid = child_pid_named(ssh_pid, "coder-proxy").expect("no coder-proxy under ssh");
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {pid}");
    };
    signal("STOP");
    up.resume();
    tokio::time::sleep(Duration::from_secs(pause)).await;
    signal("CONT");
    let woke = Instant::now();
    let (_, err, code) = up.finish(Duration::from_secs(120)).await;
    eprintln!(
        "tailnet pause fault: {pause}s pause; transfer done {:?} after SIGCONT",
        woke.elapsed()
    );
    assert_eq!(code, Some(0), "{err}");
}

/// The agent's side resets the in-tunnel TCP connection: reported
/// like `tcp://` does (`tcp_tunnel_reset_exits_at_once_with_one_line`) — exit 1 at once, one line on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailnet_reset_by_the_agent_exits_1_with_one_line() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    for round in 0..3 {
        let (mut child, _stdin) = spawn_until_banner(proxy(&env, Transport::Tailnet)).await;
        assert!(
            eventually(Duration::from_secs(10), || env
                .sim
                .tailnet_streams("dev", "dev")
                == 1)
            .await
        );
        assert!(env.sim.reset_tailnet_streams("dev", "dev") >= 1);
        let t = Instant::now();
        let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .expect("still running after the reset")
            .unwrap();
        let took = t.elapsed();
        let err = read_stderr(&mut child).await;
        eprintln!(
            "tailnet reset round {round}: exit {:?} after {took:?}",
            status.code()
        );
        assert_eq!(status.code(), Some(1), "round {round}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "round {round}: {err}");
        assert!(err.contains("the connection to the agent broke"), "{err}");
        assert!(took < Duration::from_secs(1), "exit took {took:?}");
        assert!(
            eventually(Duration::from_secs(10), || env
                .sim
                .tailnet_streams("dev", "dev")
                == 0)
            .await
        );
    }
}
