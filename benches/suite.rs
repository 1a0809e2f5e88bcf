//! The performance suite (issue 5): start-up, reaction, throughput, weight
//! and CPU cost of coder-proxy, each next to a baseline measured in the same
//! run. `cargo bench --bench suite` (or `scripts/bench.sh`) builds the
//! release binary, starts coder-sim with a real `sshd -i` behind the agent
//! (the embedded russh server when sshd is missing), runs every measurement
//! several times with proxy and baseline runs interleaved, prints a markdown
//! table of medians with min–max, and writes it into `docs/PERFORMANCE.md`
//! between the `BEGIN RESULTS`/`END RESULTS` markers.
//!
//! Knobs (environment): `BENCH_RUNS` (runs per latency/weight measurement,
//! default 9), `BENCH_XFER_RUNS` (runs per transfer, default 3),
//! `BENCH_XFER_MIB` (bytes per transfer, default 1024), `BENCH_SESSIONS`
//! (concurrent sessions, default 50), `BENCH_ONLY` (comma list of
//! `startup,reaction,throughput,weight`), `BENCH_NO_WRITE=1` (print only),
//! `BENCH_DOC` (where to write, default `docs/PERFORMANCE.md`).
//!
//! Not part of `cargo test`: bench targets only build under `cargo bench`
//! (and `clippy --all-targets`).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coder_sim::{AgentSpec, AgentStatus, Sim, SimOptions, SshBackend, WorkspaceSpec};

/// The binary under test. `cargo bench` builds `CARGO_BIN_EXE_coder-proxy`
/// with the dev-dependencies' features unified in (tokio "full", hyper's
/// server side, …), so it is larger than what `cargo build --release` ships;
/// scripts/bench.sh therefore builds the real release binary first and
/// passes it in `CODER_PROXY_BENCH_BIN`.
fn proxy_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| match std::env::var("CODER_PROXY_BENCH_BIN") {
        Ok(p) if !p.is_empty() => p,
        _ => {
            eprintln!(
                "NOTE: CODER_PROXY_BENCH_BIN is not set: measuring cargo bench's own build of coder-proxy, \
                 whose dependency features are unified with the dev-dependencies (larger than a release build); \
                 run scripts/bench.sh for the shipped binary"
            );
            env!("CARGO_BIN_EXE_coder-proxy").to_string()
        }
    })
}
const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;
/// Buffer of socat baselines (`-b`): default socat's 8 KiB blocks prove little.
const SOCAT_BUF: &str = "262144";

/// What carries the SSH bytes in a run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    /// coder-proxy with `--tunnel tcp://` straight to the agent's endpoint.
    Tcp,
    /// coder-proxy with `--tunnel tailnet`: coordinate websocket, DERP relay
    /// and WireGuard, all on loopback through coder-sim.
    Tailnet,
    /// `socat -b 262144` on the same path as `Tcp` (the baseline).
    Socat,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Tcp => "tcp://",
            Via::Tailnet => "tailnet",
            Via::Socat => "socat",
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__wrap") {
        wrap(&args[2..]);
    }
    let cfg = Config::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let _enter = rt.enter();
    let bench = Bench::start(&rt, &cfg);
    let load_before = read_trim("/proc/loadavg");
    let mut rows = Vec::new();
    if cfg.wants("startup") {
        eprintln!("== start-up");
        bench.startup(&mut rows);
    }
    if cfg.wants("reaction") {
        eprintln!("== reaction");
        bench.reaction(&mut rows);
    }
    let mut weight = Weight::default();
    if cfg.wants("throughput") || cfg.wants("raw") || cfg.wants("ssh-xfer") {
        eprintln!("== throughput");
        bench.throughput(&mut rows, &mut weight);
    }
    if cfg.wants("weight") {
        eprintln!("== weight");
        bench.weight(&mut rows, &weight);
    }
    let load_after = read_trim("/proc/loadavg");
    let table = render(&rows);
    let machine = bench.machine(&load_before, &load_after);
    println!("\n{machine}\n{table}");
    bench.sim.shutdown();
    if std::env::var("BENCH_NO_WRITE").as_deref() != Ok("1") {
        let doc = std::env::var("BENCH_DOC")
            .unwrap_or_else(|_| format!("{}/docs/PERFORMANCE.md", env!("CARGO_MANIFEST_DIR")));
        match write_doc(Path::new(&doc), &machine, &table, &cfg) {
            Ok(()) => eprintln!("wrote {doc}"),
            Err(e) => eprintln!("cannot write {doc}: {e}"),
        }
    }
}

// ----- configuration ---------------------------------------------------------

struct Config {
    runs: usize,
    xfer_runs: usize,
    xfer_bytes: u64,
    sessions: usize,
    only: Option<Vec<String>>,
}

impl Config {
    fn from_env() -> Config {
        let num = |k: &str, d: u64| -> u64 {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        Config {
            runs: num("BENCH_RUNS", 9).max(1) as usize,
            xfer_runs: num("BENCH_XFER_RUNS", 3).max(1) as usize,
            xfer_bytes: num("BENCH_XFER_MIB", 1024).max(1) << 20,
            sessions: num("BENCH_SESSIONS", 50).max(1) as usize,
            only: std::env::var("BENCH_ONLY")
                .ok()
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.split(',').map(|p| p.trim().to_string()).collect()),
        }
    }

    fn wants(&self, part: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| p == part))
    }
}

// ----- the environment: coder-sim, sshd, a logged-in config dir --------------

struct Bench {
    sim: Sim,
    backend: SshBackend,
    cfg_dir: PathBuf,
    _tmp: tempfile::TempDir,
    tmp: PathBuf,
    /// `tcp://` address of agent `dev` of the running workspace `dev`.
    agent: SocketAddr,
    key: Option<PathBuf>,
    cipher: &'static str,
    runs: usize,
    xfer_runs: usize,
    xfer_bytes: u64,
    sessions: usize,
    nc: Option<&'static str>,
    parts: Parts,
    /// Raw TCP sink and source, also behind the agents of workspaces
    /// `rawup`/`rawdown` for the raw pipe over tailnet.
    sink: RawServer,
    source: RawServer,
}

