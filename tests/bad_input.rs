//! Bad input, table-driven: host names, settings and server answers that
//! coder-proxy must turn into one actionable stderr line — exit 1 (setup) or
//! 2 (usage), nothing on stdout, no panic, a small peak RSS — with transient
//! failures retried until `--wait-timeout` and permanent ones failing at
//! once. A broken watch stream is not a failure at all: the proxy connects by
//! polling and keeps the session.
//!
//! The secrets rules run through the same tables at debug level (`-v`,
//! `--log-dir`): the session token never reaches stderr, stdout or a log
//! file, log files are 0600, the header command sees `CODER_URL` but not the
//! token, a redirect to another origin never carries it, and plain http to a
//! remote host warns exactly once.
//!
//! Servers are scripted raw HTTP/1.1 on 127.0.0.1 (`common::RawServer`); the
//! only name looked up off loopback is under `.invalid`, which fails by
//! definition. Cases of one table run concurrently, so a table costs about
//! as long as its slowest case.

mod common;

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coder_sim::WorkspaceSpec;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A session token shaped like Coder's (`id-secret`), easy to search for.
const TOKEN: &str = "Tok3nId42x-s3cretPartThatMustNeverLeak";
/// The part of [`TOKEN`] that must not leak even in pieces.
const SECRET_PART: &str = "s3cretPartThatMustNeverLeak";
/// A config directory that does not exist.
const NO_CONFIG: &str = "/nonexistent/coder-proxy-bad-input";
/// Per-request timeout for the proxy, so hanging servers cost a second.
const HTTP_TIMEOUT: &str = "1s";
/// `--wait-timeout` for cases that must be retried, and for those that must
/// not be (if they were, they would take this long and print retry lines).
const RETRY_WINDOW: &str = "3s";
const NO_RETRY_WINDOW: &str = "60s";
/// A permanent failure must come well before [`NO_RETRY_WINDOW`].
const FAIL_FAST: Duration = Duration::from_secs(25);
/// Bound on one proxy run.
const LIMIT: Duration = Duration::from_secs(90);
/// Peak RSS a failing proxy may reach; it needs about 10 MiB.
const MAX_RSS_KIB: u64 = 48 * 1024;
/// `RLIMIT_DATA` for the proxy: buffering a multi-GiB body (or a header
/// command's endless output) would fail the allocation and abort it, which a
/// case sees as a signal instead of its exit code. It uses under 1 MiB.
const MAX_DATA: libc::rlim_t = 64 << 20;

/// What a case must end with.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Exit 1 at once: one line holding every needle.
    Fails(&'static [&'static str]),
    /// Exit 2 at once: one line holding every needle.
    Usage(&'static [&'static str]),
    /// "retrying" lines until the wait timeout, then one final line holding
    /// every needle.
    Retries(&'static [&'static str]),
}

impl Expect {
    fn code(self) -> i32 {
        match self {
            Expect::Usage(_) => 2,
            _ => 1,
        }
    }
    fn needles(self) -> &'static [&'static str] {
        match self {
            Expect::Fails(n) | Expect::Usage(n) | Expect::Retries(n) => n,
        }
    }
}

/// How loudly the proxy runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    /// Default level: the one-line contract is checked.
    Quiet,
    /// `-v --log-dir`: the secrets contract is checked.
    Debug,
}

/// One invocation of the proxy, before the level's flags are added.
#[derive(Clone, Debug, Default)]
struct Run {
    args: Vec<OsString>,
    env: Vec<(String, OsString)>,
    /// `CODER_SESSION_TOKEN`; [`TOKEN`] unless changed.
    token_env: Option<String>,
    host: String,
}

impl Run {
    /// `coder-proxy --url URL dev`, token in the environment.
    fn at(url: &str) -> Run {
        Run::new().arg("--url").arg(url)
    }
    /// `coder-proxy dev` with no URL and a config directory that is missing.
    fn new() -> Run {
        Run {
            args: vec!["--global-config".into(), NO_CONFIG.into()],
            env: vec![],
            token_env: Some(TOKEN.into()),
            host: "dev".into(),
        }
    }
    fn arg(mut self, a: impl Into<OsString>) -> Run {
        self.args.push(a.into());
        self
    }
    fn env(mut self, k: &str, v: impl Into<OsString>) -> Run {
        self.env.push((k.into(), v.into()));
        self
    }
    fn token(mut self, t: Option<&str>) -> Run {
        self.token_env = t.map(Into::into);
        self
    }
    fn host(mut self, h: &str) -> Run {
        self.host = h.into();
        self
    }

