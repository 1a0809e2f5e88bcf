//! The fault matrix: a live session through coder-proxy survives everything
//! the control plane can throw at it, and ends promptly for the few reasons
//! that should end it. Real `ssh` through coder-proxy to coder-sim; every
//! transfer is checked by sha256 on both ends.
//!
//! Row 10 (a five-minute idle session with the agent flapping) is
//! `#[ignore]`d; run it with `cargo test --test faults -- --ignored`.
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

use coder_sim::{AgentStatus, ApiFault, WorkspaceSpec};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1024 * 1024;
const LIMIT: Duration = Duration::from_secs(180);

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
async fn upload_digest(env: &Env, data: &[u8]) -> (std::process::Output, String) {
    let mut cmd = env.ssh("dev", "dev", "-v", "dev.coder");
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

/// Row 1: the agent flaps every 200 ms through a 256 MiB upload and a
/// 256 MiB download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row1_agent_flapping_throughout_transfers() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let data = payload(256 * MIB, 1);
    let want = sha256(&data);
    let (stop, h) = flapper(&env, Duration::from_millis(200));
    let (out, got) = upload_digest(&env, &data).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(got, want, "upload corrupted");
    assert_no_token(&env, &out);

    // Download: the remote writes a file, reports its digest on stderr, and
    // streams it on stdout.
    let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
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

/// Row 2: 503 for a long stretch mid-session with the watch cut: the
/// session is unaffected, the watch resubscribes with backoff, and a later
/// stop is still noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row2_api_503_and_cut_watch_mid_session() {
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
    let mut cmd = env.ssh("dev", "dev", "-v", "dev.coder");
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
    let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
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
    let t = Instant::now();
    // The watcher's backoff is at most 15 s.
    let st = tokio::time::timeout(Duration::from_secs(25), child.wait())
        .await
        .expect("stop not noticed");
    assert!(st.is_ok());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert!(err.contains("was stopped"), "{err}");
    eprintln!(
        "row2: stop noticed {:?} after the outage ended",
        t.elapsed()
    );
}

/// Row 3: the API accepts connections but never answers, mid-session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row3_api_hangs_mid_session() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let data = payload(64 * MIB, 3);
    let mut cmd = env.ssh("dev", "dev", "-v", "dev.coder");
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
    let t = Instant::now();
    let out = run(cmd, Some(&data), LIMIT).await;
    hang.await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), sha256(&data));
    // Nothing waited on the hung API: the session took transfer time only.
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    env.sim.set_api_fault(ApiFault::None);
}

/// Row 5: the tunnel is reset by the far side: exit at once, one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row5_tunnel_reset_exits_at_once() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let (mut child, _stdin) = spawn_until_banner(env.proxy("dev", "dev", "dev")).await;
    assert!(env.sim.reset_connections("dev", "dev"));
    let t = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("still running")
        .unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_millis(500), "exit took {took:?}");
    assert_eq!(status.code(), Some(1));
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("connection to the agent broke"), "{err}");
    eprintln!("row5: exit {took:?} after reset");
}

/// Row 6: signals mid-transfer end the shim within 1 s, leaving nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row6_signals_mid_transfer() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    for sig in ["HUP", "TERM", "INT"] {
        let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
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
                proxy_pid.is_some() && env.sim.usage_count("dev") > 0
            })
            .await
        );
        let pid = proxy_pid.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await; // mid-transfer
        std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        let t = Instant::now();
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
            t.elapsed() < Duration::from_secs(1),
            "SIG{sig}: exit took {:?}",
            t.elapsed()
        );
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("ssh hung");
        writer.abort();
        // The shim spawned no lingering children.
        assert!(child_pid_named(pid, "").is_none());
    }
}

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

/// Row 7: remote closes first while stdin stays open; stdin EOF first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row7_close_orders() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    // Remote closes: the proxy, stdin still open, exits promptly.
    let (mut child, _stdin) = spawn_until_banner(env.proxy("dev", "dev", "dev")).await;
    assert!(env.sim.kill_connections("dev", "dev"));
    let t = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("still running")
        .unwrap();
    let took = t.elapsed();
    eprintln!("row7: exit {took:?} after the remote closed");
    assert!(took < Duration::from_millis(500), "exit took {took:?}");
    assert!(status.code().is_some());

    if !have_openssh() {
        return;
    }
    // Stdin EOF first: all remaining output still arrives.
    let file = env.path("in.bin");
    random_file(&file, 8 * MIB, 11);
    let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
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

