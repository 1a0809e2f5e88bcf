//! The README demo: real `ssh` through `coder-proxy` into a simulated
//! workspace, showing autostart, a session that survives agent status
//! flapping, and a session closed promptly when the workspace stops.
//!
//! Narration goes to stderr; the remote commands' output is echoed on
//! stdout. Each step checks its outcome and the demo fails if one is wrong.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::endpoint::SshBackend;
use crate::{AgentSpec, AgentStatus, ScriptSpec, Sim, SimOptions, WorkspaceSpec};

/// What the demo runs against.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// The coder-proxy binary.
    pub proxy: PathBuf,
    pub backend: SshBackend,
    /// Pass `-v` to coder-proxy.
    pub verbose: bool,
}

/// Writes a coder CLI config directory (`url`, `session`): dir 0700, files 0600.
pub fn write_coder_config(dir: &Path, url: &str, token: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for (name, content) in [("url", url), ("session", token)] {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("write {}", path.display()))?;
        f.write_all(content.as_bytes())?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn say(msg: impl AsRef<str>) {
    use std::io::IsTerminal as _;
    if std::io::stderr().is_terminal() {
        eprintln!("\x1b[1m==> {}\x1b[0m", msg.as_ref());
    } else {
        eprintln!("==> {}", msg.as_ref());
    }
}

/// Quotes a path for an ssh_config line if it needs it.
fn cfg_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.contains([' ', '\t', '"']) {
        format!("\"{}\"", s.replace('"', "\\\""))
    } else {
        s
    }
}

struct Session {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    started: Instant,
}

