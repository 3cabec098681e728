//! Prometheus metrics: one registry per server and one struct holding every
//! metric handle, so that counting is a field access and not a lookup.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Every metric Confab exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Live rooms.
    pub rooms: IntGauge,
    /// Live participants.
    pub participants: IntGauge,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// Accepted joins.
    pub joins: IntCounter,
    /// Relayed offers, answers and candidates.
    pub relayed: IntCounter,
    /// Signaling messages received from clients.
    pub messages_in: IntCounter,
    /// Error messages sent to clients, by code.
    pub errors: IntCounterVec,
    /// WebSocket upgrades refused because the connection cap was reached.
    pub connections_refused: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("confab".into()), None).expect("a constant prefix is valid");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique name");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique name");
            c
        };
        let rooms = gauge("rooms", "Live rooms");
        let participants = gauge("participants", "Participants in rooms");
        let connections = gauge("ws_connections", "Open signaling WebSockets");
        let joins = counter("joins_total", "Accepted joins");
        let relayed = counter(
            "relayed_messages_total",
            "Relayed offers, answers and candidates",
        );
        let messages_in = counter("signaling_messages_total", "Signaling messages received");
        let connections_refused = counter(
            "ws_connections_refused_total",
            "WebSocket upgrades refused at the connection cap",
        );
        let errors = IntCounterVec::new(
            Opts::new("signaling_errors_total", "Error messages sent, by code"),
            &["code"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(errors.clone()))
            .expect("unique name");
        Metrics {
            registry,
            rooms,
            participants,
            connections,
            joins,
            relayed,
            messages_in,
            errors,
            connections_refused,
        }
    }

    /// The text exposition format for `/metrics`.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = encoder.encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
