//! Shared checks for the agent-endpoint SSH tests: each drives the real
//! OpenSSH client (`ssh`, `scp`, `sftp`) straight at an endpoint's port, so
//! both backends are held to the behaviour coder-proxy relies on.

#![allow(dead_code)] // each test binary uses a subset

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use coder_sim::endpoint::AgentEndpoint;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

/// Options every client run gets: no user config, no host key prompts, no
/// passwords, quiet.
fn common_opts(ep: &AgentEndpoint) -> Vec<String> {
    let mut v: Vec<String> = [
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(key) = ep.client_key_path() {
        v.extend([
            "-i".to_string(),
            key.display().to_string(),
            "-o".to_string(),
            "IdentitiesOnly=yes".to_string(),
        ]);
    } else {
        // Embedded accepts `none`; don't let the client go looking for keys
        // or agents.
        v.extend(["-o".to_string(), "IdentityAgent=none".to_string()]);
    }
    v
}

/// `ssh -p PORT [extra] 127.0.0.1 remote` with the given stdin.
pub fn ssh_cmd(ep: &AgentEndpoint, extra: &[&str], remote: &str, stdin: Stdio) -> Command {
    let mut c = Command::new("ssh");
    c.args(common_opts(ep))
        .arg("-p")
        .arg(ep.addr().port().to_string())
        .args(extra)
        .arg("127.0.0.1")
        .arg(remote)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

pub async fn ssh(ep: &AgentEndpoint, remote: &str) -> Output {
    ssh_cmd(ep, &[], remote, Stdio::null())
        .output()
        .await
        .expect("run ssh")
}

pub fn spawn_ssh(ep: &AgentEndpoint, remote: &str, stdin: Stdio) -> Child {
    ssh_cmd(ep, &[], remote, stdin).spawn().expect("spawn ssh")
}

/// Starts `ssh ... 'echo ready; exec sleep 30'` and returns once the remote
/// command is really running (login shell startup done), so a kill cannot
/// land in the middle of the user's shell init.
pub async fn spawn_sleeper(ep: &AgentEndpoint) -> Child {
    use tokio::io::AsyncBufReadExt;
    let mut child = spawn_ssh(ep, "echo ready; exec sleep 30", Stdio::null());
    let out = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(out).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("remote command did not start within 10s")
        .expect("read ssh stdout");
    assert_eq!(line.as_deref(), Some("ready"));
    child
}

pub fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).expect("open for hashing");
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).expect("hash file");
    hex(&h.finalize())
}