/// Which transfers to run (`BENCH_ONLY=raw` or `ssh-xfer` narrows
/// `throughput`).
struct Parts {
    ssh_xfer: bool,
    raw: bool,
}

impl Bench {
    fn start(rt: &tokio::runtime::Runtime, cfg: &Config) -> Bench {
        let backend = if Path::new(coder_sim::sshd::SSHD_PATH).is_file() {
            SshBackend::OpenSsh
        } else {
            eprintln!(
                "NOTE: {} not found; falling back to the embedded russh server (install openssh-server for comparable numbers)",
                coder_sim::sshd::SSHD_PATH
            );
            SshBackend::Embedded
        };
        for tool in ["ssh", "socat"] {
            if !have(tool) {
                panic!("{tool} is required: apt-get install openssh-client socat (scripts/bench.sh does it)");
            }
        }
        let sim = rt
            .block_on(Sim::start(SimOptions {
                ssh: backend,
                ..Default::default()
            }))
            .expect("start coder-sim");
        rt.block_on(sim.add_workspace(WorkspaceSpec::new("dev")))
            .expect("add workspace dev");
        // Reaction: an agent that stays `connecting` until the bench says so.
        rt.block_on(
            sim.add_workspace(
                WorkspaceSpec::new("react").agent(
                    AgentSpec::new("dev")
                        .never_connects()
                        .connection_timeout(Duration::ZERO),
                ),
            ),
        )
        .expect("add workspace react");
        let sink = RawServer::start(true, cfg.xfer_bytes);
        let source = RawServer::start(false, cfg.xfer_bytes);
        for (name, server) in [("rawup", &sink), ("rawdown", &source)] {
            rt.block_on(sim.add_workspace(
                WorkspaceSpec::new(name).agent(AgentSpec::new("dev").tailnet_target(server.addr)),
            ))
            .expect("add raw workspace");
        }
        let tmp_dir = tempfile::Builder::new()
            .prefix("coder-proxy-bench-")
            .tempdir()
            .expect("tempdir");
        let tmp = tmp_dir.path().to_path_buf();
        let cfg_dir = tmp.join("coderv2");
        std::fs::create_dir_all(&cfg_dir).unwrap();
        std::fs::write(cfg_dir.join("url"), format!("{}\n", sim.url())).unwrap();
        std::fs::write(cfg_dir.join("session"), format!("{}\n", sim.token())).unwrap();
        let agent = sim.agent_addr("dev", "dev").expect("agent address");
        let key = sim.client_key_path("dev", "dev");
        Bench {
            sim,
            backend,
            cfg_dir,
            _tmp: tmp_dir,
            tmp,
            agent,
            key,
            // russh has no aes128-gcm; both ends support aes256-gcm.
            cipher: match backend {
                SshBackend::OpenSsh => "aes128-gcm@openssh.com",
                SshBackend::Embedded => "aes256-gcm@openssh.com",
            },
            runs: cfg.runs,
            xfer_runs: cfg.xfer_runs,
            xfer_bytes: cfg.xfer_bytes,
            sessions: cfg.sessions,
            nc: have("nc").then_some("nc"),
            parts: Parts {
                ssh_xfer: cfg.wants("throughput") || cfg.wants("ssh-xfer"),
                raw: cfg.wants("throughput") || cfg.wants("raw"),
            },
            sink,
            source,
        }
    }

    /// coder-proxy for workspace `dev`, dialing `tunnel`.
    fn proxy_args(&self, tunnel: &str) -> Vec<String> {
        vec![
            "--global-config".into(),
            self.cfg_dir.display().to_string(),
            "--tunnel".into(),
            tunnel.into(),
        ]
    }

    fn proxy(&self, tunnel: &str, host: &str) -> Command {
        let mut c = Command::new(proxy_bin());
        c.args(self.proxy_args(tunnel))
            .arg(host)
            .env_remove("CODER_SESSION_TOKEN")
            .env_remove("CODER_URL")
            .env_remove("RUST_LOG");
        c
    }

    /// `--tunnel` for coder-proxy to agent `dev` of workspace `dev`.
    fn tunnel(&self, via: Via) -> String {
        match via {
            Via::Tailnet => "tailnet".into(),
            _ => format!("tcp://{}", self.agent),
        }
    }

    /// The ProxyCommand line for `via` to the agent, wrapped so its rusage
    /// lands in `out` when given.
    fn proxy_command(&self, via: Via, out: Option<&Path>) -> String {
        if via == Via::Socat {
            return self.socat_command(out);
        }
        let inner = format!(
            "{} {} %h",
            proxy_bin(),
            self.proxy_args(&self.tunnel(via)).join(" ")
        );
        wrapped(&inner, out)
    }

    fn socat_command(&self, out: Option<&Path>) -> String {
        wrapped(&format!("socat -b {SOCAT_BUF} - TCP:{}", self.agent), out)
    }

    fn nc_command(&self) -> String {
        match self.nc {
            Some(nc) => format!("{nc} {} {}", self.agent.ip(), self.agent.port()),
            None => format!("socat - TCP:{}", self.agent),
        }
    }

