//! End-to-end over the native tailnet transport: the real OpenSSH client
//! runs coder-proxy with `--tunnel tailnet` (and `auto`), which reaches
//! coder-sim's agent through the coordinate websocket, the DERP relay and
//! WireGuard — with faults injected mid-transfer and nothing lost.

mod common;

use std::time::{Duration, Instant};

use coder_sim::{SimOptions, WorkspaceSpec};
use coder_tailnet::proto::PeerUpdateKind;
use common::*;

const LIMIT: Duration = Duration::from_secs(120);
const MIB: usize = 1024 * 1024;

/// `ssh` through coder-proxy over tailnet.
fn ssh_tailnet(env: &Env, extra: &str, host: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("ssh");
    c.args(ssh_opts())
        .arg("-o")
        .arg(format!(
            "ProxyCommand={PROXY} --global-config {} --tunnel tailnet {extra} %h",
            env.config_dir().display()
        ))
        .arg(host)
        .env_remove("CODER_SESSION_TOKEN")
        .env_remove("CODER_URL")
        .kill_on_drop(true);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_over_tailnet_with_step_logs() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let mut c = ssh_tailnet(&env, "-v", "dev.coder");
    c.arg("echo over-tailnet; exit 5");
    let t = Instant::now();
    let out = run(c, None, LIMIT).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert_eq!(text(&out.stdout), "over-tailnet\n");
    eprintln!("tailnet exec took {:?}", t.elapsed());
    for step in [
        "connection info in",
        "coordinate up in",
        "DERP region 999 up in",
        "agent node received",
        "handshake complete",
        "stream to the agent open after",
    ] {
        assert!(err.contains(step), "missing {step:?} in the -v log:\n{err}");
    }
    assert!(!err.contains(&env.sim.token()), "token in the log");
    assert!(!err.contains("privkey:"), "a private key in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_uses_tailnet_without_coder_connect() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let mut c = tokio::process::Command::new("ssh");
    c.args(ssh_opts())
        .arg("-o")
        .arg(format!(
            "ProxyCommand={PROXY} --global-config {} %h",
            env.config_dir().display()
        ))
        .arg("dev.coder")
        .arg("echo auto")
        .kill_on_drop(true);
    let out = run(c, None, LIMIT).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "auto\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scp_64_mib_over_tailnet() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let src = env.path("src.bin");
    random_file(&src, 64 * MIB, 3);
    let remote = env.path("remote.bin");
    let pc = format!(
        "ProxyCommand={PROXY} --global-config {} --tunnel tailnet %h",
        env.config_dir().display()
    );
    let mut up = tokio::process::Command::new("scp");
    up.args(ssh_opts())
        .arg("-o")
        .arg(&pc)
        .arg(&src)
        .arg(format!("dev.coder:{}", remote.display()));
    let t = Instant::now();
    let out = run(up, None, LIMIT).await;
    assert!(out.status.success(), "scp: {}", text(&out.stderr));
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "tailnet scp: 64 MiB in {secs:.2}s = {:.1} MiB/s",
        64.0 / secs
    );
    assert_eq!(sha256_file(&remote), sha256_file(&src));
}

