//! A real HTTP proxy for end-to-end tests: Debian's `tinyproxy`, run in
//! the foreground with a generated config on a free loopback port, its log
//! captured, and killed when dropped.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Where Debian installs tinyproxy.
pub const TINYPROXY: &str = "/usr/bin/tinyproxy";

/// Whether tinyproxy is here; with `CODER_PROXY_REQUIRE_TINYPROXY=1` (or
/// `CI`) its absence fails the test instead of skipping it.
pub fn have_tinyproxy() -> bool {
    if std::path::Path::new(TINYPROXY).exists() {
        return true;
    }
    if std::env::var("CODER_PROXY_REQUIRE_TINYPROXY").as_deref() == Ok("1")
        || std::env::var_os("CI").is_some()
    {
        panic!("tinyproxy is required but missing: apt-get install tinyproxy");
    }
    eprintln!("SKIPPED: {TINYPROXY} not found (apt-get install tinyproxy); set CODER_PROXY_REQUIRE_TINYPROXY=1 to make this a failure");
    false
}

/// How the proxy should behave.
#[derive(Clone, Debug, Default)]
pub struct ProxyOptions {
    /// Require `Proxy-Authorization: Basic` with this user and password.
    pub basic_auth: Option<(String, String)>,
    /// Refuse every client (tinyproxy's `Allow` for an address we are not).
    pub deny_all: bool,
}

/// A running tinyproxy.
pub struct Tinyproxy {
    pub port: u16,
    child: tokio::process::Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// Start tinyproxy and wait until it accepts connections.
    pub async fn start(opts: ProxyOptions) -> Tinyproxy {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut conf =
            format!("Port {port}\nListen 127.0.0.1\nTimeout 120\nLogLevel Info\nMaxClients 200\n");
        if let Some((user, pass)) = &opts.basic_auth {
            conf.push_str(&format!("BasicAuth {user} {pass}\n"));
        }
        if opts.deny_all {
            // TEST-NET-1: never a client of ours.
            conf.push_str("Allow 192.0.2.77\n");
        }
        let conf_path = dir.path().join("tinyproxy.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let log = dir.path().join("tinyproxy.log");
        // -d: foreground; the log goes to stdout (and warnings to stderr).
        let out = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(TINYPROXY)
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tinyproxy");
        let end = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < end,
                "tinyproxy did not listen on {port}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Tinyproxy {
            port,
            child,
            log,
            _dir: dir,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`, or with credentials.
    pub fn url(&self, creds: Option<(&str, &str)>) -> String {
        match creds {
            Some((u, p)) => format!("http://{u}:{p}@{}", self.addr()),
            None => format!("http://{}", self.addr()),
        }
    }

    /// Everything tinyproxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The request lines tinyproxy logged (`CONNECT host:port HTTP/1.1`,
    /// `GET http://… HTTP/1.1`).
    pub fn requests(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| l.split_once("): ").filter(|_| l.contains("Request (")))
            .map(|(_, r)| r.trim().to_string())
            .collect()
    }

    /// PID of the proxy process.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A loopback port nobody listens on (at the moment of asking).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Remote ports of the established TCP connections `pid` holds, from
/// `/proc/PID/fd` and `/proc/net/tcp{,6}`.
pub fn tcp_peers_of(pid: u32) -> Vec<u16> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy().into_owned();
                if let Some(i) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(i.to_string());
                }
            }
        }
    }
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:tm retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "01" || !inodes.contains(f[9]) {
                continue;
            }
            if let Some(port) = f[2]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports
}

/// Keeps the machine's own proxy settings out of a command, so a test sees
/// only the proxy environment it sets itself.
pub fn without_proxy_env(c: &mut tokio::process::Command) {
    for v in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "CODER_PROXY_PROXY_LOOPBACK",
    ] {
        c.env_remove(v);
    }
}