    fn nc_name(&self) -> &'static str {
        if self.nc.is_some() {
            "nc"
        } else {
            "socat"
        }
    }

    fn ssh(&self, proxy_command: &str, remote: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args([
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
            "-o",
            "Compression=no",
            "-c",
            self.cipher,
        ])
        .arg("-o")
        .arg(format!("ProxyCommand={proxy_command}"));
        if let Some(k) = &self.key {
            c.arg("-i").arg(k).args(["-o", "IdentitiesOnly=yes"]);
        }
        c.arg("dev.coder")
            .arg(remote)
            .env_remove("CODER_SESSION_TOKEN")
            .env_remove("CODER_URL");
        c
    }

    // ----- 1. start-up ---------------------------------------------------------

    fn startup(&self, rows: &mut Vec<Row>) {
        // Process start → first API request bytes on a raw listener.
        let api = TcpListener::bind("127.0.0.1:0").unwrap();
        let api_addr = api.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || first_bytes_server(api, tx));
        let req = self.tmp.join("request.txt");
        std::fs::write(&req, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let empty_cfg = self.tmp.join("empty-config");
        std::fs::create_dir_all(&empty_cfg).unwrap();
        // Interleaved: coder-proxy with an http:// URL, with an https:// URL
        // (the first bytes are then the TLS ClientHello, after the system CA
        // roots were loaded), the same with only the CA bundle (what a stock
        // Debian loads, where the bundle is newer than /etc/ssl/certs; see
        // src/tls.rs), and the socat floor.
        let bundle = std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
        let mut got: [Vec<f64>; 4] = Default::default();
        for i in 0..self.runs {
            for which in rotate(i, 4) {
                drain(&rx);
                let t0 = Instant::now();
                let mut child = if which != 2 {
                    let scheme = if which == 0 { "http" } else { "https" };
                    let mut c = Command::new(proxy_bin());
                    if which == 3 {
                        c.env("SSL_CERT_FILE", &bundle).env_remove("SSL_CERT_DIR");
                    }
                    c.arg("--global-config")
                        .arg(&empty_cfg)
                        .arg("--url")
                        .arg(format!("{scheme}://{api_addr}"))
                        .args(["--tunnel", "tcp://127.0.0.1:9", "dev.coder"])
                        .env("CODER_SESSION_TOKEN", "bench-token")
                        .env_remove("CODER_URL")
                        .env_remove("RUST_LOG");
                    c
                } else {
                    let mut c = Command::new("socat");
                    c.arg("-u")
                        .arg(format!("FILE:{}", req.display()))
                        .arg(format!("TCP:{api_addr}"));
                    c
                }
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn");
                let t1: Instant = rx
                    .recv_timeout(Duration::from_secs(10))
                    .expect("no request within 10 s");
                let _ = child.kill();
                let _ = child.wait();
                got[which].push(ms(t1 - t0));
            }
        }
        for (which, label) in [
            (0, "http://"),
            (
                1,
                "https://, first byte = ClientHello; this machine's CA files",
            ),
            (3, "https://, CA bundle only, as on a stock Debian"),
        ] {
            rows.push(Row::measured(
                "1. Start-up",
                &format!("process start → first API request on the wire ({label})"),
                "ms",
                &got[which],
                "socat (exec + connect + send)",
                &got[2],
                Delta::Plus,
                Target::AtMost(5.0),
            ));
        }

        // Process start → first SSH byte from the agent (sshd's banner),
        // coder-proxy over tcp:// and over tailnet, and nc straight there.
        let mut got: [Vec<f64>; 3] = Default::default();
        for i in 0..self.runs {
            for which in rotate(i, 3) {
                let cmd = match which {
                    0 => self.proxy(&self.tunnel(Via::Tcp), "dev.coder"),
                    1 => self.proxy(&self.tunnel(Via::Tailnet), "dev.coder"),
                    _ => shell(&self.nc_command()),
                };
                got[which].push(first_stdout_byte(cmd));
            }
        }
        let nc = format!("{} straight to the agent", self.nc_name());
        for (which, target) in [(0, Target::OverheadAtMost(20.0)), (1, Target::None)] {
            let via = [Via::Tcp, Via::Tailnet][which];
            rows.push(Row::measured(
                "1. Start-up",
                &format!(
                    "process start → first SSH byte, running workspace ({})",
                    via.name()
                ),
                "ms",
                &got[which],
                &nc,
                &got[2],
                Delta::Plus,
                target,
            ));
        }

        // What users feel: `ssh host true`.
        let mut got: [Vec<f64>; 3] = Default::default();
        for i in 0..self.runs {
            for which in rotate(i, 3) {
                let pc = match which {
                    0 => self.proxy_command(Via::Tcp, None),
                    1 => self.proxy_command(Via::Tailnet, None),
                    _ => self.nc_command(),
                };
                let mut c = self.ssh(&pc, "true");
                c.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                let t0 = Instant::now();
                let out = c.output().expect("ssh");
                let v = ms(t0.elapsed());
                assert!(
                    out.status.success(),
                    "ssh true failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                got[which].push(v);
            }
        }
        let base = format!("ssh -o ProxyCommand='{} %h %p'", self.nc_name());
        for (which, via) in [(0, Via::Tcp), (1, Via::Tailnet)] {
            rows.push(Row::measured(
                "1. Start-up",
                &format!("`ssh host true`, first command done ({})", via.name()),
                "ms",
                &got[which],
                &base,
                &got[2],
                Delta::Plus,
                Target::None,
            ));
        }
    }

    // ----- 2. reaction -----------------------------------------------------------

    fn reaction(&self, rows: &mut Vec<Row>) {
        let ws_id = self.sim.workspace_id("react").expect("workspace react");
        let (sse_tx, sse_rx) = mpsc::channel();
        let api: SocketAddr = self
            .sim
            .url()
            .trim_start_matches("http://")
            .parse()
            .unwrap();
        let token = self.sim.token();
        std::thread::spawn(move || raw_watch(api, &ws_id, &token, sse_tx));
        let dial = TcpListener::bind("127.0.0.1:0").unwrap();
        let dial_addr = dial.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || accept_times(dial, tx));
        let mut ours = Vec::new();
        let mut base = Vec::new();
        for _ in 0..self.runs {
            self.sim
                .set_agent_status("react", "dev", AgentStatus::Connecting);
            std::thread::sleep(Duration::from_millis(100));
            let before = self.sim.watch_subscribers();
            let mut child = self
                .proxy(&format!("tcp://{dial_addr}"), "react.coder")
                .args(["--wait", "no"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn proxy");
            let subscribed = wait_until(Duration::from_secs(10), || {
                self.sim.watch_subscribers() > before
            });
            assert!(subscribed, "coder-proxy never opened the watch stream");
            // Let it read the first snapshot and settle in its wait.
            std::thread::sleep(Duration::from_millis(300));
            drain(&rx);
            drain(&sse_rx);
            let t0 = Instant::now();
            self.sim
                .set_agent_status("react", "dev", AgentStatus::Connected);
            let t1: Instant = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("coder-proxy did not dial within 20 s");
            ours.push(ms(t1 - t0));
            // The same event as a bare SSE client sees it: the delivery floor.
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Ok((t, data)) =
                sse_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                if t >= t0 && data {
                    base.push(ms(t - t0));
                    break;
                }
            }
            let _ = child.kill();
            let _ = child.wait();
            wait_until(Duration::from_secs(5), || {
                self.sim.watch_subscribers() <= before
            });
        }
        self.sim
            .set_agent_status("react", "dev", AgentStatus::Connecting);
        rows.push(Row::measured(
            "2. Reaction",
            "agent `connected` in coder-sim → coder-proxy dials (tcp://)",
            "ms",
            &ours,
            "raw SSE subscriber sees the event (coder CLI polls every 0.5–8 s)",
            &base,
            Delta::Plus,
            Target::AtMost(100.0),
        ));
    }

    // ----- 3. throughput (+ CPU per GiB, peak RSS during transfer) --------------

    fn throughput(&self, rows: &mut Vec<Row>, weight: &mut Weight) {
        let big = self.tmp.join("payload.bin");
        {
            // Sparse: reads as zeros from the page cache, costs no disk.
            let f = File::create(&big).unwrap();
            f.set_len(self.xfer_bytes).unwrap();
        }
        let gib = self.xfer_bytes as f64 / GIB;
        let size = human_size(self.xfer_bytes);

        // Through ssh, both directions; coder-proxy over tcp:// and over
        // tailnet, and socat on the tcp:// path, interleaved.
        const VIAS: [Via; 3] = [Via::Tcp, Via::Socat, Via::Tailnet];
        let ssh_dirs = if self.parts.ssh_xfer { 2 } else { 0 };
        for (dir, remote) in [
            ("upload", "date +%s%N >&2; cat > /dev/null".to_string()),
            ("download", format!("date +%s%N >&2; cat {}", big.display())),
        ]
        .into_iter()
        .take(ssh_dirs)
        {
            let mut got: [Sample; 3] = Default::default();
            for i in 0..self.xfer_runs {
                for which in rotate(i, 3) {
                    let rusage = self.tmp.join(format!("rusage-{dir}-{i}-{which}"));
                    let pc = self.proxy_command(VIAS[which], Some(&rusage));
                    let mut c = self.ssh(&pc, &remote);
                    if dir == "upload" {
                        c.stdin(File::open(&big).unwrap());
                    } else {
                        c.stdin(Stdio::null());
                    }
                    c.stdout(Stdio::null()).stderr(Stdio::piped());
                    let out = c.output().expect("ssh");
                    let end = unix_ns();
                    let err = String::from_utf8_lossy(&out.stderr);
                    assert!(out.status.success(), "ssh {dir} failed: {err}");
                    let start: u128 = err
                        .lines()
                        .next()
                        .and_then(|l| l.trim().parse().ok())
                        .unwrap_or_else(|| panic!("no start time from remote: {err}"));
                    let secs = (end.saturating_sub(start)) as f64 / 1e9;
                    let ru = read_rusage(&rusage);
                    got[which].push(self.xfer_bytes as f64 / MIB / secs, &ru, gib);
                }
            }
            let [tcp, socat, tailnet] = &got;
            weight.add(Via::Tcp, &tcp.rss, &socat.rss);
            weight.add(Via::Tailnet, &tailnet.rss, &[]);
            let what = format!("ssh {dir} `{}` {size}", short_remote(dir));
            push_transfer_rows(rows, &what, "ssh, tcp://", tcp, socat);
            push_tailnet_rows(rows, &what, "ssh", tailnet, tcp);
        }

        // The raw pipe: stdin → shim → TCP sink, and TCP source → shim →
        // stdout; over tailnet the sink/source sits behind the agent.
        let raw_dirs = if self.parts.raw { 2 } else { 0 };
        for dir in ["upload", "download"].into_iter().take(raw_dirs) {
            let mut got: [Sample; 3] = Default::default();
            for i in 0..self.xfer_runs.max(3) {
                for which in rotate(i, 3) {
                    let (secs, ru) = self.raw_transfer(dir == "upload", VIAS[which]);
                    got[which].push(self.xfer_bytes as f64 / MIB / secs, &ru, gib);
                }
            }
            let [tcp, socat, tailnet] = &got;
            weight.add(Via::Tcp, &tcp.rss, &socat.rss);
            weight.add(Via::Tailnet, &tailnet.rss, &[]);
            let what = if dir == "upload" {
                format!("raw pipe stdin → shim → TCP sink, {size}")
            } else {
                format!("raw pipe TCP source → shim → stdout, {size}")
            };
            push_transfer_rows(rows, &what, "raw, tcp://", tcp, socat);
            push_tailnet_rows(rows, &what, "raw", tailnet, tcp);
        }
    }

    /// One raw transfer of `xfer_bytes`; returns (data-phase seconds, rusage).
    fn raw_transfer(&self, upload: bool, via: Via) -> (f64, Rusage) {
        let server = if upload { &self.sink } else { &self.source };
        server.drain();
        let addr = server.addr;
        let n = self.xfer_bytes;
        let mut cmd = match via {
            Via::Tcp => self.proxy(&format!("tcp://{addr}"), "dev.coder"),
            Via::Tailnet => self.proxy(
                "tailnet",
                if upload {
                    "rawup.coder"
                } else {
                    "rawdown.coder"
                },
            ),
            Via::Socat => {
                let mut c = Command::new("socat");
                c.args(["-b", SOCAT_BUF, "-", &format!("TCP:{addr}")]);
                c
            }
        };
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn");
        let hwm = HwmSampler::start(child.id());
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (secs, count) = if upload {
            let writer = std::thread::spawn(move || write_zeros(&mut stdin, n));
            let mut sink = Vec::new();
            let _ = stdout.read_to_end(&mut sink);
            writer.join().unwrap();
            let (t0, t1, got) = server.result();
            ((t1 - t0).as_secs_f64(), got)
        } else {
            let got = count_to_eof(&mut stdout);
            let t1 = Instant::now();
            let (t0, _, _) = server.result();
            drop(stdin);
            ((t1 - t0).as_secs_f64(), got)
        };
        let mut ru = wait_rusage(&mut child);
        ru.maxrss_kib = hwm.stop();
        assert_eq!(count, n, "raw transfer moved {count} of {n} bytes");
        (secs, ru)
    }

    // ----- 4. weight -------------------------------------------------------------

    fn weight(&self, rows: &mut Vec<Row>, w: &Weight) {
        // Peak RSS of one shim over an idle session.
        const VIAS: [Via; 3] = [Via::Tcp, Via::Socat, Via::Tailnet];
        let mut got: [Vec<f64>; 3] = Default::default();
        for i in 0..self.runs.min(5) {
            for which in rotate(i, 3) {
                let rusage = self.tmp.join(format!("rusage-idle-{i}-{which}"));
                let pc = self.proxy_command(VIAS[which], Some(&rusage));
                let out = self
                    .ssh(&pc, "sleep 1")
                    .stdin(Stdio::null())
                    .output()
                    .expect("ssh");
                assert!(out.status.success(), "ssh sleep failed");
                let ru = read_rusage(&rusage);
                got[which].push(ru.maxrss_kib as f64 / 1024.0);
            }
        }
        for (which, limit) in [(0, 10.0), (2, 24.0)] {
            rows.push(Row::measured(
                "4. Weight",
                &format!(
                    "peak RSS of one shim, idle `ssh host sleep 1` ({})",
                    VIAS[which].name()
                ),
                "MiB",
                &got[which],
                "socat -b 262144",
                &got[1],
                Delta::Ratio,
                Target::AtMost(limit),
            ));
        }
        for (via, rss, limit) in [
            (Via::Tcp, &w.transfer_rss, 10.0),
            (Via::Tailnet, &w.transfer_rss_tailnet, 24.0),
        ] {
            if rss.is_empty() {
                continue;
            }
            rows.push(Row::measured(
                "4. Weight",
                &format!(
                    "peak RSS of one shim during a transfer ({}, all transfer runs)",
                    via.name()
                ),
                "MiB",
                rss,
                "socat -b 262144",
                &w.transfer_rss_base,
                Delta::Ratio,
                Target::AtMost(limit),
            ));
        }

        // N concurrent idle sessions.
        let n = self.sessions;
        let base = self.concurrent(n, Via::Socat);
        for via in [Via::Tcp, Via::Tailnet] {
            let ours = self.concurrent(n, via);
            let name = via.name();
            rows.push(Row::single(
                "4. Weight",
                &format!("{n} concurrent sessions ({name}): total RSS (PSS) of the shims"),
                &format!("{:.1} MiB ({:.1} MiB)", ours.rss_mib, ours.pss_mib),
                &format!(
                    "{n}× socat: {:.1} MiB ({:.1} MiB)",
                    base.rss_mib, base.pss_mib
                ),
                &format!("{:.1} MiB per shim", ours.rss_mib / n as f64),
            ));
            rows.push(Row::single(
                "4. Weight",
                &format!(
                    "{n} concurrent sessions ({name}): total CPU of the shims (set-up included)"
                ),
                &format!("{:.3} s", ours.cpu_s),
                &format!("{n}× socat: {:.3} s", base.cpu_s),
                &format!("{:.1} ms per shim", ours.cpu_s * 1000.0 / n as f64),
            ));
            rows.push(Row::single(
                "4. Weight",
                &format!("{n} concurrent sessions ({name}): all established (wall)"),
                &format!("{:.0} ms", ours.wall_ms),
                &format!("{n}× socat: {:.0} ms", base.wall_ms),
                "",
            ));
        }

        // Binary size.
        let size = std::fs::metadata(proxy_bin()).map(|m| m.len()).unwrap_or(0);
        let socat = which("socat")
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .unwrap_or(0);
        let mut row = Row::single(
            "4. Weight",
            "release binary size (stripped, LTO)",
            &format!("{:.2} MB", size as f64 / 1e6),
            &format!(
                "coder CLI 41–46 MB (published); socat {:.2} MB + shared libs",
                socat as f64 / 1e6
            ),
            "",
        );
        row.target = "≤ 8 MB".into();
        row.verdict = verdict(size as f64 / 1e6 <= 8.0);
        rows.push(row);
    }

    fn concurrent(&self, n: usize, via: Via) -> Totals {
        let ours = via != Via::Socat;
        let pc = self.proxy_command(via, None);
        // /proc/PID/comm: the executable's name, cut to 15 bytes.
        let comm: String = if ours {
            Path::new(proxy_bin())
                .file_name()
                .map(|n| n.to_string_lossy().chars().take(15).collect())
                .unwrap_or_default()
        } else {
            "socat".into()
        };
        let t0 = Instant::now();
        let mut kids: Vec<Child> = (0..n)
            .map(|_| {
                self.ssh(&pc, "echo ready; sleep 600")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn ssh")
            })
            .collect();
        for k in &mut kids {
            let mut line = String::new();
            let mut r = BufReader::new(k.stdout.as_mut().unwrap());
            r.read_line(&mut line).expect("read ssh stdout");
            assert_eq!(line.trim(), "ready", "a session did not come up");
        }
        let wall_ms = ms(t0.elapsed());
        std::thread::sleep(Duration::from_millis(500));
        let mut t = Totals {
            wall_ms,
            ..Default::default()
        };
        let mut found = 0;
        let mut shims = Vec::new();
        for k in &kids {
            for pid in children_of(k.id()) {
                if read_trim(&format!("/proc/{pid}/comm")) != comm {
                    continue;
                }
                found += 1;
                shims.push(pid);
                let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
                    .unwrap_or_default();
                t.rss_mib += kib_field(&rollup, "Rss:") / 1024.0;
                t.pss_mib += kib_field(&rollup, "Pss:") / 1024.0;
                t.cpu_s += proc_cpu(pid);
            }
        }
        assert_eq!(found, n, "found {found} of {n} {comm} processes");
        for k in &mut kids {
            let _ = k.kill();
        }
        for pid in &shims {
            // SAFETY: kill(2); these are our own grandchildren.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGTERM) };
        }
        for k in &mut kids {
            let _ = k.wait();
        }
        // The shims see stdin EOF and leave; give the sim time to reap.
        std::thread::sleep(Duration::from_millis(500));
        t
    }

    fn machine(&self, load_before: &str, load_after: &str) -> String {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "?".into());
        let nproc = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let mem = std::fs::read_to_string("/proc/meminfo")
            .map(|s| kib_field(&s, "MemTotal:") / MIB)
            .unwrap_or(0.0);
        let server = match self.backend {
            SshBackend::OpenSsh => format!(
                "real `{} -i` per connection ({})",
                coder_sim::sshd::SSHD_PATH,
                tool_version("ssh", &["-V"])
            ),
            SshBackend::Embedded => "embedded russh server (sshd not found)".into(),
        };
        let certs = match (
            std::env::var_os("SSL_CERT_FILE"),
            std::env::var_os("SSL_CERT_DIR"),
        ) {
            (None, None) => "unset".to_string(),
            (f, d) => format!(
                "SSL_CERT_FILE={} SSL_CERT_DIR={}",
                f.map(|v| v.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                d.map(|v| v.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
        };
        format!(
            "| | |\n|---|---|\n\
             | date | {} |\n\
             | CPU | {cpu}, {nproc} CPUs (`nproc`), {mem:.1} GiB RAM |\n\
             | kernel | {} |\n\
             | rustc | {} |\n\
             | binary under test | `{}` ({}) |\n\
             | SSH server | {server} |\n\
             | SSH client | {}, cipher `{}`, no compression |\n\
             | socat | {} (baselines use `-b {SOCAT_BUF}`) |\n\
             | CA roots env | {certs} |\n\
             | load average before / after | {load_before} / {load_after} |\n\
             | runs | {} per latency/weight row, {} per transfer row ({} each) |\n",
            utc_now(),
            read_trim("/proc/sys/kernel/osrelease"),
            tool_version("rustc", &["-V"]),
            proxy_bin().trim_start_matches(concat!(env!("CARGO_MANIFEST_DIR"), "/")),
            if std::env::var_os("CODER_PROXY_BENCH_BIN").is_some() {
                "`cargo build --release`, from scripts/bench.sh"
            } else {
                "cargo bench's own build: dev-dependency features unified in, not the shipped binary"
            },
            tool_version("ssh", &["-V"]),
            self.cipher,
            tool_version("socat", &["-V"])
                .lines()
                .find(|l| l.contains("version"))
                .unwrap_or("?")
                .trim(),
            self.runs,
            self.xfer_runs,
            human_size(self.xfer_bytes),
        )
    }
}

// ----- results ----------------------------------------------------------------

#[derive(Default)]
struct Sample {
    /// MiB/s of the data phase.
    rate: Vec<f64>,
    /// CPU seconds (user + system) of the shim per GiB moved.
    cpu: Vec<f64>,
    /// Peak RSS of the shim, MiB.
    rss: Vec<f64>,
}

impl Sample {
    fn push(&mut self, rate: f64, ru: &Rusage, gib: f64) {
        self.rate.push(rate);
        self.cpu.push(ru.cpu / gib);
        self.rss.push(ru.maxrss_kib as f64 / 1024.0);
    }
}

/// Peak RSS of the shims during transfers, per transport, and of socat.
#[derive(Default)]
struct Weight {
    transfer_rss: Vec<f64>,
    transfer_rss_base: Vec<f64>,
    transfer_rss_tailnet: Vec<f64>,
}

impl Weight {
    fn add(&mut self, via: Via, ours: &[f64], socat: &[f64]) {
        match via {
            Via::Tailnet => self.transfer_rss_tailnet.extend_from_slice(ours),
            _ => self.transfer_rss.extend_from_slice(ours),
        }
        self.transfer_rss_base.extend_from_slice(socat);
    }
}

#[derive(Default)]
struct Totals {
    rss_mib: f64,
    pss_mib: f64,
    cpu_s: f64,
    wall_ms: f64,
}

/// Tailnet rows: the rate and CPU as a ratio to coder-proxy on `tcp://`.
fn push_tailnet_rows(rows: &mut Vec<Row>, what: &str, kind: &str, tailnet: &Sample, tcp: &Sample) {
    rows.push(Row::measured(
        "3. Throughput",
        &format!("{what}, over tailnet (DERP on loopback)"),
        "MiB/s",
        &tailnet.rate,
        "coder-proxy on tcp://, same run",
        &tcp.rate,
        Delta::Ratio,
        Target::None,
    ));
    rows.push(Row::measured(
        "5. CPU per GiB",
        &format!("{what} ({kind}, tailnet)"),
        "CPU s/GiB",
        &tailnet.cpu,
        "coder-proxy on tcp://",
        &tcp.cpu,
        Delta::Ratio,
        Target::None,
    ));
}

fn push_transfer_rows(rows: &mut Vec<Row>, what: &str, path: &str, ours: &Sample, base: &Sample) {
    rows.push(Row::measured(
        "3. Throughput",
        what,
        "MiB/s",
        &ours.rate,
        "socat -b 262144, same path",
        &base.rate,
        Delta::Ratio,
        Target::RatioAtLeast(0.95),
    ));
    rows.push(Row::measured(
        "5. CPU per GiB",
        &format!("{what} ({path})"),
        "CPU s/GiB",
        &ours.cpu,
        "socat -b 262144",
        &base.cpu,
        Delta::Ratio,
        Target::None,
    ));
}

enum Delta {
    /// Show ours − baseline.
    Plus,
    /// Show ours / baseline.
    Ratio,
}

enum Target {
    None,
    AtMost(f64),
    /// ours − baseline ≤ x (medians).
    OverheadAtMost(f64),
    /// ours / baseline ≥ x (medians).
    RatioAtLeast(f64),
}

struct Row {
    section: String,
    metric: String,
    ours: String,
    base: String,
    delta: String,
    target: String,
    verdict: String,
}

impl Row {
    #[allow(clippy::too_many_arguments)]
    fn measured(
        section: &str,
        metric: &str,
        unit: &str,
        ours: &[f64],
        base_name: &str,
        base: &[f64],
        delta: Delta,
        target: Target,
    ) -> Row {
        let (m, b) = (median(ours), median(base));
        let delta_s = match (&delta, base.is_empty()) {
            (_, true) => "—".to_string(),
            (Delta::Plus, _) => format!("{:+.1} {unit}", m - b),
            (Delta::Ratio, _) => format!("{:.2}×", m / b),
        };
        let (target_s, verdict_s) = match target {
            Target::None => ("—".to_string(), "—".to_string()),
            Target::AtMost(x) => (format!("≤ {x} {unit}"), verdict(m <= x)),
            Target::OverheadAtMost(x) => (format!("≤ +{x} {unit}"), verdict(m - b <= x)),
            Target::RatioAtLeast(x) => (format!("≥ {x}×"), verdict(m / b >= x)),
        };
        Row {
            section: section.into(),
            metric: metric.into(),
            ours: stat(ours, unit),
            base: if base.is_empty() {
                base_name.to_string()
            } else {
                format!("{}: {}", base_name, stat(base, unit))
            },
            delta: delta_s,
            target: target_s,
            verdict: verdict_s,
        }
    }

    fn single(section: &str, metric: &str, ours: &str, base: &str, delta: &str) -> Row {
        Row {
            section: section.into(),
            metric: metric.into(),
            ours: ours.into(),
            base: base.into(),
            delta: if delta.is_empty() {
                "—".into()
            } else {
                delta.into()
            },
            target: "—".into(),
            verdict: "—".into(),
        }
    }
}

fn verdict(ok: bool) -> String {
    if ok { "met" } else { "**missed**" }.into()
}

fn render(rows: &[Row]) -> String {
    let mut s = String::from(
        "| | measurement | coder-proxy: median (min–max) | baseline, same run: median (min–max) | vs baseline | target | |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.section, r.metric, r.ours, r.base, r.delta, r.target, r.verdict
        ));
    }
    s
}

