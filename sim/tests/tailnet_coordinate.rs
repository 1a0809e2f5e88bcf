//! The coordinate endpoint and the tailnet dRPC API, driven by a client
//! built from coder-tailnet's pieces over a real websocket: status codes
//! before the upgrade, node exchange and READY_FOR_HANDSHAKE, resume
//! tokens, the DERP map stream, and the coordinator fault hooks.

mod tailnet_common;

use std::time::{Duration, Instant};

use coder_sim::PeerUpdateKind;
use coder_tailnet::addr;
use coder_tailnet::drpc;
use coder_tailnet::proto::{method, CoordinateRequest, DerpMap, PeerId, StreamDerpMapsRequest};
use prost::Message;
use tailnet_common::*;

#[tokio::test]
async fn refusals_before_the_upgrade() {
    let sim = sim_with_dev().await;
    let agent = sim.agent_id("dev", "dev").unwrap().to_string();
    let token = sim.token();

    let (s, body) = ws_dial(
        &sim,
        &coordinate_path(&agent, Some("2.0"), None),
        None,
        None,
    )
    .await
    .err()
    .expect("no token must be refused");
    assert_eq!(s, 401, "{body}");

    for version in [None, Some("1.0"), Some("3.0"), Some("2.99")] {
        let (s, body) = ws_dial(
            &sim,
            &coordinate_path(&agent, version, None),
            Some(&token),
            None,
        )
        .await
        .err()
        .expect("bad version must be refused");
        assert_eq!(s, 400, "{version:?}: {body}");
        assert_eq!(body["message"], "Unknown or unsupported API version");
        assert_eq!(body["validations"][0]["field"], "version");
    }

    let other = uuid::Uuid::new_v4().to_string();
    let (s, _) = ws_dial(
        &sim,
        &coordinate_path(&other, Some("2.0"), None),
        Some(&token),
        None,
    )
    .await
    .err()
    .expect("unknown agent");
    assert_eq!(s, 404);

    let (s, body) = ws_dial(
        &sim,
        &coordinate_path(&agent, Some("2.0"), Some("not-a-token")),
        Some(&token),
        None,
    )
    .await
    .err()
    .expect("bad resume token");
    assert_eq!(s, 401);
    assert_eq!(body["message"], "Invalid resume token");
    assert_eq!(body["validations"][0]["field"], "resume_token");
    assert_eq!(sim.coordinate_connections(), 0);
}

#[tokio::test]
async fn node_exchange_and_ready_for_handshake() {
    let sim = sim_with_dev().await;
    let agent_uuid = sim.agent_id("dev", "dev").unwrap();
    let agent = PeerId(agent_uuid.into_bytes());
    let session = coordinate_session(&sim, &agent_uuid.to_string(), None).await;
    let me = refresh_token(&session).await.peer_id().unwrap().unwrap();
    let client = Client::new();
    let mut coord = Coordinate::open(&session).await;
    coord.send(CoordinateRequest::add_tunnel(agent)).await;
    coord
        .send(CoordinateRequest::update_self(client.node()))
        .await;

    let node = coord.next(PeerUpdateKind::Node).await;
    assert_eq!(node.peer_id().unwrap(), agent);
    let n = node.node.expect("NODE carries the node");
    assert_eq!(
        n.node_key().unwrap(),
        sim.agent_node_key("dev", "dev").unwrap()
    );
    assert!(n.disco_key().is_ok(), "{}", n.disco);
    assert_eq!(n.preferred_derp, 999);
    assert_eq!(n.addresses, addr::agent_prefixes(&agent).to_vec());
    assert_eq!(n.id, addr::node_id(&agent));

    let rfh = coord.next(PeerUpdateKind::ReadyForHandshake).await;
    assert_eq!(rfh.peer_id().unwrap(), agent);
    assert!(rfh.node.is_none(), "only NODE carries a node");

    assert_eq!(sim.coordinate_connections(), 1);
    let me_uuid = uuid::Uuid::from_bytes(me.0);
    assert_eq!(sim.tailnet_clients("dev", "dev"), vec![me_uuid]);
    assert_eq!(
        sim.coordinator_node(me_uuid).unwrap().node_key().unwrap(),
        client.private.public()
    );
    assert!(
        eventually(
            || sim.agent_engine_keys("dev", "dev") == vec![client.private.public()],
            WAIT
        )
        .await
    );
    let rpcs = sim.tailnet_rpcs();
    assert!(rpcs.contains(&method::COORDINATE.to_string()), "{rpcs:?}");

    // A tunnel to another agent is refused and ends the stream.
    coord
        .send(CoordinateRequest::add_tunnel(PeerId::new_v4()))
        .await;
    loop {
        match coord.recv().await {
            Some(r) if !r.error.is_empty() => {
                assert!(r.error.contains("invalid agent id"), "{}", r.error);
            }
            Some(_) => continue,
            None => break,
        }
    }
}