/// Faults on the control plane and the relay during a transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_mid_transfer_over_tailnet_lose_nothing() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let data: Vec<u8> = (0..32 * MIB as u32)
        .map(|i| (i.wrapping_mul(2246822519) >> 13) as u8)
        .collect();
    let want = sha256(&data);
    let sim = env.sim.clone();
    let faults = tokio::spawn(async move {
        // Wait until the session is up, then pile on.
        let start = Instant::now();
        while sim.tailnet_streams("dev", "dev") == 0 && start.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        sim.drop_coordinate_connections();
        tokio::time::sleep(Duration::from_millis(300)).await;
        sim.send_peer_update("dev", "dev", PeerUpdateKind::Lost);
        tokio::time::sleep(Duration::from_millis(300)).await;
        sim.send_peer_update("dev", "dev", PeerUpdateKind::Disconnected);
        tokio::time::sleep(Duration::from_millis(300)).await;
        sim.restart_derp();
    });
    let mut c = ssh_tailnet(&env, "-v", "dev.coder");
    c.arg("sleep 1; sha256sum | cut -d' ' -f1");
    let out = run(c, Some(&data), LIMIT).await;
    faults.await.unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(text(&out.stdout).trim(), want, "bytes lost:\n{err}");
    assert!(err.contains("coordinate connection restored"), "{err}");
    // The redial carried the resume token (so the peer ID, and thus our
    // address, stayed the same).
    let redialed_with_token = env
        .sim
        .request_log()
        .iter()
        .any(|r| r.path.contains("/coordinate?") && r.path.contains("resume_token="));
    assert!(
        redialed_with_token,
        "the coordinate redial did not reuse the resume token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_ready_for_handshake_uses_the_five_second_rule() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    env.sim
        .set_ready_for_handshake_delay(Some(Duration::from_secs(60)));
    let mut c = ssh_tailnet(&env, "-v", "dev.coder");
    c.arg("echo late");
    let t = Instant::now();
    let out = run(c, None, LIMIT).await;
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(text(&out.stdout), "late\n");
    assert!(
        t.elapsed() >= Duration::from_secs(5),
        "handshook before the 5 s rule allowed"
    );
    assert!(err.contains("no READY_FOR_HANDSHAKE"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_websockets_reach_the_relay_over_a_websocket() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    env.sim.set_derp_force_websockets(true);
    let mut c = ssh_tailnet(&env, "-v", "dev.coder");
    c.arg("echo via-ws");
    let out = run(c, None, LIMIT).await;
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(text(&out.stdout), "via-ws\n");
    assert!(err.contains("websocket /derp upgraded"), "{err}");
    // The resume token and StreamDERPMaps were used on the way.
    let rpcs = format!("{:?}", env.sim.tailnet_rpcs());
    assert!(
        rpcs.contains("RefreshResumeToken") && rpcs.contains("StreamDERPMaps"),
        "{rpcs}"
    );
}

/// The agent homes on a second DERP region (10001, as a workspace proxy's
/// relay would be) while our home is the embedded relay (999): the client
/// must hold both connections — sending to the agent through 10001,
/// hearing it on 999 — and the stream works as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_in_another_region() {
    if !have_openssh() {
        return;
    }
    let opts = SimOptions {
        agent_derp_region: Some(10001),
        ..Default::default()
    };
    let env = Env::with_options(opts, vec![WorkspaceSpec::new("dev")]).await;
    assert_eq!(env.sim.agent_derp_region(), 10001);
    let data: Vec<u8> = (0..4 * MIB as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 9) as u8)
        .collect();
    let want = sha256(&data);

    // While the session is up: the client's key on both relays, with 999
    // (and only 999) marked as its home.
    let sim = env.sim.clone();
    let watcher = tokio::spawn(async move {
        let (home, away) = match (sim.derp_region_server(999), sim.derp_region_server(10001)) {
            (Some(h), Some(a)) => (h, a),
            _ => return None,
        };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            let keys = sim
                .tailnet_clients("dev", "dev")
                .into_iter()
                .filter_map(|p| sim.coordinator_node(p)?.node_key().ok());
            for k in keys {
                if home.is_connected(&k) && away.is_connected(&k) {
                    return Some((home.is_preferred(&k), away.is_preferred(&k)));
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    });

    let mut c = ssh_tailnet(&env, "-v", "dev.coder");
    c.arg("echo exec-ok; sleep 1; sha256sum | cut -d' ' -f1");
    let t = Instant::now();
    let out = run(c, Some(&data), LIMIT).await;
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    eprintln!("two-region session took {:?}", t.elapsed());
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("exec-ok"), "{err}");
    assert_eq!(lines.next(), Some(want.as_str()), "bytes lost:\n{err}");

    // The client logged both regions: home, then the agent's.
    assert!(err.contains("DERP region 999 up in"), "{err}");
    assert!(
        err.contains("agent node received (home region 10001)"),
        "{err}"
    );
    assert!(err.contains("DERP region 10001 connected"), "{err}");
    // The first handshake initiation went where the agent listens: had it
    // gone through 999 (where the agent is not yet), WireGuard would have
    // retried only after its 5 s RekeyTimeout.
    let handshake_ms: u64 = err
        .split("handshake complete ")
        .nth(1)
        .and_then(|r| r.split("ms").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no handshake time in the -v log:\n{err}"));
    assert!(
        handshake_ms < 4000,
        "handshake took {handshake_ms}ms:\n{err}"
    );
    let seen = watcher.await.unwrap();
    assert_eq!(
        seen,
        Some((true, false)),
        "the sim never saw the client on both relays (999 preferred)"
    );

    // Every datagram reached the agent through its home region; the agent
    // answered through ours, so it holds both too.
    let by_region = env.sim.agent_packets_by_region("dev", "dev");
    assert!(
        by_region.get(&10001).is_some_and(|&n| n > 1000),
        "{by_region:?}"
    );
    assert_eq!(by_region.get(&999), None, "sent through the wrong region");
    assert_eq!(env.sim.agent_derp_regions("dev", "dev"), vec![999, 10001]);
}

/// Both relays restart mid-transfer in the two-region setup: the client
/// redials both (its home and the agent's) and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_in_another_region_survives_relay_restarts() {
    if !have_openssh() {
        return;
    }
    let opts = SimOptions {
        agent_derp_region: Some(10001),
        ..Default::default()
    };
    let env = Env::with_options(opts, vec![WorkspaceSpec::new("dev")]).await;
    let data: Vec<u8> = (0..16 * MIB as u32)
        .map(|i| (i.wrapping_mul(2246822519) >> 11) as u8)
        .collect();
    let want = sha256(&data);
    let sim = env.sim.clone();
    let faults = tokio::spawn(async move {
        let start = Instant::now();
        while sim.tailnet_streams("dev", "dev") == 0 && start.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            sim.restart_derp();
        }
    });
    let mut c = ssh_tailnet(&env, "-v", "dev.coder");
    c.arg("sleep 1; sha256sum | cut -d' ' -f1");
    let out = run(c, Some(&data), LIMIT).await;
    faults.await.unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(text(&out.stdout).trim(), want, "bytes lost:\n{err}");
    assert!(err.contains("DERP region 10001 down"), "{err}");
    assert!(err.contains("DERP region 999 down"), "{err}");
    assert!(
        err.matches("DERP region 10001 connected").count() >= 2,
        "{err}"
    );
}