fn stat(v: &[f64], unit: &str) -> String {
    if v.is_empty() {
        return "—".into();
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let p = if median(v).abs() >= 100.0 {
        0
    } else if median(v).abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{:.p$} {unit} ({:.p$}–{:.p$})", median(v), min, max, p = p)
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

const BEGIN: &str = "<!-- BEGIN RESULTS (written by `cargo bench --bench suite`) -->";
const END: &str = "<!-- END RESULTS -->";

fn write_doc(path: &Path, machine: &str, table: &str, cfg: &Config) -> std::io::Result<()> {
    let partial = cfg
        .only
        .as_ref()
        .map(|o| format!("\n_Partial run: BENCH_ONLY={}._\n", o.join(",")))
        .unwrap_or_default();
    let block =
        format!("{BEGIN}\n\n### Machine\n\n{machine}\n### Results\n{partial}\n{table}\n{END}");
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{block}{}", &old[..a], &old[b + END.len()..])
        }
        _ => format!("# Performance\n\nRun `./scripts/bench.sh` to reproduce.\n\n{block}\n"),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, new)
}

// ----- process helpers --------------------------------------------------------

/// `__wrap OUT PROG ARGS...`: run PROG with our stdio, forward SIGHUP/SIGTERM/
/// SIGINT to it, and write its CPU time and peak RSS to OUT when it ends.
fn wrap(args: &[String]) -> ! {
    use std::sync::atomic::{AtomicI32, Ordering};
    static CHILD: AtomicI32 = AtomicI32::new(0);
    extern "C" fn forward(sig: libc::c_int) {
        let pid = CHILD.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill(2) is async-signal-safe.
            unsafe { libc::kill(pid, sig) };
        }
    }
    let out = &args[0];
    let child = Command::new(&args[1])
        .args(&args[2..])
        .spawn()
        .expect("wrap: spawn");
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installing a handler that only calls kill(2).
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
    let hwm = HwmSampler::start(child.id());
    let mut child = child;
    let mut ru = wait_rusage(&mut child);
    ru.maxrss_kib = hwm.stop();
    let _ = std::fs::write(out, format!("{} {} {}\n", ru.cpu, ru.maxrss_kib, ru.code));
    std::process::exit(if ru.code >= 0 { ru.code } else { 1 });
}

