//! The whole data path against the simulator: a client WireGuard engine
//! (Connect role, port 1) talks over the sim's DERP relay to the fake
//! agent, whose userspace TCP listener bridges to the agent's SSH endpoint
//! — first the SSH banner, then a real OpenSSH session that must survive
//! the coordinator and relay faults; and with the agent in a second DERP
//! region, Tailscale's rule (send to the peer's home region, receive on
//! your own) end to end.

mod tailnet_common;

use std::process::Stdio;
use std::time::Duration;

use coder_sim::{PeerUpdateKind, Sim};
use coder_tailnet::derp::NodePublic;
use coder_tailnet::proto::{CoordinateRequest, PeerId};
use coder_tailnet::{wg, yamux};
use sha2::{Digest, Sha256};
use tailnet_common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::net::TcpListener;

/// Everything a client holds once its tunnel to `dev.dev` is up.
struct Dialed {
    client: Client,
    agent: PeerId,
    agent_key: NodePublic,
    session: yamux::Session,
    coord: Coordinate,
    engine: wg::Handle,
    pump: Pump,
}

/// DERP first (a node is only published once it has a home relay), then
/// coordination; the engine starts on READY_FOR_HANDSHAKE.
async fn dial(sim: &Sim) -> Dialed {
    let agent_uuid = sim.agent_id("dev", "dev").unwrap();
    let agent = PeerId(agent_uuid.into_bytes());
    let client = Client::new();
    let derp = derp_http(sim, &client.private).await;
    derp.note_preferred(true).await.unwrap();

    let session = coordinate_session(sim, &agent_uuid.to_string(), None).await;
    let mut coord = Coordinate::open(&session).await;
    coord.send(CoordinateRequest::add_tunnel(agent)).await;
    coord
        .send(CoordinateRequest::update_self(client.node()))
        .await;
    let node = coord.next(coder_tailnet::proto::PeerUpdateKind::Node).await;
    let agent_key = node.node.unwrap().node_key().unwrap();
    coord
        .next(coder_tailnet::proto::PeerUpdateKind::ReadyForHandshake)
        .await;

    let (engine, outbound) = client_engine(&client, &agent_key, &agent);
    let pump = Pump::new(engine.inbound.clone(), outbound, agent_key);
    pump.attach(derp);
    Dialed {
        client,
        agent,
        agent_key,
        session,
        coord,
        engine,
        pump,
    }
}

async fn next_stream(engine: &mut wg::Handle) -> DuplexStream {
    tokio::time::timeout(Duration::from_secs(20), engine.streams.recv())
        .await
        .expect("TCP connect over WireGuard timed out")
        .expect("engine stopped")
}

#[tokio::test]
async fn ssh_banner_over_wireguard_over_derp() {
    let sim = sim_with_dev().await;
    let mut d = dial(&sim).await;
    assert_eq!(d.agent_key, sim.agent_node_key("dev", "dev").unwrap());
    let mut stream = next_stream(&mut d.engine).await;
    stream.write_all(b"SSH-2.0-tailnet-test\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(8).any(|w| w == b"SSH-2.0-") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("banner timed out")
            .unwrap();
        assert!(n > 0, "stream closed before the banner: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(eventually(|| sim.tailnet_streams("dev", "dev") == 1, WAIT).await);
    assert_eq!(
        sim.live_connections("dev", "dev"),
        1,
        "bridged to the endpoint"
    );
    drop(stream);
    assert!(
        eventually(
            || sim.tailnet_streams("dev", "dev") == 0,
            Duration::from_secs(20)
        )
        .await,
        "closing the client side ends the bridge"
    );
    let _ = (&d.client, d.agent, &d.session, &d.coord, &d.pump);
}

/// Nothing of the fake agent outlives its workspace: once a stop takes
/// effect its relay connection is gone, and so are its tasks (coordinator,
/// relay reader and writer, the WireGuard engine and its stream bridges);
/// after `shutdown` no relay connection is left at all.
#[tokio::test]
async fn a_stopped_workspace_leaves_no_agent_tasks_behind() {
    let sim = Sim::start(Default::default()).await.unwrap();
    sim.add_workspace(
        coder_sim::WorkspaceSpec::new("dev")
            .build_time(Duration::from_millis(100))
            .linger_after_stop(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    let mut d = dial(&sim).await;
    let mut stream = next_stream(&mut d.engine).await;
    stream.write_all(b"SSH-2.0-tailnet-test\r\n").await.unwrap();
    assert!(eventually(|| sim.tailnet_streams("dev", "dev") == 1, WAIT).await);
    let metrics = tokio::runtime::Handle::current().metrics();
    let during = metrics.num_alive_tasks();
    let relay = sim.derp_server();
    assert!(relay.is_connected(&d.agent_key));

    sim.stop_workspace("dev");
    assert!(
        relay.wait_connected(&d.agent_key, false, WAIT).await,
        "the stopped agent is still on the relay"
    );
    // The agent ran at least: its coordinator, relay reader, relay writer,
    // the relay's side of that connection, the engine, its forwarder and
    // acceptor, two stream bridges and the endpoint bridge.
    let dropped = eventually(|| metrics.num_alive_tasks() + 8 <= during, WAIT).await;
    eprintln!(
        "alive tasks: {during} with the agent, {} after the stop",
        metrics.num_alive_tasks()
    );
    assert!(dropped, "the agent's tasks outlived its workspace");

    drop(stream);
    sim.shutdown();
    assert!(
        eventually(|| relay.stats().current_connections == 0, WAIT).await,
        "{:?}",
        relay.stats()
    );
    let _ = (&d.client, d.agent, &d.session, &d.coord, &d.pump);
}

/// Serves one OpenSSH connection on a local port by piping it into `stream`.
async fn proxy_once(stream: DuplexStream) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        if let Ok((mut tcp, _)) = l.accept().await {
            let mut stream = stream;
            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut stream).await;
        }
    });
    port
}

