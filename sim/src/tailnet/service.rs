//! The tailnet dRPC API on one coordinate websocket: websocket → byte
//! stream → yamux server → dRPC server, with the four methods a client
//! uses — `Coordinate` (bridged to the coordinator), `StreamDERPMaps`
//! (the map once, then held open), `RefreshResumeToken` and
//! `PostTelemetry` (accepted and discarded). Anything else is refused with
//! dRPC's "unimplemented" code 12.

use std::sync::Arc;

use coder_tailnet::drpc::{self, Invocation};
use coder_tailnet::proto::{
    self, method, CoordinateRequest, PeerId, RefreshResumeTokenResponse, Timestamp,
};
use coder_tailnet::ws::WsStream;
use coder_tailnet::yamux;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_tungstenite::WebSocketStream;

use super::coordinator::Role;
use super::{Killable, Tailnet, RESUME_TOKEN_EXPIRY};
use crate::state::lock;

/// What every call on one websocket shares.
struct Ctx {
    tn: Arc<Tailnet>,
    peer: PeerId,
    agent: PeerId,
    session: yamux::Session,
}

/// Serves one upgraded `/coordinate` connection until it ends or is cut
/// by [`Tailnet::drop_coordinate_connections`].
pub(crate) async fn serve_coordinate<T>(tn: Arc<Tailnet>, io: T, peer: PeerId, agent: PeerId)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (_guard, kill) = tn.register_conn(peer, agent);
    let ws = WebSocketStream::from_raw_socket(Killable::new(io, kill), WsRole::Server, None).await;
    let session = yamux::Session::server(WsStream::new(ws), yamux::Config::default());
    log::info!("coder-sim: coordinate connection from peer {peer} for agent {agent}");
    let ctx = Arc::new(Ctx {
        tn,
        peer,
        agent,
        session: session.clone(),
    });
    drpc::serve(session, move |call| {
        let ctx = ctx.clone();
        async move { dispatch(ctx, call).await }
    })
    .await;
    log::info!("coder-sim: coordinate connection of peer {peer} ended");
}

async fn dispatch(ctx: Arc<Ctx>, mut call: Invocation<yamux::Stream>) {
    let name = call.method().to_string();
    lock(&ctx.tn.rpcs).push(name.clone());
    let result = match name.as_str() {
        method::COORDINATE => {
            coordinate(&ctx, call).await;
            Ok(())
        }
        method::STREAM_DERP_MAPS => stream_derp_maps(&ctx, call).await,
        method::REFRESH_RESUME_TOKEN => refresh_resume_token(&ctx, &mut call).await,
        method::POST_TELEMETRY => match call.recv().await {
            Ok(_) => call.reply(&[]).await,
            Err(e) => Err(e),
        },
        _ => call.unimplemented().await,
    };
    if let Err(e) = result {
        log::debug!("coder-sim: dRPC {name} from {}: {e}", ctx.peer);
    }
}

/// Bridges the bidi stream to the coordinator until either side ends it.
async fn coordinate(ctx: &Ctx, call: Invocation<yamux::Stream>) {
    let coord = &ctx.tn.coord;
    let (conn, mut updates) = coord.connect(ctx.peer, Role::Client { agent: ctx.agent });
    let (mut tx, mut rx) = call.split();
    let mut graceful = false;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let bytes = match msg {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(e) => {
                        log::debug!("coder-sim: coordinate stream of {}: {e}", ctx.peer);
                        break;
                    }
                };
                let req = match CoordinateRequest::decode(bytes.as_slice()) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send_error(0, &format!("decode CoordinateRequest: {e}")).await;
                        break;
                    }
                };
                if coord.handle(ctx.peer, conn, &req).is_err() {
                    // The refusal is queued; deliver it before hanging up.
                    while let Ok(r) = updates.try_recv() {
                        if tx.send(&r.encode_to_vec()).await.is_err() {
                            break;
                        }
                    }
                    break;
                }
                if req.disconnect.is_some() {
                    graceful = true;
                    break;
                }
            }
            resp = updates.recv() => match resp {
                Some(r) => {
                    if tx.send(&r.encode_to_vec()).await.is_err() {
                        break;
                    }
                }
                // Replaced by a newer stream, or removed as too slow.
                None => break,
            },
        }
    }
    coord.leave(ctx.peer, conn, graceful);
    // Hang up: the call ends, the client's graceful close completes.
    let _ = tx.close_send().await;
}

/// Sends the map once, then holds the call open until the session ends or
/// the client closes the stream.
async fn stream_derp_maps(
    ctx: &Ctx,
    call: Invocation<yamux::Stream>,
) -> Result<(), drpc::DrpcError> {
    let (mut tx, mut rx) = call.split();
    // The (empty) request.
    rx.recv().await?;
    tx.send(&ctx.tn.derp_map_proto().encode_to_vec()).await?;
    let mut rd = rx.into_inner();
    let drain = async {
        let mut buf = [0u8; 512];
        while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    tokio::select! {
        _ = ctx.session.closed() => {}
        _ = drain => {}
    }
    Ok(())
}

async fn refresh_resume_token(
    ctx: &Ctx,
    call: &mut Invocation<yamux::Stream>,
) -> Result<(), drpc::DrpcError> {
    call.recv().await?;
    let (token, expires) = ctx.tn.issue_token(ctx.peer);
    let resp = RefreshResumeTokenResponse {
        token,
        refresh_in: Some(proto::Duration::from_std(RESUME_TOKEN_EXPIRY / 2)),
        expires_at: Some(Timestamp::from_system_time(expires)),
        peer_id: ctx.peer.to_vec(),
    };
    call.reply(&resp.encode_to_vec()).await
}
