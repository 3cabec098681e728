//! The HTTP server: binds the listener, builds the axum router (web client,
//! WebSocket, health, metrics) and runs until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{State, WebSocketUpgrade};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::Config;
use crate::media::sfu::Sfu;
use crate::metrics::Metrics;
use crate::room::{RoomSettings, Rooms};
use crate::signaling::session::{self, SignalContext};
use crate::web;

/// A bound, not yet running server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    state: AppState,
    shutdown_tx: watch::Sender<bool>,
    /// The SFU task, started by `run`.
    sfu: Option<Sfu>,
    media_addr: SocketAddr,
}

#[derive(Debug, Clone)]
struct AppState {
    signal: SignalContext,
    /// Caps concurrent WebSockets; a permit lives as long as its socket.
    connections: Arc<Semaphore>,
}

/// Asks a running server to stop; dropping it does nothing.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(watch::Sender<bool>);

impl ShutdownHandle {
    /// Starts a graceful shutdown: every session gets `server_shutdown`.
    pub fn shutdown(&self) {
        let _ = self.0.send(true);
    }
}

impl Server {
    /// Validates `config` and binds its listen address.
    pub async fn bind(config: Config) -> Result<Server, String> {
        config.validate()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let metrics = Arc::new(Metrics::new());
        let (sfu, sfu_handle) = Sfu::bind(
            config.media_addr(),
            config.public_ip,
            config.srtp_gcm_only,
            Arc::clone(&metrics),
        )
        .await?;
        let media_addr = sfu_handle.advertised_addr();
        let rooms = Arc::new(Rooms::new(
            RoomSettings {
                max_participants: config.limits.max_participants,
                empty_room_timeout: config.empty_room_timeout,
                ice_servers: config.ice_servers.clone(),
                mode_policy: config.mode_policy,
                never_p2p_rooms: config.never_p2p_rooms.clone(),
                sfu: Some(sfu_handle),
            },
            Arc::clone(&metrics),
        ));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let connections = Arc::new(Semaphore::new(config.limits.max_connections));
        let state = AppState {
            signal: SignalContext {
                config: Arc::new(config),
                rooms,
                metrics,
                shutdown: shutdown_rx,
            },
            connections,
        };
        Ok(Server {
            listener,
            state,
            shutdown_tx,
            sfu: Some(sfu),
            media_addr,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The SFU's advertised UDP address.
    pub fn media_addr(&self) -> SocketAddr {
        self.media_addr
    }

    /// The room registry (for tests and metrics).
    pub fn rooms(&self) -> Arc<Rooms> {
        Arc::clone(&self.state.signal.rooms)
    }

    /// The metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.state.signal.metrics)
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown_tx.clone())
    }

    /// Serves until [`ShutdownHandle::shutdown`] is called, then lets every
    /// session close with `server_shutdown` and returns.
    pub async fn run(mut self) -> std::io::Result<()> {
        if let Some(sfu) = self.sfu.take() {
            // Runs until the rooms (which hold its handles) are gone.
            tokio::spawn(sfu.run());
        }
        let mut shutdown = self.state.signal.shutdown.clone();
        let app = router(self.state);
        // Signaling is many small messages: without TCP_NODELAY each one can
        // wait ~40 ms for a delayed ACK (Nagle), which slows ICE setup.
        let listener = self.listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|down| *down).await;
            })
            .await
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { web::page(web::INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { web::page(web::APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/style.css",
            get(|| async { web::page(web::STYLE_CSS, "text/css; charset=utf-8") }),
        )
        .route("/ws", get(ws_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_handler))
        .with_state(state)
}

async fn ws_handler(State(state): State<AppState>, ws: WebSocketUpgrade) -> Response {
    let Ok(permit) = Arc::clone(&state.connections).try_acquire_owned() else {
        state.signal.metrics.connections_refused.inc();
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections\n").into_response();
    };
    let max = state.signal.config.limits.max_message_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            session::run(socket, state.signal).await;
            drop(permit);
        })
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.signal.metrics.render(),
    )
        .into_response()
}
