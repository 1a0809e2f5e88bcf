//! The workspace watch stream (`GET /api/v2/workspaces/{id}/watch`, SSE).
//!
//! [`Watch`] is one subscription: it yields workspace snapshots and fails on
//! a broken stream (garbage, an oversized event, an `error` event, or silence
//! longer than [`IDLE_TIMEOUT`] while coderd pings every 15 s).
//! [`spawn_watcher`] keeps a subscription alive forever, resubscribing with
//! backoff, and publishes the latest snapshot; it never gives up, because
//! callers decide what an outage means.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch as tokio_watch;

use super::models::Workspace;
use super::sse::Parser;
use super::{error_chain, one_line, ApiError, Client};

/// coderd pings every 15 s; two missed pings and a margin mean a dead stream.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(40);
/// Largest single event we accept.
pub const MAX_EVENT: usize = 4 << 20;

/// One open watch subscription.
pub struct Watch {
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    parser: Parser,
    pending: std::collections::VecDeque<super::sse::Event>,
    idle: Duration,
}

impl Watch {
    /// Subscribe to a workspace.
    pub async fn open(client: &Client, workspace_id: &str) -> Result<Watch, ApiError> {
        let resp = client.open_watch(workspace_id).await?;
        Ok(Watch {
            stream: resp.bytes_stream().boxed(),
            parser: Parser::new(MAX_EVENT),
            pending: Default::default(),
            idle: IDLE_TIMEOUT,
        })
    }

    /// The next workspace snapshot; `Ok(None)` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<Workspace>, ApiError> {
        loop {
            while let Some(ev) = self.pending.pop_front() {
                match ev.kind.as_str() {
                    "data" => {
                        let ws = serde_json::from_str::<Workspace>(&ev.data).map_err(|e| {
                            ApiError::Body {
                                what: "watch event".into(),
                                cause: format!("invalid workspace JSON: {e}"),
                            }
                        })?;
                        return super::check_workspace(ws).map(Some);
                    }
                    "error" => {
                        return Err(ApiError::Body {
                            what: "watch stream".into(),
                            cause: format!(
                                "coderd sent an error event: {}",
                                one_line(&ev.data, 200)
                            ),
                        })
                    }
                    _ => {} // ping and unknown kinds
                }
            }
            let chunk = match tokio::time::timeout(self.idle, self.stream.next()).await {
                Err(_) => {
                    return Err(ApiError::Body {
                        what: "watch stream".into(),
                        cause: format!("silent for {}s", self.idle.as_secs()),
                    })
                }
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => {
                    return Err(ApiError::Body {
                        what: "watch stream".into(),
                        cause: error_chain(&e),
                    })
                }
                Ok(Some(Ok(c))) => c,
            };
            let events = self.parser.feed(&chunk).map_err(|e| ApiError::Body {
                what: "watch stream".into(),
                cause: e.to_string(),
            })?;
            self.pending.extend(events);
        }
    }
}

/// What the background watcher publishes.
#[derive(Clone, Debug)]
pub enum WatchState {
    /// Not yet subscribed.
    Connecting,
    /// The latest snapshot from the stream.
    Snapshot(Box<Workspace>),
    /// The stream is down; the watcher is retrying. Carries the last error.
    Down(String),
    /// coderd says the workspace is gone (404/410).
    Gone,
}

/// Keep a watch open forever, resubscribing with backoff from 1 s to 15 s.
///
/// Returns a receiver of the latest state; dropping every receiver ends the
/// task.
pub fn spawn_watcher(client: Client, workspace_id: String) -> tokio_watch::Receiver<WatchState> {
    let (tx, rx) = tokio_watch::channel(WatchState::Connecting);
    tokio::spawn(async move {
        let mut backoff = Duration::from_secs(1);
        loop {
            if tx.is_closed() {
                return;
            }
            match Watch::open(&client, &workspace_id).await {
                Ok(mut w) => {
                    log::debug!("watch: subscribed");
                    loop {
                        match w.next().await {
                            Ok(Some(ws)) => {
                                backoff = Duration::from_secs(1);
                                if tx.send(WatchState::Snapshot(Box::new(ws))).is_err() {
                                    return;
                                }
                            }
                            Ok(None) => {
                                log::info!("watch: stream ended; resubscribing");
                                let _ = tx.send(WatchState::Down("stream ended".into()));
                                break;
                            }
                            Err(e) => {
                                log::info!("watch: {e}; resubscribing");
                                let _ = tx.send(WatchState::Down(e.to_string()));
                                break;
                            }
                        }
                    }
                }
                Err(e) if matches!(e.status(), Some(404) | Some(410)) => {
                    log::info!("watch: workspace is gone: {e}");
                    let _ = tx.send(WatchState::Gone);
                }
                Err(e) => {
                    log::info!(
                        "watch: subscribe failed: {e}; retrying in {}s",
                        backoff.as_secs()
                    );
                    let _ = tx.send(WatchState::Down(e.to_string()));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = tx.closed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(15));
        }
    });
    rx
}
