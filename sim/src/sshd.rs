//! Real OpenSSH server for simulated agents (the `OpenSsh` backend).
//!
//! This module owns the per-endpoint sshd setup (a private temp directory with
//! host key, client key pair, `authorized_keys` and `sshd_config`) and the
//! per-connection `sshd -i` processes (inetd mode: the accepted socket is the
//! process's stdin and stdout). It exists so coder-proxy can be tested against
//! the server implementation users actually run, not only our embedded one.
//!
//! Process cleanup is by process *tree* (found through /proc), because sshd
//! forks privilege-separation and session children, and session children call
//! `setsid`, so neither a single pid nor a process group covers them.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Where Debian's openssh-server installs the daemon.
pub const SSHD_PATH: &str = "/usr/sbin/sshd";

/// sshd's privilege-separation directory; it refuses to start without it.
const PRIVSEP_DIR: &str = "/run/sshd";

/// The sshd binary, or the error every caller should show.
pub fn sshd_path() -> anyhow::Result<PathBuf> {
    let p = PathBuf::from(SSHD_PATH);
    if p.is_file() {
        Ok(p)
    } else {
        bail!("sshd not found: install openssh-server")
    }
}

/// One endpoint's sshd configuration. Dropping it removes the directory.
pub struct SshdSetup {
    dir: tempfile::TempDir,
    sshd: PathBuf,
    config: PathBuf,
    client_key: PathBuf,
}

impl SshdSetup {
    /// Creates keys and config, and checks them with `sshd -t` so a broken
    /// environment fails at endpoint start rather than as a mysterious
    /// connection close later.
    pub async fn prepare() -> anyhow::Result<SshdSetup> {
        let sshd = sshd_path()?;
        ensure_privsep_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("coder-sim-sshd-")
            .tempdir()
            .context("creating sshd temp dir")?;
        let host_key = dir.path().join("ssh_host_ed25519_key");
        let client_key = dir.path().join("client_ed25519");
        keygen(&host_key).await?;
        keygen(&client_key).await?;
        let authorized = dir.path().join("authorized_keys");
        std::fs::copy(client_key.with_extension("pub"), &authorized)
            .context("writing authorized_keys")?;

        let config = dir.path().join("sshd_config");
        std::fs::write(&config, config_text(&host_key, &authorized))
            .context("writing sshd_config")?;

        let out = Command::new(&sshd)
            .arg("-t")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .output()
            .await
            .context("running sshd -t")?;
        if !out.status.success() {
            bail!(
                "sshd -t rejected the generated config: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(SshdSetup {
            dir,
            sshd,
            config,
            client_key,
        })
    }

    /// The private key an `ssh -i` client must use.
    pub fn client_key_path(&self) -> &Path {
        &self.client_key
    }

    /// The directory holding keys and config.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `sshd -i` on an accepted connection. `sock` becomes the
    /// process's stdin and stdout; the caller's copy can be dropped (or kept
    /// for linger/shutdown control) afterwards.
    pub fn spawn(&self, sock: OwnedFd) -> anyhow::Result<Child> {
        let stdout = sock.try_clone().context("dup socket")?;
        let mut child = Command::new(&self.sshd)
            .arg("-i")
            // Log to stderr (captured below), not syslog, which containers
            // usually lack.
            .arg("-e")
            .arg("-f")
            .arg(&self.config)
            .stdin(Stdio::from(sock))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::piped())
            // Own group, so a stray signal to our test process group does not
            // hit it and so the tree walk has a clear root.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", self.sshd.display()))?;
        if let Some(err) = child.stderr.take() {
            let pid = child.id().unwrap_or(0);
            tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    log::warn!("sshd[{pid}]: {line}");
                }
            });
        }
        Ok(child)
    }
}

fn config_text(host_key: &Path, authorized: &Path) -> String {
    format!(
        "HostKey {host}\n\
         AuthorizedKeysFile {auth}\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         UsePAM no\n\
         StrictModes no\n\
         PermitRootLogin yes\n\
         Subsystem sftp internal-sftp\n\
         PidFile none\n\
         LogLevel ERROR\n\
         UseDNS no\n\
         PrintMotd no\n\
         PrintLastLog no\n\
         AcceptEnv *\n\
         ClientAliveInterval 0\n",
        host = host_key.display(),
        auth = authorized.display(),
    )
}

fn ensure_privsep_dir() -> anyhow::Result<()> {
    let dir = Path::new(PRIVSEP_DIR);
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {PRIVSEP_DIR}"))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {PRIVSEP_DIR}"))?;
    }
    Ok(())
}

async fn keygen(path: &Path) -> anyhow::Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "coder-sim", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .await
        .context("running ssh-keygen (install openssh-client)")?;
    if !out.status.success() {
        bail!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// SIGKILLs `root` and all its descendants. The tree is collected before any
/// kill, because killed parents' children get reparented (and lost to us).
pub fn kill_tree(root: u32) {
    let mut victims = descendants(root);
    victims.push(root);
    for pid in victims {
        if let Ok(pid) = i32::try_from(pid) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// All processes below `root`, from /proc's parent links.
fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may contain spaces and ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        if let Some(ppid) = rest
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u32>().ok())
        {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        if let Some(kids) = children.get(&p) {
            for &k in kids {
                out.push(k);
                stack.push(k);
            }
        }
    }
    out
}
