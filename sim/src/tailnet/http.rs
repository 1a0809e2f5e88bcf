//! HTTP routes of the tailnet side: connection info, the coordinate
//! websocket and the embedded DERP relay (`Upgrade: DERP` and websocket
//! `derp`), with the checks and status codes coderd applies before it
//! upgrades; and [`proxy_router`], the second region's relay on its own
//! listener (the same `/derp` upgrade code, another `DerpServer`).
//!
//! axum 0.8 is built without its `ws` feature here, so upgrades are done by
//! hand: validate the request, answer `101` with the right headers, and
//! take hyper's `OnUpgrade` from the request to get the raw connection.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use coder_tailnet::derp::{DerpServer, PROTOCOL_VERSION};
use coder_tailnet::proto::PeerId;
use coder_tailnet::ws::WsStream;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_tungstenite::WebSocketStream;

use super::{peer_id, service, Tailnet, API_MINOR_MAX};
use crate::api::{ok, parse_uuid, ApiResult, S};
use crate::model;
use crate::state::{lock, Refusal, Shared};

/// `AgentConnectionInfo`.
fn connection_info_json(tn: &Tailnet) -> serde_json::Value {
    serde_json::json!({
        "derp_map": tn.derp_map_json(),
        "derp_force_websockets": tn.force_websockets.load(std::sync::atomic::Ordering::Relaxed),
        "disable_direct_connections": false,
        "hostname_suffix": "coder",
    })
}

/// `GET /api/v2/workspaceagents/{id}/connection`.
pub(crate) async fn connection_info(State(s): S, Path(id): Path<String>) -> ApiResult {
    let id = parse_uuid(&id)?;
    if lock(&s.world).find_agent(id).is_none() {
        return Err(Refusal::not_found());
    }
    ok(&connection_info_json(&s.tailnet))
}

/// `GET /api/v2/workspaceagents/connection` (Coder Connect's check).
pub(crate) async fn generic_connection_info(State(s): S) -> ApiResult {
    ok(&connection_info_json(&s.tailnet))
}

fn invalid_param(status: u16, message: &str, field: &str, detail: String) -> Refusal {
    let mut r = Refusal::new(status, message);
    r.body.validations.push(model::Validation {
        field: field.into(),
        detail,
    });
    r
}

/// Accepts `2.x` with `x` up to [`API_MINOR_MAX`], refusing anything else
/// with coderd's wording (its API version validator): a newer major or
/// minor is "behind requested ...", an older major "no longer supported"
/// (coderd defaults a missing version to `1.0`), and a string that is not
/// `MAJOR.MINOR` of integers "invalid ...".
fn check_version(v: &str) -> Result<(), Refusal> {
    let detail = match v.split('.').collect::<Vec<_>>().as_slice() {
        [major, minor] => match (major.parse::<u32>(), minor.parse::<u32>()) {
            (Err(_), _) => format!("invalid major version: {v}"),
            (_, Err(_)) => format!("invalid minor version: {v}"),
            (Ok(2), Ok(minor)) if minor <= API_MINOR_MAX => return Ok(()),
            (Ok(2), Ok(_)) => format!(
                "server is at version 2.{API_MINOR_MAX}, behind requested minor version {v}"
            ),
            (Ok(major), Ok(_)) if major > 2 => format!(
                "server is at version 2.{API_MINOR_MAX}, behind requested major version {v}"
            ),
            (Ok(_), Ok(_)) => format!("version {v} is no longer supported"),
        },
        _ => format!("invalid version string: {v}"),
    };
    Err(invalid_param(
        400,
        "Unknown or unsupported API version",
        "version",
        detail,
    ))
}

/// Whether a comma-separated header has `token` (case-insensitive).
fn has_token(h: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks a websocket handshake request; returns `Sec-WebSocket-Accept`.
fn websocket_accept(h: &HeaderMap) -> Result<String, Refusal> {
    if !has_token(h, header::CONNECTION, "upgrade") || !has_token(h, header::UPGRADE, "websocket") {
        return Err(Refusal::new(
            426,
            "WebSocket protocol violation: expected a websocket upgrade request",
        ));
    }
    if h.get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        != Some("13")
    {
        return Err(Refusal::new(
            400,
            "WebSocket protocol violation: unsupported Sec-WebSocket-Version (want 13)",
        ));
    }
    let key = h
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|v| v.as_bytes())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            Refusal::new(
                400,
                "WebSocket protocol violation: missing Sec-WebSocket-Key",
            )
        })?;
    Ok(derive_accept_key(key))
}

fn take_upgrade(req: &mut Request) -> Result<OnUpgrade, Refusal> {
    req.extensions_mut()
        .remove::<OnUpgrade>()
        .ok_or_else(|| Refusal::new(500, "sim: this connection cannot be upgraded"))
}

fn switching(headers: &[(header::HeaderName, String)]) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            resp.headers_mut().append(k.clone(), v);
        }
    }
    resp
}

fn websocket_101(accept: String, protocol: Option<&str>) -> Response {
    let mut h = vec![
        (header::UPGRADE, "websocket".to_string()),
        (header::CONNECTION, "Upgrade".to_string()),
        (header::SEC_WEBSOCKET_ACCEPT, accept),
    ];
    if let Some(p) = protocol {
        h.push((header::SEC_WEBSOCKET_PROTOCOL, p.to_string()));
    }
    switching(&h)
}

