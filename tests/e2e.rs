//! End-to-end: the real OpenSSH client runs coder-proxy as its ProxyCommand
//! against a coder-sim deployment, over real sockets.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use coder_sim::{AgentSpec, AgentStatus, ScriptSpec, WorkspaceSpec};
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_workspace_exec() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
    cmd.arg("echo hello; echo oops >&2");
    let out = run(cmd, None, LIMIT).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\n");
    assert!(text(&out.stderr).contains("oops"));
    // Running + connected + ready: silent, no stage lines.
    assert!(!text(&out.stderr).contains("==>"), "{}", text(&out.stderr));
    // The usage heartbeat went out at connect.
    assert!(eventually(Duration::from_secs(5), || env.sim.usage_count("dev") >= 1).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_pass_through() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    for code in [0, 1, 7, 42] {
        let mut cmd = env.ssh("dev", "dev", "", "alice--dev");
        cmd.arg(format!("exit {code}"));
        let out = run(cmd, None, LIMIT).await;
        assert_eq!(
            out.status.code(),
            Some(code),
            "stderr: {}",
            text(&out.stderr)
        );
    }
}

/// A stopped workspace is started, and its whole build log reaches stderr
/// even though the build (300 ms) finishes between two looks at the log:
/// the tail is printed when the build stage ends (the real-Coder suite
/// found the tail missing after real echo builds of a few milliseconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_workspace_autostarts() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")
        .stopped()
        .build_time(Duration::from_millis(300))
        .agent(AgentSpec::new("dev").connect_after(Duration::from_millis(1500)))])
    .await;
    let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
    cmd.arg("echo started");
    let out = run(cmd, None, LIMIT).await;
    let err = text(&out.stderr);
    assert!(out.status.success(), "stderr: {err}");
    assert_eq!(text(&out.stdout), "started\n");
    assert!(
        err.contains("Workspace was stopped, starting workspace"),
        "{err}"
    );
    for line in [
        "sim: provisioner started",
        "Plan: 1 to add, 0 to change, 0 to destroy.",
        "docker_container.workspace[0]: Creation complete after 1s",
    ] {
        assert!(
            err.contains(line),
            "build log line {line:?} missing:\n{err}"
        );
    }
    let ws = env.sim.workspace_json("dev").unwrap();
    assert_eq!(ws["latest_build"]["status"], "running");
    assert_eq!(ws["latest_build"]["transition"], "start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_autostart_fails_clearly() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev").stopped()]).await;
    let mut cmd = env.proxy("dev", "dev", "dev.coder");
    cmd.arg("--disable-autostart");
    let out = run(cmd, Some(b""), LIMIT).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = text(&out.stderr);
    assert!(err.contains("workspace must be started"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_connecting_then_connects() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    env.sim
        .set_agent_status("dev", "dev", AgentStatus::Connecting);
    let sim = env.sim.clone();
    let flip = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        sim.set_agent_status("dev", "dev", AgentStatus::Connected);
        Instant::now()
    });
    let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
    cmd.arg("echo in");
    let started = Instant::now();
    let out = run(cmd, None, LIMIT).await;
    let connected_at = flip.await.unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(text(&out.stdout), "in\n");
    assert!(
        err.contains("Waiting for the workspace agent to connect"),
        "{err}"
    );
    // It did not dial before the agent was connected.
    assert!(connected_at.duration_since(started) >= Duration::from_millis(1400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_yes_waits_for_blocking_scripts_and_no_does_not() {
    if !have_openssh() {
        return;
    }
    let script = Duration::from_millis(2500);
    let env = Env::new(vec![
        WorkspaceSpec::new("slow")
            .stopped()
            .build_time(Duration::from_millis(300))
            .agent(AgentSpec::new("dev").startup_script(ScriptSpec::blocking(script))),
        WorkspaceSpec::new("fast")
            .stopped()
            .build_time(Duration::from_millis(300))
            .agent(AgentSpec::new("dev").startup_script(ScriptSpec::blocking(script))),
    ])
    .await;

    let mut cmd = env.ssh("slow", "dev", "--wait=yes", "slow.coder");
    cmd.arg("echo ok");
    let t = Instant::now();
    let out = run(cmd, None, LIMIT).await;
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("Running workspace agent startup scripts"),
        "{err}"
    );
    assert!(t.elapsed() >= script, "connected before the scripts ended");
    let ws = env.sim.workspace_json("slow").unwrap();
    assert_eq!(
        ws["latest_build"]["resources"][0]["agents"][0]["lifecycle_state"],
        "ready"
    );

    let mut cmd = env.ssh("fast", "dev", "--wait=no", "fast.coder");
    cmd.arg("echo ok");
    let out = run(cmd, None, LIMIT).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ws = env.sim.workspace_json("fast").unwrap();
    assert_eq!(
        ws["latest_build"]["resources"][0]["agents"][0]["lifecycle_state"], "starting",
        "--wait=no should connect while scripts still run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scp_and_sftp_roundtrip_with_checksums() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let src = env.path("src.bin");
    random_file(&src, 6 * 1024 * 1024 + 123, 7);
    let want = sha256_file(&src);
    let remote = env.path("remote.bin");
    let back = env.path("back.bin");
    let pc = format!("ProxyCommand={}", env.proxy_command("dev", "dev", ""));

    // scp up and down (OpenSSH's scp speaks SFTP).
    let mut up = tokio::process::Command::new("scp");
    up.args(ssh_opts())
        .arg("-o")
        .arg(&pc)
        .arg(&src)
        .arg(format!("dev.coder:{}", remote.display()));
    let out = run(up, None, LIMIT).await;
    assert!(out.status.success(), "scp up: {}", text(&out.stderr));
    assert_eq!(sha256_file(&remote), want);
    let mut down = tokio::process::Command::new("scp");
    down.args(ssh_opts())
        .arg("-o")
        .arg(&pc)
        .arg(format!("dev.coder:{}", remote.display()))
        .arg(&back);
    let out = run(down, None, LIMIT).await;
    assert!(out.status.success(), "scp down: {}", text(&out.stderr));
    assert_eq!(sha256_file(&back), want);

    // sftp batch.
    let remote2 = env.path("remote2.bin");
    let back2 = env.path("back2.bin");
    let batch = env.path("batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {}\nget {} {}\n",
            src.display(),
            remote2.display(),
            remote2.display(),
            back2.display()
        ),
    )
    .unwrap();
    let mut sftp = tokio::process::Command::new("sftp");
    sftp.args(ssh_opts())
        .arg("-o")
        .arg(&pc)
        .arg("-b")
        .arg(&batch)
        .arg("dev.coder");
    let out = run(sftp, None, LIMIT).await;
    assert!(out.status.success(), "sftp: {}", text(&out.stderr));
    assert_eq!(sha256_file(&remote2), want);
    assert_eq!(sha256_file(&back2), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_eof_first_and_remote_close_first() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let data = vec![b'x'; 3 * 1024 * 1024 + 5];
    let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
    cmd.arg("sleep 1; wc -c");
    let out = run(cmd, Some(&data), LIMIT).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), data.len().to_string());

    // Remote ends while our stdin stays open: ssh must still end promptly.
    let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
    cmd.arg("echo bye")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let _keep_open = child.stdin.take();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("ssh did not exit after the remote command ended");
    assert!(status.unwrap().success());
    let mut s = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut s)
        .await
        .unwrap();
    assert_eq!(s, "bye\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_flapping_mid_transfer_loses_nothing() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let data: Vec<u8> = (0..48 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let want = sha256(&data);
    let sim = env.sim.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let flapper = tokio::spawn(async move {
        let states = [
            AgentStatus::Disconnected,
            AgentStatus::Timeout,
            AgentStatus::Connected,
        ];
        let mut n = 0usize;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            sim.set_agent_status("dev", "dev", states[n % 3]);
            n += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sim.set_agent_status("dev", "dev", AgentStatus::Connected);
        n
    });
    let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
    cmd.arg("sleep 0.5; sha256sum | cut -d' ' -f1");
    let out = run(cmd, Some(&data), Duration::from_secs(120)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flips = flapper.await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), want);
    assert!(flips >= 3, "the agent flipped only {flips} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_stop_closes_session_promptly() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![
        WorkspaceSpec::new("dev").build_time(Duration::from_millis(300))
    ])
    .await;
    let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
    cmd.arg("echo ready; sleep 60")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(LIMIT, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.as_deref(), Some("ready"));

    env.sim.stop_workspace("dev");
    assert!(
        env.sim
            .wait_for(
                "dev",
                |w| w["latest_build"]["status"] == "stopped",
                Duration::from_secs(10)
            )
            .await
    );
    let stopped_at = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("ssh still running after stop");
    let took = stopped_at.elapsed();
    assert!(status.is_ok());
    assert!(
        took < Duration::from_secs(2),
        "ssh ended {took:?} after the stop"
    );
    let err = read_stderr(&mut child).await;
    assert!(err.contains("was stopped"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_carries_only_ssh_bytes() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")
        .stopped()
        .build_time(Duration::from_millis(300))])
    .await;
    // Verbose, autostarting: lots of stderr, none of it may reach stdout.
    let mut cmd = env.proxy("dev", "dev", "dev.coder");
    cmd.arg("-v")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    use tokio::io::AsyncWriteExt;
    stdin.write_all(b"SSH-2.0-e2e_probe\r\n").await.unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(LIMIT, out.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "stdout ended early: {:?}", text(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"SSH-2.0-"),
        "stdout began with {:?}",
        text(&got)
    );
    drop(stdin);
    let _ = child.kill().await;
    let out = child.wait_with_output().await.unwrap();
    let err = text(&out.stderr);
    assert!(
        err.contains("DEBUG") || err.contains("debug"),
        "expected debug logs on stderr: {err}"
    );
    assert!(!err.contains(&env.sim.token()), "token leaked to stderr");

    // A failing run prints nothing on stdout either.
    let mut cmd = env.proxy("dev", "dev", "nope.coder");
    cmd.arg("-v");
    let out = run(cmd, Some(b"SSH-2.0-x\r\n"), LIMIT).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "stdout: {:?}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );
}

