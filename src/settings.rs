//! Deployment URL, session token, extra headers and HTTP proxies.
//!
//! Precedence: flags > environment > the Coder CLI's config directory
//! (`url` and `session` files), exactly as `coder` resolves them, so a
//! machine that ran `coder login` needs no extra setup. The token is held in
//! a [`Secret`] that never prints. Proxies come from `HTTPS_PROXY` and
//! friends ([`crate::proxy`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::header::{HeaderName, HeaderValue};
use url::Url;

use crate::cli::Cli;

/// A value that must never be displayed or logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(s)
    }
    /// The raw value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Everything needed to talk to coderd.
#[derive(Clone, Debug)]
pub struct Settings {
    pub url: Url,
    pub token: Option<Secret>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub config_dir: PathBuf,
    /// `HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`, ….
    pub proxy: crate::proxy::ProxyEnv,
}

/// Bound on `--header-command`.
pub const HEADER_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Most `--header-command` output we accept.
pub const HEADER_OUTPUT_MAX: usize = 64 << 10;

/// The Coder CLI's default config directory for this OS.
pub fn default_config_dir() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if cfg!(target_os = "macos") {
        return home.map(|h| h.join("Library/Application Support/coderv2"));
    }
    if cfg!(windows) {
        return std::env::var_os("APPDATA").map(|a| PathBuf::from(a).join("coderv2"));
    }
    match std::env::var_os("XDG_CONFIG_HOME") {
        Some(x) if !x.is_empty() => Some(PathBuf::from(x).join("coderv2")),
        _ => home.map(|h| h.join(".config/coderv2")),
    }
}

/// Read a config file, trimmed; `Ok(None)` when it does not exist.
fn read_config_file(dir: &Path, name: &str) -> Result<Option<String>> {
    let path = dir.join(name);
    // A FIFO or device would block the read (and a directory fails with a
    // confusing OS error): only a regular file is a config file.
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => bail!("cannot read {}: it is a directory", path.display()),
        Ok(m) if !m.is_file() => bail!("cannot read {}: it is not a regular file", path.display()),
        _ => {}
    }
    match std::fs::read(&path) {
        Ok(bytes) => {
            if bytes.len() > 64 * 1024 {
                bail!(
                    "{} is larger than 64 KiB; is it the right file?",
                    path.display()
                );
            }
            let s = String::from_utf8(bytes)
                .map_err(|_| anyhow!("{} is not UTF-8 text", path.display()))?;
            Ok(Some(s.trim().to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("cannot read {}: {}", path.display(), e)),
    }
}

/// Validate a deployment URL: absolute http(s) with a host.
pub fn parse_url(raw: &str) -> Result<Url> {
    let raw = raw.trim();
    if raw.is_empty() {
        bail!("the deployment URL is empty; set --url or CODER_URL, or run 'coder login <url>'");
    }
    if !raw.contains("://") {
        bail!("invalid deployment URL {raw:?}: it has no scheme; use https://{raw}");
    }
    let url = Url::parse(raw).map_err(|e| anyhow!("invalid deployment URL {raw:?}: {e}"))?;
    match url.scheme() {
        "http" | "https" => {}
        s => bail!("invalid deployment URL {raw:?}: unsupported scheme {s:?}; use https://"),
    }
    if url.host_str().is_none_or(str::is_empty) {
        bail!("invalid deployment URL {raw:?}: it has no host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        bail!(
            "invalid deployment URL: credentials in the URL are not supported; use 'coder login'"
        );
    }
    Ok(url)
}

/// Split `KEY=VALUE` into a header.
pub fn parse_header(line: &str) -> Result<(HeaderName, HeaderValue)> {
    let (k, v) = line.split_once('=').ok_or_else(|| {
        anyhow!(
            "split header {:?} had less than two parts: use KEY=VALUE",
            key_only(line)
        )
    })?;
    let name = HeaderName::from_bytes(k.trim().as_bytes())
        .map_err(|_| anyhow!("invalid header name {:?}", key_only(k)))?;
    let value = HeaderValue::from_str(v).map_err(|_| {
        anyhow!(
            "header {:?} has a value with characters not allowed in HTTP",
            name.as_str()
        )
    })?;
    Ok((name, value))
}

/// Show at most the part of a header line before `=`; values may be secret.
fn key_only(s: &str) -> String {
    crate::coderd::one_line(s.split('=').next().unwrap_or(""), 60)
}

impl Settings {
    /// Resolve everything from flags, environment and config directory.
    pub async fn resolve(cli: &Cli) -> Result<Settings> {
        let config_dir = match &cli.global_config {
            Some(d) => d.clone(),
            None => default_config_dir().ok_or_else(|| {
                anyhow!(
                    "cannot find the Coder config directory: HOME is not set; pass --global-config"
                )
            })?,
        };
        if config_dir.exists() && !config_dir.is_dir() {
            bail!(
                "config directory {} is not a directory",
                config_dir.display()
            );
        }
        let url_raw = match cli.url.as_deref().filter(|u| !u.trim().is_empty()) {
            Some(u) => u.to_string(),
            None => read_config_file(&config_dir, "url")?.filter(|u| !u.is_empty()).ok_or_else(|| {
                anyhow!("You are not logged in. Try logging in using 'coder login <url>' (or set CODER_URL; looked in {})", config_dir.display())
            })?,
        };
        let url = parse_url(&url_raw)?;
        let token = match std::env::var("CODER_SESSION_TOKEN") {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            _ => read_config_file(&config_dir, "session")?.filter(|t| !t.is_empty()),
        }
        .map(Secret::new);

        let mut headers = Vec::new();
        for h in cli.header_values().map_err(|e| anyhow!(e))? {
            headers.push(parse_header(&h)?);
        }
        if let Some(cmd) = cli
            .header_command
            .as_deref()
            .filter(|c| !c.trim().is_empty())
        {
            headers.extend(run_header_command(cmd, &url).await?);
        }
        // A proxy variable that applies to the deployment but names no
        // usable proxy is an error now, not a silent direct connection.
        let proxy = crate::proxy::ProxyEnv::from_env();
        proxy.for_url(&url).map_err(|e| anyhow!(e))?;
        Ok(Settings {
            url,
            token,
            headers,
            config_dir,
            proxy,
        })
    }

    /// Whether the URL sends the token in clear text to another machine.
    pub fn is_plaintext_remote(&self) -> bool {
        if self.url.scheme() != "http" {
            return false;
        }
        match self.url.host() {
            Some(url::Host::Ipv4(ip)) => !ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => !ip.is_loopback(),
            Some(url::Host::Domain(d)) => d != "localhost" && !d.ends_with(".localhost"),
            None => true,
        }
    }
}

/// Run `--header-command` once via `sh -c` with `CODER_URL` set.
async fn run_header_command(cmd: &str, url: &Url) -> Result<Vec<(HeaderName, HeaderValue)>> {
    let mut command = if cfg!(windows) {
        let mut c = tokio::process::Command::new("cmd.exe");
        c.arg("/c").arg(cmd);
        c
    } else {
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c").arg(cmd);
        c
    };
    command
        .env("CODER_URL", url.as_str())
        .env_remove("CODER_SESSION_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Its own process group, so whatever it leaves behind (a backgrounded
    // child holding the pipe) is killed with it.
    #[cfg(unix)]
    command.process_group(0);
    let mut child = command
        .spawn()
        .with_context(|| "failed to run --header-command: cannot start sh".to_string())?;
    let _group = ProcessGroupGuard(child.id());
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        bail!("failed to run --header-command: its output pipes are missing");
    };
    // Read the pipes with a cap: a command that prints without end must
    // fail at once, not fill memory until the timeout. Dropping `child` on
    // any early return kills it.
    let finished = tokio::time::timeout(HEADER_COMMAND_TIMEOUT, async {
        let (out, err) = tokio::try_join!(
            read_capped_pipe(stdout, HEADER_OUTPUT_MAX),
            first_bytes(stderr, 4096),
        )?;
        let status = child
            .wait()
            .await
            .context("failed to run --header-command")?;
        Ok::<_, anyhow::Error>((status, out, err))
    })
    .await;
    let (status, stdout, stderr) = match finished {
        Ok(r) => r?,
        Err(_) => bail!(
            "failed to run --header-command: it did not finish within {}s",
            HEADER_COMMAND_TIMEOUT.as_secs()
        ),
    };
    if !status.success() {
        let err = String::from_utf8_lossy(&stderr);
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        bail!(
            "failed to run --header-command: {}{}",
            status,
            if first.is_empty() {
                String::new()
            } else {
                format!(": {}", crate::coderd::one_line(first, 200))
            }
        );
    }
    let text = String::from_utf8(stdout)
        .map_err(|_| anyhow!("--header-command printed non-UTF-8 output"))?;
    let mut headers = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        headers.push(
            parse_header(line)
                .with_context(|| format!("--header-command output line {}", i + 1))?,
        );
    }
    Ok(headers)
}

