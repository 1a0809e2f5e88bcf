//! The OpenSSH (`sshd -i`) agent backend, driven by the real OpenSSH client.
//!
//! Without `/usr/sbin/sshd` these tests print a loud note and pass, unless
//! `CODER_PROXY_REQUIRE_OPENSSH=1`, in which case they fail.

mod ssh_common;

use std::process::Stdio;
use std::time::Duration;

use coder_sim::endpoint::{AgentEndpoint, SshBackend};
use ssh_common::*;

async fn endpoint() -> Option<AgentEndpoint> {
    let required = std::env::var("CODER_PROXY_REQUIRE_OPENSSH").as_deref() == Ok("1");
    match AgentEndpoint::start(SshBackend::OpenSsh).await {
        Ok(ep) => {
            let key = ep
                .client_key_path()
                .expect("OpenSsh endpoint has a client key");
            assert!(key.is_file(), "client key {} missing", key.display());
            Some(ep)
        }
        Err(e) if required => panic!("OpenSSH backend required but unavailable: {e:#}"),
        Err(e) => {
            eprintln!(
                "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                 !!! SKIPPING OpenSSH backend test: {e:#}\n\
                 !!! (set CODER_PROXY_REQUIRE_OPENSSH=1 to make this a failure)\n\
                 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
            );
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_exit_codes_and_stderr() {
    let Some(ep) = endpoint().await else { return };
    check_exec_and_exit_codes(&ep).await;
    check_env(&ep).await;
    check_shell_from_stdin(&ep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_eof_reaches_remote() {
    let Some(ep) = endpoint().await else { return };
    check_stdin_eof(&ep, 8 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_64mib_exact() {
    let Some(ep) = endpoint().await else { return };
    check_download(&ep, 64 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_64mib_exact() {
    let Some(ep) = endpoint().await else { return };
    check_upload(&ep, 64 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_both_directions_saturated() {
    let Some(ep) = endpoint().await else { return };
    check_echo(&ep, 32 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scp_up_and_down() {
    let Some(ep) = endpoint().await else { return };
    check_scp(&ep, 16 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_batch_put_get() {
    let Some(ep) = endpoint().await else { return };
    check_sftp_batch(&ep, 4 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_closes_first() {
    let Some(ep) = endpoint().await else { return };
    check_remote_closes_first(&ep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_connections_and_live_count() {
    let Some(ep) = endpoint().await else { return };
    check_kill_and_live_count(&ep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_connections_sends_rst() {
    let Some(ep) = endpoint().await else { return };
    check_reset_raw(&ep).await;
    check_reset(&ep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_accepting_refuses_new_sessions() {
    let Some(ep) = endpoint().await else { return };
    check_not_accepting(&ep).await;
}

/// Without the client key, sshd refuses: the backend really authenticates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_refused() {
    let Some(ep) = endpoint().await else { return };
    let o = tokio::process::Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-i",
            "/dev/null",
            "-p",
        ])
        .arg(ep.addr().port().to_string())
        .arg("127.0.0.1")
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("ssh");
    assert_eq!(o.status.code(), Some(255));
}

/// Killing connections leaves no sshd (or session) processes behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_leaves_no_processes() {
    let Some(ep) = endpoint().await else { return };
    let marker = format!("sleep 31.{}", std::process::id());
    let c = spawn_ssh(&ep, &format!("echo ready; exec {marker}"), Stdio::null());
    wait_live(&ep, 1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !pgrep(&marker) {
        assert!(
            std::time::Instant::now() < deadline,
            "session process not found"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ep.kill_connections();
    exit_within(c, Duration::from_secs(5)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while pgrep(&marker) {
        assert!(std::time::Instant::now() < deadline, "{marker} survived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Large transfer, for timing; run with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn big_256mib_transfers() {
    let Some(ep) = endpoint().await else { return };
    check_download(&ep, 256 << 20).await;
    check_upload(&ep, 256 << 20).await;
    check_scp(&ep, 256 << 20).await;
}
