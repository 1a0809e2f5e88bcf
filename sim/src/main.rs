//! `coder-sim` command line: `serve` runs a simulated deployment driven by
//! stdin commands; `demo` runs the README demo against a coder-proxy binary.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use coder_sim::{
    AgentSpec, AgentStatus, ApiFault, Initial, Lifecycle, PeerUpdateKind, Route, Sim, SimOptions,
    SshBackend, WorkspaceSpec,
};
use tokio::io::AsyncBufReadExt;

#[derive(Parser)]
#[command(
    name = "coder-sim",
    version,
    about = "A stand-in Coder deployment for testing coder-proxy"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a deployment until SIGINT/SIGTERM.
    ///
    /// Prints one JSON line on stdout: {"url","token","owner","workspaces":{WS:{AGENT:"tcp://…"}}}.
    /// Reads control commands from stdin, one per line (acknowledged on stderr):
    /// `status WS AGENT connecting|connected|disconnected|timeout`,
    /// `lifecycle WS AGENT ready|starting|…`, `stop WS`, `start WS`, `delete WS`,
    /// `fault none|hang|nonjson|CODE`, `cut-watch`, `kill WS AGENT`;
    /// tailnet: `drop-coordinate`, `restart-derp`,
    /// `peer-update WS AGENT lost|disconnected`, `rfh-delay MS|never`,
    /// `force-websockets on|off`, `freeze-derp WS AGENT`, `drop-derp WS AGENT`,
    /// `refuse-derp SECS`, `reset-tailnet WS AGENT`;
    /// `fail-route coordinate|connection|builds CODE SECS`;
    /// `watch-replay-stale on|off` (new watch streams replay the previous
    /// build as stopped first).
    Serve(ServeArgs),
    /// Run the README demo: ssh through coder-proxy into a simulated workspace.
    Demo {
        /// Path of the coder-proxy binary.
        #[arg(long)]
        proxy: PathBuf,
        /// Use a real `sshd -i` behind the agent instead of the embedded server.
        #[arg(long)]
        sshd: bool,
        /// Pass -v to coder-proxy.
        #[arg(long)]
        verbose: bool,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// A workspace of the default user (default: one running workspace `dev`).
    #[arg(
        long = "workspace",
        value_name = "NAME[:running|:stopped|:failed|:starting]"
    )]
    workspaces: Vec<String>,
    /// Agent names of every workspace (default: `dev`).
    #[arg(long = "agent", value_name = "NAME")]
    agents: Vec<String>,
    /// Put a real `sshd -i` behind each agent instead of the embedded server.
    #[arg(long)]
    sshd: bool,
    /// Write `url` and `session` here, like `coder login` does.
    #[arg(long, value_name = "DIR")]
    config_dir: Option<PathBuf>,
    /// How long each build job runs, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    build_time_ms: u64,
    /// Add a second DERP region with this id (e.g. 10001) on its own
    /// listener and home the agents there.
    #[arg(long, value_name = "ID")]
    agent_derp_region: Option<i64>,
}

fn parse_workspace(arg: &str) -> anyhow::Result<(String, Initial)> {
    let (name, state) = arg.split_once(':').unwrap_or((arg, "running"));
    let initial = match state {
        "running" => Initial::Running,
        "stopped" => Initial::Stopped,
        "failed" => Initial::Failed,
        "starting" => Initial::Starting,
        other => bail!("unknown workspace state {other:?} in {arg:?}"),
    };
    Ok((name.to_string(), initial))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let opts = SimOptions {
        ssh: if args.sshd {
            SshBackend::OpenSsh
        } else {
            SshBackend::Embedded
        },
        agent_derp_region: args.agent_derp_region,
        ..Default::default()
    };
    let sim = Sim::start_on(args.addr, opts).await?;
    let workspaces = if args.workspaces.is_empty() {
        vec!["dev".to_string()]
    } else {
        args.workspaces
    };
    let agents = if args.agents.is_empty() {
        vec!["dev".to_string()]
    } else {
        args.agents
    };
    let mut listing = BTreeMap::new();
    for ws in &workspaces {
        let (name, initial) = parse_workspace(ws)?;
        let spec = WorkspaceSpec::new(&name)
            .initial(initial)
            .build_time(Duration::from_millis(args.build_time_ms))
            .agents(agents.iter().map(AgentSpec::new).collect());
        sim.add_workspace(spec)
            .await
            .with_context(|| format!("add workspace {name}"))?;
        let tunnels: BTreeMap<String, String> = agents
            .iter()
            .filter_map(|a| sim.tunnel(&name, a).map(|t| (a.clone(), t)))
            .collect();
        listing.insert(name, tunnels);
    }
    if let Some(dir) = &args.config_dir {
        coder_sim::demo::write_coder_config(dir, &sim.url(), &sim.token())?;
    }
    println!(
        "{}",
        serde_json::json!({
            "url": sim.url(),
            "token": sim.token(),
            "owner": sim.owner(),
            "workspaces": listing,
        })
    );

    let control = {
        let sim = sim.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                match control(&sim, line) {
                    Ok(None) => eprintln!("ok: {line}"),
                    Ok(Some(note)) => eprintln!("ok: {line} ({note})"),
                    Err(e) => eprintln!("error: {line}: {e:#}"),
                }
            }
        })
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    control.abort();
    sim.shutdown();
    Ok(())
}

