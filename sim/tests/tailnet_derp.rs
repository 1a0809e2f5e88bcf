//! The embedded DERP relay over real sockets (`Upgrade: DERP` and the
//! websocket `derp` fallback), the connection-info JSON that points at it,
//! the relay restart fault, and the optional second region (its own relay
//! and listener, where the agents then home).

mod tailnet_common;

use std::time::Duration;

use coder_tailnet::derp::{self, ClientOptions, DerpClient, Event, NodePrivate};
use serde_json::{json, Value};
use tailnet_common::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

async fn get(sim: &coder_sim::Sim, path: &str, token: bool) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(format!("{}{path}", sim.url()));
    if token {
        req = req.header("Coder-Session-Token", sim.token());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn connection_info_points_at_the_embedded_relay() {
    let sim = sim_with_dev().await;
    let agent = sim.agent_id("dev", "dev").unwrap();
    let (s, info) = get(
        &sim,
        &format!("/api/v2/workspaceagents/{agent}/connection"),
        true,
    )
    .await;
    assert_eq!(s, 200);
    let hp = host_port(&sim);
    let (host, port) = hp.rsplit_once(':').unwrap();
    let port: u16 = port.parse().unwrap();
    assert_eq!(
        info,
        json!({
            "derp_map": {"Regions": {"999": {
                "EmbeddedRelay": true, "RegionID": 999, "RegionCode": "coder",
                "RegionName": "Coder Embedded Relay",
                "Nodes": [{"Name": "999a", "RegionID": 999, "HostName": host,
                           "IPv4": "", "IPv6": "", "STUNPort": -1, "DERPPort": port,
                           "ForceHTTP": true}]}}},
            "derp_force_websockets": false,
            "disable_direct_connections": false,
            "hostname_suffix": "coder",
        })
    );
    // It parses as the client's model and yields the sim's own URL.
    let parsed: coder_tailnet::derpmap::ConnectionInfo = serde_json::from_value(info).unwrap();
    let target = parsed
        .derp_map
        .target(parsed.derp_map.home_region().unwrap())
        .unwrap();
    assert_eq!(target.url(), format!("{}/derp", sim.url()));

    let (s, _) = get(
        &sim,
        &format!("/api/v2/workspaceagents/{agent}/connection"),
        false,
    )
    .await;
    assert_eq!(s, 401);
    let other = uuid::Uuid::new_v4();
    let (s, _) = get(
        &sim,
        &format!("/api/v2/workspaceagents/{other}/connection"),
        true,
    )
    .await;
    assert_eq!(s, 404);

    let (s, _) = get(&sim, "/derp/latency-check", false).await;
    assert_eq!(s, 200);
    let (s, body) = get(&sim, "/derp", false).await;
    assert_eq!(s, 426, "{body}");
}

#[tokio::test]
async fn http_upgrade_and_websocket_clients_relay_to_each_other() {
    let sim = sim_with_dev().await;
    let relay = sim.derp_server();

    // Upgrade: DERP, checking the 101 headers.
    let hp = host_port(&sim);
    let tcp = TcpStream::connect(&hp).await.unwrap();
    let (up, resp) = derp::upgrade(tcp, &hp, &[]).await.expect("101");
    assert_eq!(resp.derp_version, Some(2));
    assert_eq!(resp.derp_public_key, Some(relay.public_key()));
    let a_key = NodePrivate::generate();
    let mut a = DerpClient::handshake(up, &a_key, ClientOptions::default())
        .await
        .expect("login over Upgrade: DERP");
    assert_eq!(a.server_key(), relay.public_key());
    a.note_preferred(true).await.unwrap();

    // Websocket with subprotocol `derp`.
    let (ws, proto) = ws_dial(&sim, "/derp", None, Some("derp"))
        .await
        .expect("ws");
    assert_eq!(proto.as_deref(), Some("derp"));
    let b_key = NodePrivate::generate();
    let mut b = DerpClient::handshake(ws, &b_key, ClientOptions::default())
        .await
        .expect("login over websocket");

    assert!(relay.wait_connected(&a_key.public(), true, WAIT).await);
    assert!(relay.wait_connected(&b_key.public(), true, WAIT).await);
    assert!(eventually(|| relay.is_preferred(&a_key.public()), WAIT).await);
    // The fake agent is a relay client too.
    assert_eq!(sim.derp_clients(), 3);

    a.send(&b_key.public(), b"hello b").await.unwrap();
    b.send(&a_key.public(), b"hello a").await.unwrap();
    let got_b = recv_packet(&mut b).await;
    assert_eq!(got_b, (a_key.public(), b"hello b".to_vec()));
    let got_a = recv_packet(&mut a).await;
    assert_eq!(got_a, (b_key.public(), b"hello a".to_vec()));

    // A websocket without the subprotocol is refused.
    let (s, _) = ws_dial(&sim, "/derp", None, None)
        .await
        .err()
        .expect("refused");
    assert_eq!(s, 400);
}

async fn recv_packet<S: tokio::io::AsyncRead>(
    c: &mut DerpClient<S>,
) -> (derp::NodePublic, Vec<u8>) {
    loop {
        match tokio::time::timeout(WAIT, c.recv()).await.expect("packet") {
            Ok(Event::Packet { src, data }) => return (src, data),
            Ok(_) => continue,
            Err(e) => panic!("DERP recv: {e}"),
        }
    }
}

#[tokio::test]
async fn restart_drops_everyone_and_the_agent_comes_back() {
    let sim = sim_with_dev().await;
    let relay = sim.derp_server();
    let agent_key = sim.agent_node_key("dev", "dev").unwrap();
    assert!(relay.wait_connected(&agent_key, true, WAIT).await);
    let me = NodePrivate::generate();
    let mut c = derp_http(&sim, &me).await;
    assert!(relay.wait_connected(&me.public(), true, WAIT).await);

    assert!(sim.restart_derp() >= 2);
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            if c.recv().await.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "client connection must end");
    // The in-process agent reconnects on its own; we do it by hand.
    assert!(eventually(|| relay.is_connected(&agent_key), WAIT).await);
    let _c = derp_http(&sim, &me).await;
    assert!(relay.wait_connected(&me.public(), true, WAIT).await);
    assert!(eventually(|| sim.derp_clients() == 2, Duration::from_secs(2)).await);
}

