//! The media harness shared by the scenarios of `sfu_media` and `faults`:
//! members of a call (a webrtc-rs client of `rtc_peer`, its signaling
//! driver and its sender), joining them, waiting until they render each
//! other, and tearing the call down.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use confab::config::Config;
use serde_json::Value;

use crate::common::{
    join_with, media_test_lock, room_name, start_server_with, test_config, TestServer,
    PROTOCOL_VERSION, STEP,
};
use crate::rtc_peer::{Path, PeerConfig, RtcPeer, SendReport, SignalingHandle, Streamer};

/// One packet per source this often (50 packets/s, a typical video frame rate).
pub const INTERVAL: Duration = Duration::from_millis(20);
/// RTP payload size.
pub const PAYLOAD_LEN: usize = 1000;
/// Bound on reaching a mode or a rendering state.
pub const SETTLE: Duration = Duration::from_secs(10);

/// A member of the call: its client, its signaling driver and its sender.
pub struct Member {
    pub peer: RtcPeer,
    pub sig: Option<SignalingHandle>,
    pub id: String,
    /// When it started joining (its client already built).
    pub joined_at: Instant,
    pub streamer: Option<Streamer>,
    /// Reports of the stopped streamer, one per source (video first).
    pub sent: Vec<SendReport>,
}

impl Member {
    /// The member's name (its client's).
    pub fn name(&self) -> &str {
        &self.peer.name
    }

    /// The running signaling driver.
    pub fn sig(&self) -> &SignalingHandle {
        self.sig.as_ref().expect("signaling running")
    }

    /// The tags of this member's sources (video first).
    pub fn tags(&self) -> Vec<u32> {
        self.peer
            .video()
            .iter()
            .chain(self.peer.audio().iter())
            .map(|s| s.tag)
            .collect()
    }

    /// The tag of this member's video source.
    pub fn video_tag(&self) -> u32 {
        self.peer.video().expect("a video source").tag
    }

    /// Stops the sender, keeping its reports in `sent`.
    pub async fn stop_streaming(&mut self) {
        if let Some(streamer) = self.streamer.take() {
            self.sent = streamer.stop().await;
        }
    }

    /// Counter after the last packet of the source tagged `tag`.
    pub fn end_of(&self, tag: u32) -> u32 {
        self.sent
            .iter()
            .find(|r| r.tag == tag)
            .map(SendReport::end)
            .unwrap_or_else(|| panic!("{}: no report for {tag:#010x}", self.name()))
    }

    /// The member crashes: its sender stops mid-stream, its socket goes
    /// without a close frame and its peer connections close, nothing said.
    pub async fn kill(&mut self) {
        drop(self.streamer.take());
        self.sig.take().expect("signaling running").kill().await;
        self.peer.close().await;
    }

    /// Stops streaming and signaling, and closes the client.
    pub async fn close(mut self) {
        self.stop_streaming().await;
        if let Some(sig) = self.sig.take() {
            sig.stop().await;
        }
        self.peer.close().await;
    }
}

/// What the grant scenarios' servers sign tokens with.
pub const GRANT_SECRET: &str = "faults-test-secret-faults-test-secret";

/// A `join` of `room` as `name` with a token (10 minutes, signed with
/// [`GRANT_SECRET`]) granting `grants`.
pub fn join_with_grants(room: &str, name: &str, grants: confab::auth::Grants) -> Value {
    let token = confab::auth::issue(GRANT_SECRET, room, name, None, 600, grants);
    serde_json::json!({
        "type": "join", "v": PROTOCOL_VERSION, "room": room, "name": name, "token": token
    })
}

/// `cfg` with join tokens required, signed with [`GRANT_SECRET`].
pub fn with_tokens(mut cfg: Config) -> Config {
    cfg.jwt_secret = Some(GRANT_SECRET.to_owned());
    cfg
}

/// A `join` with every grant, the publish grant only if `publish`.
pub fn join_publishing(room: &str, name: &str, publish: bool) -> Value {
    let grants = confab::auth::Grants {
        publish,
        ..confab::auth::Grants::default()
    };
    join_with_grants(room, name, grants)
}

/// Runs a media scenario alone (see `media_test_lock`) within `limit`.
pub async fn run_scenario(
    what: &str,
    limit: Duration,
    scenario: impl std::future::Future<Output = ()>,
) {
    let _serial = media_test_lock().await;
    tokio::time::timeout(limit, scenario)
        .await
        .unwrap_or_else(|_| panic!("the {what} did not finish within {} s", limit.as_secs_f64()));
}

/// The test configuration (see `common::test_config`) with every room
/// server-routed, never peer-to-peer.
pub fn server_only_config() -> Config {
    let mut cfg = test_config();
    cfg.mode_policy.never_p2p = true;
    cfg
}

/// Builds the client, joins `room` on the server at `addr`, starts
/// signaling and streaming.
pub async fn join_member(addr: SocketAddr, room: &str, config: PeerConfig) -> Member {
    let msg = serde_json::json!({
        "type": "join", "v": PROTOCOL_VERSION, "room": room, "name": config.name.clone()
    });
    join_member_with(addr, msg, config).await
}