/// Peak RSS of a child, from its /proc/PID/status `VmHWM` polled every
/// 10 ms until it exits. Not rusage's `ru_maxrss`: that folds in the
/// parent's RSS at fork/exec time (Linux keeps the old mm's high-water mark
/// across exec), so it reports the spawner, not the shim.
struct HwmSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<i64>,
}

impl HwmSampler {
    fn start(pid: u32) -> HwmSampler {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = 0i64;
            while !flag.load(Ordering::SeqCst) {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                max = max.max(kib_field(&status, "VmHWM:") as i64);
                std::thread::sleep(Duration::from_millis(10));
            }
            max
        });
        HwmSampler { stop, thread }
    }

    /// The highest `VmHWM` seen, KiB (call after the child was reaped).
    fn stop(self) -> i64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap_or(0)
    }
}

/// A raw TCP sink (`upload`) or source of `n` bytes serving one connection
/// at a time, reporting (accepted, done, bytes) for each.
struct RawServer {
    addr: SocketAddr,
    done: std::sync::Mutex<mpsc::Receiver<(Instant, Instant, u64)>>,
}

impl RawServer {
    fn start(upload: bool, n: u64) -> RawServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { continue };
                let t0 = Instant::now();
                let moved = if upload {
                    count_to_eof(&mut s)
                } else {
                    write_zeros(&mut s, n)
                };
                drop(s);
                if tx.send((t0, Instant::now(), moved)).is_err() {
                    return;
                }
            }
        });
        RawServer {
            addr,
            done: std::sync::Mutex::new(rx),
        }
    }

    /// Forget results of earlier connections.
    fn drain(&self) {
        drain(&self.done.lock().unwrap());
    }

    /// The next connection's result.
    fn result(&self) -> (Instant, Instant, u64) {
        self.done
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(120))
            .expect("the raw server saw no transfer within 120 s")
    }
}