/// Row 8: the API is down before connecting: retry, say so, connect when
/// it returns; beyond --wait-timeout, fail clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row8_api_down_before_connecting() {
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
    let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
    cmd.arg("echo through");
    let out = run(cmd, None, LIMIT).await;
    let healed = heal.await.unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(text(&out.stdout), "through\n");
    assert!(err.contains("retrying"), "{err}");
    eprintln!(
        "row8: connected {:?} after the API came back",
        healed.elapsed()
    );

    env.sim.set_api_fault(ApiFault::Status(503));
    let mut cmd = env.proxy("dev", "dev", "dev");
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

/// Row 9: 50 sessions through 50 shims at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row9_fifty_concurrent_sessions() {
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
        let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
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
        "row9: 50 sessions ok; peak {count} shims alive, peak total RSS {:.1} MiB, peak single RSS {:.1} MiB",
        total as f64 / 1024.0,
        one as f64 / 1024.0
    );
    assert!(count >= 10, "sessions did not overlap ({count})");
}

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

/// Row 10: an idle session for 5 minutes while the agent flaps, then used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes 5 minutes; run with --ignored"]
async fn row10_idle_five_minutes_with_flapping() {
    if !have_openssh() {
        return;
    }
    let idle: u64 = std::env::var("CODER_PROXY_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
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

// ===========================================================================
// Tailnet relay faults: the DERP relay connection dies silently, refuses
// redials, or the shim is paused; a reset or a signal ends the session the
// way `tcp://` does. Real `ssh` through `coder-proxy --tunnel tailnet` to
// coder-sim; sha256 on both ends.
// ===========================================================================

/// `ssh` through coder-proxy over tailnet (the stock DERP map of the sim).
fn tailnet_ssh(env: &Env, extra: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("ssh");
    c.args(ssh_opts())
        .arg("-o")
        .arg(format!(
            "ProxyCommand={PROXY} --global-config {} --tunnel tailnet {extra} %h",
            env.config_dir().display()
        ))
        .arg("dev.coder")
        .env_remove("CODER_SESSION_TOKEN")
        .env_remove("CODER_URL")
        .kill_on_drop(true);
    c
}

/// An upload through `ssh dev.coder sha256sum` in two halves: the first
/// half goes through, then the test injects its fault (the stream is open
/// and between chunks), then the second half follows into the fault.
struct SplitUpload {
    child: tokio::process::Child,
    want: String,
    halfway: Option<tokio::sync::oneshot::Receiver<()>>,
    go: Option<tokio::sync::oneshot::Sender<()>>,
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl SplitUpload {
    async fn start(env: &Env, half: usize, seed: u32) -> SplitUpload {
        let mut cmd = tailnet_ssh(env, "-v");
        cmd.arg("sha256sum | cut -d' ' -f1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let (a, b) = (payload(half, seed), payload(half, seed + 1));
        let mut all = a.clone();
        all.extend_from_slice(&b);
        let want = sha256(&all);
        let (half_tx, half_rx) = tokio::sync::oneshot::channel();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let writer = tokio::spawn(async move {
            stdin.write_all(&a).await?;
            stdin.flush().await?;
            let _ = half_tx.send(());
            let _ = go_rx.await;
            stdin.write_all(&b).await
            // Dropping stdin ends the upload.
        });
        SplitUpload {
            child,
            want,
            halfway: Some(half_rx),
            go: Some(go_tx),
            writer,
        }
    }

    /// Waits until the first half is written and the session's stream is
    /// bridged at the agent.
    async fn at_halfway(&mut self, env: &Env) {
        if let Some(h) = self.halfway.take() {
            tokio::time::timeout(Duration::from_secs(60), h)
                .await
                .expect("first half not written within 60s")
                .expect("the writer failed before halfway");
        }
        assert!(
            eventually(Duration::from_secs(30), || env
                .sim
                .tailnet_streams("dev", "dev")
                == 1)
            .await,
            "no tailnet stream at the agent"
        );
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
        let mut err = self.child.stderr.take().unwrap();
        let (mut o, mut e) = (String::new(), String::new());
        let res = tokio::time::timeout(limit, async {
            let (a, b) = tokio::join!(out.read_to_string(&mut o), err.read_to_string(&mut e));
            a.unwrap();
            b.unwrap();
            self.child.wait().await.unwrap()
        })
        .await;
        let status = match res {
            Ok(s) => s,
            Err(_) => panic!("ssh did not finish within {limit:?}; stderr so far:\n{e}"),
        };
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
        let mut err = self.child.stderr.take().unwrap();
        // read_to_end keeps what it read if the timeout cuts it short (the
        // shim may hold the pipe open a little longer than ssh).
        let mut e = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), err.read_to_end(&mut e)).await;
        self.writer.abort();
        text(&e)
    }
}

/// The one relay connection key of the agent's tailnet client.
fn client_key(env: &Env) -> coder_tailnet::derp::NodePublic {
    let keys = env.sim.tailnet_client_keys("dev", "dev");
    assert_eq!(keys.len(), 1, "want one tailnet client: {keys:?}");
    keys[0]
}

async fn silently_dead_relay_case(force_websockets: bool) {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    env.sim.set_derp_force_websockets(force_websockets);
    let mut up = SplitUpload::start(&env, 8 * MIB, 21).await;
    up.at_halfway(&env).await;
    let key = client_key(&env);
    let relay = env.sim.derp_server();
    let before = relay.active_conn(&key).expect("client not on the relay");
    assert_eq!(env.sim.freeze_client_derp("dev", "dev"), 1);
    let silent_at = Instant::now();
    up.resume();
    let redialed = eventually(Duration::from_secs(40), || {
        relay.active_conn(&key).is_some_and(|c| c != before)
    })
    .await;
    let took = silent_at.elapsed();
    eprintln!(
        "tailnet relay fault (websockets: {force_websockets}): relay silent -> new relay connection in {took:?}"
    );
    if !redialed {
        let err = up.abandon().await;
        panic!("no new relay connection within {took:?}:\n{err}");
    }
    assert!(took <= Duration::from_secs(30), "redial took {took:?}");
    let (_, err, code) = up.finish(LIMIT).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("DERP region 999 down"), "{err}");
}

/// Row T1: the relay connection goes silently dead mid-transfer (open, no
/// FIN/RST, nothing read or written): the shim notices within 30 s,
/// redials, and the transfer completes with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailnet_silently_dead_relay_mid_transfer_is_redialed_and_loses_nothing() {
    if !have_openssh() {
        return;
    }
    silently_dead_relay_case(false).await;
}