impl Session {
    fn spawn(cfg: &Path, remote: &str) -> anyhow::Result<Session> {
        say(format!("$ ssh -F {} dev.coder '{remote}'", cfg.display()));
        let mut child = Command::new("ssh")
            .arg("-F")
            .arg(cfg)
            .arg("dev.coder")
            .arg(remote)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("run ssh (is OpenSSH installed?)")?;
        let stdout = child.stdout.take().context("ssh stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        let started = Instant::now();
        tokio::spawn(async move {
            let mut r = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = r.next_line().await {
                println!("    [{:5.1}s] | {line}", started.elapsed().as_secs_f64());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Session {
            child,
            lines,
            started,
        })
    }

    /// Waits for a line containing `needle`; returns every line up to it.
    async fn expect(&mut self, needle: &str, within: Duration) -> anyhow::Result<Vec<String>> {
        let mut seen = Vec::new();
        let found = tokio::time::timeout(within, async {
            while let Some(line) = self.lines.recv().await {
                let hit = line.contains(needle);
                seen.push(line);
                if hit {
                    return true;
                }
            }
            false
        })
        .await;
        match found {
            Ok(true) => Ok(seen),
            Ok(false) => bail!("ssh ended before printing {needle:?} (got {seen:?})"),
            Err(_) => bail!("no {needle:?} from ssh within {within:?} (got {seen:?})"),
        }
    }

    /// Waits for ssh to exit; returns its exit code and the remaining lines.
    async fn finish(mut self, within: Duration) -> anyhow::Result<(Option<i32>, Vec<String>)> {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .map_err(|_| anyhow::anyhow!("ssh still running after {within:?}"))??;
        let mut rest = Vec::new();
        // The reader ends at EOF, which follows the exit closely.
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(2), self.lines.recv()).await
        {
            rest.push(line);
        }
        Ok((status.code(), rest))
    }
}

/// Runs the demo; an error means a step misbehaved.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let proxy = std::fs::canonicalize(&opts.proxy)
        .with_context(|| format!("coder-proxy binary {}", opts.proxy.display()))?;
    let sim = Sim::start(SimOptions {
        ssh: opts.backend,
        ..Default::default()
    })
    .await?;
    let result = steps(&sim, &proxy, &opts).await;
    sim.shutdown();
    match &result {
        Ok(()) => say("Demo complete: every step behaved."),
        Err(e) => say(format!("Demo FAILED: {e:#}")),
    }
    result
}

async fn steps(sim: &Sim, proxy: &Path, opts: &DemoOptions) -> anyhow::Result<()> {
    let build_time = Duration::from_secs(2);
    sim.add_workspace(
        WorkspaceSpec::new("dev")
            .stopped()
            .build_time(build_time)
            // Only coder-proxy's watch may end sessions in step 3.
            .linger_after_stop(Duration::from_secs(300))
            .agent(
                AgentSpec::new("dev")
                    .connect_after(Duration::from_secs(1))
                    .startup_script(ScriptSpec::non_blocking(Duration::from_secs(1))),
            ),
    )
    .await?;
    let tunnel = sim.tunnel("dev", "dev").context("agent endpoint")?;

    let tmp = tempfile::Builder::new()
        .prefix("coder-sim-demo-")
        .tempdir()?;
    let config_dir = tmp.path().join("coderv2");
    write_coder_config(&config_dir, &sim.url(), &sim.token())?;
    let mut cfg = format!(
        "Host *.coder\n  ProxyCommand {} --global-config {} --tunnel {tunnel}{} %h\n  \
         StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  \
         BatchMode yes\n",
        cfg_quote(proxy),
        cfg_quote(&config_dir),
        if opts.verbose { " -v" } else { "" },
    );
    if let Some(key) = sim.client_key_path("dev", "dev") {
        cfg.push_str(&format!("  IdentityFile {}\n", cfg_quote(&key)));
    }
    let cfg_path = tmp.path().join("ssh_config");
    std::fs::write(&cfg_path, &cfg)?;

    say(format!(
        "coder-sim is serving {} with workspace alice/dev (stopped); agent endpoint {tunnel}",
        sim.url()
    ));
    eprintln!("--- {} ---\n{cfg}---", cfg_path.display());

    // Step 1: autostart.
    say("Step 1/3: connect to a stopped workspace: coder-proxy starts it and waits for the agent");
    let s = Session::spawn(&cfg_path, "echo hello from $(hostname)")?;
    let started = s.started;
    let (code, lines) = s.finish(Duration::from_secs(120)).await?;
    ensure!(code == Some(0), "step 1: ssh exited with {code:?}");
    ensure!(
        lines.iter().any(|l| l.contains("hello from")),
        "step 1: no greeting in {lines:?}"
    );
    say(format!(
        "Step 1 ok: started, connected and ran the command in {:.1}s",
        started.elapsed().as_secs_f64()
    ));

    // Step 2: agent status flapping does not touch a live stream.
    say("Step 2/3: a live session while the control plane flips the agent connected → disconnected → timeout → connected");
    let mut s = Session::spawn(
        &cfg_path,
        "for i in 1 2 3 4 5 6; do echo tick $i; sleep 1; done",
    )?;
    let mut ticks = s
        .expect("tick 1", Duration::from_secs(60))
        .await
        .context("step 2")?;
    for (status, name) in [
        (AgentStatus::Disconnected, "disconnected"),
        (AgentStatus::Timeout, "timeout"),
        (AgentStatus::Connected, "connected"),
    ] {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        sim.set_agent_status("dev", "dev", status);
        say(format!("sim: agent dev is now {name:?}"));
    }
    let (code, rest) = s.finish(Duration::from_secs(30)).await.context("step 2")?;
    ticks.extend(rest);
    let n = ticks.iter().filter(|l| l.starts_with("tick ")).count();
    ensure!(n == 6, "step 2: {n} of 6 ticks arrived: {ticks:?}");
    ensure!(code == Some(0), "step 2: ssh exited with {code:?}");
    say("Step 2 ok: all 6 ticks arrived; agent status never closed the stream");

    // Step 3: stopping the workspace ends the session promptly.
    say("Step 3/3: stop the workspace during `sleep 30`: coder-proxy closes the session once it is stopped");
    let mut s = Session::spawn(&cfg_path, "echo session open; sleep 30; echo still here")?;
    s.expect("session open", Duration::from_secs(60))
        .await
        .context("step 3")?;
    sim.stop_workspace("dev");
    let stopped_at = Instant::now();
    say(format!(
        "sim: stop build queued (runs {:.0}s)",
        build_time.as_secs_f64()
    ));
    let (code, rest) = s
        .finish(Duration::from_secs(20))
        .await
        .context("step 3: the session outlived the stop")?;
    ensure!(
        !rest.iter().any(|l| l.contains("still here")),
        "step 3: the command ran to completion"
    );
    say(format!(
        "Step 3 ok: ssh ended {:.1}s after the stop was requested (exit {})",
        stopped_at.elapsed().as_secs_f64(),
        code.map_or("by signal".to_string(), |c| c.to_string())
    ));
    Ok(())
}
