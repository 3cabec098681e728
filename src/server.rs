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
use crate::turn_server::{IceServerList, PeerPolicy, TurnServer, TurnSettings};
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
    /// The embedded STUN/TURN server, when enabled.
    turn: Option<TurnServer>,
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
        let (turn, ice_servers) = start_turn(&config, &metrics, media_addr).await?;
        let rooms = Arc::new(Rooms::new(
            RoomSettings {
                max_participants: config.limits.max_participants,
                empty_room_timeout: config.empty_room_timeout,
                ice_servers,
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
            turn,
        })
    }

    /// The embedded TURN server's address as clients reach it, if enabled.
    pub fn turn_addr(&self) -> Option<SocketAddr> {
        let turn = self.turn.as_ref()?;
        let ip = self.state.signal.config.turn_public_ip();
        Some(SocketAddr::new(ip, turn.local_addr().port()))
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
        let turn = self.turn.take();
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
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|down| *down).await;
            })
            .await;
        if let Some(turn) = turn {
            turn.close().await;
        }
        served
    }
}

/// Starts the embedded TURN server (if enabled) and builds the ICE server
/// list clients get: the fixed `--ice-server` URLs, the embedded server's
/// STUN and TURN URLs, and the external TURN URLs.
async fn start_turn(
    config: &Config,
    metrics: &Arc<Metrics>,
    sfu: SocketAddr,
) -> Result<(Option<TurnServer>, IceServerList), String> {
    let t = &config.turn;
    let secret: Vec<u8> = match &t.secret {
        Some(s) => s.as_bytes().to_vec(),
        None => (0..32).map(|_| rand::random::<u8>()).collect(),
    };
    let mut list = IceServerList {
        fixed: config.ice_servers.clone(),
        signed: Vec::new(),
        ttl: t.credential_ttl,
    };
    let mut turn = None;
    if t.enabled {
        let server = TurnServer::start(
            TurnSettings {
                listen: config.turn_addr(),
                relay_bind: config.turn_addr().ip(),
                relay_public: config.turn_public_ip(),
                relay_ports: t.relay_ports,
                realm: t.realm.clone(),
                secret: secret.clone(),
                user_quota: t.user_quota,
                total_quota: t.total_quota,
                // The SFU's own address is always reachable through the
                // relay: relay-only clients need it for their server leg.
                policy: PeerPolicy {
                    allow_loopback: t.allow_loopback,
                    exceptions: vec![sfu],
                },
            },
            Arc::clone(metrics),
        )
        .await?;
        let addr = SocketAddr::new(config.turn_public_ip(), server.local_addr().port());
        list.signed.push((
            vec![format!("stun:{addr}"), format!("turn:{addr}?transport=udp")],
            secret.clone(),
        ));
        turn = Some(server);
    }
    if !t.external_urls.is_empty() {
        let external = t
            .external_secret
            .as_ref()
            .map_or(secret, |s| s.as_bytes().to_vec());
        list.signed.push((t.external_urls.clone(), external));
    }
    Ok((turn, list))
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
