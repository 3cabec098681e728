//! The HTTP server: binds the listener, builds the axum router (web client,
//! WebSocket, health, metrics) and runs until shutdown.
//!
//! Shutdown has two steps, as Kubernetes expects: [`ShutdownHandle::drain`]
//! (the first SIGTERM) makes `/readyz` fail and refuses new rooms while the
//! existing ones go on, until they are empty or the drain deadline passes;
//! [`ShutdownHandle::shutdown`] then sends every session `server_shutdown`
//! and stops serving.

use std::future::IntoFuture;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
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
use crate::signaling::ratelimit::JoinLimiter;
use crate::signaling::session::{self, SignalContext};
use crate::turn_server::{IceServerList, PeerPolicy, TurnServer, TurnSettings};
use crate::web;

/// A bound, not yet running server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    /// The separate `/metrics` listener, if configured.
    metrics_listener: Option<TcpListener>,
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

/// Asks a running server to drain or stop; dropping it does nothing.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    tx: watch::Sender<bool>,
    rooms: Arc<Rooms>,
}

/// Longest wait at shutdown for sessions to say goodbye (each has a 2 s
/// close grace of its own).
const SESSION_CLOSE_WAIT: Duration = Duration::from_secs(3);

/// How often a drain checks whether the rooms are empty.
const DRAIN_POLL: Duration = Duration::from_millis(100);

impl ShutdownHandle {
    /// Stops at once: every session gets `server_shutdown` and is closed.
    pub fn shutdown(&self) {
        let _ = self.tx.send(true);
    }

    /// Drains: `/readyz` fails and new rooms are refused at once; resolves
    /// (and shuts down) when no participant is left, or after `deadline`.
    /// Returns whether the rooms emptied in time.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.rooms.start_drain();
        let end = tokio::time::Instant::now() + deadline;
        let emptied = loop {
            if self.rooms.participants() == 0 {
                break true;
            }
            if tokio::time::Instant::now() >= end {
                break false;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        };
        self.shutdown();
        emptied
    }

    /// Participants still connected (what a drain waits for).
    pub fn participants(&self) -> usize {
        self.rooms.participants()
    }
}

impl Server {
    /// Validates `config` and binds its listen address.
    pub async fn bind(config: Config) -> Result<Server, String> {
        config.validate()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr} (--metrics-listen): {e}"))?,
            ),
            None => None,
        };
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
                max_rooms: config.limits.max_rooms,
                empty_room_timeout: config.empty_room_timeout,
                ice_servers,
                mode_policy: config.mode_policy,
                never_p2p_rooms: config.never_p2p_rooms.clone(),
                last_n: config.last_n,
                sfu: Some(sfu_handle),
            },
            Arc::clone(&metrics),
        ));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let connections = Arc::new(Semaphore::new(config.limits.max_connections));
        let join_limiter = Arc::new(JoinLimiter::new(
            config.limits.join_rate_per_ip,
            config.limits.join_burst_per_ip,
            config.limits.join_rate_exempt_loopback,
        ));
        let state = AppState {
            signal: SignalContext {
                config: Arc::new(config),
                rooms,
                metrics,
                shutdown: shutdown_rx,
                join_limiter,
            },
            connections,
        };
        Ok(Server {
            listener,
            metrics_listener,
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

    /// The separate metrics listener's address, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
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
        ShutdownHandle {
            tx: self.shutdown_tx.clone(),
            rooms: Arc::clone(&self.state.signal.rooms),
        }
    }

    /// Serves until [`ShutdownHandle::shutdown`] is called, then lets every
    /// session close with `server_shutdown` and returns.
    pub async fn run(mut self) -> std::io::Result<()> {
        let turn = self.turn.take();
        if let Some(sfu) = self.sfu.take() {
            // Runs until the rooms (which hold its handles) are gone.
            tokio::spawn(sfu.run());
        }
        let shutdown = self.state.signal.shutdown.clone();
        let stopped = move || {
            let mut shutdown = shutdown.clone();
            async move {
                let _ = shutdown.wait_for(|down| *down).await;
            }
        };
        let metrics = Arc::clone(&self.state.signal.metrics);
        let separate_metrics = self.metrics_listener.is_some();
        let admin = self
            .state
            .signal
            .config
            .admin_token
            .as_deref()
            .map(|token| {
                crate::admin::router(crate::admin::AdminState {
                    rooms: Arc::clone(&self.state.signal.rooms),
                    token: token.into(),
                })
            });
        // The admin API goes where /metrics goes: the private listener if
        // there is one.
        let (ops_admin, main_admin) = if separate_metrics {
            (admin, None)
        } else {
            (None, admin)
        };
        let metrics_server = self.metrics_listener.map(|l| {
            let mut app = ops_router(self.state.clone());
            if let Some(admin) = ops_admin {
                app = app.merge(admin);
            }
            tokio::spawn(
                axum::serve(l, app)
                    .with_graceful_shutdown(stopped())
                    .into_future(),
            )
        });
        let mut app = router(self.state, !separate_metrics);
        if let Some(admin) = main_admin {
            app = app.merge(admin);
        }
        // Signaling is many small messages: without TCP_NODELAY each one can
        // wait ~40 ms for a delayed ACK (Nagle), which slows ICE setup.
        let listener = self.listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let served = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stopped())
        .await;
        if let Some(m) = metrics_server {
            let _ = m.await;
        }
        // Upgraded WebSockets are not connections axum waits for: give the
        // sessions their bounded time to send `server_shutdown` and the
        // close frame, so that clients learn why rather than see the
        // connection drop.
        let deadline = tokio::time::Instant::now() + SESSION_CLOSE_WAIT;
        while metrics.connections.get() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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

/// The main router; `/metrics` is on it unless a separate metrics listener
/// serves it.
fn router(state: AppState, with_metrics: bool) -> Router {
    let router = Router::new()
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
        .route("/readyz", get(readyz_handler));
    let router = if with_metrics {
        router.route("/metrics", get(metrics_handler))
    } else {
        router
    };
    router.with_state(state)
}

/// The separate operations listener: metrics and health only.
fn ops_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz_handler))
        .with_state(state)
}

/// Ready while new rooms are accepted; 503 once draining.
async fn readyz_handler(State(state): State<AppState>) -> Response {
    if state.signal.rooms.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn ws_handler(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let mut client = peer.ip();
    if state.signal.config.limits.trust_forwarded_for {
        if let Some(ip) = forwarded_for(&headers) {
            client = ip;
        }
    }
    let Ok(permit) = Arc::clone(&state.connections).try_acquire_owned() else {
        state.signal.metrics.connections_refused.inc();
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections\n").into_response();
    };
    let max = state.signal.config.limits.max_message_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            session::run(socket, state.signal, client).await;
            drop(permit);
        })
}

/// The last (nearest) address of the `X-Forwarded-For` headers: the one
/// the trusted proxy itself saw.
fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let last = headers.get_all("x-forwarded-for").iter().next_back()?;
    let entry = last.to_str().ok()?.rsplit(',').next()?.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.signal.metrics.render(),
    )
        .into_response()
}