pub fn sha256(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A file of `len` random bytes in `dir`.
pub fn random_file(dir: &Path, name: &str, len: u64) -> PathBuf {
    use std::io::Read;
    let path = dir.join(name);
    let mut out = std::fs::File::create(&path).expect("create");
    let mut src = std::fs::File::open("/dev/urandom")
        .expect("urandom")
        .take(len);
    std::io::copy(&mut src, &mut out).expect("fill");
    out.flush().expect("flush");
    path
}

/// Temp dir under /tmp, so the "remote" (same machine) sees the same path.
pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("coder-sim-ssh-test-")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub async fn wait_live(ep: &AgentEndpoint, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while ep.live_connections() != n {
        assert!(
            Instant::now() < deadline,
            "live_connections stuck at {} (want {n})",
            ep.live_connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for a client to exit, failing if it takes longer than `limit`.
pub async fn exit_within(child: Child, limit: Duration) -> Output {
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("ssh still running after {limit:?}"))
        .expect("wait ssh")
}

/// Is a live (non-zombie) process running `cmdline`?
pub fn pgrep(cmdline: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let state = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = state
            .rfind(')')
            .map(|i| state[i + 1..].trim_start().starts_with('Z'))
            .unwrap_or(false);
        cmd.trim() == cmdline && !zombie
    })
}

/// Waits until no live process runs `cmdline`.
pub async fn wait_gone(cmdline: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while pgrep(cmdline) {
        assert!(Instant::now() < deadline, "{cmdline} survived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until this process has no unreaped (zombie) children.
pub async fn wait_no_zombies() {
    let me = std::process::id().to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let zombies: Vec<String> = std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
                    .filter(|st| {
                        let rest = st.rfind(')').map(|i| &st[i + 1..]).unwrap_or("");
                        let mut f = rest.split_whitespace();
                        f.next() == Some("Z") && f.next() == Some(me.as_str())
                    })
                    .collect()
            })
            .unwrap_or_default();
        if zombies.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "zombie children: {zombies:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- checks -------------------------------------------------------------

pub async fn check_exec_and_exit_codes(ep: &AgentEndpoint) {
    let o = ssh(ep, "echo hello").await;
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(o.stdout, b"hello\n");

    let o = ssh(ep, "exit 3").await;
    assert_eq!(o.status.code(), Some(3), "stderr: {}", stderr(&o));

    let o = ssh(ep, "echo out; echo err >&2; exit 7").await;
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(o.stdout, b"out\n");
    assert!(
        stderr(&o).contains("err\n") && !stderr(&o).contains("out"),
        "stderr: {:?}",
        stderr(&o)
    );
}

pub async fn check_env(ep: &AgentEndpoint) {
    let o = ssh_cmd(
        ep,
        &["-o", "SetEnv=CODER_SIM_TEST=yes-it-is"],
        "echo \"$CODER_SIM_TEST\"",
        Stdio::null(),
    )
    .output()
    .await
    .expect("ssh");
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(o.stdout, b"yes-it-is\n");
}

/// No command: a shell reading commands from the piped stdin.
pub async fn check_shell_from_stdin(ep: &AgentEndpoint) {
    let mut child = Command::new("ssh")
        .args(common_opts(ep))
        .arg("-T")
        .arg("-p")
        .arg(ep.addr().port().to_string())
        .arg("127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ssh");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(b"echo from-shell\nexit 5\n")
        .await
        .expect("write");
    drop(stdin);
    let o = exit_within(child, Duration::from_secs(10)).await;
    assert_eq!(o.status.code(), Some(5), "stderr: {}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("from-shell\n"),
        "stdout: {:?}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// `ssh host 'wc -c' < file`: the remote sees every byte, then EOF.
pub async fn check_stdin_eof(ep: &AgentEndpoint, len: u64) {
    let dir = tmp();
    let file = random_file(dir.path(), "in", len);
    let o = ssh_cmd(
        ep,
        &[],
        "wc -c",
        Stdio::from(std::fs::File::open(&file).expect("open")),
    )
    .output()
    .await
    .expect("ssh");
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), len.to_string());
}

/// Remote file → ssh stdout, checksummed. Returns the elapsed time.
pub async fn check_download(ep: &AgentEndpoint, len: u64) -> Duration {
    let dir = tmp();
    let file = random_file(dir.path(), "src", len);
    let want = sha256_file(&file);
    let t = Instant::now();
    let o = ssh(ep, &format!("cat {}", file.display())).await;
    let took = t.elapsed();
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(o.stdout.len() as u64, len);
    assert_eq!(sha256(&o.stdout), want);
    eprintln!(
        "download {} MiB in {took:?} ({:.0} MiB/s)",
        len >> 20,
        (len >> 20) as f64 / took.as_secs_f64()
    );
    took
}

/// ssh stdin → remote file, checksummed.
pub async fn check_upload(ep: &AgentEndpoint, len: u64) -> Duration {
    let dir = tmp();
    let file = random_file(dir.path(), "src", len);
    let dst = dir.path().join("dst");
    let t = Instant::now();
    let o = ssh_cmd(
        ep,
        &[],
        &format!("cat > {}", dst.display()),
        Stdio::from(std::fs::File::open(&file).expect("open")),
    )
    .output()
    .await
    .expect("ssh");
    let took = t.elapsed();
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(sha256_file(&dst), sha256_file(&file));
    eprintln!(
        "upload {} MiB in {took:?} ({:.0} MiB/s)",
        len >> 20,
        (len >> 20) as f64 / took.as_secs_f64()
    );
    took
}

/// `cat` echoing a stream both ways at once: both directions saturated,
/// which is where flow-control mistakes deadlock.
pub async fn check_echo(ep: &AgentEndpoint, len: u64) {
    let dir = tmp();
    let file = random_file(dir.path(), "src", len);
    let t = Instant::now();
    let o = tokio::time::timeout(
        Duration::from_secs(30),
        ssh_cmd(
            ep,
            &[],
            "cat",
            Stdio::from(std::fs::File::open(&file).expect("open")),
        )
        .output(),
    )
    .await
    .expect("echo through cat deadlocked")
    .expect("ssh");
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(o.stdout.len() as u64, len);
    assert_eq!(sha256(&o.stdout), sha256_file(&file));
    eprintln!("echo {} MiB in {:?}", len >> 20, t.elapsed());
}

fn scp_sftp_opts(ep: &AgentEndpoint, port_flag: &str) -> Vec<String> {
    let mut v = common_opts(ep);
    v.push(port_flag.to_string());
    v.push(ep.addr().port().to_string());
    v
}

pub async fn check_scp(ep: &AgentEndpoint, len: u64) {
    let dir = tmp();
    let src = random_file(dir.path(), "src", len);
    let remote = dir.path().join("uploaded");
    let back = dir.path().join("downloaded");
    let want = sha256_file(&src);

    let t = Instant::now();
    let o = Command::new("scp")
        .args(scp_sftp_opts(ep, "-P"))
        .arg(&src)
        .arg(format!("127.0.0.1:{}", remote.display()))
        .stdin(Stdio::null())
        .output()
        .await
        .expect("scp up");
    assert_eq!(o.status.code(), Some(0), "scp up: {}", stderr(&o));
    assert_eq!(sha256_file(&remote), want);
    let up = t.elapsed();

    let t = Instant::now();
    let o = Command::new("scp")
        .args(scp_sftp_opts(ep, "-P"))
        .arg(format!("127.0.0.1:{}", remote.display()))
        .arg(&back)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("scp down");
    assert_eq!(o.status.code(), Some(0), "scp down: {}", stderr(&o));
    assert_eq!(sha256_file(&back), want);
    eprintln!("scp {} MiB: up {up:?}, down {:?}", len >> 20, t.elapsed());
}

pub async fn check_sftp_batch(ep: &AgentEndpoint, len: u64) {
    let dir = tmp();
    let src = random_file(dir.path(), "src", len);
    let remote = dir.path().join("put");
    let back = dir.path().join("got");
    let batch = dir.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {}\nget {} {}\nls -l {}\n",
            src.display(),
            remote.display(),
            remote.display(),
            back.display(),
            remote.display()
        ),
    )
    .expect("batch");
    let o = Command::new("sftp")
        .args(scp_sftp_opts(ep, "-P"))
        .arg("-b")
        .arg(&batch)
        .arg("127.0.0.1")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("sftp");
    assert_eq!(o.status.code(), Some(0), "sftp: {}", stderr(&o));
    let want = sha256_file(&src);
    assert_eq!(sha256_file(&remote), want);
    assert_eq!(sha256_file(&back), want);
}

/// The remote command ends while the client's stdin is still open: ssh must
/// not wait for its stdin.
pub async fn check_remote_closes_first(ep: &AgentEndpoint) {
    let mut child = spawn_ssh(ep, "echo bye", Stdio::piped());
    let stdin = child.stdin.take().expect("stdin");
    let o = exit_within(child, Duration::from_secs(5)).await;
    drop(stdin);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(o.stdout, b"bye\n");

    // Same, with the remote reading some input first.
    let mut child = spawn_ssh(ep, "head -c 5", Stdio::piped());
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"12345678").await.expect("write");
    stdin.flush().await.expect("flush");
    let o = exit_within(child, Duration::from_secs(5)).await;
    drop(stdin);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(o.stdout, b"12345");
}

