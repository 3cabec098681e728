//! Prometheus metrics: one registry per server and one struct holding every
//! metric handle, so that counting is a field access and not a lookup.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric Confab exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// The standard `process_*` series, without Confab's prefix (what
    /// dashboards and alerts expect).
    process: Registry,
    /// Every metric's full name, in registration order.
    names: Vec<String>,
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
    /// Signaling messages received from clients, by `type` (`invalid` for
    /// frames that do not parse, `binary` for binary frames).
    pub messages_in: IntCounterVec,
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
    /// Mode changes, by the mode left, the mode entered and the reason.
    pub mode_switches: IntCounterVec,
    /// Client-reported time from a switch's `mode` message to the first
    /// frame decoded on the new path, by the mode switched to.
    pub mode_switch_gap: HistogramVec,
    /// Time from a `join` message to the participant's server leg
    /// connecting (ICE and DTLS done).
    pub join_latency: Histogram,
    /// Time from an RTP packet's arrival to its last forwarded copy leaving
    /// the server.
    pub forward_latency: Histogram,
    /// 1 while the server drains (refuses new rooms), else 0.
    pub draining: IntGauge,
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
        let names = std::cell::RefCell::new(Vec::new());
        // Registers a metric and remembers its full name.
        let reg = |c: Box<dyn Collector>| {
            for desc in c.desc() {
                names.borrow_mut().push(format!("confab_{}", desc.fq_name));
            }
            registry.register(c).expect("unique metric name");
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            reg(Box::new(g.clone()));
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            reg(Box::new(c.clone()));
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
        let connections_refused = counter(
            "ws_connections_refused_total",
            "WebSocket upgrades refused at the connection cap",
        );
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            reg(Box::new(c.clone()));
            c
        };
        let messages_in = counter_vec(
            "signaling_messages_total",
            "Signaling messages received, by type (invalid: did not parse)",
            &["type"],
        );
        let errors = counter_vec(
            "errors_total",
            "Error messages sent to clients, by code",
            &["code"],
        );
        let legs = gauge("server_legs", "Live server legs (SFU peer connections)");
        let forwarded_packets = counter_vec(
            "forwarded_packets_total",
            "RTP packets forwarded to subscribers",
            &["kind"],
        );
        let forwarded_bytes = counter_vec(
            "forwarded_bytes_total",
            "RTP payload bytes forwarded to subscribers",
            &["kind"],
        );
        let pli = counter("pli_total", "Keyframe requests sent to publishers");
        let media_dropped = counter_vec(
            "media_dropped_datagrams_total",
            "Media datagrams dropped, by reason (unroutable, oversize, srtp, rejected)",
            &["reason"],
        );
        let rooms_by_mode =
            IntGaugeVec::new(Opts::new("rooms_by_mode", "Rooms by media mode"), &["mode"])
                .expect("valid metric");
        reg(Box::new(rooms_by_mode.clone()));
        let mode_switches = counter_vec(
            "mode_switches_total",
            "Room mode changes, by mode left, mode entered and reason",
            &["from", "to", "reason"],
        );
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            reg(Box::new(h.clone()));
            h
        };
        let mode_switch_gap = HistogramVec::new(
            HistogramOpts::new(
                "mode_switch_gap_seconds",
                "Client-reported time from a switch to the first frame on the new path",
            )
            .buckets(vec![0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0]),
            &["to"],
        )
        .expect("valid metric");
        reg(Box::new(mode_switch_gap.clone()));
        let join_latency = histogram(
            "join_latency_seconds",
            "Time from a join message to the participant's server leg connecting",
            vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0],
        );
        let forward_latency = histogram(
            "forward_latency_seconds",
            "Time from an RTP packet's arrival to its last forwarded copy being sent",
            vec![
                0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
                0.01, 0.025,
            ],
        );
        let draining = gauge("draining", "1 while the server drains (refuses new rooms)");
        let turn_allocations = gauge("turn_allocations", "Live TURN allocations");
        let turn_allocations_total = counter("turn_allocations_total", "TURN allocations created");
        let turn_relayed_packets = counter_vec(
            "turn_relayed_packets_total",
            "Datagrams relayed by the TURN server, by direction (to_peer, from_peer)",
            &["direction"],
        );
        let turn_relayed_bytes = counter_vec(
            "turn_relayed_bytes_total",
            "Bytes relayed by the TURN server, by direction (to_peer, from_peer)",
            &["direction"],
        );
        let turn_refused = counter_vec(
            "turn_refused_total",
            "TURN requests refused, by reason (unauthorized, expired, quota, forbidden_peer)",
            &["reason"],
        );
        let turn_dropped = counter_vec(
            "turn_dropped_datagrams_total",
            "TURN datagrams dropped unanswered, by reason",
            &["reason"],
        );
        let tasks = gauge("tasks", "Live tokio tasks (read at scrape time)");
        let media_routes = gauge(
            "media_routes",
            "Entries of the SFU's routing tables (ICE ufrag and source address)",
        );
        let legs_failed = counter_vec(
            "server_legs_failed_total",
            "Server legs closed as failed, by reason (silent, ice_failed, panic)",
            &["reason"],
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
        let names = names.into_inner();
        let process = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let _ = process.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        Metrics {
            registry,
            process,
            names,
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
            mode_switch_gap,
            join_latency,
            forward_latency,
            draining,
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

    /// Every metric's full name (`confab_…`), including labelled families
    /// that have no sample yet (the exposition leaves those out).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The text exposition format for `/metrics`.
    pub fn render(&self) -> String {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.tasks.set(runtime.metrics().num_alive_tasks() as i64);
        }
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let _ = encoder.encode(&families, &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