/// Kills a process group when dropped (every exit path of the header command).
struct ProcessGroupGuard(Option<u32>);

impl Drop for ProcessGroupGuard {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) on a process group we created; ESRCH is fine.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

/// All of a pipe, or an error as soon as it passes `max` bytes.
async fn read_capped_pipe(r: impl tokio::io::AsyncRead + Unpin, max: usize) -> Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    r.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .await
        .context("failed to run --header-command: reading its output")?;
    if buf.len() > max {
        bail!(
            "--header-command printed more than {} KiB; it should print a few KEY=VALUE lines",
            max >> 10
        );
    }
    Ok(buf)
}

/// The first `keep` bytes of a pipe, draining (and dropping) the rest.
async fn first_bytes(mut r: impl tokio::io::AsyncRead + Unpin, keep: usize) -> Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return Ok(kept),
            Ok(n) => {
                let room = keep.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(parse_url("https://coder.example.com").is_ok());
        assert!(parse_url("http://127.0.0.1:3000/").is_ok());
        let e = parse_url("coder.example.com").unwrap_err().to_string();
        assert!(e.contains("no scheme"), "{e}");
        let e = parse_url("ftp://x").unwrap_err().to_string();
        assert!(e.contains("unsupported scheme"), "{e}");
        assert!(parse_url("http://").is_err());
        assert!(parse_url("https://u:p@host").is_err());
        assert!(parse_url("").is_err());
    }

    #[test]
    fn headers() {
        let (k, v) = parse_header("X-Test=a=b").unwrap();
        assert_eq!(k.as_str(), "x-test");
        assert_eq!(v.to_str().unwrap(), "a=b");
        let e = parse_header("NoEquals").unwrap_err().to_string();
        assert!(e.contains("less than two parts"), "{e}");
        assert!(parse_header("bad name=1").is_err());
        let e = parse_header("X=secret\nvalue").unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
    }
}