pub async fn check_kill_and_live_count(ep: &AgentEndpoint) {
    assert_eq!(ep.live_connections(), 0);
    let a = spawn_sleeper(ep).await;
    wait_live(ep, 1).await;
    let b = spawn_sleeper(ep).await;
    wait_live(ep, 2).await;
    let t = Instant::now();
    ep.kill_connections();
    assert_eq!(ep.live_connections(), 0);
    let oa = exit_within(a, Duration::from_secs(5)).await;
    let ob = exit_within(b, Duration::from_secs(5)).await;
    assert_eq!(oa.status.code(), Some(255));
    assert_eq!(ob.status.code(), Some(255));
    eprintln!("kill_connections: clients gone after {:?}", t.elapsed());
    wait_live(ep, 0).await;

    // The endpoint still serves new connections afterwards.
    let o = ssh(ep, "echo again").await;
    assert_eq!(o.stdout, b"again\n", "stderr: {}", stderr(&o));
    wait_live(ep, 0).await;
    wait_no_zombies().await;
}

pub async fn check_reset(ep: &AgentEndpoint) {
    let c = spawn_sleeper(ep).await;
    wait_live(ep, 1).await;
    ep.reset_connections();
    let o = exit_within(c, Duration::from_secs(5)).await;
    assert_eq!(o.status.code(), Some(255));
    // OpenSSH 9.2 reports an RST while idle as a failed disconnect write
    // ("Broken pipe"), elsewhere as "Connection reset", and sometimes (when
    // the RST lands before ssh writes anything) says nothing at all; a FIN
    // would be "closed by remote host". The raw-socket check proves the RST.
    let err = stderr(&o);
    assert!(
        !err.contains("closed by"),
        "expected a connection reset, ssh said: {err:?}"
    );
    wait_live(ep, 0).await;
}