/// The agent's side sends and ends (a FIN right behind the last byte), with
/// our stdin still open or already at EOF: every byte arrives, coder-proxy
/// exits 0, and it says nothing about a broken connection. The engine seeing
/// its TCP connection close (both FINs) must not race the pump's delivery of
/// the last bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_closes_first_over_tailnet_delivers_everything() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let data: Vec<u8> = (0..16 * MIB as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = data.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let d = served.clone();
            tokio::spawn(async move {
                let _ = s.write_all(&d).await;
                // Close at once: FIN right behind the last byte.
            });
        }
    });
    let env = Env::new(vec![
        WorkspaceSpec::new("src").agent(coder_sim::AgentSpec::new("dev").tailnet_target(addr))
    ])
    .await;
    for round in 0..6 {
        let stdin_open = round % 2 == 0;
        let mut c = tokio::process::Command::new(PROXY);
        c.arg("--global-config")
            .arg(env.config_dir())
            .args(["--tunnel", "tailnet", "src.coder"])
            .env_remove("CODER_SESSION_TOKEN")
            .env_remove("CODER_URL")
            .stdin(if stdin_open {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = c.spawn().expect("spawn");
        // Held open until the process is gone: the remote must end it.
        let _stdin = child.stdin.take();
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (got, errs, status) = tokio::time::timeout(LIMIT, async {
            let mut got = Vec::new();
            let mut errs = Vec::new();
            let (a, b) = tokio::join!(out.read_to_end(&mut got), err.read_to_end(&mut errs));
            a.unwrap();
            b.unwrap();
            (got, errs, child.wait().await.unwrap())
        })
        .await
        .expect("coder-proxy did not end after the remote closed");
        let errs = text(&errs);
        assert_eq!(got.len(), data.len(), "round {round}: {errs}");
        assert!(got == data, "round {round}: corrupted");
        assert_eq!(status.code(), Some(0), "round {round}: {errs}");
        assert!(!errs.contains("coder-proxy"), "round {round}: {errs}");
    }
}

/// A finished session leaves the agent with nothing of ours: coder-proxy
/// ends its coordination with a Disconnect, so the coordinator reports the
/// client DISCONNECTED (not LOST, which an agent keeps for 15 minutes) and
/// the agent drops its WireGuard peer. Real coderd and its agent do exactly
/// this with the Coder CLI (the real-Coder suite's
/// `TestAgentForgetsClientAfterSession`); before coder-proxy sent the
/// Disconnect, real agents kept every finished session as a peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_session_leaves_no_peer_at_the_agent() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    for round in 0..2 {
        let mut c = ssh_tailnet(&env, "-v", "dev.coder");
        c.arg("echo bye");
        let out = run(c, None, LIMIT).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        let sim = env.sim.clone();
        let gone = eventually(Duration::from_secs(10), move || {
            sim.agent_engine_keys("dev", "dev").is_empty()
        })
        .await;
        assert!(
            gone,
            "round {round}: the agent still holds the client's peer 10 s after the session ended:\n{}",
            text(&out.stderr)
        );
    }
}
