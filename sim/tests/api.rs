//! The simulator's REST API and watch stream, driven over HTTP the way
//! coder-proxy drives it.

use std::time::{Duration, Instant};

use coder_sim::{
    AgentSpec, AgentStatus, ApiFault, Lifecycle, ScriptSpec, Sim, SimOptions, WorkspaceSpec,
};
use serde_json::{json, Value};

const TOKEN_HEADER: &str = "Coder-Session-Token";

struct Api {
    sim: Sim,
    http: reqwest::Client,
}

impl Api {
    async fn new() -> Api {
        Api::with(SimOptions::default()).await
    }

    async fn with(opts: SimOptions) -> Api {
        let sim = Sim::start(opts).await.expect("start sim");
        Api {
            sim,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sim.url())
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = req
            .header(TOKEN_HEADER, self.sim.token())
            .send()
            .await
            .expect("send");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let v = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(self.url(path))).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(
            self.http
                .post(self.url(path))
                .header("Content-Type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(
            self.http
                .put(self.url(path))
                .header("Content-Type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    async fn workspace(&self, name: &str) -> Value {
        let (status, ws) = self
            .get(&format!("/api/v2/users/me/workspace/{name}"))
            .await;
        assert_eq!(status, 200, "{ws}");
        ws
    }

    async fn watch(&self, id: &str) -> Watch {
        let resp = self
            .http
            .get(self.url(&format!("/api/v2/workspaces/{id}/watch")))
            .header(TOKEN_HEADER, self.sim.token())
            .send()
            .await
            .expect("watch");
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(
            resp.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/event-stream")
        );
        Watch {
            resp,
            buf: String::new(),
        }
    }
}

/// A watch stream being read: frames are `event: TYPE\n[data: JSON\n]\n`.
struct Watch {
    resp: reqwest::Response,
    buf: String,
}

#[derive(Debug)]
enum Next {
    Event(String, Option<Value>),
    End,
    Broken,
    Timeout,
}

impl Watch {
    async fn next(&mut self, within: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..i + 2).collect();
                let mut kind = String::new();
                let mut data = None;
                for line in frame.lines() {
                    if let Some(k) = line.strip_prefix("event: ") {
                        kind = k.to_string();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(d).expect("data is JSON"));
                    }
                }
                return Next::Event(kind, data);
            }
            match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
                Err(_) => return Next::Timeout,
                Ok(Ok(Some(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Ok(None)) => return Next::End,
                Ok(Err(_)) => return Next::Broken,
            }
        }
    }

    /// Next `data` event (skipping pings).
    async fn data(&mut self, within: Duration) -> Option<Value> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Next::Event(kind, data) if kind == "data" => return data,
                Next::Event(..) => continue,
                _ => return None,
            }
        }
    }

    /// Reads data events until one satisfies `f`.
    async fn until(&mut self, within: Duration, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.data(left).await {
                Some(ws) if f(&ws) => return ws,
                Some(_) => continue,
                None => panic!("watch ended or timed out before the expected state"),
            }
        }
    }
}

fn status(ws: &Value) -> &str {
    ws["latest_build"]["status"].as_str().unwrap_or("?")
}