/// Start `ssh host 'echo ready; sleep 60'` and wait for `ready`.
async fn live_session(env: &Env) -> tokio::process::Child {
    let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
    cmd.arg("echo ready; sleep 60")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    tokio::time::timeout(LIMIT, out.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ready\n");
    child
}

async fn ends_with_reason(mut child: tokio::process::Child, limit: Duration, reason: &str) {
    let t = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("ssh still running");
    assert!(status.is_ok());
    assert!(
        t.elapsed() < limit,
        "ssh ended {:?} after the event",
        t.elapsed()
    );
    let err = read_stderr(&mut child).await;
    assert!(err.contains(reason), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_start_build_and_delete_close_but_stopping_does_not() {
    if !have_openssh() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")
        .build_time(Duration::from_millis(1500))
        .linger_after_stop(Duration::from_secs(30))])
    .await;

    // A new start build replaces ours: closed as soon as coderd reports it.
    let child = live_session(&env).await;
    env.sim.start_workspace("dev");
    ends_with_reason(child, Duration::from_secs(2), "new start build").await;
    assert!(
        env.sim
            .wait_for(
                "dev",
                |w| w["latest_build"]["status"] == "running",
                Duration::from_secs(10)
            )
            .await
    );

    // `stopping` alone keeps the session; `stopped` closes it.
    let mut child = live_session(&env).await;
    env.sim.stop_workspace("dev");
    assert!(
        env.sim
            .wait_for(
                "dev",
                |w| w["latest_build"]["status"] == "stopping",
                Duration::from_secs(10)
            )
            .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "closed while only stopping"
    );
    assert!(
        env.sim
            .wait_for(
                "dev",
                |w| w["latest_build"]["status"] == "stopped",
                Duration::from_secs(10)
            )
            .await
    );
    ends_with_reason(child, Duration::from_secs(2), "was stopped").await;

    // Delete (of a running workspace) closes once deleted.
    env.sim.start_workspace("dev");
    assert!(
        env.sim
            .wait_for(
                "dev",
                |w| w["latest_build"]["status"] == "running"
                    && w["latest_build"]["resources"][0]["agents"][0]["status"] == "connected",
                Duration::from_secs(10)
            )
            .await
    );
    let child = live_session(&env).await;
    env.sim.delete_workspace("dev");
    let t = Instant::now();
    ends_with_reason(child, Duration::from_secs(5), "deleted").await;
    assert!(
        t.elapsed() >= Duration::from_millis(1000),
        "closed before the delete finished"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_end_the_proxy_promptly() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    for sig in [libc_sig::HUP, libc_sig::TERM, libc_sig::INT] {
        let (mut child, _stdin) = spawn_until_banner(env.proxy("dev", "dev", "dev")).await;
        let pid = child.id().unwrap().to_string();
        std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(&pid)
            .status()
            .unwrap();
        let t = Instant::now();
        let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .expect("still running")
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "took {:?}",
            t.elapsed()
        );
        assert_eq!(status.code(), Some(128 + sig), "signal {sig}");
    }
}

/// Signal numbers (Linux) without a libc dependency in tests.
mod libc_sig {
    pub const HUP: i32 = 1;
    pub const INT: i32 = 2;
    pub const TERM: i32 = 15;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_sshd_behind_the_agent() {
    if !have_openssh() {
        return;
    }
    if !std::path::Path::new("/usr/sbin/sshd").exists() {
        if std::env::var("CODER_PROXY_REQUIRE_OPENSSH").as_deref() == Ok("1") {
            panic!("sshd is required but missing: apt-get install openssh-server");
        }
        eprintln!("SKIPPED: /usr/sbin/sshd not found");
        return;
    }
    let opts = coder_sim::SimOptions {
        ssh: coder_sim::SshBackend::OpenSsh,
        ..Default::default()
    };
    let env = Env::with_options(opts, vec![WorkspaceSpec::new("dev")]).await;
    let data = vec![7u8; 5 * 1024 * 1024];
    let mut cmd = env.ssh("dev", "dev", "", "dev.coder");
    cmd.arg("wc -c; exit 3");
    let out = run(cmd, Some(&data), LIMIT).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), data.len().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coder_connect_absent_names_the_alternatives() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let mut c = tokio::process::Command::new(PROXY);
    c.arg("--global-config")
        .arg(env.config_dir())
        .args(["--tunnel", "coder-connect", "dev.coder"]);
    let out = run(c, Some(b""), LIMIT).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty());
    assert!(
        err.contains("Coder Connect is not serving dev.dev.alice.coder")
            && err.contains("--tunnel tcp://"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_is_retried_while_the_agent_is_connected() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let agent = env.sim.agent_addr("dev", "dev").unwrap();
    // A port nobody listens on yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tunnel = format!("tcp://127.0.0.1:{port}");
    let mut c = tokio::process::Command::new(PROXY);
    c.arg("--global-config")
        .arg(env.config_dir())
        .args(["--tunnel", &tunnel, "dev"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = c.spawn().unwrap();
    let _stdin = child.stdin.take();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Now the "agent" starts listening: forward to the real endpoint.
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        let (mut a, _) = l.accept().await.unwrap();
        let mut b = tokio::net::TcpStream::connect(agent).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
    });
    let mut out = child.stdout.take().unwrap();
    let mut banner = [0u8; 8];
    tokio::time::timeout(LIMIT, out.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&banner, b"SSH-2.0-");
    child.kill().await.unwrap();
    let err = read_stderr(&mut child).await;
    assert!(
        err.contains("retrying while the agent is connected"),
        "{err}"
    );
    assert_eq!(
        err.matches("cannot reach the agent's SSH server").count(),
        1,
        "{err}"
    );

    // Nobody ever listens: bounded by --wait-timeout with the last error.
    let mut c = tokio::process::Command::new(PROXY);
    c.arg("--global-config").arg(env.config_dir()).args([
        "--tunnel",
        "tcp://127.0.0.1:9",
        "--wait-timeout=2s",
        "dev",
    ]);
    let out = run(c, Some(b""), LIMIT).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty());
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(
        last.contains("timed out") && last.contains("refused"),
        "{err}"
    );
}
