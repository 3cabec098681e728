//! Prometheus metrics: one registry per server and one struct holding every
//! metric handle, so that counting is a field access and not a lookup.

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

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
    /// Live server legs.
    pub legs: IntGauge,
    /// RTP packets sent to subscribers, by kind.
    pub forwarded_packets: IntCounterVec,
    /// RTP payload bytes sent to subscribers, by kind.
    pub forwarded_bytes: IntCounterVec,
    /// Keyframe requests sent to publishers.
    pub pli: IntCounter,
    /// Media datagrams dropped before any leg used them, by reason.
    pub media_dropped: IntCounterVec,
    /// Rooms by media mode.
    pub rooms_by_mode: IntGaugeVec,
    /// Mode changes, by the mode entered.
    pub mode_switches: IntCounterVec,
    /// Live allocations on the embedded TURN server.
    pub turn_allocations: IntGauge,
    /// Allocations created on the embedded TURN server.
    pub turn_allocations_total: IntCounter,
    /// Datagrams relayed by the embedded TURN server, by direction
    /// (`to_peer`, `from_peer`).
    pub turn_relayed_packets: IntCounterVec,
    /// Bytes relayed by the embedded TURN server, by direction.
    pub turn_relayed_bytes: IntCounterVec,
    /// TURN requests refused, by reason (`unauthorized`, `expired`, `quota`,
    /// `forbidden_peer`).
    pub turn_refused: IntCounterVec,
    /// TURN datagrams dropped unanswered, by reason.
    pub turn_dropped: IntCounterVec,
    /// Live tokio tasks of the server's runtime, read at each scrape.
    pub tasks: IntGauge,
    /// Entries of the SFU's routing tables (ufrag and address routes).
    pub media_routes: IntGauge,
    /// Server legs the SFU closed as failed, by reason (`silent`,
    /// `ice_failed`, `panic`).
    pub legs_failed: IntCounterVec,
    /// NACK feedback packets received from subscribers.
    pub nack: IntCounter,
    /// RTP packets retransmitted to subscribers in answer to NACKs.
    pub retransmitted: IntCounter,
    /// Retransmissions not sent: the downtrack's budget was spent.
    pub retransmissions_dropped: IntCounter,
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
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique name");
            c
        };
        let errors = counter_vec(
            "signaling_errors_total",
            "Error messages sent, by code",
            "code",
        );
        let legs = gauge("server_legs", "Live server legs (SFU peer connections)");
        let forwarded_packets = counter_vec(
            "forwarded_packets_total",
            "RTP packets forwarded to subscribers",
            "kind",
        );
        let forwarded_bytes = counter_vec(
            "forwarded_bytes_total",
            "RTP payload bytes forwarded to subscribers",
            "kind",
        );
        let pli = counter("pli_total", "Keyframe requests sent to publishers");
        let media_dropped = counter_vec(
            "media_dropped_datagrams_total",
            "Media datagrams dropped, by reason (unroutable, oversize, srtp, rejected)",
            "reason",
        );
        let rooms_by_mode =
            IntGaugeVec::new(Opts::new("rooms_by_mode", "Rooms by media mode"), &["mode"])
                .expect("valid metric");
        registry
            .register(Box::new(rooms_by_mode.clone()))
            .expect("unique name");
        let mode_switches = counter_vec(
            "mode_switches_total",
            "Room mode changes, by the mode entered",
            "to",
        );
        let turn_allocations = gauge("turn_allocations", "Live TURN allocations");
        let turn_allocations_total = counter("turn_allocations_total", "TURN allocations created");
        let turn_relayed_packets = counter_vec(
            "turn_relayed_packets_total",
            "Datagrams relayed by the TURN server, by direction (to_peer, from_peer)",
            "direction",
        );
        let turn_relayed_bytes = counter_vec(
            "turn_relayed_bytes_total",
            "Bytes relayed by the TURN server, by direction (to_peer, from_peer)",
            "direction",
        );
        let turn_refused = counter_vec(
            "turn_refused_total",
            "TURN requests refused, by reason (unauthorized, expired, quota, forbidden_peer)",
            "reason",
        );
        let turn_dropped = counter_vec(
            "turn_dropped_datagrams_total",
            "TURN datagrams dropped unanswered, by reason",
            "reason",
        );
        let tasks = gauge("tasks", "Live tokio tasks (read at scrape time)");
        let media_routes = gauge(
            "media_routes",
            "Entries of the SFU's routing tables (ICE ufrag and source address)",
        );
        let legs_failed = counter_vec(
            "server_legs_failed_total",
            "Server legs closed as failed, by reason (silent, ice_failed, panic)",
            "reason",
        );
        let nack = counter(
            "nack_total",
            "NACK feedback packets received from subscribers",
        );
        let retransmitted = counter(
            "retransmitted_packets_total",
            "RTP packets retransmitted to subscribers in answer to NACKs",
        );
        let retransmissions_dropped = counter(
            "retransmissions_dropped_total",
            "Retransmissions not sent because the downtrack's budget was spent",
        );
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
            legs,
            forwarded_packets,
            forwarded_bytes,
            pli,
            media_dropped,
            rooms_by_mode,
            mode_switches,
            turn_allocations,
            turn_allocations_total,
            turn_relayed_packets,
            turn_relayed_bytes,
            turn_refused,
            turn_dropped,
            tasks,
            media_routes,
            legs_failed,
            nack,
            retransmitted,
            retransmissions_dropped,
        }
    }

    /// The text exposition format for `/metrics`.
    pub fn render(&self) -> String {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.tasks.set(runtime.metrics().num_alive_tasks() as i64);
        }
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