    /// The command: a clean environment, the case's flags, the level's
    /// flags, and the host after `--`.
    fn command(
        &self,
        expect: Expect,
        level: Level,
        log_dir: &std::path::Path,
    ) -> std::process::Command {
        let mut c = std::process::Command::new(PROXY);
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CODER_PROXY_HTTP_TIMEOUT", HTTP_TIMEOUT)
            .args(["--tunnel", "tcp://127.0.0.1:1"])
            .arg(match expect {
                Expect::Retries(_) => format!("--wait-timeout={RETRY_WINDOW}"),
                _ => format!("--wait-timeout={NO_RETRY_WINDOW}"),
            });
        if let Some(t) = &self.token_env {
            c.env("CODER_SESSION_TOKEN", t);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.args(&self.args);
        if level == Level::Debug {
            c.arg("-v").arg("--log-dir").arg(log_dir);
        }
        c.arg("--").arg(&self.host);
        c
    }
}

/// Run `cmd` with stdin closed and at most [`MAX_DATA`] of heap, kill it
/// after `limit`, and return its output and the peak RSS (`VmHWM`, KiB) seen
/// while it ran.
fn run_measured(mut cmd: std::process::Command, limit: Duration) -> (Output, u64) {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe and touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: MAX_DATA,
                rlim_max: MAX_DATA,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn coder-proxy");
    let pid = child.id();
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let end = Instant::now() + limit;
    let mut hwm = 0;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let kib = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
            hwm = hwm.max(kib.unwrap_or(0));
        }
        if let Some(st) = child.try_wait().expect("wait for coder-proxy") {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("coder-proxy did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let output = Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    (output, hwm)
}

/// Run one case and check it: the line contract at [`Level::Quiet`], the
/// secrets contract at [`Level::Debug`], and at both the exit code, an empty
/// stdout, no panic, no token, a small RSS and the final line's needles.
async fn check(name: String, run: Run, expect: Expect, level: Level) -> Output {
    let logs = tempfile::tempdir().unwrap();
    let cmd = run.command(expect, level, logs.path());
    let started = Instant::now();
    let (out, rss) = tokio::task::spawn_blocking(move || run_measured(cmd, LIMIT))
        .await
        .unwrap();
    let took = started.elapsed();
    let err = text(&out.stderr);
    let ctx = format!("case {name:?} ({level:?}), took {took:?}, stderr:\n{err}");
    assert_eq!(
        out.status.code(),
        Some(expect.code()),
        "signal {:?} (SIGABRT: over the memory limit?); {ctx}",
        out.status.signal()
    );
    assert!(
        out.stdout.is_empty(),
        "stdout {:?}; {ctx}",
        text(&out.stdout)
    );
    assert!(!err.contains("panicked"), "{ctx}");
    assert!(!err.contains(SECRET_PART), "token on stderr; {ctx}");
    assert!(rss < MAX_RSS_KIB, "peak RSS {rss} KiB; {ctx}");
    let lines: Vec<&str> = err.trim_end().lines().collect();
    let last = lines.last().copied().unwrap_or("");
    assert!(last.starts_with("coder-proxy: "), "{ctx}");
    for n in expect.needles() {
        assert!(last.contains(n), "expected {n:?} in the last line; {ctx}");
    }
    match level {
        Level::Quiet => {
            // Loopback and file URLs never warn about plain http.
            assert!(!err.contains("uses plain http"), "{ctx}");
            match expect {
                Expect::Fails(_) | Expect::Usage(_) => {
                    assert_eq!(lines.len(), 1, "not one line; {ctx}");
                    assert!(took < FAIL_FAST, "not at once; {ctx}");
                }
                Expect::Retries(_) => {
                    assert!(lines.len() >= 2, "no retry line; {ctx}");
                    for l in &lines[..lines.len() - 1] {
                        assert!(l.contains("retrying"), "unexpected line {l:?}; {ctx}");
                    }
                }
            }
        }
        Level::Debug => {
            assert!(err.contains("DEBUG"), "no debug lines; {ctx}");
            let files: Vec<_> = std::fs::read_dir(logs.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            assert_eq!(files.len(), 1, "{files:?}; {ctx}");
            let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{ctx}");
            let body = std::fs::read_to_string(&files[0]).unwrap();
            assert!(body.contains("DEBUG"), "{ctx}");
            assert!(!body.contains(SECRET_PART), "token in the log file; {ctx}");
        }
    }
    out
}

/// Run cases concurrently; report every failure, not just the first.
async fn check_all(cases: Vec<(String, Run, Expect)>, level: Level) {
    let n = cases.len();
    let mut tasks = Vec::new();
    for (name, run, expect) in cases {
        let label = name.clone();
        tasks.push((label, tokio::spawn(check(name, run, expect, level))));
    }
    let mut failures = Vec::new();
    for (name, t) in tasks {
        if let Err(e) = t.await {
            let msg = match e.try_into_panic() {
                Ok(p) => p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            failures.push(format!("--- {name}: {msg}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Host names (the forms tests/setup.rs does not already cover).

fn host_cases(server: &str) -> Vec<(String, Run, Expect)> {
    const BAD: Expect = Expect::Usage(&["invalid host name"]);
    let mut hosts: Vec<(String, Expect)> = [
        // Control characters must not reach the terminal raw.
        "dev\x1b[31mred",
        "dev\nrm -rf /",
        "dev\trm",
        "dev\x7f",
        "\x07",
        // Shell metacharacters.
        "`id`",
        "dev|cat",
        "dev&",
        "dev>x",
        "'dev'",
        "\"dev\"",
        "dev*",
        "~dev",
        "dev!",
        "dev\\x",
        "dev#1",
        "dev?",
        "dev@host",
        "dev%00",
        "${HOME}",
        // Look-alikes and direction overrides.
        "d\u{435}v",
        "dev\u{202e}",
        "\u{ff44}\u{ff45}\u{ff56}",
        // Shapes.
        "-dev",
        "dev-",
        "dev.",
        "dev--",
        "a.b.c.d",
        "a//b",
        "a/.b",
        ".coder",
    ]
    .iter()
    .map(|h| (h.to_string(), BAD))
    .collect();
    hosts.push(("a".repeat(65), Expect::Usage(&["is too long"])));
    hosts.push((
        format!("{}.coder", "a".repeat(250)),
        Expect::Usage(&["longer than 253"]),
    ));
    let mut cases: Vec<_> = hosts
        .into_iter()
        .map(|(h, e)| (format!("host {h:?}"), Run::at(server).host(&h), e))
        .collect();
    // A prefix with nothing after it, with and without the suffix rule.
    cases.push((
        "bare prefix".into(),
        Run::at(server)
            .args(["--ssh-host-prefix", "coder-vscode--"])
            .host("coder-vscode--"),
        Expect::Usage(&["nothing is left"]),
    ));
    // `a/b/c` is a valid form (owner a, workspace b, agent c, as `coder
    // ssh` reads it); it reaches coderd and fails there in one line.
    cases.push((
        "host a/b/c".into(),
        Run::at(server).host("a/b/c"),
        Expect::Fails(&["workspace a/b not found"]),
    ));
    cases
}

impl Run {
    fn args<const N: usize>(mut self, a: [&str; N]) -> Run {
        self.args.extend(a.iter().map(OsString::from));
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_host_names_fail_in_one_line() {
    let server =
        RawServer::start(|_| json_reply(404, r#"{"message":"Resource not found."}"#)).await;
    check_all(host_cases(&server.url()), Level::Quiet).await;
    // Only `a/b/c` got as far as a request.
    let paths: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/api/v2/users/a/workspace/b?include_deleted=false"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_host_names_are_not_echoed() {
    for host in ["dev\x1b]0;pwned\x07", "dev\r\nfake line", "\x1b[2J"] {
        let (out, _) = run_measured(
            Run::at("http://127.0.0.1:1").host(host).command(
                Expect::Usage(&[]),
                Level::Quiet,
                std::path::Path::new("/"),
            ),
            LIMIT,
        );
        let err = text(&out.stderr);
        assert_fails(&out, 2, "invalid host name");
        assert!(
            !err.trim_end().bytes().any(|b| b.is_ascii_control()),
            "control bytes echoed: {err:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Settings: URL, config directory, token, headers, header command.

/// A scratch config directory and the cases that use it.
struct SettingsCases {
    dir: tempfile::TempDir,
    server: RawServer,
}

impl SettingsCases {
    async fn new() -> SettingsCases {
        // coderd refuses requests without a token, like the real one.
        let server = RawServer::start(|r| match r.header("Coder-Session-Token") {
            None => json_reply(
                401,
                r#"{"message":"You are signed out or your session has expired. Please sign in again to continue."}"#,
            ),
            Some(_) => json_reply(404, r#"{"message":"Resource not found."}"#),
        })
        .await;
        SettingsCases {
            dir: tempfile::tempdir().unwrap(),
            server,
        }
    }

    /// A config directory named `name` holding `files` (name, contents).
    fn config(&self, name: &str, files: &[(&str, &[u8])]) -> std::path::PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for (f, body) in files {
            std::fs::write(d.join(f), body).unwrap();
        }
        d
    }

    fn with_config(&self, dir: &std::path::Path) -> Run {
        Run {
            args: vec!["--global-config".into(), dir.into()],
            ..Run::new()
        }
    }

    fn cases(&self) -> Vec<(String, Run, Expect)> {
        let url = self.server.url();
        let url_file = format!("{url}\n");
        let mut c: Vec<(String, Run, Expect)> = Vec::new();
        let mut add = |name: &str, run: Run, e: Expect| c.push((name.to_string(), run, e));

        // URLs (no scheme, ftp and an unparsable one are in setup.rs).
        add(
            "url https:// without host",
            Run::at("https://"),
            Expect::Fails(&["invalid deployment URL", "empty host"]),
        );
        add(
            "url with credentials",
            Run::at("https://alice:hunter2pw@coder.example"),
            Expect::Fails(&["credentials in the URL are not supported"]),
        );
        add(
            "url file://",
            Run::at("file:///etc/passwd"),
            Expect::Fails(&["unsupported scheme \"file\""]),
        );
        add(
            "url ws://",
            Run::at("ws://127.0.0.1:1"),
            Expect::Fails(&["unsupported scheme \"ws\"", "https://"]),
        );
        add(
            "url javascript:",
            Run::at("javascript:alert(1)"),
            Expect::Fails(&["no scheme"]),
        );
        add(
            "url with a space",
            Run::at("http://exa mple.com"),
            Expect::Fails(&["invalid deployment URL"]),
        );
        add(
            "url port out of range",
            Run::at("http://127.0.0.1:99999"),
            Expect::Fails(&["invalid deployment URL"]),
        );
        add(
            "url in CODER_URL without scheme",
            Run::new().env("CODER_URL", "coder.example.com"),
            Expect::Fails(&["no scheme", "https://coder.example.com"]),
        );

        // The config directory.
        add(
            "config dir missing",
            Run::new().token(None),
            Expect::Fails(&["You are not logged in", "coder login"]),
        );
        add(
            "config dir missing, URL given, no token",
            Run::at(&url).token(None),
            Expect::Fails(&["signed out", "[HTTP 401]", "coder login"]),
        );
        let file = self.dir.path().join("plain-file");
        std::fs::write(&file, "x").unwrap();
        add(
            "config dir is a file",
            self.with_config(&file),
            Expect::Fails(&["is not a directory"]),
        );
        let d = self.config("url-garbage", &[("url", b"not a url\n")]);
        add(
            "url file without scheme",
            self.with_config(&d),
            Expect::Fails(&["no scheme"]),
        );
        let d = self.config("url-binary", &[("url", b"\xff\xfe\x00http://x\n")]);
        add(
            "url file not UTF-8",
            self.with_config(&d),
            Expect::Fails(&["not UTF-8 text"]),
        );
        let big = vec![b'h'; 100 << 10];
        let d = self.config("url-big", &[("url", &big)]);
        add(
            "url file of 100 KiB",
            self.with_config(&d),
            Expect::Fails(&["larger than 64 KiB"]),
        );
        let d = self.config("url-empty", &[("url", b"  \n")]);
        add(
            "url file empty",
            self.with_config(&d).token(None),
            Expect::Fails(&["You are not logged in"]),
        );
        let d = self.config("url-fifo", &[]);
        let fifo = std::ffi::CString::new(d.join("url").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        add(
            "url file is a FIFO (would block)",
            self.with_config(&d),
            Expect::Fails(&["is not a regular file"]),
        );
        let d = self.config("url-loop", &[]);
        std::os::unix::fs::symlink("url", d.join("url")).unwrap();
        add(
            "url file is a symlink loop",
            self.with_config(&d),
            Expect::Fails(&["cannot read", "symbolic links"]),
        );
        let d = self.config("session-dir", &[("url", url_file.as_bytes())]);
        std::fs::create_dir(d.join("session")).unwrap();
        add(
            "session is a directory",
            self.with_config(&d).token(None),
            Expect::Fails(&["cannot read", "session: it is a directory"]),
        );
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let d = self.config("unreadable", &[("url", url_file.as_bytes())]);
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o000)).unwrap();
            add(
                "config dir unreadable",
                self.with_config(&d),
                Expect::Fails(&["cannot read", "ermission denied"]),
            );
        } else {
            eprintln!("note: running as root, which reads any directory: the unreadable config dir case is replaced by the symlink loop");
        }

        // Tokens (a session file with a trailing CRLF works: setup.rs).
        let d = self.config(
            "session-empty",
            &[("url", url_file.as_bytes()), ("session", b"")],
        );
        add(
            "session file empty",
            self.with_config(&d).token(None),
            Expect::Fails(&["[HTTP 401]", "coder login"]),
        );
        let d = self.config(
            "session-blank",
            &[("url", url_file.as_bytes()), ("session", b" \r\n\r\n")],
        );
        add(
            "session file blank lines",
            self.with_config(&d).token(None),
            Expect::Fails(&["[HTTP 401]", "coder login"]),
        );
        let d = self.config(
            "session-crlf-inside",
            &[
                ("url", url_file.as_bytes()),
                ("session", b"Tok3nId42x\r\ns3cretPartThatMustNeverLeak\r\n"),
            ],
        );
        add(
            "session file with CRLF inside",
            self.with_config(&d).token(None),
            Expect::Fails(&[
                "session token contains characters not allowed",
                "coder login",
            ]),
        );
        let d = self.config(
            "session-binary",
            &[("url", url_file.as_bytes()), ("session", b"\xff\xfe")],
        );
        add(
            "session file not UTF-8",
            self.with_config(&d).token(None),
            Expect::Fails(&["not UTF-8 text"]),
        );
        add(
            "CODER_SESSION_TOKEN with a control character",
            Run::at(&url).token(Some("Tok3nId42x-s3cret\x01PartThatMustNeverLeak")),
            Expect::Fails(&["session token contains characters not allowed"]),
        );

        // Headers (without `=` and a bad name from the command: setup.rs).
        add(
            "header with empty name",
            Run::at(&url).args(["--header", "=value"]),
            Expect::Fails(&["invalid header name"]),
        );
        add(
            "header with a space in the name",
            Run::at(&url).args(["--header", "Bad Name=1"]),
            Expect::Fails(&["invalid header name \"Bad Name\""]),
        );
        add(
            "header value with a newline",
            Run::at(&url).args(["--header", "X-Auth=hunter2\nhunter3"]),
            Expect::Fails(&["header \"x-auth\" has a value with characters not allowed"]),
        );
        add(
            "CODER_HEADER without =",
            Run::at(&url).env("CODER_HEADER", "A=1,NoEquals"),
            Expect::Fails(&["\"NoEquals\" had less than two parts"]),
        );

        // Header command (exit status, hang, no `=` and bad names: setup.rs).
        let hc = |cmd: &str| Run::at(&url).arg("--header-command").arg(cmd);
        add(
            "header-command prints binary",
            hc("printf '\\377\\376=\\001\\n'"),
            Expect::Fails(&["--header-command printed non-UTF-8 output"]),
        );
        add(
            "header-command prints without end",
            hc("yes X-Flood=1"),
            Expect::Fails(&["--header-command printed more than 64 KiB"]),
        );
        add(
            "header-command value with a control character",
            hc("printf 'X-Key=s3cr\\001t\\n'"),
            Expect::Fails(&["--header-command output line 1", "not allowed in HTTP"]),
        );
        add(
            "header-command junk line after a good one",
            hc("echo X-A=1; echo '<html>'"),
            Expect::Fails(&["output line 2", "less than two parts"]),
        );
        add(
            "header-command not found",
            hc("/nonexistent/header-helper"),
            Expect::Fails(&[
                "failed to run --header-command: exit status: 127",
                "not found",
            ]),
        );
        add(
            "header-command killed",
            hc("kill -9 $$"),
            Expect::Fails(&["failed to run --header-command: signal: 9"]),
        );
        add(
            "header-command floods stderr and hangs",
            hc("head -c 300000000 /dev/zero >&2; exec sleep 60"),
            Expect::Fails(&["did not finish within 10s"]),
        );
        c
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_fail_in_one_line() {
    let s = SettingsCases::new().await;
    check_all(s.cases(), Level::Quiet).await;
}

// ---------------------------------------------------------------------------
// Server answers to the first request (the workspace lookup).

type Handler = Arc<dyn Fn(&RawRequest) -> Reply + Send + Sync>;

fn always(reply: impl Fn() -> Reply + Send + Sync + 'static) -> Handler {
    Arc::new(move |_| reply())
}

fn fixed(status: u16, ctype: &'static str, body: &'static str) -> Handler {
    always(move || Reply::Close(http_response(status, ctype, body.as_bytes())))
}

fn json(status: u16, body: &'static str) -> Handler {
    fixed(status, "application/json", body)
}

/// A response head for a body that never ends.
fn endless(head: &str, chunk: Vec<u8>) -> Handler {
    let head = head.as_bytes().to_vec();
    always(move || Reply::Endless {
        head: head.clone(),
        chunk: chunk.clone(),
    })
}

const HTML: &str = "<!DOCTYPE html><html><head><title>Sign in</title></head><body>Sign in to continue</body></html>";

fn server_table() -> Vec<(&'static str, Handler, Expect)> {
    let gib3 = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 3221225472\r\nConnection: close\r\n\r\n";
    let chunked = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let chunked503 = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let mut chunk = b"10000\r\n".to_vec();
    chunk.extend(std::iter::repeat_n(b' ', 0x10000));
    chunk.extend_from_slice(b"\r\n");
    let token_echo_400: &'static str = Box::leak(
        format!(r#"{{"message":"invalid session token {TOKEN}","detail":"got header Coder-Session-Token: {TOKEN}"}}"#)
            .into_boxed_str(),
    );
    let token_echo_shape: &'static str = Box::leak(
        format!(r#"{{"id":"w","latest_build":{{"id":"b","build_number":"{TOKEN}"}}}}"#)
            .into_boxed_str(),
    );
    let token_echo_page: &'static str =
        Box::leak(format!("<html>debug: Coder-Session-Token: {TOKEN}</html>").into_boxed_str());
    vec![
        // 2xx with a body that is not a workspace: permanent.
        (
            "200 HTML login page",
            fixed(200, "text/html", HTML),
            Expect::Fails(&["look up workspace me/dev", "got HTML, not JSON", "--url"]),
        ),
        (
            "200 plain text",
            fixed(200, "text/plain", "hello"),
            Expect::Fails(&["invalid JSON"]),
        ),
        (
            "200 empty body",
            fixed(200, "application/json", ""),
            Expect::Fails(&["empty body", "--url"]),
        ),
        (
            "200 truncated JSON",
            json(200, r#"{"id":"w1","latest_build":{"id":"b1","status":"#),
            Expect::Fails(&["the JSON ends early"]),
        ),
        (
            "200 JSON object of another API",
            json(200, r#"{"hello":"world"}"#),
            Expect::Fails(&["the JSON is not a workspace", "--url"]),
        ),
        (
            "200 JSON array",
            json(200, "[1,2,3]"),
            Expect::Fails(&["the JSON is not shaped as expected", "--url"]),
        ),
        (
            "200 JSON wrong field type",
            json(200, r#"{"id":42}"#),
            Expect::Fails(&["the JSON is not shaped as expected", "expected a string"]),
        ),
        (
            "200 JSON null",
            json(200, "null"),
            Expect::Fails(&["the JSON is not shaped as expected"]),
        ),
        (
            "200 claiming 3 GiB",
            endless(gib3, vec![b' '; 0x10000]),
            Expect::Fails(&["larger than 4 MiB"]),
        ),
        (
            "200 chunked without end",
            endless(chunked, chunk.clone()),
            Expect::Fails(&["larger than 4 MiB"]),
        ),
        // Cut off or silent: transient.
        (
            "200 cut off mid-body",
            always(|| {
                Reply::Close(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{\"id\":\"w1\",".to_vec())
            }),
            Expect::Retries(&[
                "the answer from coderd was cut off",
                "reading the body failed",
            ]),
        ),
        (
            "accepts, never answers",
            always(|| Reply::Hold(vec![])),
            Expect::Retries(&["got no answer within 1s"]),
        ),
        (
            "headers, then no body",
            always(|| {
                Reply::Hold(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n".to_vec())
            }),
            Expect::Retries(&["got no answer within 1s"]),
        ),
        // Error statuses with and without Coder error JSON.
        (
            "401 Coder JSON",
            json(
                401,
                r#"{"message":"You are signed out or your session has expired. Please sign in again to continue.","detail":"session expired"}"#,
            ),
            Expect::Fails(&[
                "signed out",
                "[HTTP 401]",
                "Try logging in using 'coder login http://127.0.0.1:",
            ]),
        ),
        (
            "401 empty",
            json(401, ""),
            Expect::Fails(&["Unauthorized (an empty body) [HTTP 401]", "coder login"]),
        ),
        (
            "403 Coder JSON",
            json(
                403,
                r#"{"message":"Forbidden.","detail":"insufficient permissions"}"#,
            ),
            Expect::Fails(&["Forbidden.: insufficient permissions [HTTP 403]"]),
        ),
        (
            "403 HTML",
            fixed(403, "text/html", HTML),
            Expect::Fails(&[
                "HTTP 403 Forbidden with a body that is not Coder error JSON",
                "Sign in",
                "--url",
            ]),
        ),
        (
            "404 Coder JSON",
            json(
                404,
                r#"{"message":"Resource not found or you do not have access to this resource"}"#,
            ),
            Expect::Fails(&["workspace me/dev not found", "[HTTP 404]", "coder list"]),
        ),
        (
            "404 empty",
            json(404, ""),
            Expect::Fails(&["HTTP 404 Not Found with an empty body", "--url"]),
        ),
        (
            "404 JSON without message",
            json(404, r#"{"error":"no route"}"#),
            Expect::Fails(&[
                "HTTP 404 Not Found with a body that is not Coder error JSON",
                "no route",
            ]),
        ),
        (
            "409 Coder JSON",
            json(409, r#"{"message":"Workspace build is already active."}"#),
            Expect::Fails(&["Workspace build is already active. [HTTP 409]"]),
        ),
        (
            "409 plain text",
            fixed(409, "text/plain", "conflict"),
            Expect::Fails(&["HTTP 409 Conflict with a body that is not Coder error JSON"]),
        ),
        (
            "400 Coder JSON with validations",
            json(
                400,
                r#"{"message":"Invalid request.","validations":[{"field":"name","detail":"too long"}]}"#,
            ),
            Expect::Fails(&["Invalid request. (name: too long) [HTTP 400]"]),
        ),
        (
            "500 Coder JSON",
            json(
                500,
                r#"{"message":"Internal error fetching workspace.","detail":"database is down"}"#,
            ),
            Expect::Retries(&["Internal error fetching workspace.: database is down [HTTP 500]"]),
        ),
        (
            "500 empty",
            json(500, ""),
            Expect::Retries(&["Internal Server Error (an empty body) [HTTP 500]"]),
        ),
        (
            "502 proxy HTML page",
            fixed(
                502,
                "text/html",
                "<html><body><h1>502 Bad Gateway</h1></body></html>",
            ),
            Expect::Retries(&[
                "Bad Gateway (a body that is not Coder error JSON",
                "[HTTP 502]",
            ]),
        ),
        (
            "503 body without end",
            endless(chunked503, chunk),
            Expect::Retries(&["Service Unavailable", "[HTTP 503]"]),
        ),
        (
            "429",
            json(429, r#"{"message":"You've been rate limited."}"#),
            Expect::Retries(&["rate limited", "[HTTP 429]"]),
        ),
        // Redirects.
        (
            "redirect to another origin",
            always(|| {
                Reply::Close(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/elsewhere\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec())
            }),
            Expect::Fails(&[
                "redirected to another origin (http://127.0.0.1:1/elsewhere)",
                "set --url",
            ]),
        ),
        (
            "302 without Location",
            fixed(302, "text/plain", ""),
            Expect::Fails(&["HTTP 302 without a Location", "--url"]),
        ),
        // A server that echoes the token back never gets it onto stderr.
        (
            "400 echoing the token",
            json(400, token_echo_400),
            Expect::Fails(&["invalid session token [REDACTED]"]),
        ),
        (
            "200 echoing the token in a wrong-shape body",
            json(200, token_echo_shape),
            Expect::Fails(&["[REDACTED]", "expected i64"]),
        ),
        (
            "418 echoing the token in HTML",
            fixed(418, "text/html", token_echo_page),
            Expect::Fails(&["[REDACTED]"]),
        ),
        (
            "502 echoing the token in HTML",
            fixed(502, "text/html", token_echo_page),
            Expect::Retries(&["[REDACTED]"]),
        ),
    ]
}

/// Every server case as a run against its own server, plus the transport
/// failures that need no scripted answers.
async fn server_cases() -> (Vec<(String, Run, Expect)>, Vec<RawServer>) {
    let mut servers = Vec::new();
    let mut cases = Vec::new();
    for (name, handler, expect) in server_table() {
        let h = handler.clone();
        let s = RawServer::start(move |r| h(r)).await;
        cases.push((name.to_string(), Run::at(&s.url()), expect));
        servers.push(s);
    }
    // https:// to a server that speaks plain HTTP.
    let s = RawServer::start(|_| json_reply(404, "{}")).await;
    cases.push((
        "https to a plain-http server".into(),
        Run::at(&format!("https://{}", s.addr)),
        Expect::Fails(&["TLS failed", "use an http:// URL"]),
    ));
    servers.push(s);
    // Connection refused: a port that was just free.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    cases.push((
        "connection refused".into(),
        Run::at(&format!("http://127.0.0.1:{port}")),
        Expect::Retries(&[
            "cannot reach coderd at http://127.0.0.1:",
            "Connection refused",
        ]),
    ));
    // DNS failure (https, so no plain-http warning; that is tested below).
    cases.push((
        "DNS failure".into(),
        Run::at("https://coder.example.invalid"),
        // The cause is "dns error: ..." or, with a slow resolver, a timeout.
        Expect::Retries(&["cannot reach coderd at https://coder.example.invalid/"]),
    ));
    (cases, servers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_server_answers_fail_in_one_line() {
    let (cases, _servers) = server_cases().await;
    check_all(cases, Level::Quiet).await;
}

// ---------------------------------------------------------------------------
// TLS with a certificate from an unknown CA (needs the openssl CLI).

/// A CA and a leaf for 127.0.0.1 signed by it, made with `openssl`.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// `None` (with a loud note) when openssl is missing, unless CI is set.
    fn new() -> Option<Pki> {
        let have = std::process::Command::new("openssl")
            .arg("version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !have {
            let required = std::env::var_os("CI").is_some()
                || std::env::var("CODER_PROXY_REQUIRE_OPENSSL").as_deref() == Ok("1");
            assert!(
                !required,
                "the openssl CLI is required (CI or CODER_PROXY_REQUIRE_OPENSSL=1): apt-get install openssl"
            );
            eprintln!("SKIPPED: the openssl CLI is missing; the TLS cases need it (apt-get install openssl)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let sh = |script: &str| {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "{script}: {}", text(&out.stderr));
        };
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        sh(&format!("openssl req -x509 {ec} -subj /CN=coder-proxy-test-ca -days 1 -keyout ca.key -out ca.pem"));
        sh(&format!(
            "openssl req {ec} -subj /CN=localhost -keyout leaf.key -out leaf.csr"
        ));
        sh("printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nbasicConstraints=CA:FALSE\\n' > leaf.ext \
            && openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile leaf.ext -out leaf.pem");
        Some(Pki { dir })
    }

    /// `openssl s_server -www` on a free port; killed on drop.
    async fn serve(&self) -> (tokio::process::Child, u16) {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = tokio::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-cert", "leaf.pem", "-key", "leaf.key"])
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let up = eventually(Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
        assert!(up, "openssl s_server did not start");
        (child, port)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificate_fails_at_once_and_ssl_cert_file_fixes_it() {
    let Some(pki) = Pki::new() else { return };
    let (_server, port) = pki.serve().await;
    let url = format!("https://127.0.0.1:{port}");
    for level in [Level::Quiet, Level::Debug] {
        check(
            "untrusted certificate".into(),
            Run::at(&url),
            Expect::Fails(&[
                "TLS failed: invalid peer certificate: UnknownIssuer",
                "SSL_CERT_FILE",
            ]),
            level,
        )
        .await;
    }
    // The hint works: trusting the CA gets past TLS to the server's answer
    // (s_server's HTML status page).
    let ca = pki.dir.path().join("ca.pem");
    check(
        "CA trusted via SSL_CERT_FILE".into(),
        Run::at(&url).env("SSL_CERT_FILE", &ca),
        Expect::Fails(&["got HTML, not JSON"]),
        Level::Quiet,
    )
    .await;
}

// ---------------------------------------------------------------------------
// Secrets at debug level, through every table above.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_table_case_leaks_the_token_at_debug_level() {
    let server =
        RawServer::start(|_| json_reply(404, r#"{"message":"Resource not found."}"#)).await;
    let settings = SettingsCases::new().await;
    let (mut cases, _servers) = server_cases().await;
    cases.extend(host_cases(&server.url()));
    cases.extend(settings.cases());
    check_all(cases, Level::Debug).await;
}

/// The token from the config directory (not the environment) is kept out
/// of the log too: the redactor learns it only after reading the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_from_the_session_file_stays_out_of_logs() {
    let echo = format!(r#"{{"message":"bad token {TOKEN}"}}"#);
    let server = RawServer::start(move |_| json_reply(400, &echo)).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("url"), server.url()).unwrap();
    std::fs::write(dir.path().join("session"), format!("{TOKEN}\n")).unwrap();
    let run = Run {
        args: vec!["--global-config".into(), dir.path().into()],
        ..Run::new()
    }
    .token(None);
    for level in [Level::Quiet, Level::Debug] {
        check(
            "session file".into(),
            run.clone(),
            Expect::Fails(&["bad token [REDACTED]"]),
            level,
        )
        .await;
    }
    assert!(server.requests()[0].header("Coder-Session-Token") == Some(TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_command_sees_coder_url_but_not_the_token() {
    let server =
        RawServer::start(|_| json_reply(404, r#"{"message":"Resource not found."}"#)).await;
    for from_file in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("coderv2");
        std::fs::create_dir(&cfg).unwrap();
        std::fs::write(cfg.join("session"), TOKEN).unwrap();
        let dump = dir.path().join("dump");
        std::fs::create_dir(&dump).unwrap();
        let cmd = format!(
            "cd {}; env > env; tr '\\0' ' ' < /proc/$$/cmdline > argv; echo X-From-Command=1",
            dump.display()
        );
        let run = Run {
            args: vec!["--global-config".into(), cfg.clone().into()],
            ..Run::new()
        }
        .arg("--url")
        .arg(server.url())
        .arg("--header-command")
        .arg(&cmd)
        .token(if from_file { None } else { Some(TOKEN) });
        for level in [Level::Quiet, Level::Debug] {
            check(
                format!("header command, token from file: {from_file}"),
                run.clone(),
                Expect::Fails(&["workspace me/dev not found"]),
                level,
            )
            .await;
            let env = std::fs::read_to_string(dump.join("env")).unwrap();
            let argv = std::fs::read_to_string(dump.join("argv")).unwrap();

            assert!(
                !env.contains(TOKEN) && !argv.contains(TOKEN),
                "{env}\n{argv}"
            );
            assert!(!env.contains("CODER_SESSION_TOKEN"), "{env}");
            assert!(
                env.lines()
                    .any(|l| l.trim_end_matches('/') == format!("CODER_URL={}", server.url())),
                "{env}"
            );
            assert!(argv.starts_with("sh -c "), "{argv}");
        }
    }
    // The header reached coderd along with the token.
    let r = &server.requests()[0];
    assert_eq!(r.header("X-From-Command"), Some("1"));
    assert_eq!(r.header("Coder-Session-Token"), Some(TOKEN));
}

/// The header command inherits no descriptor of the proxy's: not the ends
/// of the SSH stream (its stdin and stdout), the log file, or a socket.
#[test]
fn header_command_inherits_no_descriptor_of_ours() {
    let dir = tempfile::tempdir().unwrap();
    let (stdin, stdout, logs, fds) = (
        dir.path().join("proxy-stdin"),
        dir.path().join("proxy-stdout"),
        dir.path().join("logs"),
        dir.path().join("fds"),
    );
    std::fs::write(&stdin, "").unwrap();
    let out = std::process::Command::new(PROXY)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CODER_SESSION_TOKEN", TOKEN)
        .args([
            "--global-config",
            NO_CONFIG,
            "--url",
            "http://127.0.0.1:1",
            "-v",
            "--log-dir",
        ])
        .arg(&logs)
        .arg("--header-command")
        .arg(format!("ls -l /proc/$$/fd > {}; exit 1", fds.display()))
        .arg("dev")
        .stdin(std::fs::File::open(&stdin).unwrap())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let fds = std::fs::read_to_string(&fds).unwrap();
    assert!(fds.contains(" 0 -> /dev/null"), "{fds}");
    for leak in [
        "proxy-stdin",
        "proxy-stdout",
        logs.to_str().unwrap(),
        "socket:",
    ] {
        assert!(
            !fds.contains(leak),
            "{leak} leaked into the header command:\n{fds}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_off_origin_never_carry_the_token() {
    // Same server, other origins: another host name, another scheme, and a
    // Location that itself carries the token.
    let hops = Arc::new(AtomicUsize::new(0));
    let hops2 = hops.clone();
    let server = RawServer::start(move |r| {
        let port = r.header("Host").and_then(|h| h.rsplit(':').next()).unwrap_or("0").to_string();
        let location = match r.path.as_str() {
            p if p.starts_with("/api/v2/users/host/") => format!("http://localhost:{port}/x"),
            p if p.starts_with("/api/v2/users/scheme/") => format!("https://127.0.0.1:{port}/x"),
            p if p.starts_with("/api/v2/users/echo/") => format!("http://localhost:{port}/x?token={TOKEN}"),
            // Same origin: followed, with the token.
            p if p.starts_with("/api/v2/users/me/") => "/moved".to_string(),
            _ => {
                hops2.fetch_add(1, Ordering::SeqCst);
                return json_reply(404, r#"{"message":"moved away"}"#);
            }
        };
        Reply::Close(
            format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .into_bytes(),
        )
    })
    .await;
    let cases = vec![
        (
            "other host".to_string(),
            Run::at(&server.url()).host("host/dev"),
            Expect::Fails(&["redirected to another origin (http://localhost:"]),
        ),
        (
            "other scheme".into(),
            Run::at(&server.url()).host("scheme/dev"),
            Expect::Fails(&["redirected to another origin (https://127.0.0.1:"]),
        ),
        (
            "token in Location".into(),
            Run::at(&server.url()).host("echo/dev"),
            Expect::Fails(&["?token=[REDACTED]"]),
        ),
    ];
    check_all(cases.clone(), Level::Quiet).await;
    check_all(cases, Level::Debug).await;
    assert_eq!(
        hops.load(Ordering::SeqCst),
        0,
        "an off-origin redirect was followed"
    );
    // Every request that arrived was to the original origin.
    for r in server.requests() {
        assert!(
            r.header("Host").unwrap().starts_with("127.0.0.1:"),
            "{}",
            r.head
        );
    }
    // A same-origin redirect is followed, and the token goes with it.
    check(
        "same origin".into(),
        Run::at(&server.url()),
        Expect::Fails(&["workspace me/dev not found", "moved away"]),
        Level::Quiet,
    )
    .await;
    let moved: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path == "/moved")
        .collect();
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].header("Coder-Session-Token"), Some(TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_a_remote_host_warns_once() {
    for level in [Level::Quiet, Level::Debug] {
        let logs = tempfile::tempdir().unwrap();
        let expect = Expect::Retries(&[]);
        let cmd = Run::at("http://coder.example.invalid").command(expect, level, logs.path());
        let (out, _) = tokio::task::spawn_blocking(move || run_measured(cmd, LIMIT))
            .await
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(out.stdout.is_empty());
        let warnings: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("uses plain http"))
            .collect();
        assert_eq!(warnings.len(), 1, "{err}");
        assert!(
            warnings[0].contains("http://coder.example.invalid/ uses plain http to a remote host"),
            "{err}"
        );
        assert!(warnings[0].contains("use https://"), "{err}");
        let last = err.trim_end().lines().last().unwrap();
        assert!(
            last.starts_with("coder-proxy: look up workspace")
                && last.contains("cannot reach coderd at http://coder.example.invalid/"),
            "{err}"
        );
        if level == Level::Quiet {
            // The warning comes first; then only retry lines and the error.
            assert!(err.starts_with("coder-proxy: warn: "), "{err}");
            assert!(
                err.lines()
                    .skip(1)
                    .all(|l| l == last || l.contains("retrying")),
                "{err}"
            );
        }
    }
    // Loopback in any spelling, and https anywhere, do not warn (the
    // tables above check the same for every 127.0.0.1 URL).
    let server =
        RawServer::start(|_| json_reply(404, r#"{"message":"Resource not found."}"#)).await;
    let port = server.addr.port();
    let mut cases = vec![];
    let url = format!("http://localhost:{port}");
    cases.push((url.clone(), Run::at(&url), Expect::Fails(&["not found"])));
    // Unreachable; only the absence of the warning matters.
    cases.push((
        "127.0.0.2".into(),
        Run::at("http://127.0.0.2:1"),
        Expect::Retries(&["cannot reach coderd"]),
    ));
    cases.push((
        "[::1]".into(),
        Run::at("http://[::1]:1"),
        Expect::Retries(&["cannot reach coderd"]),
    ));
    cases.push((
        "https remote".into(),
        Run::at("https://coder.example.invalid"),
        Expect::Retries(&["cannot reach coderd at https://coder.example.invalid/"]),
    ));
    check_all(cases, Level::Quiet).await;
}

// ---------------------------------------------------------------------------
// A broken watch stream: the proxy still connects (by polling) and keeps
// the session.

/// What the fake coderd's `/watch` does.
#[derive(Clone, Copy, Debug)]
enum WatchFault {
    Garbage,
    NonJsonEvent,
    WrongShapeEvent,
    ErrorEvent,
    EndlessLine,
    NoNewline,
    Silent,
    Html200,
    Html404,
    Status500,
    RedirectAway,
}

impl WatchFault {
    /// Whether the proxy subscribes again and again (else one subscription
    /// stays open and idle).
    fn repeats(self) -> bool {
        !matches!(self, WatchFault::NoNewline)
    }

    fn reply(self, away: &str) -> Reply {
        let sse = |body: &[u8]| {
            let mut r = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n".to_vec();
            r.extend_from_slice(body);
            r
        };
        match self {
            WatchFault::Garbage => Reply::Close(sse(b"\xff\xfe\x00garbage\r\n::::\n\n\x1b[2Jevent\n\ndata\n\nevent: data\ndata: \x01\x02\x03\n\n")),
            WatchFault::NonJsonEvent => Reply::Close(sse(b"event: ping\ndata: \n\nevent: data\ndata: <html>oops</html>\n\n")),
            WatchFault::WrongShapeEvent => Reply::Close(sse(b"event: data\ndata: {\"hello\":\"world\"}\n\n")),
            WatchFault::ErrorEvent => Reply::Close(sse(b"event: error\ndata: {\"message\":\"internal error\"}\n\n")),
            WatchFault::EndlessLine => Reply::Endless {
                head: sse(b"event: data\ndata: "),
                chunk: vec![b'a'; 0x10000],
            },
            WatchFault::NoNewline => Reply::Hold(sse(b"event: data\ndata: {\"id\":")),
            WatchFault::Silent => Reply::Hold(vec![]),
            WatchFault::Html200 => Reply::Close(http_response(200, "text/html", HTML.as_bytes())),
            WatchFault::Html404 => Reply::Close(http_response(404, "text/html", b"<h1>Not Found</h1>")),
            WatchFault::Status500 => Reply::Close(http_response(500, "text/html", b"<h1>oops</h1>")),
            WatchFault::RedirectAway => Reply::Close(
                format!("HTTP/1.1 302 Found\r\nLocation: {away}/watch\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes(),
            ),
        }
    }
}

/// A fake coderd serving `workspace` (the agent `connecting` for the first
/// two GETs, then `connected`) and a broken watch.
async fn fake_coderd(
    workspace: serde_json::Value,
    fault: WatchFault,
    away: String,
) -> (RawServer, Arc<AtomicUsize>) {
    let id = workspace["id"].as_str().unwrap().to_string();
    let mut connecting = workspace.clone();
    for r in connecting["latest_build"]["resources"]
        .as_array_mut()
        .unwrap()
    {
        for a in r["agents"].as_array_mut().into_iter().flatten() {
            a["status"] = "connecting".into();
        }
    }
    let (connected, connecting) = (workspace.to_string(), connecting.to_string());
    let gets = Arc::new(AtomicUsize::new(0));
    let watches = Arc::new(AtomicUsize::new(0));
    let watches2 = watches.clone();
    let server = RawServer::start(move |r| {
        let path = r.path.split('?').next().unwrap_or("");
        if path == format!("/api/v2/workspaces/{id}/watch") {
            watches2.fetch_add(1, Ordering::SeqCst);
            return fault.reply(&away);
        }
        if r.method == "GET"
            && (path.starts_with("/api/v2/users/") || path == format!("/api/v2/workspaces/{id}"))
        {
            let n = gets.fetch_add(1, Ordering::SeqCst);
            return json_reply(200, if n < 2 { &connecting } else { &connected });
        }
        if r.method == "POST" && path.ends_with("/usage") {
            return Reply::Close(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_vec());
        }
        json_reply(404, r#"{"message":"not served by this test"}"#)
    })
    .await;
    (server, watches)
}

async fn broken_watch_session(env: &Env, fault: WatchFault) -> Result<(), String> {
    let away = RawServer::start(|_| json_reply(500, r#"{"message":"must not be reached"}"#)).await;
    let (coderd, watches) =
        fake_coderd(env.sim.workspace_json("dev").unwrap(), fault, away.url()).await;
    let logs = tempfile::tempdir().unwrap();
    let mut c = tokio::process::Command::new(PROXY);
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CODER_SESSION_TOKEN", TOKEN)
        .env("CODER_PROXY_HTTP_TIMEOUT", HTTP_TIMEOUT)
        .args([
            "--global-config",
            NO_CONFIG,
            "--url",
            &coderd.url(),
            "--tunnel",
        ])
        .arg(env.sim.tunnel("dev", "dev").unwrap())
        .args(["--wait-timeout=60s", "-v", "--log-dir"])
        .arg(logs.path())
        .arg("dev")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_task = tokio::spawn(async move {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v).await;
        v
    });
    let fail =
        |why: String, err: Vec<u8>| Err(format!("{fault:?}: {why}; stderr:\n{}", text(&err)));

    // Connected: the agent's banner arrives.
    let mut got = Vec::new();
    let banner = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = [0u8; 4096];
        while !(got.starts_with(b"SSH-2.0-") && got.contains(&b'\n')) {
            match stdout.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    if banner != Ok(true) {
        let _ = child.start_kill();
        return fail(
            format!("no SSH banner, got {:?}", text(&got)),
            err_task.await.unwrap(),
        );
    }
    // The watch breaks again while connected (or stays open and idle), and
    // the session does not mind.
    if fault.repeats() {
        let seen = watches.load(Ordering::SeqCst);
        if !eventually(Duration::from_secs(60), || {
            watches.load(Ordering::SeqCst) > seen
        })
        .await
        {
            let _ = child.start_kill();
            return fail(
                "no new watch subscription while connected".into(),
                err_task.await.unwrap(),
            );
        }
    } else {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    if let Ok(Some(st)) = child.try_wait() {
        return fail(
            format!("exited while connected: {st}"),
            err_task.await.unwrap(),
        );
    }
    // End the stream from our side: the proxy exits 0.
    let _ = stdin.write_all(BANNER).await;
    drop(stdin);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stdout.read_to_end(&mut rest)).await;
    let status = match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(s) => s.unwrap(),
        Err(_) => {
            return fail(
                "did not exit after stdin closed".into(),
                err_task.await.unwrap(),
            )
        }
    };
    let err = err_task.await.unwrap();
    let e = text(&err);
    if status.code() != Some(0) {
        return fail(format!("exit {status}"), err);
    }
    if e.contains("panicked") || e.contains("closing the connection") || e.contains(TOKEN) {
        return fail("panic, close or token on stderr".into(), err);
    }
    for f in std::fs::read_dir(logs.path()).unwrap() {
        let body = std::fs::read_to_string(f.unwrap().path()).unwrap();
        if body.contains(TOKEN) {
            return fail("token in the log file".into(), err);
        }
    }
    if !away.requests().is_empty() {
        return fail(
            format!("the other origin was contacted: {:?}", away.requests()),
            err,
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_watch_streams_fall_back_to_polling_and_keep_the_session() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let faults = [
        WatchFault::Garbage,
        WatchFault::NonJsonEvent,
        WatchFault::WrongShapeEvent,
        WatchFault::ErrorEvent,
        WatchFault::EndlessLine,
        WatchFault::NoNewline,
        WatchFault::Silent,
        WatchFault::Html200,
        WatchFault::Html404,
        WatchFault::Status500,
        WatchFault::RedirectAway,
    ];
    let env = Arc::new(env);
    let mut tasks = Vec::new();
    for f in faults {
        let env = env.clone();
        tasks.push(tokio::spawn(
            async move { broken_watch_session(&env, f).await },
        ));
    }
    let mut failures = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
