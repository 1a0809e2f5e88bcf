//! End-to-end checks of everything before the stream: settings precedence,
//! headers, autostart variants, waits with deadlines, and the one-line
//! errors for bad input. Each runs the real coder-proxy binary against
//! coder-sim.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use coder_sim::{AgentSpec, ApiFault, Route, WorkspaceSpec};
use common::*;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_precedence() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let dead = "http://127.0.0.1:9"; // discard port: connection refused

    // Config dir alone works.
    let out = run(env.proxy("dev", "dev", "dev"), Some(BANNER), LIMIT).await;
    assert_connected(&out);

    // CODER_URL beats the url file.
    let mut c = env.proxy("dev", "dev", "dev");
    c.env("CODER_URL", dead).arg("--wait-timeout=1s");
    let out = run(c, Some(BANNER), LIMIT).await;
    assert_fails_after_retries(&out, 1, "cannot reach coderd at http://127.0.0.1:9");

    // --url beats CODER_URL.
    let mut c = env.proxy("dev", "dev", "dev");
    c.env("CODER_URL", dead).arg("--url").arg(env.sim.url());
    assert_connected(&run(c, Some(BANNER), LIMIT).await);

    // CODER_SESSION_TOKEN beats the session file.
    let mut c = env.proxy("dev", "dev", "dev");
    c.env("CODER_SESSION_TOKEN", "wrong-token-value");
    let out = run(c, Some(BANNER), LIMIT).await;
    let err = assert_fails(&out, 1, "coder login");
    assert!(err.contains("401"), "{err}");
    assert!(!err.contains("wrong-token-value"));

    // CODER_CONFIG_DIR names the directory when no flag does.
    let tunnel = env.sim.tunnel("dev", "dev").unwrap();
    let mut c = tokio::process::Command::new(PROXY);
    c.args(["--tunnel", &tunnel, "dev"])
        .env("CODER_CONFIG_DIR", env.config_dir())
        .env_remove("CODER_URL")
        .env_remove("CODER_SESSION_TOKEN");
    assert_connected(&run(c, Some(BANNER), LIMIT).await);

    // The XDG default: $XDG_CONFIG_HOME/coderv2.
    let mut c = tokio::process::Command::new(PROXY);
    c.args(["--tunnel", &tunnel, "dev"])
        .env("XDG_CONFIG_HOME", env.dir.path())
        .env_remove("CODER_CONFIG_DIR")
        .env_remove("CODER_URL")
        .env_remove("CODER_SESSION_TOKEN");
    assert_connected(&run(c, Some(BANNER), LIMIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_header_command_reach_every_request() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let mut c = env.proxy("dev", "dev", "dev");
    c.args(["--header", "X-Flag=one"])
        .env("CODER_HEADER", "X-Env-A=a,X-Env-B=b")
        .arg("--header-command")
        .arg("printf 'X-Cmd=%s\\n' \"$CODER_URL\"; env | grep -c CODER_SESSION_TOKEN >&2 || true");
    let out = run(c, Some(BANNER), LIMIT).await;
    assert_connected(&out);
    let log = env.sim.request_log();
    assert!(!log.is_empty());
    for r in &log {
        assert_eq!(r.header("X-Flag"), Some("one"), "{}", r.path);
        assert_eq!(r.header("X-Env-A"), Some("a"));
        assert_eq!(r.header("X-Env-B"), Some("b"));
        assert_eq!(
            r.header("X-Cmd").map(|v| v.trim_end_matches('/')),
            Some(env.sim.url().as_str())
        );
        assert_eq!(
            r.header("Coder-Session-Token"),
            Some(env.sim.token().as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_command_failures_are_clear() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let cases: &[(&str, &str)] = &[
        (
            "echo nope >&2; exit 3",
            "failed to run --header-command: exit status: 3: nope",
        ),
        ("echo 'no equals sign'", "less than two parts"),
        ("printf 'Bad Name=1\\n'", "invalid header name"),
        ("sleep 30", "did not finish within 10s"),
    ];
    for (cmd, needle) in cases {
        let mut c = env.proxy("dev", "dev", "dev");
        c.arg("--header-command").arg(cmd);
        let out = run(c, Some(BANNER), LIMIT).await;
        assert_fails(&out, 1, needle);
    }
    let mut c = env.proxy("dev", "dev", "dev");
    c.args(["--header", "NoEquals"]);
    assert_fails(&run(c, Some(BANNER), LIMIT).await, 1, "less than two parts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_host_names_are_usage_errors() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let long = "a".repeat(300);
    let tunnel = env.sim.tunnel("dev", "dev").unwrap();
    for host in [
        "",
        long.as_str(),
        "wörk",
        "a/b/c/d",
        "a..b",
        "--",
        "%",
        "a;rm -rf /",
        "$(id)",
        "coder.",
    ] {
        let mut c = tokio::process::Command::new(PROXY);
        c.arg("--global-config").arg(env.config_dir()).args([
            "--tunnel",
            &tunnel,
            "--ssh-host-prefix",
            "coder.",
            "--",
            host,
        ]);
        let out = run(c, Some(BANNER), LIMIT).await;
        assert_fails(&out, 2, "invalid host name");
    }
    // No request reached the deployment for any of them.
    assert!(env.sim.request_log().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_clear() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    for (url, needle) in [
        ("coder.example.com", "no scheme"),
        ("ftp://x.example", "unsupported scheme"),
        ("http://[::1", "invalid deployment URL"),
    ] {
        let mut c = env.proxy("dev", "dev", "dev");
        c.args(["--url", url]);
        assert_fails(&run(c, Some(BANNER), LIMIT).await, 1, needle);
    }
    // Not logged in: an empty config dir.
    let empty = tempfile::tempdir().unwrap();
    let mut c = tokio::process::Command::new(PROXY);
    c.args(["--tunnel", "tcp://127.0.0.1:1", "--global-config"])
        .arg(empty.path())
        .arg("dev")
        .env_remove("CODER_URL")
        .env_remove("CODER_SESSION_TOKEN");
    assert_fails(
        &run(c, Some(BANNER), LIMIT).await,
        1,
        "You are not logged in",
    );

    // `url` is a directory.
    let weird = tempfile::tempdir().unwrap();
    std::fs::create_dir(weird.path().join("url")).unwrap();
    let mut c = tokio::process::Command::new(PROXY);
    c.args(["--tunnel", "tcp://127.0.0.1:1", "--global-config"])
        .arg(weird.path())
        .arg("dev")
        .env_remove("CODER_URL");
    assert_fails(&run(c, Some(BANNER), LIMIT).await, 1, "cannot read");

    // A session file with CRLF still works.
    std::fs::write(
        env.config_dir().join("session"),
        format!("{}\r\n", env.sim.token()),
    )
    .unwrap();
    assert_connected(&run(env.proxy("dev", "dev", "dev"), Some(BANNER), LIMIT).await);

    // Bad flag values are usage errors.
    let mut c = env.proxy("dev", "dev", "dev");
    c.args(["--wait", "maybe"]);
    let out = run(c, Some(BANNER), LIMIT).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let mut c = tokio::process::Command::new(PROXY);
    c.arg("--global-config")
        .arg(env.config_dir())
        .args(["--tunnel", "udp://x", "dev"]);
    assert_fails(&run(c, Some(BANNER), LIMIT).await, 2, "invalid --tunnel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_clear() {
    let env = Env::new(vec![
        WorkspaceSpec::new("dev"),
        WorkspaceSpec::new("multi").agents(vec![AgentSpec::new("main"), AgentSpec::new("dev")]),
        WorkspaceSpec::new("broken")
            .stopped()
            .fail_next_start()
            .build_time(Duration::from_millis(200)),
    ])
    .await;
    // Unknown workspace.
    let out = run(env.proxy("dev", "dev", "nope"), Some(BANNER), LIMIT).await;
    assert_fails(&out, 1, "workspace me/nope not found");
    // Several agents, none named.
    let out = run(env.proxy("multi", "main", "multi"), Some(BANNER), LIMIT).await;
    assert_fails(
        &out,
        1,
        "multiple agents found, please specify the agent name, available agents: [dev main]",
    );
    // A named agent that does not exist.
    let out = run(
        env.proxy("multi", "main", "multi.nope"),
        Some(BANNER),
        LIMIT,
    )
    .await;
    assert_fails(
        &out,
        1,
        "agent not found by name \"nope\", available agents: [dev main]",
    );
    // The named agent works.
    assert_connected(
        &run(
            env.proxy("multi", "main", "multi.main"),
            Some(BANNER),
            LIMIT,
        )
        .await,
    );
    // A start that fails reports the provisioner's error.
    let out = run(env.proxy("broken", "dev", "broken"), Some(BANNER), LIMIT).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty());
    assert!(
        err.contains("failed to start") && err.contains("provisioner failed"),
        "{err}"
    );

    // 5xx with Coder JSON, and non-JSON, before connecting: retried until the
    // wait timeout, then one clear line.
    env.sim.set_api_fault(ApiFault::Status(503));
    let mut c = env.proxy("dev", "dev", "dev");
    c.arg("--wait-timeout=1s");
    let out = run(c, Some(BANNER), LIMIT).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty());
    assert!(err.contains("retrying"), "{err}");
    assert!(err.lines().last().unwrap_or("").contains("503"), "{err}");
    env.sim.set_api_fault(ApiFault::NonJson);
    let mut c = env.proxy("dev", "dev", "dev");
    c.arg("--wait-timeout=1s");
    let out = run(c, Some(BANNER), LIMIT).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("HTML"), "{}", text(&out.stderr));
    env.sim.set_api_fault(ApiFault::None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dormant_and_active_version_autostart() {
    let env = Env::new(vec![
        WorkspaceSpec::new("sleepy")
            .stopped()
            .dormant()
            .build_time(Duration::from_millis(200)),
        WorkspaceSpec::new("strict")
            .stopped()
            .require_active_version()
            .build_time(Duration::from_millis(200)),
    ])
    .await;
    let out = run(env.proxy("sleepy", "dev", "sleepy"), Some(BANNER), LIMIT).await;
    assert_connected(&out);
    assert!(
        text(&out.stderr).contains("Activating dormant workspace"),
        "{}",
        text(&out.stderr)
    );
    let out = run(env.proxy("strict", "dev", "strict"), Some(BANNER), LIMIT).await;
    assert_connected(&out);
    let ws = env.sim.workspace_json("strict").unwrap();
    assert_eq!(
        ws["latest_build"]["template_version_id"],
        ws["template_active_version_id"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_wait_prints_progress_and_times_out() {
    let env = Env::new(vec![
        WorkspaceSpec::new("dev").agent(AgentSpec::new("dev").never_connects())
    ])
    .await;
    let mut c = env.proxy("dev", "dev", "dev");
    c.arg("--wait-timeout=11s");
    let out = run(c, Some(BANNER), LIMIT).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty());
    assert!(
        err.contains("Waiting for the workspace agent to connect"),
        "{err}"
    );
    assert!(
        err.contains("still waiting for the workspace agent"),
        "{err}"
    );
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(last.contains("timed out after 11s"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_dir_file_is_private_and_token_free() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")
        .stopped()
        .build_time(Duration::from_millis(200))])
    .await;
    let logs = env.path("logs");
    let mut c = env.proxy("dev", "dev", "dev");
    c.arg("-v").arg("--log-dir").arg(&logs);
    let out = run(c, Some(BANNER), LIMIT).await;
    assert_connected(&out);
    let files: Vec<_> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let body = std::fs::read_to_string(&files[0]).unwrap();
    assert!(body.contains("DEBUG"), "{body}");
    assert!(body.contains("started build"), "{body}");
    assert!(!body.contains(&env.sim.token()));
    assert!(!text(&out.stderr).contains(&env.sim.token()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_heartbeat_can_be_disabled() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    if !have_openssh() {
        return;
    }
    // `sleep 1` keeps the session up long enough for the first heartbeat.
    let mut c = env.ssh("dev", "dev", "--usage-app=disable", "dev");
    c.arg("sleep 1");
    assert!(run(c, None, LIMIT).await.status.success());
    assert_eq!(env.sim.usage_count("dev"), 0);
    let mut c = env.ssh("dev", "dev", "--usage-app=vscode", "dev");
    c.arg("sleep 1");
    assert!(run(c, None, LIMIT).await.status.success());
    let posted = env
        .sim
        .request_log()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/usage"))
        .count();
    assert_eq!(posted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_to_another_origin_never_carries_the_token() {
    let other = RawServer::fixed(http_response(500, "text/plain", b"")).await;
    let deploy = RawServer::fixed(format!(
        "HTTP/1.1 302 Found\r\nLocation: http://{}/api/v2/users/me/workspace/dev\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        other.addr
    ))
    .await;
    let mut c = tokio::process::Command::new(PROXY);
    c.args([
        "--tunnel",
        "tcp://127.0.0.1:1",
        "--url",
        &deploy.url(),
        "-v",
        "dev",
    ])
    .env("CODER_SESSION_TOKEN", "tok-must-not-travel")
    .env_remove("CODER_URL");
    let out = run(c, Some(BANNER), LIMIT).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty());
    assert!(err.contains("redirected to another origin"), "{err}");
    assert!(!err.contains("tok-must-not-travel"), "{err}");
    // The deployment got the token; the other origin got nothing at all.
    assert!(deploy.requests()[0].head.contains("tok-must-not-travel"));
    assert!(other.requests().is_empty(), "{:?}", other.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_command_leaves_no_process_behind() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    // A backgrounded child keeps the output pipe open past the timeout.
    let mut c = env.proxy("dev", "dev", "dev");
    c.arg("--header-command").arg("sleep 37.25 & echo X-A=1");
    let out = run(c, Some(BANNER), LIMIT).await;
    assert_fails(&out, 1, "did not finish within 10s");
    let lingering = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| String::from_utf8_lossy(&c).contains("37.25"));
    assert!(
        !lingering,
        "the header command's child outlived coder-proxy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_conflict_waits_for_the_other_start() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")
        .stopped()
        .build_time(Duration::from_millis(400))])
    .await;
    // Another client starts the workspace just before our build request.
    env.sim.race_next_build();
    let out = run(env.proxy("dev", "dev", "dev"), Some(BANNER), LIMIT).await;
    assert_connected(&out);
    let err = text(&out.stderr);
    assert!(
        err.contains("Unable to start the workspace due to conflict"),
        "{err}"
    );
    let posts = env
        .sim
        .request_log()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/builds"))
        .map(|r| r.status)
        .collect::<Vec<_>>();
    assert_eq!(posts, vec![409], "exactly one build request, refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autostart_build_request_is_retried_on_5xx() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")
        .stopped()
        .build_time(Duration::from_millis(300))])
    .await;
    // A load balancer in front of a restarting coderd.
    env.sim
        .fail_route(Route::CreateBuild, 502, Duration::from_secs(2));
    let out = run(env.proxy("dev", "dev", "dev"), Some(BANNER), LIMIT).await;
    assert_connected(&out);
    let err = text(&out.stderr);
    assert!(err.contains("retrying") && err.contains("502"), "{err}");
    let posts = env
        .sim
        .request_log()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/builds"))
        .map(|r| r.status)
        .collect::<Vec<_>>();
    assert!(
        posts.len() >= 2 && posts[..posts.len() - 1].iter().all(|s| *s == 502),
        "{posts:?}"
    );
    assert_eq!(posts.last(), Some(&201), "{posts:?}");
}

/// coder-proxy over tailnet with the given proxy environment (nothing
/// inherited from the machine).
fn tailnet_with_proxy_env(env: &Env, vars: &[(&str, String)]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(PROXY);
    c.arg("--global-config")
        .arg(env.config_dir())
        .args(["--tunnel", "tailnet", "dev"])
        .env_remove("CODER_SESSION_TOKEN")
        .env_remove("CODER_URL")
        .kill_on_drop(true);
    common::proxy::without_proxy_env(&mut c);
    for (k, v) in vars {
        c.env(k, v);
    }
    c
}

/// A proxy that refuses — 407 without or with wrong credentials, 403, or
/// nothing listening — fails the connection at once with one line that
/// names the proxy (never its credentials), exit 1, nothing on stdout;
/// over `http://` (REST through the proxy) and `https://` (CONNECT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refusals_fail_at_once_naming_the_proxy() {
    use common::proxy::{free_port, have_tinyproxy, ProxyOptions, Tinyproxy};
    if !have_tinyproxy() {
        return;
    }
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let authed = Tinyproxy::start(ProxyOptions {
        basic_auth: Some(("proxyuser".into(), "right-pw".into())),
        ..Default::default()
    })
    .await;
    let denying = Tinyproxy::start(ProxyOptions {
        deny_all: true,
        ..Default::default()
    })
    .await;
    let closed = format!("127.0.0.1:{}", free_port());
    let cases = [
        (authed.url(None), authed.addr(), "407"),
        (
            authed.url(Some(("proxyuser", "wrong-pw"))),
            authed.addr(),
            "rejected",
        ),
        (denying.url(None), denying.addr(), "403"),
        (format!("http://{closed}"), closed.clone(), "cannot reach"),
    ];
    for deployment in [env.sim.url(), "https://127.0.0.1:9".to_string()] {
        for (proxy_url, addr, needle) in &cases {
            let var = if deployment.starts_with("https") {
                "HTTPS_PROXY"
            } else {
                "HTTP_PROXY"
            };
            let mut c = tailnet_with_proxy_env(
                &env,
                &[
                    (var, proxy_url.clone()),
                    ("CODER_PROXY_PROXY_LOOPBACK", "1".into()),
                ],
            );
            c.arg("--url").arg(&deployment).arg("--wait-timeout=5m");
            let started = std::time::Instant::now();
            let out = run(c, Some(BANNER), LIMIT).await;
            let err = assert_fails(&out, 1, addr);
            eprintln!("{deployment}: {}", err.trim_end());
            assert!(
                err.contains(needle),
                "{deployment} via {addr}: want {needle:?} in {err}"
            );
            assert!(err.contains("proxy"), "{err}");
            assert!(
                !err.contains("wrong-pw") && !err.contains("right-pw"),
                "{err}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{deployment} via {addr}: took {:?}",
                started.elapsed()
            );
        }
    }
}

/// A proxy variable that applies but names no proxy we can speak to (SOCKS,
/// TLS to the proxy) fails at once with one line, credentials masked; one
/// that does not apply to the deployment changes nothing (the unit tests
/// cover `ALL_PROXY=socks5://…` beside an `HTTPS_PROXY`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_proxy_variables_fail_only_where_they_apply() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let loopback = ("CODER_PROXY_PROXY_LOOPBACK", "1".to_string());
    for (value, needle) in [
        (
            "socks5://user:pw-secret@127.0.0.1:1080",
            "only HTTP proxies",
        ),
        ("https://user:pw-secret@127.0.0.1:3129", "TLS to the proxy"),
    ] {
        let c = tailnet_with_proxy_env(&env, &[("HTTP_PROXY", value.into()), loopback.clone()]);
        let out = run(c, Some(BANNER), LIMIT).await;
        let err = assert_fails(&out, 1, needle);
        assert!(
            err.contains("HTTP_PROXY=") && err.contains("***@127.0.0.1"),
            "{err}"
        );
        assert!(!err.contains("pw-secret"), "{err}");
    }
    // A loopback deployment without the opt-in uses no proxy at all.
    let c = tailnet_with_proxy_env(&env, &[("ALL_PROXY", "socks5://127.0.0.1:1080".into())]);
    assert_connected(&run(c, Some(BANNER), LIMIT).await);
}

/// Like Go's net/http (and so `coder`), a deployment on a loopback address
/// is reached directly even with a proxy set — unless
/// `CODER_PROXY_PROXY_LOOPBACK=1` asks for the proxy (a local debugging
/// proxy such as mitmproxy). `NO_PROXY` entries match host suffixes and
/// `host:port`, as Go's and curl's do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_and_no_proxy_bypass_the_proxy() {
    let env = Env::new(vec![WorkspaceSpec::new("dev")]).await;
    let dead = format!("http://127.0.0.1:{}", common::proxy::free_port());
    let sim_port: u16 = env
        .sim
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap();
    // Loopback: direct by default.
    let c = tailnet_with_proxy_env(
        &env,
        &[("HTTP_PROXY", dead.clone()), ("HTTPS_PROXY", dead.clone())],
    );
    assert_connected(&run(c, Some(BANNER), LIMIT).await);
    // Opted in, NO_PROXY naming this host and port: still direct.
    let c = tailnet_with_proxy_env(
        &env,
        &[
            ("HTTP_PROXY", dead.clone()),
            ("CODER_PROXY_PROXY_LOOPBACK", "1".into()),
            ("no_proxy", format!("example.com, 127.0.0.1:{sim_port}")),
        ],
    );
    assert_connected(&run(c, Some(BANNER), LIMIT).await);
    // A NO_PROXY entry for another port does not match: the dead proxy is used.
    let c = tailnet_with_proxy_env(
        &env,
        &[
            ("http_proxy", dead.clone()),
            ("CODER_PROXY_PROXY_LOOPBACK", "1".into()),
            (
                "NO_PROXY",
                format!("127.0.0.1:{}", sim_port.wrapping_add(1)),
            ),
        ],
    );
    let out = run(c, Some(BANNER), LIMIT).await;
    assert_fails(&out, 1, dead.trim_start_matches("http://"));
}