fn have_ssh() -> bool {
    std::process::Command::new("ssh")
        .arg("-V")
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn openssh_session_survives_coordinator_and_relay_faults() {
    if !have_ssh() {
        eprintln!("SKIP: OpenSSH client `ssh` not installed");
        return;
    }
    let sim = sim_with_dev().await;
    let mut d = dial(&sim).await;
    let stream = next_stream(&mut d.engine).await;
    let port = proxy_once(stream).await;
    let mut child = tokio::process::Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "IdentityAgent=none",
            "-p",
            &port.to_string(),
            "127.0.0.1",
            "echo ready; read line; echo \"got $line\"; sha256sum | cut -d' ' -f1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ssh");
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), out.next_line())
        .await
        .expect("no output over the tailnet")
        .unwrap();
    assert_eq!(first.as_deref(), Some("ready"));
    assert_eq!(sim.tailnet_streams("dev", "dev"), 1);

    // Control-plane faults: the data path does not care.
    assert_eq!(sim.drop_coordinate_connections(), 1);
    tokio::time::timeout(WAIT, d.session.closed())
        .await
        .unwrap();
    sim.send_peer_update("dev", "dev", PeerUpdateKind::Lost);
    // Relay restart: both ends reconnect (the agent by itself, we by hand).
    assert!(sim.restart_derp() >= 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let derp = derp_http(&sim, &d.client.private).await;
    derp.note_preferred(true).await.unwrap();
    d.pump.attach(derp);
    assert!(
        sim.derp_server()
            .wait_connected(&d.agent_key, true, WAIT)
            .await
    );

    stdin.write_all(b"after faults\n").await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(30), out.next_line())
        .await
        .expect("session stalled after the faults")
        .unwrap();
    assert_eq!(second.as_deref(), Some("got after faults"));

    // Bulk data through the agent's engine after all that.
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let want: String = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let started = std::time::Instant::now();
    let writer = tokio::spawn(async move {
        stdin.write_all(&data).await.unwrap();
        drop(stdin);
    });
    let sum = tokio::time::timeout(Duration::from_secs(60), out.next_line())
        .await
        .expect("bulk upload stalled")
        .unwrap();
    writer.await.unwrap();
    eprintln!("16 MiB over the sim's tailnet in {:?}", started.elapsed());
    assert_eq!(sum.as_deref(), Some(want.as_str()), "bytes lost");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let _ = (d.agent, &d.coord);
}

/// The agent homes on region 10001, the client on 999: the client sends
/// through 10001 and listens on 999, the agent answers through 999 (a
/// connection it opens on demand), and the banner comes back.
#[tokio::test]
async fn agent_in_another_region_answers_on_the_clients_home() {
    let sim = sim_with_dev_in_region(10001).await;
    let agent_uuid = sim.agent_id("dev", "dev").unwrap();
    let agent = PeerId(agent_uuid.into_bytes());
    let client = Client::new();
    // Home (999): receive only.
    let home = derp_http(&sim, &client.private).await;
    home.note_preferred(true).await.unwrap();
    // The agent's home (10001): send (and receive, should it come there).
    let away = derp_http_at(&proxy_host_port(&sim), &client.private).await;

    let session = coordinate_session(&sim, &agent_uuid.to_string(), None).await;
    let mut coord = Coordinate::open(&session).await;
    coord.send(CoordinateRequest::add_tunnel(agent)).await;
    coord
        .send(CoordinateRequest::update_self(client.node()))
        .await;
    let node = coord
        .next(coder_tailnet::proto::PeerUpdateKind::Node)
        .await
        .node
        .unwrap();
    assert_eq!(node.preferred_derp, 10001);
    let agent_key = node.node_key().unwrap();
    coord
        .next(coder_tailnet::proto::PeerUpdateKind::ReadyForHandshake)
        .await;
    assert_eq!(
        sim.agent_derp_regions("dev", "dev"),
        vec![10001],
        "nothing sent yet, so no connection to 999"
    );

    let (mut engine, outbound) = client_engine(&client, &agent_key, &agent);
    let pump = Pump::new(engine.inbound.clone(), outbound, agent_key);
    pump.attach(away);
    let inbound = engine.inbound.clone();
    let (_, mut rx) = home.into_split();
    let from_home = tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok(ev) = rx.recv().await {
            if let coder_tailnet::derp::Event::Packet { src, data } = ev {
                if src == agent_key {
                    n += 1;
                    if inbound.send(data).await.is_err() {
                        break;
                    }
                }
            }
        }
        n
    });

    let mut stream = next_stream(&mut engine).await;
    stream.write_all(b"SSH-2.0-two-regions\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(8).any(|w| w == b"SSH-2.0-") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("banner timed out")
            .unwrap();
        assert!(n > 0, "stream closed before the banner: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    let by_region = sim.agent_packets_by_region("dev", "dev");
    assert!(
        by_region.get(&10001).is_some_and(|&n| n >= 2),
        "{by_region:?}"
    );
    assert!(!by_region.contains_key(&999), "{by_region:?}");
    assert_eq!(sim.agent_derp_regions("dev", "dev"), vec![999, 10001]);
    let relay = sim.derp_server();
    assert!(relay.is_connected(&agent_key));
    assert!(
        !relay.is_preferred(&agent_key),
        "999 is not the agent's home"
    );
    drop(stream);
    from_home.abort();
    let _ = (&session, &coord, &pump);
}
