//! Shared harness for end-to-end tests: a coder-sim deployment, a Coder
//! config directory, and the real OpenSSH client running coder-proxy as its
//! ProxyCommand.
#![allow(dead_code)]

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
