//! The coderd REST API surface the simulator serves (axum routes).
//!
//! One middleware in front of every route logs the request, applies the
//! injected [`ApiFault`] and checks the session token; the handlers only
//! read or change the [`World`](crate::state::World) and render codersdk
//! JSON. Errors are always Coder's `{"message","detail"}` JSON.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use uuid::Uuid;

use crate::model;
use crate::spec::{ApiFault, LoggedRequest};
use crate::state::{lock, Refusal, Shared};
use crate::tailnet::http as tailnet;

pub(crate) type S = State<Arc<Shared>>;
pub(crate) type ApiResult = Result<Response, Refusal>;

/// The whole HTTP app.
pub(crate) fn router(s: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v2/buildinfo", get(buildinfo))
        .route("/api/v2/users/{user}", get(user))
        .route(
            "/api/v2/users/{user}/workspace/{name}",
            get(workspace_by_name),
        )
        .route("/api/v2/workspaces/{id}", get(workspace_by_id))
        .route("/api/v2/workspaces/{id}/watch", get(watch))
        .route("/api/v2/workspaces/{id}/builds", post(create_build))
        .route("/api/v2/workspaces/{id}/dormant", put(dormant))
        .route("/api/v2/workspaces/{id}/usage", post(usage))
        .route("/api/v2/workspacebuilds/{id}", get(build))
        .route("/api/v2/workspacebuilds/{id}/logs", get(build_logs))
        .route(
            "/api/v2/workspacebuilds/{id}/parameters",
            get(build_parameters),
        )
        .route(
            "/api/v2/workspaceagents/connection",
            get(tailnet::generic_connection_info),
        )
        .route("/api/v2/workspaceagents/{id}", get(agent))
        .route(
            "/api/v2/workspaceagents/{id}/connection",
            get(tailnet::connection_info),
        )
        .route(
            "/api/v2/workspaceagents/{id}/coordinate",
            get(tailnet::coordinate),
        )
        .route("/derp", get(tailnet::derp))
        .route("/derp/latency-check", get(tailnet::derp_latency_check))
        .route("/api/v2/workspaceagents/{id}/logs", get(agent_logs))
        .route("/api/v2/templateversions/{id}", get(template_version))
        .route("/api/v2/deployment/ssh", get(deployment_ssh))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(s.clone(), gate))
        .with_state(s)
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        json(self.status, &self.body)
    }
}

