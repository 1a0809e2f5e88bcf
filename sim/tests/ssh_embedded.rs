//! The embedded (russh) agent SSH server, driven by the real OpenSSH client.

mod ssh_common;

use std::process::Stdio;
use std::time::Duration;

use coder_sim::endpoint::{AgentEndpoint, SshBackend};
use ssh_common::*;

async fn endpoint() -> AgentEndpoint {
    let ep = AgentEndpoint::start(SshBackend::Embedded)
        .await
        .expect("start embedded endpoint");
    assert_eq!(ep.client_key_path(), None);
    ep
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_exit_codes_and_stderr() {
    let ep = endpoint().await;
    check_exec_and_exit_codes(&ep).await;
    check_env(&ep).await;
    check_shell_from_stdin(&ep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_eof_reaches_remote() {
    let ep = endpoint().await;
    check_stdin_eof(&ep, 8 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_64mib_exact() {
    let ep = endpoint().await;
    check_download(&ep, 64 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_64mib_exact() {
    let ep = endpoint().await;
    check_upload(&ep, 64 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_both_directions_saturated() {
    let ep = endpoint().await;
    check_echo(&ep, 32 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scp_up_and_down() {
    let ep = endpoint().await;
    check_scp(&ep, 16 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_batch_put_get() {
    let ep = endpoint().await;
    check_sftp_batch(&ep, 4 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_closes_first() {
    let ep = endpoint().await;
    check_remote_closes_first(&ep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_connections_and_live_count() {
    let ep = endpoint().await;
    check_kill_and_live_count(&ep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_connections_sends_rst() {
    let ep = endpoint().await;
    check_reset_raw(&ep).await;
    check_reset(&ep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_accepting_refuses_new_sessions() {
    let ep = endpoint().await;
    check_not_accepting(&ep).await;
}

/// A killed remote command is reported as a signal, which OpenSSH's client
/// turns into exit code 255.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_signal() {
    let ep = endpoint().await;
    let o = ssh(&ep, "kill -9 $$").await;
    assert_eq!(o.status.code(), Some(255));
}

/// `ssh -tt` gets a real pty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_exec() {
    let ep = endpoint().await;
    let o = ssh_cmd(&ep, &["-tt"], "tty; exit 4", Stdio::null())
        .output()
        .await
        .expect("ssh");
    assert_eq!(o.status.code(), Some(4));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("/dev/pts/"), "tty said {out:?}");
}

/// Relative paths land in the endpoint's work dir, shared by scp and exec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_paths_use_work_dir() {
    let ep = endpoint().await;
    let o = ssh(&ep, "pwd").await;
    let wd = ep.work_dir().expect("embedded has a work dir");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        wd.display().to_string()
    );
}

/// Dropping the endpoint ends live sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_kills_sessions() {
    let ep = endpoint().await;
    let c = spawn_sleeper(&ep).await;
    wait_live(&ep, 1).await;
    drop(ep);
    let o = exit_within(c, Duration::from_secs(5)).await;
    assert_eq!(o.status.code(), Some(255));
}

/// Large transfer, for timing; run with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn big_256mib_transfers() {
    let ep = endpoint().await;
    check_download(&ep, 256 << 20).await;
    check_upload(&ep, 256 << 20).await;
    check_scp(&ep, 256 << 20).await;
}

/// Beyond 1 GiB each way (russh rekeys at 1 GiB); run with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn gib_transfers_survive_rekey() {
    let ep = endpoint().await;
    check_gib_both_ways(&ep, 1200 << 20).await;
}

/// The remote ignores its stdin while the client floods it, so the session
/// is stalled on backpressure; the client then vanishes. The connection must
/// still be torn down and the program killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishes_while_remote_ignores_stdin() {
    let ep = endpoint().await;
    let marker = format!("sleep 29.{}", std::process::id());
    let zero = std::fs::File::open("/dev/zero").expect("/dev/zero");
    let mut c = ssh_cmd(&ep, &[], &format!("exec {marker}"), Stdio::from(zero))
        .spawn()
        .expect("ssh");
    wait_live(&ep, 1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !pgrep(&marker) {
        assert!(std::time::Instant::now() < deadline, "remote never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the flood fill every buffer on the way.
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.kill().await.expect("kill ssh");
    wait_live(&ep, 0).await;
    wait_gone(&marker, Duration::from_secs(5)).await;
}

/// Same stall, ended from the agent side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_while_remote_ignores_stdin() {
    let ep = endpoint().await;
    let marker = format!("sleep 28.{}", std::process::id());
    let zero = std::fs::File::open("/dev/zero").expect("/dev/zero");
    let c = ssh_cmd(&ep, &[], &format!("exec {marker}"), Stdio::from(zero))
        .spawn()
        .expect("ssh");
    wait_live(&ep, 1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !pgrep(&marker) {
        assert!(std::time::Instant::now() < deadline, "remote never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    ep.kill_connections();
    let o = exit_within(c, Duration::from_secs(5)).await;
    assert_eq!(o.status.code(), Some(255));
    wait_gone(&marker, Duration::from_secs(5)).await;
}

/// The endpoint is shared across tasks by the simulator.
#[test]
fn endpoint_is_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<AgentEndpoint>();
}