#[tokio::test]
async fn resume_token_keeps_the_peer_id() {
    let sim = sim_with_dev().await;
    let agent = sim.agent_id("dev", "dev").unwrap().to_string();
    let s1 = coordinate_session(&sim, &agent, None).await;
    let r1 = refresh_token(&s1).await;
    let p1 = r1.peer_id().unwrap().unwrap();
    assert!(!r1.token.is_empty());
    assert_eq!(r1.refresh_in.unwrap().seconds, 12 * 3600);
    assert!(r1.expires_at.is_some());
    assert_eq!(
        sim.coordinate_peers("dev", "dev"),
        vec![uuid::Uuid::from_bytes(p1.0)]
    );
    s1.close().await;
    assert!(eventually(|| sim.coordinate_connections() == 0, WAIT).await);

    let s2 = coordinate_session(&sim, &agent, Some(&r1.token)).await;
    let r2 = refresh_token(&s2).await;
    assert_eq!(r2.peer_id().unwrap().unwrap(), p1, "resumed peer id");

    let s3 = coordinate_session(&sim, &agent, None).await;
    let r3 = refresh_token(&s3).await;
    assert_ne!(
        r3.peer_id().unwrap().unwrap(),
        p1,
        "fresh peer id without a token"
    );
}

#[tokio::test]
async fn derp_map_stream_and_unimplemented() {
    let sim = sim_with_dev().await;
    let agent = sim.agent_id("dev", "dev").unwrap().to_string();
    let session = coordinate_session(&sim, &agent, None).await;
    let stream = session.open().await.unwrap();
    let mut maps = drpc::server_stream(
        stream,
        method::STREAM_DERP_MAPS,
        &StreamDerpMapsRequest {}.encode_to_vec(),
    )
    .await
    .unwrap();
    let first = tokio::time::timeout(WAIT, maps.recv())
        .await
        .unwrap()
        .unwrap()
        .expect("a map");
    let map = DerpMap::decode(first.as_slice()).unwrap();
    let region = &map.regions[&999];
    assert!(region.embedded_relay);
    assert_eq!(region.region_code, "coder");
    let node = &region.nodes[0];
    assert_eq!(node.name, "999a");
    assert!(node.force_http);
    assert_eq!(node.stun_port, -1);
    let port: i32 = host_port(&sim).rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(node.derp_port, port);
    // The stream stays open.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), maps.recv())
            .await
            .is_err()
    );

    let err = drpc::unary_on(&session, "/coder.tailnet.v2.Tailnet/WorkspaceUpdates", &[])
        .await
        .unwrap_err();
    assert!(err.is_unimplemented(), "{err}");
    assert_eq!(err.code(), Some(12));
    // The session still works after a refused call.
    refresh_token(&session).await;
}

#[tokio::test]
async fn dropped_websocket_means_lost_for_the_agent_and_redial_works() {
    let sim = sim_with_dev().await;
    let agent_uuid = sim.agent_id("dev", "dev").unwrap();
    let agent = PeerId(agent_uuid.into_bytes());
    let session = coordinate_session(&sim, &agent_uuid.to_string(), None).await;
    let token = refresh_token(&session).await;
    let me = uuid::Uuid::from_bytes(token.peer_id().unwrap().unwrap().0);
    let mut coord = Coordinate::open(&session).await;
    coord.send(CoordinateRequest::add_tunnel(agent)).await;
    coord
        .send(CoordinateRequest::update_self(Client::new().node()))
        .await;
    coord.next(PeerUpdateKind::ReadyForHandshake).await;

    assert_eq!(sim.drop_coordinate_connections(), 1);
    tokio::time::timeout(WAIT, session.closed())
        .await
        .expect("session ends");
    assert!(eventually(|| sim.coordinate_connections() == 0, WAIT).await);
    assert!(eventually(|| !sim.coordinator_peers().contains(&me), WAIT).await);

    // Redial with the token: same peer id, the node exchange starts over.
    let session = coordinate_session(&sim, &agent_uuid.to_string(), Some(&token.token)).await;
    let mut coord = Coordinate::open(&session).await;
    coord.send(CoordinateRequest::add_tunnel(agent)).await;
    coord
        .send(CoordinateRequest::update_self(Client::new().node()))
        .await;
    coord.next(PeerUpdateKind::Node).await;
    coord.next(PeerUpdateKind::ReadyForHandshake).await;
    assert_eq!(sim.tailnet_clients("dev", "dev"), vec![me]);
}