/// JSON the way coderd writes it (`json.Encoder`: trailing newline).
fn json<T: Serialize>(status: u16, v: &T) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match serde_json::to_vec(v) {
        Ok(mut body) => {
            body.push(b'\n');
            (
                status,
                [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
                body,
            )
                .into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

pub(crate) fn ok<T: Serialize>(v: &T) -> ApiResult {
    Ok(json(200, v))
}

pub(crate) fn parse_uuid(s: &str) -> Result<Uuid, Refusal> {
    Uuid::parse_str(s)
        .map_err(|e| Refusal::new(400, format!("Invalid UUID {s:?}.")).detail(e.to_string()))
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Refusal> {
    serde_json::from_slice(body)
        .map_err(|e| Refusal::new(400, "Request body must be valid JSON.").detail(e.to_string()))
}

fn authorized(s: &Shared, headers: &HeaderMap) -> Result<(), Refusal> {
    let header = headers
        .get("Coder-Session-Token")
        .and_then(|v| v.to_str().ok());
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("coder_session_token="));
    match header.or(cookie) {
        Some(t) if t == s.token => Ok(()),
        Some(_) => Err(
            Refusal::new(401, "You must be authenticated to access this resource.")
                .detail("API key is invalid or expired."),
        ),
        None => Err(
            Refusal::new(401, "You must be authenticated to access this resource.").detail(
                "Cookie \"coder_session_token\" or header \"Coder-Session-Token\" must be provided.",
            ),
        ),
    }
}

/// Logs every request, applies faults and auth to `/api/v2`.
async fn gate(State(s): S, req: Request, next: Next) -> Response {
    let entry = LoggedRequest {
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| req.uri().path().to_string()),
        status: 0,
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    let index = {
        let mut log = lock(&s.requests);
        log.push(entry);
        log.len() - 1
    };
    let path = req.uri().path();
    let route_fault = route_fault(&s, req.method().as_str(), path);
    let response = if let Some(status) = route_fault {
        lb_error_page(status)
    } else if path == "/api/v2" || path.starts_with("/api/v2/") {
        let fault = *lock(&s.fault);
        match fault {
            ApiFault::Hang => std::future::pending::<Response>().await,
            ApiFault::Status(code) => Refusal::new(code, "sim: injected fault")
                .detail(format!(
                    "the simulator answers every API request with {code}"
                ))
                .into_response(),
            ApiFault::NonJson => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                "<!DOCTYPE html><html><head><title>Sign in</title></head>\
                 <body><h1>sim: this is not JSON</h1></body></html>\n",
            )
                .into_response(),
            ApiFault::None => {
                let auth = if path == "/api/v2/buildinfo" {
                    Ok(())
                } else {
                    authorized(&s, req.headers())
                };
                match auth {
                    Ok(()) => next.run(req).await,
                    Err(r) => r.into_response(),
                }
            }
        }
    } else {
        next.run(req).await
    };
    if let Some(e) = lock(&s.requests).get_mut(index) {
        e.status = response.status().as_u16();
    }
    response
}

/// The status a live [`Shared::route_faults`] entry gives `path`, if any.
fn route_fault(s: &Shared, method: &str, path: &str) -> Option<u16> {
    let mut faults = lock(&s.route_faults);
    let now = std::time::Instant::now();
    faults.retain(|(_, _, until)| *until > now);
    faults
        .iter()
        .find(|(route, _, _)| route.matches(method, path))
        .map(|(_, status, _)| *status)
}

/// What nginx in front of a restarting coderd answers: HTML, not Coder JSON.
fn lb_error_page(status: u16) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let title = format!(
        "{} {}",
        code.as_u16(),
        code.canonical_reason().unwrap_or("Error")
    );
    (
        code,
        [(header::CONTENT_TYPE, "text/html")],
        format!(
            "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
        ),
    )
        .into_response()
}

async fn not_found() -> Response {
    Refusal::new(404, "Route not found.").into_response()
}

async fn buildinfo(State(s): S) -> ApiResult {
    ok(&serde_json::json!({
        "external_url": "https://github.com/coder/coder",
        "version": "v2.99.0-sim",
        "dashboard_url": s.url,
        "workspace_proxy": false,
        "agent_api_version": "2.0",
        "provisioner_api_version": "1.4",
        "upgrade_message": "",
        "deployment_id": s.deployment_id,
        "webpush_public_key": "",
        "telemetry": false,
    }))
}

fn resolve_user(s: &Shared, user: &str) -> String {
    if user == "me" {
        s.owner.clone()
    } else {
        user.to_string()
    }
}

async fn user(State(s): S, Path(user): Path<String>) -> ApiResult {
    let name = resolve_user(&s, &user);
    let mut w = lock(&s.world);
    let known = w
        .users
        .iter()
        .any(|u| u.name == name || u.id.to_string() == name);
    if !known && name != s.owner {
        return Err(Refusal::not_found());
    }
    let id = w.user_id(&name);
    let org = w.org_id;
    ok(&serde_json::json!({
        "id": id,
        "username": name,
        "name": "",
        "email": format!("{name}@example.com"),
        "created_at": chrono::Utc::now(),
        "updated_at": chrono::Utc::now(),
        "last_seen_at": chrono::Utc::now(),
        "status": "active",
        "login_type": "password",
        "theme_preference": "",
        "organization_ids": [org],
        "roles": [],
        "avatar_url": "",
    }))
}

async fn workspace_by_name(
    State(s): S,
    Path((user, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let owner = resolve_user(&s, &user);
    let include_deleted = q.get("include_deleted").is_some_and(|v| v == "true");
    let w = lock(&s.world);
    let i = w
        .ws_by_owner_name(&owner, &name, include_deleted)
        .ok_or_else(Refusal::not_found)?;
    ok(&w.render_workspace(i).ok_or_else(Refusal::not_found)?)
}

async fn workspace_by_id(
    State(s): S,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let id = parse_uuid(&id)?;
    let w = lock(&s.world);
    let i = w.ws_by_id(id).ok_or_else(Refusal::not_found)?;
    let include_deleted = q.get("include_deleted").is_some_and(|v| v == "true");
    if w.workspaces[i].deleted && !include_deleted {
        return Err(Refusal::new(
            410,
            format!(
                "Workspace {id:?} was deleted, you can view this workspace by specifying '?include_deleted=true' and trying again."
            ),
        ));
    }
    ok(&w.render_workspace(i).ok_or_else(Refusal::not_found)?)
}

/// Decrements the subscriber count when a watch stream's task ends.
struct WatcherGuard(Arc<Shared>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::SeqCst);
    }
}

fn data_frame(s: &Shared, ws_id: Uuid) -> Option<Bytes> {
    let w = lock(&s.world);
    let ws = w.render_workspace(w.ws_by_id(ws_id)?)?;
    let mut frame = b"event: data\ndata: ".to_vec();
    serde_json::to_writer(&mut frame, &ws).ok()?;
    frame.extend_from_slice(b"\n\n");
    Some(Bytes::from(frame))
}

/// The previous build shown as stopped, as a data frame (the stale-replay fault).
fn stale_stop_frame(s: &Shared, ws_id: Uuid) -> Option<Bytes> {
    let w = lock(&s.world);
    let ws = w.render_previous_as_stopped(w.ws_by_id(ws_id)?)?;
    let mut frame = b"event: data\ndata: ".to_vec();
    serde_json::to_writer(&mut frame, &ws).ok()?;
    frame.extend_from_slice(b"\n\n");
    Some(Bytes::from(frame))
}

/// Pause between the stale replay and the current snapshot.
const STALE_REPLAY_GAP: Duration = Duration::from_millis(500);

const PING: &[u8] = b"event: ping\n\n";

/// `GET /workspaces/{id}/watch`: Server-Sent Events as coderd frames them.
async fn watch(State(s): S, Path(id): Path<String>) -> ApiResult {
    let id = parse_uuid(&id)?;
    if lock(&s.world).ws_by_id(id).is_none() {
        return Err(Refusal::not_found());
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(64);
    // Subscribe before rendering the first frame so no change is missed.
    let mut events = s.events.subscribe();
    let mut cut = s.cut.subscribe();
    s.watchers.fetch_add(1, Ordering::SeqCst);
    let guard = WatcherGuard(s.clone());
    let heartbeat = s.opts.heartbeat.max(Duration::from_millis(10));
    let stale_first = s.watch_replay_stale.load(Ordering::SeqCst);
    let me = s.clone();
    s.spawn(async move {
        let _guard = guard;
        if tx.send(Ok(Bytes::from_static(PING))).await.is_err() {
            return;
        }
        if stale_first {
            if let Some(frame) = stale_stop_frame(&me, id) {
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
                me.stale_replays[0].fetch_add(1, Ordering::SeqCst);
                // Long enough for a client to act on the stale snapshot
                // before the current one replaces it.
                tokio::time::sleep(STALE_REPLAY_GAP).await;
            }
        }
        if let Some(frame) = data_frame(&me, id) {
            if tx.send(Ok(frame)).await.is_err() {
                return;
            }
            if stale_first {
                me.stale_replays[1].fetch_add(1, Ordering::SeqCst);
            }
        }
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        loop {
            let frame = tokio::select! {
                _ = cut.changed() => {
                    // An error item makes hyper drop the connection without
                    // the final chunk: the client sees a broken stream.
                    let _ = tx.send(Err(io::Error::other("sim: watch stream cut"))).await;
                    return;
                }
                _ = tx.closed() => return,
                _ = ticker.tick() => Some(Bytes::from_static(PING)),
                ev = events.recv() => match ev {
                    Ok(ws) if ws == id => data_frame(&me, id),
                    Ok(_) => None,
                    Err(broadcast::error::RecvError::Lagged(_)) => data_frame(&me, id),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if let Some(frame) = frame {
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("X-Accel-Buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

async fn create_build(State(s): S, Path(id): Path<String>, body: Bytes) -> ApiResult {
    let id = parse_uuid(&id)?;
    let req: model::CreateBuildRequest = parse_body(&body)?;
    if s.race_next_build
        .swap(false, std::sync::atomic::Ordering::SeqCst)
    {
        let name = {
            let w = lock(&s.world);
            w.ws_by_id(id).map(|i| w.workspaces[i].name.clone())
        };
        if let Some(name) = name {
            s.scripted_build(&name, crate::model::Transition::Start, "autostart");
        }
    }
    let build = s.api_build(id, req)?;
    Ok(json(201, &build))
}

async fn dormant(State(s): S, Path(id): Path<String>, body: Bytes) -> ApiResult {
    let id = parse_uuid(&id)?;
    let req: model::DormancyRequest = parse_body(&body)?;
    let rendered = {
        let mut w = lock(&s.world);
        let i = w.ws_by_id(id).ok_or_else(Refusal::not_found)?;
        let now = chrono::Utc::now();
        let ws = &mut w.workspaces[i];
        ws.dormant_at = if req.dormant {
            Some(ws.dormant_at.unwrap_or(now))
        } else {
            None
        };
        ws.updated_at = now;
        w.render_workspace(i).ok_or_else(Refusal::not_found)?
    };
    s.publish(id);
    ok(&rendered)
}

async fn usage(State(s): S, Path(id): Path<String>, body: Bytes) -> ApiResult {
    let id = parse_uuid(&id)?;
    let req: model::UsageRequest = if body.is_empty() {
        model::UsageRequest::default()
    } else {
        parse_body(&body)?
    };
    let mut w = lock(&s.world);
    let i = w.ws_by_id(id).ok_or_else(Refusal::not_found)?;
    if !matches!(
        req.app_name.as_str(),
        "" | "ssh" | "vscode" | "jetbrains" | "reconnecting-pty"
    ) {
        return Err(Refusal::new(400, "Invalid request").detail(format!(
            "app_name must be one of [vscode jetbrains reconnecting-pty ssh], got {:?}",
            req.app_name
        )));
    }
    let ws = &mut w.workspaces[i];
    ws.usage += 1;
    ws.last_used_at = chrono::Utc::now();
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn build(State(s): S, Path(id): Path<String>) -> ApiResult {
    let id = parse_uuid(&id)?;
    let w = lock(&s.world);
    let b = w.builds.get(&id).ok_or_else(Refusal::not_found)?;
    ok(&w.render_build(b).ok_or_else(Refusal::not_found)?)
}

fn after(q: &HashMap<String, String>) -> Result<i64, Refusal> {
    match q.get("after") {
        None => Ok(0),
        Some(v) if v.is_empty() => Ok(0),
        Some(v) => v.parse().map_err(|_| {
            Refusal::new(400, "Query param \"after\" must be an integer.")
                .detail(format!("got {v:?}"))
        }),
    }
}

async fn build_logs(
    State(s): S,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let id = parse_uuid(&id)?;
    let after = after(&q)?;
    let w = lock(&s.world);
    let b = w.builds.get(&id).ok_or_else(Refusal::not_found)?;
    let logs: Vec<_> = b.logs.iter().filter(|l| l.id > after).collect();
    ok(&logs)
}

async fn build_parameters(State(s): S, Path(id): Path<String>) -> ApiResult {
    let id = parse_uuid(&id)?;
    let w = lock(&s.world);
    let b = w.builds.get(&id).ok_or_else(Refusal::not_found)?;
    ok(&b.params)
}

async fn agent(State(s): S, Path(id): Path<String>) -> ApiResult {
    let id = parse_uuid(&id)?;
    let w = lock(&s.world);
    let (b, a) = w.find_agent(id).ok_or_else(Refusal::not_found)?;
    ok(&w.render_agent(b, a))
}

async fn agent_logs(
    State(s): S,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let id = parse_uuid(&id)?;
    let after = after(&q)?;
    if q.contains_key("follow") {
        return Err(Refusal::new(
            400,
            "sim: following agent logs (WebSocket) is not simulated; poll without ?follow",
        ));
    }
    let w = lock(&s.world);
    let (_, a) = w.find_agent(id).ok_or_else(Refusal::not_found)?;
    let logs: Vec<_> = a.logs.iter().filter(|l| l.id > after).collect();
    ok(&logs)
}

async fn template_version(State(s): S, Path(id): Path<String>) -> ApiResult {
    let id = parse_uuid(&id)?;
    let w = lock(&s.world);
    let name = if id == w.active_version {
        "v2-sim"
    } else if id == w.old_version {
        "v1-sim"
    } else {
        return Err(Refusal::not_found());
    };
    ok(&serde_json::json!({
        "id": id,
        "template_id": w.template_id,
        "organization_id": w.org_id,
        "name": name,
        "message": "",
        "readme": "",
        "archived": false,
        "warnings": [],
        "created_at": chrono::Utc::now(),
        "updated_at": chrono::Utc::now(),
    }))
}

async fn deployment_ssh() -> ApiResult {
    ok(&serde_json::json!({
        "hostname_prefix": "coder.",
        "hostname_suffix": "coder",
        "ssh_config_options": {},
    }))
}