/// Writes `n` zero bytes (less if the reader goes away); returns how many.
fn write_zeros(w: &mut impl Write, n: u64) -> u64 {
    let buf = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        if w.write_all(&buf[..k]).is_err() {
            break;
        }
        left -= k as u64;
    }
    n - left
}

/// Reads until EOF (or an error); returns the byte count.
fn count_to_eof(r: &mut impl Read) -> u64 {
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return got,
            Ok(k) => got += k as u64,
        }
    }
}

/// A ProxyCommand line, optionally run under `__wrap`.
fn wrapped(cmd: &str, out: Option<&Path>) -> String {
    match out {
        Some(o) => format!(
            "{} __wrap {} {cmd}",
            std::env::current_exe().unwrap().display(),
            o.display()
        ),
        None => cmd.to_string(),
    }
}

#[derive(Default, Debug)]
struct Rusage {
    cpu: f64,
    maxrss_kib: i64,
    code: i32,
}

/// Reap `child` with wait4(2) for its CPU time and peak RSS.
fn wait_rusage(child: &mut Child) -> Rusage {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers for the duration of the call.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Rusage::default();
        }
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    Rusage {
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        maxrss_kib: ru.ru_maxrss,
        code,
    }
}

fn read_rusage(path: &Path) -> Rusage {
    let ok = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(path).is_ok_and(|s| s.ends_with('\n'))
    });
    assert!(ok, "no rusage written to {}", path.display());
    let s = std::fs::read_to_string(path).unwrap();
    let mut it = s.split_whitespace();
    Rusage {
        cpu: it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0),
        maxrss_kib: it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
        code: it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
    }
}