/// [`join_member`] with the `join` message `msg` (a token, say).
pub async fn join_member_with(addr: SocketAddr, msg: Value, config: PeerConfig) -> Member {
    let name = config.name.clone();
    let peer = RtcPeer::new(config)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let joined_at = Instant::now();
    let (ws, joined) = join_with(addr, msg).await;
    let id = joined["participant_id"].as_str().unwrap().to_owned();
    let (tx, rx) = ws.into_split();
    let sig = peer.start_signaling(&joined, tx, rx);
    let streamer = peer.start_streaming(INTERVAL, PAYLOAD_LEN);
    Member {
        peer,
        sig: Some(sig),
        id,
        joined_at,
        streamer: Some(streamer),
        sent: Vec::new(),
    }
}

/// [`join_member`] for each of `configs` in turn, all in `room`.
pub async fn join_members(
    addr: SocketAddr,
    room: &str,
    configs: impl IntoIterator<Item = PeerConfig>,
) -> Vec<Member> {
    let mut members = Vec::new();
    for config in configs {
        members.push(join_member(addr, room, config).await);
    }
    members
}

/// A server with `cfg` and, in a new room named after `prefix`, a member
/// for each of `configs` (see [`join_members`]); with the room and the
/// instant before the first join.
pub async fn start_call(
    cfg: Config,
    prefix: &str,
    configs: impl IntoIterator<Item = PeerConfig>,
) -> (TestServer, String, Instant, Vec<Member>) {
    let server = start_server_with(cfg).await;
    let room = room_name(prefix);
    let since = Instant::now();
    let members = join_members(server.addr, &room, configs).await;
    (server, room, since, members)
}

/// Every member's timeline from `since`.
pub fn history(members: &[&Member], since: Instant) -> String {
    let mut out = String::new();
    for m in members {
        out.push_str(&format!("--- {} ({}) ---\n", m.name(), m.id));
        for line in m.peer.timeline(since) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// Waits until every member is in `mode`.
pub async fn wait_all_mode(members: &[&Member], mode: &str, since: Instant) {
    for m in members {
        if let Err(e) = m.peer.wait_mode(mode, 0, SETTLE).await {
            panic!(
                "{e}\nmodes seen: {:?}\n{}",
                m.sig().log().mode_names(),
                history(members, since)
            );
        }
    }
}

/// The tags of every stream of `members` but `r`'s own.
pub fn others_tags(members: &[&Member], r: &Member) -> Vec<u32> {
    members
        .iter()
        .filter(|s| s.id != r.id)
        .flat_map(|s| s.tags())
        .collect()
}

/// Waits until every member renders every other member's streams from the
/// server.
pub async fn wait_all_rendering_via_server(members: &[&Member], since: Instant) {
    for r in members {
        let tags = others_tags(members, r);
        if let Err(e) = r.peer.wait_rendering(&tags, Path::Server, SETTLE).await {
            panic!("{e}\n{}", history(members, since));
        }
    }
}

/// Waits until every member is in `sfu` and renders every other member's
/// streams from the server (timelines from `since` on failure).
pub async fn wait_all_via_server_since(members: &[&Member], since: Instant) {
    wait_all_mode(members, "sfu", since).await;
    wait_all_rendering_via_server(members, since).await;
}

/// [`wait_all_via_server_since`] with timelines from the first join.
pub async fn wait_all_via_server(members: &[&Member]) {
    let since = members
        .iter()
        .map(|m| m.joined_at)
        .min()
        .unwrap_or_else(Instant::now);
    wait_all_via_server_since(members, since).await;
}

/// Every (receiver, sender, tag) of the streams of `senders` at
/// `receivers`, a member's own streams left out.
pub fn stream_pairs<'a>(
    receivers: &'a [&'a Member],
    senders: &'a [&'a Member],
) -> impl Iterator<Item = (&'a Member, &'a Member, u32)> + 'a {
    receivers.iter().flat_map(move |r| {
        senders
            .iter()
            .filter(move |s| s.id != r.id)
            .flat_map(move |s| s.tags().into_iter().map(move |tag| (*r, *s, tag)))
    })
}

/// How many server offers each of `members` has had so far.
pub fn offer_counts(members: &[&Member]) -> Vec<usize> {
    members
        .iter()
        .map(|m| m.sig().log().server_offers.len())
        .collect()
}

/// Waits (5 s) until `m` got a server offer after its first `before` and
/// answered every one.
pub async fn wait_offer_answered(m: &Member, before: usize, after_what: &str) {
    m.sig()
        .wait_log(STEP, |l| {
            l.server_offers.len() > before && l.server_answers_sent == l.server_offers.len()
        })
        .await
        .unwrap_or_else(|l| {
            panic!(
                "{}: no new server offer after {after_what} ({} offers, {} answers)",
                m.name(),
                l.server_offers.len(),
                l.server_answers_sent
            )
        });
}

/// Waits (5 s) for `m`'s `participant_left` about `id`; its reason and
/// arrival.
pub async fn wait_left(m: &Member, id: &str, who: &str) -> (String, Instant) {
    let log = m
        .sig()
        .wait_log(STEP, |l| {
            l.participants_left.iter().any(|(x, _, _)| x == id)
        })
        .await
        .unwrap_or_else(|l| {
            panic!(
                "{}: no participant_left for {who}: {:?}",
                m.name(),
                l.participants_left
            )
        });
    let (_, reason, at) = log
        .participants_left
        .iter()
        .find(|(x, _, _)| x == id)
        .unwrap()
        .clone();
    (reason, at)
}

/// Closes every member, then stops the server.
pub async fn finish(members: Vec<Member>, server: TestServer) {
    close_all(members).await;
    server.shutdown().await;
}

/// Closes every member.
pub async fn close_all(members: Vec<Member>) {
    for m in members {
        m.close().await;
    }
}
