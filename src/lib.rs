//! coder-proxy: an OpenSSH `ProxyCommand` that reaches Coder workspaces.
//!
//! The crate is one short-lived process per SSH connection: resolve the host
//! ([`target`]), resolve credentials ([`settings`]), make sure the workspace
//! is running and its agent reachable ([`wait`], deciding with
//! [`readiness`]), dial a transport ([`tunnel`]), and pump bytes ([`pipe`])
//! while [`session`] watches for the few things allowed to close the stream.

pub mod cli;
pub mod coderd;
pub mod logging;
pub mod pipe;
pub mod progress;
pub mod proxy;
pub mod readiness;
pub mod session;
pub mod settings;
pub mod target;
pub mod tls;
pub mod tunnel;
pub mod wait;

use std::time::Duration;

use cli::Cli;
use session::{Closed, Session};

/// Exit code for a setup failure.
pub const EXIT_SETUP: i32 = 1;
/// Exit code for a usage error.
pub const EXIT_USAGE: i32 = 2;

/// Print one error line on stderr.
pub fn report(msg: &str) {
    use std::io::Write;
    log::debug!("fatal: {msg}");
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "coder-proxy: {}", logging::redact(msg));
}

/// Run one proxy session; returns the process exit code.
pub async fn run(cli: Cli, stdio: pipe::Stdio, redactor: logging::Redactor) -> i32 {
    let tunnel = match tunnel::Tunnel::parse(&cli.tunnel) {
        Ok(t) => t,
        Err(e) => {
            report(&format!("{e:#}"));
            return EXIT_USAGE;
        }
    };
    let target = match target::parse(
        &cli.host,
        cli.ssh_host_prefix.as_deref(),
        &cli.hostname_suffix,
    ) {
        Ok(t) => t,
        Err(e) => {
            report(&e.to_string());
            return EXIT_USAGE;
        }
    };
    log::debug!("host {:?} -> {target}", cli.host);

    let settings = match settings::Settings::resolve(&cli).await {
        Ok(s) => s,
        Err(e) => {
            report(&format!("{e:#}"));
            return EXIT_SETUP;
        }
    };
    if let Some(t) = &settings.token {
        redactor.add(t.expose());
    }
    for (_, v) in &settings.headers {
        if let Ok(v) = v.to_str() {
            redactor.add(v);
        }
    }
    for s in settings.proxy.secrets() {
        redactor.add(&s);
    }
    if !settings.proxy.is_empty() {
        log::debug!("proxies: {:?}", settings.proxy);
    }
    if settings.is_plaintext_remote() {
        log::warn!(
            "{} uses plain http to a remote host: the session token travels unencrypted; use https://",
            settings.url
        );
    }
    log::debug!("deployment {}", settings.url);
    let client = match coderd::Client::new(&settings) {
        Ok(c) => c,
        Err(e) => {
            report(&format!("{e:#}"));
            return EXIT_SETUP;
        }
    };

    let waiter = wait::Waiter {
        client: &client,
        target: &target,
        autostart: !cli.disable_autostart,
        wait: cli.wait,
        tunnel: &tunnel,
        timeout: (cli.wait_timeout > Duration::ZERO).then_some(cli.wait_timeout),
    };
    let connected = tokio::select! {
        r = waiter.run() => match r {
            Ok(c) => c,
            Err(e) => {
                report(&format!("{e:#}"));
                return EXIT_SETUP;
            }
        },
        n = wait_signal() => {
            report("interrupted while connecting");
            return 128 + n;
        }
    };

    let session = Session {
        client,
        workspace: connected.workspace,
        agent_id: connected.agent_id,
        usage_app: cli.usage_app.app_name(),
        watch: connected.watch,
    };
    let closed = session.run(stdio, connected.stream).await;
    match &closed {
        Closed::StreamEnded => log::debug!("stream ended"),
        Closed::StreamBroken(m) => report(m),
        Closed::Workspace(m) => report(&format!("closing the connection: {m}")),
        Closed::Signal(n) => log::info!("closing on signal {n}"),
    }
    closed.exit_code()
}

async fn wait_signal() -> i32 {
    match session::Signals::new() {
        Ok(mut s) => s.recv().await,
        Err(_) => std::future::pending().await,
    }
}