fn shell(cmd: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(format!("exec {cmd}"));
    c
}

/// Spawn with stdin held open; ms from spawn to the first stdout byte.
fn first_stdout_byte(mut cmd: Command) -> f64 {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    let mut b = [0u8; 1];
    let n = child.stdout.as_mut().unwrap().read(&mut b).unwrap_or(0);
    let v = ms(t0.elapsed());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(n, 1, "no byte on stdout");
    v
}

/// Direct children of `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = read_trim(&format!("/proc/{p}/stat"));
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        if rest.split_whitespace().nth(1).and_then(|v| v.parse().ok()) == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// CPU time of a live process, seconds: the sum of its threads'
/// /proc/PID/task/TID/schedstat (ns on CPU; threads that already exited are
/// missed), else utime + stime (10 ms ticks).
fn proc_cpu(pid: u32) -> f64 {
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        let ns: f64 = rd
            .flatten()
            .filter_map(|t| {
                read_trim(&t.path().join("schedstat").display().to_string())
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .sum();
        if ns > 0.0 {
            return ns / 1e9;
        }
    }
    let stat = read_trim(&format!("/proc/{pid}/stat"));
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm)": state=0 ... utime=11, stime=12.
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

fn kib_field(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l[name.len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn have(tool: &str) -> bool {
    which(tool).is_some()
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|f| f.is_file())
    })
}