/// Waits for hyper to hand over the connection, then runs `serve` on it.
fn after_upgrade<F, Fut>(s: &Arc<Shared>, on_upgrade: OnUpgrade, what: &'static str, serve: F)
where
    F: FnOnce(TokioIo<hyper::upgrade::Upgraded>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    s.spawn(async move {
        match on_upgrade.await {
            Ok(up) => serve(TokioIo::new(up)).await,
            Err(e) => log::debug!("coder-sim: {what} upgrade failed: {e}"),
        }
    });
}

/// `GET /api/v2/workspaceagents/{id}/coordinate?version=2.x[&resume_token=T]`.
pub(crate) async fn coordinate(
    State(s): S,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    mut req: Request,
) -> ApiResult {
    let agent_id = parse_uuid(&id)?;
    if lock(&s.world).find_agent(agent_id).is_none() {
        return Err(Refusal::not_found());
    }
    let version = q
        .get("version")
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .unwrap_or("1.0");
    check_version(version)?;
    let peer: PeerId = match q.get("resume_token").filter(|t| !t.is_empty()) {
        Some(t) => s.tailnet.redeem_token(t).ok_or_else(|| {
            invalid_param(
                401,
                "Invalid resume token",
                "resume_token",
                "the token is unknown or expired".into(),
            )
        })?,
        None => PeerId::new_v4(),
    };
    let accept = websocket_accept(req.headers())?;
    let on_upgrade = take_upgrade(&mut req)?;
    let tn = s.tailnet.clone();
    let agent = peer_id(agent_id);
    after_upgrade(&s, on_upgrade, "coordinate", move |io| async move {
        service::serve_coordinate(tn, io, peer, agent).await;
    });
    Ok(websocket_101(accept, None))
}

/// `GET /derp`: the embedded relay, over `Upgrade: DERP` or a websocket
/// with subprotocol `derp`. No authentication, as in coderd.
pub(crate) async fn derp(State(s): S, req: Request) -> Response {
    let relay = s.tailnet.derp.clone();
    serve_derp(&s, relay, req)
}

/// `GET /derp` on the second region's listener: its own relay.
async fn proxy_derp(State(s): S, req: Request) -> Response {
    match s.tailnet.proxy.as_ref().map(|p| p.derp.clone()) {
        Some(relay) => serve_derp(&s, relay, req),
        None => Refusal::not_found().into_response(),
    }
}

/// The second DERP region's whole HTTP app (a workspace proxy's relay, as
/// far as a DERP client can tell): `/derp` and `/derp/latency-check`.
pub(crate) fn proxy_router(s: Arc<Shared>) -> Router {
    Router::new()
        .route("/derp", get(proxy_derp))
        .route("/derp/latency-check", get(derp_latency_check))
        .fallback(|| async { Refusal::not_found().into_response() })
        .with_state(s)
}

/// Upgrades `req` to DERP (HTTP `Upgrade: DERP` or websocket `derp`) and
/// hands the connection to `relay`.
fn serve_derp(s: &Arc<Shared>, relay: DerpServer, mut req: Request) -> Response {
    let h = req.headers();
    if has_token(h, header::UPGRADE, "websocket") {
        if !has_token(h, header::SEC_WEBSOCKET_PROTOCOL, "derp") {
            return Refusal::new(400, "DERP websocket requires subprotocol \"derp\"")
                .into_response();
        }
        let accept = match websocket_accept(h) {
            Ok(a) => a,
            Err(r) => return r.into_response(),
        };
        let on_upgrade = match take_upgrade(&mut req) {
            Ok(u) => u,
            Err(r) => return r.into_response(),
        };
        let derp = relay;
        after_upgrade(s, on_upgrade, "DERP websocket", move |io| async move {
            let ws = WebSocketStream::from_raw_socket(io, WsRole::Server, None).await;
            if let Err(e) = derp.accept(WsStream::new(ws)).await {
                log::debug!("coder-sim: DERP websocket connection ended: {e}");
            }
        });
        return websocket_101(accept, Some("derp"));
    }
    if has_token(h, header::UPGRADE, "derp") {
        let on_upgrade = match take_upgrade(&mut req) {
            Ok(u) => u,
            Err(r) => return r.into_response(),
        };
        let derp = relay;
        let key = derp.public_key().to_untyped_hex();
        after_upgrade(s, on_upgrade, "DERP", move |io| async move {
            if let Err(e) = derp.accept(io).await {
                log::debug!("coder-sim: DERP connection ended: {e}");
            }
        });
        return switching(&[
            (header::UPGRADE, "DERP".to_string()),
            (header::CONNECTION, "Upgrade".to_string()),
            (
                header::HeaderName::from_static("derp-version"),
                PROTOCOL_VERSION.to_string(),
            ),
            (header::HeaderName::from_static("derp-public-key"), key),
        ]);
    }
    (
        StatusCode::UPGRADE_REQUIRED,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "DERP requires connection upgrade",
    )
        .into_response()
}

/// `GET /derp/latency-check`.
pub(crate) async fn derp_latency_check() -> StatusCode {
    StatusCode::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(check_version("2.0").is_ok());
        assert!(check_version("2.10").is_ok());
        // The details real coderd (v2.36.1, tailnet API 2.10) gives.
        for (bad, detail) in [
            ("1.0", "version 1.0 is no longer supported"),
            (
                "2.99",
                "server is at version 2.10, behind requested minor version 2.99",
            ),
            (
                "3.0",
                "server is at version 2.10, behind requested major version 3.0",
            ),
            ("two", "invalid version string: two"),
            ("2", "invalid version string: 2"),
            ("x.1", "invalid major version: x.1"),
        ] {
            let r = check_version(bad).unwrap_err();
            assert_eq!(r.status, 400);
            assert_eq!(r.body.message, "Unknown or unsupported API version");
            assert_eq!(r.body.validations[0].field, "version");
            assert_eq!(r.body.validations[0].detail, detail);
        }
    }
}