/// One stdin control command; `Some(note)` adds to the acknowledgement.
fn control(sim: &Sim, line: &str) -> anyhow::Result<Option<String>> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let known = |ws: &str| {
        if sim.workspace_json(ws).is_none() {
            bail!("no workspace {ws:?}");
        }
        Ok(())
    };
    match words.as_slice() {
        ["status", ws, agent, status] => {
            known(ws)?;
            let s: AgentStatus = status.parse().map_err(anyhow::Error::msg)?;
            sim.set_agent_status(ws, agent, s);
        }
        ["lifecycle", ws, agent, state] => {
            known(ws)?;
            let l: Lifecycle = state.parse().map_err(anyhow::Error::msg)?;
            sim.set_agent_lifecycle(ws, agent, l);
        }
        ["stop", ws] => {
            known(ws)?;
            sim.stop_workspace(ws);
        }
        ["start", ws] => {
            known(ws)?;
            sim.start_workspace(ws);
        }
        ["delete", ws] => {
            known(ws)?;
            sim.delete_workspace(ws);
        }
        ["fault", what] => sim.set_api_fault(match *what {
            "none" => ApiFault::None,
            "hang" => ApiFault::Hang,
            "nonjson" => ApiFault::NonJson,
            code => ApiFault::Status(
                code.parse()
                    .ok()
                    .filter(|c| (100..=599).contains(c))
                    .with_context(|| format!("not a status code: {code:?}"))?,
            ),
        }),
        ["cut-watch"] => sim.cut_watch_streams(),
        ["kill", ws, agent] => {
            known(ws)?;
            if !sim.kill_connections(ws, agent) {
                bail!("no agent {agent:?} in {ws:?}");
            }
        }
        ["drop-coordinate"] => {
            let n = sim.drop_coordinate_connections();
            return Ok(Some(format!("{n} coordinate connection(s) cut")));
        }
        ["restart-derp"] => {
            let n = sim.restart_derp();
            return Ok(Some(format!("{n} DERP connection(s) dropped")));
        }
        ["freeze-derp", ws, agent] => {
            known(ws)?;
            let n = sim.freeze_client_derp(ws, agent);
            return Ok(Some(format!("{n} client DERP connection(s) frozen")));
        }
        ["drop-derp", ws, agent] => {
            known(ws)?;
            let n = sim.drop_client_derp(ws, agent);
            return Ok(Some(format!("{n} client DERP connection(s) dropped")));
        }
        ["refuse-derp", secs] => {
            let secs: u64 = secs.parse().context("want seconds")?;
            sim.refuse_derp_for(Duration::from_secs(secs));
            return Ok(Some(format!("refusing DERP connections for {secs}s")));
        }
        ["reset-tailnet", ws, agent] => {
            known(ws)?;
            let n = sim.reset_tailnet_streams(ws, agent);
            return Ok(Some(format!("{n} tailnet engine(s) reset")));
        }
        ["peer-update", ws, agent, kind] => {
            known(ws)?;
            let kind = match *kind {
                "lost" => PeerUpdateKind::Lost,
                "disconnected" => PeerUpdateKind::Disconnected,
                other => bail!("unknown peer update {other:?} (want lost or disconnected)"),
            };
            if sim.agent_id(ws, agent).is_none() {
                bail!("no agent {agent:?} in {ws:?}");
            }
            let n = sim.send_peer_update(ws, agent, kind);
            return Ok(Some(format!("sent to {n} client(s)")));
        }
        ["rfh-delay", delay] => sim.set_ready_for_handshake_delay(match *delay {
            "never" => None,
            ms => Some(Duration::from_millis(ms.parse().with_context(|| {
                format!("not a number of milliseconds or \"never\": {ms:?}")
            })?)),
        }),
        ["force-websockets", on] => sim.set_derp_force_websockets(match *on {
            "on" => true,
            "off" => false,
            other => bail!("want on or off, not {other:?}"),
        }),
        ["fail-route", route, code, secs] => {
            let route = match *route {
                "coordinate" => Route::Coordinate,
                "connection" => Route::Connection,
                "builds" => Route::CreateBuild,
                other => bail!("unknown route {other:?} (want coordinate, connection or builds)"),
            };
            let code: u16 = code
                .parse()
                .ok()
                .filter(|c| (100..=599).contains(c))
                .with_context(|| format!("not a status code: {code:?}"))?;
            let secs: u64 = secs
                .parse()
                .with_context(|| format!("not a number of seconds: {secs:?}"))?;
            sim.fail_route(route, code, Duration::from_secs(secs));
        }
        ["watch-replay-stale", on] => sim.set_watch_replays_stale_stop(match *on {
            "on" => true,
            "off" => false,
            other => bail!("want on or off, not {other:?}"),
        }),
        _ => bail!("unknown command"),
    }
    Ok(None)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coder-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Serve(args) => serve(args).await,
            Cmd::Demo {
                proxy,
                sshd,
                verbose,
            } => {
                let backend = if sshd {
                    SshBackend::OpenSsh
                } else {
                    SshBackend::Embedded
                };
                coder_sim::demo::run(coder_sim::demo::DemoOptions {
                    proxy,
                    backend,
                    verbose,
                })
                .await
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coder-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