#[tokio::test]
async fn injected_lost_disconnected_and_graceful_disconnect() {
    let sim = sim_with_dev().await;
    let agent_uuid = sim.agent_id("dev", "dev").unwrap();
    let agent = PeerId(agent_uuid.into_bytes());
    let session = coordinate_session(&sim, &agent_uuid.to_string(), None).await;
    let mut coord = Coordinate::open(&session).await;
    coord.send(CoordinateRequest::add_tunnel(agent)).await;
    coord
        .send(CoordinateRequest::update_self(Client::new().node()))
        .await;
    coord.next(PeerUpdateKind::ReadyForHandshake).await;

    assert_eq!(sim.send_peer_update("dev", "dev", PeerUpdateKind::Lost), 1);
    let lost = coord.next(PeerUpdateKind::Lost).await;
    assert_eq!(lost.peer_id().unwrap(), agent);
    assert!(lost.node.is_none());
    assert_eq!(
        sim.send_peer_update("dev", "dev", PeerUpdateKind::Disconnected),
        1
    );
    coord.next(PeerUpdateKind::Disconnected).await;
    // The agent itself is untouched: a node update brings it back.
    coord
        .send(CoordinateRequest::update_self(Client::new().node()))
        .await;
    coord.next(PeerUpdateKind::ReadyForHandshake).await;

    // Graceful disconnect: the server hangs up the call.
    coord.send(CoordinateRequest::disconnect()).await;
    while coord.recv().await.is_some() {}
    assert!(eventually(|| sim.tailnet_clients("dev", "dev").is_empty(), WAIT).await);
}

#[tokio::test]
async fn ready_for_handshake_delay_and_withholding() {
    let sim = sim_with_dev().await;
    let agent_uuid = sim.agent_id("dev", "dev").unwrap();
    let agent = PeerId(agent_uuid.into_bytes());
    sim.set_ready_for_handshake_delay(Some(Duration::from_millis(1500)));
    let session = coordinate_session(&sim, &agent_uuid.to_string(), None).await;
    let mut coord = Coordinate::open(&session).await;
    coord.send(CoordinateRequest::add_tunnel(agent)).await;
    let sent = Instant::now();
    coord
        .send(CoordinateRequest::update_self(Client::new().node()))
        .await;
    coord.next(PeerUpdateKind::Node).await;
    coord.next(PeerUpdateKind::ReadyForHandshake).await;
    assert!(
        sent.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        sent.elapsed()
    );

    sim.set_ready_for_handshake_delay(None);
    coord
        .send(CoordinateRequest::update_self(Client::new().node()))
        .await;
    assert!(coord
        .next_within(PeerUpdateKind::ReadyForHandshake, Duration::from_secs(1))
        .await
        .is_none());
    sim.set_ready_for_handshake_delay(Some(Duration::ZERO));
    coord
        .send(CoordinateRequest::update_self(Client::new().node()))
        .await;
    coord.next(PeerUpdateKind::ReadyForHandshake).await;
}

#[tokio::test]
async fn stop_disconnects_the_agent_and_start_brings_a_new_one() {
    let sim = coder_sim::Sim::start(Default::default()).await.unwrap();
    sim.add_workspace(
        coder_sim::WorkspaceSpec::new("dev").linger_after_stop(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    let agent_uuid = sim.agent_id("dev", "dev").unwrap();
    let agent = PeerId(agent_uuid.into_bytes());
    let session = coordinate_session(&sim, &agent_uuid.to_string(), None).await;
    let mut coord = Coordinate::open(&session).await;
    coord.send(CoordinateRequest::add_tunnel(agent)).await;
    coord
        .send(CoordinateRequest::update_self(Client::new().node()))
        .await;
    coord.next(PeerUpdateKind::ReadyForHandshake).await;

    sim.stop_workspace("dev");
    let gone = coord.next(PeerUpdateKind::Disconnected).await;
    assert_eq!(gone.peer_id().unwrap(), agent);
    assert!(sim.agent_node_key("dev", "dev").is_none());

    sim.start_workspace("dev");
    assert!(eventually(|| sim.agent_node_key("dev", "dev").is_some(), WAIT).await);
    assert_ne!(
        sim.agent_id("dev", "dev").unwrap(),
        agent_uuid,
        "a new build, a new agent"
    );
}