/// Row T1 with the relay reached over a websocket (`derp_force_websockets`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailnet_silently_dead_websocket_relay_mid_transfer_is_redialed_and_loses_nothing() {
    if !have_openssh() {
        return;
    }
    silently_dead_relay_case(true).await;
}

/// Row T2: the live relay connection is killed and the relay refuses every
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

/// Row T3: the shim is stopped (SIGSTOP, as a closed laptop lid does) for
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

/// A bare coder-proxy over tailnet (no ssh), for the ending rows.
fn tailnet_proxy(env: &Env) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(PROXY);
    c.arg("--global-config")
        .arg(env.config_dir())
        .args(["--tunnel", "tailnet", "dev.coder"])
        .env_remove("CODER_SESSION_TOKEN")
        .env_remove("CODER_URL")
        .kill_on_drop(true);
    c
}

/// Row T4: the agent's side resets the in-tunnel TCP connection: reported
/// like `tcp://` does (row 5) — exit 1 at once, one line on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailnet_reset_by_the_agent_exits_1_with_one_line() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    for round in 0..3 {
        let (mut child, _stdin) = spawn_until_banner(tailnet_proxy(&env)).await;
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
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .await
            .unwrap();
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

/// Row T5: SIGTERM (and SIGHUP, SIGINT) mid-session over tailnet: the shim
/// closes its in-tunnel connection towards the agent before it exits, so
/// the agent's side of the stream ends (FIN or RST) instead of lingering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailnet_signal_mid_session_closes_the_in_tunnel_connection_at_the_agent() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    for sig in ["TERM", "HUP", "INT"] {
        let mut cmd = tailnet_ssh(&env, "");
        cmd.arg("cat > /dev/null")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = tokio::spawn(async move {
            let chunk = vec![0x5au8; 64 * 1024];
            while stdin.write_all(&chunk).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let ssh_pid = child.id().unwrap();
        let mut proxy_pid = None;
        assert!(
            eventually(Duration::from_secs(30), || {
                proxy_pid = child_pid_named(ssh_pid, "coder-proxy");
                proxy_pid.is_some() && env.sim.tailnet_streams("dev", "dev") == 1
            })
            .await,
            "SIG{sig}: no session"
        );
        let pid = proxy_pid.unwrap();
        std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        let t = Instant::now();
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
        let exited = t.elapsed();
        assert!(
            exited < Duration::from_secs(1),
            "SIG{sig}: exit took {exited:?}"
        );
        let closed = eventually(Duration::from_secs(5), || {
            env.sim.tailnet_streams("dev", "dev") == 0
        })
        .await;
        eprintln!(
            "tailnet SIG{sig}: shim gone in {exited:?}; agent stream closed: {closed} ({:?})",
            t.elapsed()
        );
        assert!(
            closed,
            "SIG{sig}: the agent's in-tunnel connection still open 5s after the shim exited"
        );
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        writer.abort();
    }
}
