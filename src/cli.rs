//! Command-line flags and their environment variables.
//!
//! Names and meanings follow `coder ssh --stdio` wherever the meaning is the
//! same, so an existing `ssh_config` block keeps working when `coder ... ssh
//! --stdio` is replaced by `coder-proxy`. The session token is deliberately
//! not a flag: argv is visible to every user of the machine.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// How long to wait for startup scripts before dialing (`coder ssh --wait`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum WaitMode {
    /// Always wait for startup scripts to finish.
    Yes,
    /// Never wait for startup scripts.
    No,
    /// Wait only when a script is marked `start_blocks_login`.
    #[default]
    Auto,
}

/// Which app name the usage heartbeat reports (`coder ssh --usage-app`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum UsageApp {
    #[default]
    Ssh,
    Vscode,
    Jetbrains,
    /// Send no usage heartbeat.
    Disable,
}

impl UsageApp {
    /// The `app_name` coderd expects, or `None` when disabled.
    pub fn app_name(self) -> Option<&'static str> {
        match self {
            UsageApp::Ssh => Some("ssh"),
            UsageApp::Vscode => Some("vscode"),
            UsageApp::Jetbrains => Some("jetbrains"),
            UsageApp::Disable => None,
        }
    }
}

/// OpenSSH `ProxyCommand` for Coder workspaces: `ProxyCommand coder-proxy %h`.
///
/// Resolves the host to a workspace and agent, starts the workspace if it is
/// stopped, waits for the agent, then pipes stdin/stdout to the agent's SSH
/// server. A live stream is closed only when a side ends it, the workspace is
/// stopped (or replaced by a new start build), or on SIGHUP/SIGTERM/SIGINT.
///
/// Exit codes: 0 the stream ended; 1 setup failed or the stream broke;
/// 2 usage error (bad flag or host name); 128+N killed by signal N.
#[derive(Parser, Debug, Clone)]
#[command(name = "coder-proxy", version, about, long_about = None)]
pub struct Cli {
    /// Host name as given by OpenSSH (%h): `ws.coder`, `owner--ws--agent`,
    /// `coder.owner/ws.agent`, `agent.ws.owner.coder`, ...
    pub host: String,

    /// Coder deployment URL (default: the `url` file in the config directory).
    #[arg(long, env = "CODER_URL", value_name = "URL")]
    pub url: Option<String>,

    /// Coder CLI configuration directory holding `url` and `session`.
    #[arg(long = "global-config", env = "CODER_CONFIG_DIR", value_name = "DIR")]
    pub global_config: Option<PathBuf>,

    /// Extra HTTP header `KEY=VALUE` for every request; repeatable. The
    /// environment form is one CSV record: `CODER_HEADER="A=1,B=2"`.
    #[arg(long = "header", value_name = "KEY=VALUE")]
    pub header: Vec<String>,

    /// Command (run with `sh -c`) whose stdout lines are `KEY=VALUE` headers.
    #[arg(
        long = "header-command",
        env = "CODER_HEADER_COMMAND",
        value_name = "CMD"
    )]
    pub header_command: Option<String>,

    /// Strip this prefix from the host name (e.g. `coder.`).
    #[arg(
        long = "ssh-host-prefix",
        env = "CODER_SSH_SSH_HOST_PREFIX",
        value_name = "PREFIX"
    )]
    pub ssh_host_prefix: Option<String>,

    /// Strip `.<SUFFIX>` from the host name; give it without a leading dot.
    #[arg(
        long = "hostname-suffix",
        env = "CODER_SSH_HOSTNAME_SUFFIX",
        default_value = "coder",
        value_name = "SUFFIX"
    )]
    pub hostname_suffix: String,

    /// Wait for startup scripts before connecting: yes, no, or auto (only
    /// when a script blocks login).
    #[arg(long, env = "CODER_SSH_WAIT", value_enum, default_value_t = WaitMode::Auto)]
    pub wait: WaitMode,

    /// Fail instead of starting a stopped workspace.
    #[arg(long = "disable-autostart", env = "CODER_SSH_DISABLE_AUTOSTART")]
    pub disable_autostart: bool,

    /// Bound on each wait (build, agent connect, scripts, dial): e.g. 90s,
    /// 10m, 1h. 0 waits without bound.
    #[arg(long = "wait-timeout", env = "CODER_PROXY_WAIT_TIMEOUT", default_value = "30m", value_parser = parse_duration, value_name = "DURATION")]
    pub wait_timeout: Duration,

    /// Transport to the agent: `auto` (Coder Connect when present, else the
    /// native tailnet transport), `coder-connect`, `tailnet`, or a template
    /// `tcp://HOST:PORT` where `{agent}`, `{workspace}` and `{owner}` are
    /// replaced.
    #[arg(
        long,
        env = "CODER_PROXY_TUNNEL",
        default_value = "auto",
        value_name = "TUNNEL"
    )]
    pub tunnel: String,

    /// App name for the usage heartbeat, or `disable`.
    #[arg(long = "usage-app", env = "CODER_SSH_USAGE_APP", value_enum, default_value_t = UsageApp::Ssh)]
    pub usage_app: UsageApp,

    /// Write a log file (mode 0600) per run into this directory.
    #[arg(
        short = 'l',
        long = "log-dir",
        env = "CODER_SSH_LOG_DIR",
        value_name = "DIR"
    )]
    pub log_dir: Option<PathBuf>,

    /// Debug logging (stderr and the log file). RUST_LOG overrides.
    #[arg(short, long)]
    pub verbose: bool,
}

impl Cli {
    /// The `--header` values plus `CODER_HEADER` (one CSV record).
    pub fn header_values(&self) -> Result<Vec<String>, String> {
        let mut out = self.header.clone();
        if let Ok(env) = std::env::var("CODER_HEADER") {
            out.extend(parse_csv_record(&env)?);
        }
        Ok(out)
    }
}

/// Parse one CSV record the way Coder's string-array flags do.
pub fn parse_csv_record(s: &str) -> Result<Vec<String>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(s.as_bytes());
    let mut record = csv::StringRecord::new();
    match rdr.read_record(&mut record) {
        Ok(true) => Ok(record.iter().map(str::to_string).collect()),
        Ok(false) => Ok(Vec::new()),
        Err(e) => Err(format!("CODER_HEADER is not a valid CSV record: {e}")),
    }
}

/// Parse `90s`, `10m`, `1h30m`, `500ms` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| format!("duration {s:?} needs a unit (ms, s, m, h)"))?;
        let (num, tail) = rest.split_at(digits);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
        let secs = match unit {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => {
                return Err(format!(
                    "invalid duration unit {unit:?} in {s:?} (use ms, s, m, h)"
                ))
            }
        };
        if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
            return Err(format!("duration {s:?} is out of range"));
        }
        total += Duration::from_secs_f64(secs);
        rest = next;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn csv_headers() {
        assert_eq!(parse_csv_record("A=1,B=2").unwrap(), vec!["A=1", "B=2"]);
        assert_eq!(
            parse_csv_record("\"X=a,b\",Y=c").unwrap(),
            vec!["X=a,b", "Y=c"]
        );
        assert!(parse_csv_record("").unwrap().is_empty());
    }
}