fn agents(ws: &Value) -> Vec<Value> {
    ws["latest_build"]["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["agents"].as_array().cloned().unwrap_or_default())
        .collect()
}

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn auth_is_required_except_for_buildinfo() {
    let api = Api::new().await;
    api.sim
        .add_workspace(WorkspaceSpec::new("dev"))
        .await
        .unwrap();
    let url = api.url("/api/v2/users/me/workspace/dev");

    let resp = api.http.get(&url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let body: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(
        body["message"],
        "You must be authenticated to access this resource."
    );
    assert!(body["detail"].is_string());

    let resp = api
        .http
        .get(&url)
        .header(TOKEN_HEADER, "wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);

    let resp = api
        .http
        .get(api.url("/api/v2/buildinfo"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let info: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(info["version"], "v2.99.0-sim");

    let (s, _) = api.get("/api/v2/users/me/workspace/dev").await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn lookup_by_me_owner_and_id() {
    let api = Api::new().await;
    api.sim
        .add_workspace(WorkspaceSpec::new("dev"))
        .await
        .unwrap();
    api.sim
        .add_workspace(WorkspaceSpec::new("other").owner("bob"))
        .await
        .unwrap();

    let me = api.workspace("dev").await;
    let (s, by_owner) = api
        .get(&format!(
            "/api/v2/users/{}/workspace/dev?include_deleted=false",
            api.sim.owner()
        ))
        .await;
    assert_eq!(s, 200);
    assert_eq!(me["id"], by_owner["id"]);
    assert_eq!(me["owner_name"], "alice");
    assert_eq!(me["latest_build"]["workspace_owner_name"], "alice");
    assert_eq!(status(&me), "running");
    assert_eq!(me["latest_build"]["job"]["status"], "succeeded");
    assert!(me["latest_build"]["job"]["completed_at"].is_string());
    let a = agents(&me);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0]["name"], "dev");
    assert_eq!(a[0]["status"], "connected");
    assert_eq!(a[0]["lifecycle_state"], "ready");
    for field in [
        "created_at",
        "updated_at",
        "owner_id",
        "owner_avatar_url",
        "organization_id",
        "template_name",
        "template_display_name",
        "template_icon",
        "template_active_version_id",
        "template_require_active_version",
        "outdated",
        "dormant_at",
        "health",
    ] {
        assert!(me.get(field).is_some(), "workspace lacks {field}");
    }
    for field in [
        "architecture",
        "operating_system",
        "directory",
        "version",
        "apps",
        "expanded_directory",
        "health",
        "connection_timeout_seconds",
    ] {
        assert!(a[0].get(field).is_some(), "agent lacks {field}");
    }

    let id = me["id"].as_str().unwrap();
    let (s, by_id) = api.get(&format!("/api/v2/workspaces/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(by_id["name"], "dev");

    let (s, other) = api.get("/api/v2/users/bob/workspace/other").await;
    assert_eq!(s, 200);
    assert_eq!(other["owner_name"], "bob");
    let (s, _) = api.get("/api/v2/users/me/workspace/other").await;
    assert_eq!(s, 404);

    let (s, nf) = api.get("/api/v2/users/me/workspace/nope").await;
    assert_eq!(s, 404);
    assert_eq!(
        nf["message"],
        "Resource not found or you do not have access to this resource"
    );
    let (s, _) = api
        .get(&format!("/api/v2/workspaces/{}", uuid_like()))
        .await;
    assert_eq!(s, 404);
    let (s, _) = api.get("/api/v2/workspaces/not-a-uuid").await;
    assert_eq!(s, 400);

    let agent_id = a[0]["id"].as_str().unwrap();
    let (s, agent) = api
        .get(&format!("/api/v2/workspaceagents/{agent_id}"))
        .await;
    assert_eq!(s, 200);
    assert_eq!(agent["name"], "dev");
    let (s, conn) = api.get("/api/v2/workspaceagents/connection").await;
    assert_eq!(s, 200);
    assert_eq!(conn["hostname_suffix"], "coder");

    let build_id = me["latest_build"]["id"].as_str().unwrap();
    let (s, params) = api
        .get(&format!("/api/v2/workspacebuilds/{build_id}/parameters"))
        .await;
    assert_eq!(s, 200);
    assert_eq!(params, json!([]));
}

fn uuid_like() -> &'static str {
    "5b1c4f0e-8a57-4d1c-9b3b-0d7f2d3c9e11"
}

#[tokio::test]
async fn start_build_progresses_and_watch_reports_it_in_order() {
    let api = Api::new().await;
    api.sim
        .add_workspace(
            WorkspaceSpec::new("dev")
                .stopped()
                .build_time(Duration::from_millis(1000))
                .agent(
                    AgentSpec::new("dev")
                        .connect_after(Duration::from_millis(200))
                        .startup_script(ScriptSpec::blocking(Duration::from_millis(300))),
                ),
        )
        .await
        .unwrap();
    let ws = api.workspace("dev").await;
    assert_eq!(status(&ws), "stopped");
    assert_eq!(ws["latest_build"]["transition"], "stop");
    assert!(agents(&ws).is_empty(), "stop builds have no agents");
    let id = ws["id"].as_str().unwrap().to_string();
    let old_build = ws["latest_build"]["id"].as_str().unwrap().to_string();

    let mut watch = api.watch(&id).await;
    match watch.next(T).await {
        Next::Event(kind, None) => assert_eq!(kind, "ping"),
        other => panic!("first event should be a ping, got {other:?}"),
    }
    let first = watch.data(T).await.expect("current state");
    assert_eq!(status(&first), "stopped");
    assert_eq!(api.sim.watch_subscribers(), 1);

    let (s, build) = api
        .post(
            &format!("/api/v2/workspaces/{id}/builds"),
            json!({"transition": "start", "template_version_id": ws["latest_build"]["template_version_id"], "reason": "ssh_connection"}),
        )
        .await;
    assert_eq!(s, 201, "{build}");
    assert_eq!(build["status"], "pending");
    assert_eq!(build["transition"], "start");
    assert!(build["job"].get("completed_at").is_none());
    assert_ne!(build["id"], old_build.as_str());

    // Each event re-renders the current state (as coderd does), so a slow
    // reader may skip a state; wait for "this state or a later one".
    let early = watch
        .until(T, |w| matches!(status(w), "pending" | "starting"))
        .await;
    assert_eq!(early["latest_build"]["reason"], "ssh_connection");
    let starting = watch.until(T, |w| status(w) == "starting").await;
    assert!(
        agents(&starting).is_empty(),
        "resources appear when the job completes"
    );
    let running = watch.until(T, |w| status(w) == "running").await;
    let a = agents(&running);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0]["status"], "connecting");
    assert_eq!(a[0]["lifecycle_state"], "created");
    assert_eq!(a[0]["scripts"][0]["start_blocks_login"], true);
    watch
        .until(T, |w| {
            agents(w)
                .first()
                .is_some_and(|a| a["status"] == "connected")
        })
        .await;
    watch
        .until(T, |w| {
            agents(w).first().is_some_and(|a| {
                matches!(a["lifecycle_state"].as_str(), Some("starting" | "ready"))
            })
        })
        .await;
    let ready = watch
        .until(T, |w| {
            agents(w)
                .first()
                .is_some_and(|a| a["lifecycle_state"] == "ready")
        })
        .await;
    let agent = &agents(&ready)[0];
    assert!(agent["first_connected_at"].is_string());
    assert!(agent["ready_at"].is_string());

    let build_id = build["id"].as_str().unwrap();
    let (s, b) = api
        .get(&format!("/api/v2/workspacebuilds/{build_id}"))
        .await;
    assert_eq!(s, 200);
    assert_eq!(b["job"]["status"], "succeeded");
    let (s, logs) = api
        .get(&format!("/api/v2/workspacebuilds/{build_id}/logs?after=0"))
        .await;
    assert_eq!(s, 200);
    let logs = logs.as_array().unwrap().clone();
    assert!(logs.len() >= 3);
    assert_eq!(logs[0]["log_source"], "provisioner");
    assert!(logs[0]["stage"].is_string());
    let last = logs.last().unwrap()["id"].as_i64().unwrap();
    let (_, none) = api
        .get(&format!(
            "/api/v2/workspacebuilds/{build_id}/logs?after={last}"
        ))
        .await;
    assert_eq!(none, json!([]));

    let agent_id = agent["id"].as_str().unwrap();
    let (s, alogs) = api
        .get(&format!("/api/v2/workspaceagents/{agent_id}/logs"))
        .await;
    assert_eq!(s, 200);
    let alogs = alogs.as_array().unwrap().clone();
    assert!(alogs.len() >= 2);
    assert_eq!(alogs[0]["source_id"], agent["log_sources"][0]["id"]);
    let (_, later) = api
        .get(&format!(
            "/api/v2/workspaceagents/{agent_id}/logs?after={}",
            alogs[0]["id"]
        ))
        .await;
    assert_eq!(later.as_array().unwrap().len(), alogs.len() - 1);
}

#[tokio::test]
async fn new_start_builds_get_new_agent_ids_but_keep_the_endpoint() {
    let api = Api::new().await;
    api.sim
        .add_workspace(WorkspaceSpec::new("dev").build_time(Duration::from_millis(200)))
        .await
        .unwrap();
    let tunnel = api.sim.tunnel("dev", "dev").unwrap();
    assert!(tunnel.starts_with("tcp://127.0.0.1:"));
    let before = agents(&api.workspace("dev").await)[0]["id"].clone();
    api.sim.start_workspace("dev");
    assert!(
        api.sim
            .wait_for(
                "dev",
                |w| w["latest_build"]["build_number"] == 2
                    && agents(w)
                        .first()
                        .is_some_and(|a| a["status"] == "connected"),
                T
            )
            .await
    );
    let ws = api.workspace("dev").await;
    assert_eq!(ws["latest_build"]["reason"], "autostart");
    assert_ne!(agents(&ws)[0]["id"], before);
    assert_eq!(api.sim.tunnel("dev", "dev").unwrap(), tunnel);
    // The old agent is still addressable.
    let (s, _) = api
        .get(&format!(
            "/api/v2/workspaceagents/{}",
            before.as_str().unwrap()
        ))
        .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn conflicts_while_building_and_for_ssh_autostart_of_running() {
    let api = Api::new().await;
    api.sim
        .add_workspace(
            WorkspaceSpec::new("dev")
                .stopped()
                .build_time(Duration::from_millis(2000)),
        )
        .await
        .unwrap();
    let ws = api.workspace("dev").await;
    let id = ws["id"].as_str().unwrap();
    let path = format!("/api/v2/workspaces/{id}/builds");
    let (s, _) = api.post(&path, json!({"transition": "start"})).await;
    assert_eq!(s, 201);
    let (s, err) = api.post(&path, json!({"transition": "start"})).await;
    assert_eq!(s, 409, "{err}");
    assert!(err["message"].is_string());
    assert!(api.sim.wait_for("dev", |w| status(w) == "running", T).await);
    let (s, err) = api
        .post(
            &path,
            json!({"transition": "start", "reason": "ssh_connection"}),
        )
        .await;
    assert_eq!(s, 409, "{err}");
    // A plain start of a running workspace is allowed (a restart).
    let (s, _) = api.post(&path, json!({"transition": "start"})).await;
    assert_eq!(s, 201);
    assert!(api.sim.wait_for("dev", |w| status(w) == "running", T).await);
    let (s, err) = api.post(&path, json!({"transition": "bogus"})).await;
    assert_eq!(s, 400);
    assert_eq!(err["validations"][0]["field"], "transition");
    let (s, _) = api
        .send(api.http.post(api.url(&path)).body("{not json"))
        .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn dormant_workspaces_must_be_activated_first() {
    let api = Api::new().await;
    api.sim
        .add_workspace(
            WorkspaceSpec::new("dev")
                .stopped()
                .dormant()
                .build_time(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let ws = api.workspace("dev").await;
    assert!(ws["dormant_at"].is_string());
    let id = ws["id"].as_str().unwrap();
    let (s, err) = api
        .post(
            &format!("/api/v2/workspaces/{id}/builds"),
            json!({"transition": "start"}),
        )
        .await;
    assert_eq!(s, 403, "{err}");
    let (s, woke) = api
        .put(
            &format!("/api/v2/workspaces/{id}/dormant"),
            json!({"dormant": false}),
        )
        .await;
    assert_eq!(s, 200);
    assert!(woke["dormant_at"].is_null());
    let (s, _) = api
        .post(
            &format!("/api/v2/workspaces/{id}/builds"),
            json!({"transition": "start"}),
        )
        .await;
    assert_eq!(s, 201);
    assert!(api.sim.wait_for("dev", |w| status(w) == "running", T).await);
}

#[tokio::test]
async fn require_active_version_refuses_old_versions() {
    let api = Api::new().await;
    api.sim
        .add_workspace(
            WorkspaceSpec::new("dev")
                .stopped()
                .require_active_version()
                .build_time(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let ws = api.workspace("dev").await;
    assert_eq!(ws["outdated"], true);
    assert_eq!(ws["template_require_active_version"], true);
    let id = ws["id"].as_str().unwrap();
    let path = format!("/api/v2/workspaces/{id}/builds");
    let old = ws["latest_build"]["template_version_id"].clone();
    let active = ws["template_active_version_id"].clone();
    assert_ne!(old, active);
    let (s, _) = api
        .post(
            &path,
            json!({"transition": "start", "template_version_id": old}),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = api.post(&path, json!({"transition": "start"})).await;
    assert_eq!(s, 403, "the last build's version is old too");
    let (s, _) = api
        .post(
            &path,
            json!({"transition": "start", "template_version_id": active}),
        )
        .await;
    assert_eq!(s, 201);
    assert!(
        api.sim
            .wait_for(
                "dev",
                |w| status(w) == "running" && w["outdated"] == false,
                T
            )
            .await
    );
}

#[tokio::test]
async fn failed_start_reports_the_job_error() {
    let api = Api::new().await;
    api.sim
        .add_workspace(
            WorkspaceSpec::new("dev")
                .stopped()
                .fail_next_start()
                .build_time(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    api.sim.start_workspace("dev");
    assert!(api.sim.wait_for("dev", |w| status(w) == "failed", T).await);
    let ws = api.workspace("dev").await;
    assert_eq!(ws["latest_build"]["job"]["status"], "failed");
    assert_eq!(
        ws["latest_build"]["job"]["error"],
        "sim: provisioner failed"
    );
    // Only the next start fails.
    api.sim.start_workspace("dev");
    assert!(api.sim.wait_for("dev", |w| status(w) == "running", T).await);

    api.sim
        .add_workspace(WorkspaceSpec::new("broken").failed())
        .await
        .unwrap();
    let ws = api.workspace("broken").await;
    assert_eq!(status(&ws), "failed");
    assert_eq!(ws["latest_build"]["transition"], "start");
}

#[tokio::test]
async fn agent_status_scripts_and_timeouts() {
    let api = Api::new().await;
    api.sim
        .add_workspace(
            WorkspaceSpec::new("dev")
                .agent(
                    AgentSpec::new("dev")
                        .never_connects()
                        .connection_timeout(Duration::from_millis(1500)),
                )
                .agent(AgentSpec::new("main")),
        )
        .await
        .unwrap();
    let ws = api.workspace("dev").await;
    let a = agents(&ws);
    assert_eq!(a.len(), 2);
    assert_eq!(a[0]["status"], "connecting");
    assert_eq!(a[0]["connection_timeout_seconds"], 2);
    assert_eq!(a[1]["status"], "connected");
    assert!(
        api.sim
            .wait_for("dev", |w| agents(w)[0]["status"] == "timeout", T)
            .await
    );

    api.sim
        .set_agent_status("dev", "main", AgentStatus::Disconnected);
    let a = agents(&api.workspace("dev").await);
    assert_eq!(a[1]["status"], "disconnected");
    assert!(a[1]["disconnected_at"].is_string());
    api.sim
        .set_agent_lifecycle("dev", "main", Lifecycle::ShuttingDown);
    let ws = api.workspace("dev").await;
    assert_eq!(agents(&ws)[1]["lifecycle_state"], "shutting_down");
    assert_eq!(ws["health"]["healthy"], false);
    assert_eq!(
        status(&ws),
        "running",
        "agent state never changes the build"
    );
}

#[tokio::test]
async fn stop_and_delete() {
    let api = Api::new().await;
    api.sim
        .add_workspace(
            WorkspaceSpec::new("dev")
                .build_time(Duration::from_millis(1000))
                .linger_after_stop(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let id = api.sim.workspace_id("dev").unwrap();
    let mut watch = api.watch(&id).await;
    api.sim.stop_workspace("dev");
    let stopping = watch.until(T, |w| status(w) == "stopping").await;
    assert_eq!(stopping["latest_build"]["transition"], "stop");
    let stopped = watch.until(T, |w| status(w) == "stopped").await;
    assert!(agents(&stopped).is_empty());
    let resources = stopped["latest_build"]["resources"].as_array().unwrap();
    assert!(!resources.is_empty());
    assert!(resources.iter().all(|r| r.get("agents").is_none()));

    api.sim.delete_workspace("dev");
    watch.until(T, |w| status(w) == "deleting").await;
    watch.until(T, |w| status(w) == "deleted").await;
    let (s, _) = api.get("/api/v2/users/me/workspace/dev").await;
    assert_eq!(s, 404);
    let (s, _) = api
        .get("/api/v2/users/me/workspace/dev?include_deleted=true")
        .await;
    assert_eq!(s, 200);
    let (s, _) = api.get(&format!("/api/v2/workspaces/{id}")).await;
    assert_eq!(s, 410);
}

#[tokio::test]
async fn faults_apply_to_new_requests_only() {
    let api = Api::new().await;
    api.sim
        .add_workspace(WorkspaceSpec::new("dev"))
        .await
        .unwrap();
    let id = api.sim.workspace_id("dev").unwrap();
    let mut watch = api.watch(&id).await;
    assert!(watch.data(T).await.is_some());

    api.sim.set_api_fault(ApiFault::Status(503));
    let (s, body) = api.get("/api/v2/users/me/workspace/dev").await;
    assert_eq!(s, 503);
    assert!(body["message"].is_string());
    let (s, _) = api.get("/api/v2/buildinfo").await;
    assert_eq!(s, 503);

    api.sim.set_api_fault(ApiFault::NonJson);
    let resp = api
        .http
        .get(api.url("/api/v2/users/me/workspace/dev"))
        .header(TOKEN_HEADER, api.sim.token())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(serde_json::from_str::<Value>(&resp.text().await.unwrap()).is_err());

    api.sim.set_api_fault(ApiFault::Hang);
    let hung = tokio::time::timeout(
        Duration::from_millis(500),
        api.get("/api/v2/users/me/workspace/dev"),
    )
    .await;
    assert!(hung.is_err(), "a hung request must not be answered");
    api.sim.set_api_fault(ApiFault::None);

    // The open watch stream still delivers changes.
    api.sim
        .set_agent_status("dev", "dev", AgentStatus::Disconnected);
    watch
        .until(T, |w| agents(w)[0]["status"] == "disconnected")
        .await;
    let (s, _) = api.get("/api/v2/users/me/workspace/dev").await;
    assert_eq!(s, 200);

    let log = api.sim.request_log();
    assert!(log.iter().any(|r| r.status == 503));
    assert!(
        log.iter().any(|r| r.status == 0),
        "the hung request is logged without a status"
    );
}

#[tokio::test]
async fn cut_watch_streams_breaks_them_and_heartbeats_flow() {
    let api = Api::with(SimOptions {
        heartbeat: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    api.sim
        .add_workspace(WorkspaceSpec::new("dev"))
        .await
        .unwrap();
    let id = api.sim.workspace_id("dev").unwrap();
    let mut a = api.watch(&id).await;
    let mut b = api.watch(&id).await;
    assert!(a.data(T).await.is_some());
    assert!(b.data(T).await.is_some());
    // Heartbeat pings follow.
    match a.next(T).await {
        Next::Event(kind, None) => assert_eq!(kind, "ping"),
        other => panic!("expected a heartbeat, got {other:?}"),
    }
    assert_eq!(api.sim.watch_subscribers(), 2);
    api.sim.cut_watch_streams();
    for w in [&mut a, &mut b] {
        loop {
            match w.next(T).await {
                Next::Event(..) => continue,
                Next::Broken => break,
                Next::End => panic!("the cut must be abrupt, not a clean end of stream"),
                Next::Timeout => panic!("stream not cut"),
            }
        }
    }
    let deadline = Instant::now() + T;
    while api.sim.watch_subscribers() != 0 {
        assert!(Instant::now() < deadline, "subscribers not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New subscriptions work again.
    let mut c = api.watch(&id).await;
    assert!(c.data(T).await.is_some());
}

#[tokio::test]
async fn usage_and_request_log() {
    let api = Api::new().await;
    api.sim
        .add_workspace(WorkspaceSpec::new("dev"))
        .await
        .unwrap();
    let ws = api.workspace("dev").await;
    let id = ws["id"].as_str().unwrap();
    let agent_id = agents(&ws)[0]["id"].clone();
    let resp = api
        .http
        .post(api.url(&format!("/api/v2/workspaces/{id}/usage")))
        .header(TOKEN_HEADER, api.sim.token())
        .header("X-Extra", "yes")
        .body(json!({"agent_id": agent_id, "app_name": "ssh"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    assert_eq!(api.sim.usage_count("dev"), 1);
    let log = api.sim.request_log();
    let usage = log
        .iter()
        .find(|r| r.path.ends_with("/usage"))
        .expect("usage logged");
    assert_eq!(usage.method, "POST");
    assert_eq!(usage.status, 204);
    assert_eq!(usage.header("x-extra"), Some("yes"));
    assert_eq!(
        usage.header("coder-session-token"),
        Some(api.sim.token().as_str())
    );
    assert!(log
        .iter()
        .any(|r| r.path == "/api/v2/users/me/workspace/dev"));
}

#[tokio::test]
async fn endpoints_follow_builds() {
    let api = Api::new().await;
    api.sim
        .add_workspace(
            WorkspaceSpec::new("dev")
                .stopped()
                .build_time(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let addr = api.sim.agent_addr("dev", "dev").unwrap();
    assert!(!accepts(addr).await, "a stopped workspace's agent is down");
    api.sim.start_workspace("dev");
    assert!(api.sim.wait_for("dev", |w| status(w) == "running", T).await);
    assert!(accepts(addr).await, "a running workspace's agent answers");
}

/// Whether the endpoint sends anything (an SSH banner) on a new connection.
async fn accepts(addr: std::net::SocketAddr) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await,
        Ok(Ok(n)) if n > 0
    )
}

#[tokio::test]
async fn shutdown_stops_the_api_and_the_agents() {
    let api = Api::new().await;
    api.sim
        .add_workspace(WorkspaceSpec::new("dev"))
        .await
        .unwrap();
    let addr = api.sim.agent_addr("dev", "dev").unwrap();
    assert!(api.sim.client_key_path("dev", "dev").is_none());
    assert!(accepts(addr).await);
    let (s, _) = api.get("/api/v2/buildinfo").await;
    assert_eq!(s, 200);
    api.sim.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fresh = reqwest::Client::new();
    assert!(fresh
        .get(api.url("/api/v2/buildinfo"))
        .send()
        .await
        .is_err());
    assert!(!accepts(addr).await);
}

#[tokio::test]
async fn live_connections_are_killed_linger_after_stop() {
    use tokio::io::AsyncReadExt;
    let api = Api::new().await;
    api.sim
        .add_workspace(
            WorkspaceSpec::new("dev")
                .build_time(Duration::from_millis(200))
                .linger_after_stop(Duration::from_millis(1000)),
        )
        .await
        .unwrap();
    let addr = api.sim.agent_addr("dev", "dev").unwrap();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 256];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"SSH-"), "SSH banner expected");
    assert_eq!(api.sim.live_connections("dev", "dev"), 1);

    api.sim.stop_workspace("dev");
    assert!(api.sim.wait_for("dev", |w| status(w) == "stopped", T).await);
    let stopped = Instant::now();
    // Still alive right after the stop...
    assert_eq!(api.sim.live_connections("dev", "dev"), 1);
    assert!(!accepts(addr).await, "no new connections once stopped");
    // ...and gone after the linger time.
    let ended = tokio::time::timeout(T, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "connection not killed");
    assert!(stopped.elapsed() >= Duration::from_millis(500));
}

#[tokio::test]
async fn a_starting_workspace_finishes_on_its_own() {
    let api = Api::new().await;
    api.sim
        .add_workspace(
            WorkspaceSpec::new("dev")
                .starting()
                .build_time(Duration::from_millis(1000)),
        )
        .await
        .unwrap();
    let ws = api.workspace("dev").await;
    assert!(matches!(status(&ws), "pending" | "starting"));
    assert!(ws["latest_build"]["job"].get("completed_at").is_none());
    assert!(
        api.sim
            .wait_for(
                "dev",
                |w| agents(w)
                    .first()
                    .is_some_and(|a| a["lifecycle_state"] == "ready"),
                T
            )
            .await
    );
    assert_eq!(status(&api.workspace("dev").await), "running");
}