fn tool_version(tool: &str, args: &[&str]) -> String {
    Command::new(tool)
        .args(args)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.trim().to_string()
        })
        .unwrap_or_else(|_| "?".into())
}

// ----- network helpers ----------------------------------------------------------

/// Accept connections; report when each one's first bytes arrive.
fn first_bytes_server(l: TcpListener, tx: mpsc::Sender<Instant>) {
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        let mut b = [0u8; 4096];
        if s.read(&mut b).unwrap_or(0) > 0 {
            let _ = tx.send(Instant::now());
        }
    }
}

/// Accept connections; report each accept time and close the connection.
fn accept_times(l: TcpListener, tx: mpsc::Sender<Instant>) {
    for s in l.incoming() {
        let t = Instant::now();
        drop(s);
        let _ = tx.send(t);
    }
}

/// A bare SSE client on the workspace watch stream: sends (time, contains a
/// `data` event) for every read.
fn raw_watch(api: SocketAddr, ws_id: &str, token: &str, tx: mpsc::Sender<(Instant, bool)>) {
    let mut s = TcpStream::connect(api).expect("connect to coder-sim");
    let _ = s.set_nodelay(true);
    write!(
        s,
        "GET /api/v2/workspaces/{ws_id}/watch HTTP/1.1\r\nHost: {api}\r\nCoder-Session-Token: {token}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut b = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let t = Instant::now();
                let data = b[..n].windows(11).any(|w| w == b"event: data");
                if tx.send((t, data)).is_err() {
                    return;
                }
            }
        }
    }
}

// ----- small things -------------------------------------------------------------

/// 0..n, starting at a different index each run, so no variant always
/// runs first (or right after another particular one).
fn rotate(i: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (i + k) % n)
}

fn drain<T>(rx: &mpsc::Receiver<T>) {
    while rx.try_recv().is_ok() {}
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    f()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn human_size(b: u64) -> String {
    if b >= 1 << 30 && b % (1 << 30) == 0 {
        format!("{} GiB", b >> 30)
    } else {
        format!("{} MiB", b >> 20)
    }
}

fn short_remote(dir: &str) -> &'static str {
    if dir == "upload" {
        "cat > /dev/null < FILE"
    } else {
        "cat FILE > /dev/null"
    }
}