pub async fn check_not_accepting(ep: &AgentEndpoint) {
    ep.set_accepting(false);
    let t = Instant::now();
    let o = ssh(ep, "echo nope").await;
    assert_eq!(o.status.code(), Some(255));
    assert!(o.stdout.is_empty());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(ep.live_connections(), 0);

    ep.set_accepting(true);
    let o = ssh(ep, "echo yes").await;
    assert_eq!(o.stdout, b"yes\n", "stderr: {}", stderr(&o));
}

/// At the socket level: after `reset_connections` the client's next read
/// fails with ECONNRESET (no FIN first, which would read as a clean EOF).
pub async fn check_reset_raw(ep: &AgentEndpoint) {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(ep.addr())
        .await
        .expect("connect");
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("banner timeout")
        .expect("banner");
    assert!(buf[..n].starts_with(b"SSH-2.0-"), "banner {:?}", &buf[..n]);
    wait_live(ep, 1).await;
    ep.reset_connections();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("read after reset timed out");
    match r {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected ECONNRESET, read returned Ok({n})"),
    }
    wait_live(ep, 0).await;
}

/// Past russh's 1 GiB rekey limit in both directions, streaming (nothing
/// held in memory): download from the remote, then upload the same bytes.
pub async fn check_gib_both_ways(ep: &AgentEndpoint, len: u64) {
    use tokio::io::AsyncReadExt;
    let dir = tmp();
    let file = dir.path().join("big");
    let t = Instant::now();
    let mut child = spawn_ssh(
        ep,
        &format!("head -c {len} /dev/urandom | tee {}", file.display()),
        Stdio::null(),
    );
    let mut out = child.stdout.take().expect("stdout");
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = out.read(&mut buf).await.expect("read");
        if k == 0 {
            break;
        }
        n += k as u64;
        h.update(&buf[..k]);
    }
    let o = child.wait_with_output().await.expect("wait");
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(n, len);
    let want = sha256_file(&file);
    assert_eq!(hex(&h.finalize()), want);
    eprintln!("download {} MiB in {:?}", len >> 20, t.elapsed());

    let t = Instant::now();
    let o = ssh_cmd(
        ep,
        &[],
        "sha256sum",
        Stdio::from(std::fs::File::open(&file).expect("open")),
    )
    .output()
    .await
    .expect("ssh");
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with(&want));
    eprintln!("upload {} MiB in {:?}", len >> 20, t.elapsed());
}