#[tokio::test]
async fn second_region_is_advertised_served_apart_and_the_agent_homes_there() {
    let sim = sim_with_dev_in_region(10001).await;
    assert_eq!(sim.agent_derp_region(), 10001);
    let agent = sim.agent_id("dev", "dev").unwrap();
    let (s, info) = get(
        &sim,
        &format!("/api/v2/workspaceagents/{agent}/connection"),
        true,
    )
    .await;
    assert_eq!(s, 200);
    let php = proxy_host_port(&sim);
    let (phost, pport) = php.rsplit_once(':').unwrap();
    let pport: u16 = pport.parse().unwrap();
    assert_ne!(php, host_port(&sim), "a listener of its own");
    assert_eq!(
        info["derp_map"]["Regions"]["10001"],
        json!({
            "EmbeddedRelay": false, "RegionID": 10001, "RegionCode": "sim-proxy",
            "RegionName": "coder-sim workspace proxy",
            "Nodes": [{"Name": "10001a", "RegionID": 10001, "HostName": phost,
                       "IPv4": "", "IPv6": "", "STUNPort": -1, "DERPPort": pport,
                       "ForceHTTP": true}]})
    );
    assert_eq!(info["derp_map"]["Regions"]["999"]["EmbeddedRelay"], true);
    // A client still homes on the embedded relay and finds the other region.
    let parsed: coder_tailnet::derpmap::ConnectionInfo = serde_json::from_value(info).unwrap();
    assert_eq!(parsed.derp_map.home_region(), Some(999));
    assert_eq!(
        Some(parsed.derp_map.target(10001).unwrap().url()),
        sim.proxy_derp_url()
    );

    // The agent's node names 10001; it is connected there (as home), not
    // on 999 (nothing to send to anyone yet).
    let node = sim.coordinator_node(agent).expect("agent node");
    assert_eq!(node.preferred_derp, 10001);
    let key = sim.agent_node_key("dev", "dev").unwrap();
    let proxy = sim.derp_region_server(10001).expect("region 10001 relay");
    let embedded = sim.derp_server();
    assert_ne!(proxy.public_key(), embedded.public_key());
    assert!(proxy.wait_connected(&key, true, WAIT).await);
    assert!(eventually(|| proxy.is_preferred(&key), WAIT).await);
    assert!(!embedded.is_connected(&key));
    assert_eq!(sim.agent_derp_regions("dev", "dev"), vec![10001]);
    assert!(sim.derp_region_server(5).is_none());

    // Its listener serves DERP (both ways in) and nothing else.
    let me = NodePrivate::generate();
    let c = derp_http_at(&php, &me).await;
    assert_eq!(c.server_key(), proxy.public_key());
    assert!(proxy.wait_connected(&me.public(), true, WAIT).await);
    assert!(!embedded.is_connected(&me.public()));
    let mut req = format!("ws://{php}/derp").into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "derp".parse().unwrap());
    let tcp = TcpStream::connect(&php).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("websocket to the region's relay");
    let you = NodePrivate::generate();
    let mut w = DerpClient::handshake(
        coder_tailnet::ws::WsStream::new(ws),
        &you,
        ClientOptions::default(),
    )
    .await
    .expect("login over websocket");
    assert_eq!(w.server_key(), proxy.public_key());
    c.send(&you.public(), b"same region").await.unwrap();
    assert_eq!(recv_packet(&mut w).await.1, b"same region".to_vec());
    let base = format!("http://{php}");
    let status = |path: &'static str| {
        let url = format!("{base}{path}");
        async move { reqwest::get(url).await.unwrap().status().as_u16() }
    };
    assert_eq!(status("/derp/latency-check").await, 200);
    assert_eq!(status("/derp").await, 426);
    assert_eq!(status("/api/v2/buildinfo").await, 404);

    // No mesh: a packet for the agent sent through 999 reaches nobody.
    let lost_before = embedded.stats().packets_unknown_dst;
    let other = NodePrivate::generate();
    let o = derp_http(&sim, &other).await;
    o.send(&key, b"wrong region").await.unwrap();
    assert!(eventually(|| embedded.stats().packets_unknown_dst > lost_before, WAIT).await);

    // A restart drops both relays' connections; the agent comes back home.
    assert!(sim.restart_derp() >= 4);
    assert!(eventually(|| !proxy.is_connected(&me.public()), WAIT).await);
    assert!(eventually(|| proxy.is_connected(&key), WAIT).await);
}
